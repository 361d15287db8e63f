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


def test_training_progress_follows_the_training_log(tmp_path):
    """The demo's training bar follows train_all's log entries: adapter epochs, IIAE steps, the
    InfoNCE peer's steps, then the refit for exactly the selected epoch and step, then the second
    member's adapter and IIAE for the same."""
    import io

    from test_train_e2e import synthetic
    from tqdm import tqdm

    from model.train import train_all
    from sbir.demo import TrainingProgress

    fs, records, split = synthetic(n_classes=24, d=32)
    cfg = TrainConfig(adapter_max_epochs=4, adapter_batch=32, iiae_max_steps=200, iiae_eval_every=50,
                      peer_max_steps=100, adapter_dim=16, latent_dim=8)
    progress = TrainingProgress(cfg, bar=tqdm(total=cfg.adapter_max_epochs, file=io.StringIO()))
    summary = train_all(fs, records, split, cfg, tmp_path, progress=progress)
    assert progress.phases == ["adapter", "IIAE", "InfoNCE peer", "refit adapter", "refit IIAE",
                               "member 2 adapter", "member 2 IIAE"]
    assert progress.bar.n == progress.bar.total == summary["iiae"]["selected_step"]


def test_demo_detail_goes_to_the_log_file_and_the_console_only_when_verbose(tmp_path):
    import io
    import logging

    from sbir.demo import LOG_FILE, run_logging

    console = logging.StreamHandler(stream := io.StringIO())
    root = logging.getLogger()
    root.addHandler(console)
    try:
        for verbose in (False, True):
            with run_logging(tmp_path / str(verbose), verbose) as path:
                logging.getLogger("model.train").info("stage=adapter epoch=1")
                logging.getLogger("model.train").warning("budget reached")
            assert path == tmp_path / str(verbose) / LOG_FILE
            text = path.read_text()
            assert "stage=adapter epoch=1" in text and "budget reached" in text
            assert console.level == logging.NOTSET  # restored
        lines = stream.getvalue().splitlines()
        assert lines == ["budget reached", "stage=adapter epoch=1", "budget reached"]
    finally:
        root.removeHandler(console)
