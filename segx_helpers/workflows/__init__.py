"""Workflows: the reusable steps the notebooks, the commands and the studies share (paths and run settings, training and explanation recipes, results, the summary)."""
