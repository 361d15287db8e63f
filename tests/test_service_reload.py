"""Hot reload: a new CURRENT swaps in, in-flight requests finish on the old pair, broken ones are refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_service_support import build_snapshot, make_photos, new_index_root, publish_broken_snapshot

from service.app import create_app
from service.settings import Settings
from service.strokes import render_strokes

TOKEN = "reload-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STROKES = {"strokes": [[[0, 50, 100], [0, 80, 0]]]}


def wait_for(predicate, timeout: float = 30.0, every: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture(scope="module")
def collections(untrained_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("reload")
    root, first = new_index_root(base, untrained_checkpoint, n_photos=5, seed=1)
    return base, root, first


def test_new_current_is_served_and_the_old_pair_closes_after_its_requests(collections, untrained_checkpoint):
    base, root, first = collections
    settings = Settings(snapshot_root=root, device="cpu", reload_interval_s=0.1, admin_token=TOKEN)
    app = create_app(settings)
    state = app.state.service.state
    with TestClient(app) as client:
        assert client.post("/search", json=STROKES).json()["snapshot"] == first
        old = state.current
        assert old.acquire()  # a request still running on the old snapshot
        second = build_snapshot(make_photos(base / "photos_2", 7, seed=2), untrained_checkpoint, root)
        assert second != first
        wait_for(lambda: client.get("/info").json()["snapshot"]["id"] == second)
        body = client.post("/search", json=STROKES).json()
        assert body["snapshot"] == second and len(body["results"]) == 7
        assert all("photos_2" in p for p in photo_paths(root, second, [r["id"] for r in body["results"]]))
        new = state.current
        assert new.model is old.model  # same checkpoint: weights were not loaded again
        # The old pair still answers the request that holds it, and closes once that one is done.
        assert not old.closed and not old.closed_event.is_set()
        scores, ids = old.snapshot.search(new.model.encode_sketches([render_strokes(STROKES["strokes"])]), 3)
        assert ids.shape == (1, 3) and (ids >= 0).all()
        old.release()
        assert old.closed_event.wait(10)
        info = client.get("/info").json()
        assert info["last_reload"]["snapshot"] == second and info["last_reload_error"] is None
        assert f'sbir_snapshot_info{{model="{new.snapshot.model_sha256[:16]}",snapshot="{second}"}} 1.0' in (
            client.get("/metrics").text
        )


def photo_paths(root: Path, snapshot_id: str, ids: list[int]) -> list[str]:
    from index_builder.snapshot import Snapshot

    snap = Snapshot.open(root, snapshot_id)
    try:
        return [str(snap.photo_path(i)) for i in ids]
    finally:
        snap.close()


def test_a_broken_snapshot_is_refused_and_the_old_one_keeps_serving(untrained_checkpoint, tmp_path):
    root, good = new_index_root(tmp_path, untrained_checkpoint, n_photos=4, seed=5)
    settings = Settings(snapshot_root=root, device="cpu", reload_interval_s=0.1, admin_token=TOKEN)
    app = create_app(settings)
    state = app.state.service.state
    with TestClient(app) as client:
        assert client.get("/readyz").json()["snapshot"] == good
        photos = make_photos(tmp_path / "photos_bad", 4, seed=6)
        bad = publish_broken_snapshot(photos, untrained_checkpoint, root, tmp_path)
        # the watcher tries it once and refuses it
        error = wait_for(lambda: client.get("/info").json()["last_reload_error"])
        assert error["snapshot"] == bad and bad in error["message"]
        info = client.get("/info").json()
        assert info["snapshot"]["id"] == good and info["ready"]
        assert client.get("/readyz").json()["snapshot"] == good
        body = client.post("/search", json=STROKES).json()
        assert body["snapshot"] == good and len(body["results"]) == 4
        # ... and does not retry the same id on every poll
        refused = metric(client, 'sbir_snapshot_reloads_total{outcome="refused"}')
        assert refused == 1
        polls = state.polls
        wait_for(lambda: state.polls >= polls + 3)  # three more looks at the same CURRENT
        assert metric(client, 'sbir_snapshot_reloads_total{outcome="refused"}') == 1
        # an operator's reload does retry it, and gets the reason
        r = client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 409 and r.json()["error"]["code"] == "reload-refused"
        assert bad in r.json()["error"]["message"]
        assert client.post("/search", json=STROKES).json()["snapshot"] == good


def metric(client, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{line_start} not in /metrics")


def test_starting_on_a_root_without_snapshot_waits_for_one(untrained_checkpoint, tmp_path):
    root = tmp_path / "index"
    root.mkdir()
    settings = Settings(snapshot_root=root, device="cpu", reload_interval_s=0.1)
    app = create_app(settings)
    state = app.state.service.state
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 503 and "CURRENT" in r.json()["error"]["message"]
        assert client.post("/search", json=STROKES).status_code == 503
        (root / "CURRENT").write_text("../../etc/passwd\n")  # garbage: the watcher must survive it
        polls = state.polls
        wait_for(lambda: state.polls >= polls + 2)  # it read the garbage at least once and went on
        assert client.get("/readyz").status_code == 503 and client.get("/healthz").status_code == 200
        (root / "CURRENT").unlink()
        first = build_snapshot(make_photos(tmp_path / "photos", 3, seed=7), untrained_checkpoint, root)
        wait_for(lambda: client.get("/readyz").status_code == 200)
        assert client.post("/search", json=STROKES).json()["snapshot"] == first
