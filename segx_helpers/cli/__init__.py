"""Commands: ``segx audit`` / ``segx train`` (DDP with torchrun), the notebook runner, the book, dataset conversion."""
