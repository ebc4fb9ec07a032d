"""batchgen: turn a manifest of generation requests into finished, downloaded files."""

__version__ = "0.1.0"
