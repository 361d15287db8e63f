"""Re-indexing on a real Ray cluster: a head and a worker node started with `ray start`, each its own
processes on this machine. The snapshot equals a single-process build's; a killed job resumes."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from test_index_crash import chunk_files, tree_digest
from test_index_support import build_cli, make_bad_files, make_photos, update_cli

from index_builder.snapshot import Snapshot, read_current

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Ray's workers are the raylet's children until it dies)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _start_node(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    # the agent's HTTP port is fixed (52365) unless given: two nodes on one machine need their own
    args = [*args, "--dashboard-agent-listen-port", str(_free_port())]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(RAY), "start", "--block", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text():
        assert proc.poll() is None, f"ray start failed: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"ray start did not come up: {log.read_text()[-3000:]}"
        time.sleep(0.5)
    return proc


@pytest.fixture(scope="module")
def ray_cluster():
    """(address, environment) of a two-node cluster, one CPU each; every process of it is ended after."""
    temp = Path(tempfile.mkdtemp(prefix="sbir-ray-", dir="/tmp"))  # Ray's socket paths must stay short
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",  # every process of the cluster, and the driver, share this token
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(REPO),
    }
    port = _free_port()
    common = ["--num-cpus", "1", "--object-store-memory", "100000000", "--node-ip-address", "127.0.0.1"]
    nodes = []
    try:
        nodes.append(
            _start_node(
                [
                    "--head",
                    "--port",
                    str(port),
                    "--ray-client-server-port",
                    str(_free_port()),
                    "--include-dashboard",
                    "false",
                    "--temp-dir",
                    str(temp),
                    "--disable-usage-stats",
                    *common,
                ],
                temp / "head.log",
                env,
            )
        )
        nodes.append(_start_node(["--address", f"127.0.0.1:{port}", *common], temp / "worker.log", env))
        yield f"127.0.0.1:{port}", env
    finally:
        pids = set().union(*(_descendants(n.pid) | {n.pid} for n in nodes)) if nodes else set()
        for n in nodes:
            n.send_signal(signal.SIGTERM)
        for n in nodes:
            try:
                n.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for pid in pids:  # whatever did not stop with its node (orphaned workers): by pid, never by name
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_env(ray_cluster, monkeypatch):
    address, env = ray_cluster
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED"):
        monkeypatch.setenv(key, env[key])
    return address, env


def test_the_actor_pool_takes_one_gpu_per_actor_or_the_cluster_cpus():
    from index_builder.ray_build import actor_pool
    from model.ground.errors import UserError

    assert actor_pool({"CPU": 8.0, "GPU": 4.0}, "auto", None, 1.0) == (
        4,
        {"num_gpus": 1, "num_cpus": 1.0},
        "cuda",
    )
    assert actor_pool({"CPU": 8.0, "GPU": 4.0}, "cpu", None, 2.0) == (4, {"num_cpus": 2.0}, "cpu")
    assert actor_pool({"CPU": 2.0}, "auto", None, 1.0) == (2, {"num_cpus": 1.0}, "cpu")
    assert actor_pool({"CPU": 2.0}, "auto", 1, 2.0)[0] == 1
    with pytest.raises(UserError, match="has no GPU"):
        actor_pool({"CPU": 2.0}, "cuda", None, 1.0)


def test_a_ray_build_publishes_the_snapshot_of_a_single_process_build(
    tmp_path, untrained_checkpoint, ray_env
):
    address, _ = ray_env
    photos = tmp_path / "photos"
    make_photos(photos, range(10))
    make_bad_files(photos, tmp_path / "outside")
    single = build_cli(photos, untrained_checkpoint, tmp_path / "single")
    # blocks of 3 over two actors on two nodes; the index in two shards built as Ray tasks
    on_ray = build_cli(
        photos,
        untrained_checkpoint,
        tmp_path / "ray",
        "--ray",
        address,
        "--ray-actors",
        "2",
        "--chunk-size",
        "3",
        "--batch-size",
        "2",
        "--shards",
        "2",
    )
    assert on_ray["embedding"]["engine"] == "ray" and on_ray["embedding"]["actors"] == 2
    assert on_ray["counts"] == single["counts"] and on_ray["counts"]["indexed"] == 10
    assert on_ray["skipped"] == single["skipped"] and len(single["skipped"]) == 5
    assert on_ray["index"]["factory"] == single["index"]["factory"] == "Flat"
    assert on_ray["index"]["recall"]["recall"] == single["index"]["recall"]["recall"] == 1.0
    assert on_ray["index"]["shards"]["count"] == 2
    with Snapshot.open(tmp_path / "single") as a, Snapshot.open(tmp_path / "ray", verify=True) as b:
        assert a.model_sha256 == b.model_sha256 and a.manifest["model"] == b.manifest["model"]
        np.testing.assert_array_equal(np.load(a.path / "ids.npy"), np.load(b.path / "ids.npy"))
        vectors = np.load(a.path / "vectors.npy")
        np.testing.assert_allclose(vectors, np.load(b.path / "vectors.npy"), atol=1e-5)
        assert a.lookup(np.load(a.path / "ids.npy")) == b.lookup(np.load(b.path / "ids.npy"))
        s1, i1 = a.search(vectors, 5)
        s2, i2 = b.search(vectors, 5)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, atol=1e-5)
        assert (b.path / "model" / "model.safetensors").read_bytes() == (
            untrained_checkpoint / "model.safetensors"
        ).read_bytes()


def test_a_killed_ray_job_leaves_the_snapshot_and_resumes_from_its_blocks(
    tmp_path, untrained_checkpoint, ray_env
):
    address, env = ray_env
    photos = tmp_path / "photos"
    make_photos(photos, range(4))
    root = tmp_path / "index"
    build_cli(photos, untrained_checkpoint, root)
    published = tree_digest(root)
    make_photos(photos, range(4, 24), prefix="more")

    cmd = [
        sys.executable, "-m", "sbir", "-q", "index", "build", str(photos), "--model",
        str(untrained_checkpoint), "--out", str(root), "--ray", address, "--ray-actors", "2",
        "--chunk-size", "2", "--batch-size", "2", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while len(chunk_files(root)) < 2:
            assert proc.poll() is None, (
                f"build ended before it was killed: {proc.stderr.read().decode()[-3000:]}"
            )
            assert time.monotonic() < deadline, "no block was persisted"
            time.sleep(0.05)
        proc.kill()  # the driver; the cluster ends the job's actors itself
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()

    killed_chunks = chunk_files(root)
    assert tree_digest(root) == published  # nothing published changed
    Snapshot.open(root, verify=True).close()
    with_chunks = sum(len(np.load(c)["sha256"]) for c in killed_chunks)

    report = build_cli(
        photos, untrained_checkpoint, root, "--ray", address, "--ray-actors", "2", "--chunk-size", "2"
    )
    resumed = report["counts"]["from_checkpoint"]
    assert resumed == with_chunks >= 4  # every persisted block is reused ...
    assert report["counts"]["embedded"] == 24 - resumed  # ... and only the others are embedded
    assert report["counts"]["indexed"] == 24 and read_current(root) != published["CURRENT"].strip()
    assert not chunk_files(root)
    stored = json.loads((root / "snapshots" / read_current(root) / "manifest.json").read_text())
    assert stored["build"]["ray"]["address"] == address

    # `update --ray` embeds only the new photos on the cluster and reuses the rest
    make_photos(photos, range(90, 92), prefix="new")
    report = update_cli(root, photos, "--ray", address, "--ray-actors", "1")
    assert report["embedding"]["engine"] == "ray"
    assert report["counts"]["embedded"] == 2 and report["counts"]["from_previous"] == 24
    assert report["counts"]["added"] == 2 and report["counts"]["indexed"] == 26
