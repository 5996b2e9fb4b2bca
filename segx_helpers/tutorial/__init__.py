"""Tutorial: what the notebooks call (paths and run settings, recipes, results, figures, report, runner, book)."""
