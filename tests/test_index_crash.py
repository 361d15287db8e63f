"""A real build process killed with SIGKILL mid-embedding: the published snapshot is untouched, and a
rerun resumes from the checkpointed chunks instead of embedding them again."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from test_index_support import build_cli, make_photos

from index_builder.snapshot import Snapshot, read_current

REPO = Path(__file__).resolve().parents[1]


def tree_digest(root: Path) -> dict[str, str]:
    """Every published file (CURRENT and snapshots/) with its sha256."""
    out = {"CURRENT": (root / "CURRENT").read_text()}
    for f in sorted((root / "snapshots").rglob("*")):
        if f.is_file():
            out[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def chunk_files(root: Path) -> list[Path]:
    return sorted((root / ".work").glob("*/chunks/chunk-*.npz"))


def test_sigkill_mid_build_leaves_the_snapshot_and_a_rerun_resumes(tmp_path, untrained_checkpoint):
    photos = tmp_path / "photos"
    make_photos(photos, range(4))
    root = tmp_path / "index"
    build_cli(photos, untrained_checkpoint, root)
    published = tree_digest(root)
    make_photos(photos, range(4, 40), prefix="more")

    cmd = [
        sys.executable,
        "-m",
        "sbir",
        "-q",
        "index",
        "build",
        str(photos),
        "--model",
        str(untrained_checkpoint),
        "--out",
        str(root),
        "--chunk-size",
        "2",
        "--batch-size",
        "2",
        "--workers",
        "1",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 240
        while len(chunk_files(root)) < 2:
            assert proc.poll() is None, (
                f"build ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
            )
            assert time.monotonic() < deadline, "no checkpoint chunk appeared"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        try:  # the orphaned decode worker, if it has not noticed yet
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.stderr.close()

    killed_chunks = chunk_files(root)
    assert tree_digest(root) == published  # nothing published changed
    Snapshot.open(root, verify=True).close()

    report = build_cli(photos, untrained_checkpoint, root)
    resumed = report["counts"]["from_checkpoint"]
    assert resumed >= 2 * len(killed_chunks) >= 4  # at least the chunks seen before the kill
    assert report["counts"]["embedded"] + resumed == 40 and report["counts"]["indexed"] == 40
    assert read_current(root) != published["CURRENT"].strip()
    assert not (root / ".work").exists() or not chunk_files(root)  # cleaned after publishing

    # the resumed snapshot holds exactly what an uninterrupted build makes
    clean = build_cli(photos, untrained_checkpoint, tmp_path / "clean")
    assert clean["counts"]["from_checkpoint"] == 0
    with Snapshot.open(root, verify=True) as a, Snapshot.open(tmp_path / "clean") as b:
        np.testing.assert_array_equal(np.load(a.path / "ids.npy"), np.load(b.path / "ids.npy"))
        np.testing.assert_allclose(
            np.load(a.path / "vectors.npy"), np.load(b.path / "vectors.npy"), atol=1e-5
        )
