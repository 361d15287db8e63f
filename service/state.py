"""What the service is serving: a snapshot and its model as one pair, swapped atomically.

`ServingState.reload` loads a new pair on a worker thread (the model is reused when its sha256 is
unchanged), checks it, warms it up and only then replaces `current`; a pair that fails to load is
refused and recorded in `last_reload_error` while the old one keeps serving. Requests lease the
pair they started on, so a retired pair is closed only after its last request has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError

from model.ground.errors import UserError
from model.pipeline import stack_cpu
from service.metrics import ServiceMetrics
from service.serving_types import ServedModel, ServedSnapshot

LOG = logging.getLogger(__name__)

# What loading a broken snapshot or checkpoint raises: a bad manifest or config (UserError,
# ValueError, KeyError), missing or unreadable files (OSError), a corrupt FAISS index or weights
# (RuntimeError, SafetensorError), a failed precondition (AssertionError). Any of these refuses
# the new snapshot; the old one keeps serving.
LOAD_ERRORS = (UserError, OSError, ValueError, KeyError, RuntimeError, SafetensorError, AssertionError)


class NotReady(RuntimeError):
    """No snapshot is loaded (yet): the caller answers 503."""


@dataclass(frozen=True)
class SearchHit:
    """One query's answer from a batch: its top-k (score, id, record) and the batch's stage times.

    `record` is the snapshot's row for the id (None if the snapshot has none); ids < 0 (fewer photos
    than k) are left out.
    """

    found: list[tuple[float, int, dict | None]]
    encode_s: float
    search_s: float
    metadata_s: float


@dataclass(frozen=True)
class EncodedBatch:
    """A batch's query vectors (n, dim) float32 and the seconds its forward pass took."""

    vectors: np.ndarray
    seconds: float


class ServingPair:
    """A snapshot and the model that built it. Immutable once made; closed after its last lease."""

    def __init__(self, snapshot: ServedSnapshot, model: ServedModel, encode_threads: int | None = None):
        self.snapshot = snapshot
        self.model = model
        self.encode_threads = encode_threads  # torch's threads on the thread that encodes (None: as it is)
        self.loaded_at = time.time()
        self._lock = threading.Lock()
        self._leases = 0
        self._retired = False
        self._closed = False
        self.closed_event = threading.Event()  # set once the snapshot's close() has returned

    @property
    def id(self) -> str:
        return self.snapshot.id

    def acquire(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._leases += 1
            return True

    def release(self) -> None:
        with self._lock:
            assert self._leases > 0, "release without acquire"
            self._leases -= 1
            close = self._retired and self._leases == 0 and not self._closed
            self._closed = self._closed or close
        if close:
            self._close()

    def retire(self) -> None:
        """No new requests will start on this pair; close it when the running ones are done."""
        with self._lock:
            self._retired = True
            close = self._leases == 0 and not self._closed
            self._closed = self._closed or close
        if close:
            self._close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _close(self) -> None:
        # Freeing a large index can take a while; whoever released last may be on the event loop.
        threading.Thread(target=self._close_now, name=f"sbir-close-{self.id}", daemon=True).start()

    def _close_now(self) -> None:
        LOG.info("closing snapshot %s (retired, no request left on it)", self.id)
        try:
            self.snapshot.close()
        finally:
            self.closed_event.set()

    def encode_and_search(self, payloads: Sequence[tuple[torch.Tensor, int]]) -> list[SearchHit]:
        """Blocking: `encode` then `search_encoded`, the batcher's two stages on one thread."""
        return self.search_encoded(payloads, self.encode(payloads))

    def encode(self, payloads: Sequence[tuple[torch.Tensor, int]]) -> EncodedBatch:
        """Blocking (a batcher thread, one batch at a time): one forward pass for all payloads."""
        with self._leased():
            # Per thread, and only when it differs: setting it back and forth on every batch cost the
            # service a fifth of its requests/s (docs/BENCHMARKS.md, "The heads on one torch thread").
            if self.encode_threads is not None and torch.get_num_threads() != self.encode_threads:
                torch.set_num_threads(self.encode_threads)
            t0 = time.perf_counter()
            vectors = self.model.encode_pixels(stack_cpu([p for p, _ in payloads]), "sketch")
            return EncodedBatch(np.ascontiguousarray(vectors, dtype=np.float32), time.perf_counter() - t0)

    def search_encoded(self, payloads: Sequence[tuple[torch.Tensor, int]], encoded: EncodedBatch) -> list[SearchHit]:
        """Blocking (a batcher thread): one index search and one metadata lookup for a batch's vectors.

        One batched search of n queries costs far less than n single ones (an exact 100k scan at k=400:
        1.09 ms alone, 0.38 ms a query in a batch of 10; docs/BENCHMARKS.md); the batch is searched at its
        largest k and each answer cut to its own.
        """
        with self._leased():
            t1 = time.perf_counter()
            k_max = max(k for _, k in payloads)
            scores, ids = self.snapshot.search(encoded.vectors, k_max)
            t2 = time.perf_counter()
            answers = [
                [(s, i) for s, i in zip(scores[row, :k].tolist(), ids[row, :k].tolist(), strict=True) if i >= 0]
                for row, (_, k) in enumerate(payloads)
            ]
            wanted = sorted({i for answer in answers for _, i in answer})
            records = dict(zip(wanted, self.snapshot.lookup(wanted), strict=True)) if wanted else {}
            t3 = time.perf_counter()
        return [
            SearchHit([(s, i, records[i]) for s, i in answer], encoded.seconds, t2 - t1, t3 - t2)
            for answer in answers
        ]

    @contextlib.contextmanager
    def _leased(self) -> Iterator[None]:
        if not self.acquire():
            raise NotReady(f"snapshot {self.id} was closed before its batch ran")
        try:
            yield
        finally:
            self.release()


class ModelCache:
    """Models by checkpoint sha256 and precision, so a snapshot built with the serving model reuses it.

    `cpu_precision` is the service's setting: "auto" encodes queries in the precision each snapshot
    records; "fp32" or "int8" refuses a snapshot built in the other one (`precision_for`).
    """

    def __init__(self, device: str, cpu_runtime: str | None = None, cpu_threads: int | None = None,
                 cpu_precision: str = "auto", max_batch: int = 1, query_twin: str = "model"):
        self.device = device
        self.query_twin = query_twin  # "off": every model encodes a sketch as drawn only
        self.max_batch = max_batch  # a loaded model runs every batch size up to it once (SBIRModel.warm_up)
        self.cpu_runtime = cpu_runtime
        self.cpu_threads = cpu_threads
        self.cpu_precision = cpu_precision
        self._models: dict[tuple[str, str | None], ServedModel] = {}
        self._lock = threading.Lock()

    def precision_for(self, snapshot: ServedSnapshot) -> str:
        """The precision queries of `snapshot` must be encoded in; UserError if the setting forbids it."""
        built = getattr(snapshot, "precision", "fp32")
        if self.cpu_precision not in ("auto", built):
            raise UserError(
                f"snapshot {snapshot.id} was indexed by the {built} backbone and this service is set to encode "
                f"queries in {self.cpu_precision} (SBIR_CPU_PRECISION / --cpu-precision): index and queries "
                f"must use one precision; set it to {built} or auto, or rebuild the index with "
                f"--cpu-precision {self.cpu_precision}"
            )
        return built

    def get(self, model_dir: Path, sha256: str, precision: str | None = None) -> ServedModel:
        """The model of `model_dir`, its backbone in `precision` (None: the setting's, resolved as
        model.backbones.cpu_precision_for does)."""
        key = (sha256, precision)
        with self._lock:
            model = self._models.get(key)
        if model is not None:
            LOG.info("model %s already loaded: reusing it", sha256[:12])
            return model
        from model.pipeline import SBIRModel

        LOG.info("loading model %s from %s on %s", sha256[:12], model_dir, self.device)
        try:
            model = SBIRModel.load(model_dir, device=self.device, cpu_runtime=self.cpu_runtime,
                                   cpu_threads=self.cpu_threads, cpu_precision=precision or self.cpu_precision)
        except RuntimeError as exc:  # an int8 graph that cannot be made here
            raise UserError(str(exc)) from None
        if model.sha256 != sha256:
            raise UserError(
                f"the checkpoint in {model_dir} has sha256 {model.sha256}, the snapshot expects {sha256}"
            )
        if precision is not None and model.precision != precision:
            raise UserError(f"the model in {model_dir} runs in {model.precision}, the snapshot needs {precision}")
        if self.query_twin == "off" and model.query_twin:
            model.single_view()
            LOG.info("model %s: sketches encoded as drawn only (query_twin off)", sha256[:12])
        model.warm_up(self.max_batch)
        with self._lock:
            self._models[key] = model
        return model

    def keep_only(self, sha256: str, precision: str | None = None) -> None:
        """Forget other models (pairs still serving keep their own reference until they close)."""
        with self._lock:
            self._models = {k: v for k, v in self._models.items() if k == (sha256, precision)}


def default_snapshot_module() -> ModuleType:
    return importlib.import_module("index_builder.snapshot")


def load_pair(snapshots: ModuleType, root: Path, snapshot_id: str, models: ModelCache) -> ServingPair:
    """Blocking: open a snapshot, get its model, check they fit, warm both up."""
    snapshot = snapshots.Snapshot.open(root, snapshot_id)
    try:
        model = models.get(Path(snapshot.model_dir), snapshot.model_sha256, models.precision_for(snapshot))
        check_int8_calibration(snapshot, model)
        if model.dim != snapshot.dim:
            raise UserError(
                f"snapshot {snapshot.id} holds {snapshot.dim}-d vectors, its model makes {model.dim}-d"
            )
        # One forward pass and one search now, so the first request after the swap is not slow.
        pixels = model.preprocess_sketch(Image.new("RGB", (64, 64), "white")).unsqueeze(0)
        vector = model.encode_pixels(pixels, "sketch")
        snapshot.search(np.ascontiguousarray(vector, dtype=np.float32), 1)
    except BaseException:
        snapshot.close()
        raise
    return ServingPair(snapshot, model, encode_threads_for(model, models.cpu_threads))


def encode_threads_for(model: ServedModel, cpu_threads: int | None) -> int | None:
    """torch's intra-op threads for a batcher thread that encodes with `model`: one where the backbone
    runs in onnxruntime (torch then runs only the heads, which a second OpenMP thread made slower at the
    service's batch sizes, at twice the CPU), else `cpu_threads` (None: leave the thread's count)."""
    backbone = getattr(model, "backbone", None)
    runtime = backbone.runtime() if hasattr(backbone, "runtime") else ""
    return 1 if runtime.startswith("onnxruntime") else cpu_threads


def check_int8_calibration(snapshot: ServedSnapshot, model: ServedModel) -> None:
    """An int8 snapshot's vectors and the queries come from one calibration (model.quantize): UserError if
    the snapshot records another one than the model's backbone was quantized from. A snapshot built
    before the calibration was recorded is served, with a warning."""
    if getattr(snapshot, "precision", "fp32") != "int8":
        return
    built = getattr(snapshot, "int8_calibration", None)
    if built is None:
        LOG.warning("snapshot %s records no int8 calibration (built before sbir recorded it): its vectors are "
                    "assumed to match queries quantized from %s", snapshot.id, (model.int8_calibration or {}).get("file"))
        return
    here = model.int8_calibration or {}
    if built.get("sha256") != here.get("sha256"):
        by = (getattr(snapshot, "manifest", None) or {}).get("software", {}).get("sbir", "?")
        raise UserError(
            f"snapshot {snapshot.id} was indexed by the int8 backbone quantized from {built.get('file')} sha256 "
            f"{str(built.get('sha256'))[:12]}, this service's from {here.get('file')} sha256 "
            f"{str(here.get('sha256'))[:12]}: int8 vectors of two calibrations are not comparable; rebuild the "
            f"index with this version (`sbir index update ROOT PHOTOS --rebuild`), or serve it with the version "
            f"that built it (sbir {by})"
        )


@dataclass(frozen=True)
class ReloadResult:
    changed: bool
    snapshot: str
    seconds: float


class ReloadError(UserError):
    """A new snapshot was refused; the old one (if any) keeps serving."""


class ServingState:
    """The serving pair, its reloads and the watcher that polls ROOT/CURRENT."""

    def __init__(
        self,
        root: Path,
        device: str,
        metrics: ServiceMetrics,
        reload_interval_s: float = 2.0,
        snapshots: ModuleType | None = None,
        cpu_runtime: str | None = None,
        cpu_threads: int | None = None,
        cpu_precision: str = "auto",
        max_batch: int = 1,
        query_twin: str = "model",
    ):
        self.root = Path(root)
        self.metrics = metrics
        self.reload_interval_s = reload_interval_s
        self.models = ModelCache(device, cpu_runtime, cpu_threads, cpu_precision, max_batch, query_twin)
        self._snapshots = snapshots
        self.current: ServingPair | None = None
        self.last_reload_error: dict | None = None
        self.last_reload: dict | None = None
        self._failed_id: str | None = None
        self.serving_missing_since: float | None = None  # when the serving snapshot's folder vanished
        self._reload_lock = asyncio.Lock()
        self._watcher: asyncio.Task | None = None
        self.polls = 0  # the watcher's finished polls of CURRENT: it is alive while this grows

    @property
    def snapshots(self) -> ModuleType:
        if self._snapshots is None:
            self._snapshots = default_snapshot_module()
        return self._snapshots

    # --- requests -------------------------------------------------------------------------------
    def acquire(self) -> ServingPair:
        """The current pair with a lease held (call `release` on it); NotReady when there is none."""
        for _ in range(100):  # a swap between reading `current` and leasing it: read again
            pair = self.current
            if pair is None:
                raise NotReady(self.not_ready_reason())
            if pair.acquire():
                return pair
        raise NotReady("the snapshot is being swapped; retry")

    def warnings(self) -> list[str]:
        """What an operator should know while a snapshot serves: a refused newer one, a vanished folder."""
        out = []
        if self._failed_id is not None and self.last_reload_error:
            out.append(self.last_reload_error["message"])
        if self.serving_missing_since is not None and self.current is not None:
            out.append(
                f"the serving snapshot's folder {self.current.snapshot.path} is gone from disk; it keeps "
                "serving from memory, but a restart could not load it"
            )
        return out

    def not_ready_reason(self) -> str:
        if self.last_reload_error:
            return f"no snapshot is loaded: {self.last_reload_error['message']}"
        return f"no snapshot is loaded yet from {self.root}"

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.reload(reason="startup")
        except ReloadError:
            LOG.warning("starting without a snapshot; /readyz stays 503 until one loads")
        if self.reload_interval_s > 0:
            self._watcher = asyncio.create_task(self._watch(), name="sbir-snapshot-watcher")
            self._watcher.add_done_callback(self._watcher_ended)

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
        async with self._reload_lock:
            pair, self.current = self.current, None
        if pair is not None:
            pair.retire()

    async def _watch(self) -> None:
        unreadable = ""
        while True:
            await asyncio.sleep(self.reload_interval_s)
            unreadable = await self._poll(unreadable)
            self.polls += 1

    async def _poll(self, unreadable: str) -> str:
        """One look at CURRENT (and at the serving snapshot's folder); returns the problem reading
        CURRENT, if any, so that each distinct one is logged once, not every poll."""
        await self._check_serving_on_disk()
        try:
            target = await asyncio.to_thread(self.snapshots.read_current, self.root)
        except (OSError, UserError) as exc:
            if str(exc) != unreadable:
                LOG.warning("cannot read %s/CURRENT: %s", self.root, exc)
            return str(exc)
        serving = self.current.id if self.current else None
        if target is None or target == serving or target == self._failed_id:
            return ""  # a refused snapshot is not retried every poll; POST /admin/reload retries it
        try:
            await self.reload(reason="CURRENT changed")
        except ReloadError:
            pass  # recorded in last_reload_error and logged
        return ""

    async def _check_serving_on_disk(self) -> None:
        pair = self.current
        if pair is None:
            return
        present = await asyncio.to_thread(pair.snapshot.path.is_dir)
        if self.current is not pair:
            return  # swapped while the disk was looked at: that answer was about the old snapshot
        if not present and self.serving_missing_since is None:
            LOG.error("the serving snapshot's folder %s is gone; still serving it from memory", pair.snapshot.path)
            self.serving_missing_since = time.time()
        elif present:
            self.serving_missing_since = None
        self.metrics.snapshot_on_disk.set(1 if present else 0)

    @staticmethod
    def _watcher_ended(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            LOG.error(
                "the snapshot watcher stopped: new snapshots will not be picked up", exc_info=task.exception()
            )

    async def reload(self, reason: str = "admin") -> ReloadResult:
        """Load what CURRENT names, if it is not already serving, and swap it in."""
        async with self._reload_lock:
            start = time.perf_counter()
            target: str | None = None
            try:
                target = await asyncio.to_thread(self.snapshots.read_current, self.root)
                if target is None:
                    raise UserError(f"{self.root} has no CURRENT snapshot")
                if self.current is not None and self.current.id == target:
                    return ReloadResult(False, target, time.perf_counter() - start)
                LOG.info("loading snapshot %s (%s)", target, reason)
                pair = await asyncio.to_thread(load_pair, self.snapshots, self.root, target, self.models)
            except LOAD_ERRORS as exc:
                self._refused(target, reason, exc)
                raise ReloadError(self.last_reload_error["message"]) from exc
            old, self.current = self.current, pair
            seconds = time.perf_counter() - start
            self._failed_id = None
            self.serving_missing_since = None
            self.last_reload = {
                "snapshot": pair.id,
                "at": time.time(),
                "seconds": round(seconds, 3),
                "reason": reason,
            }
            self.models.keep_only(pair.snapshot.model_sha256, pair.model.precision)
            self.metrics.serving(pair.id, pair.snapshot.model_sha256, int(pair.snapshot.count))
            self.metrics.reloads.labels("ok").inc()
            LOG.info(
                "serving snapshot %s (%d photos, model %s) after %.1f s; was %s",
                pair.id, pair.snapshot.count, pair.snapshot.model_sha256[:12], seconds, old.id if old else None,
            )  # fmt: skip
            if old is not None:
                old.retire()
            return ReloadResult(True, pair.id, seconds)

    def _refused(self, target: str | None, reason: str, exc: BaseException) -> None:
        self._failed_id = target
        message = f"snapshot {target} refused: {exc}" if target else str(exc)
        self.last_reload_error = {"snapshot": target, "at": time.time(), "reason": reason, "message": message}
        self.metrics.reloads.labels("refused").inc()
        self.metrics.refused_pending.set(1)
        serving = self.current.id if self.current else None
        LOG.error("%s (%s); still serving %s", message, type(exc).__name__, serving)
