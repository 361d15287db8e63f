"""Every default once: `sbir train` and `sbir serve` take their defaults (and say them in --help)
from the config they fill, TrainConfig / FinetuneConfig and Settings."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from model.commands import FINETUNE_FLAGS, TRAIN_FLAGS, finetune_config, train_config
from model.finetune import FinetuneConfig
from model.train import TrainConfig
from sbir.cli import build_parser
from service.commands import serve_flags, settings_from_args
from service.settings import Settings


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


# ---- sbir train ----------------------------------------------------------------------------------
def test_train_without_flags_is_the_dataclasses_defaults(tmp_path):
    args = build_parser().parse_args(["train", str(tmp_path), "--out", str(tmp_path / "run")])
    assert train_config(args) == TrainConfig()
    assert finetune_config(args) == FinetuneConfig(blocks=0)


def _other_value(flag: str, kwargs: dict, default):
    if "const" in kwargs:
        return [], kwargs["const"]
    if kwargs.get("action") == "append":  # a repeatable flag: its values, in order
        return ["tabler"], ("tabler",)
    if "choices" in kwargs:
        value = next(c for c in kwargs["choices"] if c != default)
        return [value], value
    value = kwargs["type"](default) * 2 + 1
    return [str(value)], value


@pytest.mark.parametrize("flag, field, kwargs, text", TRAIN_FLAGS, ids=[f[0] for f in TRAIN_FLAGS])
def test_each_train_flag_sets_its_field_and_its_help_says_the_default(tmp_path, flag, field, kwargs, text):
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}[field]
    argv, value = _other_value(flag, kwargs, default)
    assert value != default, "a flag must be able to change its field"
    args = build_parser().parse_args(["train", str(tmp_path), "--out", str(tmp_path), flag, *argv])
    assert train_config(args) == dataclasses.replace(TrainConfig(), **{field: value})
    help_text = " ".join(_subparser("train").format_help().split())
    said = f"{field}={default}" if isinstance(default, bool) else str(default)
    assert f"{' '.join(text.split())} (default {said})" in help_text


@pytest.mark.parametrize("flag, field, kwargs, text", FINETUNE_FLAGS, ids=[f[0] for f in FINETUNE_FLAGS])
def test_each_finetune_flag_sets_its_field_and_its_help_says_the_default(tmp_path, flag, field, kwargs, text):
    default = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}[field]
    argv, value = _other_value(flag, kwargs, default)
    args = build_parser().parse_args(["train", str(tmp_path), "--out", str(tmp_path), "--finetune-blocks", "2",
                                      flag, *argv])
    assert finetune_config(args) == FinetuneConfig(blocks=2, **{field: value})
    assert f"(default {default})" in " ".join(_subparser("train").format_help().split())


# ---- sbir serve ----------------------------------------------------------------------------------
@pytest.fixture
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("SBIR_"):
            monkeypatch.delenv(name)


def test_serve_without_flags_is_the_settings_defaults(tmp_path, clean_env):
    args = build_parser().parse_args(["serve", str(tmp_path)])
    assert settings_from_args(args) == Settings(snapshot_root=tmp_path)


def test_every_setting_has_a_serve_flag_whose_help_is_the_field_s(clean_env):
    flags = serve_flags()
    assert {name for _, name, _, _ in flags} | {"snapshot_root", "cors_origins"} == set(Settings.model_fields)
    help_text = " ".join(_subparser("serve").format_help().split())
    for flag, name, _, _ in flags:
        field = Settings.model_fields[name]
        default = field.get_default()
        said = "" if default is None else f"; default {default}"
        assert f"{flag} " in help_text
        assert f"{' '.join(field.description.split())}{said} (env SBIR_{name.upper()})" in help_text


SERVE_VALUES = {"host": "0.0.0.0", "device": "cpu", "admin_token": "t" * 20, "log_level": "debug"}


@pytest.mark.parametrize("flag, name, kind, text", serve_flags(), ids=[f[0] for f in serve_flags()])
def test_each_serve_flag_sets_its_setting(tmp_path, clean_env, flag, name, kind, text):
    field = Settings.model_fields[name]
    if typing.get_origin(field.annotation) is typing.Literal:
        value = next(c for c in typing.get_args(field.annotation) if c != field.default)
    elif kind in (int, float):
        value = kind(2 if field.default is None else field.default + 1)
    else:
        value = SERVE_VALUES[name]
    args = build_parser().parse_args(["serve", str(tmp_path), flag, str(value)])
    assert settings_from_args(args) == Settings(snapshot_root=tmp_path, **{name: value})
