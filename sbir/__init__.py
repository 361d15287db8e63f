"""Zero-shot sketch-based image retrieval service built on IIAE."""

from sbir_ground import __version__

__all__ = ["__version__"]
