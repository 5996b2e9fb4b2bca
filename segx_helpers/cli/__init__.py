"""Command line: ``segx audit`` / ``segx train`` and DDP training with torchrun."""
