"""Datasets: the common format (`model.data.dataset`) and the builders that write it.

Training and evaluation code reads a dataset directory through this API::

    from model.data import read_manifest, load_split, records_in, resolve_path

    records = read_manifest(root)              # list[Record]
    split = load_split(root, "category_seed0")  # Split(train, val, unseen)
    train_sketches = records_in(records, split, "train", domain="sketch")
    path = resolve_path(root, train_sketches[0])
"""

from model.data.dataset import (
    DOMAINS,
    PARTS,
    Record,
    Split,
    format_split_summary,
    list_splits,
    load_split,
    make_split,
    read_manifest,
    read_split,
    records_in,
    resolve_path,
    split_counts,
    split_with_unseen,
    write_manifest,
    write_split,
)

__all__ = [
    "DOMAINS",
    "PARTS",
    "Record",
    "Split",
    "format_split_summary",
    "list_splits",
    "load_split",
    "make_split",
    "read_manifest",
    "read_split",
    "records_in",
    "resolve_path",
    "split_counts",
    "split_with_unseen",
    "write_manifest",
    "write_split",
]
