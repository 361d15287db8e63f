"""Sharded snapshots: time to publish N synthetic vectors in 1, 2 and 4 shards, then search QPS and
recall@10 of each published snapshot as the service opens it (`Snapshot.open`, `Snapshot.search`).

The index stage is the builder's own (`shard_plan`: per-shard index choice and --shards; the shards
built in parallel threads; tuned to recall@10 0.95; `SnapshotWriter` writes, fsyncs and publishes);
only the embeddings are synthetic (bench_index_search.synthetic: clustered unit vectors).

    .venv/bin/python benchmarks/bench_shards.py --n 1000000 --shards 1 2 4
    .venv/bin/python benchmarks/bench_shards.py --n 1000000 --shards 1 2 --index Flat   # exact
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_index_build import make_checkpoint  # noqa: E402
from bench_index_search import synthetic  # noqa: E402

LOG = logging.getLogger("bench_shards")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--index", default="auto", help="faiss factory for every shard, or auto (the builder's choice)"
    )
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=5.0, help="length of each single-query measurement")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    LOG.setLevel(logging.INFO)

    from index_builder import faiss_index
    from index_builder.build import BuildOptions, build_sharded_index, shard_plan
    from index_builder.snapshot import Snapshot, SnapshotWriter
    from model.pipeline import checkpoint_sha256

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_shards_"))
    ckpt = work / "model" if (work / "model" / "config.json").is_file() else make_checkpoint(work / "model")
    sha = checkpoint_sha256(ckpt)
    vectors = synthetic(args.n, args.dim, "clustered", 10_000, 0.1, seed=0)
    ids = np.arange(args.n, dtype=np.int64) * 7 + 3
    rows = [(int(i), f"p{i}", f"/photos/p{i}.jpg", hashlib.sha256(b"%d" % i).hexdigest(), "{}") for i in ids]
    queries = synthetic(args.queries, args.dim, "clustered", 10_000, 0.1, seed=99)
    _, exact_rows = faiss_index.exact_knn(queries, vectors, 10)
    exact = ids[exact_rows]
    exact_scores = np.einsum("qd,qkd->qk", queries, vectors[exact_rows])

    results = []
    for n_shards in args.shards:
        root = work / f"index-{n_shards}"
        shutil.rmtree(root, ignore_errors=True)
        opt = BuildOptions(shards=n_shards, index=args.index)
        t0 = time.perf_counter()
        count, reason, plan = shard_plan(ids, args.dim, opt)
        index = build_sharded_index(vectors, ids, plan.factory, count)
        t_index = time.perf_counter() - t0
        recall = faiss_index.tune_and_measure(index, vectors, ids)
        t_recall = time.perf_counter() - t0 - t_index
        manifest = {
            "dim": args.dim,
            "count": args.n,
            "metric": "inner_product",
            "model": {"sha256": sha},
            "index": {"factory": plan.factory, "search_params": recall.params, "recall": recall.to_dict()},
        }
        writer = SnapshotWriter(root)
        writer.publish(
            writer.write(
                index=index,
                ids=ids,
                vectors=vectors,
                photo_rows=rows,
                model_dir=ckpt,
                manifest=manifest,
                report={},
            )
        )
        t_publish = time.perf_counter() - t0
        del index
        with Snapshot.open(root) as snap:
            _, found = snap.search(queries, 10)
            hits = 0
            for q in range(len(queries)):  # a hit reaches the exact 10th score (ties count)
                got = found[q][found[q] >= 0]
                scores = vectors[(got - 3) // 7] @ queries[q]
                hits += int((scores >= exact_scores[q, 9] - 1e-5).sum())
            fresh_recall = hits / (10 * len(queries))
            done, t1 = 0, time.perf_counter()
            while done < len(queries) and time.perf_counter() - t1 < args.seconds:
                snap.search(queries[done : done + 1], 10)
                done += 1
            single_qps = done / (time.perf_counter() - t1)
            t1 = time.perf_counter()
            snap.search(queries, 10)
            batched_qps = len(queries) / (time.perf_counter() - t1)
        row = {
            "shards": n_shards,
            "factory": plan.factory,
            "params": recall.params,
            "index_s": round(t_index, 1),
            "tune_s": round(t_recall, 1),
            "publish_s": round(t_publish, 1),
            "recall_build_sample": recall.recall,
            "recall_fresh": round(fresh_recall, 4),
            "single_qps": round(single_qps, 1),
            "batched_qps": round(batched_qps, 1),
            "exact_agree": float(
                np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True)])
            ),
        }
        results.append(row)
        LOG.info("%s", row)
        shutil.rmtree(root, ignore_errors=True)

    print(f"{args.n} x {args.dim}-d clustered vectors")
    print(
        "| shards | factory per shard | search | index s | tune s | publish s (all) | recall@10 fresh | "
        "single QPS | batched QPS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['shards']} | `{r['factory']}` | {r['params'] or 'exact'} | {r['index_s']} | {r['tune_s']} | "
            f"{r['publish_s']} | {r['recall_fresh']:.3f} | {r['single_qps']} | {r['batched_qps']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
