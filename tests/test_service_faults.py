"""Broken snapshots under a running `sbir serve`, a reload storm under load, SIGTERM under load.

A truncated FAISS file, a corrupted SQLite file, a model that does not match its hash, CURRENT naming
nothing, and the serving snapshot's folder removed: `sbir index verify` names the fault, the server
refuses to switch and keeps answering from the last good snapshot, and /readyz (its `warnings`) and
/metrics say what happened. docs/RELIABILITY.md has the table.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from test_index_support import sbir
from test_service_support import build_snapshot, drain, make_photos, new_index_root, start_server

from index_builder.snapshot import SnapshotWriter, read_current, snapshots_dir

TOKEN = "faults-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STROKES = {"strokes": [[[10, 120, 240], [200, 20, 200]], [[60, 190], [130, 130]]]}


def metric(client: httpx.Client, name: str, default: float | None = None) -> float:
    """A sample of /metrics; `default` for a labelled counter that has not counted anything yet."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    assert default is not None, f"{name} not in /metrics"
    return default


def wait_for(check: Callable[[], bool], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def served(untrained_checkpoint, tmp_path_factory):
    """(client, root, good snapshot id, template of another snapshot) for one running server."""
    base = tmp_path_factory.mktemp("faults")
    root, good = new_index_root(base, untrained_checkpoint, n_photos=5, seed=41)
    aside = base / "aside"
    other = build_snapshot(make_photos(base / "photos_b", 4, seed=42), untrained_checkpoint, aside)
    proc, url, lines = start_server(root, ["--reload-interval", "0.3"], env={"SBIR_ADMIN_TOKEN": TOKEN})
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, root, good, snapshots_dir(aside) / other
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert "Traceback" not in drain(lines, until="Finished server process")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def overwrite_head(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:100] = b"\xa5" * 100
    path.write_bytes(bytes(data))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


FAULTS = {
    # fault: (file damaged, damage, what `sbir index verify` says, what the refusal says)
    "truncated-faiss": ("index.faiss", truncate, "index.faiss has", "index.faiss"),
    "corrupted-sqlite": ("photos.sqlite", overwrite_head, "photos.sqlite checksum mismatch", "photo store"),
    "model-hash-mismatch": ("model/model.safetensors", flip_a_byte, "model/model.safetensors checksum", "sha256"),
    "current-names-nothing": (None, None, "does not exist", "does not exist"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_broken_snapshot_is_named_by_verify_and_refused_while_the_good_one_serves(served, fault, capsys):
    client, root, good, template = served
    damaged, damage, verify_says, refusal_says = FAULTS[fault]
    refused_before = metric(client, 'sbir_snapshot_reloads_total{outcome="refused"}', default=0)
    target = snapshots_dir(root) / template.name
    if damaged is not None:
        shutil.copytree(template, target)
        damage(target / damaged)
    try:
        SnapshotWriter(root).publish(template.name) if damaged else (root / "CURRENT").write_text(template.name)
        assert sbir("index", "verify", root) == 2
        assert verify_says in capsys.readouterr().err

        r = client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 409 and r.json()["error"]["code"] == "reload-refused", r.text
        assert template.name in r.json()["error"]["message"] and refusal_says in r.json()["error"]["message"]
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["snapshot"] == good
        assert any(template.name in w for w in ready.json()["warnings"])
        assert metric(client, "sbir_snapshot_refused") == 1
        assert metric(client, 'sbir_snapshot_reloads_total{outcome="refused"}') > refused_before
        assert client.post("/search", json=STROKES).json()["snapshot"] == good
    finally:
        SnapshotWriter(root).publish(good)
        shutil.rmtree(target, ignore_errors=True)


def test_the_serving_snapshot_removed_from_disk_keeps_serving_and_says_so(served, capsys):
    client, root, good, template = served
    shutil.rmtree(snapshots_dir(root) / good)
    wait_for(lambda: metric(client, "sbir_snapshot_on_disk") == 0)
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["snapshot"] == good
    assert any("gone from disk" in w for w in ready.json()["warnings"])
    r = client.post("/search", json=STROKES, params={"k": 2})
    assert r.status_code == 200 and r.json()["snapshot"] == good
    assert client.get(f"/photos/{r.json()['results'][0]['id']}").status_code == 200  # photos live elsewhere
    assert sbir("index", "verify", root) == 2 and "does not exist" in capsys.readouterr().err

    # a good snapshot published next is taken up, and the warning clears
    shutil.copytree(template, snapshots_dir(root) / template.name)
    SnapshotWriter(root).publish(template.name)
    assert client.post("/admin/reload", headers=AUTH).json()["snapshot"] == template.name
    ready = client.get("/readyz").json()
    assert ready["snapshot"] == template.name and "warnings" not in ready
    assert metric(client, "sbir_snapshot_on_disk") == 1 and metric(client, "sbir_snapshot_refused") == 0


# --- under load ---------------------------------------------------------------------------------


class Load:
    """`clients` threads searching in a loop until stopped; every answer and every error kept."""

    def __init__(self, url: str, clients: int, fresh_connections: bool = False):
        self.url, self.fresh = url, fresh_connections
        self.stop = threading.Event()
        self.answers: list[str] = []
        self.errors: list[str] = []
        self.refused = 0  # connections the server did not accept (after it began to shut down)
        # Set by a test just before it stops the server: a connection the kernel had completed in the
        # listen backlog but the server never accepted is reset when the listening socket closes (the
        # request was never read, as with a refused one). Before that, a reset is an error.
        self.closing = threading.Event()
        self.reset_unaccepted = 0
        self.threads = [threading.Thread(target=self._loop) for _ in range(clients)]

    def _loop(self) -> None:
        headers = {"Connection": "close"} if self.fresh else {}
        with httpx.Client(base_url=self.url, timeout=60, headers=headers) as c:
            for _ in range(100_000):  # bounded; stopped long before
                if self.stop.is_set():
                    return
                try:
                    r = c.post("/search", params={"k": 3}, json=STROKES)
                except httpx.ConnectError:
                    self.refused += 1
                    time.sleep(0.05)
                    continue
                except httpx.ReadError as exc:
                    if self.closing.is_set() and "reset by peer" in str(exc):
                        self.reset_unaccepted += 1
                    else:
                        self.errors.append(repr(exc))
                    continue
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    continue
                if r.status_code == 200:
                    self.answers.append(r.json()["snapshot"])
                else:
                    self.errors.append(f"{r.status_code} {r.text[:200]}")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


@pytest.mark.parametrize(
    "seconds", [pytest.param(15, id="15s"), pytest.param(60, id="60s", marks=pytest.mark.slow)]
)
def test_a_reload_storm_under_load_loses_no_request(untrained_checkpoint, tmp_path, seconds):
    """CURRENT switches to another snapshot every second (three snapshots in turn, each switch a full
    load of a snapshot that is not serving) while three clients search without pause."""
    root, first = new_index_root(tmp_path, untrained_checkpoint, n_photos=4, seed=51)
    ids = [first] + [
        build_snapshot(make_photos(tmp_path / f"photos_{i}", 4, seed=52 + i), untrained_checkpoint, root)
        for i in range(2)
    ]
    proc, url, lines = start_server(root, ["--reload-interval", "0.2"])
    try:
        with httpx.Client(base_url=url, timeout=30) as probe:
            ok_before = metric(probe, 'sbir_snapshot_reloads_total{outcome="ok"}')
            with Load(url, clients=3) as load:
                writer = SnapshotWriter(root)
                for i in range(seconds):
                    writer.publish(ids[i % 3])
                    time.sleep(1.0)
            reloads = metric(probe, 'sbir_snapshot_reloads_total{outcome="ok"}') - ok_before
            assert probe.get("/readyz").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert load.errors == [] and load.refused == 0
    assert len(load.answers) > seconds and set(load.answers) == set(ids)
    assert reloads >= seconds * 0.8, f"only {reloads} reloads in {seconds} switches"
    assert "Traceback" not in drain(lines, until="Finished server process")
    assert read_current(root) in ids


def test_sigterm_under_load_drains_every_accepted_request(untrained_checkpoint, tmp_path):
    """SIGTERM while clients search without pause (a connection per request) and while four searches
    are half-sent: the half-sent ones, accepted before the signal, are finished after it and
    answered 200; no answer is cut short; later connections are refused (or, for one the kernel had
    queued but the server never accepted, reset as the listening socket closes); the process exits
    cleanly within its grace period."""
    import json
    import socket

    root, first = new_index_root(tmp_path, untrained_checkpoint, n_photos=4, seed=61)
    proc, url, lines = start_server(root, ["--reload-interval", "0"])
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(STROKES).encode()
    head = (f"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    half_sent = []
    try:
        with Load(url, clients=3, fresh_connections=True) as load:
            time.sleep(2.0)
            for _ in range(4):
                sock = socket.create_connection((host, int(port)), timeout=60)
                sock.sendall(head + body[:10])
                half_sent.append(sock)
            time.sleep(1.5)  # read by the server: the requests are in its hands
            load.closing.set()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            answers = []
            for sock in half_sent:
                sock.sendall(body[10:])
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                answers.append(data)
            code = proc.wait(60)
    finally:
        for sock in half_sent:
            sock.close()
        if proc.poll() is None:
            proc.kill()
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 4
    assert all(json.loads(a.split(b"\r\n\r\n", 1)[1])["snapshot"] == first for a in answers)
    assert load.errors == [] and len(load.answers) > 0 and load.refused > 0
    assert code in (0, -signal.SIGTERM)
    log = drain(lines, until="Finished server process")
    assert "Application shutdown complete" in log and "Traceback" not in log
