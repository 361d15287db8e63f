"""The served model's first stage: exact search against FAISS's cheaper kinds, on a snapshot's own rows.

A re-ranking model asks the index for its top `rerank.top` (400) candidates and orders them by the
second stage. For each first stage this reports the CPU a batch of 8 queries costs (one thread, as the
service's batcher runs it, after reading 64 MB so that the scan starts from memory as it does between
two forwards), recall of the exact top 400, and what the served answer keeps: the share of its top 24
and how often its first result is the exact first stage's.

    .venv/bin/python benchmarks/bench_service.py make-index --out /tmp/bt/int8m --photos 100000 \\
        --cpu-precision int8 --model runs/demo/model
    .venv/bin/python benchmarks/bench_first_stage.py --root /tmp/bt/int8m

Queries are stored rows with Gaussian noise (--noise per coordinate), each part made a unit vector
again, so that each has a true neighbourhood in the collection. The exact row is the service's own
path (`Snapshot.search`'s first and second stages); "torch GEMM + topk" is the exact scan written as
one matrix product and a top-k in torch on one thread (for its cost only: the same candidates).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH = 8
SERVED_K = 24
# (factory, the search parameter's values to try); None: exact, nothing to tune
DEFAULT_KINDS = (
    ("Flat", None),
    ("SQfp16", None),
    ("IVF1024,Flat", {"nprobe": (8, 32, 128, 256)}),
    ("HNSW32", {"efSearch": (512, 1024)}),
)


def shared(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of `truth` that the same row of `found` holds."""
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth, strict=True)]))


def main(argv=None) -> int:
    import faiss
    import torch

    from index_builder import faiss_index
    from index_builder.snapshot import Snapshot
    from model.rerank import rerank, split_rows, unit_parts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="a snapshot root whose model re-ranks")
    p.add_argument("--queries", type=int, default=400)
    p.add_argument("--noise", type=float, default=0.06)
    p.add_argument("--rounds", type=int, default=3, help="timing rounds of 10 batches; the median is kept")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)

    snap = Snapshot.open(args.root)
    if snap.rerank is None:
        raise SystemExit(f"{args.root}: the snapshot's model does not re-rank")
    depth, sd = snap.rerank.top, snap.search_dim
    folder = args.root / "snapshots" / snap.id
    vectors = np.load(folder / "vectors.npy", mmap_mode="r")
    ids = np.load(folder / "ids.npy")
    zs = np.ascontiguousarray(vectors[:, :sd])
    rng = np.random.default_rng(1)
    source = rng.choice(len(vectors), args.queries, replace=False)
    queries = np.array(vectors[np.sort(source)], dtype=np.float32)
    queries += rng.normal(0, args.noise, queries.shape).astype(np.float32)
    for part in unit_parts(queries, sd, snap.rerank):  # each part a unit vector again, as rows are
        part /= np.linalg.norm(part, axis=1, keepdims=True)
    cosine = float(np.mean(np.sum(queries[:, :sd] * vectors[np.sort(source), :sd], axis=1)))
    junk = np.ones(64 << 18, np.float32)

    def served(first, cand):
        return rerank(cand, first, snap.second_stage(split_rows(queries, sd)[1], cand), snap.rerank.share, SERVED_K)[1]

    def torch_exact(q: np.ndarray, k: int):
        scores, rows = torch.topk(torch.from_numpy(q) @ torch.from_numpy(zs).T, k, dim=1)
        return scores.numpy(), ids[rows.numpy()]

    exact_first, exact_cand = snap.first_stage(queries[:, :sd], depth)
    exact_served = served(exact_first, exact_cand)

    def measure(label: str, search) -> dict:
        first, cand = search(queries[:, :sd], depth)
        answer = served(first, cand)
        times = []
        for _ in range(args.rounds):
            spent = 0.0
            for b in range(0, 10 * BATCH, BATCH):
                junk.sum()  # empty the caches of the last batch's scan
                t0 = time.thread_time()
                search(queries[b : b + BATCH, :sd], depth)
                spent += time.thread_time() - t0
            times.append(spent / 10 * 1e3)
        row = {
            "first_stage": label,
            "cpu_ms_per_batch": round(float(np.median(times)), 2),
            "recall_at_depth": round(shared(cand, exact_cand), 4),
            "served_top_shared": round(shared(answer, exact_served), 4),
            "served_first_same": round(float(np.mean(answer[:, 0] == exact_served[:, 0])), 4),
        }
        print(json.dumps(row), flush=True)
        return row

    rows = [measure("exact (the snapshot's index, as served)", snap.first_stage),
            measure("exact, torch GEMM + topk", torch_exact)]
    for factory, ladder in DEFAULT_KINDS:
        index = faiss_index.build_index(zs, ids, factory)
        search = lambda q, k, index=index: faiss_index.search(index, q, k)  # noqa: E731
        if ladder is None:
            rows.append(measure(f"`{factory}`", search))
            continue
        (name, values), = ladder.items()
        for value in values:
            faiss_index.set_search_params(index, {name: value})
            rows.append(measure(f"`{factory}`, {name} {value}", search))

    print(f"\n{snap.count} photos, {sd}-d zs, top {depth}, batches of {BATCH}, {args.queries} queries "
          f"(cosine {cosine:.2f} to their source), one thread, median of {args.rounds} rounds\n")
    print(f"| first stage | CPU a batch of {BATCH} (ms) | recall@{depth} | served top {SERVED_K} shared | served top 1 the same |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['first_stage']} | {r['cpu_ms_per_batch']} | {r['recall_at_depth']} | "
              f"{r['served_top_shared']} | {r['served_first_same']} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
