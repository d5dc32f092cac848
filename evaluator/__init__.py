"""SpatialBench evaluator: the science, as a plain PyTorch library."""

__version__ = "0.1.0"
