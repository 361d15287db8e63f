"""Schemathesis against a real `sbir serve` process: every operation of the service's own OpenAPI
document, in its examples, coverage, fuzzing and stateful phases, with every check.

Zero 5xx, and every answer matches its documented status codes, content types, headers and body
schemas. The admin token is supplied, so POST /admin/reload is fuzzed too, and a second snapshot is
published before the run, so a reload in the run really swaps. The default run uses a fixed seed
(reproducible in CI); `make test-slow` runs a longer one with a random seed, printed for replay.
docs/RELIABILITY.md lists what this covers.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_service_support import build_snapshot, drain, make_photos, new_index_root, start_server

TOKEN = "fuzz-admin-token-0123456789"
CONFIG = Path(__file__).with_name("schemathesis.toml")
CI_SEED = 20261130
CI_MAX_EXAMPLES = 200  # per operation in the fuzzing phase: about 2,000 cases, under a minute here
MIN_CASES = 1000
ACCESS_LOG = re.compile(r'"([A-Z]+) (\S+) HTTP/1\.1" (\d{3})')


def st_binary() -> str:
    path = Path(sys.executable).with_name("st")
    assert path.exists(), f"schemathesis is not installed next to {sys.executable}: pip install -e '.[dev]'"
    return str(path)


def run_schemathesis(url: str, out: Path, seed: int, max_examples: int, timeout_s: float) -> tuple[int, str]:
    cmd = [
        st_binary(), "--no-color", "--config-file", str(CONFIG),
        "run", f"{url}/openapi.json",
        "--checks", "all",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", str(max_examples),
        "--seed", str(seed),
        "--header", f"Authorization: Bearer {TOKEN}",
        "--continue-on-failure",
        "--generation-database", "none",  # no state carried between runs: the seed alone decides
        "--request-timeout", "60",
        "--report", "junit", "--report-dir", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=out)
    return proc.returncode, proc.stdout + proc.stderr


def fuzz_served_api(untrained_checkpoint, tmp_path, seed: int, max_examples: int, timeout_s: float) -> None:
    root, first = new_index_root(tmp_path, untrained_checkpoint, n_photos=6, seed=21)
    # --reload-interval 0: only POST /admin/reload (called by the fuzzer) can load the second snapshot
    proc, url, lines = start_server(root, ["--reload-interval", "0"], env={"SBIR_ADMIN_TOKEN": TOKEN})
    try:
        second = build_snapshot(make_photos(tmp_path / "photos_b", 7, seed=22), untrained_checkpoint, root)
        code, output = run_schemathesis(url, tmp_path, seed, max_examples, timeout_s)
        with httpx.Client(base_url=url, timeout=30) as probe:
            ready = probe.get("/readyz")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    log = drain(lines, until="Finished server process")
    summary = output[output.rfind("SUMMARY") :] or output[-4000:]
    print(summary)  # shown with -s or -rP: the cases generated, per phase
    assert code == 0, f"schemathesis found problems (seed {seed}):\n{output[-12000:]}"
    generated = re.search(r"(\d+) generated", output)
    assert generated and int(generated.group(1)) >= MIN_CASES, summary
    assert "Traceback" not in log, log[-6000:]

    # The server's own access log, independently of schemathesis' verdict: no 5xx at all, and the
    # fuzzer's admin calls carried the token (a 200 that swapped to the second snapshot).
    answers = ACCESS_LOG.findall(log)
    assert len(answers) >= MIN_CASES, f"{len(answers)} requests in the server's log"
    assert [a for a in answers if a[2].startswith("5")] == []
    assert any(m == "POST" and p == "/admin/reload" and s == "200" for m, p, s in answers)
    assert ready.status_code == 200 and ready.json()["snapshot"] == second != first


def test_fuzz_the_api_with_a_fixed_seed(untrained_checkpoint, tmp_path):
    fuzz_served_api(untrained_checkpoint, tmp_path, CI_SEED, CI_MAX_EXAMPLES, timeout_s=600)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fuzz_the_api_longer_with_a_random_seed(untrained_checkpoint, tmp_path):
    seed = random.SystemRandom().randrange(2**31)
    print(f"schemathesis seed {seed}")  # pytest shows it on failure: replay with this seed
    fuzz_served_api(untrained_checkpoint, tmp_path, seed, max_examples=2000, timeout_s=3000)
