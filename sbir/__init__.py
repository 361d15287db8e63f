"""Zero-shot sketch-based image retrieval service built on IIAE."""

__version__ = "0.1.0"
