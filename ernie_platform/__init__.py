"""ernie_platform: the shared library (configs, models, data, training, inference, balance)."""

__version__ = "0.1.0"
