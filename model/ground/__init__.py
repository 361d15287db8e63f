"""What every stage shares, below all of them: the user-facing error, durable file writes, file
hashes, the version. It lives at the bottom of model/, the lowest layer, so index_builder/, service/
and sbir/ can all use it. No torch, no third-party imports, and nothing else of model/ or the other
packages (tests/test_import_graph.py checks it)."""

__version__ = "0.1.0"
