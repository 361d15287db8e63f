"""Choosing the served second stage (model/rerank.py) on validation classes only.

For selection-phase runs (`sbir train --no-refit`: their validation classes were never trained on),
scores every (second representation, R, w, u) of a small grid on the validation tasks of
`sbir eval --on val` (category, instance and the training style sets' tasks; held-out styles and
edge maps are never computed) and prints P@1 / mAP per task and the mean mAP over tasks and runs:
the rule docs/BENCHMARKS.md ("Served re-ranking") chose the default by. `w` is the second
representation's share of the score, `u` the standardised backbone features' (the adapter's own
per-domain statistics, as the served rows have them).

    python benchmarks/rerank_selection.py data/emoji --runs runs/sel/s0G runs/sel/s1G
    python benchmarks/rerank_selection.py data/emoji --runs runs/sel/s0F runs/sel/s1F   # Tabler left out
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from model.data.dataset import Split, read_manifest
from model.evaluate import _encoders, _task_rows
from model.features import FeatureSet
from model.metrics import evaluate_scored
from model.rerank import RerankConfig, rerank_matrix


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--features", type=Path, help="default: DATASET/features/efficientnet_lite2_ms")
    ap.add_argument("--top", type=int, nargs="+", default=[200, 400])
    ap.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--raw-weights", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    args = ap.parse_args()
    records = read_manifest(args.dataset)
    fs = FeatureSet.load(args.features or args.dataset / "features" / "efficientnet_lite2_ms")
    fs_raw = fs.for_sketches(records, False)
    feats = torch.from_numpy(fs_raw.feats).float()
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for run in args.runs:
        model, enc = _encoders(run, fs_raw, records)
        split = Split.from_json(model.config["training"]["split"])
        for task, (q, g, ql, gl) in _task_rows(fs_raw, records, split, False, seed=0, on="val").items():
            if task == "category_cross_artist":
                continue
            mkey = "mAP@100" if task.endswith("/instance") else "mAP@all"
            with torch.no_grad():
                emb = {m: (unit(np.asarray(enc[m](feats[q], "sketch"))), unit(np.asarray(enc[m](feats[g], "photo"))))
                       for m in ("iiae", "adapter", "infonce") if m in enc}
                emb["raw"] = tuple(unit(model.adapter.standardise(feats[rows], d).numpy())
                                   for rows, d in ((q, "sketch"), (g, "photo")))
            first = emb["iiae"][0] @ emb["iiae"][1].T
            raw = emb["raw"][0] @ emb["raw"][1].T
            variants = {"none (IIAE zs alone)": lambda sl, f=first: f[sl]}
            for vec in ("infonce", "adapter"):
                if vec not in emb:
                    continue
                second = emb[vec][0] @ emb[vec][1].T
                for top in args.top:
                    for w in args.weights:
                        for u in args.raw_weights:
                            if w + u > 1.0 + 1e-9:
                                continue
                            # the two cosines' mean as rerank_matrix's second score (second_scores does
                            # this on rows); dims are not read here
                            cfg = RerankConfig("adapter", 1, top, w, u, 1 if u else 0)
                            mixed = (w * second + u * raw) / cfg.share if cfg.share else second
                            variants[f"{vec} R={top} w={w} u={u}"] = (
                                lambda sl, f=first, s=mixed, c=cfg: rerank_matrix(f[sl], s[sl], c))
            for name, scores_of in variants.items():
                rep = evaluate_scored(scores_of, ql, gl, ks=(1,), map_ks=(100,))
                m = rep.map_at[100] if mkey == "mAP@100" else rep.map_all
                results.setdefault(name, {}).setdefault(task, []).append((rep.precision[1], m))
    tasks = list(next(iter(results.values())))
    print("| second stage | " + " | ".join(f"{t} P@1 / mAP" for t in tasks) + " | mean mAP |")
    print("|---" * (len(tasks) + 2) + "|")
    ranked = sorted(results.items(), key=lambda kv: -np.mean([v[1] for t in kv[1].values() for v in t]))
    for name, per_task in ranked:
        cells = [f"{np.mean([v[0] for v in per_task[t]]):.3f} / {np.mean([v[1] for v in per_task[t]]):.3f}"
                 for t in tasks]
        mean = np.mean([v[1] for t in per_task.values() for v in t])
        print(f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} |")


if __name__ == "__main__":
    main()
