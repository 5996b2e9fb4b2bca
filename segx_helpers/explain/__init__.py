"""Explanations: explanation maps for a classifier's predictions, one module per method family."""
