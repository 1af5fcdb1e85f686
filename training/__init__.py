"""Training stage: datasets and models registries, the training loop, checkpoints and reports."""
__version__ = "0.1.0"
