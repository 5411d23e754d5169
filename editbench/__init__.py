"""editbench: a PyTorch Lightning suite for instruction-based image editing research."""

__version__ = "0.1.0"
