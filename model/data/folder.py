"""Adapter for a plain folder layout of your own data::

    ROOT/sketches/<class>/*      (any image format; sub-folders are searched)
    ROOT/photos/<class>/*

Classes are the sketch folder names; a photo folder matches a sketch folder of the same name, or of
the same name up to case, spaces, hyphens and underscores. The manifest holds absolute paths. The split
comes from a split file (checked against the classes) or is drawn with `make_split` from a seed.
"""

from __future__ import annotations

import os
from pathlib import Path

from model.data.dataset import Split, make_split, read_split
from model.data.layout import (
    absolute,
    class_dirs,
    class_records,
    images_in,
    match_folders,
    require_dir,
    resolve_split_classes,
    warn_unmatched,
    write_dataset,
)
from model.ground.errors import UserError

FOLDER_LAYOUT = "ROOT/sketches/<class>/* and ROOT/photos/<class>/*"


def _split_from_file(path: Path, classes: list[str], root: Path) -> tuple[Split, list[str]]:
    given = read_split(path)
    if given.granularity != "category":
        raise UserError(f"{path}: a folder dataset has categories only, not {given.granularity!r} splits")
    parts = {
        part: resolve_split_classes(f"{given.name} ({path}) {part}", getattr(given, part), classes, root)
        for part in ("train", "val", "unseen")
    }
    split = Split(
        given.name, given.seed, parts["train"], parts["val"], parts["unseen"], description=given.description
    )
    left_out = split.validate(classes)
    return split, left_out


def build_folder(
    root: str | os.PathLike,
    out: str | os.PathLike,
    split_file: str | os.PathLike | None = None,
    seed: int | None = None,
    unseen_fraction: float = 0.2,
    val_fraction: float = 0.15,
):
    """Write a dataset for ROOT/sketches + ROOT/photos to `out`. Returns (records, splits, report)."""
    root, out = absolute(root), absolute(out)
    sketch_root = require_dir(root / "sketches", "sketch class folders", FOLDER_LAYOUT)
    photo_root = require_dir(root / "photos", "photo class folders", FOLDER_LAYOUT)
    pairs, sketch_only, photo_only = match_folders(
        class_dirs(sketch_root), class_dirs(photo_root), name_of=str
    )
    warn_unmatched("sketch folders", sketch_only)
    warn_unmatched("photo folders", photo_only)
    classes = {
        name: (images_in(sdir), images_in(pdir), {"sketch": {}, "photo": {}})
        for name, (sdir, pdir) in pairs.items()
    }
    records, no_sketches, no_photos = class_records(classes)
    names = sorted({r.category for r in records})
    if not names:
        raise UserError(f"no class under {root} has both sketches and photos (layout: {FOLDER_LAYOUT})")
    left_out: list[str] = []
    if split_file is not None:
        split, left_out = _split_from_file(Path(split_file), names, root)
    else:
        seed = 0 if seed is None else seed
        split = make_split(names, seed, unseen_fraction, val_fraction, name=f"category_seed{seed}")
    report = {
        "source": "folder",
        "root": str(root),
        "classes": len(names),
        "sketches": sum(r.domain == "sketch" for r in records),
        "photos": sum(r.domain == "photo" for r in records),
        "split_file": str(Path(split_file).resolve()) if split_file is not None else None,
        "classes_in_no_split_part": left_out,
        "unmatched_sketch_folders": sketch_only,
        "unmatched_photo_folders": photo_only,
        "classes_without_sketches": no_sketches,
        "classes_without_photos": no_photos,
    }
    write_dataset(out, records, [split], report)
    return records, [split], report
