"""Benchmark of the search service: latency, throughput against the bare encoder, memory over a soak.

Starts a real `sbir serve` process on 127.0.0.1 and drives it with an async httpx load generator
(multipart uploads of a 256x256 PNG sketch). Every loop is bounded in count and in time.

    # a synthetic snapshot: N random unit vectors with synthetic metadata, the untrained model
    python benchmarks/bench_service.py make-index --out /tmp/bench100k --photos 100000
    # single-client latency, 16-client throughput vs the encoder's bare batched forward
    python benchmarks/bench_service.py run --root /tmp/bench100k --json out.json
    # CPU time of each stage of a request in-process, the second stage against the one before it
    python benchmarks/bench_service.py stages --root /tmp/bench100k [--cold]
    # the server's CPU per request, by thread, with the forward replaced by a sleep: the request path alone
    python benchmarks/bench_service.py fixed-cost --root /tmp/bench100k
    # resident memory under load (1M vectors; zs only: 1M re-ranking rows are 8.4 GB, built in memory)
    python benchmarks/bench_service.py make-index --out /tmp/bench1m --photos 1000000 --zs-only
    python benchmarks/bench_service.py soak --root /tmp/bench1m --seconds 600
    # the soak of docs/RELIABILITY.md: a real collection, re-indexed (a new snapshot) every 2 minutes
    python deploy/smoke_data.py checkpoint /tmp/soak/model
    python deploy/smoke_data.py photos /tmp/soak/photos/batch0 --count 400
    sbir index build /tmp/soak/photos --model /tmp/soak/model --out /tmp/soak/index
    python benchmarks/bench_service.py soak --root /tmp/soak/index --seconds 1800 --idle-seconds 120 \
        --reindex-every 120 --reindex-photos /tmp/soak/photos --json soak.json

Latency does not depend on training, so the untrained checkpoint stands in for a trained one: by default
with the second stage `sbir train` gives models today (`[zs | v | r]` rows, model/rerank.py), with
`make-index --zs-only` without it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
STAGES = ("read", "decode", "queue", "encode", "search", "metadata", "total")


# --- fixtures --------------------------------------------------------------------------------------
def sketch_png() -> bytes:
    """A 256x256 PNG pen drawing (the service's own stroke renderer, so it looks like a sketch)."""
    from service.strokes import render_strokes

    strokes = [
        [[30, 128, 226, 30], [220, 30, 220, 220]],
        [[80, 176], [150, 150]],
        [[128, 128], [30, 245]],
    ]
    out = io.BytesIO()
    render_strokes(strokes, canvas=256).save(out, "PNG")
    return out.getvalue()


def untrained_checkpoint(path: Path, rerank: bool = True) -> Path:
    """The default backbone with seeded random heads: the same cost as a trained model.

    With `rerank` (as `sbir train` makes models today, model/defaults.py), the InfoNCE peer and the
    standardised backbone features re-rank IIAE's top candidates, so a row is `[zs | v | r]`;
    without, the older zs-only model (for comparison).
    """
    import torch

    from model.adapter import AdapterConfig, FeatureAdapter
    from model.backbones import create_backbone
    from model.defaults import (
        DEFAULT_RERANK,
        DEFAULT_RERANK_RAW_WEIGHT,
        DEFAULT_RERANK_TOP,
        DEFAULT_RERANK_WEIGHT,
    )
    from model.iiae import IIAE, IIAEConfig
    from model.peer import InfoNCEPeer
    from model.pipeline import SBIRModel
    from model.rerank import RerankConfig

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    backbone = create_backbone(cpu_runtime="torch", cpu_precision="fp32")  # only its description is saved
    adapter = FeatureAdapter(AdapterConfig(input_dim=backbone.dim))
    config: dict = {"training": {"note": "untrained benchmark model"}}
    peer = None
    if rerank:
        peer = InfoNCEPeer(adapter.cfg.output_dim, 64)
        config["rerank"] = RerankConfig(DEFAULT_RERANK, peer.out_dim, DEFAULT_RERANK_TOP, DEFAULT_RERANK_WEIGHT,
                                        DEFAULT_RERANK_RAW_WEIGHT, backbone.dim).to_dict()
    model = SBIRModel(backbone, adapter, IIAE(IIAEConfig()), config, peer=peer)
    model.save(path)
    return path


def synthetic_vectors(n: int, dim: int, seed: int, clusters: int = 2000) -> np.ndarray:
    """Unit vectors around `clusters` random centres: clustered like real embeddings, unlike pure noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    step = max(1000, 6_400_000 // dim)  # bounded memory for the temporaries (100k rows of 64-d)
    for start in range(0, n, step):
        m = min(step, n - start)
        block = centres[rng.integers(0, clusters, m)] + 1.0 * rng.standard_normal((m, dim)).astype(
            np.float32
        ) / np.sqrt(dim)
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def synthetic_rows(n: int, search_dim: int, rerank, seed: int) -> np.ndarray:
    """Model rows of `n` synthetic photos: `[zs | v | r]` with each part a unit vector where the model
    re-ranks (model.rerank.unit_parts), else zs alone. The parts are drawn independently."""
    widths = [search_dim] if rerank is None else [search_dim, rerank.dim, rerank.raw_dim]
    widths = [w for w in widths if w > 0]
    out = np.empty((n, sum(widths)), np.float32)
    col = 0
    for part, w in enumerate(widths):
        out[:, col : col + w] = synthetic_vectors(n, w, seed + 1000 * part)
        col += w
    return out


def make_index(out: Path, photos: int, model_dir: Path | None, seed: int, cpu_precision: str | None = None,
               rerank: bool = True) -> None:
    """A published snapshot of `photos` synthetic vectors, written with index_builder's own writer.

    Every record points at one of a few real small JPEGs (so /photos works) and carries synthetic
    metadata of about the size a real collection's has. The index is what the builder would choose
    for that many vectors (exact up to 100k, IVF beyond), tuned to its recall target.
    """
    import json

    from PIL import Image, ImageDraw

    from index_builder import faiss_index
    from index_builder.build import recall_depth
    from index_builder.snapshot import SnapshotWriter
    from model.ground.files import sha256_file
    from model.pipeline import SBIRModel

    out.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir or untrained_checkpoint(out / "untrained-model", rerank=rerank)
    model = SBIRModel.load(model_dir, device="cpu", with_backbone=False)
    from model.backbones import cpu_precision_for

    # the precision the service will encode queries in (it follows the snapshot's)
    precision = cpu_precision_for(model.config["backbone"]["name"], cpu_precision)
    files = []
    for i in range(16):
        f = out / "photos" / f"p{i:02d}.jpg"
        f.parent.mkdir(exist_ok=True)
        img = Image.new("RGB", (320, 240), (i * 15, 90, 200 - i * 10))
        ImageDraw.Draw(img).ellipse((40 + i * 5, 30, 200, 200), fill=(250, 220, 40))
        img.save(f, quality=85)
        files.append((str(f.resolve()), sha256_file(f)))
    t0 = time.perf_counter()
    vectors = synthetic_rows(photos, model.search_dim, model.rerank, seed)
    searched = np.ascontiguousarray(vectors[:, : model.search_dim])  # the index holds zs (model/rerank.py)
    ids = np.arange(photos, dtype=np.int64)
    plan = faiss_index.choose_factory(photos, model.search_dim)
    index = faiss_index.build_index(searched, ids, plan.factory)
    recall = faiss_index.tune_and_measure(index, searched, ids, k=recall_depth(model.config))
    del searched
    rows = [
        (
            int(i),
            f"synthetic/{i:08d}.jpg",
            files[i % len(files)][0],
            files[i % len(files)][1],
            json.dumps(
                {
                    "title": f"synthetic photo {i}",
                    "tags": ["bench", f"cluster{i % 97}"],
                    "width": 320,
                    "height": 240,
                }
            ),
        )
        for i in range(photos)
    ]
    writer = SnapshotWriter(out)
    snapshot_id = writer.write(
        index=index,
        ids=ids,
        vectors=vectors,
        photo_rows=rows,
        model_dir=Path(model_dir),
        manifest={
            "dim": model.dim,
            "search_dim": model.search_dim,
            "rerank": model.rerank.to_dict() if model.rerank is not None else None,
            "count": photos,
            "model": {"sha256": model.sha256, "precision": precision},
            "index": {"factory": plan.factory, "search_params": recall.params, "recall": recall.to_dict()},
            "synthetic": {"seed": seed, "note": "benchmarks/bench_service.py make-index"},
        },
        report={"synthetic": True},
    )
    writer.publish(snapshot_id)
    print(
        f"published {snapshot_id} ({precision}): {photos} synthetic vectors, {plan.factory} {recall.params or 'exact'}, "
        f"recall@{recall.k} {recall.recall:.3f}, {time.perf_counter() - t0:.1f} s"
    )


# --- the server ------------------------------------------------------------------------------------
class Server:
    """`sbir serve ROOT` as a child process on a free port; stopped with SIGTERM."""

    def __init__(self, root: Path, extra: list[str], startup_timeout: float = 600, command: list[str] | None = None):
        """`command` (given `--port PORT` at its end) replaces `sbir serve ROOT ... extra`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SBIR_")}
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "sbir",
            "-q",
            "serve",
            str(root),
            "--host",
            HOST,
            "--port",
            str(port),
            *extra,
        ]
        cmd += ["--log-level", "warning"]  # no access log: it would cost the server time per request
        if command is not None:
            cmd = [*command, "--port", str(port)]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = f"http://{HOST}:{port}"
        self._wait_ready(startup_timeout)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        log = [self.lines.get_nowait() for _ in range(self.lines.qsize())]
        raise RuntimeError("sbir serve did not become ready:\n" + "".join(log[-40:]))

    def rss_mb(self) -> float:
        return _status_kb(self.proc.pid, "VmRSS") / 1024

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def thread_cpu_seconds(self, names: dict[str, str]) -> dict[str, float]:
        """CPU seconds so far per thread name (`names`: native thread id -> name; others are "native":
        onnxruntime's and OpenMP's own threads), numbered threads of one pool summed."""
        out: dict[str, float] = {}
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended
                continue
            name = names.get(task.name, "native").rstrip("0123456789_-")
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return out

    def peak_rss_mb(self) -> float:
        return _status_kb(self.proc.pid, "VmHWM") / 1024

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _status_kb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


# --- the load generator ----------------------------------------------------------------------------
async def drive(
    url: str, png: bytes, clients: int, max_requests: int, max_seconds: float, k: int = 24
) -> dict:
    """`clients` concurrent loops of POST /search; stops at max_requests in all or max_seconds."""
    import httpx

    latencies: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    batch_sizes: list[int] = []
    failures: list[str] = []
    snapshots: set[str] = set()
    sent = 0
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def loop() -> None:
            nonlocal sent
            while sent < max_requests and time.perf_counter() < deadline:
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        "/search", params={"k": k}, files={"file": ("s.png", png, "image/png")}
                    )
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                body = r.json()
                snapshots.add(body["snapshot"])
                latencies.append(dt)
                batch_sizes.append(body["batch_size"])
                for s in STAGES:
                    stages[s].append(body["timings_ms"][s])

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(latencies),
        "failures": len(failures),
        "failure_examples": failures[:3],
        "seconds": round(elapsed, 2),
        "throughput_rps": round(len(latencies) / elapsed, 2) if elapsed else 0.0,
        "latency_ms": _percentiles([x * 1000 for x in latencies]),
        "server_stage_ms_p50": {s: round(statistics.median(v), 2) for s, v in stages.items() if v},
        "server_stage_ms_p99": {s: round(float(np.percentile(v, 99)), 2) for s, v in stages.items() if v},
        "server_stage_ms_max": {s: round(max(v), 2) for s, v in stages.items() if v},
        "mean_batch_size": round(statistics.mean(batch_sizes), 2) if batch_sizes else 0,
        "snapshots_answering": len(snapshots),
    }


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=%(boundary)s"
local f = assert(io.open("%(body)s", "rb"))
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, "write": %%d, "status": %%d, '
    .. '"timeout": %%d, "p50": %%.3f, "p90": %%.3f, "p99": %%.3f, "max": %%.3f, "mean": %%.3f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, latency.mean / 1000))
end
"""


def _batch_totals(url: str) -> tuple[float, float]:
    """(sketches encoded, forward passes) so far, from the server's /metrics."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("sbir_batch_size_sum ", "sbir_batch_size_count ")):
            name, value = line.split()
            values[name] = float(value)
    return values.get("sbir_batch_size_sum", 0.0), values.get("sbir_batch_size_count", 0.0)


def drive_wrk(url: str, png: bytes, clients: int, seconds: float, k: int = 24) -> dict:
    """`clients` connections of wrk (C, one thread) posting the sketch for `seconds`.

    wrk costs the shared cores far less CPU per request than an async Python client does, so more of
    the machine is left to the server under test. Its report has no per-stage timings.
    """
    import tempfile

    boundary = "sbirbench7d1c0b"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.png\"\r\n"
        f"Content-Type: image/png\r\n\r\n"
    ).encode() + png + f"\r\n--{boundary}--\r\n".encode()
    with tempfile.TemporaryDirectory(prefix="sbir-wrk-") as tmp:
        body_path, script_path = Path(tmp) / "body", Path(tmp) / "post.lua"
        body_path.write_bytes(body)
        script_path.write_text(WRK_SCRIPT % {"boundary": boundary, "body": body_path})
        sum0, count0 = _batch_totals(url)
        proc = subprocess.run(
            ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "60s",
             "-s", str(script_path), f"{url}/search?k={k}"],
            capture_output=True, text=True, timeout=seconds + 120, check=True,
        )
        sum1, count1 = _batch_totals(url)
    stats = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    failures = sum(stats[e] for e in ("connect", "read", "write", "status", "timeout"))
    ok = stats["requests"] - stats["status"]
    elapsed = stats["duration_us"] / 1e6
    return {
        "load_generator": "wrk",
        "clients": clients,
        "requests": ok,
        "failures": failures,
        "failure_examples": [proc.stdout[-400:]] if failures else [],
        "seconds": round(elapsed, 2),
        "throughput_rps": round(ok / elapsed, 2) if elapsed else 0.0,
        "latency_ms": {q: round(stats[q], 2) for q in ("p50", "p90", "p99", "max", "mean")},
        "mean_batch_size": round((sum1 - sum0) / (count1 - count0), 2) if count1 > count0 else 0,
    }


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {
        "p50": round(float(np.percentile(a, 50)), 2),
        "p90": round(float(np.percentile(a, 90)), 2),
        "p99": round(float(np.percentile(a, 99)), 2),
        "max": round(float(a.max()), 2),
        "mean": round(float(a.mean()), 2),
    }


# --- the bare encoder ------------------------------------------------------------------------------
class BareEncoder:
    """model.encode_pixels on a ready batch: no HTTP, no decoding, no search. Loaded once.

    It runs on a worker thread with the server's torch thread count, as the server's batcher does.
    A batch is `batch` sketches as the server's batcher forwards them (`preprocess_sketch`: with the
    query's twin, two images each), so its queries/s are what the service's requests/s compare with.
    """

    def __init__(self, model_dir: Path, png: bytes, batch: int, torch_threads: int | None,
                 cpu_runtime: str | None = None, cpu_precision: str | None = None, device: str = "cpu"):
        import torch

        from model.images import load_image
        from model.pipeline import SBIRModel

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.model = SBIRModel.load(model_dir, device=device, cpu_runtime=cpu_runtime,
                                    cpu_precision=cpu_precision if device == "cpu" else None)
        self.views = self.model.sketch_views
        self.pixels = torch.stack([self.model.preprocess_sketch(load_image(png))] * batch)
        # as the server's batcher thread sets its own (service/state.py): one torch thread behind onnxruntime
        from service.state import encode_threads_for

        self.encode_threads = encode_threads_for(self.model, torch_threads)
        self.measure(0.0)  # warm-up

    def measure(self, seconds: float, max_batches: int = 10_000) -> dict:
        """Images/s and queries/s (a query is `views` images), CPU seconds per image and per query
        (this process, all threads)."""
        out: dict = {}

        def work() -> None:
            import torch

            if self.encode_threads is not None:
                torch.set_num_threads(self.encode_threads)
            done, start, cpu0 = 0, time.perf_counter(), time.process_time()
            for _ in range(max_batches):
                self.model.encode_pixels(self.pixels, "sketch")  # returns numpy: a GPU run has finished
                done += len(self.pixels)
                if time.perf_counter() - start >= seconds:
                    break
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
            images = done * self.views
            out.update(images_per_s=round(images / wall, 3), cpu_s_per_image=round(cpu / images, 6), images=images,
                       queries_per_s=round(done / wall, 3), cpu_s_per_query=round(cpu / done, 6))

        worker = threading.Thread(target=work, name="bare-encoder")
        worker.start()
        worker.join()
        return out


def snapshot_model(root: Path) -> tuple[Path, str]:
    """The snapshot's model directory and the precision its vectors were made in."""
    from index_builder.snapshot import Snapshot

    snap = Snapshot.open(root)
    try:
        return Path(snap.model_dir), snap.precision
    finally:
        snap.close()


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# --- commands --------------------------------------------------------------------------------------
def start_server(args: argparse.Namespace, report: dict, flags: list[str]) -> Server:
    """Start `sbir serve` with `flags` plus the thread flags; record the flags and OpenMP/MKL env."""
    flags = list(flags)
    if args.torch_threads is not None:
        flags += ["--torch-threads", str(args.torch_threads)]
    if args.faiss_threads is not None:
        flags += ["--faiss-threads", str(args.faiss_threads)]
    if getattr(args, "cpu_runtime", None):
        flags += ["--cpu-runtime", args.cpu_runtime]
    if getattr(args, "batch_workers", None) is not None:
        flags += ["--batch-workers", str(args.batch_workers)]
    if getattr(args, "batch_forwards", None) is not None:
        flags += ["--batch-forwards", args.batch_forwards]
    if getattr(args, "device", "cpu") != "cpu":
        flags += ["--device", args.device]
    report["server_flags"] = flags
    report["env"] = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "GOMP_"))}
    return Server(args.root, flags)


def cmd_run(args: argparse.Namespace) -> dict:
    """Single-client latency, then rounds of (bare encoder, 16-client service) and a last bare one.

    Alternating short windows keeps both sides under the same background load on a shared machine;
    the server's CPU time per answered request is also compared with the bare CPU time per image,
    which does not depend on how much CPU the machine lends.
    """
    png = sketch_png()
    load = args.load if args.load != "auto" else ("wrk" if shutil.which("wrk") else "httpx")
    report: dict = {"machine": machine(), "root": str(args.root), "sketch_png_bytes": len(png),
                    "load_generator": load}
    model_dir, precision = snapshot_model(args.root)
    device = getattr(args, "device", "cpu")
    bare = BareEncoder(model_dir, png, args.max_batch, args.torch_threads, args.cpu_runtime,
                       precision, device)
    report["cpu_runtime"] = bare.model.backbone.runtime()
    report["cpu_precision"] = precision
    server = start_server(args, report, ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)])
    try:
        report["server_rss_mb_idle"] = round(server.rss_mb(), 1)
        asyncio.run(drive(server.url, png, 1, args.warmup, 120))
        report["single_client"] = asyncio.run(drive(server.url, png, 1, args.single, args.max_seconds))
        bares, rounds = [bare.measure(args.bare_seconds)], []
        for _ in range(args.rounds):
            cpu0 = server.cpu_seconds()
            if load == "wrk":
                r = drive_wrk(server.url, png, args.clients, args.round_seconds)
            else:
                r = asyncio.run(
                    drive(server.url, png, args.clients, args.concurrent_requests, args.round_seconds)
                )
            r["server_cpu_s_per_request"] = round((server.cpu_seconds() - cpu0) / max(1, r["requests"]), 6)
            rounds.append(r)
            bares.append(bare.measure(args.bare_seconds))
        report["bare_encoder"] = {"batch": args.max_batch, "windows": bares}
        report["concurrent_rounds"] = rounds
        # A request is one query: `views` images through the encoder (2 with the query's twin). The
        # ratios compare the service's requests with the bare encoder's queries, i.e. the encoder work
        # the service got done per second with what the encoder does alone.
        bare_rate = statistics.mean(b["queries_per_s"] for b in bares)
        bare_cpu = statistics.mean(b["cpu_s_per_query"] for b in bares)
        served = sum(r["requests"] for r in rounds)
        seconds = sum(r["seconds"] for r in rounds)
        service_cpu = statistics.mean(r["server_cpu_s_per_request"] for r in rounds)
        report["summary"] = {
            "service_rps": round(served / seconds, 3),
            "images_per_query": bare.views,
            "bare_images_per_s": round(bare_rate * bare.views, 3),
            "bare_queries_per_s": round(bare_rate, 3),
            "throughput_ratio": round(served / seconds / bare_rate, 3),
            "service_cpu_s_per_request": round(service_cpu, 6),
            "bare_cpu_s_per_query": round(bare_cpu, 6),
            "cpu_ratio": round(bare_cpu / service_cpu, 3),
            "mean_batch_size": round(statistics.mean(r["mean_batch_size"] for r in rounds), 2),
            "failures": sum(r["failures"] for r in rounds) + report["single_client"]["failures"],
        }
        report["server_rss_mb_after"] = round(server.rss_mb(), 1)
        report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        report["server_exit_code"] = server.stop()
    return report


class Reindexer:
    """Every `every_s` seconds: add `add` generated photos to the collection and run `sbir index
    update ROOT PHOTOS` (niced), which publishes a new snapshot the server picks up."""

    def __init__(self, root: Path, photos: Path, every_s: float, add: int):
        import importlib.util

        spec = importlib.util.spec_from_file_location("smoke_data", REPO / "deploy" / "smoke_data.py")
        self.smoke_data = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.smoke_data)
        self.root, self.photos, self.every_s, self.add = root, photos, every_s, add
        self.jobs: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="reindexer", daemon=True)

    def _run(self) -> None:
        for i in range(10_000):  # bounded; stopped by the soak long before
            if self.stop.wait(self.every_s):
                return
            self.smoke_data.make_photos(self.photos / f"soak-{os.getpid()}-{i:04d}", self.add, 1000 + i, 96)
            cmd = ["nice", "-n", "10", sys.executable, "-m", "sbir", "-q", "index", "update", str(self.root),
                   str(self.photos), "--workers", "0", "--no-progress"]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            self.jobs.append({
                "at_s": round(t0 - self.started, 1), "seconds": round(time.perf_counter() - t0, 1),
                "exit": proc.returncode, "error": proc.stderr[-500:] if proc.returncode else "",
            })  # fmt: skip

    def __enter__(self) -> Reindexer:
        self.started = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(600)


def cmd_soak(args: argparse.Namespace) -> dict:
    from contextlib import nullcontext

    if args.reindex_every > 0 and args.reindex_photos is None:
        raise SystemExit("--reindex-every needs --reindex-photos (the collection ROOT was built from)")
    png = sketch_png()
    report: dict = {
        "machine": machine(),
        "root": str(args.root),
        "seconds": args.seconds,
        "clients": args.clients,
        "reindex_every_s": args.reindex_every,
    }
    t0 = time.perf_counter()
    server = start_server(args, report, [])
    report["startup_s"] = round(time.perf_counter() - t0, 1)
    samples: list[tuple[float, float]] = []
    try:
        if args.idle_seconds > 0:  # the same load without re-indexing: the latency to compare with
            report["load_without_reindexing"] = asyncio.run(
                drive(server.url, png, args.clients, 10**9, args.idle_seconds)
            )
        report["rss_mb_idle"] = round(server.rss_mb(), 1)
        stop = threading.Event()

        def sample() -> None:
            start = time.perf_counter()
            while not stop.wait(args.sample_every):
                samples.append((round(time.perf_counter() - start, 1), round(server.rss_mb(), 1)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        reindexer = (
            Reindexer(args.root, args.reindex_photos, args.reindex_every, args.reindex_add)
            if args.reindex_every > 0
            else nullcontext()
        )
        with reindexer:
            report["load"] = asyncio.run(drive(server.url, png, args.clients, 10**9, args.seconds))
        if args.reindex_every > 0:
            report["reindex_jobs"] = reindexer.jobs
            report["reindex_published"] = sum(j["exit"] == 0 for j in reindexer.jobs)
            base = report.get("load_without_reindexing", {}).get("latency_ms", {}).get("p99")
            if base:
                report["p99_ratio_to_no_reindexing"] = round(report["load"]["latency_ms"]["p99"] / base, 2)
        stop.set()
        sampler.join(5)
        report["rss_mb_samples"] = samples
        report["rss_mb_peak"] = round(server.peak_rss_mb(), 1)
        if len(samples) >= 4:
            # growth after the first quarter (allocator warm-up), as MB per minute
            tail = samples[len(samples) // 4 :]
            t = np.array([s[0] for s in tail])
            m = np.array([s[1] for s in tail])
            report["rss_mb_first_last"] = [samples[0][1], samples[-1][1]]
            report["rss_growth_mb_per_min_after_warmup"] = round(float(np.polyfit(t, m, 1)[0] * 60), 3)
    finally:
        report["server_exit_code"] = server.stop()
    return report


# Where a sample of the server's CPU goes: the first rule whose text is in the sample's stack wins.
PROFILE_STAGES = (
    ("forward (onnxruntime / torch)", ("onnxruntime", "backbones.py", "torch/nn")),
    ("second stage (re-ranking)", ("second_stage", "rerank.py")),
    ("FAISS search", ("faiss", "snapshot.py:search", "(index_builder/snapshot.py)")),
    ("metadata lookup (sqlite)", ("lookup", "sqlite")),
    ("decode upload (PNG) and resize", ("decode_sketch", "load_image", "PIL", "pad_to_square", "preprocess")),
    ("multipart parse and body read", ("multipart", "read_body")),
    ("JSON response", ("json", "JSONResponse", "render")),
    ("metrics (prometheus)", ("prometheus", "metrics.py")),
    ("batcher and state", ("batcher.py", "state.py")),
    ("search route", ("routes/search.py",)),
    ("FastAPI / Starlette / pydantic", ("starlette", "fastapi", "pydantic")),
    ("HTTP (uvicorn, httptools)", ("httptools", "uvicorn", "h11")),
    ("asyncio event loop", ("asyncio", "uvloop")),
    ("thread pools (idle wake-ups)", ("threading.py", "concurrent/futures")),
)


def cmd_profile(args: argparse.Namespace) -> dict:
    """py-spy samples of the server (all threads, running only) under `clients` wrk connections,
    grouped by stage: where the fixed cost per request goes."""
    import collections
    import tempfile

    png = sketch_png()
    report: dict = {"machine": machine(), "root": str(args.root), "clients": args.clients}
    server = start_server(args, report, ["--max-batch", str(args.max_batch)])
    try:
        asyncio.run(drive(server.url, png, 1, 20, 60))
        with tempfile.TemporaryDirectory(prefix="sbir-prof-") as tmp:
            raw = Path(tmp) / "stacks.txt"
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(server.proc.pid), "--rate", str(args.rate), "--threads",
                 "--nonblocking", "--format", "raw", "--duration", str(int(args.seconds)),
                 "--output", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
            time.sleep(1)
            cpu0 = server.cpu_seconds()
            load = drive_wrk(server.url, png, args.clients, args.seconds + 2)
            load["server_cpu_s_per_request"] = round((server.cpu_seconds() - cpu0) / max(1, load["requests"]), 6)
            _, spy_err = spy.communicate(timeout=args.seconds + 60)
            stacks = raw.read_text().splitlines() if raw.is_file() else []
            if not stacks:
                raise RuntimeError(f"py-spy recorded nothing: {spy_err.strip()[-400:]}")
            if args.stacks:
                shutil.copyfile(raw, args.stacks)
    finally:
        report["server_exit_code"] = server.stop()
    counts: collections.Counter = collections.Counter()
    leaves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in stacks:
        stack, _, n = line.rpartition(" ")
        stage = next((name for name, keys in PROFILE_STAGES if any(k in stack for k in keys)), "other")
        counts[stage] += int(n)
        leaves[stage][";".join(stack.split(";")[-2:])] += int(n)
    total = sum(counts.values()) or 1
    report["load"] = load
    report["samples"] = total
    report["share"] = {k: round(v / total, 4) for k, v in counts.most_common()}
    cpu_ms = load["server_cpu_s_per_request"] * 1000
    report["cpu_ms_per_request_by_stage"] = {k: round(v / total * cpu_ms, 3) for k, v in counts.most_common()}
    report["top_frames"] = {k: [f"{n} {f}" for f, n in leaves[k].most_common(6)] for k, _ in counts.most_common()}
    return report


def cmd_fixed_cost(args: argparse.Namespace) -> dict:
    """The request path's own CPU: the server under `clients` wrk connections with its forward pass
    replaced by a sleep of the forward's wall time (`--forward-ms` per image), so that the server's CPU
    per request is everything but the forward (HTTP, decoding, batching, search, metadata, JSON) and
    does not carry the forward's noise; per thread, from /proc."""
    import tempfile

    png = sketch_png()
    report: dict = {"machine": machine(), "root": str(args.root), "clients": args.clients,
                    "forward_ms_per_image": args.forward_ms, "settings": json.loads(args.settings)}
    with tempfile.TemporaryDirectory(prefix="sbir-fixed-") as tmp:
        names_file = Path(tmp) / "threads.json"
        child = [sys.executable, __file__, "fixed-cost-child", "--root", str(args.root), "--forward-ms",
                 str(args.forward_ms), "--settings", args.settings, "--names", str(names_file)]
        server = Server(args.root, [], command=child)
        try:
            drive_wrk(server.url, png, args.clients, 3)  # warm-up
            rounds = []
            for _ in range(args.rounds):
                names = json.loads(names_file.read_text())
                cpu0, threads0 = server.cpu_seconds(), server.thread_cpu_seconds(names)
                r = drive_wrk(server.url, png, args.clients, args.round_seconds)
                names = json.loads(names_file.read_text())
                cpu, threads = server.cpu_seconds() - cpu0, server.thread_cpu_seconds(names)
                n = max(1, r["requests"])
                r["server_cpu_ms_per_request"] = round(cpu / n * 1000, 4)
                r["thread_cpu_ms_per_request"] = {
                    k: round((v - threads0.get(k, 0.0)) / n * 1000, 4) for k, v in sorted(threads.items())
                    if v - threads0.get(k, 0.0) > 0}  # fmt: skip
                rounds.append(r)
        finally:
            report["server_exit_code"] = server.stop()
    report["rounds"] = rounds
    report["server_cpu_ms_per_request"] = round(statistics.median(r["server_cpu_ms_per_request"] for r in rounds), 4)
    report["mean_batch_size"] = round(statistics.mean(r["mean_batch_size"] for r in rounds), 2)
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def cmd_fixed_cost_child(args: argparse.Namespace) -> None:
    """`sbir serve` with `SBIRModel.encode_pixels` returning the first query's real vector for every
    image after sleeping `forward_ms` per image; writes its threads' names for the parent."""
    from model.pipeline import SBIRModel
    from service.server import run
    from service.settings import Settings

    encode, cached = SBIRModel.encode_pixels, {}

    def sleeping_forward(self, pixels, domain):
        if "row" not in cached:  # the real vector: the search and the second stage do their real work
            cached["row"] = encode(self, pixels[:1], domain)
        images = len(pixels) * (pixels.shape[1] if pixels.ndim == 5 else 1)  # two a query with the twin
        time.sleep(args.forward_ms / 1000 * images)
        return np.repeat(cached["row"], len(pixels), axis=0)

    SBIRModel.encode_pixels = sleeping_forward

    def write_names() -> None:
        for _ in range(1_000_000):  # bounded; a daemon thread, it ends with the server
            names = {str(t.native_id): t.name for t in threading.enumerate()}
            part = args.names.with_suffix(".part")
            part.write_text(json.dumps(names))
            part.replace(args.names)  # whole, never half-written, when the parent reads it
            time.sleep(1)

    threading.Thread(target=write_names, name="thread-names", daemon=True).start()
    settings = {"log_level": "warning", **json.loads(args.settings)}
    run(Settings(snapshot_root=args.root, host=HOST, port=args.port, **settings))


def multipart_body(png: bytes, boundary: str = "sbirbench7d1c0b") -> tuple[bytes, str]:
    """The upload wrk sends: (body, Content-Type)."""
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.png\"\r\n"
        f"Content-Type: image/png\r\n\r\n"
    ).encode() + png + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def second_stage_before(vectors: np.ndarray, ids: np.ndarray, snap, second_q: np.ndarray,
                        cand: np.ndarray) -> np.ndarray:
    """The second stage as served at commit 4d6b785, the reference `stages` times the served one
    against: a fancy-indexed copy of the candidates' `[v | r]` columns, then an einsum."""
    from model.rerank import second_query

    rows = np.where(cand >= 0, np.searchsorted(ids, np.maximum(cand, 0)), 0)
    cand_vecs = np.asarray(vectors[rows.ravel(), snap.search_dim :]).reshape(*cand.shape, -1)
    return np.einsum("nd,nrd->nr", second_query(second_q, snap.rerank), cand_vecs)


def search_before(vectors: np.ndarray, ids: np.ndarray, snap, queries: np.ndarray, k: int):
    """`Snapshot.search` of a re-ranking snapshot as served at commit 4d6b785."""
    from model.rerank import rerank, split_rows

    first_q, second_q = split_rows(queries, snap.search_dim)
    first, cand = snap.first_stage(first_q, max(k, snap.rerank.top))
    second = second_stage_before(vectors, ids, snap, second_q, cand)
    return rerank(cand, first, second, snap.rerank.share, k)


def cpu_ms_per_call(fn, min_cpu_s: float, max_calls: int = 100_000, evict: np.ndarray | None = None) -> float:
    """CPU milliseconds (this process, all threads) per call of `fn`, after one warm-up call.

    CPU time, not wall time: on cores shared with other jobs it does not count the time the
    process waited for a core. With `evict` (an array larger than the caches), it is read before
    every call and not counted: each call starts with cold caches, as a search does in the service,
    where a forward pass runs between two batches."""
    fn()
    calls, spent = 0, 0.0
    while calls < max_calls and spent < min_cpu_s:
        if evict is not None:
            evict.sum()
        t0 = time.process_time()
        fn()
        spent += time.process_time() - t0
        calls += 1
    return spent / calls * 1000


def cmd_stages(args: argparse.Namespace) -> dict:
    """In-process CPU time of each stage of a request's fixed cost (no HTTP), the served second stage
    against the one before it in the same run; `rounds` interleaved rounds, the median kept."""
    import faiss
    import torch

    from index_builder.snapshot import IDS_FILE, VECTORS_FILE, Snapshot
    from model.pipeline import SBIRModel
    from model.rerank import split_rows
    from service.inputs import decode_image, multipart_file
    from service.schemas import SearchResponse

    faiss.omp_set_num_threads(1)  # the service's default (--faiss-threads 1)
    torch.set_num_threads(1)
    png = sketch_png()
    body, content_type = multipart_body(png)
    snap = Snapshot.open(args.root)
    model = SBIRModel.load(snap.model_dir, device="cpu", cpu_precision=snap.precision)
    report: dict = {"machine": machine(), "root": str(args.root), "snapshot": {
        "count": snap.count, "dim": snap.dim, "search_dim": snap.search_dim, "factory": snap.factory,
        "rerank": snap.rerank.to_dict() if snap.rerank else None, "precision": snap.precision},
        "runtime": model.backbone.runtime()}  # fmt: skip
    image = decode_image(multipart_file(body, content_type, "file"))
    pixels = torch.stack([model.preprocess_sketch(image)] * 5)
    queries = {nq: np.ascontiguousarray(model.encode_pixels(pixels[:nq], "sketch")) for nq in (1, 5)}
    if snap.rerank is not None:
        before_vectors = np.load(snap.path / VECTORS_FILE, mmap_mode="r")
        before_ids = np.load(snap.path / IDS_FILE)
    hits = snap.search(queries[5], 24)[1]
    records = snap.lookup(hits[0])
    answer = {"results": [{"rank": i + 1, "id": r["id"], "key": r["key"], "score": 0.5, "url": f"http://h/photos/{r['id']}",
                           "metadata": r["metadata"]} for i, r in enumerate(records)],
              "snapshot": snap.id, "model": snap.model_sha256, "batch_size": 5,
              "timings_ms": dict.fromkeys(STAGES, 1.0)}  # fmt: skip

    stages: dict = {
        "multipart parse": (lambda: multipart_file(body, content_type, "file"), 1),
        "PNG decode": (lambda: decode_image(png), 1),
        # with the query's twin: the stroke normalisation too, and two images a query
        f"preprocess (pad, grey check, resize; {model.sketch_views} view(s))": (lambda: model.preprocess_sketch(image), 1),
        f"forward, batch of 5 queries, {5 * model.sketch_views} images (per query)": (
            lambda: model.encode_pixels(pixels, "sketch"), 5),
        "metadata lookup, 24 ids": (lambda: snap.lookup(hits[0]), 1),
        "JSON response (pydantic)": (lambda: SearchResponse.model_validate(answer).model_dump_json(), 1),
    }
    for nq in (1, 5):
        q = queries[nq]
        first_q, second_q = split_rows(q, snap.search_dim)
        first_q = np.ascontiguousarray(first_q)
        stages[f"FAISS k=24, {nq} queries (per query)"] = (lambda fq=first_q: snap.first_stage(fq, 24), nq)
        stages[f"Snapshot.search k=24 as served, {nq} queries (per query)"] = (lambda q=q: snap.search(q, 24), nq)
        if snap.rerank is not None:
            top = snap.rerank.top
            cand = snap.first_stage(first_q, top)[1]
            stages[f"FAISS k={top}, {nq} queries (per query)"] = (
                lambda fq=first_q, t=top: snap.first_stage(fq, t), nq)
            stages[f"second stage as served, {nq} queries (per query)"] = (
                lambda sq=second_q, c=cand: snap.second_stage(sq, c), nq)
            stages[f"second stage before (4d6b785), {nq} queries (per query)"] = (
                lambda sq=second_q, c=cand: second_stage_before(before_vectors, before_ids, snap, sq, c), nq)
            stages[f"Snapshot.search k=24 before (4d6b785), {nq} queries (per query)"] = (
                lambda q=q: search_before(before_vectors, before_ids, snap, q, 24),
                nq,
            )
            new = snap.second_stage(second_q, cand)
            old = second_stage_before(before_vectors, before_ids, snap, second_q, cand)
            report[f"second_stage_max_abs_difference_{nq}"] = float(np.abs(new - old).max())
    # 64 MB, read before each call of a search stage with --cold: more than this machine's caches
    evict = np.ones(16 * 2**20, np.float32) if args.cold else None
    report["cold_searches"] = bool(args.cold)
    rounds: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(args.rounds):
        for name, (fn, per) in stages.items():
            cold = evict if ("search" in name.lower() or "stage" in name or "FAISS" in name) else None
            rounds[name].append(cpu_ms_per_call(fn, args.min_cpu_s, evict=cold) / per)
    report["cpu_ms"] = {name: round(statistics.median(v), 4) for name, v in rounds.items()}
    report["cpu_ms_rounds"] = {name: [round(x, 4) for x in v] for name, v in rounds.items()}
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    snap.close()
    return report


def cmd_threads(args: argparse.Namespace) -> dict:
    """The encoder and FAISS alone under each OpenMP wait policy and thread count (one child each).

    The policy is read when OpenMP starts, so every combination runs in a fresh process.
    """
    report: dict = {"machine": machine(), "root": str(args.root), "runs": []}
    for policy in ("", "PASSIVE"):
        for threads in (1, 2):
            env = {**os.environ, "OMP_WAIT_POLICY": policy}
            cmd = [
                sys.executable,
                __file__,
                "threads-child",
                "--root",
                str(args.root),
                "--threads",
                str(threads),
            ]
            cmd += ["--seconds", str(args.seconds)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            run.update(omp_wait_policy=policy or "(libgomp default)", threads=threads)
            report["runs"].append(run)
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def cmd_threads_child(args: argparse.Namespace) -> dict:
    import faiss
    import torch

    from index_builder.snapshot import Snapshot
    from model.pipeline import SBIRModel

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    snap = Snapshot.open(args.root)
    model = SBIRModel.load(snap.model_dir, device="cpu")
    pixels = torch.randint(
        0, 255, (16, 3, model.backbone.image_size, model.backbone.image_size), dtype=torch.uint8
    )
    model.encode_pixels(pixels, "sketch")
    done, start = 0, time.perf_counter()
    for _ in range(10_000):
        model.encode_pixels(pixels, "sketch")
        done += 16
        if time.perf_counter() - start >= args.seconds:
            break
    result = {"encoder_images_per_s_batch16": round(done / (time.perf_counter() - start), 2)}
    rng = np.random.default_rng(0)
    for nq in (1, 16):
        q = rng.standard_normal((nq, snap.dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        snap.search(q, 24)
        calls, start = 0, time.perf_counter()
        for _ in range(100_000):
            snap.search(q, 24)
            calls += 1
            if time.perf_counter() - start >= args.seconds / 3:
                break
        result[f"search_ms_{nq}_queries"] = round((time.perf_counter() - start) / calls * 1000, 2)
    snap.close()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-index", help="a synthetic snapshot of random unit vectors")
    mk.add_argument("--out", type=Path, required=True)
    mk.add_argument("--photos", type=int, default=100_000)
    mk.add_argument("--model", type=Path, default=None, help="checkpoint (default: an untrained one)")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--cpu-precision", choices=("auto", "fp32", "int8"), default=None,
                    help="the precision the snapshot records, hence the service's (default: auto, int8 with VNNI)")
    mk.add_argument("--zs-only", action="store_true",
                    help="the untrained model without the second stage (rows of zs alone), for comparison; "
                         "the default re-ranks as `sbir train`'s models do")
    run = sub.add_parser("run", help="latency and throughput")
    run.add_argument("--root", type=Path, required=True)
    run.add_argument("--warmup", type=int, default=5)
    run.add_argument("--single", type=int, default=200, help="single-client requests")
    run.add_argument("--clients", type=int, default=16)
    run.add_argument("--concurrent-requests", type=int, default=2000, help="bound per round")
    run.add_argument("--rounds", type=int, default=3)
    run.add_argument("--round-seconds", type=float, default=30, help="bound of each 16-client round")
    run.add_argument("--max-seconds", type=float, default=120, help="bound of the single-client phase")
    run.add_argument("--bare-seconds", type=float, default=15)
    run.add_argument("--max-batch", type=int, default=16)
    run.add_argument("--max-wait-ms", type=float, default=4)
    run.add_argument("--torch-threads", type=int, default=None, help="for the server and the bare encoder")
    run.add_argument("--faiss-threads", type=int, default=None, help="for the server")
    run.add_argument("--batch-workers", type=int, default=None, help="for the server (default: its own)")
    run.add_argument("--batch-forwards", choices=("one", "overlapping"), default=None,
                     help="for the server (default: its own, one)")
    run.add_argument("--cpu-runtime", choices=("auto", "onnxruntime", "torch"), default=None,
                     help="the backbone's CPU runtime, for the server and the bare encoder (default auto)")
    run.add_argument("--device", default="cpu", help="the encoder's device, for the server and the bare encoder "
                     "(cuda: benchmarks/gpu_check.py)")
    run.add_argument("--load", choices=("auto", "wrk", "httpx"), default="auto",
                     help="load generator of the concurrent rounds (auto: wrk when installed)")
    run.add_argument("--json", type=Path, default=None)
    soak = sub.add_parser("soak", help="resident memory under steady load")
    soak.add_argument("--root", type=Path, required=True)
    soak.add_argument("--seconds", type=float, default=600)
    soak.add_argument("--clients", type=int, default=4)
    soak.add_argument("--sample-every", type=float, default=5)
    soak.add_argument("--torch-threads", type=int, default=None)
    soak.add_argument("--faiss-threads", type=int, default=None)
    soak.add_argument("--idle-seconds", type=float, default=0,
                      help="first, the same load this long without re-indexing (its p99 is the reference)")
    soak.add_argument("--reindex-every", type=float, default=0,
                      help="seconds between `sbir index update` jobs during the soak (0: none)")
    soak.add_argument("--reindex-photos", type=Path, default=None, help="the collection ROOT was built from")
    soak.add_argument("--reindex-add", type=int, default=5, help="photos added before each update")
    soak.add_argument("--json", type=Path, default=None)
    st = sub.add_parser("stages", help="in-process CPU time of each stage of a request (no HTTP)")
    st.add_argument("--root", type=Path, required=True)
    st.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is kept")
    st.add_argument("--min-cpu-s", type=float, default=0.5, help="CPU seconds each stage runs per round")
    st.add_argument("--cold", action="store_true",
                    help="start every search-stage call with cold caches (a 64 MB read before it, not counted)")
    st.add_argument("--json", type=Path, default=None)
    pr = sub.add_parser("profile", help="py-spy profile of the server under wrk load, by stage")
    pr.add_argument("--root", type=Path, required=True)
    pr.add_argument("--clients", type=int, default=16)
    pr.add_argument("--seconds", type=float, default=20)
    pr.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    pr.add_argument("--stacks", type=Path, default=None, help="also keep py-spy's raw stacks here")
    pr.add_argument("--max-batch", type=int, default=16)
    pr.add_argument("--torch-threads", type=int, default=None)
    pr.add_argument("--faiss-threads", type=int, default=None)
    pr.add_argument("--batch-workers", type=int, default=None)
    pr.add_argument("--json", type=Path, default=None)
    fc = sub.add_parser("fixed-cost", help="server CPU per request with the forward replaced by a sleep, by thread")
    fc.add_argument("--root", type=Path, required=True)
    fc.add_argument("--clients", type=int, default=16)
    fc.add_argument("--rounds", type=int, default=3)
    fc.add_argument("--round-seconds", type=float, default=10)
    fc.add_argument("--forward-ms", type=float, default=2.5,
                    help="wall time of the replaced forward per image (2.5: the int8 one on two idle cores)")
    fc.add_argument("--settings", default="{}", help='server settings as JSON, e.g. \'{"decode_threads": 1}\'')
    fc.add_argument("--json", type=Path, default=None)
    fcc = sub.add_parser("fixed-cost-child")
    fcc.add_argument("--root", type=Path, required=True)
    fcc.add_argument("--port", type=int, required=True)
    fcc.add_argument("--forward-ms", type=float, required=True)
    fcc.add_argument("--settings", default="{}")
    fcc.add_argument("--names", type=Path, required=True)
    th = sub.add_parser("threads", help="encoder and FAISS speed per OpenMP wait policy and thread count")
    th.add_argument("--root", type=Path, required=True)
    th.add_argument("--seconds", type=float, default=6)
    th.add_argument("--json", type=Path, default=None)
    child = sub.add_parser("threads-child")
    child.add_argument("--root", type=Path, required=True)
    child.add_argument("--threads", type=int, required=True)
    child.add_argument("--seconds", type=float, default=6)
    args = p.parse_args(argv)
    if args.cmd == "threads-child":  # the policy under test comes from our parent's environment
        print(json.dumps(cmd_threads_child(args)))
        return 0
    # As `sbir serve` does, before torch is loaded here, so that the bare encoder runs as the server's
    # does. OMP_WAIT_POLICY= (empty) measures libgomp's default instead.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.cmd == "fixed-cost-child":
        cmd_fixed_cost_child(args)
        return 0
    if args.cmd == "make-index":
        make_index(args.out, args.photos, args.model, args.seed, args.cpu_precision, rerank=not args.zs_only)
        return 0
    report = {"run": cmd_run, "soak": cmd_soak, "threads": cmd_threads, "profile": cmd_profile,
              "stages": cmd_stages, "fixed-cost": cmd_fixed_cost}[args.cmd](args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
