"""Scores: the saliency map, SegX, SegU, metrics and the one analysis path (arrays in, tables out)."""
