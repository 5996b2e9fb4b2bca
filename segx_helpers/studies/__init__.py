"""Studies: the shortcut ground truth and training with the mask."""
