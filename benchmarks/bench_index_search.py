"""Search benchmark for every index kind the builder can choose, on synthetic unit vectors.

For each kind: build time, the search parameter the builder's tuning picks for recall@k >= target,
recall@k on fresh queries against exact search, single-query and batched QPS, bytes per vector.
`--tune-k` tunes at another depth than the one searched and measured (`--k`): `--k 400 --tune-k 10`
is a re-ranking model's first stage (400 candidates) searched with a parameter tuned for the top 10.

    .venv/bin/python benchmarks/bench_index_search.py                       # 1M x 64-d, clustered
    .venv/bin/python benchmarks/bench_index_search.py --data uniform        # the structureless worst case
    .venv/bin/python benchmarks/bench_index_search.py --n 100000 --kinds auto,flat
    .venv/bin/python benchmarks/bench_index_search.py --n 300000 --dim 128 --k 400 --tune-k 10

Data: `clustered` draws each vector around one of --clusters random unit centres with Gaussian noise
of --noise per coordinate, then normalises (a stand-in for embeddings of photos of many classes);
`uniform` is uniform on the sphere. Queries are fresh draws from the same distribution.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index_builder import faiss_index as fi  # noqa: E402

LOG = logging.getLogger("bench_index_search")


def synthetic(n: int, dim: int, data: str, clusters: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    if data == "clustered":
        centres = np.random.default_rng(12345).standard_normal((clusters, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for start in range(0, n, 1 << 18):
        m = min(1 << 18, n - start)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        if data == "clustered":
            x = centres[rng.integers(0, clusters, m)] + noise * x
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def factories(n: int, dim: int, kinds: list[str]) -> list[tuple[str, str]]:
    """(label, factory) for each kind, as the builder's own rules would spell it."""
    out = []
    for kind in kinds:
        if kind == "auto":
            plan = fi.choose_factory(n, dim)
            out.append((f"auto ({plan.kind})", plan.factory))
        elif kind == "flat":
            out.append(("flat (exact)", "Flat"))
        elif kind == "ivf-flat":
            out.append(("ivf-flat", fi.choose_factory(n, dim, memory_budget=1 << 40, exact_max=0).factory))
        elif kind == "ivf-sq8":
            budget = int(n * (dim + fi.ID_BYTES) * 1.2)
            out.append(("ivf-sq8", fi.choose_factory(n, dim, memory_budget=budget, exact_max=0).factory))
        elif kind == "ivf-pq":
            budget = int(n * (dim // 4 + fi.ID_BYTES) * 1.05)  # room for dim/4 one-byte codes
            out.append(("ivf-pq", fi.choose_factory(n, dim, memory_budget=budget, exact_max=0).factory))
        elif kind == "hnsw":
            out.append(("hnsw (explicit only)", "HNSW32"))
        else:
            raise SystemExit(f"unknown kind {kind}")
    return out


def single_query_qps(index, queries: np.ndarray, k: int, seconds: float) -> tuple[float, float]:
    """One query per call on one thread, as a server thread answering one request does.

    Returns (queries per wall second, queries per CPU second of this process): the second does not
    depend on what else runs on the machine.
    """
    threads = fi.faiss.omp_get_max_threads()
    fi.faiss.omp_set_num_threads(1)
    try:
        done, t0, c0 = 0, time.perf_counter(), time.process_time()
        while done < len(queries) and time.perf_counter() - t0 < seconds:
            index.search(queries[done : done + 1], k)
            done += 1
        return done / (time.perf_counter() - t0), done / max(1e-9, time.process_time() - c0)
    finally:
        fi.faiss.omp_set_num_threads(threads)


def batched_qps(index, queries: np.ndarray, k: int) -> float:
    """All queries in one call, on all of faiss's threads."""
    t0 = time.perf_counter()
    index.search(queries, k)
    return len(queries) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    p.add_argument("--clusters", type=int, default=10_000)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10, help="depth searched and measured")
    p.add_argument("--tune-k", type=int, default=None, help="depth the search parameter is tuned at (default: --k)")
    p.add_argument("--target", type=float, default=fi.RECALL_TARGET)
    p.add_argument("--kinds", default="auto,flat,ivf-flat,ivf-sq8,ivf-pq,hnsw")
    p.add_argument("--single-seconds", type=float, default=20.0, help="time cap of the single-query loop")
    p.add_argument("--threads", type=int, default=None, help="faiss threads for building and batched search")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        fi.faiss.omp_set_num_threads(args.threads)

    t0 = time.perf_counter()
    xb = synthetic(args.n, args.dim, args.data, args.clusters, args.noise, seed=0)
    xq = synthetic(args.queries, args.dim, args.data, args.clusters, args.noise, seed=1)
    ids = np.arange(args.n, dtype=np.int64)
    LOG.info("data %s: %d x %d in %.1fs", args.data, args.n, args.dim, time.perf_counter() - t0)
    t0 = time.perf_counter()
    _, truth = fi.exact_knn(xq, xb, args.k)
    LOG.info("exact ground truth for %d queries in %.1fs", len(xq), time.perf_counter() - t0)

    tk = args.tune_k or args.k  # the depth the parameter is tuned at
    results = []
    flat_single = None
    for label, factory in factories(args.n, args.dim, args.kinds.split(",")):
        LOG.info("building %s: %s", label, factory)
        t0 = time.perf_counter()
        index = fi.build_index(xb, ids, factory)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        check = fi.tune_and_measure(index, xb, ids, k=tk, target=args.target)
        tune_s = time.perf_counter() - t0
        _, found = index.search(xq, args.k)
        recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, truth, strict=True)]))
        single, single_cpu = single_query_qps(index, xq, args.k, args.single_seconds)
        batched = batched_qps(index, xq, args.k)
        nbytes = len(__import__("faiss").serialize_index(index))
        row = {
            "kind": label,
            "factory": factory,
            "params": check.params,
            "build_s": round(build_s, 1),
            "tune_s": round(tune_s, 1),
            "recall_at_k_build_sample": check.recall,
            "recall_at_k": round(recall, 4),
            "single_qps": round(single, 1),
            "single_qps_per_cpu_s": round(single_cpu, 1),
            "batched_qps": round(batched, 1),
            "bytes_per_vector": round(nbytes / args.n, 1),
        }
        if factory == "Flat":
            flat_single = single, single_cpu
        results.append(row)
        LOG.info("%s", json.dumps(row))
        del index
    for row in results:
        if flat_single:
            row["single_speedup_vs_exact"] = round(row["single_qps"] / flat_single[0], 1)
            row["single_speedup_vs_exact_cpu"] = round(row["single_qps_per_cpu_s"] / flat_single[1], 1)

    print(
        f"\n{args.n} x {args.dim}-d, data={args.data}"
        + (f" (clusters={args.clusters}, noise={args.noise})" if args.data == "clustered" else "")
        + f", {args.queries} queries, k={args.k}, tuned at k={tk}, faiss threads={fi.faiss.omp_get_max_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        f"| kind | factory | search params | build s | recall@{tk} build sample | recall@{args.k} fresh queries "
        "| single QPS (wall) | single QPS per CPU s | x exact (wall / CPU) | batched QPS | bytes/vector |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        speedup = f"{r.get('single_speedup_vs_exact', '-')} / {r.get('single_speedup_vs_exact_cpu', '-')}"
        print(
            f"| {r['kind']} | `{r['factory']}` | {params} | {r['build_s']} | {r['recall_at_k_build_sample']:.3f} "
            f"| {r['recall_at_k']:.3f} | {r['single_qps']:.0f} | {r['single_qps_per_cpu_s']:.0f} | {speedup} "
            f"| {r['batched_qps']:.0f} | {r['bytes_per_vector']} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
