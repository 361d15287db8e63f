"""Build throughput end to end (photos/s of `build()`, all stages) against the encoder's bare forward.

Two references for the encoder's bare forward:
- isolated: `model.encode_pixels` on already decoded and preprocessed uint8 batches held in memory, alone
  on the machine's cores, before and after the build in the same process (the mean is used): the
  ceiling if decoding, hashing, indexing and writing were free;
- in the run: the time the build itself spent inside `model.encode_pixels`, on the same batches at the
  same moments (robust to other load on a shared machine, but the forward then shares the cores with
  the decode worker, so it is a little slower than the isolated one).

    .venv/bin/python benchmarks/bench_index_build.py --photos 1000             # 640x480 JPEGs
    .venv/bin/python benchmarks/bench_index_build.py --photos 1000 --workers 0  # decode in the main process

Without --model an untrained checkpoint (EfficientNet-Lite2 + random heads) is made: the encoder's
cost is the same as a trained one's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOG = logging.getLogger("bench_index_build")


def make_checkpoint(path: Path) -> Path:
    import torch

    from model.adapter import AdapterConfig, FeatureAdapter
    from model.backbones import create_backbone
    from model.iiae import IIAE, IIAEConfig
    from model.pipeline import SBIRModel

    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite2")
    model = SBIRModel(backbone, FeatureAdapter(AdapterConfig(input_dim=backbone.dim)), IIAE(IIAEConfig()), {})
    model.save(path)
    return path


def make_photos(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """Photo-like JPEGs: smooth gradients, a few shapes, sensor-like noise (about 60-90 kB at 640x480)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(-1, 1, 3)
        base = (np.stack([a * xx / w + b * yy / h + c] * 3, axis=-1) * 80 + rng.uniform(60, 190, 3)).clip(
            0, 255
        )
        img = Image.fromarray(base.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            box = (x0, y0, x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2)))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(
                box, fill=tuple(rng.integers(0, 256, 3).tolist())
            )
        img = img.filter(ImageFilter.GaussianBlur(1.5))
        noisy = np.asarray(img, np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
        path = folder / f"photo_{i:06d}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def bare_forward(model, paths: list[Path], batch_size: int, seconds: float) -> float:
    """photos/s of model.encode_pixels on preprocessed batches already in memory."""
    import torch

    from model.images import load_image

    batch = torch.stack([model.preprocess(load_image(p)) for p in paths[:batch_size]])
    model.encode_pixels(batch[:4], "photo")  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.encode_pixels(batch, "photo")
        done += len(batch)
    return done / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=1000)
    p.add_argument("--size", default="640x480", help="photo size WxH")
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: make an untrained one)")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: the builder's)")
    p.add_argument("--threads", type=int, default=None, help="encoder threads (default: the builder's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bare-seconds", type=float, default=20.0, help="length of each bare-forward measurement")
    p.add_argument("--rounds", type=int, default=3, help="builds, each between two bare-forward measurements")
    p.add_argument(
        "--workdir", type=Path, default=None, help="keep photos and index here (default: a temp dir)"
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from index_builder.build import BuildOptions, build
    from model.pipeline import SBIRModel

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_index_build_"))
    size = tuple(int(v) for v in args.size.lower().split("x"))
    ckpt = args.model or (
        work / "model" if (work / "model" / "config.json").is_file() else make_checkpoint(work / "model")
    )
    photos = work / f"photos_{args.photos}_{args.size}"
    if not photos.is_dir() or len(list(photos.iterdir())) != args.photos:
        shutil.rmtree(photos, ignore_errors=True)
        t0 = time.perf_counter()
        make_photos(photos, args.photos, size)
        LOG.info("made %d photos in %.0fs", args.photos, time.perf_counter() - t0)
    paths = sorted(photos.iterdir())
    mean_kb = np.mean([p.stat().st_size for p in paths[:200]]) / 1024

    threads_default = torch.get_num_threads()
    model = SBIRModel.load(ckpt, device="cpu")
    opts = BuildOptions(
        workers=args.workers, threads=args.threads, batch_size=args.batch_size, progress=False
    )
    # bare, build, bare, build, ..., bare: each build is compared with the bare forward measured just
    # before and just after it, so load that comes and goes on a shared machine hits both alike
    bares = [bare_forward(model, paths, args.batch_size, args.bare_seconds)]
    rounds = []
    for r in range(args.rounds):
        root = work / "index"
        shutil.rmtree(root, ignore_errors=True)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        result = build(photos, root, ckpt, opts)
        e2e = args.photos / (time.perf_counter() - t0)
        load_after = os.getloadavg()[0]
        torch.set_num_threads(threads_default)
        bares.append(bare_forward(model, paths, args.batch_size, args.bare_seconds))
        rep = result.report
        bare = (bares[-2] + bares[-1]) / 2
        row = {
            "end_to_end_per_s": round(e2e, 2),
            "bare_forward_per_s": [round(bares[-2], 2), round(bares[-1], 2)],
            "ratio_end_to_end": round(e2e / bare, 3),
            "embed_stage_per_s": rep["embedding"]["photos_per_s"],
            "ratio_embed_stage": round(rep["embedding"]["photos_per_s"] / bare, 3),
            "forward_in_run_per_s": rep["embedding"]["forward_photos_per_s"],
            "ratio_end_to_end_vs_forward_in_run": round(e2e / rep["embedding"]["forward_photos_per_s"], 3),
            "timings": rep["timings"],
            "load_average": [round(load_before, 2), round(load_after, 2)],
        }
        rounds.append(row)
        LOG.info("round %d: %s", r + 1, json.dumps(row))
    out = {
        "photos": args.photos,
        "size": args.size,
        "mean_kb": round(mean_kb, 1),
        "workers": rep["embedding"]["workers"],
        "threads": rep["embedding"]["threads"],
        "batch_size": args.batch_size,
        "rounds": rounds,
        "median_ratio_end_to_end": float(np.median([r["ratio_end_to_end"] for r in rounds])),
        "median_ratio_vs_forward_in_run": float(
            np.median([r["ratio_end_to_end_vs_forward_in_run"] for r in rounds])
        ),
    }
    print(json.dumps(out, indent=2))
    print(
        f"\n{args.photos} photos {args.size} (~{mean_kb:.0f} kB JPEG), workers={out['workers']}, "
        f"threads={out['threads']}, batch={args.batch_size}:"
    )
    print(
        "| round | end to end photos/s | bare forward before / after | ratio | forward in the run | ratio | load avg |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(rounds, 1):
        print(
            f"| {i} | {r['end_to_end_per_s']:.2f} | {r['bare_forward_per_s'][0]:.2f} / {r['bare_forward_per_s'][1]:.2f} "
            f"| {r['ratio_end_to_end']:.3f} | {r['forward_in_run_per_s']:.2f} | "
            f"{r['ratio_end_to_end_vs_forward_in_run']:.3f} | {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f} |"
        )
    print(
        f"median ratio {out['median_ratio_end_to_end']:.3f} (isolated bare forward), "
        f"{out['median_ratio_vs_forward_in_run']:.3f} (forward in the run)"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
