"""Zero-shot sketch-based image retrieval service built on IIAE."""

from model.ground import __version__

__all__ = ["__version__"]
