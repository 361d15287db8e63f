"""The Makefile's test targets: `make test`'s chromium step (.ci/ensure-chromium, with stand-in `id`
and `apt-get` on PATH), and `make test-slow` having tests to run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "ensure-chromium"


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _run(tmp_path: Path, *, uid: int, apt: bool, chromium: Path, skip: bool = False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("touch", "chmod"):  # what the apt-get stand-in uses
        (bin_dir / tool).symlink_to(shutil.which(tool))
    _stub(bin_dir, "id", f"echo {uid}")
    calls = tmp_path / "apt-calls"
    if apt:  # "installs" chromium by creating the binary the script checks for
        _stub(bin_dir, "apt-get", f'echo "$*" >> {calls}\n'
              f'[ "$1" = install ] && touch {chromium} && chmod +x {chromium}\nexit 0')
    # only the stand-ins on PATH: the real apt-get cannot be reached
    env = {"PATH": str(bin_dir), "SBIR_CHROMIUM": str(chromium)}
    if skip:
        env["SBIR_SKIP_BROWSER"] = "1"
    proc = subprocess.run(["/bin/bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    return proc, (calls.read_text().splitlines() if calls.exists() else [])


def test_present_chromium_installs_nothing(tmp_path):
    chromium = tmp_path / "chromium"
    chromium.touch()
    chromium.chmod(0o755)
    proc, calls = _run(tmp_path, uid=0, apt=True, chromium=chromium)
    assert proc.returncode == 0, proc.stderr
    assert calls == []


def test_missing_chromium_is_installed_as_root_with_apt(tmp_path):
    chromium = tmp_path / "chromium"
    proc, calls = _run(tmp_path, uid=0, apt=True, chromium=chromium)
    assert proc.returncode == 0, proc.stderr
    assert calls == ["update -q", "install -y --no-install-recommends chromium"]
    assert os.access(chromium, os.X_OK)


@pytest.mark.parametrize("uid,apt", [(1000, True), (0, False)], ids=["not-root", "no-apt-get"])
def test_otherwise_stops_with_the_command_to_run(tmp_path, uid, apt):
    chromium = tmp_path / "chromium"
    proc, calls = _run(tmp_path, uid=uid, apt=apt, chromium=chromium)
    assert proc.returncode == 1
    assert calls == []
    assert "sudo apt-get install -y --no-install-recommends chromium" in proc.stderr
    assert "SBIR_SKIP_BROWSER=1" in proc.stderr


def test_skip_browser_needs_no_chromium(tmp_path):
    proc, calls = _run(tmp_path, uid=1000, apt=False, chromium=tmp_path / "chromium", skip=True)
    assert proc.returncode == 0 and calls == []


def test_make_test_slow_runs_real_tests():
    """`make test-slow` is `pytest -m slow`: it must select tests (pytest exits 5 when none are)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "slow", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    selected = [line for line in proc.stdout.splitlines() if line.startswith("tests/")]
    assert len(selected) >= 5, proc.stdout[-2000:]
