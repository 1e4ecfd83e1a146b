"""csprune: compressed-sensing-based pruning for PyTorch models."""

__version__ = "0.1.0"
