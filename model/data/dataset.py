"""The dataset format every later stage reads: a manifest of images and named class splits.

A dataset is a directory::

    DIR/manifest.csv          one row per image: path, domain, category, instance, artist, extras...
    DIR/splits/<name>.json    which classes train, select models (val) and test (unseen)

`path` is relative to DIR (data built into DIR, e.g. the emoji benchmark) or absolute (adapters for
external benchmarks point at data that stays where it is). `domain` is "sketch" (the queries) or
"photo" (the gallery). `category` is the class of the zero-shot protocol, `instance` a fine-grained
label ("" if none: retrieval of the exact object), `artist` who drew it ("" if unknown). Any further
columns are kept, as strings, in `Record.meta`.

A split names three disjoint class sets: `train` (fit the model), `val` (seen classes held out for
model selection and early stopping, never the unseen ones) and `unseen` (the zero-shot test). Its
`granularity` says which record field the class names refer to ("category" or "instance").
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from model.ground.errors import UserError
from model.ground.files import write_text_atomic

# numpy is imported inside the three functions that need it: the rest of this module (and `sbir data`'s
# manifest and split commands) runs on the standard library alone.

MANIFEST_NAME = "manifest.csv"
SPLITS_DIR = "splits"
DOMAINS = ("sketch", "photo")
BASE_COLUMNS = ("path", "domain", "category", "instance", "artist")
PARTS = ("train", "val", "unseen")
GRANULARITIES = ("category", "instance")
HELDOUT_KEY = "heldout"  # a meta column: "1" marks a record that training must never read
STYLE_SET_KEY = "style_set"  # a meta column: the drawing-style set a record belongs to ("" or absent: the core set)


# --------------------------------------------------------------------------------------------------
# Records and the manifest


@dataclass(frozen=True)
class Record:
    """One image of a dataset (see the module docstring for the meaning of each field)."""

    path: str
    domain: str
    category: str
    instance: str = ""
    artist: str = ""
    meta: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("record with an empty path")
        if self.domain not in DOMAINS:
            raise ValueError(f"record {self.path}: domain {self.domain!r} is not one of {DOMAINS}")
        if not self.category:
            raise ValueError(f"record {self.path}: empty category")
        for key, value in self.meta.items():
            if key in BASE_COLUMNS:
                raise ValueError(f"record {self.path}: meta key {key!r} collides with a manifest column")
            if not isinstance(key, str) or not key or not isinstance(value, str):
                raise ValueError(f"record {self.path}: meta must map non-empty str to str, got {key!r}")

    @property
    def heldout(self) -> bool:
        """A held-out drawing style (meta `heldout` = "1"): evaluated, never trained on or chosen by."""
        return self.meta.get(HELDOUT_KEY) == "1"

    @property
    def style_set(self) -> str:
        return self.meta.get(STYLE_SET_KEY, "")

    def label(self, granularity: str = "category") -> str:
        """The class name this record has under a split of the given granularity."""
        if granularity == "category":
            return self.category
        if granularity == "instance":
            return self.instance
        raise ValueError(f"granularity {granularity!r} is not one of {GRANULARITIES}")


def _atomic_write_text(path: Path, text: str) -> None:
    """`model.ground.files.write_text_atomic`, creating the folder first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def write_manifest(root: str | os.PathLike, records: Iterable[Record]) -> Path:
    """Write `root/manifest.csv` (atomically). Extra columns are the union of all `meta` keys, in
    order of first appearance; a record without one of them gets "" there. Returns the file's path."""
    records = list(records)
    extra: dict[str, None] = {}
    for r in records:
        for key in r.meta:
            extra.setdefault(key, None)
    columns = [*BASE_COLUMNS, *extra]

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in records:
        writer.writerow(
            [r.path, r.domain, r.category, r.instance, r.artist, *(r.meta.get(k, "") for k in extra)]
        )
    path = Path(root) / MANIFEST_NAME
    _atomic_write_text(path, buf.getvalue())
    return path


def read_manifest(root: str | os.PathLike) -> list[Record]:
    """Read `root/manifest.csv`. Every extra column lands in `meta` (as "" where the cell is empty).

    Raises `UserError` for a missing file, missing columns or a malformed row (with its line number).
    """
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(
            f"{path} not found: {root} is not a dataset directory "
            "(build one with `sbir data emoji|sketchy|tuberlin|folder`)"
        )
    records: list[Record] = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise UserError(f"{path} is empty") from None
        missing = [c for c in BASE_COLUMNS if c not in header]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
        if len(set(header)) != len(header):
            raise UserError(f"{path}: duplicate column names in header {header}")
        index = {c: header.index(c) for c in BASE_COLUMNS}
        extra = [(i, c) for i, c in enumerate(header) if c not in BASE_COLUMNS]
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise UserError(
                    f"{path}, line {reader.line_num}: {len(row)} fields, the header has {len(header)}"
                )
            try:
                records.append(
                    Record(
                        path=row[index["path"]],
                        domain=row[index["domain"]],
                        category=row[index["category"]],
                        instance=row[index["instance"]],
                        artist=row[index["artist"]],
                        meta={c: row[i] for i, c in extra},
                    )
                )
            except ValueError as exc:
                raise UserError(f"{path}, line {reader.line_num}: {exc}") from None
    return records


def is_absolute_path(path: str) -> bool:
    """Absolute in POSIX or Windows form (manifests may travel between machines)."""
    return PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute()


def resolve_path(root: str | os.PathLike, record: Record) -> Path:
    """The file of `record`: its path as is when absolute, else relative to the dataset directory."""
    if is_absolute_path(record.path):
        return Path(record.path)
    return Path(root) / record.path


def relative_posix(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """`path` relative to `root` with forward slashes, for a manifest that must work on any OS."""
    return Path(path).relative_to(root).as_posix()


# --------------------------------------------------------------------------------------------------
# Splits


@dataclass
class Split:
    """Three disjoint class sets. `seed` is the seed that drew it (None for a hand-made split)."""

    name: str
    seed: int | None
    train: list[str]
    val: list[str]
    unseen: list[str]
    granularity: str = "category"
    description: str = ""

    def __post_init__(self) -> None:
        self.train = list(self.train)
        self.val = list(self.val)
        self.unseen = list(self.unseen)

    # -- checks ---------------------------------------------------------------------------------
    def check(self) -> Split:
        """Raise `UserError` unless the parts are disjoint, duplicate-free and train/unseen non-empty."""
        where = f"split {self.name!r}"
        if self.granularity not in GRANULARITIES:
            raise UserError(f"{where}: granularity {self.granularity!r} is not one of {GRANULARITIES}")
        for part in PARTS:
            names = getattr(self, part)
            if any(not isinstance(c, str) or not c for c in names):
                raise UserError(f"{where}: {part} holds a class name that is not a non-empty string")
            if len(set(names)) != len(names):
                dup = sorted({c for c in names if names.count(c) > 1})
                raise UserError(f"{where}: {part} lists {', '.join(dup)} more than once")
        for a, b in (("train", "val"), ("train", "unseen"), ("val", "unseen")):
            both = sorted(set(getattr(self, a)) & set(getattr(self, b)))
            if both:
                raise UserError(f"{where}: {a} and {b} share {len(both)} class(es): {', '.join(both[:10])}")
        if not self.train:
            raise UserError(f"{where}: no training classes")
        if not self.unseen:
            raise UserError(f"{where}: no unseen classes")
        return self

    def validate(self, classes: Iterable[str]) -> list[str]:
        """Check the split against the classes a dataset has.

        A split class missing from the data is an error (`UserError` naming it). Returns the dataset
        classes the split does not mention (left out of every part), for the caller to report.
        """
        self.check()
        have = set(classes)
        for part in PARTS:
            missing = sorted(set(getattr(self, part)) - have)
            if missing:
                raise UserError(
                    f"split {self.name!r}: {part} class(es) not in the data: {', '.join(missing)}"
                )
        return sorted(have - self.classes)

    # -- queries --------------------------------------------------------------------------------
    @property
    def seen(self) -> list[str]:
        return sorted(self.train + self.val)

    @property
    def classes(self) -> set[str]:
        return set(self.train) | set(self.val) | set(self.unseen)

    def part_of(self, name: str) -> str | None:
        """ "train", "val", "unseen", or None for a class the split does not mention."""
        for part in PARTS:
            if name in getattr(self, part):
                return part
        return None

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "seed": self.seed,
            "granularity": self.granularity,
            "description": self.description,
            "train": list(self.train),
            "val": list(self.val),
            "unseen": list(self.unseen),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, data: str | bytes | Mapping) -> Split:
        """Parse JSON text (or an already parsed mapping) and check it; errors are `UserError`s."""
        if isinstance(data, str | bytes):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise UserError(f"split file is not valid JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise UserError("a split must be a JSON object")
        missing = [k for k in ("name", "train", "val", "unseen") if k not in data]
        if missing:
            raise UserError(f"split is missing key(s): {', '.join(missing)}")
        for part in PARTS:
            if not isinstance(data[part], list):
                raise UserError(f"split {data['name']!r}: {part} must be a list of class names")
        seed = data.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise UserError(f"split {data['name']!r}: seed must be an integer or null")
        return cls(
            name=str(data["name"]),
            seed=seed,
            train=data["train"],
            val=data["val"],
            unseen=data["unseen"],
            granularity=str(data.get("granularity", "category")),
            description=str(data.get("description", "")),
        ).check()

    def write(self, path: str | os.PathLike) -> Path:
        self.check()
        path = Path(path)
        _atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> Split:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"split file {path} not found")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None


def write_split(split: Split, path: str | os.PathLike) -> Path:
    """Write `split` as JSON (atomically) after checking it."""
    return split.write(path)


def read_split(path: str | os.PathLike) -> Split:
    """Read and check a split file."""
    return Split.read(path)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _draw_seed() -> int:
    import numpy as np

    return int(np.random.SeedSequence().entropy % (2**31))


def _val_count(n_seen: int, val_fraction: float) -> int:
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val fraction must be in [0, 1), got {val_fraction}")
    n_val = min(_round_half_up(val_fraction * n_seen), n_seen - 1)
    if val_fraction > 0 and n_val == 0 and n_seen >= 2:
        n_val = 1
    return max(n_val, 0)


def make_split(
    classes: Iterable[str],
    seed: int | None,
    unseen_fraction: float = 0.2,
    val_fraction: float = 0.15,
    name: str | None = None,
    granularity: str = "category",
    description: str = "",
) -> Split:
    """Draw a zero-shot split of `classes`, deterministic for a given seed.

    The classes are sorted and de-duplicated, then permuted by `numpy.random.default_rng(seed)`: the
    first round(unseen_fraction * n) (at least 1) are unseen, the next round(val_fraction * seen) (at
    least 1 when val_fraction > 0 and there is room) are val, the rest train. Each part is returned
    sorted. `seed=None` draws a fresh seed and records it in the split, so any split can be remade.
    """
    import numpy as np

    names = sorted(set(classes))
    n = len(names)
    if n < 2:
        raise UserError(f"a split needs at least 2 classes, got {n}")
    if not 0.0 < unseen_fraction < 1.0:
        raise UserError(f"unseen fraction must be in (0, 1), got {unseen_fraction}")
    if seed is None:
        seed = _draw_seed()
    n_unseen = min(max(_round_half_up(unseen_fraction * n), 1), n - 1)
    n_val = _val_count(n - n_unseen, val_fraction)
    order = [names[i] for i in np.random.default_rng(seed).permutation(n)]
    unseen = sorted(order[:n_unseen])
    val = sorted(order[n_unseen : n_unseen + n_val])
    train = sorted(order[n_unseen + n_val :])
    return Split(
        name=name or f"{granularity}_seed{seed}",
        seed=int(seed),
        train=train,
        val=val,
        unseen=unseen,
        granularity=granularity,
        description=description,
    ).check()


def split_with_unseen(
    classes: Iterable[str],
    unseen: Iterable[str],
    name: str,
    seed: int = 0,
    val_fraction: float = 0.15,
    granularity: str = "category",
    description: str = "",
) -> Split:
    """A split with a fixed unseen set (a published split); val is a seeded slice of the seen classes.

    Every unseen name must be one of `classes` (else `UserError` naming the missing ones).
    """
    import numpy as np

    names = sorted(set(classes))
    unseen = sorted(set(unseen))
    missing = sorted(set(unseen) - set(names))
    if missing:
        raise UserError(f"split {name!r}: unseen class(es) not in the data: {', '.join(missing)}")
    seen = [c for c in names if c not in set(unseen)]
    n_val = _val_count(len(seen), val_fraction)
    order = [seen[i] for i in np.random.default_rng(seed).permutation(len(seen))]
    return Split(
        name=name,
        seed=seed,
        train=sorted(order[n_val:]),
        val=sorted(order[:n_val]),
        unseen=unseen,
        granularity=granularity,
        description=description,
    ).check()


def split_path(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / SPLITS_DIR / f"{name}.json"


def list_splits(root: str | os.PathLike) -> dict[str, Path]:
    """The split files of a dataset, by name (the file stem), sorted by name."""
    folder = Path(root) / SPLITS_DIR
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.json")) if p.is_file()}


def load_split(root: str | os.PathLike, name_or_path: str | os.PathLike) -> Split:
    """A split of the dataset at `root` by name, or any split file by path."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".json" and candidate.is_file():
        return read_split(candidate)
    splits = list_splits(root)
    if str(name_or_path) not in splits:
        have = ", ".join(splits) or "none"
        raise UserError(f"no split {str(name_or_path)!r} in {root} (available: {have})")
    return read_split(splits[str(name_or_path)])


# --------------------------------------------------------------------------------------------------
# Selecting and summarising


def records_in(
    records: Iterable[Record], split: Split, part: str | Sequence[str], domain: str | None = None
) -> list[Record]:
    """The records whose class (under the split's granularity) is in `part` ("train", "val",
    "unseen", or several of them), optionally of one domain."""
    parts = (part,) if isinstance(part, str) else tuple(part)
    for p in parts:
        if p not in PARTS:
            raise ValueError(f"part {p!r} is not one of {PARTS}")
    wanted: set[str] = set()
    for p in parts:
        wanted.update(getattr(split, p))
    return [
        r for r in records if r.label(split.granularity) in wanted and (domain is None or r.domain == domain)
    ]


def split_counts(records: Sequence[Record], split: Split) -> dict[str, dict[str, int]]:
    """Per part: number of classes, and of sketches and photos in them."""
    out: dict[str, dict[str, int]] = {}
    for part in PARTS:
        classes = set(getattr(split, part))
        n = {"classes": len(classes), "sketches": 0, "photos": 0}
        for r in records:
            if r.label(split.granularity) in classes:
                n["sketches" if r.domain == "sketch" else "photos"] += 1
        out[part] = n
    return out


def format_split_summary(records: Sequence[Record], split: Split) -> str:
    """A few aligned lines: the split's name, then classes/sketches/photos per part."""
    counts = split_counts([r for r in records if not r.heldout], split)
    seed = "" if split.seed is None else f", seed {split.seed}"
    lines = [f"split {split.name} ({split.granularity}{seed})"]
    for part in PARTS:
        c = counts[part]
        lines.append(
            f"  {part:<7}{c['classes']:>6} classes {c['sketches']:>8} sketches {c['photos']:>8} photos"
        )
    return "\n".join(lines)


def format_dataset_summary(
    root: str | os.PathLike, records: Sequence[Record], splits: Iterable[Split]
) -> str:
    sketches = sum(r.domain == "sketch" for r in records)
    photos = len(records) - sketches
    categories = len({r.category for r in records})
    head = f"dataset {root}: {categories} categories, {sketches} sketches, {photos} photos"
    heldout = [r for r in records if r.heldout]
    if heldout:
        artists = ", ".join(f"{a} {n}" for a, n in sorted(Counter(r.artist for r in heldout).items()))
        head += (f"\n  held out from training (evaluation only): {len(heldout)} images ({artists}); "
                 "the split counts below leave them out")
    return "\n".join([head, *(format_split_summary(records, s) for s in splits)])
