"""Which layers of the int8 backbone lose most: float32 against int8 features, per tap and per style.

    python benchmarks/int8_sensitivity.py data/emoji --per-group 24 --json sens.json

Exports the backbone's float32 graph (as `create_backbone` does), takes up to `--per-group` images of
classes the split does not train on (validation and unseen) from every (domain, artist) group of the manifest (sketches also
stroke-normalised, OpenMoji's photos also as edge maps), and runs them through the float32 graph
and through int8 graphs quantized from the registry's calibration ranges (model/calibration/) with
different sets of nodes kept in float32 (`--candidates`). For each candidate it prints the mean
relative error |int8 - fp32| / |fp32| of every pooled tap (blocks 14, 19, 20 and the head for
`efficientnet_lite2_ms`) and of the whole feature, per image group, and the single-threaded CPU
time per image of the float32 graph over the int8 one. No label is read: only how far the features
move. A candidate is `all-int8`, `shipped` (model.quantize.FLOAT_NODES) or `blocks:A-B` (the stem
is block -1; e.g. `blocks:-1-1` keeps the stem and blocks 0 and 1 in float32).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def block_of(node: str) -> int | None:
    """-1 for the stem, the block's index, 99 for the head; None for the normalisation and pooling."""
    if "/_blocks." in node:
        return int(node.split("/_blocks.")[1].split("/")[0])
    if node in ("/net/_conv_stem/Conv", "/net/_swish/Clip"):
        return -1
    if node in ("/net/_conv_head/Conv", "/net/_swish_1/Clip"):
        return 99
    return None


def float_nodes_of(candidate: str, nodes: list[str]) -> list[str]:
    from model.quantize import FLOAT_NODES

    if candidate == "all-int8":
        return []
    if candidate == "shipped":
        return list(FLOAT_NODES)
    if candidate.startswith("blocks:"):
        lo, _, hi = candidate[len("blocks:"):].rpartition("-")  # "-1-1": the stem to block 1
        lo, hi = int(lo), int(hi)
        return [n for n in nodes if block_of(n) is not None and lo <= block_of(n) <= hi]
    raise SystemExit(f"unknown candidate {candidate!r}: all-int8, shipped or blocks:A-B")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--backbone", default="efficientnet_lite2_ms")
    ap.add_argument("--split", default="category_seed0",
                    help="the images looked at are of classes it does not train on (validation and unseen)")
    ap.add_argument("--per-group", type=int, default=24)
    ap.add_argument("--candidates", nargs="+", default=["all-int8", "shipped", "blocks:-1-0", "blocks:-1-2",
                                                        "blocks:3-9", "blocks:10-16", "blocks:17-99"])
    ap.add_argument("--speed-images", type=int, default=24)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import quantize_static

    from model.backbones import create_backbone, export_onnx
    from model.data.dataset import load_split, read_manifest, resolve_path
    from model.features import EDGE_VIEW, NORM_VIEW, render_view
    from model.images import load_image
    from model.quantize import (
        _method,
        _preprocess,
        _quantize_kwargs,
        _quiet,
        calibration_file,
        read_calibration,
    )

    backbone = create_backbone(args.backbone, cpu_runtime="torch", cpu_precision="fp32")
    calibration = read_calibration(calibration_file(backbone.spec.int8_calibration))
    taps = getattr(backbone.net, "taps", ())
    widths = [backbone.net.net._blocks[t]._project_conv.out_channels for t in taps]
    names = [f"block {t}" for t in taps] + ["head"]
    bounds = np.cumsum([0, *widths, backbone.dim - sum(widths)])

    records = read_manifest(args.dataset)
    split = load_split(args.dataset, args.split)
    unseen = set(split.val) | set(split.unseen)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        if r.category in unseen:
            groups.setdefault(f"{r.domain}/{r.artist}", []).append(i)
    rng = random.Random(0)
    items: list[tuple[int, int, str]] = []
    for key, idx in sorted(groups.items()):
        for i in sorted(rng.sample(idx, min(args.per_group, len(idx)))):
            items.append((i, 0, key))
            if key.startswith("sketch/"):
                items.append((i, NORM_VIEW, key + " (normalised)"))
            if key == "photo/openmoji":
                items.append((i, EDGE_VIEW, "photo/openmoji (edge map)"))
    pixels = np.stack([
        backbone.preprocess(render_view(load_image(resolve_path(args.dataset, records[i])), i, v, 0)).numpy()
        for i, v, _ in items
    ]).astype(np.float32)
    labels = np.array([g for _, _, g in items])
    print(f"{len(items)} images of classes {args.split} does not train on, {len(set(labels))} groups", flush=True)

    def session(path: Path, threads: int):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def features(path: Path) -> np.ndarray:
        s = session(path, 2)
        return np.concatenate([s.run(None, {"pixels": pixels[i:i + 16]})[0] for i in range(0, len(pixels), 16)])

    def cpu_per_image(path: Path) -> float:
        s = session(path, 1)
        s.run(None, {"pixels": pixels[:1]})
        t0 = time.process_time()
        for i in range(args.speed_images):
            s.run(None, {"pixels": pixels[i:i + 1]})
        return (time.process_time() - t0) / args.speed_images

    def rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)

    results = []
    with tempfile.TemporaryDirectory(prefix="sbir-sensitivity-") as tmp_name:
        tmp = Path(tmp_name)
        graph = export_onnx(backbone.net, backbone.image_size, backbone.spec.mean, backbone.spec.std)
        pre = _preprocess(graph, tmp)
        nodes = [n.name for n in onnx.load(str(pre)).graph.node]
        ranges = tmp / "ranges.json"
        ranges.write_text(json.dumps(calibration["ranges"]))
        ref, ref_cpu = features(pre), cpu_per_image(pre)
        for candidate in args.candidates:
            keep = float_nodes_of(candidate, nodes)
            out = tmp / "int8.onnx"
            with _quiet():
                quantize_static(str(pre), str(out), None, calibrate_method=_method(calibration["recipe"]["method"]),
                                calibration_cache_path=str(ranges), **_quantize_kwargs(keep))
            got = features(out)
            row = {"candidate": candidate, "float_nodes": len(keep),
                   "taps": {n: float(rel(ref[:, lo:hi], got[:, lo:hi]).mean())
                            for n, lo, hi in zip(names, bounds[:-1], bounds[1:], strict=True)},
                   "all": float(rel(ref, got).mean()),
                   "groups": {g: float(rel(ref[labels == g], got[labels == g]).mean()) for g in sorted(set(labels))},
                   "cpu_speedup": ref_cpu / cpu_per_image(out)}
            results.append(row)
            print(f"{candidate} ({len(keep)} nodes in float32): relative error "
                  + ", ".join(f"{n} {v:.4f}" for n, v in row["taps"].items())
                  + f", all {row['all']:.4f}; fp32 / int8 CPU time per image {row['cpu_speedup']:.2f}", flush=True)
            print("    " + ", ".join(f"{g} {v:.3f}" for g, v in row["groups"].items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"backbone": args.backbone, "split": args.split, "images": len(items),
                                         "calibration": calibration["recipe"], "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
