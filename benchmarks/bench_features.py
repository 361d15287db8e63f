"""Feature extraction throughput against the backbone's bare forward on the same batches.

    python benchmarks/bench_features.py data/emoji --images 640 --workers 1

Runs `model.features.extract_features` (decode + augment + preprocess in worker processes, backbone
in the main process) on a sample of the dataset, and reports images/s end to end, images/s of the
backbone forward alone (timed inside the same run, on the same batches) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
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
    args = ap.parse_args()
    records = read_manifest(args.dataset)
    rng = np.random.default_rng(0)
    sample = [
        records[i] for i in sorted(rng.choice(len(records), min(args.images, len(records)), replace=False))
    ]
    backbone = create_backbone(args.backbone)
    print(
        f"backbone {args.backbone}, {len(sample)} images (sketches: original + 1 augmented render), "
        f"torch threads {torch.get_num_threads()}"
    )
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            fs = extract_features(
                args.dataset,
                sample,
                backbone,
                Path(tmp),
                sketch_views=1,
                edge_artists=(),
                batch_size=args.batch_size,
                workers=workers,
                progress=False,
            )
        sp = fs.meta["speed"]
        print(json.dumps(sp))
        print(
            f"workers={workers}: pipeline {sp['images_per_s']} img/s, bare forward "
            f"{sp['bare_forward_images_per_s']} img/s, ratio {sp['ratio_to_bare_forward']}"
        )


if __name__ == "__main__":
    main()
