"""Feature extraction throughput against the backbone's bare forward on the same batches, fp32 and int8.

    python benchmarks/bench_features.py data/emoji --images 640 --workers 1 --rounds 3

Runs `model.features.extract_features` (decode + augment + preprocess in worker processes, backbone
in the main process) on a sample of the dataset, and reports images/s end to end, images/s of the
backbone forward alone (timed inside the same run, on the same batches) and their ratio, for each
CPU precision (`--precisions fp32 int8`) in alternating rounds, so that both see the same background
load; then int8's speed-up over fp32 per round. The main process's CPU seconds per image are
reported too: on shared cores they depend less on what the neighbours do than wall-clock rates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model.backbones import create_backbone
from model.data.dataset import read_manifest
from model.features import extract_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--workers", type=int, nargs="+", default=[1])
    ap.add_argument("--backbone", default="efficientnet_lite2")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds over the precisions")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    records = read_manifest(args.dataset)
    rng = np.random.default_rng(0)
    sample = [
        records[i] for i in sorted(rng.choice(len(records), min(args.images, len(records)), replace=False))
    ]
    backbones = {p: create_backbone(args.backbone, cpu_precision=p) for p in args.precisions}
    print(
        f"backbone {args.backbone}, {len(sample)} images (sketches: original + 1 augmented render), "
        f"torch threads {torch.get_num_threads()}"
    )
    runs: list[dict] = []
    for rnd, workers in ((r, w) for r in range(args.rounds) for w in args.workers):
        for precision, backbone in backbones.items():
            with tempfile.TemporaryDirectory() as tmp:
                cpu0 = time.process_time()
                fs = extract_features(
                    args.dataset, sample, backbone, Path(tmp), sketch_views=1, edge_artists=(),
                    batch_size=args.batch_size, workers=workers, progress=False,
                )
                cpu = time.process_time() - cpu0
            sp = fs.meta["speed"] | {"precision": precision, "round": rnd,
                                     "main_cpu_s_per_image": round(cpu / fs.meta["speed"]["images"], 4)}
            runs.append(sp)
            print(
                f"round {rnd}, workers={workers}, {precision} ({sp['runtime']}): pipeline {sp['images_per_s']} img/s, bare forward "
                f"{sp['bare_forward_images_per_s']} img/s, ratio {sp['ratio_to_bare_forward']}, "
                f"{sp['main_cpu_s_per_image'] * 1000:.1f} ms CPU/img"
            )
    summary: dict = {"backbone": args.backbone, "images": len(sample), "runs": runs}
    if {"fp32", "int8"} <= set(args.precisions):
        def per_round(key: str, invert: bool = False) -> list[float]:
            """int8 / fp32 of `key` in each (round, workers) pair, in run order."""
            by = {(r["round"], r["workers"], r["precision"]): r[key] for r in runs}
            pairs = [(rnd, w) for rnd in range(args.rounds) for w in args.workers]
            return [round(by[(*p, "fp32")] / by[(*p, "int8")] if invert else by[(*p, "int8")] / by[(*p, "fp32")], 3)
                    for p in pairs]

        summary["int8_over_fp32"] = {
            "bare_forward": per_round("bare_forward_images_per_s"),
            "end_to_end": per_round("images_per_s"),
            "main_cpu_per_image": per_round("main_cpu_s_per_image", invert=True),
        }
        for key, values in summary["int8_over_fp32"].items():
            print(f"int8 / fp32, {key}: {values} (mean {statistics.mean(values):.2f})")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
