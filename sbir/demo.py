"""`sbir demo`: the whole product on the built-in emoji benchmark, in one command.

Prepares the data (npm packages -> rendered images), caches backbone features, trains the model on
the seen classes of one split (or reuses a model trained on the same data and settings), indexes the
colour emoji gallery and serves it at http://127.0.0.1:8000. Every step is cached, so a second run
starts serving within seconds. The console gets one line and a progress bar per step; the detail
(per-epoch training records, the stages' own log lines) goes to WORK/demo.log, and with --verbose
to the console too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from model.ground.checkpoint import checkpoint_sha256
from model.ground.errors import UserError

LOG = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="build data, train, index and serve the emoji demo (cached; first run about 10 min on 2 cores)",
        description="One command from nothing to a running search service on the built-in emoji benchmark.",
    )
    p.add_argument("--data", type=Path, default=Path("data/emoji"), help="dataset directory")
    p.add_argument("--work", type=Path, default=Path("runs/demo"), help="model and index directory")
    p.add_argument("--split", default="category_seed0", help="the demo model never sees this split's unseen classes")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--sketch-views", type=int, default=1,
                   help="augmented renders per sketch when features must be computed (the benchmark uses 3)")
    p.add_argument("--no-serve", action="store_true", help="prepare everything, then exit")
    # its own dest: a subcommand's default would overwrite `sbir --verbose`'s value
    p.add_argument("--verbose", dest="demo_verbose", action="store_true",
                   help="also print the detail on the console (per-epoch training records, each stage's log "
                        "lines); it always goes to WORK/demo.log")
    p.set_defaults(func=cmd_demo)


LOG_FILE = "demo.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def run_logging(work: Path, verbose: bool) -> Iterator[Path]:
    """Every INFO record (DEBUG with `sbir -v`) to WORK/demo.log; the console's handlers keep only
    warnings unless `verbose`. Restores the handlers' levels afterwards."""
    work.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    path = work / LOG_FILE
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setLevel(min(root.getEffectiveLevel(), logging.INFO))
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    console = [h for h in root.handlers if not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in console]
    root_level = root.level
    root.setLevel(file_handler.level)
    if not verbose:
        for h in console:
            h.setLevel(max(h.level, logging.WARNING))
    root.addHandler(file_handler)
    try:
        yield path
    finally:
        root.removeHandler(file_handler)
        file_handler.close()
        root.setLevel(root_level)
        for h, level in zip(console, levels, strict=True):
            h.setLevel(level)


class TrainingProgress:
    """One tqdm bar for `sbir demo`'s training step, fed by `train_all`'s log entries (its `progress`
    callback): adapter epochs, IIAE steps and the InfoNCE peer's steps, then the adapter and IIAE again
    for the refit on training + validation classes, for exactly the selected epochs and steps, then
    each further member's (`TrainConfig.members`) for the same epochs and steps."""

    UNITS = {"adapter": "epoch", "iiae": "step", "infonce": "step"}
    NAMES = {"adapter": "adapter", "iiae": "IIAE", "infonce": "InfoNCE peer"}

    def __init__(self, cfg, bar=None):
        from tqdm import tqdm

        self.cfg = cfg
        self.bar = bar if bar is not None else tqdm(total=cfg.adapter_max_epochs, unit="epoch", desc="adapter")
        self.phase = ("adapter", False, 0)
        self.best: dict[str, tuple[float, int]] = {s: (-1.0, 0) for s in self.UNITS}  # selection: (val_mAP, pos)
        self.phases = ["adapter"]  # the bar's descriptions so far
        self.refit = False
        self.member = 0  # the member being trained after the first (0: the first)

    def __call__(self, entry: dict) -> None:
        stage = entry.get("stage")
        if stage == "refit":
            self.refit = True
        if stage == "member":
            self.member = int(entry["member"])
        if stage not in self.UNITS:
            return
        pos = int(float(entry["epoch"] if stage == "adapter" else entry.get("step", 0)))
        val = float(entry.get("val_mAP", "nan"))
        fixed = self.refit or self.member > 0
        if not fixed and val > self.best[stage][0]:
            self.best[stage] = (val, pos)
        if (stage, self.refit, self.member) != self.phase:
            self.phase = (stage, self.refit, self.member)
            if fixed:  # the refit and the further members run exactly the selected epochs / steps
                total = self.best[stage][1] or None
            else:
                total = {"adapter": self.cfg.adapter_max_epochs, "iiae": self.cfg.iiae_max_steps,
                         "infonce": self.cfg.peer_max_steps}[stage]
            self.bar.reset(total=total)
            self.bar.unit = self.UNITS[stage]
            self.phases.append((f"member {self.member + 1} " if self.member else "refit " if self.refit else "")
                               + self.NAMES[stage])
            self.bar.set_description(self.phases[-1])
        self.bar.update(pos - self.bar.n)
        if "val_mAP" in entry:
            self.bar.set_postfix(val_mAP=entry["val_mAP"], refresh=False)

    def close(self) -> None:
        self.bar.close()


def _step(n: int, text: str) -> None:
    print(f"[{n}/5] {text}", flush=True)


def _features(data: Path, records, sketch_views: int):
    """Reuse a complete feature cache of the default backbone, whatever its view count; else compute one."""
    from model.backbones import create_backbone
    from model.commands import default_features_dir
    from model.defaults import DEFAULT_BACKBONE
    from model.features import META_FILE, FeatureSet, extract_features

    out = default_features_dir(data, DEFAULT_BACKBONE)
    if (out / META_FILE).is_file() and (out / "features.safetensors").is_file():
        fs = FeatureSet.load(out)
        need = {i for i, r in enumerate(records) if not r.heldout}
        if fs.meta["plan"]["records_sha256"] and len(need - set(fs.record.tolist())) < 0.05 * len(need):
            return fs, out
    backbone = create_backbone(DEFAULT_BACKBONE)
    fs = extract_features(data, records, backbone, out, sketch_views=sketch_views, edge_artists=(), heldout=False)
    return fs, out


def cached_model_state(model_dir: Path, split, features_plan: dict | None, train_config: dict) -> str:
    """"reuse" when model_dir holds a model trained on this split and these features with these
    settings; "settings" when only the settings differ (the defaults changed since); else "missing"."""
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        return "missing"
    trained = json.loads(cfg_path.read_text()).get("training", {})
    if trained.get("split") != split.to_dict() or trained.get("features") != features_plan:
        return "missing"
    # through JSON, as the checkpoint stored it
    return "reuse" if trained.get("config") == json.loads(json.dumps(train_config)) else "settings"


def _train(data: Path, work: Path, records, split, fs) -> Path:
    from model.train import TrainConfig, train_all

    model_dir = work / "model"
    cfg = TrainConfig()  # the peer too: it is the served second stage (model/rerank.py)
    state = cached_model_state(model_dir, split, fs.meta.get("plan"), cfg.to_dict())
    if state == "reuse":
        print(f"      reusing the model in {model_dir} (trained on the same split, features and settings)")
        return model_dir
    if state == "settings":
        print(f"      the model in {model_dir} was trained with other settings than today's defaults: training again")
    progress = TrainingProgress(cfg)
    try:
        summary = train_all(fs, records, split, cfg, work, progress=progress)
    finally:
        progress.close()
    print(f"      validation mAP: adapter {summary['adapter']['val_mAP']:.3f}, IIAE {summary['iiae']['val_mAP']:.3f}"
          f" ({summary['seconds']['total']:.0f} s)")
    return model_dir


def _gallery_manifest(data: Path, records, path: Path) -> Path:
    """The colour emoji as a photo manifest (paths relative to the dataset + metadata) for the index builder."""
    import csv
    import io

    from model.ground.files import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["path", "emoji", "name", "subgroup", "group", "artist"])
    for r in records:
        if r.domain != "photo" or r.heldout:
            continue
        w.writerow([r.path, r.meta.get("emoji", ""), r.meta.get("annotation", ""),
                    r.category, r.meta.get("group", ""), r.artist])
    write_text_atomic(path, text.getvalue())
    return path


def cmd_demo(args) -> int:
    with run_logging(args.work, args.demo_verbose) as log_path:
        print(f"      details in {log_path}" + ("" if args.demo_verbose else " (--verbose: on the console too)"))
        return _demo(args)


def _demo(args) -> int:
    import torch

    from model.data.dataset import load_split, read_manifest

    t0 = time.perf_counter()
    data, work = args.data, args.work
    _step(1, f"emoji benchmark in {data}")
    if not (data / "manifest.csv").is_file():
        from model.data.emoji import build_emoji

        build_emoji(data, seeds=(0, 1, 2))
    # Held-out drawing styles are for `sbir eval` only: the demo neither computes their features,
    # trains on them (training never reads them) nor indexes them.
    records = read_manifest(data)
    split = load_split(data, args.split)
    print(f"      {sum(r.domain == 'sketch' and not r.heldout for r in records)} line drawings, "
          f"{sum(r.domain == 'photo' and not r.heldout for r in records)} colour emoji; split {split.name}: "
          f"{len(split.train)} training, {len(split.val)} validation, {len(split.unseen)} unseen subgroups")

    _step(2, "backbone features (EfficientNet-Lite2, multi-level; computed once, then cached)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    fs, feat_dir = _features(data, records, args.sketch_views)

    _step(3, "training the adapter and IIAE on the seen subgroups (once, then cached)")
    model_dir = _train(data, work, records, split, fs)

    _step(4, "indexing the colour emoji gallery (once, then cached)")
    from index_builder.build import BuildOptions, build
    from index_builder.snapshot import Snapshot, read_current
    index_root = work / "index"
    index_root.mkdir(parents=True, exist_ok=True)
    manifest = _gallery_manifest(data, records, work / "gallery.csv")
    sha = checkpoint_sha256(model_dir)
    current = read_current(index_root)
    reuse = False
    if current:
        snap = Snapshot.open(index_root)
        reuse = snap.model_sha256 == sha
        snap.close()
    if reuse:
        print(f"      reusing snapshot {current}")
    else:
        from index_builder.feature_reuse import seed_cache_from_features

        # in the feature cache's precision (fp32), so that its photo features are reused
        precision = fs.meta["plan"]["backbone"].get("precision", "fp32")
        seeded = seed_cache_from_features(index_root, model_dir, data, records, feat_dir, precision)
        print(f"      {seeded} photo embeddings taken from the feature cache")
        options = BuildOptions(device=args.device, photo_root=data, cpu_precision=precision)
        result = build(manifest, index_root, model_dir, options)
        print(f"      published snapshot {result.snapshot_id}")
    print(f"      ready after {time.perf_counter() - t0:.0f} s")
    if args.no_serve:
        return 0

    _step(5, f"serving on http://{args.host}:{args.port}  (Ctrl-C to stop)")
    print(f"      open http://{args.host}:{args.port}/ in a browser and draw; API docs at /docs")
    from service.server import run
    from service.settings import Settings

    try:
        run(Settings(snapshot_root=index_root, host=args.host, port=args.port, device=args.device))
    except OSError as exc:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {exc}") from None
    return 0
