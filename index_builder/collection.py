"""What a photo collection is: a directory tree or a manifest (CSV, JSONL, parquet) -> photo records.

Ids are stable without any state: a photo's id is derived from its key (the path relative to the
root, or the manifest's id column), so an unchanged photo keeps its id across updates and rebuilds.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from model.ground.errors import UserError
from model.images import IMAGE_SUFFIXES

LOG = logging.getLogger(__name__)

MANIFEST_SUFFIXES = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
MAX_ID = 2**63 - 1


@dataclass(frozen=True)
class PhotoRecord:
    """One photo to index. `key` is its identity across builds; `id` is derived from it."""

    id: int
    key: str
    path: Path  # absolute, inside the collection root
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    """An input left out of the index, with a short stable reason (see docs/INDEX.md)."""

    key: str
    path: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict:
        return {"key": self.key, "path": self.path, "reason": self.reason, "detail": self.detail}


@dataclass
class Collection:
    source: Path
    kind: str  # directory | csv | jsonl | parquet
    root: Path
    records: list[PhotoRecord]
    skipped: list[Skipped]

    def describe(self) -> dict:
        return {
            "source": str(self.source),
            "kind": self.kind,
            "root": str(self.root),
            "photos": len(self.records),
        }


def id_for_key(key: str) -> int:
    """63-bit non-negative id from the first 8 bytes of sha256(key): stable, no state to keep."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") >> 1


def load_collection(
    source: str | os.PathLike,
    *,
    photo_root: str | os.PathLike | None = None,
    path_column: str = "path",
    id_column: str = "id",
) -> Collection:
    """Read a directory tree or manifest file into records sorted by id.

    Manifest paths are relative to `photo_root` (default: the manifest's folder); a path that leads
    outside the root, by `..` or a symlink, is skipped with reason `outside-root`.
    """
    source = Path(source)
    if source.is_dir():
        if photo_root is not None and Path(photo_root).resolve() != source.resolve():
            raise UserError("--photo-root applies to manifest files; a directory is its own root")
        root = source.resolve()
        records, skipped = _walk_tree(root)
        kind = "directory"
    elif source.is_file():
        kind = MANIFEST_SUFFIXES.get(source.suffix.lower())
        if kind is None:
            raise UserError(
                f"{source}: not a directory nor a manifest ({', '.join(sorted(MANIFEST_SUFFIXES))})"
            )
        root = Path(photo_root).resolve() if photo_root is not None else source.resolve().parent
        if not root.is_dir():
            raise UserError(f"photo root {root} is not a directory")
        rows = _read_manifest(source, kind)
        records, skipped = _records_from_rows(rows, root, source, path_column, id_column)
    else:
        raise UserError(f"{source} does not exist")
    _check_unique_ids(records)
    records.sort(key=lambda r: r.id)
    LOG.info("%s: %d photos (%d skipped while listing)", source, len(records), len(skipped))
    return Collection(source=source.resolve(), kind=kind, root=root, records=records, skipped=skipped)


def _walk_tree(root: Path) -> tuple[list[PhotoRecord], list[Skipped]]:
    records, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            key = p.relative_to(root).as_posix()
            if p.is_symlink() and not _inside(p.resolve(), root):
                skipped.append(Skipped(key, str(p), "outside-root", f"symlink to {os.readlink(p)}"))
                continue
            records.append(PhotoRecord(id_for_key(key), key, p, {}))
    return records, skipped


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _read_manifest(path: Path, kind: str) -> list[dict]:
    try:
        if kind == "csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                return list(csv.DictReader(f))
        if kind == "jsonl":
            rows = []
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise UserError(f"{path}:{lineno}: each line must be a JSON object")
                    rows.append(row)
            return rows
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except UserError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise UserError(f"cannot read manifest {path}: {exc}") from None


def _records_from_rows(
    rows: list[dict], root: Path, source: Path, path_column: str, id_column: str
) -> tuple[list[PhotoRecord], list[Skipped]]:
    if rows and path_column not in rows[0]:
        raise UserError(f"{source} has no {path_column!r} column (columns: {', '.join(map(str, rows[0]))})")
    use_ids = any(row.get(id_column) not in (None, "") for row in rows)
    integer_ids = use_ids and all(_as_int_id(row.get(id_column)) is not None for row in rows)
    records, skipped = [], []
    for lineno, row in enumerate(rows, 1):
        raw_path = row.get(path_column)
        label = f"row {lineno}"
        if raw_path in (None, ""):
            skipped.append(Skipped(label, "", "no-path", f"empty {path_column!r}"))
            continue
        if use_ids and row.get(id_column) in (None, ""):
            skipped.append(Skipped(label, str(raw_path), "no-id", f"empty {id_column!r}"))
            continue
        rel = Path(os.path.normpath(root / str(raw_path)))  # absolute paths stay absolute
        if not _inside(rel, root) or not _inside(rel.resolve(), root):
            skipped.append(Skipped(label, str(raw_path), "outside-root", f"not under {root}"))
            continue
        if integer_ids:
            pid = _as_int_id(row[id_column])
            key = str(pid)
        elif use_ids:
            key = str(row[id_column])
            pid = id_for_key(key)
        else:
            key = rel.relative_to(root).as_posix()
            pid = id_for_key(key)
        metadata = {str(k): _jsonable(v) for k, v in row.items() if k not in (path_column, id_column)}
        records.append(PhotoRecord(pid, key, rel, metadata))
    return records, skipped


def _as_int_id(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and value.strip().isdigit():
        n = int(value.strip())
    else:
        return None
    return n if 0 <= n <= MAX_ID else None


def _check_unique_ids(records: Iterable[PhotoRecord]) -> None:
    seen: dict[int, str] = {}
    for r in records:
        if r.id not in seen:
            seen[r.id] = r.key
        elif seen[r.id] == r.key:
            raise UserError(f"photo {r.key!r} is listed twice in the collection (ids must be unique)")
        else:
            raise UserError(f"id collision: {seen[r.id]!r} and {r.key!r} both map to id {r.id}")


def _jsonable(value):
    """Manifest values (parquet brings dates, decimals, bytes) as plain JSON values."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return str(value)
