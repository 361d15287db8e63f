"""On a host with a CUDA GPU: the encoder's batched mixed-precision throughput, the service's ratio to
it, and exact search of 1M vectors with FAISS on the GPU; one table at the end.

    python benchmarks/gpu_check.py --work /tmp/gpu_check            # about 5 minutes
    python benchmarks/gpu_check.py --work /tmp/gpu_check --json gpu.json \
        --accuracy-set /tmp/gpu_set                                 # and the fp16 ranking check

    # once, on a machine with the benchmark and a trained run: a small set to carry to the GPU host
    python benchmarks/gpu_check.py prepare-set data/emoji --model runs/emoji/seed0/model --out /tmp/gpu_set

1. Encoder: `SBIRModel.encode_pixels` (backbone under fp16 autocast, heads in float32) on batches of
   64 and 256 preprocessed sketches, timed after a warm-up with the result copied back to the host;
   beside it, batch 256 in plain float32 (no autocast) and under autocast with the backbone in
   channels-last memory order, to show what the served choice buys.
2. Service: `benchmarks/bench_service.py make-index` (100k synthetic vectors, the untrained model,
   fp32: the GPU runs the backbone in float) and `run --device cuda`: 16 wrk clients (httpx if wrk is
   absent) against the bare encoder in the same run; `--max-batch 64` lets the batches grow.
3. FAISS: a 1M x 64 exact inner-product index (the builder's choice up to its exact limit is Flat)
   on the GPU, 10,000 queries at k = 24, against the same on the CPU for 1,000 queries. Skipped, and
   said so, when the installed faiss has no GPU support (faiss-cpu from PyPI has none); beside it the
   same exact search as one torch matrix product and top-k on the GPU (not FAISS: what a flat GPU
   index's work costs on this card).
4. With `--accuracy-set DIR` (made by `prepare-set`: a trained model and the unseen classes of one
   split, OpenMoji's sketches against one other artist's colour emoji): the served ranking (IIAE's
   candidates re-ranked, model/rerank.py) from the GPU's fp16-autocast embeddings against the CPU's
   float32 ones of the same images: mAP@all, P@1, the top-1 agreement and the rows' cosine.
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


# (batch, variant): "fp16" is what the service runs (SBIRModel's autocast); the others are for comparison.
ENCODER_RUNS = ((64, "fp16"), (256, "fp16"), (256, "fp16-contiguous"), (256, "fp32"))


def encoder_throughput(ckpt: Path, png: bytes, runs: tuple[tuple[int, str], ...], seconds: float) -> list[dict]:
    import contextlib

    import torch

    from model.images import load_image
    from model.pipeline import SBIRModel

    model = SBIRModel.load(ckpt, device="cuda")
    one = model.preprocess(load_image(png))
    served_autocast = model._autocast
    out = []
    for batch, variant in runs:
        model._autocast = contextlib.nullcontext if variant == "fp32" else served_autocast
        fmt = torch.contiguous_format if variant.endswith("contiguous") else torch.channels_last  # served: last
        model.backbone.net.to(memory_format=fmt)
        model.backbone.gpu_memory_format = fmt
        pixels = torch.stack([one] * batch).pin_memory()
        for _ in range(3):
            model.encode_pixels(pixels, "sketch")
        torch.cuda.synchronize()
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.encode_pixels(pixels, "sketch")  # numpy on the host: the batch has finished
            done += batch
        rate = done / (time.perf_counter() - start)
        out.append({"batch": batch, "variant": variant, "images_per_s": round(rate, 1),
                    "device": torch.cuda.get_device_name(0), "runtime": model.backbone.runtime()})
        print(f"gpu_check: encoder batch {batch} {variant}: {rate:.1f} images/s", flush=True)
    model._autocast = served_autocast
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


def torch_search(n: int, dim: int, queries: int, k: int) -> dict:
    """The flat index's work done by torch on the GPU: one (queries x n) product, then top-k."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    xb = torch.nn.functional.normalize(torch.randn(n, dim, device="cuda", generator=g), dim=1)
    xq = xb[torch.randint(0, n, (queries,), device="cuda", generator=g)]
    for _ in range(2):
        torch.topk(xq[:100] @ xb.T, k, dim=1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    ids = torch.cat([torch.topk(q @ xb.T, k, dim=1).indices for q in xq.split(1000)]).cpu()
    seconds = time.perf_counter() - start
    return {"vectors": n, "dim": dim, "k": k, "queries": queries, "seconds": round(seconds, 4),
            "queries_per_s": round(queries / seconds, 1), "dtype": "float32", "rows": int(ids.shape[0])}


def prepare_set(dataset: Path, model_dir: Path, out: Path, split: str, sketches: int, photo_artist: str) -> None:
    """Copy `model_dir` and the unseen classes of `split`: up to `sketches` OpenMoji sketches (seeded
    sample) and every colour emoji of `photo_artist` in those classes, with a manifest."""
    import csv
    import random
    import shutil

    spec = json.loads((dataset / "splits" / f"{split}.json").read_text())
    unseen = set(spec["unseen"])
    with open(dataset / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in unseen]
    sk = [r for r in rows if r["domain"] == "sketch" and r["artist"] == "openmoji"]
    sk = sorted(random.Random(0).sample(sk, min(sketches, len(sk))), key=lambda r: r["path"])
    ph = [r for r in rows if r["domain"] == "photo" and r["artist"] == photo_artist]
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model_dir, out / "model", dirs_exist_ok=True)
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "domain", "category", "instance"])
        for r in sk + ph:
            dst = out / r["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dataset / r["path"], dst)
            w.writerow([r["path"], r["domain"], r["category"], r["instance"]])
    (out / "SET.json").write_text(json.dumps({"dataset": str(dataset), "split": split, "unseen_classes": len(unseen),
                                              "sketches": len(sk), "photos": len(ph), "photo_artist": photo_artist,
                                              "model": str(model_dir)}, indent=2) + "\n")
    print(f"{out}: {len(sk)} sketches, {len(ph)} {photo_artist} photos of {len(unseen)} unseen classes")


def fp16_agreement(set_dir: Path) -> dict:
    """The served ranking of the set from GPU (fp16 autocast) and CPU (float32, torch) embeddings."""
    import csv

    from model.images import load_image
    from model.metrics import evaluate_scored
    from model.pipeline import SBIRModel
    from model.rerank import rerank_matrix, second_scores, split_rows

    with open(set_dir / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    images = {d: [load_image(set_dir / r["path"]) for r in rows if r["domain"] == d] for d in ("sketch", "photo")}
    labels = {d: np.array([r["category"] for r in rows if r["domain"] == d]) for d in ("sketch", "photo")}
    emb, report = {}, {"set": json.loads((set_dir / "SET.json").read_text())}
    for device in ("cpu", "cuda"):
        model = SBIRModel.load(set_dir / "model", device=device, cpu_runtime="torch", cpu_precision="fp32")
        start = time.perf_counter()
        emb[device] = {d: model.encode_images(images[d], d, batch_size=64) for d in images}
        report[f"{device}_encode_seconds"] = round(time.perf_counter() - start, 2)
    for device in ("cpu", "cuda"):
        q, g = emb[device]["sketch"], emb[device]["photo"]
        if model.rerank is not None:
            (q1, q2), (g1, g2) = split_rows(q, model.search_dim), split_rows(g, model.search_dim)
            scores = lambda sl, q1=q1, q2=q2, g1=g1, g2=g2: rerank_matrix(  # noqa: E731
                q1[sl] @ g1.T, second_scores(q2[sl], g2, model.rerank), model.rerank)
        else:
            scores = lambda sl, q=q, g=g: q[sl] @ g.T  # noqa: E731
        r = evaluate_scored(scores, labels["sketch"], labels["photo"], ks=(1,), map_ks=())
        report[device] = {"map_all": round(float(r.map_all), 4), "p_at_1": round(float(r.precision[1]), 4)}
        report[f"{device}_top1"] = np.argmax(scores(slice(None)), axis=1).tolist()
    report["top1_agreement"] = float(np.mean(np.array(report.pop("cpu_top1")) == np.array(report.pop("cuda_top1"))))
    for d in images:
        a, b = emb["cpu"][d][:, : model.search_dim], emb["cuda"][d][:, : model.search_dim]
        cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        report[f"{d}_zs_cosine"] = {"mean": round(float(cos.mean()), 6), "min": round(float(cos.min()), 6)}
    return report


def guarded(report: dict, key: str, fn, *a):
    """One part of the check: its result, or its error, so the other parts still run."""
    try:
        report[key] = fn(*a)
    except Exception as exc:  # a one-shot run on a borrowed host: report and go on
        import traceback

        traceback.print_exc()
        report[key] = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"gpu_check: {key}: {json.dumps(report[key])[:600]}", flush=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "prepare-set":
        ap = argparse.ArgumentParser(prog="gpu_check.py prepare-set")
        ap.add_argument("dataset", type=Path)
        ap.add_argument("--model", type=Path, required=True, help="a trained checkpoint (RUN/model)")
        ap.add_argument("--out", type=Path, required=True)
        ap.add_argument("--split", default="category_seed0")
        ap.add_argument("--sketches", type=int, default=200)
        ap.add_argument("--photo-artist", default="fluent")
        a = ap.parse_args(sys.argv[2:])
        sys.path.insert(0, str(HERE.parent))
        prepare_set(a.dataset, a.model, a.out, a.split, a.sketches, a.photo_artist)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (model, index, reports)")
    ap.add_argument("--seconds", type=float, default=10, help="per encoder measurement and service round")
    ap.add_argument("--skip-service", action="store_true")
    ap.add_argument("--skip-search", action="store_true", help="leave out part 3")
    ap.add_argument("--accuracy-set", type=Path, help="a folder made by `prepare-set` (part 4)")
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
    report: dict = {}
    guarded(report, "encoder", encoder_throughput, ckpt, sketch_png(), ENCODER_RUNS, args.seconds)
    if args.accuracy_set:
        guarded(report, "fp16_agreement", fp16_agreement, args.accuracy_set)
    if not args.skip_search:
        guarded(report, "torch_search", torch_search, 1_000_000, 64, 10_000, 24)
        guarded(report, "faiss", faiss_search, 1_000_000, 64, 10_000, 24)
    if not args.skip_service:
        guarded(report, "service", service_ratio, args.work, args.seconds)
    if args.json:  # before the table, so a failure in it loses nothing
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    rows = []
    for e in report["encoder"] if isinstance(report["encoder"], list) else []:
        note = "served" if e["variant"] == "fp16" else "for comparison"
        rows.append((f"encoder, batch {e['batch']}, {e['variant']}", f"{e['images_per_s']} images/s",
                     f"{e['device']}; {note}"))
    a = report.get("fp16_agreement", {})
    if "cpu" in a:
        rows.append(("served ranking, GPU fp16 vs CPU fp32", f"mAP@all {a['cuda']['map_all']} vs {a['cpu']['map_all']}",
                     f"P@1 {a['cuda']['p_at_1']} vs {a['cpu']['p_at_1']}; top-1 same for {a['top1_agreement']:.3f}; "
                     f"zs cosine min {min(a['sketch_zs_cosine']['min'], a['photo_zs_cosine']['min'])}"))
    s = report.get("service", {})
    if "service_rps" in s:
        rows += [("service, 16 clients", f"{s['service_rps']} requests/s",
                  f"ratio {s['throughput_ratio']} to the bare encoder ({s['bare_images_per_s']} images/s, batch 64, "
                  f"{s.get('images_per_query', 1)} images a query)"),
                 ("service, 1 client", f"p50 {s['single_client_latency_ms']['p50']} ms",
                  f"p99 {s['single_client_latency_ms']['p99']} ms")]
    t = report.get("torch_search", {})
    if "queries_per_s" in t:
        rows.append(("exact search 1M x 64, torch on the GPU", f"{t['queries_per_s']} queries/s",
                     "10,000 queries, k 24; not FAISS"))
    f = report.get("faiss", {})
    if "cpu_queries_per_s" in f:
        rows.append(("FAISS exact, 1M x 64, CPU", f"{f['cpu_queries_per_s']} queries/s", "1,000 queries, k 24"))
        rows.append(("FAISS exact, 1M x 64, GPU", f"{f['gpu_queries_per_s']} queries/s" if "gpu_seconds" in f
                     else "skipped", f"top-1 = CPU's for {f['top1_agreement_with_cpu']:.3f}" if "gpu_seconds" in f
                     else f["gpu"]))
    for key in ("encoder", "fp16_agreement", "torch_search", "faiss", "service"):
        if isinstance(report.get(key), dict) and "error" in report[key]:
            rows.append((key, "failed", report[key]["error"][:200]))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}} | result | note")
    for name, value, note in rows:
        print(f"{name:<{width}} | {value} | {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
