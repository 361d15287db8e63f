"""`sbir demo` reuses a cached model only when its split, features and training settings all match."""

import json

from model.data.dataset import Split
from model.train import TrainConfig
from sbir.demo import cached_model_state

SPLIT = Split(name="s", seed=0, train=["a", "b"], val=["c"], unseen=["d"])
PLAN = {"backbone": {"name": "efficientnet_lite2_ms"}, "records_sha256": "1" * 64}


def _write(model_dir, config: dict, split=SPLIT, plan=PLAN):
    model_dir.mkdir(parents=True, exist_ok=True)
    training = {"split": split.to_dict(), "features": plan, "config": config}
    (model_dir / "config.json").write_text(json.dumps({"training": training}))


def test_a_model_with_the_same_split_features_and_settings_is_reused(tmp_path):
    cfg = TrainConfig(peer=False).to_dict()
    assert cached_model_state(tmp_path / "none", SPLIT, PLAN, cfg) == "missing"
    _write(tmp_path / "m", cfg)
    assert cached_model_state(tmp_path / "m", SPLIT, PLAN, cfg) == "reuse"


def test_changed_defaults_mean_training_again(tmp_path):
    """A model from before a default changed (here: no weight average, no `adapter_output`) is not reused."""
    old = TrainConfig(peer=False).to_dict()
    old.pop("adapter_output")
    old["iiae_ema"] = 0.0
    _write(tmp_path / "m", old)
    assert cached_model_state(tmp_path / "m", SPLIT, PLAN, TrainConfig(peer=False).to_dict()) == "settings"


def test_other_split_or_features_are_not_reused(tmp_path):
    cfg = TrainConfig(peer=False).to_dict()
    other = Split(name="s", seed=1, train=["a"], val=["b"], unseen=["c", "d"])
    _write(tmp_path / "split", cfg, split=other)
    assert cached_model_state(tmp_path / "split", SPLIT, PLAN, cfg) == "missing"
    _write(tmp_path / "plan", cfg, plan={**PLAN, "records_sha256": "2" * 64})
    assert cached_model_state(tmp_path / "plan", SPLIT, PLAN, cfg) == "missing"
