"""Every FAISS decision of the builder: which index for a collection, how to build it, how good it is.

Vectors are L2-normalised, so inner product is cosine similarity (docs/INDEX.md). Indexes always carry
our int64 photo ids (IVF natively, anything else inside IDMap2) and are returned on the CPU: GPU
indexes cannot remove ids or be written to disk, so the CPU index is the one that is saved.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np

LOG = logging.getLogger(__name__)

METRIC = faiss.METRIC_INNER_PRODUCT
# Exact search streams n*dim*4 bytes per query: at 100k x 64-d that is 25 MB, a few ms on one core
# (docs/BENCHMARKS.md). Beyond this, an approximate index is chosen automatically.
EXACT_MAX = 100_000
DEFAULT_MEMORY_BUDGET = 4 << 30
# The automatic shard count keeps every shard under this (about one GPU's memory, less the encoder).
DEFAULT_SHARD_MEMORY = 8 << 30
RECALL_K = 10
RECALL_TARGET = 0.95
# Values tried, in order, when tuning the one search-time knob of each family.
NPROBE_LADDER = tuple(
    sorted({1, 2, 3} | {b << s for s in range(16) for b in (4, 6)})
)  # 1, 2, 3, 4, 6, 8, 12, ...
EF_SEARCH_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
ID_BYTES = 8
# Exact search of a batch: faiss (1.15) scans the vectors once per query unless the batch is past
# `distance_compute_blas_threshold` (128,000 there, compared with about queries x dim), so the
# service's batches of 2 to 16 sketches cost as many scans. One matrix product instead: a batch of 8
# 64-d queries against 100k vectors took 6 ms instead of 19 ms on one core; a lone query keeps the
# per-query scan, which is faster for it (3 against 4.6 ms) (docs/BENCHMARKS.md). Every search of ours
# goes through `search`, which sets the kernel for its own batch.
_BLAS_THRESHOLD_DEFAULT = faiss.cvar.distance_compute_blas_threshold


@dataclass(frozen=True)
class IndexPlan:
    """What to build: a faiss factory string and why it was chosen."""

    factory: str
    kind: str  # flat | ivf-flat | ivf-sq8 | ivf-pq | hnsw | other
    reason: str
    bytes_per_vector: float | None  # estimate for the index in memory, ids included (None: unknown)


@dataclass
class RecallCheck:
    """recall@k of the built index against exact search, on database vectors used as queries."""

    k: int
    target: float
    recall: float  # on the validation sample, with `params`
    queries: int
    params: dict[str, int] = field(default_factory=dict)
    tuning: list[dict] = field(default_factory=list)  # [{param: value, "recall": r}] on the tuning sample
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def kind_of(factory: str) -> str:
    f = factory.replace("IDMap2,", "").replace("IDMap,", "")
    if f == "Flat":
        return "flat"
    if f.startswith("HNSW"):
        return "hnsw"
    if f.startswith("IVF"):
        codec = f.split(",", 1)[1] if "," in f else ""
        if codec == "Flat":
            return "ivf-flat"
        if codec == "SQ8":
            return "ivf-sq8"
        if codec.startswith("PQ"):
            return "ivf-pq"
    return "other"


def _nlist_for(n: int) -> int:
    """About 4*sqrt(n) lists, a power of two, with at least 39 training points each (faiss's own floor).

    At 1M clustered vectors, 4096 lists reach recall@10 0.95 probing 48 of them, 1612 single queries/s;
    1024 lists need 96 probes for 277 queries/s (docs/BENCHMARKS.md).
    """
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return int(min(nlist, 65536))


def _pq_m(dim: int, bytes_left: float) -> int | None:
    """Largest number of 8-bit sub-quantizers dividing `dim` that fits `bytes_left` per vector."""
    fits = [m for m in range(1, dim + 1) if dim % m == 0 and m <= bytes_left]
    return max(fits) if fits else None


def choose_factory(
    n: int, dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET, exact_max: int = EXACT_MAX
) -> IndexPlan:
    """The index for `n` vectors of `dim`: exact while small, else the most accurate IVF that fits.

    IVF over HNSW: on a 2-core machine HNSW32 takes minutes to build at 1M vectors and twice the memory
    of the vectors, for a single-query speed IVF also reaches at recall@10 0.95 (docs/BENCHMARKS.md).
    """
    assert n > 0 and dim > 0, f"need a non-empty collection, got n={n} dim={dim}"
    flat_bpv = 4 * dim + ID_BYTES
    if n <= exact_max:
        if n * flat_bpv > memory_budget:
            LOG.warning("exact index of %d vectors exceeds the memory budget; using it anyway", n)
        return IndexPlan("Flat", "flat", f"{n} <= exact_max {exact_max}", flat_bpv)
    nlist = _nlist_for(n)
    per_vec_budget = memory_budget / n - nlist * 4 * dim / n  # the centroids count too
    if flat_bpv <= per_vec_budget:
        return IndexPlan(f"IVF{nlist},Flat", "ivf-flat", "float32 vectors fit the memory budget", flat_bpv)
    if dim + ID_BYTES <= per_vec_budget:
        return IndexPlan(
            f"IVF{nlist},SQ8", "ivf-sq8", "8-bit scalar codes fit the memory budget", dim + ID_BYTES
        )
    m = _pq_m(dim, per_vec_budget - ID_BYTES)
    if m is None:
        raise ValueError(
            f"{n} vectors of {dim}-d do not fit a memory budget of {memory_budget} bytes even as product codes"
        )
    return IndexPlan(
        f"IVF{nlist},PQ{m}", "ivf-pq", f"only {m}-byte product codes fit the memory budget", m + ID_BYTES
    )


def new_index(factory: str, dim: int) -> faiss.Index:
    """An empty index for `factory` that accepts our ids (IVF natively, anything else in IDMap2)."""
    if factory.startswith(("IDMap", "IVF")):
        spec = factory
    else:
        spec = f"IDMap2,{factory}"
    try:
        return faiss.index_factory(dim, spec, METRIC)
    except RuntimeError as exc:
        raise ValueError(f"faiss cannot build index {factory!r}: {str(exc).splitlines()[-1]}") from None


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def _needs_training(index: faiss.Index) -> bool:
    return not index.is_trained


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    factory: str,
    *,
    use_gpu: bool | None = None,
    train_max: int | None = None,
    seed: int = 1234,
) -> faiss.Index:
    """Train (on a seeded sample) and fill an index with `vectors` under `ids`; returns a CPU index.

    Deterministic: the same vectors and ids in the same order give the same index, which is what makes
    an incremental update equal to a full rebuild. With GPUs present (faiss-gpu), IVF indexes are
    trained and filled on all of them, then copied back to the CPU.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    assert vectors.ndim == 2 and len(vectors) == len(ids), "vectors (n, d) and ids (n,) must match"
    assert len(np.unique(ids)) == len(ids), "ids must be unique"
    assert (ids >= 0).all(), "ids must be non-negative (-1 means 'no result')"
    index = new_index(factory, vectors.shape[1])
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
    if use_gpu is None:
        use_gpu = gpu_count() > 0
    built = None
    if use_gpu and ivf is not None:
        built = _build_on_gpus(index, vectors, ids, train_max, seed)
    if built is None:
        if _needs_training(index):
            index.train(_training_sample(vectors, index, train_max, seed))
        index.add_with_ids(vectors, ids)
        built = index
    return built


def _training_sample(vectors: np.ndarray, index: faiss.Index, train_max: int | None, seed: int) -> np.ndarray:
    ivf = faiss.try_extract_index_ivf(index)
    if train_max is None:
        # 64 points per list: k-means quality is flat beyond that, its cost linear (faiss needs >= 39)
        train_max = 64 * ivf.nlist if ivf is not None else 100_000
    if len(vectors) <= train_max:
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), train_max, replace=False))
    return vectors[rows]


def _build_on_gpus(index, vectors, ids, train_max, seed) -> faiss.Index | None:
    """Train and add on every visible GPU (replicas), then back to the CPU; None if faiss refuses."""
    try:
        gpu_index = faiss.index_cpu_to_all_gpus(index)
        if _needs_training(gpu_index):
            gpu_index.train(_training_sample(vectors, index, train_max, seed))
        gpu_index.add_with_ids(vectors, ids)
        cpu = faiss.index_gpu_to_cpu(gpu_index)
        LOG.info("index trained and filled on %d GPU(s)", gpu_count())
        return cpu
    except (RuntimeError, AttributeError) as exc:  # no GPU support for this index or build
        LOG.warning("building on the CPU: faiss could not use the GPUs (%s)", str(exc).splitlines()[-1])
        return None


# --- shards ------------------------------------------------------------------------------------


def choose_shards(n: int, bytes_per_vector: float | None, shard_memory: int = DEFAULT_SHARD_MEMORY) -> int:
    """The automatic shard count: the fewest shards whose index fits `shard_memory` each.

    An index of unknown size per vector (a factory string given by hand) is not split automatically.
    """
    assert shard_memory > 0, "shard_memory must be positive"
    if not bytes_per_vector:
        return 1
    return max(1, math.ceil(n * bytes_per_vector / shard_memory))


def split_shards(vectors: np.ndarray, ids: np.ndarray, n_shards: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(vectors, ids) of each shard: shard s holds the ids with id % n_shards == s, in the given order."""
    assert n_shards >= 1, "need at least one shard"
    of = np.asarray(ids) % n_shards
    return [(vectors[of == s], ids[of == s]) for s in range(n_shards)]


def build_shards(
    parts: list[tuple[np.ndarray, np.ndarray]], factory: str, threads: int | None = None
) -> list:
    """One index per shard, built in parallel threads (faiss releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, min(len(parts), threads or os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda part: build_index(part[0], part[1], factory), parts))


def combine_shards(shards: list, use_gpu: bool | None = None) -> faiss.Index:
    """The shards as one index: searched together, top-k merged by faiss's `IndexShards`.

    On the CPU each shard is searched in its own thread. With GPUs (faiss-gpu), shard i is copied to
    GPU i % gpus, so the shards spread over every visible GPU; if faiss refuses, the CPU is used.
    """
    assert shards, "need at least one shard"
    parts = list(shards)
    if use_gpu is None:
        use_gpu = gpu_count() > 0
    if use_gpu:
        parts = _shards_to_gpus(parts) or parts
    combined = faiss.IndexShards(parts[0].d, True, False)  # threaded, keep our ids
    for part in parts:
        combined.add_shard(part)
    combined.referenced_objects = parts  # IndexShards does not own its shards
    return combined


def _shards_to_gpus(shards: list) -> list | None:
    """Shard i on GPU i % gpus (not exercised by the tests: no GPU here)."""
    try:
        gpus = gpu_count()
        resources = [faiss.StandardGpuResources() for _ in range(gpus)]
        moved = [faiss.index_cpu_to_gpu(resources[i % gpus], i % gpus, s) for i, s in enumerate(shards)]
        for m in moved:
            m.referenced_objects = resources
        LOG.info("%d shard(s) spread over %d GPU(s)", len(shards), gpus)
        return moved
    except (RuntimeError, AttributeError) as exc:
        LOG.warning(
            "searching shards on the CPU: faiss could not use the GPUs (%s)", str(exc).splitlines()[-1]
        )
        return None


def shard_parts(index: faiss.Index) -> list:
    """The shards of an `IndexShards` (downcast), or [index] for an unsharded index."""
    if isinstance(index, faiss.IndexShards):
        return [faiss.downcast_index(index.at(i)) for i in range(index.count())]
    return [index]


# --- search parameters -------------------------------------------------------------------------


def tunable_parameter(index: faiss.Index) -> tuple[str, tuple[int, ...]] | None:
    """The search-time knob of this index and the values worth trying, or None (exact indexes)."""
    if isinstance(index, faiss.IndexShards):  # every shard is of one kind: the first one decides
        return tunable_parameter(shard_parts(index)[0])
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return "nprobe", tuple(v for v in NPROBE_LADDER if v < ivf.nlist) + (ivf.nlist,)
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else index
    if hasattr(inner, "hnsw"):
        return "efSearch", EF_SEARCH_LADDER
    return None


def set_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Apply recorded search parameters (nprobe, efSearch) through any IDMap wrapper."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, int(value))


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """scores (n,k) float32, ids (n,k) int64; missing results have id -1 and score -inf."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    assert queries.ndim == 2 and queries.shape[1] == index.d, f"queries must be (n, {index.d})"
    assert k >= 1, "k must be >= 1"
    # A process-wide setting: a search racing with another only picks the other kernel (same results).
    faiss.cvar.distance_compute_blas_threshold = 1 if len(queries) > 1 else _BLAS_THRESHOLD_DEFAULT
    params = None
    ef = _hnsw_ef_search(index)
    if ef is not None and ef < k:
        # HNSW keeps efSearch candidates, and faiss does not raise it to k: with efSearch 16, k = 400
        # came back a third empty. Per call, so a search racing with another keeps its own value.
        params = faiss.SearchParametersHNSW()
        params.efSearch = k
    scores, ids = index.search(queries, k, params=params)
    scores[ids < 0] = -np.inf
    return scores, ids


def _hnsw_ef_search(index: faiss.Index) -> int | None:
    """efSearch of an HNSW index (through IDMap2 and shards), None for any other kind."""
    part = shard_parts(index)[0]
    inner = faiss.downcast_index(part.index) if hasattr(part, "id_map") else part
    return int(inner.hnsw.efSearch) if hasattr(inner, "hnsw") else None


def index_ids(index: faiss.Index) -> np.ndarray:
    """All ids stored in an IDMap or IVF index, or in all shards of one (unordered), for consistency checks."""
    if isinstance(index, faiss.IndexShards):
        return np.concatenate([index_ids(part) for part in shard_parts(index)])
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    assert ivf is not None, f"cannot list the ids of {type(index).__name__}"
    inv = ivf.invlists
    parts = []
    for lst in range(ivf.nlist):
        size = inv.list_size(lst)
        if size:
            ptr = inv.get_ids(lst)
            parts.append(faiss.rev_swig_ptr(ptr, size).copy())
            inv.release_ids(lst, ptr)
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


# --- recall ------------------------------------------------------------------------------------


def exact_knn(
    queries: np.ndarray, vectors: np.ndarray, k: int, block: int = 1 << 17
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k, (scores, row numbers into `vectors`), best first.

    Blocks of the database keep memory at len(queries) * block scores whatever the collection size.
    """
    queries = np.ascontiguousarray(queries, np.float32)
    k = min(k, len(vectors))
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), block):
        s = queries @ vectors[start : start + block].T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        if best_s.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s = np.take_along_axis(best_s, keep, axis=1)
            best_i = np.take_along_axis(best_i, keep, axis=1)
    # stable sort by score then row, so ties come out in a reproducible order
    order = np.lexsort((best_i, -best_s), axis=1) if best_s.size else best_i
    return np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)


def recall_at_k(
    found_ids: np.ndarray,
    queries: np.ndarray,
    vectors: np.ndarray,
    ids: np.ndarray,
    exact_scores: np.ndarray,
    k: int,
    exclude: np.ndarray | None = None,
) -> float:
    """Mean fraction of the true top-k found, counting ties: a result counts if its true score reaches the
    k-th exact score (so duplicates in the collection cannot lower recall). `exclude` (one id per query)
    drops the query itself when database vectors are used as queries."""
    row_of = _row_lookup(ids)
    hits = 0
    for q in range(len(queries)):
        got = [i for i in found_ids[q] if i >= 0 and (exclude is None or i != exclude[q])][:k]
        if not got:
            continue
        true = vectors[row_of(np.asarray(got))] @ queries[q]
        hits += int((true >= exact_scores[q, k - 1] - 1e-5).sum())
    return hits / (k * len(queries))


def _row_lookup(ids: np.ndarray):
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]

    def rows(wanted: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(sorted_ids, wanted)
        assert (pos < len(ids)).all() and (sorted_ids[np.minimum(pos, len(ids) - 1)] == wanted).all(), (
            "index returned an id that is not in the collection"
        )
        return order[pos]

    return rows


def tune_and_measure(
    index: faiss.Index,
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    k: int = RECALL_K,
    target: float = RECALL_TARGET,
    sample: int = 500,
    seed: int = 0,
    tune: bool = True,
) -> RecallCheck:
    """Pick the cheapest search parameter reaching `target` recall@k on one sample of `sample` database
    vectors (or, if no value reaches it, the cheapest within 0.01 of the best), then measure recall@k
    with it on a second, disjoint sample; leaves the parameter set.

    Each query's own id is excluded from both the exact and the approximate results, so a photo
    finding itself does not count. With `tune=False` the index is measured with its current parameters.
    """
    t0 = time.perf_counter()
    n = len(vectors)
    if n < 2:
        return RecallCheck(k=k, target=target, recall=1.0, queries=0, seconds=0.0)
    kk = min(k, n - 1)
    picked = np.random.default_rng(seed).permutation(n)[: min(n, 2 * sample)]
    halves = (
        (picked[: len(picked) // 2], picked[len(picked) // 2 :]) if len(picked) >= 4 else (picked, picked)
    )

    def exact_without_self(rows: np.ndarray) -> np.ndarray:
        scores, found_rows = exact_knn(vectors[rows], vectors, kk + 1)
        # the query itself is normally first, but a duplicate photo may tie with it
        scores = np.where(ids[found_rows] == ids[rows][:, None], -np.inf, scores)
        return -np.sort(-scores, axis=1)[:, :kk]

    exact = [exact_without_self(rows) for rows in halves]

    def measure(which: int) -> float:
        rows = halves[which]
        _, found = search(index, vectors[rows], kk + 1)
        return recall_at_k(found, vectors[rows], vectors, ids, exact[which], kk, exclude=ids[rows])

    tunable = tunable_parameter(index) if tune else None
    params: dict[str, int] = {}
    tuning: list[dict] = []
    if tunable is not None:
        name, ladder = tunable
        if name == "efSearch":  # below k, `search` raises it to k anyway: start the ladder there
            ladder = (kk,) + tuple(v for v in ladder if v > kk) if kk > ladder[0] else ladder
        for value in ladder:
            set_search_params(index, {name: value})
            r = measure(0)
            tuning.append({name: value, "recall": round(r, 4)})
            params = {name: value}
            if r >= target:
                break
        else:
            # unreachable (lossy codes): the cheapest value within 0.01 of the best recall seen
            best = max(step["recall"] for step in tuning)
            params = {name: next(step[name] for step in tuning if step["recall"] >= best - 0.01)}
            set_search_params(index, params)
            LOG.warning("recall@%d target %.3f not reached: %.3f at most; using %s", kk, target, best, params)
        ivf = faiss.try_extract_index_ivf(shard_parts(index)[0])
        if ivf is not None and params["nprobe"] > ivf.nlist // 10:
            LOG.warning(
                "recall@%d %.2f needs %d of %d lists probed: these vectors have little cluster structure, so "
                "IVF saves little over exact search; consider --index HNSW32 or a lower --recall-target",
                kk,
                target,
                params["nprobe"],
                ivf.nlist,
            )
    recall = measure(1)
    check = RecallCheck(
        k=kk,
        target=target,
        recall=round(recall, 4),
        queries=len(halves[1]),
        params=params,
        tuning=tuning,
        seconds=round(time.perf_counter() - t0, 3),
    )
    LOG.info(
        "recall@%d = %.4f on %d sample queries with %s", kk, recall, len(halves[1]), params or "exact search"
    )
    return check
