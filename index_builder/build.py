"""Full builds and incremental updates: collection -> hashes -> embeddings -> FAISS -> published snapshot.

One job at a time per ROOT (a lock file). Everything a job computes before publishing lives under
ROOT/.work/<model>/ and is resumable; the published snapshot is only ever replaced by a rename.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index_builder import faiss_index
from index_builder.collection import Collection, Skipped, load_collection
from index_builder.embed import (
    DecodeItem,
    EmbeddingCache,
    EmbedStats,
    default_decode_workers,
    embed_into_cache,
    hash_photos,
    load_photo_encoder,
)
from index_builder.ray_build import RayCluster, build_shards_on_ray, embed_on_ray
from index_builder.snapshot import (
    IDS_FILE,
    MODEL_FILES,
    PHOTOS_DB,
    VECTORS_FILE,
    Snapshot,
    SnapshotError,
    SnapshotWriter,
    read_current,
    read_photo_store,
)
from model.ground.checkpoint import checkpoint_sha256
from model.ground.errors import UserError
from model.ground.files import write_text_atomic

LOG = logging.getLogger(__name__)

WORK_DIR = ".work"
LOCK_FILE = ".lock"


@dataclass
class BuildOptions:
    """Every knob of a build; the CLI flags map one to one (docs/INDEX.md)."""

    index: str = "auto"  # a faiss factory string, or "auto"
    memory_budget: int = faiss_index.DEFAULT_MEMORY_BUDGET
    exact_max: int = faiss_index.EXACT_MAX
    recall_target: float = faiss_index.RECALL_TARGET
    keep: int = 3
    device: str = "auto"
    batch_size: int | None = None  # None: 32 on the CPU, 256 on a GPU
    workers: int | None = None  # decode processes; None: default_decode_workers()
    threads: int | None = None  # encoder threads on the CPU; None: torch's default (all cores)
    # fp32, int8 or auto (None: $SBIR_CPU_PRECISION, else auto): auto is int8 on a CPU with VNNI for a
    # calibrated backbone (model.backbones.cpu_precision_for); an update follows its snapshot's
    cpu_precision: str | None = None
    chunk_size: int = 512  # photos per checkpoint file
    path_column: str = "path"
    id_column: str = "id"
    photo_root: Path | None = None
    progress: bool = True
    shards: int | None = None  # None: automatic (faiss_index.choose_shards)
    shard_memory: int = faiss_index.DEFAULT_SHARD_MEMORY
    ray: str | None = None  # a Ray address (ray://host:10001, auto, host:port) or "local"
    ray_actors: int | None = None  # None: one per GPU, else the cluster's CPUs / ray_actor_cpus
    ray_actor_cpus: float = 1.0


class EmptyCollectionError(UserError):
    """No photo of the collection could be indexed; `report` lists why each was skipped."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclass
class BuildResult:
    snapshot_id: str
    published: bool
    report: dict = field(default_factory=dict)


class RootLock:
    """Exclusive lock on ROOT/.lock: the kernel drops it when the process dies, even by SIGKILL.

    A POSIX record lock (lockf), not flock: forked decode workers do not inherit it, so a worker that
    outlives a killed job cannot keep the next job out. Record locks do not exclude the same process,
    so jobs of one process are excluded by a set of held roots.
    """

    _held: set[str] = set()
    _held_lock = threading.Lock()

    def __init__(self, root: Path):
        self.path = root / LOCK_FILE
        self.key = str(self.path.resolve())
        self.fd: int | None = None

    def __enter__(self) -> RootLock:
        with RootLock._held_lock:
            if self.key in RootLock._held:
                raise UserError(f"another index job holds {self.path} (pid {os.getpid()}, this process)")
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                os.close(fd)
                raise UserError(f"another index job holds {self.path} (pid {holder or '?'})") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            RootLock._held.add(self.key)
        return self

    def __exit__(self, *exc) -> None:
        assert self.fd is not None
        with RootLock._held_lock:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
            RootLock._held.discard(self.key)


def build(photos: Path, root: Path, model_dir: Path, options: BuildOptions | None = None) -> BuildResult:
    """Embed every photo of `photos` with the model at `model_dir` and publish a snapshot under `root`."""
    return _run(Path(photos), Path(root), Path(model_dir), options or BuildOptions(), mode="build")


def update(
    root: Path,
    photos: Path,
    options: BuildOptions | None = None,
    model_dir: Path | None = None,
    rebuild: bool = False,
) -> BuildResult:
    """Publish a new snapshot of `photos` reusing the current snapshot's vectors for unchanged content.

    A model other than the current snapshot's is refused unless `rebuild` (then everything is embedded).
    """
    return _run(
        Path(photos),
        Path(root),
        Path(model_dir) if model_dir else None,
        options or BuildOptions(),
        mode="rebuild" if rebuild else "update",
    )


# --- the job ----------------------------------------------------------------------------------


def _run(photos: Path, root: Path, model_src: Path | None, opt: BuildOptions, mode: str) -> BuildResult:
    if opt.keep < 1:
        raise UserError("--keep must be at least 1")
    if not 0 < opt.recall_target <= 1:
        raise UserError("--recall-target must be in (0, 1]")
    if opt.shards is not None and opt.shards < 1:
        raise UserError("--shards must be at least 1 (or auto)")
    root.mkdir(parents=True, exist_ok=True)
    with RootLock(root), RayCluster(opt.ray or "", progress=opt.progress) as cluster:
        writer = SnapshotWriter(root)
        writer.clean_leftovers()
        previous = _open_previous(root, mode, model_src is not None)
        try:
            return _Job(photos, root, model_src, opt, mode, writer, previous, cluster if opt.ray else None).run()
        finally:
            if previous is not None:
                previous.close()


@dataclass
class _Reuse:
    """The previous snapshot's vectors, addressable by content hash (updates only)."""

    row_of_sha: dict[str, int] = field(default_factory=dict)
    vectors: np.ndarray | None = None
    rows: dict[int, tuple] = field(default_factory=dict)  # id -> (key, path, sha256, metadata JSON)

    @classmethod
    def of(cls, snap: Snapshot) -> _Reuse:
        rows = read_photo_store(snap.path / PHOTOS_DB)
        row_of_id = {int(pid): r for r, pid in enumerate(np.load(snap.path / IDS_FILE))}
        return cls(
            row_of_sha={sha: row_of_id[pid] for pid, (_k, _p, sha, _m) in rows.items()},
            vectors=np.load(snap.path / VECTORS_FILE, mmap_mode="r"),
            rows=rows,
        )


class _Job:
    """One build, update or rebuild, as named steps over what they share (`run` calls them in order).

    `mode` is read once: `reuses` says whether the previous snapshot's vectors and rows are reused and
    its model and precision kept (an update); a rebuild only replaces it, a build has none.
    """

    def __init__(self, photos: Path, root: Path, model_src: Path | None, opt: BuildOptions, mode: str,
                 writer: SnapshotWriter, previous: Snapshot | None, cluster):
        self.photos, self.root, self.opt, self.mode = photos, root, opt, mode
        self.writer, self.previous, self.cluster = writer, previous, cluster
        self.reuses = previous is not None and mode == "update"
        if model_src is None:
            assert previous is not None, "an update without --model uses the current snapshot's model"
            model_src = previous.model_dir
        self.model_src: Path = model_src
        self.t_start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.model = None  # the photo encoder, loaded when first needed

    def run(self) -> BuildResult:
        self.check_model()
        self.list_photos()
        self.stage_model()
        self.hash_contents()
        self.embed(self.plan_embeddings())
        report = self.assemble()
        if self.reuses and _unchanged(self.previous, self.reuse.rows, self.rows, self.opt, self.config):
            LOG.info("nothing changed: snapshot %s is up to date", self.previous.id)
            shutil.rmtree(self.job_dir, ignore_errors=True)
            report["timings"] = _rounded(self.timings, self.t_start)
            return BuildResult(self.previous.id, False, {**report, "snapshot": self.previous.id})
        self.build_index()
        return self.publish(report)

    def _timed(self, name: str, t: float) -> None:
        self.timings[name] = time.perf_counter() - t

    # --- steps ------------------------------------------------------------------------------------
    def check_model(self) -> None:
        """The checkpoint is complete; an update keeps its snapshot's model."""
        src, previous = self.model_src, self.previous
        if not all((src / name).is_file() for name in MODEL_FILES):
            raise UserError(f"{src} is not a model checkpoint (needs {' and '.join(MODEL_FILES)})")
        self.model_sha = checkpoint_sha256(src)
        if self.reuses and self.model_sha != previous.model_sha256:
            raise UserError(
                f"{self.root}: snapshot {previous.id} was built with model {previous.model_sha256[:12]}, "
                f"--model is {self.model_sha[:12]}; pass --rebuild to re-embed every photo with the new model"
            )

    def list_photos(self) -> None:
        opt = self.opt
        self.collection = load_collection(
            self.photos, photo_root=opt.photo_root, path_column=opt.path_column, id_column=opt.id_column
        )
        if not self.collection.records:
            report = {
                "mode": self.mode,
                "source": self.collection.describe(),
                "skipped": [s.to_dict() for s in self.collection.skipped],
            }
            raise EmptyCollectionError(
                f"{self.photos}: no image files found ({len(self.collection.skipped)} skipped)", report
            )

    def stage_model(self) -> None:
        """The job's precision and work folder, and its private copy of the checkpoint."""
        config = json.loads((self.model_src / MODEL_FILES[0]).read_text(encoding="utf-8"))
        self.precision = _precision(config, self.opt, self.previous if self.reuses else None)
        self.calibration = _calibration(config, self.precision, self.previous if self.reuses else None)
        self.job_dir = job_dir_of(self.root, self.model_sha, self.precision, self.calibration)
        self.staged = _stage_model(self.model_src, self.job_dir, self.model_sha)
        self.config = json.loads((self.staged / MODEL_FILES[0]).read_text(encoding="utf-8"))

    def hash_contents(self) -> None:
        t = time.perf_counter()
        self.hashes, self.unreadable = hash_photos(
            self.collection.records, self.collection.root, progress=self.opt.progress
        )
        self._timed("hash_s", t)

    def plan_embeddings(self) -> list[DecodeItem]:
        """The photos whose content has no vector yet: not in the checkpoints, nor in the snapshot reused."""
        self.dim = int(self.config.get("dim") or 0)
        if not self.dim:  # older checkpoints do not record their dimension
            self.dim = self.encoder().dim
        # a row is [zs | re-ranking parts] where the model re-ranks (model/rerank.py): the index holds
        # the first search_dim columns, vectors.npy whole rows
        self.search_dim = int(self.config.get("search_dim") or self.dim)
        if self.opt.index != "auto":
            _plan(1, self.search_dim, self.opt)  # refuse a bad factory string before spending time on embeddings
        self.cache = EmbeddingCache(self.job_dir / "chunks", self.dim)
        self.before = set(self.cache.row) | set(self.cache.failures)
        self.reuse = _Reuse.of(self.previous) if self.reuses else _Reuse()
        todo, seen = [], set()
        for rec in self.collection.records:
            sha = self.hashes.get(rec.id)
            if sha is None or sha in seen or sha in self.reuse.row_of_sha or sha in self.cache:
                continue
            seen.add(sha)
            todo.append(DecodeItem(sha, str(rec.path)))
        LOG.info(
            "%d photos: %d to embed, %d in checkpoints, %d in the previous snapshot",
            len(self.collection.records),
            len(todo),
            len(self.before),
            len(self.reuse.row_of_sha),
        )
        return todo

    def embed(self, todo: list[DecodeItem]) -> None:
        t = time.perf_counter()
        self.stats, self.embedding = EmbedStats(), {}
        if todo:
            run = self._embed_on_ray if self.cluster is not None else self._embed_here
            self.stats, self.embedding = run(todo, True)
            # a file that changed after hashing was embedded under its new hash; a photo that shared its
            # old content (a copy) was not embedded at all: a second pass picks such photos up
            if self.stats.changed_while_running:
                again = _unresolved(self.collection, self.hashes, self.stats, self.cache, self.reuse)
                LOG.info(
                    "%d file(s) changed while embedding; embedding %d photo(s) again",
                    len(self.stats.changed_while_running),
                    len(again),
                )
                self.stats.merge(run(again, False)[0])
        self._timed("embed_s", t)

    def assemble(self) -> dict:
        """Vectors and photo-store rows of every indexable photo, and the job's report so far."""
        self.ids, self.vectors, self.rows, self.skipped, sources = _assemble(
            self.collection, self.hashes, self.unreadable, self.cache, self.stats, self.reuse, self.before,
            self.dim,
        )  # fmt: skip
        counts = {
            "listed": len(self.collection.records) + len(self.collection.skipped),
            "indexed": len(self.ids),
            "skipped": len(self.skipped),
            "embedded": self.stats.embedded,
            "from_checkpoint": sources["checkpoint"],
            "from_previous": sources["previous"],
        }
        if self.reuses:
            counts.update(_diff_counts(self.reuse.rows, self.rows))
        reasons = Counter(s.reason for s in self.skipped)
        report = {
            "mode": self.mode,
            "source": self.collection.describe(),
            "counts": counts,
            "skipped_by_reason": dict(reasons),
            "skipped": [s.to_dict() for s in self.skipped],
            "embedding": self.embedding,
        }
        if not len(self.ids):
            said = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
            raise EmptyCollectionError(
                f"{self.photos}: no usable image ({len(self.skipped)} skipped: {said})", report
            )
        return report

    def build_index(self) -> None:
        opt = self.opt
        t = time.perf_counter()
        searched = np.ascontiguousarray(self.vectors[:, : self.search_dim])
        self.n_shards, self.shard_reason, self.plan = shard_plan(self.ids, self.search_dim, opt)
        self.index = build_sharded_index(searched, self.ids, self.plan.factory, self.n_shards, opt.threads, self.cluster)
        self._timed("index_s", t)
        t = time.perf_counter()
        self.recall = faiss_index.tune_and_measure(
            self.index, searched, self.ids, k=recall_depth(self.config), target=opt.recall_target
        )
        self._timed("recall_s", t)
        if self.recall.recall < opt.recall_target:
            LOG.warning(
                "recall@%d %.3f is below the target %.2f with %s",
                self.recall.k,
                self.recall.recall,
                opt.recall_target,
                self.plan.factory,
            )

    def publish(self, report: dict) -> BuildResult:
        """Write the snapshot aside, switch CURRENT to it, prune old ones, drop the work folder."""
        opt = self.opt
        t = time.perf_counter()
        manifest = _manifest(
            self.config, self.model_sha, self.dim, self.plan, self.recall, opt, self.collection, self.previous,
            len(self.ids), self.mode, self.embedding.get("device"), self.precision, self.calibration,
        )  # fmt: skip
        manifest["index"]["shards"] = {
            "count": self.n_shards,
            "sizes": [int(p.ntotal) for p in faiss_index.shard_parts(self.index)],
            "requested": opt.shards or "auto",
            "reason": self.shard_reason,
            "shard_memory": opt.shard_memory,
        }
        if self.cluster is not None:
            manifest["build"]["ray"] = {
                k: self.embedding[k] for k in ("address", "actors", "device") if k in self.embedding
            }
        manifest["build"]["seconds"] = round(time.perf_counter() - self.t_start, 3)  # up to writing the snapshot
        report["index"] = manifest["index"]
        snap_id = self.writer.write(
            index=self.index,
            ids=self.ids,
            vectors=self.vectors,
            photo_rows=self.rows,
            model_dir=self.staged,
            manifest=manifest,
            report=report,
        )
        self.writer.publish(snap_id)
        self._timed("write_s", t)
        pruned = self.writer.prune(opt.keep)
        shutil.rmtree(self.job_dir, ignore_errors=True)  # its content now lives in the snapshot
        report.update(timings=_rounded(self.timings, self.t_start), snapshot=snap_id, pruned=pruned)
        LOG.info(
            "snapshot %s: %d photos indexed (%d embedded now), %d skipped, %s, recall@%d %.3f, %.1fs",
            snap_id,
            len(self.ids),
            self.stats.embedded,
            len(self.skipped),
            self.plan.factory,
            self.recall.k,
            self.recall.recall,
            report["timings"]["total_s"],
        )
        return BuildResult(snap_id, True, report)

    # --- embedding, here or on a Ray cluster ------------------------------------------------------
    def encoder(self):
        if self.model is None:
            self.model = _load_model(self.staged, self.opt, self.precision, self.calibration)
        return self.model

    def _embed_here(self, items: list[DecodeItem], first: bool) -> tuple[EmbedStats, dict]:
        opt, model = self.opt, self.encoder()
        if model.dim != self.dim:
            raise UserError(f"{self.model_src}: config.json says dim {self.dim}, the model makes {model.dim}-d vectors")
        workers = default_decode_workers() if opt.workers is None else opt.workers
        batch = opt.batch_size or (256 if model.device.type == "cuda" else 32)
        done = embed_into_cache(
            model,
            items,
            self.collection.root,
            self.cache,
            batch_size=batch,
            workers=workers if first else 0,
            chunk_size=opt.chunk_size,
            progress=opt.progress and first,
        )
        return done, {
            "workers": workers,
            "batch_size": batch,
            "device": str(model.device),
            "precision": model.precision,
            "runtime": model.backbone.runtime(),
            "threads": _threads(),
            "photos_per_s": round(done.photos_per_second, 2),
            "forward_photos_per_s": round(done.forward_photos_per_second, 2),
            "forward_s": round(done.forward_seconds, 3),
        }

    def _embed_on_ray(self, items: list[DecodeItem], first: bool) -> tuple[EmbedStats, dict]:
        opt = self.opt
        stats, info = embed_on_ray(
            self.cluster,
            items,
            self.collection.root,
            self.staged,
            self.model_sha,
            self.cache,
            model_files=MODEL_FILES,
            device=opt.device,
            precision=self.precision,
            calibration=self.calibration,
            actors=opt.ray_actors,
            actor_cpus=opt.ray_actor_cpus,
            batch_size=opt.batch_size,
            chunk_size=opt.chunk_size,
        )
        info.update(
            photos_per_s=round(stats.photos_per_second, 2),
            forward_photos_per_s=round(stats.forward_photos_per_second, 2),
            forward_s=round(stats.forward_seconds, 3),
        )
        return stats, info


def _open_previous(root: Path, mode: str, model_given: bool) -> Snapshot | None:
    if mode == "build":
        return None
    if read_current(root) is None:
        raise UserError(f"{root} has no published snapshot to update; run `sbir index build` first")
    if mode == "update":
        # its vectors are reused: make sure they are the ones it published
        return Snapshot.open(root, verify=True)
    try:  # rebuild: nothing is reused, so a damaged current snapshot must not stand in the way
        return Snapshot.open(root)
    except SnapshotError as exc:
        if not model_given:
            raise UserError(f"{exc}; give --model to rebuild without it") from None
        LOG.warning("rebuilding without the current snapshot: %s", exc)
        return None


def _stage_model(src: Path, job_dir: Path, sha: str) -> Path:
    """A private copy of the checkpoint: the snapshot ships exactly the model the vectors came from."""
    staged = job_dir / "model"
    if staged.is_dir():
        try:
            if checkpoint_sha256(staged) == sha:
                return staged
        except OSError:
            pass
        shutil.rmtree(staged)
    tmp = job_dir / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in MODEL_FILES:
        shutil.copyfile(src / name, tmp / name)
    if checkpoint_sha256(tmp) != sha:
        shutil.rmtree(tmp)
        raise UserError(f"{src} changed while it was being copied; try again")
    os.rename(tmp, staged)
    return staged


def job_dir_of(root: Path, model_sha: str, precision: str, calibration: dict | None = None) -> Path:
    """The work folder of a job: embeddings of one model in one precision, and in int8 of one
    calibration (`calibration`, model.quantize.calibration_record), never mixed in a cache:
    `<model sha256[:16]>` in fp32, `<model sha256[:16]>-int8-<calibration sha256[:12]>` in int8."""
    if precision == "fp32":
        return Path(root) / WORK_DIR / model_sha[:16]
    assert calibration is not None, f"a {precision} job needs its calibration record"
    return Path(root) / WORK_DIR / f"{model_sha[:16]}-{precision}-{calibration['sha256'][:12]}"


def _precision(config: dict, opt: BuildOptions, previous: Snapshot | None) -> str:
    """The backbone precision of this job; an update keeps its snapshot's unless one is asked for."""
    from model.backbones import cpu_precision_for
    from model.pipeline import resolve_device
    from model.quantize import requested_precision

    backbone = config.get("backbone", {})
    try:
        requested = requested_precision(opt.cpu_precision)
        if previous is not None:
            if requested == "auto":
                requested = previous.precision
            elif requested != previous.precision:
                raise UserError(
                    f"snapshot {previous.id} holds vectors of the {previous.precision} backbone, --cpu-precision "
                    f"is {requested}: index and queries must use one precision; pass --rebuild to re-embed "
                    f"every photo in {requested}"
                )
        return cpu_precision_for(backbone.get("name", ""), requested, resolve_device(opt.device),
                                 tuned=bool(backbone.get("finetuned")))
    except (ValueError, KeyError) as exc:
        raise UserError(str(exc)) from None


def _calibration(config: dict, precision: str, previous: Snapshot | None) -> dict | None:
    """The int8 calibration this job's vectors come from (None in fp32); an update refuses a snapshot
    whose int8 vectors came from another calibration, or from one it did not record."""
    if precision != "int8":
        return None
    from model.backbones import int8_calibration_of

    name = config.get("backbone", {}).get("name", "")
    try:
        current = int8_calibration_of(name)
    except (KeyError, OSError) as exc:
        raise UserError(f"no int8 calibration for backbone {name!r}: {exc}") from None
    if current is None:
        raise UserError(f"backbone {name!r} has no int8 calibration; build with --cpu-precision fp32")
    built = previous.int8_calibration if previous is not None else None
    if previous is not None and (built or {}).get("sha256") != current["sha256"]:
        what = (f"calibration {built['file']} sha256 {built['sha256'][:12]}" if built
                else "a calibration it does not record (built before sbir recorded it)")
        raise UserError(
            f"snapshot {previous.id} holds int8 vectors of {what}; this sbir quantizes with "
            f"{current['file']} sha256 {current['sha256'][:12]}: int8 vectors of two calibrations are not "
            "comparable; pass --rebuild to re-embed every photo with this one"
        )
    return current


def _load_model(ckpt: Path, opt: BuildOptions, precision: str, calibration: dict | None = None):
    try:
        return load_photo_encoder(ckpt, opt.device, opt.threads, precision, calibration)
    except RuntimeError as exc:  # an int8 graph that cannot be made, does not agree, or is of another calibration
        raise UserError(f"{exc}; build with --cpu-precision fp32") from None


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _assemble(
    collection: Collection,
    hashes,
    unreadable,
    cache: EmbeddingCache,
    stats: EmbedStats,
    reuse: _Reuse,
    before: set,
    dim: int,
):
    """Vectors for every indexable photo, in id order, and the photo-store rows; the rest is skipped."""
    skipped: list[Skipped] = list(collection.skipped) + list(unreadable)
    sources = Counter()
    ids, rows, parts = [], [], []
    cache_vectors = cache.vectors()
    for rec in collection.records:  # sorted by id
        seen_sha = hashes.get(rec.id)
        if seen_sha is None:
            continue  # already in `unreadable`
        sha = stats.changed_while_running.get(str(rec.path), seen_sha)
        if sha in cache.row:
            vec = cache_vectors[cache.row[sha]]
            sources["checkpoint" if sha in before else "embedded"] += 1
        elif sha in reuse.row_of_sha:
            vec = reuse.vectors[reuse.row_of_sha[sha]]
            sources["previous"] += 1
        elif sha in cache.failures:
            reason, detail = cache.failures[sha]
            skipped.append(Skipped(rec.key, str(rec.path), reason, detail))
            continue
        elif str(rec.path) in stats.transient:
            reason, detail = stats.transient[str(rec.path)]
            skipped.append(Skipped(rec.key, str(rec.path), reason, detail))
            continue
        else:  # it kept changing while the job ran
            skipped.append(Skipped(rec.key, str(rec.path), "changed-during-build", "run update again"))
            continue
        ids.append(rec.id)
        parts.append(vec)
        rows.append((rec.id, rec.key, str(rec.path), sha, json.dumps(rec.metadata, sort_keys=True)))
    vectors = np.stack(parts).astype(np.float32) if parts else np.zeros((0, dim), np.float32)
    return np.asarray(ids, np.int64), vectors, rows, skipped, sources


def _unresolved(collection: Collection, hashes, stats: EmbedStats, cache: EmbeddingCache, reuse: _Reuse):
    """Photos whose content (as hashed, or as read while embedding) has neither a vector nor a failure."""
    out = []
    for rec in collection.records:
        path = str(rec.path)
        sha = stats.changed_while_running.get(path, hashes.get(rec.id))
        if sha is None or sha in cache or sha in reuse.row_of_sha or path in stats.transient:
            continue
        out.append(DecodeItem(sha, path))
    return out


def _diff_counts(prev_rows: dict, rows: list) -> dict:
    new = {r[0]: r[3] for r in rows}
    old = {pid: v[2] for pid, v in prev_rows.items()}
    return {
        "added": sum(1 for pid in new if pid not in old),
        "changed": sum(1 for pid, sha in new.items() if pid in old and old[pid] != sha),
        "unchanged": sum(1 for pid, sha in new.items() if old.get(pid) == sha),
        "removed": sum(1 for pid in old if pid not in new),
    }


def recall_depth(config: dict) -> int:
    """The depth the service searches a snapshot's index to, so the depth at which the builder tunes and
    measures its recall: the second stage's candidates (`rerank.top`, 400 by default) where the model
    re-ranks, else faiss_index.RECALL_K. Tuned at the top 10, an IVF index gave a re-ranking model
    0.36 of the exact top 400 (docs/BENCHMARKS.md, "The first stage's depth")."""
    rerank = config.get("rerank") or {}
    return int(rerank.get("top") or faiss_index.RECALL_K)


def _unchanged(previous: Snapshot, prev_rows: dict, rows: list, opt: BuildOptions, config: dict) -> bool:
    """Same photos, same content, same metadata and the same index settings as the current snapshot,
    whose recall was measured as deep as the model needs (an older build's may have been shallower)."""
    index = previous.manifest["index"]
    recall = index.get("recall", {})
    if opt.index != index.get("requested", "auto") or opt.recall_target != recall.get("target"):
        return False
    if int(recall.get("k", faiss_index.RECALL_K)) < min(recall_depth(config), len(rows) - 1):
        return False
    if (opt.shards or "auto") != (index.get("shards") or {}).get("requested", "auto"):
        return False
    return len(prev_rows) == len(rows) and all(prev_rows.get(r[0]) == r[1:] for r in rows)


def shard_plan(ids: np.ndarray, dim: int, opt: BuildOptions) -> tuple[int, str, faiss_index.IndexPlan]:
    """Shard count (given, or the fewest whose index fits --shard-memory each) and the index of a shard:
    chosen as for a collection of the largest shard's size with its share of the memory budget."""
    whole = _plan(len(ids), dim, opt)
    if opt.shards is not None:
        n_shards, reason = opt.shards, "given with --shards"
    else:
        n_shards = faiss_index.choose_shards(len(ids), whole.bytes_per_vector, opt.shard_memory)
        reason = (
            f"{whole.factory} at {whole.bytes_per_vector} bytes/vector x {len(ids)} "
            f"{'fits' if n_shards == 1 else 'exceeds'} --shard-memory {opt.shard_memory}"
        )
    if n_shards == 1:
        return 1, reason, whole
    sizes = np.bincount(ids % n_shards, minlength=n_shards)
    if sizes.min() == 0:
        raise UserError(f"--shards {n_shards}: some shards would be empty with {len(ids)} photos; use fewer")
    share = BuildOptions(**{**opt.__dict__, "memory_budget": opt.memory_budget // n_shards})
    return n_shards, reason, _plan(int(sizes.max()), dim, share)


def build_sharded_index(vectors, ids, factory: str, n_shards: int, threads: int | None = None, cluster=None):
    """The job's index: one faiss index, or `n_shards` built in parallel (threads here, or tasks on the
    Ray cluster) and combined for search."""
    if n_shards == 1:
        return faiss_index.build_index(vectors, ids, factory)
    parts = faiss_index.split_shards(vectors, ids, n_shards)
    if cluster is not None:
        shards = build_shards_on_ray(cluster, parts, factory)
    else:
        shards = faiss_index.build_shards(parts, factory, threads)
    return faiss_index.combine_shards(shards, use_gpu=False)


def _plan(n: int, dim: int, opt: BuildOptions) -> faiss_index.IndexPlan:
    if opt.index == "auto":
        try:
            return faiss_index.choose_factory(n, dim, opt.memory_budget, opt.exact_max)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    try:
        faiss_index.new_index(opt.index, dim)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return faiss_index.IndexPlan(opt.index, faiss_index.kind_of(opt.index), "given with --index", None)


def _manifest(
    config, model_sha, dim, plan, recall, opt, collection, previous, count, mode, device, precision, calibration
) -> dict:
    import faiss
    import torch

    from model.ground import __version__

    backbone = config.get("backbone", {})
    return {
        "parent": previous.id if previous is not None else None,
        "software": {
            "sbir": __version__,
            "faiss": faiss.__version__,
            "numpy": np.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "model": {
            "sha256": model_sha,
            "config": config,
            "backbone": backbone.get("name"),
            "backbone_weights_sha256": backbone.get("weights_sha256"),
            # what the backbone ran in: the service encodes queries in the same (service/state.py)
            "precision": precision,
            "dim": dim,
            "dir": "model",
        } | ({"int8_calibration": calibration} if precision == "int8" else {}),
        "dim": dim,
        # rows of vectors.npy are [zs | re-ranking parts] where the model re-ranks (model/rerank.py);
        # the index holds the first search_dim columns
        "search_dim": int(config.get("search_dim") or dim),
        "rerank": config.get("rerank"),
        "count": count,
        "metric": "inner_product",
        "index": {
            "factory": plan.factory,
            "requested": opt.index,
            "kind": plan.kind,
            "reason": plan.reason,
            "search_params": recall.params,
            "recall": recall.to_dict(),
            "memory_budget": opt.memory_budget,
            "exact_max": opt.exact_max,
            "gpus": faiss_index.gpu_count(),
        },
        "build": {"mode": mode, "source": collection.describe(), "device": device},
    }


def _rounded(timings: dict, t_start: float) -> dict:
    out = {k: round(v, 3) for k, v in timings.items()}
    out["total_s"] = round(time.perf_counter() - t_start, 3)
    return out


def write_report(path: Path, report: dict) -> None:
    write_text_atomic(Path(path), json.dumps(report, indent=2, sort_keys=True) + "\n")
