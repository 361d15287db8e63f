"""Service settings: SBIR_* environment, flags over environment, unsafe values refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from model.ground.errors import UserError
from sbir.cli import build_parser
from service.commands import settings_from_args
from service.settings import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("SBIR_"):
            monkeypatch.delenv(name)


def test_environment_is_read(monkeypatch, tmp_path):
    monkeypatch.setenv("SBIR_SNAPSHOT_ROOT", str(tmp_path))
    monkeypatch.setenv("SBIR_MAX_K", "50")
    monkeypatch.setenv("SBIR_CORS_ORIGINS", "http://a.example, http://b.example")
    monkeypatch.setenv("SBIR_ADMIN_TOKEN", "t" * 20)
    monkeypatch.setenv("SBIR_LOG_LEVEL", "DEBUG")
    s = Settings()
    assert s.snapshot_root == tmp_path and s.max_k == 50 and s.log_level == "debug"
    assert s.cors_origins == ["http://a.example", "http://b.example"]
    assert s.admin_token.get_secret_value() == "t" * 20
    assert "t" * 20 not in repr(s)  # the token never shows in logs


def test_flags_override_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SBIR_PORT", "9000")
    monkeypatch.setenv("SBIR_MAX_BATCH", "4")
    monkeypatch.setenv("SBIR_CPU_RUNTIME", "onnxruntime")
    args = build_parser().parse_args(
        ["serve", str(tmp_path), "--port", "9100", "--cors-origin", "http://x", "--cpu-runtime", "torch"]
    )
    s = settings_from_args(args)
    assert s.port == 9100 and s.max_batch == 4 and s.cors_origins == ["http://x"] and s.cpu_runtime == "torch"
    assert s.snapshot_root == tmp_path


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("admin_token", "short", "at least 16"),
        ("admin_token", " " + "x" * 20, "surrounding spaces"),
        ("max_upload_bytes", 0, "greater than 0"),
        ("max_k", 0, "greater than or equal to 1"),
        ("default_k", 200, "larger than max_k"),
        ("max_batch", 0, "greater than or equal to 1"),
        ("max_wait_ms", -1, "greater than or equal to 0"),
        ("port", 70000, "less than or equal to 65535"),
        ("log_level", "loud", "Input should be"),
        ("cpu_runtime", "tensorrt", "Input should be"),
    ],
)
def test_unsafe_or_meaningless_values_are_refused(tmp_path, field, value, words):
    with pytest.raises(ValidationError, match=words):
        Settings(snapshot_root=tmp_path, **{field: value})


def test_empty_admin_token_means_disabled(tmp_path):
    assert Settings(snapshot_root=tmp_path, admin_token="").admin_token is None


def test_cli_reports_bad_settings_without_a_traceback(tmp_path):
    args = build_parser().parse_args(["serve", str(tmp_path), "--admin-token", "short"])
    with pytest.raises(UserError, match="admin_token"):
        settings_from_args(args)
    args = build_parser().parse_args(["serve"])
    with pytest.raises(UserError, match="snapshot_root"):
        settings_from_args(args)
