"""The ground module every stage shares (model.ground): durable writes, file hashes, usable cores."""

from __future__ import annotations

import hashlib
import os

import pytest

from model.ground import files
from model.ground.errors import UserError
from model.ground.files import sha256_file, usable_cores, write_atomic, write_bytes_atomic, write_text_atomic


def test_a_write_replaces_the_file_and_syncs_its_folder(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(files, "fsync_dir", lambda path: synced.append(path))
    target = tmp_path / "a.json"
    target.write_text("old")
    write_text_atomic(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert synced == [tmp_path]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    write_bytes_atomic(target, b"old")

    def half_then_fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_sha256_file_is_the_bytes_sha256_across_blocks(tmp_path):
    data = os.urandom(files.BLOCK * 2 + 17)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(str(tmp_path / "empty")) == hashlib.sha256(b"").hexdigest()


def test_usable_cores_is_this_process_s_affinity():
    assert usable_cores() == len(os.sched_getaffinity(0)) >= 1


def test_the_cli_s_user_error_is_the_ground_s():
    from sbir.errors import UserError as FromCli

    assert FromCli is UserError
