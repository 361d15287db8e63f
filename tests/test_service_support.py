"""Shared helpers for the service tests: small photo collections and real snapshots built by the CLI.

Imported by the other test_service_* modules (pytest puts tests/ on sys.path); its own tests check
that the helpers make what the others rely on.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

STARTUP_TIMEOUT_S = 90


def make_photos(folder: Path, n: int, seed: int) -> Path:
    """`n` distinct small photos (coloured shapes on coloured grounds), PNG and JPEG alternately."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ground = tuple(int(v) for v in rng.integers(0, 256, 3))
        img = Image.new("RGB", (72, 56), ground)
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = (int(v) for v in rng.integers(0, 40, 2))
            box = (x0, y0, x0 + int(rng.integers(10, 32)), y0 + int(rng.integers(10, 32)))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        ext = "png" if i % 2 == 0 else "jpg"
        img.save(folder / f"photo_{seed}_{i:03d}.{ext}")
    return folder


def build_snapshot(photos: Path, checkpoint: Path, root: Path) -> str:
    """Build and publish a snapshot with the real builder CLI; return the id CURRENT now names."""
    from index_builder.snapshot import read_current
    from sbir.cli import main

    code = main(
        [
            "-q",
            "index",
            "build",
            str(photos),
            "--model",
            str(checkpoint),
            "--out",
            str(root),
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0, f"sbir index build failed with {code}"
    snapshot_id = read_current(root)
    assert snapshot_id, "the builder did not publish CURRENT"
    return snapshot_id


def publish_broken_snapshot(photos: Path, checkpoint: Path, root: Path, scratch: Path) -> str:
    """Build a snapshot aside, damage its data files (as a half-copied disk would), move it into
    ROOT and publish it there with the real writer; return its id."""
    import shutil

    from index_builder.snapshot import SnapshotWriter, snapshots_dir

    aside = scratch / "aside-index"
    snapshot_id = build_snapshot(photos, checkpoint, aside)
    src = snapshots_dir(aside) / snapshot_id
    for f in src.rglob("*"):
        if f.is_file() and f.suffix != ".json":
            f.write_bytes(b"\0" * 16)
    shutil.move(src, snapshots_dir(root) / snapshot_id)
    SnapshotWriter(root).publish(snapshot_id)
    return snapshot_id


def new_index_root(base: Path, checkpoint: Path, n_photos: int, seed: int = 0) -> tuple[Path, str]:
    """A fresh index root under `base` with one published snapshot: (root, snapshot id)."""
    photos = make_photos(base / f"photos_{seed}", n_photos, seed)
    root = base / "index"
    return root, build_snapshot(photos, checkpoint, root)


def start_server(root, extra=(), env=None, address_space=None) -> tuple[subprocess.Popen, str, queue.Queue]:
    """`sbir serve ROOT` on a free port (the caller stops it): (process, base URL, its output lines).
    `env`: SBIR_* variables for it (the caller's own SBIR_* are not passed on). `address_space`:
    a limit in bytes on its virtual memory, so that a regression fails the test with MemoryError
    instead of exhausting the machine."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SBIR_")}, **(env or {})}
    cmd = [sys.executable, "-m", "sbir", "serve", str(root), "--port", "0", "--device", "cpu", *extra]

    def limit_memory() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        preexec_fn=limit_memory if address_space else None,
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    end = time.monotonic() + STARTUP_TIMEOUT_S
    seen = []
    while time.monotonic() < end:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
        if m:
            return proc, m.group(1), lines
    proc.kill()
    raise AssertionError("sbir serve did not start:\n" + "".join(seen))


def drain(lines: queue.Queue, until: str, timeout: float = 10.0) -> str:
    out: list[str] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end and not any(until in line for line in out):
        try:
            out.append(lines.get(timeout=0.2))
        except queue.Empty:
            continue
    return "".join(out)


def test_photos_are_distinct(tmp_path):
    folder = make_photos(tmp_path, 6, seed=3)
    files = sorted(folder.iterdir())
    assert len(files) == 6
    arrays = [np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in files]
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            assert np.abs(arrays[i] - arrays[j]).mean() > 5
