"""On a host with a CUDA GPU: the encoder's batched mixed-precision throughput, the service's ratio to
it, and exact search of 1M vectors with FAISS on the GPU; one table at the end.

    python benchmarks/gpu_check.py --work /tmp/gpu_check            # about 10 minutes
    python benchmarks/gpu_check.py --work /tmp/gpu_check --json gpu.json

1. Encoder: `SBIRModel.encode_pixels` (backbone under fp16 autocast, heads in float32) on batches of
   64 and 256 preprocessed sketches, timed after a warm-up with the result copied back to the host.
2. Service: `benchmarks/bench_service.py make-index` (100k synthetic vectors, the untrained model,
   fp32: the GPU runs the backbone in float) and `run --device cuda`: 16 wrk clients (httpx if wrk is
   absent) against the bare encoder in the same run; `--max-batch 64` lets the batches grow.
3. FAISS: a 1M x 64 exact inner-product index (the builder's choice up to its exact limit is Flat)
   on the GPU, 10,000 queries at k = 24, against the same on the CPU for 1,000 queries. Skipped, and
   said so, when the installed faiss has no GPU support (faiss-cpu from PyPI has none).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def encoder_throughput(ckpt: Path, png: bytes, batches: tuple[int, ...], seconds: float) -> list[dict]:
    import torch

    from model.images import load_image
    from model.pipeline import SBIRModel

    model = SBIRModel.load(ckpt, device="cuda")
    one = model.preprocess(load_image(png))
    out = []
    for batch in batches:
        pixels = torch.stack([one] * batch).pin_memory()
        for _ in range(3):
            model.encode_pixels(pixels, "sketch")
        torch.cuda.synchronize()
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.encode_pixels(pixels, "sketch")  # numpy on the host: the batch has finished
            done += batch
        rate = done / (time.perf_counter() - start)
        out.append({"batch": batch, "images_per_s": round(rate, 1), "device": torch.cuda.get_device_name(0),
                    "runtime": model.backbone.runtime()})
    return out


def service_ratio(work: Path, seconds: float) -> dict:
    root = work / "idx100k"
    bench = [sys.executable, str(HERE / "bench_service.py")]
    if not (root / "CURRENT").is_file():
        subprocess.run([*bench, "make-index", "--out", str(root), "--photos", "100000", "--cpu-precision", "fp32",
                        "--model", str(work / "untrained-model")], check=True)
    out = work / "service.json"
    subprocess.run([*bench, "run", "--root", str(root), "--device", "cuda", "--max-batch", "64",
                    "--round-seconds", str(seconds), "--json", str(out)], check=True)
    report = json.loads(out.read_text())
    return {**report["summary"], "single_client_latency_ms": report["single_client"]["latency_ms"],
            "load_generator": report["load_generator"]}


def faiss_search(n: int, dim: int, queries: int, k: int) -> dict:
    import faiss

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((n, dim), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.integers(0, n, queries)]
    cpu = faiss.IndexFlatIP(dim)
    cpu.add(xb)
    few = xq[: min(1000, queries)]
    start = time.perf_counter()
    _, cpu_ids = cpu.search(few, k)
    result = {"vectors": n, "dim": dim, "k": k,
              "cpu_queries_per_s": round(len(few) / (time.perf_counter() - start), 1)}
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return result | {"gpu": "skipped: this faiss has no GPU support (install faiss-gpu to measure it)"}
    res = faiss.StandardGpuResources()
    gpu = faiss.index_cpu_to_gpu(res, 0, cpu)
    gpu.search(xq[:100], k)  # warm-up
    start = time.perf_counter()
    _, gpu_ids = gpu.search(xq, k)
    seconds = time.perf_counter() - start
    agree = float(np.mean(gpu_ids[: len(few), 0] == cpu_ids[:, 0]))
    return result | {"gpu_queries": queries, "gpu_seconds": round(seconds, 3),
                     "gpu_queries_per_s": round(queries / seconds, 1), "top1_agreement_with_cpu": agree}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (model, index, reports)")
    ap.add_argument("--seconds", type=float, default=10, help="per encoder measurement and service round")
    ap.add_argument("--skip-service", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; nothing measured", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    from bench_service import sketch_png, untrained_checkpoint

    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = untrained_checkpoint(args.work / "untrained-model")
    report = {"encoder": encoder_throughput(ckpt, sketch_png(), (64, 256), args.seconds)}
    if not args.skip_service:
        report["service"] = service_ratio(args.work, args.seconds)
    report["faiss"] = faiss_search(1_000_000, 64, 10_000, 24)
    rows = [(f"encoder, batch {e['batch']} (fp16 autocast)", f"{e['images_per_s']} images/s", e["device"])
            for e in report["encoder"]]
    if "service" in report:
        s = report["service"]
        rows += [("service, 16 clients", f"{s['service_rps']} requests/s",
                  f"ratio {s['throughput_ratio']} to the bare encoder ({s['bare_images_per_s']} images/s, batch 64)"),
                 ("service, 1 client", f"p50 {s['single_client_latency_ms']['p50']} ms",
                  f"p99 {s['single_client_latency_ms']['p99']} ms")]
    f = report["faiss"]
    rows.append(("FAISS exact, 1M x 64, CPU", f"{f['cpu_queries_per_s']} queries/s", "1,000 queries, k 24"))
    rows.append(("FAISS exact, 1M x 64, GPU", f"{f['gpu_queries_per_s']} queries/s" if "gpu_seconds" in f
                 else "skipped", f"top-1 = CPU's for {f['top1_agreement_with_cpu']:.3f}" if "gpu_seconds" in f
                 else f["gpu"]))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}} | result | note")
    for name, value, note in rows:
        print(f"{name:<{width}} | {value} | {note}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
