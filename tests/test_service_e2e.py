"""A real `sbir serve` process: queried over TCP while a new snapshot is published, with no failed request."""

from __future__ import annotations

import io
import signal
import threading
import time

import httpx
from test_service_support import build_snapshot, drain, make_photos, new_index_root, start_server

from service.strokes import render_strokes

SWAP_TIMEOUT_S = 90


def sketch_png() -> bytes:
    out = io.BytesIO()
    render_strokes([[[10, 120, 240], [200, 20, 200]], [[60, 190], [130, 130]]]).save(out, "PNG")
    return out.getvalue()


def test_serve_swaps_snapshots_under_traffic_without_a_failed_request(untrained_checkpoint, tmp_path):
    root, first = new_index_root(tmp_path, untrained_checkpoint, n_photos=5, seed=11)
    proc, url, lines = start_server(root, ["--reload-interval", "0.2", "--max-wait-ms", "5"])
    try:
        with httpx.Client(base_url=url, timeout=30) as probe:
            assert probe.get("/readyz").json() == {"status": "ready", "snapshot": first}

        png = sketch_png()
        stop = threading.Event()
        answers: list[tuple[int, str | None]] = []
        errors: list[str] = []

        def client_loop():
            with httpx.Client(base_url=url, timeout=30) as c:
                for _ in range(2000):  # bounded; the test stops it long before
                    if stop.is_set():
                        return
                    try:
                        r = c.post("/search", params={"k": 3}, files={"file": ("s.png", png, "image/png")})
                    except httpx.HTTPError as exc:
                        errors.append(repr(exc))
                        continue
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text}")
                    else:
                        answers.append((r.status_code, r.json()["snapshot"]))

        clients = [threading.Thread(target=client_loop) for _ in range(3)]
        for t in clients:
            t.start()
        time.sleep(1.0)
        second = build_snapshot(make_photos(tmp_path / "photos_2", 6, seed=12), untrained_checkpoint, root)
        end = time.monotonic() + SWAP_TIMEOUT_S
        while time.monotonic() < end and not any(s == second for _, s in answers[-5:]):
            time.sleep(0.1)
        served_second = sum(s == second for _, s in answers)
        time.sleep(1.0)  # and keep going on the new one for a while
        stop.set()
        for t in clients:
            t.join(60)

        assert errors == []
        snapshots = [s for _, s in answers]
        assert snapshots.count(first) > 0 and served_second > 0
        # once the new snapshot answered, the old one never answers again
        assert first not in snapshots[snapshots.index(second) + len(clients) :]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status says how it ended
    assert code in (0, -signal.SIGTERM)
    log = drain(lines, until="Finished server process")
    assert "Application shutdown complete" in log and "Traceback" not in log
