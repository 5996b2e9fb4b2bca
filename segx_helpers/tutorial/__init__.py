"""Tutorial: what only the notebooks use (figures, the interactive explorer, the notebooks' one-call analyses)."""
