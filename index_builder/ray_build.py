"""Re-indexing on a Ray cluster: photos embedded by an actor pool (Ray Data), index shards built as tasks.

The driver (the `sbir index` process) keeps the rest of the job (listing, hashing, the checkpoint, the
snapshot), so a Ray build publishes the same snapshot as a single-process one (docs/INDEX.md, "Ray").
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from index_builder.embed import (
    BatchRecorder,
    DecodeItem,
    EmbeddingCache,
    EmbedStats,
    encode_block,
    load_photo_encoder,
)
from model.ground.checkpoint import checkpoint_sha256
from model.ground.errors import UserError

LOG = logging.getLogger(__name__)

LOCAL = "local"
# Object store of an in-process (`--ray local`) cluster: blocks of photo paths and of vectors are small.
LOCAL_OBJECT_STORE_BYTES = 256 << 20


class RayCluster:
    """A connection to the cluster at `address` (`local`: start Ray in this process), made on first use.

    If this process is already connected (a benchmark or a test called `ray.init`), that connection is
    used and left open.
    """

    def __init__(self, address: str, progress: bool = True):
        self.address = address
        self.progress = progress
        self._owned = False
        self._ray = None

    def connect(self):
        if self._ray is not None:
            return self._ray
        try:
            import ray
            import ray.data  # noqa: F401  (the extra may have Ray without its data library)
        except ImportError as exc:
            raise UserError(f"--ray needs Ray ({exc.name} is missing): pip install 'sbir[ray]'") from None
        if not ray.is_initialized():
            t = time.perf_counter()
            kwargs: dict = {"logging_level": logging.WARNING, "configure_logging": False}
            try:
                if self.address == LOCAL:
                    ray.init(
                        num_cpus=os.cpu_count(),
                        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                        include_dashboard=False,
                        **kwargs,
                    )
                else:
                    ray.init(address=self.address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UserError(f"cannot use the Ray cluster at {self.address!r}: {exc}") from None
            self._owned = True
            LOG.info(
                "connected to Ray at %s in %.1fs: %s",
                self.address,
                time.perf_counter() - t,
                ray.cluster_resources(),
            )
        ray.data.DataContext.get_current().enable_progress_bars = self.progress
        self._ray = ray
        return ray

    def close(self) -> None:
        if self._ray is not None and self._owned:
            self._ray.shutdown()
        self._ray = None
        self._owned = False

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- embedding ---------------------------------------------------------------------------------


class PhotoEncoderActor:
    """One model per actor; each call decodes and encodes one block (one checkpoint chunk) of photos.

    The checkpoint travels through the object store (the workers need not see ROOT) and is checked by
    its sha256; the photos are read from their paths, which every node must see (docs/INDEX.md).
    """

    def __init__(self, model_files, model_sha256: str, root: str, device: str, threads: int, batch_size: int,
                 precision: str = "fp32", calibration: dict | None = None):
        import ray

        if isinstance(model_files, ray.ObjectRef):
            model_files = ray.get(model_files)
        self._dir = Path(tempfile.mkdtemp(prefix="sbir-model-"))
        for name, data in model_files.items():
            (self._dir / name).write_bytes(data)
        if checkpoint_sha256(self._dir) != model_sha256:
            raise RuntimeError(f"the checkpoint received is not {model_sha256[:12]}")
        self.model = load_photo_encoder(self._dir, device, threads, precision, calibration)
        self.root = Path(root)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [DecodeItem(str(s), str(p)) for s, p in zip(batch["sha256"], batch["path"], strict=True)]
        encoded, vectors, failed, forward = encode_block(self.model, items, self.root, self.batch_size)
        n = len(items)
        ok = np.zeros(n, bool)
        out = np.zeros((n, self.model.dim), np.float32)
        digest, reason, detail = [""] * n, [""] * n, [""] * n
        for row, (i, d) in enumerate(encoded):
            ok[i], out[i], digest[i] = True, vectors[row], d
        for i, d, r, text in failed:
            digest[i], reason[i], detail[i] = d, r, text
        return {
            "sha256": np.asarray(batch["sha256"]),
            "path": np.asarray(batch["path"]),
            "ok": ok,
            "digest": np.array(digest),
            "reason": np.array(reason),
            "detail": np.array(detail),
            "vector": out,
            "forward_s": np.full(n, forward / max(1, n)),
        }

    def __del__(self):
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)


def actor_pool(resources: dict, device: str, actors: int | None, actor_cpus: float) -> tuple[int, dict, str]:
    """How many encoder actors, the resources of each, and their torch device.

    One actor per GPU where the cluster has GPUs (and `device` allows them); otherwise CPU actors of
    `actor_cpus` CPUs each, as many as the cluster's CPUs hold. `actors` overrides the count.
    """
    if actor_cpus <= 0:
        raise UserError("--ray-actor-cpus must be positive")
    if actors is not None and actors < 1:
        raise UserError("--ray-actors must be at least 1")
    gpus = int(resources.get("GPU", 0)) if device == "auto" or device.startswith("cuda") else 0
    if device.startswith("cuda") and not gpus:
        raise UserError(f"--device {device}, but the Ray cluster has no GPU")
    if gpus:
        return actors or gpus, {"num_gpus": 1, "num_cpus": actor_cpus}, "cuda"
    cpus = float(resources.get("CPU", 1))
    return actors or max(1, int(cpus // actor_cpus)), {"num_cpus": actor_cpus}, "cpu"


def embed_on_ray(
    cluster: RayCluster,
    items: Sequence[DecodeItem],
    root: Path,
    model_dir: Path,
    model_sha256: str,
    cache: EmbeddingCache,
    *,
    model_files: Sequence[str],
    device: str = "auto",
    precision: str = "fp32",
    calibration: dict | None = None,
    actors: int | None = None,
    actor_cpus: float = 1.0,
    batch_size: int | None = None,
    chunk_size: int = 512,
) -> tuple[EmbedStats, dict]:
    """Embed `items` on the cluster into `cache`: one Ray Data block per checkpoint chunk, each written
    by this process as soon as it arrives, so a killed job loses only the blocks still in flight.
    In int8 every actor checks that its backbone was quantized from the job's `calibration`."""
    todo = [it for it in items if it.sha256 not in cache]
    stats = EmbedStats()
    if not todo:
        return stats, {}
    ray = cluster.connect()
    n_actors, per_actor, actor_device = actor_pool(ray.cluster_resources(), device, actors, actor_cpus)
    batch = batch_size or (256 if actor_device == "cuda" else 32)
    files = {name: (model_dir / name).read_bytes() for name in model_files}
    ds = ray.data.from_items(
        [{"sha256": it.sha256, "path": it.path} for it in todo],
        override_num_blocks=max(1, math.ceil(len(todo) / chunk_size)),
    )
    encoded = ds.map_batches(
        PhotoEncoderActor,
        fn_constructor_kwargs={
            "model_files": ray.put(files),
            "model_sha256": model_sha256,
            "root": str(root),
            "device": actor_device,
            "threads": max(1, int(actor_cpus)),
            "batch_size": batch,
            "precision": precision,
            "calibration": calibration,
        },
        batch_size=chunk_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        **per_actor,
    )
    LOG.info("embedding %d photos on %d Ray actor(s) %s", len(todo), n_actors, per_actor)
    recorder = BatchRecorder(cache, chunk_size, stats)
    t0 = time.perf_counter()
    for out in encoded.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        block = [DecodeItem(str(s), str(p)) for s, p in zip(out["sha256"], out["path"], strict=True)]
        ok = np.asarray(out["ok"], bool)
        recorder.add(
            block,
            [(int(i), str(out["digest"][i])) for i in np.flatnonzero(ok)],
            np.asarray(out["vector"], np.float32)[ok],
            [
                (int(i), str(out["digest"][i]), str(out["reason"][i]), str(out["detail"][i]))
                for i in np.flatnonzero(~ok)
            ],
        )
        recorder.flush()  # one chunk per block, persisted as soon as it arrives
        stats.forward_seconds += float(np.sum(out["forward_s"]))
    stats.seconds = time.perf_counter() - t0
    LOG.info(
        "embedded %d photos (%d failed to decode) on Ray in %.1fs: %.1f photos/s",
        stats.embedded,
        stats.failed,
        stats.seconds,
        stats.photos_per_second,
    )
    info = {
        "engine": "ray",
        "address": cluster.address,
        "actors": n_actors,
        "actor_resources": per_actor,
        "device": actor_device,
        "batch_size": batch,
        "block_size": chunk_size,
    }
    return stats, info


# --- index shards ------------------------------------------------------------------------------


def build_shard_bytes(vectors: np.ndarray, ids: np.ndarray, factory: str) -> np.ndarray:
    """A Ray task: one shard built (on the worker's GPUs if it has any), returned serialised."""
    import faiss

    from index_builder import faiss_index

    return faiss.serialize_index(faiss_index.build_index(vectors, ids, factory))


def build_shards_on_ray(cluster: RayCluster, parts: Sequence[tuple[np.ndarray, np.ndarray]], factory: str):
    """Build one index per (vectors, ids) part as parallel Ray tasks; returns the CPU indexes in order."""
    import faiss

    ray = cluster.connect()
    task = ray.remote(num_cpus=1)(build_shard_bytes)
    refs = [task.remote(v, i, factory) for v, i in parts]
    return [faiss.deserialize_index(b) for b in ray.get(refs)]
