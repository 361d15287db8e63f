"""What every stage shares, below all of them: the user-facing error, durable file writes, file
hashes, the version. No torch, no third-party imports; imports nothing of model/, index_builder/,
service/ or sbir/ (tests/test_import_graph.py checks it)."""

__version__ = "0.1.0"
