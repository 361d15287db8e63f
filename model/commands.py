"""`sbir features`, `sbir train`, `sbir eval`: the model half of the CLI (heavy imports deferred)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from model.defaults import DEFAULT_BACKBONE
from model.ground.errors import UserError
from model.ground.files import sha256_file

LOG = logging.getLogger(__name__)

# `sbir train` flags that set a field of TrainConfig (model/train.py): (flag, field, argparse keywords,
# help). The defaults live in the dataclass alone: a flag that is not given leaves its field at the
# default, and `sbir train --help` reads the defaults from the dataclass when it prints (importing it
# loads torch, so the parser itself does not).
TRAIN_FLAGS: tuple[tuple[str, str, dict, str], ...] = (
    ("--seed", "seed", {"type": int}, "seed of the training run"),
    ("--objective", "objective", {"choices": ["release", "paper"]}, "IIAE's objective"),
    ("--lam", "lam", {"type": float}, "IIAE lambda"),
    ("--adapter-evals-per-epoch", "adapter_evals_per_epoch", {"type": int},
     "validate the adapter this many times an epoch (it may then stop within its first epoch)"),
    ("--beta", "beta", {"type": float}, "IIAE beta (release form)"),
    ("--rec-weight", "rec_weight", {"type": float}, "weight of each reconstruction MSE (the release: 10)"),
    ("--iiae-steps", "iiae_max_steps", {"type": int}, "maximum IIAE steps (best on val is kept)"),
    ("--iiae-lr", "iiae_lr", {"type": float}, "IIAE learning rate (the release: 2e-4)"),
    ("--iiae-ema", "iiae_ema", {"type": float, "metavar": "DECAY"},
     "validate and keep a moving average of IIAE's weights with this decay (0: the raw weights)"),
    ("--pair-by", "pair_by", {"choices": ["category", "instance"]},
     "IIAE pairs: same item (falls back to same class) or random same-class (the release)"),
    ("--adapter-output", "adapter_output", {"choices": ["bn", "l2"]},
     "what IIAE receives: the adapter's batch-normalised output (bn) or its direction only (l2)"),
    ("--iiae-time-budget", "time_budget_s", {"type": float, "metavar": "SECONDS"},
     "stop IIAE's selection after this long, keeping its best step so far (0: no limit; a limit makes the "
     "result depend on the machine's load)"),
    ("--stroke-norm", "stroke_norm", {"action": "store_const", "const": True},
     "normalise every sketch's strokes, in training and at query time (docs/MODEL.md)"),
    ("--no-norm-augment", "norm_augment", {"action": "store_const", "const": False},
     "do not train on the stroke-normalised twins of the sketches (queries are then as drawn only)"),
    ("--no-query-twin", "query_twin", {"action": "store_const", "const": False},
     "encode a query as drawn only, not also as its twin after stroke normalisation (one forward a query, not two)"),
    ("--query-twin-weight", "query_twin_weight", {"type": float, "metavar": "W"},
     "the normalised twin's weight when a query's two views are joined (the drawn view's is 1)"),
    ("--no-extra-styles", "extra_styles", {"action": "store_const", "const": False},
     "train on the core sketches only, not on the dataset's extra style sets (they still validate)"),
    ("--leave-out-style", "skip_styles", {"action": "append", "metavar": "KEY"},
     "keep this style set (a manifest style_set, e.g. tabler) out of training; it still validates (repeatable)"),
    ("--freehand", "freehand", {"action": "store_const", "const": True},
     "train on the feature cache's freehand redraws of the training sketches (`sbir features --freehand-views`)"),
    ("--silhouettes", "silhouettes", {"action": "store_const", "const": True},
     "train on the feature cache's silhouettes made from training photos (`sbir features --silhouette-views`)"),
    ("--int8-swap", "int8_swap", {"type": float, "metavar": "SHARE"},
     "read this share of each step's rows from their int8 twins (needs the int8 cache: --int8-features)"),
    ("--style-mix", "style_mix", {"type": float, "metavar": "SHARE"},
     "re-style this share of the adapter's training rows: their style's feature statistics moved towards another's"),
    ("--members", "members", {"type": int, "metavar": "K"},
     "train K adapter + IIAE + peer members with their own seeds; the served rows join theirs (docs/MODEL.md, 'Members')"),
    ("--no-refit", "refit", {"action": "store_const", "const": False},
     "keep the selection-phase model (train classes only)"),
    ("--no-peer", "peer", {"action": "store_const", "const": False},
     "skip the InfoNCE peer (needs --rerank adapter or none)"),
    ("--rerank", "rerank", {"choices": ["infonce", "adapter", "none"]},
     "the served second stage over IIAE's candidates (docs/MODEL.md, 'Re-ranking')"),
    ("--rerank-top", "rerank_top", {"type": int, "metavar": "R"}, "IIAE candidates the second stage re-orders"),
    ("--rerank-weight", "rerank_weight", {"type": float, "metavar": "W"},
     "the re-ranking vector's cosine's share of the score"),
    ("--rerank-raw-weight", "rerank_raw_weight", {"type": float, "metavar": "U"},
     "the standardised backbone features' cosine's share of the score (0: leave them out of the rows)"),
)
# The same for FinetuneConfig (model/finetune.py); their argparse dests are "finetune_" + field.
FINETUNE_FLAGS: tuple[tuple[str, str, dict, str], ...] = (
    ("--finetune-lr", "lr", {"type": float}, "the tuned blocks' learning rate"),
    ("--finetune-epochs", "max_epochs", {"type": int}, "maximum epochs (best on val is kept)"),
)


def _config_defaults() -> dict[str, tuple[str, object]]:
    """argparse dest -> (field, default) of every config flag, read from the dataclasses."""
    from model.finetune import FinetuneConfig
    from model.train import TrainConfig

    train = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    tune = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    return {field: (field, train[field]) for _, field, _, _ in TRAIN_FLAGS} | {
        f"finetune_{field}": (field, tune[field]) for _, field, _, _ in FINETUNE_FLAGS
    }


class _ConfigDefaultsHelp(argparse.HelpFormatter):
    """Help that states each config flag's default as the dataclass has it, read when help is printed."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        found = _config_defaults().get(action.dest)
        if found is None:
            return text
        field, default = found
        said = f"{field}={default}" if isinstance(default, bool) else str(default)
        return f"{text} (default {said})".replace("%", "%%") if text else f"default {said}"


def _add_config_flag(parser, flag: str, dest: str, kwargs: dict, text: str) -> None:
    named = {} if "action" in kwargs or "choices" in kwargs else {"metavar": flag[2:].upper().replace("-", "_")}
    parser.add_argument(flag, dest=dest, default=None, help=text, **(named | kwargs))


def _given(args: argparse.Namespace, flags, prefix: str = "") -> dict:
    given = {field: v for _, field, _, _ in flags if (v := getattr(args, prefix + field)) is not None}
    return {field: tuple(v) if isinstance(v, list) else v for field, v in given.items()}  # repeatable flags


def train_config(args: argparse.Namespace):
    """TrainConfig of the flags given; every other field keeps the dataclass's default."""
    from model.train import TrainConfig

    return TrainConfig(**_given(args, TRAIN_FLAGS))


def finetune_config(args: argparse.Namespace):
    from model.finetune import FinetuneConfig

    return FinetuneConfig(blocks=args.finetune_blocks, **_given(args, FINETUNE_FLAGS, "finetune_"))

# The split seeds of the benchmark (docs/BENCHMARKS.md): `sbir calibrate` samples classes all of them train on.
CALIBRATION_SPLITS = ("category_seed0", "category_seed1", "category_seed2")


def default_features_dir(dataset: Path, backbone: str, precision: str = "fp32") -> Path:
    """DATASET/features/BACKBONE, or BACKBONE-int8 for a cache computed by the int8 backbone."""
    return dataset / "features" / (backbone.replace(":", "_") + ("" if precision == "fp32" else f"-{precision}"))


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features",
        help="cache frozen-backbone features of a dataset (resumable)",
        description="Decode, augment and embed every image of a dataset with the frozen backbone. "
        "Killed runs continue where they stopped.",
    )
    p.add_argument("dataset", type=Path, help="dataset directory (with manifest.csv)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"registry name or torchvision:ARCH (default {DEFAULT_BACKBONE})")
    p.add_argument("--backbone-weights", type=Path, help="local weights file (torchvision:ARCH needs one)")
    p.add_argument("--out", type=Path, help="default: DATASET/features/BACKBONE")
    p.add_argument("--sketch-views", type=int, default=3, help="random renders per sketch besides the original")
    p.add_argument("--edge-artists", nargs="*", default=["openmoji"],
                   help="photos by these artists also become edge-map queries (style-held-out check)")
    p.add_argument("--freehand-views", type=int, default=0,
                   help="freehand redraws per trainable sketch (a smooth warp, thinner strokes; a training style)")
    p.add_argument("--silhouette-views", type=int, default=0,
                   help="filled-shape drawings made from each photo of --silhouette-artists (the first as made, "
                   "the rest random renders; a training style)")
    p.add_argument("--silhouette-artists", nargs="*", default=["openmoji"],
                   help="photos by these artists also become silhouette drawings (with --silhouette-views)")
    p.add_argument("--no-stroke-norm", action="store_true",
                   help="skip the stroke-normalised copy of every sketch row (models trained with it need it)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="decoding processes")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-precision", choices=["fp32", "int8", "auto"], default="fp32",
                   help="the backbone's CPU precision (default fp32: a training cache does not depend on the "
                   "CPU); int8 writes DATASET/features/BACKBONE-int8, to evaluate a model served in int8 "
                   "(`sbir eval --features ...`)")
    p.set_defaults(func=cmd_features)

    t = sub.add_parser(
        "train",
        formatter_class=_ConfigDefaultsHelp,
        help="train the adapter and IIAE on cached features of a split's seen classes",
        description="Adapter (cross-entropy over seen classes), then IIAE on its outputs; epochs and steps "
        "selected on the split's validation classes. Writes OUT/model (checkpoint) and a training log.",
    )
    t.add_argument("dataset", type=Path)
    t.add_argument("--split", default="category_seed0", help="split name in DATASET/splits or a path")
    t.add_argument("--features", type=Path, help=f"default: DATASET/features/{DEFAULT_BACKBONE}")
    t.add_argument("--int8-features", type=Path,
                   help=f"the int8 twins read with --int8-swap (default: DATASET/features/{DEFAULT_BACKBONE}-int8)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--granularity", choices=["category", "instance"], help="override the split's")
    for flag, field, kwargs, text in TRAIN_FLAGS:
        _add_config_flag(t, flag, field, kwargs, text)
    t.add_argument("--threads", type=int, default=0)
    f = t.add_argument_group(
        "fine-tuning (off by default; meant for GPU hosts)",
        "Train the backbone's last N blocks with class labels first (model/finetune.py), then the adapter and "
        "IIAE on the tuned features. Needs the dataset's images and the frozen backbone's feature cache.",
    )
    f.add_argument("--finetune-blocks", type=int, default=0, metavar="N",
                   help="tune the last N blocks and the head convolution (0: frozen backbone)")
    for flag, field, kwargs, text in FINETUNE_FLAGS:
        _add_config_flag(f, flag, f"finetune_{field}", kwargs, text)
    f.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    f.add_argument("--workers", type=int, default=1, help="decoding processes for the frozen blocks' pass")
    f.add_argument("--backbone-weights", type=Path, help="local weights file (torchvision:ARCH backbones)")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser(
        "calibrate",
        help="measure the int8 activation ranges of a backbone on a dataset's training images",
        description="Sample sketches and photos of the split's training classes (seeded), measure the exported "
        "graph's activation ranges with onnxruntime and write the calibration file the registry names "
        "(model/calibration/); the recipe is recorded inside it.",
    )
    c.add_argument("dataset", type=Path)
    c.add_argument("--backbone", default=DEFAULT_BACKBONE)
    c.add_argument("--split", nargs="+", default=list(CALIBRATION_SPLITS),
                   help="only classes that all these splits train on are sampled, so that no image of a class "
                   "that one of them evaluates on is calibrated on (default: the benchmark's three split seeds, "
                   f"{' '.join(CALIBRATION_SPLITS)})")
    c.add_argument("--per-domain", type=int, default=64, help="sketches, and as many photos")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--method", default="MinMax", choices=["MinMax", "Percentile", "Entropy"])
    c.add_argument("--out", type=Path, help="default: the registry's calibration file of the backbone")
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser(
        "eval",
        help="zero-shot evaluation on unseen classes: IIAE and baselines side by side",
        description="mAP@all, P@K (REFERENCE §3) for IIAE and the raw-feature, standardised, adapter and "
        "InfoNCE baselines; JSON report and PNG (PR curves and top results). Several runs: mean and spread.",
    )
    e.add_argument("dataset", type=Path)
    e.add_argument("--runs", type=Path, nargs="+", required=True, help="output directories of `sbir train`")
    e.add_argument("--features", type=Path)
    e.add_argument("--out", type=Path, help="report directory (default: first run's dir)")
    e.add_argument("--generalised", action="store_true", help="generalised ZS-SBIR: add 20%% seen-class items")
    e.add_argument("--ties", choices=["stable", "grouped"], default="stable")
    e.add_argument("--precision", choices=["hits/k", "hits/min(k,rel)"], default="hits/k")
    e.add_argument("--map-at-k", choices=["topk", "capped", "divk"], default="topk")
    e.add_argument("--no-figures", action="store_true")
    e.add_argument("--on", choices=["unseen", "val"], default="unseen",
                   help="classes to evaluate on: the unseen ones (the benchmark) or the split's validation "
                        "classes (choosing settings; models trained with --no-refit)")
    e.set_defaults(func=cmd_eval)


def _threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


def _dataset(path: Path):
    from model.data.dataset import read_manifest

    if not (path / "manifest.csv").is_file():
        raise UserError(f"{path} has no manifest.csv: build one with `sbir data ...` first")
    return read_manifest(path)


def cmd_features(args) -> int:
    from model.backbones import WeightsError, create_backbone
    from model.features import extract_features

    _threads(args.threads)
    records = _dataset(args.dataset)
    try:
        backbone = create_backbone(args.backbone, weights_path=args.backbone_weights, cpu_precision=args.cpu_precision)
    except (WeightsError, KeyError, ValueError) as exc:
        raise UserError(str(exc)) from None
    out = args.out or default_features_dir(args.dataset, args.backbone, backbone.precision)
    fs = extract_features(
        args.dataset, records, backbone, out, sketch_views=args.sketch_views, edge_artists=args.edge_artists,
        stroke_norm=not args.no_stroke_norm, freehand_views=args.freehand_views,
        silhouette_views=args.silhouette_views, silhouette_artists=args.silhouette_artists, seed=args.seed,
        batch_size=args.batch_size, workers=args.workers,
    )
    sp = fs.meta["speed"]
    print(f"features: {len(fs.feats)} rows x {fs.feats.shape[1]} in {out}")
    if sp["images"]:
        print(f"  pipeline {sp['images_per_s']} img/s, bare forward {sp['bare_forward_images_per_s']} img/s, "
              f"ratio {sp['ratio_to_bare_forward']}")
    if fs.meta["skipped"]:
        print(f"  skipped {len(fs.meta['skipped'])} unreadable images (see {out / 'features.json'})")
    return 0


def cmd_calibrate(args) -> int:
    from model.backbones import get_spec
    from model.calibrate import calibrate_dataset
    from model.data.dataset import list_splits
    from model.quantize import CalibrationRecipe, calibration_file

    _dataset(args.dataset)
    out = args.out or calibration_file(get_spec(args.backbone).int8_calibration)
    if out is None:
        raise UserError(f"backbone {args.backbone} names no calibration file: give --out")
    splits = tuple(args.split)
    missing = [name for name in splits if name not in list_splits(args.dataset)]
    if missing:
        raise UserError(f"{args.dataset} has no split {missing[0]}: give the splits to sample from with --split")
    recipe = CalibrationRecipe(
        dataset=args.dataset.resolve().name, splits=splits, seed=args.seed, per_domain=args.per_domain,
        method=args.method, manifest_sha256=sha256_file(args.dataset / "manifest.csv"),
    )
    data = calibrate_dataset(args.dataset, args.backbone, recipe, out)
    print(f"calibration: {len(data['images'])} images of the classes {', '.join(splits)} all train on, "
          f"{len(data['ranges']['data'])} tensor ranges, {len(data['float_nodes'])} nodes kept in float32, in {out}")
    return 0


def _load_features(args):
    from model.features import FeatureSet

    path = args.features or default_features_dir(args.dataset, DEFAULT_BACKBONE)
    if not (path / "features.safetensors").is_file():
        raise UserError(f"no features in {path}: run `sbir features {args.dataset}` first")
    return FeatureSet.load(path)


def cmd_train(args) -> int:
    from dataclasses import replace

    from model.data.dataset import load_split
    from model.train import train_all

    _threads(args.threads)
    records = _dataset(args.dataset)
    split = load_split(args.dataset, args.split)
    if args.granularity:
        split = replace(split, granularity=args.granularity)
    fs = _load_features(args)
    cfg = train_config(args)
    if args.finetune_blocks:
        from model.finetune import finetune_and_train

        fcfg = finetune_config(args)
        try:
            summary = finetune_and_train(args.dataset, records, fs, split, cfg, fcfg, args.out, device=args.device,
                                         backbone_weights=args.backbone_weights, workers=args.workers)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    else:
        twins = None
        if cfg.int8_swap > 0:
            from model.features import FeatureSet

            path = args.int8_features or default_features_dir(args.dataset, DEFAULT_BACKBONE, "int8")
            if not (path / "features.safetensors").is_file():
                raise UserError(f"no int8 features in {path}: run `sbir features {args.dataset} --cpu-precision int8`")
            twins = FeatureSet.load(path)
        try:
            summary = train_all(fs, records, split, cfg, args.out, int8_twins=twins)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args) -> int:
    from model.evaluate import evaluate_runs

    records = _dataset(args.dataset)
    fs = _load_features(args)
    try:
        report = evaluate_runs(
            args.dataset, records, fs, args.runs, out_dir=args.out or args.runs[0], generalised=args.generalised,
            ties=args.ties, precision_variant=args.precision, map_variant=args.map_at_k,
            figures=not args.no_figures, on=args.on,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(report["table_markdown"])
    return 0
