"""Shared pieces of the folder-based adapters: class-name matching and writing a dataset.

Benchmarks name the same class differently in different folders ("hot-air_balloon" and
"hot_air_balloon", "bear (animal)" and "bearanimal"). Names are compared in two steps: first by
`canonical_name` (lowercase, runs of spaces, hyphens and underscores made one "_"), then by
`letters_key` (lowercase letters only).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from model.data.dataset import (
    Record,
    Split,
    _atomic_write_text,
    split_path,
    split_with_unseen,
    write_manifest,
)
from model.ground.errors import UserError
from model.images import list_images

LOG = logging.getLogger(__name__)


def canonical_name(name: str) -> str:
    """ "Hot-Air Balloon" and "hot_air__balloon" -> "hot_air_balloon"; parentheses are kept."""
    return re.sub(r"[\s\-_]+", "_", name.strip().lower()).strip("_")


def letters_key(name: str) -> str:
    """ "bear (animal)" -> "bearanimal": the loosest comparison, letters only."""
    return re.sub(r"[^a-z]", "", name.lower())


def class_dirs(folder: Path) -> dict[str, Path]:
    """Sub-folders of `folder` by name (hidden ones skipped), sorted."""
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}


class NameIndex:
    """Looks names up by canonical form, then by letters only; refuses ambiguous letter keys."""

    def __init__(self, names: Iterable[str]):
        self.names = sorted(set(names))
        self._canon: dict[str, str] = {}
        self._letters: dict[str, list[str]] = {}
        for n in self.names:
            self._canon.setdefault(canonical_name(n), n)
            self._letters.setdefault(letters_key(n), []).append(n)

    def find(self, name: str) -> str | None:
        if name in self.names:
            return name
        hit = self._canon.get(canonical_name(name))
        if hit is not None:
            return hit
        hits = self._letters.get(letters_key(name), [])
        return hits[0] if len(hits) == 1 else None


def match_folders(
    sketch_dirs: Mapping[str, Path],
    photo_dirs: Mapping[str, Path],
    aliases: Mapping[str, str] | None = None,
    name_of: Callable[[str], str] = canonical_name,
) -> tuple[dict[str, tuple[Path, Path]], list[str], list[str]]:
    """Pair sketch and photo class folders. A photo folder matches a sketch folder by canonical name,
    then by letters only, then through `aliases` (photo folder name -> sketch folder name, for typos).

    Returns ({class name: (sketch dir, photo dir)}, unmatched sketch folders, unmatched photo
    folders). Class names are `name_of(sketch folder name)`.
    """
    index = NameIndex(sketch_dirs)
    aliases = {letters_key(k): v for k, v in (aliases or {}).items()}
    pairs: dict[str, tuple[Path, Path]] = {}
    used: set[str] = set()
    photo_only: list[str] = []
    for pname, pdir in photo_dirs.items():
        sname = index.find(pname)
        if sname is None and letters_key(pname) in aliases:
            sname = index.find(aliases[letters_key(pname)])
        if sname is None or sname in used:
            photo_only.append(pname)
            continue
        used.add(sname)
        pairs[name_of(sname)] = (sketch_dirs[sname], pdir)
    sketch_only = [s for s in sketch_dirs if s not in used]
    if len(pairs) != len(used):
        raise UserError("two sketch folders map to the same class name: " + ", ".join(sorted(used)))
    return dict(sorted(pairs.items())), sketch_only, photo_only


def resolve_split_classes(
    split_name: str, wanted: Iterable[str], classes: Iterable[str], root: Path
) -> list[str]:
    """Map the class names of a published split onto the dataset's; `UserError` naming any missing."""
    index = NameIndex(classes)
    found, missing = [], []
    for name in wanted:
        hit = index.find(name)
        (found if hit is not None else missing).append(hit if hit is not None else name)
    if missing:
        raise UserError(
            f"split {split_name}: class(es) not found in the data under {root} "
            f"(with both sketches and photos): {', '.join(missing)}"
        )
    return found


@dataclass(frozen=True)
class NamedSplit:
    name: str
    unseen: tuple[str, ...]
    description: str


def write_dataset(
    out: Path,
    records: Sequence[Record],
    splits: Sequence[Split],
    report: dict,
) -> None:
    """manifest.csv, splits/<name>.json and build_report.json under `out`."""
    if not records:
        raise UserError("no images found: nothing to write")
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, records)
    for s in splits:
        s.write(split_path(out, s.name))
    report = {"created": datetime.now(UTC).isoformat(timespec="seconds"), **report}
    report["splits"] = [s.name for s in splits]
    _atomic_write_text(out / "build_report.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")


def named_splits(
    classes: Sequence[str],
    specs: Iterable[NamedSplit],
    root: Path,
    seed: int = 0,
    val_fraction: float = 0.15,
) -> list[Split]:
    out = []
    for spec in specs:
        unseen = resolve_split_classes(spec.name, spec.unseen, classes, root)
        out.append(
            split_with_unseen(
                classes,
                unseen,
                name=spec.name,
                seed=seed,
                val_fraction=val_fraction,
                description=spec.description,
            )
        )
    return out


def images_in(folder: Path) -> list[Path]:
    """Image files under a class folder (recursively), sorted, absolute."""
    return list_images(folder)


def require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{path} not found: expected {what}. Layout: {layout}")
    return path


def absolute(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def warn_unmatched(kind: str, names: list[str]) -> None:
    if names:
        LOG.warning("%s without a counterpart (left out): %s", kind, ", ".join(names[:20]))


def class_records(
    pairs: dict[str, tuple[list[Path], list[Path], dict]], instance_of=None
) -> tuple[list[Record], list[str], list[str]]:
    """Records of the classes that have both sketches and photos; returns them and the empty ones."""
    records: list[Record] = []
    no_sketches, no_photos = [], []
    for name, (sketches, photos, meta) in pairs.items():
        if not sketches:
            no_sketches.append(name)
        if not photos:
            no_photos.append(name)
        if not sketches or not photos:
            continue
        for domain, files in (("sketch", sketches), ("photo", photos)):
            for p in files:
                inst = instance_of(p, domain) if instance_of else ""
                records.append(Record(str(p), domain, name, inst, "", dict(meta[domain])))
    return records, no_sketches, no_photos
