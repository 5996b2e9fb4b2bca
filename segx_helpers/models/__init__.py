"""Models: the networks, the training loop, checkpoints on disk and where masks come from."""
