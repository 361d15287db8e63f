"""Index snapshots on disk: the writer that publishes them atomically and the reader the service uses.

ROOT/CURRENT names the published snapshot; ROOT/snapshots/<id>/ holds index.faiss, vectors.npy, ids.npy,
photos.sqlite, the model it was built with (model/), build_report.json and manifest.json (checksums of
every other file). Layout and guarantees: docs/INDEX.md.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from model.ground.checkpoint import MODEL_FILES, checkpoint_sha256
from model.ground.errors import UserError
from model.ground.files import fsync_dir, fsync_tree, sha256_file, write_text_atomic
from model.rerank import RerankConfig, rerank, second_query, split_rows, unit_parts

LOG = logging.getLogger(__name__)

FORMAT = "sbir-index-snapshot/1"
# A snapshot whose index is split into shards (index-shard-NNN.faiss): an older reader refuses it
# by its format rather than by a missing index.faiss.
FORMAT_SHARDED = "sbir-index-snapshot/2"
CURRENT = "CURRENT"
SNAPSHOTS = "snapshots"
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.npy"
IDS_FILE = "ids.npy"
PHOTOS_DB = "photos.sqlite"
REPORT_FILE = "build_report.json"
MODEL_DIR = "model"
REQUIRED_FILES = (INDEX_FILE, VECTORS_FILE, IDS_FILE, PHOTOS_DB, *(f"{MODEL_DIR}/{f}" for f in MODEL_FILES))
_ID_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$")
SQL_CHUNK = 500


class SnapshotError(UserError):
    """A missing or broken snapshot: no CURRENT, a missing file, a checksum or consistency mismatch."""


def shard_file(shard: int) -> str:
    return f"index-shard-{shard:03d}.faiss"


def index_files(manifest: dict) -> list[str]:
    """The FAISS files of a snapshot: index.faiss, or one file per shard (shard s holds id % N == s)."""
    shards = manifest["index"].get("shards")
    if not shards or shards["count"] == 1:
        return [INDEX_FILE]
    return [shard_file(s) for s in range(int(shards["count"]))]


def required_files(manifest: dict) -> list[str]:
    return [*index_files(manifest), *(f for f in REQUIRED_FILES if f != INDEX_FILE)]


def snapshots_dir(root: Path) -> Path:
    return Path(root) / SNAPSHOTS


def _check_id(snapshot_id: str, where: str) -> str:
    if not _ID_RE.match(snapshot_id):
        raise SnapshotError(f"{where}: {snapshot_id!r} is not a snapshot id")
    return snapshot_id


def read_current(root: Path) -> str | None:
    """The snapshot id ROOT/CURRENT points to, or None when nothing was published yet."""
    path = Path(root) / CURRENT
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"cannot read {path}: {exc}") from None
    return _check_id(text, str(path))


def list_snapshots(root: Path) -> list[str]:
    """Published snapshot ids under ROOT, oldest first (ids sort by creation time)."""
    d = snapshots_dir(root)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and _ID_RE.match(p.name))


def new_snapshot_id() -> str:
    now = datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond:06d}Z-{uuid.uuid4().hex[:6]}"


def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SnapshotError(f"{path} has no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{mpath} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, FORMAT_SHARDED):
        raise SnapshotError(
            f"{mpath}: unsupported snapshot format {manifest.get('format') if isinstance(manifest, dict) else None!r}"
        )
    for key in ("id", "dim", "count", "model", "index", "files"):
        if key not in manifest:
            raise SnapshotError(f"{mpath} lacks {key!r}")
    shape_ok = (
        isinstance(manifest["id"], str)
        and isinstance(manifest["dim"], int)
        and manifest["dim"] > 0
        and isinstance(manifest["count"], int)
        and manifest["count"] >= 0
        and isinstance(manifest["model"], dict)
        and isinstance(manifest["model"].get("sha256"), str)
        and isinstance(manifest["index"], dict)
        and isinstance(manifest["index"].get("factory"), str)
        and isinstance(manifest["index"].get("search_params", {}), dict)
        and isinstance(manifest["files"], dict)
        and _shards_ok(manifest)
    )
    if not shape_ok:
        raise SnapshotError(f"{mpath}: fields of the wrong type")
    return manifest


def _shards_ok(manifest: dict) -> bool:
    """Format 1: no shards (written before shards existed) or one; format 2: two or more."""
    shards = manifest["index"].get("shards")
    if manifest["format"] == FORMAT and shards is None:
        return True
    if not (isinstance(shards, dict) and isinstance(shards.get("count"), int)):
        return False
    sizes = shards.get("sizes")
    return (
        (shards["count"] == 1 if manifest["format"] == FORMAT else shards["count"] >= 2)
        and isinstance(sizes, list)
        and len(sizes) == shards["count"]
        and all(isinstance(n, int) for n in sizes)
        and sum(sizes) == manifest["count"]
    )


def verify_checksums(path: Path, manifest: dict) -> list[str]:
    """Problems found comparing every file under `path` with the manifest's checksums ([] = all good)."""
    problems = []
    files = manifest["files"]
    for rel in required_files(manifest):
        if rel not in files:
            problems.append(f"manifest does not list {rel}")
    for rel, want in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
            continue
        if f.stat().st_size != want["bytes"]:
            problems.append(f"{rel} has {f.stat().st_size} bytes, manifest says {want['bytes']}")
            continue
        if sha256_file(f) != want["sha256"]:
            problems.append(f"{rel} checksum mismatch")
    listed = set(files) | {MANIFEST}
    for f in path.rglob("*"):
        if f.is_file() and f.relative_to(path).as_posix() not in listed:
            problems.append(f"unexpected file {f.relative_to(path).as_posix()}")
    return problems


class Snapshot:
    """A published snapshot opened for search: the FAISS index, the photo store and the pinned model.

    `search` and `lookup` are safe to call from several threads (FAISS CPU search is read-only; the
    SQLite connection is shared under a lock).
    """

    def __init__(self, path: Path, manifest: dict, index, db: sqlite3.Connection):
        self.path = path
        self.manifest = manifest
        self.id: str = manifest["id"]
        self.dim: int = int(manifest["dim"])  # width of a vectors.npy row (and of a query)
        # the columns the index holds; the rest re-rank the index's candidates (model/rerank.py)
        self.search_dim: int = int(manifest.get("search_dim") or self.dim)
        self.rerank: RerankConfig | None = RerankConfig.from_dict(manifest.get("rerank"))
        if self.rerank is not None and self.search_dim + self.rerank.width != self.dim:
            raise SnapshotError(f"{path}: {self.dim}-d rows are not {self.search_dim}-d searched "
                                f"+ {self.rerank.width}-d re-ranking")
        self._ids: np.ndarray | None = None  # ids.npy and vectors.npy (memory-mapped), for re-ranking
        self._vectors: np.ndarray | None = None
        self.count: int = int(manifest["count"])
        self.model_sha256: str = manifest["model"]["sha256"]
        # the backbone precision its vectors were made in; snapshots before int8 existed are fp32
        self.precision: str = manifest["model"].get("precision", "fp32")
        # int8: the calibration its backbone was quantized from ({"file", "sha256"}); None in fp32 and for
        # int8 snapshots built before it was recorded
        self.int8_calibration: dict | None = (
            manifest["model"].get("int8_calibration") if self.precision == "int8" else None
        )
        cal = self.int8_calibration
        if cal is not None and not (isinstance(cal, dict) and isinstance(cal.get("file"), str)
                                    and isinstance(cal.get("sha256"), str)):
            raise SnapshotError(f"{path}: model.int8_calibration is not a {{file, sha256}} record: {cal!r}")
        self.model_dir: Path = path / MODEL_DIR
        self.factory: str = manifest["index"]["factory"]
        self.shards: int = int((manifest["index"].get("shards") or {}).get("count", 1))
        self._index = index
        self._db = db
        self._db_lock = threading.Lock()

    # --- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: Path, snapshot_id: str | None = None, verify: bool = False) -> Snapshot:
        """Open ROOT's CURRENT snapshot (or `snapshot_id`). Raises SnapshotError on anything broken.

        Always checked: manifest, presence of every file, the model's sha256 against the manifest, the
        index's dimension and size, the photo store's row count. With `verify`: also every file's
        checksum and the ids of index, vectors and photo store against each other.
        """
        root = Path(root)
        if snapshot_id is None:
            snapshot_id = read_current(root)
            if snapshot_id is None:
                raise SnapshotError(f"{root} has no published snapshot (no {CURRENT} file)")
        _check_id(snapshot_id, str(root))
        try:
            return cls._open(root, snapshot_id, verify)
        except SnapshotError:
            raise
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            RuntimeError,
            AssertionError,
            sqlite3.Error,
        ) as exc:  # a manifest or file of an unexpected shape: still "broken"
            raise SnapshotError(f"snapshot {snapshot_id} is broken: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def _open(cls, root: Path, snapshot_id: str, verify: bool) -> Snapshot:
        path = snapshots_dir(root) / snapshot_id
        if not path.is_dir():
            raise SnapshotError(f"snapshot {snapshot_id} does not exist under {root}")
        manifest = _read_manifest(path)
        if manifest["id"] != snapshot_id:
            raise SnapshotError(f"{path}: manifest belongs to snapshot {manifest['id']!r}")
        if verify:
            problems = verify_checksums(path, manifest)
            if problems:
                raise SnapshotError(f"snapshot {snapshot_id} is corrupt: " + "; ".join(problems))
        for rel in required_files(manifest):
            if not (path / rel).is_file():
                raise SnapshotError(f"snapshot {snapshot_id} lacks {rel}")
        _check_model(path, manifest)
        index = _read_index(path, manifest, on_gpus=not verify)  # verify reads the ids: CPU
        db = _open_db(path / PHOTOS_DB, manifest)
        try:
            snap = cls(path, manifest, index, db)
        except BaseException:
            db.close()
            raise
        if verify or snap.rerank is not None:
            try:
                if snap.rerank is not None:
                    snap._open_vectors()
                if verify:
                    snap._check_consistency()
            except BaseException:
                snap.close()
                raise
        LOG.info(
            "opened snapshot %s: %d photos, %s, model %s",
            snap.id,
            snap.count,
            snap.factory,
            snap.model_sha256[:12],
        )
        return snap

    def _open_vectors(self) -> None:
        """ids.npy in memory and vectors.npy memory-mapped: the second stage reads candidates' rows."""
        ids = _load_npy(self.path / IDS_FILE)
        vectors = _load_npy(self.path / VECTORS_FILE, mmap=True)
        if ids.shape != (self.count,) or vectors.dtype != np.float32 or vectors.shape != (self.count, self.dim):
            raise SnapshotError(f"{IDS_FILE} / {VECTORS_FILE}: shapes {ids.shape} / {vectors.shape}, "
                                f"expected ({self.count},) / ({self.count}, {self.dim})")
        if not vectors.flags.c_contiguous:  # the second stage reads rows in place (`second_stage`)
            raise SnapshotError(f"{VECTORS_FILE} is stored in Fortran order; the index builder writes rows (C order)")
        self._ids, self._vectors = ids, vectors

    def _check_consistency(self) -> None:
        from index_builder import faiss_index

        ids = _load_npy(self.path / IDS_FILE)
        vectors = _load_npy(self.path / VECTORS_FILE, mmap=True)
        if ids.dtype != np.int64 or ids.shape != (self.count,):
            raise SnapshotError(f"{IDS_FILE}: {ids.dtype} {ids.shape}, expected int64 ({self.count},)")
        if vectors.dtype != np.float32 or vectors.shape != (self.count, self.dim):
            raise SnapshotError(
                f"{VECTORS_FILE}: {vectors.dtype} {vectors.shape}, expected ({self.count}, {self.dim})"
            )
        if self.count and (np.diff(ids) <= 0).any():
            raise SnapshotError(f"{IDS_FILE} is not strictly increasing")
        in_index = np.sort(faiss_index.index_ids(self._index))
        if not np.array_equal(in_index, ids):
            raise SnapshotError("the FAISS index and ids.npy hold different ids")
        if self.shards > 1:
            for s, part in enumerate(faiss_index.shard_parts(self._index)):
                if (faiss_index.index_ids(part) % self.shards != s).any():
                    raise SnapshotError(f"{shard_file(s)} holds ids of another shard")
        with self._db_lock:
            db_ids = np.array([r[0] for r in self._db.execute("SELECT id FROM photos ORDER BY id")], np.int64)
        if not np.array_equal(db_ids, ids):
            raise SnapshotError("the photo store and ids.npy hold different ids")
        parts = unit_parts(np.asarray(vectors), self.search_dim, self.rerank)
        for part in parts:
            norms = np.linalg.norm(part, axis=1) if self.count else np.ones(0)
            if not np.isfinite(norms).all() or (np.abs(norms - 1) > 1e-3).any():
                raise SnapshotError(f"{VECTORS_FILE} holds rows that are not unit vectors")
        # the index must find stored vectors about as well as it did at build time
        if self.count > 1:
            recorded_check = self.manifest["index"].get("recall", {})
            recorded = float(recorded_check.get("recall", 0.0))
            check = faiss_index.tune_and_measure(
                self._index, np.ascontiguousarray(parts[0]), ids, sample=100, seed=1, tune=False,
                k=int(recorded_check.get("k", faiss_index.RECALL_K)),
            )  # fmt: skip
            if check.recall < recorded - 0.1:
                raise SnapshotError(
                    f"index recall@{check.k} {check.recall:.3f} is far below the recorded {recorded:.3f}"
                )

    # --- queries -------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) float32 model rows -> scores (n, k) float32, ids (n, k) int64.

        Scores are cosines of the searched part, or where the snapshot re-ranks (`rerank`), the
        second stage's weighted mean of cosines over the index's top `rerank.top` candidates
        (model/rerank.py). Where fewer than k photos exist, ids are -1 and scores -inf.
        """

        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}), got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self._index is None:
            raise SnapshotError(f"snapshot {self.id} is closed")
        if self.rerank is None or not self.count:
            return self.first_stage(queries[:, : self.search_dim], k)
        first_q, second_q = split_rows(queries, self.search_dim)
        first, cand = self.first_stage(first_q, max(k, self.rerank.top))
        second = self.second_stage(second_q, cand)
        return rerank(cand, first, second, self.rerank.share, k)  # top >= k: (n, k) each

    def first_stage(self, searched: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's search of (n, search_dim) query parts: cosines (n, k) and ids (n, k), -1 past
        the end."""
        from index_builder import faiss_index

        if self._index is None:
            raise SnapshotError(f"snapshot {self.id} is closed")
        return faiss_index.search(self._index, np.ascontiguousarray(searched, dtype=np.float32), k)

    def second_stage(self, second_q: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """(n, R) second-stage cosines (model.rerank.second_query) of the queries' `[v | r]` parts
        with those of their candidates' rows in vectors.npy; 0 where a candidate is missing (-1).

        FAISS's `fvec_inner_products_by_idx` reads each candidate's row in place from the memory map:
        no gathered copy of the 400 rows (3.3 MB a query with 2088-d rows) is made. The query is
        padded with zeros over zs so that whole rows are its operand (docs/BENCHMARKS.md, "The service
        with the int8 forward").
        """
        import faiss

        n, r = cand.shape
        query = np.zeros((n, self.dim), np.float32)
        query[:, self.search_dim :] = second_query(second_q, self.rerank)
        # candidates' rows in vectors.npy (ids.npy is sorted); -1 stays -1: FAISS gives it -inf
        rows = np.where(cand >= 0, np.searchsorted(self._ids, np.maximum(cand, 0)), -1).astype(np.int64)
        out = np.empty((n, r), np.float32)
        if n and r:
            faiss.fvec_inner_products_by_idx(
                faiss.swig_ptr(out), faiss.swig_ptr(query), faiss.swig_ptr(self._vectors), faiss.swig_ptr(rows),
                self.dim, n, r,
            )  # fmt: skip
        out[rows < 0] = 0.0
        return out

    def lookup(self, ids: Sequence[int]) -> list[dict | None]:
        """Photo records for ids, in order: {"id", "key", "path", "sha256", "metadata"}; None for unknown
        ids. `key` is the photo's identity in its collection: its path relative to the collection root
        (or the manifest's id, where the manifest gives ids)."""
        wanted = [int(i) for i in ids]
        found: dict[int, dict] = {}
        unique = sorted({i for i in wanted if 0 <= i < 2**63})  # SQLite integers are signed 64-bit
        with self._db_lock:
            if self._db is None:
                raise SnapshotError(f"snapshot {self.id} is closed")
            for start in range(0, len(unique), SQL_CHUNK):
                part = unique[start : start + SQL_CHUNK]
                rows = self._db.execute(
                    f"SELECT id, key, path, sha256, metadata FROM photos WHERE id IN ({','.join('?' * len(part))})",
                    part,
                ).fetchall()
                for pid, key, path, sha, meta in rows:
                    found[pid] = {"id": pid, "key": key, "path": path, "sha256": sha, "metadata": json.loads(meta)}
        return [dict(found[i]) if i in found else None for i in wanted]

    def photo_path(self, id: int) -> Path | None:
        rec = self.lookup([id])[0]
        return Path(rec["path"]) if rec else None

    def close(self) -> None:
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        self._index = None
        self._vectors = None

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Snapshot({self.id!r}, count={self.count}, factory={self.factory!r}, shards={self.shards})"


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{path} is unreadable: {exc}") from None


def _check_model(path: Path, manifest: dict) -> None:
    try:
        actual = checkpoint_sha256(path / MODEL_DIR)
    except OSError as exc:
        raise SnapshotError(f"snapshot {manifest['id']}: model unreadable: {exc}") from None
    if actual != manifest["model"]["sha256"]:
        raise SnapshotError(
            f"snapshot {manifest['id']}: its model has sha256 {actual[:12]}..., "
            f"the index was built with {manifest['model']['sha256'][:12]}..."
        )


def _read_index(path: Path, manifest: dict, on_gpus: bool = True):
    """The snapshot's index with its search parameters applied; several shards are searched together
    (spread over the GPUs if `on_gpus` and faiss sees any)."""
    import faiss

    from index_builder import faiss_index

    files = index_files(manifest)
    sizes = (manifest["index"].get("shards") or {}).get("sizes") or [int(manifest["count"])]
    parts = []
    for rel, size in zip(files, sizes, strict=True):
        try:
            index = faiss.read_index(str(path / rel))
        except RuntimeError as exc:
            raise SnapshotError(f"{path / rel} is unreadable: {str(exc).splitlines()[-1]}") from None
        searched = int(manifest.get("search_dim") or manifest["dim"])
        if index.d != searched or index.ntotal != size:
            raise SnapshotError(
                f"{path / rel}: {index.ntotal} vectors of {index.d}-d, manifest says {size} of {searched}-d"
            )
        params = manifest["index"].get("search_params") or {}
        try:
            faiss_index.set_search_params(index, params)
        except RuntimeError as exc:
            raise SnapshotError(f"{path}: cannot apply search parameters {params}: {exc}") from None
        parts.append(index)
    return (
        parts[0] if len(parts) == 1 else faiss_index.combine_shards(parts, use_gpu=None if on_gpus else False)
    )


def _open_db(path: Path, manifest: dict) -> sqlite3.Connection:
    try:
        # immutable: a published snapshot never changes, so SQLite may skip locking entirely
        db = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, check_same_thread=False
        )
        (n,) = db.execute("SELECT COUNT(*) FROM photos").fetchone()
    except sqlite3.Error as exc:
        raise SnapshotError(f"{path} is not a readable photo store: {exc}") from None
    if n != int(manifest["count"]):
        db.close()
        raise SnapshotError(f"{path}: {n} photos, manifest says {manifest['count']}")
    return db


# --- writing -----------------------------------------------------------------------------------


def write_photo_store(path: Path, rows: Iterable[tuple[int, str, str, str, str]]) -> None:
    """rows: (id, key, absolute path, sha256 of the file, metadata as JSON)."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")  # the whole file is fsynced before it is published
        db.execute(
            "CREATE TABLE photos (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, path TEXT NOT NULL, "
            "sha256 TEXT NOT NULL, metadata TEXT NOT NULL)"
        )
        db.executemany("INSERT INTO photos VALUES (?, ?, ?, ?, ?)", rows)
        db.commit()
    finally:
        db.close()


def read_photo_store(path: Path) -> dict[int, tuple[str, str, str, str]]:
    """id -> (key, path, sha256, metadata JSON) for a whole snapshot (used by updates)."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        return {r[0]: r[1:] for r in db.execute("SELECT id, key, path, sha256, metadata FROM photos")}
    except sqlite3.Error as exc:
        raise SnapshotError(f"{path} is not a readable photo store: {exc}") from None
    finally:
        db.close()


class SnapshotWriter:
    """Writes a snapshot aside (ROOT/snapshots/.tmp-<id>), fsyncs it, renames it into place, switches
    CURRENT by rename, then prunes old snapshots. A crash at any point leaves CURRENT valid."""

    def __init__(self, root: Path):
        self.root = Path(root)
        snapshots_dir(self.root).mkdir(parents=True, exist_ok=True)

    def clean_leftovers(self) -> None:
        """Remove half-written and half-deleted snapshots of killed jobs (call with the root locked)."""
        for p in snapshots_dir(self.root).iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                LOG.info("removing leftover %s", p.name)
                shutil.rmtree(p, ignore_errors=True)
        for stale in self.root.glob(f"{CURRENT}.*.tmp"):  # write_text_atomic's temporary name
            stale.unlink(missing_ok=True)

    def write(
        self,
        *,
        index,
        ids: np.ndarray,
        vectors: np.ndarray,
        photo_rows: list[tuple[int, str, str, str, str]],
        model_dir: Path,
        manifest: dict,
        report: dict,
    ) -> str:
        """Write everything for a new snapshot and return its id (not yet published)."""
        import faiss

        from index_builder import faiss_index

        assert len(ids) == len(vectors) == len(photo_rows) == index.ntotal, (
            "ids, vectors, rows and index differ"
        )
        snap_id = new_snapshot_id()
        while (snapshots_dir(self.root) / snap_id).exists():
            snap_id = new_snapshot_id()
        tmp = snapshots_dir(self.root) / f".tmp-{snap_id}"
        tmp.mkdir()
        parts = faiss_index.shard_parts(index)
        names = [INDEX_FILE] if len(parts) == 1 else [shard_file(s) for s in range(len(parts))]
        for part, name in zip(parts, names, strict=True):
            faiss.write_index(part, str(tmp / name))
        np.save(tmp / VECTORS_FILE, np.ascontiguousarray(vectors, np.float32))
        np.save(tmp / IDS_FILE, np.ascontiguousarray(ids, np.int64))
        write_photo_store(tmp / PHOTOS_DB, photo_rows)
        (tmp / MODEL_DIR).mkdir()
        for name in MODEL_FILES:
            shutil.copyfile(model_dir / name, tmp / MODEL_DIR / name)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                files[f.relative_to(tmp).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        index_bytes = sum(files[name]["bytes"] for name in names)
        created = datetime.now(UTC).isoformat(timespec="seconds")
        fmt = FORMAT if len(parts) == 1 else FORMAT_SHARDED
        manifest = {"created": created, **manifest, "format": fmt, "id": snap_id, "files": files}
        manifest["index"] = {
            **manifest["index"],
            "bytes": index_bytes,
            "bytes_per_vector": round(index_bytes / max(1, len(ids)), 2),
        }
        manifest["index"]["shards"] = {
            **manifest["index"].get("shards", {}),
            "count": len(parts),
            "sizes": [int(part.ntotal) for part in parts],
            "assignment": "id % count",
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _check_model(tmp, manifest)  # the copy is the model the vectors came from
        fsync_tree(tmp)
        os.rename(tmp, snapshots_dir(self.root) / snap_id)
        fsync_dir(snapshots_dir(self.root))
        return snap_id

    def publish(self, snap_id: str) -> None:
        """Point CURRENT at `snap_id`: one rename, so readers see the old or the new, never neither."""
        assert (snapshots_dir(self.root) / snap_id / MANIFEST).is_file(), f"{snap_id} is not written"
        write_text_atomic(self.root / CURRENT, snap_id + "\n")
        LOG.info("published snapshot %s", snap_id)

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` snapshots, never the current one. Returns the deleted ids."""
        assert keep >= 1, "keep at least one snapshot"
        current = read_current(self.root)
        ids = list_snapshots(self.root)
        keep_ids = set(ids[-keep:]) | ({current} if current else set())
        removed = []
        for sid in ids:
            if sid in keep_ids:
                continue
            src = snapshots_dir(self.root) / sid
            trash = snapshots_dir(self.root) / f".trash-{sid}"
            os.rename(src, trash)  # atomic: a crash mid-delete leaves no half snapshot under its id
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(sid)
        if removed:
            fsync_dir(snapshots_dir(self.root))
            LOG.info("pruned %d old snapshot(s): %s", len(removed), ", ".join(removed))
        return removed
