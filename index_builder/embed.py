"""The embedding job: photo files -> content hashes -> unit vectors, checkpointed so a killed job resumes.

Embeddings are cached by content hash (sha256 of the file's bytes) in chunk files written atomically
under ROOT/.work/<model>/: a rerun after a crash, or an update, embeds only content it has not seen.
Decoding and preprocessing run in DataLoader worker processes, overlapped with the encoder.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import stat
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index_builder.collection import PhotoRecord, Skipped
from model.ground.files import sha256_file, usable_cores, write_atomic

LOG = logging.getLogger(__name__)

# Files above this are refused before reading: no photo needs it, and decoding stops at 40 MP anyway.
MAX_FILE_BYTES = 256 << 20
CHUNK_GLOB = "chunk-*.npz"
# Failures that belong to the bytes themselves are cached by hash; missing or unreadable files are not.
CONTENT_FAILURES = frozenset({"empty", "not-an-image", "corrupt", "too-large"})


# --- content hashes ----------------------------------------------------------------------------


def _hash_file(path: Path, root: Path) -> tuple[str | None, Skipped | None]:
    key = str(path)
    try:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):  # listing refused links leaving the root; one may have appeared since
            real = path.resolve()
            if not (real == root or real.is_relative_to(root)):
                return None, Skipped(key, key, "outside-root", f"resolves to {real}")
            st = real.stat()
        if st.st_size == 0:
            return None, Skipped(key, key, "empty", "zero bytes")
        if st.st_size > MAX_FILE_BYTES:
            return None, Skipped(key, key, "too-large", f"{st.st_size} bytes exceeds {MAX_FILE_BYTES}")
        return sha256_file(path), None
    except FileNotFoundError:
        return None, Skipped(key, key, "missing", "file not found")
    except OSError as exc:
        return None, Skipped(key, key, "unreadable", exc.strerror or str(exc))


def hash_photos(
    records: Sequence[PhotoRecord], root: Path, threads: int = 2, progress: bool = True
) -> tuple[dict[int, str], list[Skipped]]:
    """sha256 of every photo's bytes, and the unreadable ones.

    Threads take runs of 256 files: per-file tasks cost more in scheduling than hashing a small photo
    (hashlib releases the GIL only for the hashing itself). More threads help on slow storage.
    """
    from tqdm import tqdm

    runs = [records[i : i + 256] for i in range(0, len(records), 256)]
    hashes: dict[int, str] = {}
    skipped: list[Skipped] = []
    bar = tqdm(total=len(records), desc="hashing", unit="photo", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for run, results in zip(
            runs, pool.map(lambda run: [_hash_file(r.path, root) for r in run], runs), strict=True
        ):
            for record, (digest, skip) in zip(run, results, strict=True):
                if digest is not None:
                    hashes[record.id] = digest
                else:
                    skipped.append(Skipped(record.key, str(record.path), skip.reason, skip.detail))
            bar.update(len(run))
    bar.close()
    return hashes, skipped


# --- decoding in worker processes --------------------------------------------------------------


@dataclass(frozen=True)
class DecodeItem:
    sha256: str  # what the hash pass saw; the worker reports what it actually read
    path: str


class PhotoDecodeDataset:
    """Item i -> (i, sha256 of the bytes read, uint8 pixels or None, failure reason, detail)."""

    def __init__(self, items: Sequence[DecodeItem], root: Path, preprocess: Callable):
        self.items = list(items)
        self.root = root
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from model.images import ImageError, load_image

        item = self.items[i]
        path = Path(item.path)
        try:
            real = path.resolve()
            if not (real == self.root or real.is_relative_to(self.root)):
                return i, item.sha256, None, "outside-root", f"resolves to {real}"
            if path.stat().st_size > MAX_FILE_BYTES:
                return i, item.sha256, None, "too-large", f"over {MAX_FILE_BYTES} bytes"
            data = path.read_bytes()
        except FileNotFoundError:
            return i, item.sha256, None, "missing", "file not found"
        except OSError as exc:
            return i, item.sha256, None, "unreadable", exc.strerror or str(exc)
        digest = hashlib.sha256(data).hexdigest()
        try:
            pixels = self.preprocess(load_image(data))
        except ImageError as exc:
            return i, digest, None, exc.reason, exc.detail[:300]
        return i, digest, pixels, "", ""


def collate_decoded(batch):
    """Stack the decoded photos of a batch; keep failures aside (a batch may hold none decoded)."""
    import torch

    ok = [b for b in batch if b[2] is not None]
    pixels = torch.stack([b[2] for b in ok]) if ok else None
    return {
        "index": [b[0] for b in ok],
        "sha256": [b[1] for b in ok],
        "pixels": pixels,
        "failed": [(b[0], b[1], b[3], b[4]) for b in batch if b[2] is None],
    }


# --- the checkpoint: chunks of (sha256 -> vector) ----------------------------------------------


class EmbeddingCache:
    """Vectors and decode failures by content hash, persisted as atomically written chunk files.

    A chunk is complete or absent: it is written to a temporary name, fsynced and renamed. A SIGKILL
    loses at most the chunk being filled.
    """

    def __init__(self, job_dir: Path, dim: int):
        self.job_dir = job_dir
        self.dim = dim
        self.job_dir.mkdir(parents=True, exist_ok=True)
        self._vec_parts: list[np.ndarray] = []
        self.row: dict[str, int] = {}
        self.failures: dict[str, tuple[str, str]] = {}
        self.loaded_from_disk = 0
        self._load()

    def _load(self) -> None:
        for stale in self.job_dir.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        for path in sorted(self.job_dir.glob(CHUNK_GLOB)):
            try:
                with np.load(path, allow_pickle=False) as z:
                    shas, vecs = z["sha256"], z["vectors"]
                    fshas, freasons, fdetails = z["failed_sha256"], z["failed_reason"], z["failed_detail"]
                if vecs.ndim != 2 or vecs.shape[1] != self.dim or len(vecs) != len(shas):
                    raise ValueError(f"shape {vecs.shape} for {len(shas)} hashes, expected dim {self.dim}")
            except (OSError, ValueError, KeyError) as exc:
                LOG.warning("ignoring unreadable checkpoint %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            self._add(
                list(map(str, shas)), vecs.astype(np.float32), zip(fshas, freasons, fdetails, strict=True)
            )
            self.loaded_from_disk += len(shas) + len(fshas)
        if self.loaded_from_disk:
            LOG.info("resuming: %d photos already embedded in %s", self.loaded_from_disk, self.job_dir)

    def _add(self, shas: list[str], vectors: np.ndarray, failed) -> None:
        base = sum(len(p) for p in self._vec_parts)
        if len(shas):
            self._vec_parts.append(vectors)
            for j, s in enumerate(shas):
                self.row[s] = base + j
        for s, reason, detail in failed:
            self.failures[str(s)] = (str(reason), str(detail))

    def write_chunk(self, shas: list[str], vectors: np.ndarray, failed: list[tuple[str, str, str]]) -> None:
        if not shas and not failed:
            return
        vectors = np.asarray(vectors, np.float32).reshape(len(shas), self.dim)
        name = f"chunk-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz"

        def fill(f):
            np.savez(
                f,
                sha256=np.array(shas, dtype="U64"),
                vectors=vectors,
                failed_sha256=np.array([x[0] for x in failed], dtype="U64"),
                failed_reason=np.array([x[1] for x in failed], dtype="U32"),
                failed_detail=np.array([x[2][:300] for x in failed], dtype="U300"),
            )

        write_atomic(self.job_dir / name, fill, sync_dir=True)
        self._add(shas, vectors, failed)

    def vectors(self) -> np.ndarray:
        if not self._vec_parts:
            return np.zeros((0, self.dim), np.float32)
        if len(self._vec_parts) > 1:
            self._vec_parts = [np.concatenate(self._vec_parts)]
        return self._vec_parts[0]

    def __contains__(self, sha: str) -> bool:
        return sha in self.row or sha in self.failures


# --- the encoder loop --------------------------------------------------------------------------


@dataclass
class EmbedStats:
    embedded: int = 0
    failed: int = 0
    seconds: float = 0.0
    forward_seconds: float = 0.0  # inside model.encode_pixels: the encoder's own share of `seconds`
    changed_while_running: dict[str, str] = field(default_factory=dict)  # path -> hash of the bytes read
    transient: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> (reason, detail)

    def merge(self, other: EmbedStats) -> None:
        self.embedded += other.embedded
        self.failed += other.failed
        self.seconds += other.seconds
        self.forward_seconds += other.forward_seconds
        self.changed_while_running.update(other.changed_while_running)
        self.transient.update(other.transient)

    @property
    def photos_per_second(self) -> float:
        return (self.embedded + self.failed) / self.seconds if self.seconds else 0.0

    @property
    def forward_photos_per_second(self) -> float:
        """The encoder's rate on the same batches in the same run, as if decoding cost nothing."""
        return self.embedded / self.forward_seconds if self.forward_seconds else 0.0


class BatchRecorder:
    """What happens to a batch's results, wherever it was encoded (here, or on a Ray actor): vectors
    and content failures go to the checkpoint a chunk at a time, files that changed since hashing and
    transient failures (missing, unreadable) go to the stats."""

    def __init__(self, cache: EmbeddingCache, chunk_size: int, stats: EmbedStats):
        assert chunk_size >= 1, "chunk_size must be positive"
        self.cache, self.chunk_size, self.stats = cache, chunk_size, stats
        self._sha: list[str] = []
        self._vec: list[np.ndarray] = []
        self._fail: list[tuple[str, str, str]] = []

    def add(
        self,
        items: Sequence[DecodeItem],
        encoded: Sequence[tuple[int, str]],
        vectors: np.ndarray | None,
        failed: Sequence[tuple[int, str, str, str]],
    ) -> None:
        """`encoded`: (position in items, sha256 of the bytes read) per row of `vectors`;
        `failed`: (position, sha256 read, reason, detail)."""
        for i, digest in encoded:
            if digest != items[i].sha256:  # the file changed after it was hashed
                self.stats.changed_while_running[items[i].path] = digest
        if encoded:
            assert vectors is not None and vectors.shape == (len(encoded), self.cache.dim), (
                f"encoder returned {None if vectors is None else vectors.shape} for {len(encoded)} photos"
            )
            self._vec.append(vectors)
            self._sha.extend(digest for _, digest in encoded)
            self.stats.embedded += len(vectors)
        for i, digest, reason, detail in failed:
            self.stats.failed += 1
            if reason not in CONTENT_FAILURES:
                self.stats.transient[items[i].path] = (reason, detail)
                continue
            if digest != items[i].sha256:
                self.stats.changed_while_running[items[i].path] = digest
            self._fail.append((digest, reason, detail))
        if len(self._sha) + len(self._fail) >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered as one checkpoint chunk (nothing if the buffer is empty)."""
        vecs = np.concatenate(self._vec) if self._vec else np.zeros((0, self.cache.dim), np.float32)
        self.cache.write_chunk(list(self._sha), vecs, list(self._fail))
        self._sha.clear(), self._vec.clear(), self._fail.clear()


def embed_into_cache(
    model,
    items: Sequence[DecodeItem],
    root: Path,
    cache: EmbeddingCache,
    *,
    batch_size: int = 32,
    workers: int = 1,
    chunk_size: int = 512,
    progress: bool = True,
) -> EmbedStats:
    """Embed every item (photo) into `cache`, a chunk at a time; items already cached are skipped."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    todo = [it for it in items if it.sha256 not in cache]
    stats = EmbedStats()
    if not todo:
        return stats
    assert batch_size >= 1, "batch_size must be positive"
    on_gpu = model.device.type == "cuda"
    dataset = PhotoDecodeDataset(todo, root, model.preprocess)
    loader_args: dict = {}
    if workers > 0:
        # fork: workers inherit the model's preprocess without pickling the model
        ctx = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        loader_args = {"prefetch_factor": 4, "multiprocessing_context": ctx, "persistent_workers": False}
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_decoded,
        pin_memory=on_gpu,
        **loader_args,
    )
    recorder = BatchRecorder(cache, chunk_size, stats)
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="embedding", unit="photo", disable=not progress, smoothing=0.05)
    with torch.inference_mode():
        for batch in loader:
            vecs = None
            if batch["pixels"] is not None:
                tf = time.perf_counter()
                vecs = model.encode_pixels(batch["pixels"], "photo")  # returns on the CPU: synchronised
                stats.forward_seconds += time.perf_counter() - tf
            recorder.add(todo, list(zip(batch["index"], batch["sha256"], strict=True)), vecs, batch["failed"])
            bar.update(len(batch["index"]) + len(batch["failed"]))
    recorder.flush()
    bar.close()
    stats.seconds = time.perf_counter() - t0
    LOG.info(
        "embedded %d photos (%d failed to decode) in %.1fs: %.1f photos/s",
        stats.embedded,
        stats.failed,
        stats.seconds,
        stats.photos_per_second,
    )
    return stats


def encode_block(model, items: Sequence[DecodeItem], root: Path, batch_size: int = 32):
    """Decode and encode a block of photos in this process (what a Ray actor does with its block).

    The same decoding (`PhotoDecodeDataset`) and encoder call as `embed_into_cache`, without worker
    processes. Returns (encoded, vectors, failed, forward seconds) in `BatchRecorder.add`'s terms.
    """
    import torch

    assert batch_size >= 1, "batch_size must be positive"
    dataset = PhotoDecodeDataset(items, root, model.preprocess)
    encoded: list[tuple[int, str]] = []
    parts: list[np.ndarray] = []
    failed: list[tuple[int, str, str, str]] = []
    forward = 0.0
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            batch = collate_decoded([dataset[i] for i in range(start, min(start + batch_size, len(items)))])
            failed.extend(batch["failed"])
            if batch["pixels"] is not None:
                tf = time.perf_counter()
                parts.append(np.asarray(model.encode_pixels(batch["pixels"], "photo"), np.float32))
                forward += time.perf_counter() - tf
                encoded.extend(zip(batch["index"], batch["sha256"], strict=True))
    vectors = np.concatenate(parts) if parts else np.zeros((0, model.dim), np.float32)
    return encoded, vectors, failed, forward


def load_photo_encoder(ckpt: Path, device: str = "auto", threads: int | None = None, precision: str = "fp32",
                       calibration: dict | None = None):
    """The checkpoint loaded for embedding photos (the builder's process, or a Ray actor), its CPU
    backbone in `precision` (the job's: index and queries use one) and in int8 quantized from the job's
    `calibration` (model.quantize.calibration_record): RuntimeError if it was another one (a Ray worker
    with another sbir, or the calibration file changed while the job ran)."""
    import torch

    from model.pipeline import SBIRModel

    if threads:
        torch.set_num_threads(threads)
    model = SBIRModel.load(ckpt, device=device, cpu_precision=precision)
    if calibration is not None and model.int8_calibration != calibration:
        got = model.int8_calibration or {}
        raise RuntimeError(
            f"the int8 backbone here was quantized from {got.get('file')} sha256 {str(got.get('sha256'))[:12]}, "
            f"the job's vectors are of {calibration['file']} sha256 {calibration['sha256'][:12]}"
        )
    if model.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest convolutions once
    LOG.info("model %s on %s (%s), %d-d", model.sha256[:12], model.device, model.backbone.runtime(), model.dim)
    return model


def default_decode_workers() -> int:
    """Decode processes: one per four usable cores, at least one (docs/BENCHMARKS.md: one is enough on 2
    cores)."""
    return max(1, usable_cores() // 4)
