"""Training: feature adapter (cross-entropy over seen classes), then IIAE on its outputs.

Everything runs on cached backbone features (`model.features`). Model selection (adapter epochs,
IIAE steps) uses the validation classes, a slice of the seen classes; unseen classes are never
looked at. A symmetric-InfoNCE peer on the same pairs can be trained for comparison.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from model.adapter import AdapterConfig, CosineClassifier, FeatureAdapter
from model.data.dataset import Record, Split
from model.defaults import (
    DEFAULT_ADAPTER_OUTPUT,
    DEFAULT_IIAE_EMA,
    DEFAULT_RERANK,
    DEFAULT_RERANK_RAW_WEIGHT,
    DEFAULT_RERANK_TOP,
    DEFAULT_RERANK_WEIGHT,
)
from model.features import EDGE_VIEW, NORM_VIEW, FeatureSet, drawn_from_photo, is_freehand, is_silhouette
from model.iiae import IIAE, IIAEConfig
from model.metrics import evaluate_retrieval
from model.peer import InfoNCEPeer
from model.pipeline import SBIRModel
from model.rerank import RerankConfig
from model.stroke_norm import VERSION as STROKE_NORM_VERSION

LOG = logging.getLogger(__name__)

MEMBER_SEED_STRIDE = 1000  # member i trains with seed + 1000 i (each stage draws from seed, seed + 1 and seed + 2)


@dataclass
class TrainConfig:
    seed: int = 0
    # adapter
    adapter_dim: int = 512
    adapter_hidden: int = 0
    adapter_dropout: float = 0.5
    adapter_output: str = DEFAULT_ADAPTER_OUTPUT  # what IIAE receives: "bn" or "l2" (model/adapter.py, AdapterConfig.output)
    adapter_lr: float = 1e-3
    adapter_weight_decay: float = 1e-3
    adapter_batch: int = 128
    adapter_max_epochs: int = 40
    adapter_patience: int = 6
    # validations per epoch (the position kept may then be a fraction of an epoch; the refit runs the
    # same fraction of its own epochs)
    adapter_evals_per_epoch: int = 1
    label_smoothing: float = 0.1
    # IIAE (release recipe: Adam lr 2e-4, beta1 0.5, one same-class pair per class per step)
    objective: str = "release"
    lam: float = 1.0
    beta: float = 0.5
    latent_dim: int = 64
    rec_weight: float = 10.0  # the release's 10 * MSE (mean over feature dims)
    # Chosen on the validation classes (docs/BENCHMARKS.md): instance pairs and lr 1e-3 reached a higher
    # validation mAP than the release's 2e-4 with random same-class pairs in the steps we can afford.
    iiae_lr: float = 1e-3
    iiae_max_steps: int = 3000
    iiae_eval_every: int = 250
    # Validate, keep and serve an exponential moving average of IIAE's weights (batch-norm statistics
    # included) with this decay; 0 keeps the raw weights. Chosen by 4-fold CV over seen classes.
    iiae_ema: float = DEFAULT_IIAE_EMA
    pair_by: str = "instance"  # a sketch with a photo of the same item (same class where items are unknown)
    # Stroke normalisation (model.stroke_norm: one line width, fills outlined, framed alike). Chosen
    # on validation classes with the training styles only (docs/BENCHMARKS.md, "Drawing styles"):
    # queries as drawn, and the normalised twins of the training sketches as one more drawing style
    # in training (norm_augment). stroke_norm=True normalises every sketch, training and queries.
    stroke_norm: bool = False
    norm_augment: bool = True
    # With norm_augment: encode a query as drawn and as its stroke-normalised twin, each part of the
    # row the direction of their weighted sum (SBIRModel.merge_views; two images a query). Chosen on
    # validation classes over three training seeds (docs/BENCHMARKS.md, "The query's twin").
    query_twin: bool = True
    # The normalised view's weight in that sum (the drawn view's is 1); chosen on validation over
    # three training seeds from {0.5, 1, 2} (docs/BENCHMARKS.md, "The query's twin").
    query_twin_weight: float = 0.5
    # Train on the dataset's extra drawing-style sets that are not held out (the emoji benchmark's
    # Tabler icons); False keeps them out of training but still validates on their seen classes.
    extra_styles: bool = True
    # Style sets (manifest `style_set` keys) kept out of training although extra_styles is on: they
    # still validate, so one can stand in for a style never trained on.
    skip_styles: tuple[str, ...] = ()
    # Train on the feature cache's made drawing styles (`sbir features --freehand-views/--silhouette-views`:
    # freehand redraws of the training sketches, silhouettes made from the training photos); False leaves
    # those rows out. True needs them in the cache.
    freehand: bool = False
    silhouettes: bool = False
    # InfoNCE peer: a comparison model, and the served second stage below
    peer: bool = True
    peer_temperature: float = 0.1
    peer_max_steps: int = 3000
    # which output is the served embedding; "iiae" unless IIAE is switched off
    embedding: str = "iiae"
    # The served second stage (model/rerank.py): IIAE's top `rerank_top` candidates re-ordered by a
    # weighted mean of zs's cosine, the InfoNCE peer's ("adapter": the adapter's output; "none": zs
    # alone; share `rerank_weight`) and the standardised backbone features' (share `rerank_raw_weight`).
    # Chosen on validation classes (docs/BENCHMARKS.md, "Served re-ranking").
    rerank: str = DEFAULT_RERANK
    rerank_top: int = DEFAULT_RERANK_TOP
    rerank_weight: float = DEFAULT_RERANK_WEIGHT
    rerank_raw_weight: float = DEFAULT_RERANK_RAW_WEIGHT
    # int8-aware training: each step reads this share of its rows' features (and adapter outputs) from
    # their int8 twins (the same render through the int8 backbone: `sbir train --int8-features`), so
    # the learned maps see int8's error as one more variation; 0 trains on float32 only.
    int8_swap: float = 0.0
    # Style-statistics mixing in the adapter's training: this share of each batch's rows is re-styled,
    # its per-dimension mean and std (those of its drawing style's training rows: domain, style set or
    # artist, drawn or stroke-normalised) moved a random part of the way to another style's of the same
    # domain (MixStyle on the cached features' statistics); 0 trains on the features as they are.
    style_mix: float = 0.0
    refit: bool = True  # after selection, train again on train+val classes for the selected epochs/steps
    # Members: this many adapter + IIAE + peer triples, the first as above, each other trained with its own
    # seed (seed + MEMBER_SEED_STRIDE * i) for the epochs and steps the first selected, on what the first
    # was finally trained on; the served parts are the members' joined (SBIRModel, "members"). 2 chosen on
    # validation classes over three training seeds against 1 (docs/BENCHMARKS.md, "Two members").
    members: int = 2
    # Seconds after which IIAE's selection stops early (keeping the best step so far); 0: no limit.
    # Off by default: a wall-clock limit makes the selected step depend on the machine's load (a run
    # beside other jobs once stopped at step 500 of 3,000), and a seed must give the same model.
    time_budget_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainData:
    """Rows of a FeatureSet grouped by split part, with integer class ids."""

    feats: torch.Tensor
    classes: list[str]
    label: np.ndarray  # per row, -1 where not a train class
    instance: np.ndarray  # per row, instance id (or -1)
    domain: np.ndarray  # per row: 0 sketch, 1 photo
    view: np.ndarray
    part: np.ndarray  # per row: "train" | "val" | "unseen" | ""
    val_label: np.ndarray
    split: Split
    data_sha256: str = ""
    counts: dict = field(default_factory=dict)
    twin: torch.Tensor | None = None  # int8 twins of `feats`, row for row (TrainConfig.int8_swap)
    style: np.ndarray | None = None  # per row, its drawing style's id (TrainConfig.style_mix)


def prepare(fs: FeatureSet, records: list[Record], split: Split, stroke_norm: bool = False,
            extra_styles: bool = True, norm_augment: bool = False, freehand: bool = False,
            silhouettes: bool = False, skip_styles: Sequence[str] = ()) -> TrainData:
    """Training and validation rows of `split`. Held-out records (`Record.heldout`) and edge maps
    are never part of either; without `extra_styles`, style-set records only validate (those of
    `skip_styles` only validate either way); freehand and
    silhouette rows train with `freehand` / `silhouettes` (silhouettes are sketch rows made from a
    photo record) and are never validation queries. With
    `norm_augment` the normalised sketch rows stay beside the drawn ones (as views NORM_VIEW + v:
    training rows, never validation queries)."""
    if stroke_norm or not norm_augment:
        fs = fs.for_sketches(records, stroke_norm)
    gran = split.granularity
    rec_label = np.array([r.label(gran) for r in records])
    made = ((freehand, is_freehand, "--freehand-views"), (silhouettes, is_silhouette, "--silhouette-views"))
    for wanted, has, flag in made:
        if wanted and not has(fs.view).any():
            raise ValueError(f"these features have no such rows: recompute them with `sbir features {flag} K`")
    rec_domain = np.array([0 if r.domain == "sketch" else 1 for r in records])
    part_of = {c: "train" for c in split.train} | {c: "val" for c in split.val} | {c: "unseen" for c in split.unseen}
    rec_part = np.array([part_of.get(lbl, "") for lbl in rec_label])
    inst_names = sorted({r.instance or r.path for r in records})
    inst_id = {n: i for i, n in enumerate(inst_names)}
    rec_inst = np.array([inst_id[r.instance or r.path] for r in records])
    classes = sorted(split.train)
    cid = {c: i for i, c in enumerate(classes)}
    vid = {c: i for i, c in enumerate(sorted(split.val))}
    row_label = np.array([cid.get(lbl, -1) for lbl in rec_label])[fs.record]
    row_val = np.array([vid.get(lbl, -1) for lbl in rec_label])[fs.record]
    # edge-map rows are photos turned into a drawing style we never train on: not training data
    part = rec_part[fs.record].copy()
    part[fs.view % NORM_VIEW == EDGE_VIEW] = ""
    made_sil, made_free = is_silhouette(fs.view), is_freehand(fs.view)
    part[(made_sil & (not silhouettes)) | (made_free & (not freehand))] = ""
    part[(made_sil | made_free) & (part == "val")] = ""
    # held-out drawing styles: evaluation only, whatever their class
    part[np.array([r.heldout for r in records])[fs.record]] = ""
    if not extra_styles or skip_styles:
        unknown = set(skip_styles) - {r.style_set for r in records}
        if unknown:
            raise ValueError(f"no style set {sorted(unknown)} in this dataset")
        left_out = np.array([bool(r.style_set) and (not extra_styles or r.style_set in skip_styles)
                             for r in records])[fs.record]
        part[left_out & (part == "train")] = ""
    h = hashlib.sha256()
    train_rec = sorted({int(i) for i in fs.record[part == "train"]})
    for i in train_rec:
        h.update(f"{records[i].path}|{records[i].domain}|{rec_label[i]}\n".encode())
    h.update(json.dumps(fs.meta.get("plan", {}), sort_keys=True).encode())
    td = TrainData(
        feats=torch.from_numpy(fs.feats).float(),
        classes=classes,
        label=np.where(part == "train", row_label, -1),
        instance=rec_inst[fs.record],
        domain=np.where(drawn_from_photo(fs.view), 0, rec_domain[fs.record]),
        view=fs.view,
        part=part,
        val_label=np.where(part == "val", row_val, -1),
        split=split,
        data_sha256=h.hexdigest(),
    )
    # one id per (domain, style set or artist, normalised view or not): the groups style mixing reads
    _, rec_style = np.unique(np.array([r.style_set or r.artist for r in records], dtype=object).astype(str),
                             return_inverse=True)
    key = (td.domain * (rec_style.max() + 1) + rec_style[fs.record]) * 2 + (fs.view >= NORM_VIEW)
    td.style = np.unique(key, return_inverse=True)[1].reshape(-1)
    for p in ("train", "val"):
        for d, name in ((0, "sketch"), (1, "photo")):
            td.counts[f"{p}_{name}_rows"] = int(((part == p) & (td.domain == d)).sum())
    if td.counts["train_sketch_rows"] == 0 or td.counts["train_photo_rows"] == 0:
        raise ValueError("the split leaves no training sketches or photos")
    return td


def aligned_twins(fs: FeatureSet, twins: FeatureSet | None) -> FeatureSet:
    """`twins` (an int8 cache of the same plan) in `fs`'s row order; every row of `fs` must have one."""
    if twins is None:
        raise ValueError("int8_swap needs the int8 feature cache of the same rows: `sbir features DATASET "
                         "--cpu-precision int8`, then `sbir train --int8-features DIR`")
    plan, other = dict(fs.meta.get("plan", {})), dict(twins.meta.get("plan", {}))
    if other.get("backbone", {}).get("precision") != "int8":
        raise ValueError("the int8 twins must come from an int8 feature cache (its plan says another precision)")
    for p in (plan, other):
        p.pop("backbone", None)
    if plan != other:
        raise ValueError("the int8 cache was made with another plan (views, records or seed) than the features")
    where = {j: i for i, j in enumerate(zip(twins.record.tolist(), twins.view.tolist(), strict=True))}
    try:
        rows = np.array([where[j] for j in zip(fs.record.tolist(), fs.view.tolist(), strict=True)], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"the int8 cache lacks row (record, view) {exc.args[0]}: it skipped an image the "
                         "float32 cache has") from None
    return FeatureSet(twins.feats[rows], fs.record, fs.view, twins.meta)


def _val_rows(td: TrainData) -> tuple[np.ndarray, np.ndarray]:
    q = np.flatnonzero((td.part == "val") & (td.domain == 0) & (td.view == 0))
    g = np.flatnonzero((td.part == "val") & (td.domain == 1) & (td.view == 0))
    return q, g


def val_map(td: TrainData, encode) -> float:
    """mAP@all on the validation classes; `encode(feats, domain)` -> embeddings."""
    q, g = _val_rows(td)
    if len(q) == 0 or len(g) == 0:
        return float("nan")
    with torch.no_grad():
        qe = encode(td.feats[q], "sketch")
        ge = encode(td.feats[g], "photo")
    rep = evaluate_retrieval(np.asarray(qe), td.val_label[q], np.asarray(ge), td.val_label[g], ks=(), map_ks=())
    return rep.map_all


def _reader(main: torch.Tensor, twin: torch.Tensor | None, share: float, seed: int):
    """rows -> main[rows], a random `share` of them read from `twin` instead (its own generator, so
    the other random draws of a training run do not move)."""
    if twin is None or share <= 0:
        return lambda rows: main[rows]
    rng = np.random.default_rng([seed, 8])

    def read(rows: np.ndarray) -> torch.Tensor:
        x = main[rows]
        swap = rng.random(len(rows)) < share
        if swap.any():
            x = x.clone()
            x[torch.from_numpy(swap)] = twin[rows[swap]]
        return x

    return read


def _style_mixer(td: TrainData, share: float, seed: int):
    """(rows, features) -> the features with a random `share` of rows re-styled (TrainConfig.style_mix):
    row x of style g becomes (x - mu_g) / sd_g * sd' + mu', with (mu', sd') = (1 - a) (mu_g, sd_g) + a (mu_h,
    sd_h) for a random other training style h of the same domain and a ~ U(0, 1). Statistics are those of the
    training rows; styles with fewer than 2 training rows are left as they are. Its own generator."""
    train = td.label >= 0
    if share <= 0 or td.style is None:
        return lambda rows, x: x
    stats, peers = {}, {}
    for g in np.unique(td.style[train]):
        rows = np.flatnonzero(train & (td.style == g))
        if len(rows) >= 2:
            f = td.feats[rows]
            stats[int(g)] = (f.mean(0), f.std(0).clamp_min(1e-4), int(td.domain[rows[0]]))
    for g, (_, _, d) in stats.items():
        peers[g] = [h for h, (_, _, e) in stats.items() if e == d and h != g]
    if not any(peers.values()):
        return lambda rows, x: x
    mu = torch.zeros(int(td.style.max()) + 1, td.feats.shape[1])
    sd = torch.ones_like(mu)
    for g, (m, s, _) in stats.items():
        mu[g], sd[g] = m, s
    rng = np.random.default_rng([seed, 9])

    def mix(rows: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        g = td.style[rows]
        pick = (rng.random(len(rows)) < share) & np.array([bool(peers.get(int(v))) for v in g])
        if not pick.any():
            return x
        idx = np.flatnonzero(pick)
        h = np.array([peers[int(v)][rng.integers(len(peers[int(v)]))] for v in g[idx]])
        a = torch.from_numpy(rng.random((len(idx), 1))).float()
        gi, hi = torch.from_numpy(g[idx]), torch.from_numpy(h)
        new_mu = (1 - a) * mu[gi] + a * mu[hi]
        new_sd = (1 - a) * sd[gi] + a * sd[hi]
        x = x.clone()
        sel = torch.from_numpy(idx)
        x[sel] = (x[sel] - mu[gi]) / sd[gi] * new_sd + new_mu
        return x

    return mix


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def balanced_batch(rng: np.random.Generator, sk: np.ndarray, ph: np.ndarray, batch: int):
    """`batch` training sketch rows and `batch` photo rows (with replacement only if too few)."""
    return (rng.choice(sk, batch, replace=len(sk) < batch), rng.choice(ph, batch, replace=len(ph) < batch))


def class_loss(head: nn.Module, adapter: FeatureAdapter, f_s, f_p, y_s, y_p, label_smoothing: float):
    """The adapter's objective: mean of the two domains' cross-entropies over the training classes."""
    return 0.5 * (
        F.cross_entropy(head(adapter(f_s, "sketch")), y_s, label_smoothing=label_smoothing)
        + F.cross_entropy(head(adapter(f_p, "photo")), y_p, label_smoothing=label_smoothing)
    )


def train_adapter(td: TrainData, cfg: TrainConfig, log, stop_at: float | None = None) -> tuple[FeatureAdapter, dict]:
    """Early-stopped on validation mAP; with `stop_at`, exactly that many epochs (a fraction allowed)
    and no validation."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dim = td.feats.shape[1]
    adapter = FeatureAdapter(
        AdapterConfig(input_dim=dim, output_dim=cfg.adapter_dim, hidden_dim=cfg.adapter_hidden,
                      dropout=cfg.adapter_dropout, output=cfg.adapter_output)
    )
    train = td.label >= 0
    sk = np.flatnonzero(train & (td.domain == 0))
    ph = np.flatnonzero(train & (td.domain == 1))
    adapter.fit_standardisation(td.feats[sk], "sketch")
    adapter.fit_standardisation(td.feats[ph], "photo")
    head = CosineClassifier(cfg.adapter_dim, len(td.classes))
    params = list(adapter.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.adapter_lr, weight_decay=cfg.adapter_weight_decay)
    labels = torch.from_numpy(td.label)
    read = _reader(td.feats, td.twin, cfg.int8_swap, cfg.seed)
    restyle = _style_mixer(td, cfg.style_mix, cfg.seed)
    steps_per_epoch = max(1, (len(sk) + len(ph)) // (2 * cfg.adapter_batch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.adapter_max_epochs * steps_per_epoch)
    # validated every `every` steps (once an epoch by default); positions are in epochs, fractions allowed
    per = max(1, cfg.adapter_evals_per_epoch)
    total = max(1, round((stop_at or cfg.adapter_max_epochs) * steps_per_epoch))
    checks = {round(k * steps_per_epoch / per) for k in range(1, per * (cfg.adapter_max_epochs + 1) + 1)} | {total}

    def encode(x, domain):
        adapter.eval()
        return F.normalize(adapter(x, domain), dim=-1)

    best = (-1.0, 0.0, _state(adapter))
    history = []
    losses = []
    for step in range(1, total + 1):
        adapter.train()
        head.train()
        bs, bp = balanced_batch(rng, sk, ph, cfg.adapter_batch)
        loss = class_loss(head, adapter, restyle(bs, read(bs)), restyle(bp, read(bp)), labels[bs], labels[bp],
                          cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step not in checks:
            continue
        epoch = round(step / steps_per_epoch, 4) if per > 1 else step // steps_per_epoch
        vm = val_map(td, encode) if stop_at is None else float("nan")
        history.append({"epoch": epoch, "ce": float(np.mean(losses)), "val_mAP": vm})
        log({"stage": "adapter", "epoch": epoch, "ce": round(float(np.mean(losses)), 4), "val_mAP": round(vm, 4)})
        losses = []
        if stop_at is not None:
            best = (vm, epoch, _state(adapter))
        elif vm > best[0]:
            best = (vm, epoch, _state(adapter))
        elif epoch - best[1] >= cfg.adapter_patience:
            break
    adapter.load_state_dict(best[2])
    adapter.eval()
    return adapter, {"selected_epoch": best[1], "val_mAP": best[0], "history": history}


class _Pairs:
    """One random sketch row and one random photo row of every training class, per step."""

    def __init__(self, td: TrainData, rng: np.random.Generator, pair_by: str):
        self.rng = rng
        train = td.label >= 0
        self.sk = [np.flatnonzero(train & (td.domain == 0) & (td.label == c)) for c in range(len(td.classes))]
        self.ph = [np.flatnonzero(train & (td.domain == 1) & (td.label == c)) for c in range(len(td.classes))]
        self.classes = [c for c in range(len(td.classes)) if len(self.sk[c]) and len(self.ph[c])]
        self.pair_by = pair_by
        if pair_by == "instance":
            self.ph_by_inst: dict[int, np.ndarray] = {}
            rows = np.flatnonzero(train & (td.domain == 1))
            for inst in np.unique(td.instance[rows]):
                self.ph_by_inst[int(inst)] = rows[td.instance[rows] == inst]
            self.instance = td.instance

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        s = np.array([self.rng.choice(self.sk[c]) for c in self.classes])
        if self.pair_by == "instance":
            p = np.array([
                self.rng.choice(self.ph_by_inst.get(int(self.instance[r]), self.ph[c]))
                for r, c in zip(s, self.classes, strict=True)
            ])
        else:
            p = np.array([self.rng.choice(self.ph[c]) for c in self.classes])
        return s, p


def adapted(td: TrainData, adapter: FeatureAdapter, feats: torch.Tensor | None = None) -> torch.Tensor:
    """Adapter outputs of every row (of `feats` if given: td's twins), each with its own domain's
    standardisation."""
    feats = td.feats if feats is None else feats
    out = torch.empty(len(feats), adapter.cfg.output_dim)
    adapter.eval()
    with torch.no_grad():
        for d, name in ((0, "sketch"), (1, "photo")):
            rows = np.flatnonzero(td.domain == d)
            if len(rows):
                out[rows] = adapter(feats[rows], name)
    return out


def train_iiae(
    td: TrainData, a: torch.Tensor, cfg: TrainConfig, log, stop_at: int | None = None,
    a_twin: torch.Tensor | None = None,
) -> tuple[IIAE, dict]:
    """Best step on validation mAP; with `stop_at`, exactly that many steps and no validation."""
    if not 0.0 <= cfg.iiae_ema < 1.0:
        raise ValueError(f"iiae_ema must be in [0, 1), not {cfg.iiae_ema}")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    icfg = IIAEConfig(input_dim=a.shape[1], latent_dim=cfg.latent_dim, objective=cfg.objective,
                      lam=cfg.lam, beta=cfg.beta, rec_weight=cfg.rec_weight)
    model = IIAE(icfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.iiae_lr, betas=(0.5, 0.999), fused=True)
    ema = (torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.iiae_ema), use_buffers=True)
        if cfg.iiae_ema > 0 else None)
    served = ema.module if ema is not None else model
    pairs = _Pairs(td, rng, cfg.pair_by)
    read = _reader(a, a_twin, cfg.int8_swap, cfg.seed + 1)
    n_train_sketch_rows = td.counts["train_sketch_rows"]
    steps_per_epoch = max(1, n_train_sketch_rows // max(1, len(pairs.classes)))

    def encode(x_rows, domain):
        served.eval()
        return served.encode_sketches(x_rows) if domain == "sketch" else served.encode_photos(x_rows)

    # val_map encodes raw rows; IIAE needs adapter outputs, so evaluate on `a`
    adapted_td = TrainData(a, td.classes, td.label, td.instance, td.domain, td.view, td.part, td.val_label,
                           td.split)
    best = (-1.0, 0, _state(served))
    history, terms_acc = [], []
    start = time.perf_counter()
    last = stop_at or cfg.iiae_max_steps
    for step in range(1, last + 1):
        model.train()
        s, p = pairs.sample()
        loss, terms = model.loss(read(s), read(p), step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        terms_acc.append(terms)
        if step % steps_per_epoch == 0 or step == last:
            mean_terms = {k: round(float(np.mean([t[k] for t in terms_acc])), 4) for k in terms_acc[0]}
            log({"stage": "iiae", "epoch": round(step / steps_per_epoch, 2), "step": step, **mean_terms})
            terms_acc = []
        if stop_at is not None:
            if step == last:
                best = (float("nan"), step, _state(served))
        elif step % cfg.iiae_eval_every == 0 or step == last:
            vm = val_map(adapted_td, encode)
            history.append({"step": step, "val_mAP": vm})
            log({"stage": "iiae", "step": step, "val_mAP": round(vm, 4)})
            if vm > best[0]:
                best = (vm, step, _state(served))
            if cfg.time_budget_s > 0 and time.perf_counter() - start > cfg.time_budget_s:
                LOG.warning("IIAE time budget of %.0f s reached at step %d", cfg.time_budget_s, step)
                log({"stage": "iiae", "step": step, "stopped": "time budget", "budget_s": cfg.time_budget_s})
                break
    model.load_state_dict(best[2])
    model.eval()
    return model, {"selected_step": best[1], "val_mAP": best[0], "steps_per_epoch": steps_per_epoch,
                   "history": history}


def train_peer(
    td: TrainData, a: torch.Tensor, cfg: TrainConfig, log, stop_at: int | None = None,
    a_twin: torch.Tensor | None = None,
) -> tuple[InfoNCEPeer, dict]:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 2)
    peer = InfoNCEPeer(a.shape[1], cfg.latent_dim)
    opt = torch.optim.Adam(peer.parameters(), lr=1e-3, fused=True)
    pairs = _Pairs(td, rng, cfg.pair_by)
    read = _reader(a, a_twin, cfg.int8_swap, cfg.seed + 2)
    adapted_td = TrainData(a, td.classes, td.label, td.instance, td.domain, td.view, td.part, td.val_label,
                           td.split)
    best = (-1.0, 0, _state(peer))
    last = stop_at or cfg.peer_max_steps
    for step in range(1, last + 1):
        s, p = pairs.sample()
        logits = peer.encode(read(s), "sketch") @ peer.encode(read(p), "photo").t() / cfg.peer_temperature
        target = torch.arange(len(s))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if stop_at is not None:
            if step == last:
                best = (float("nan"), step, _state(peer))
        elif step % cfg.iiae_eval_every == 0 or step == last:
            with torch.no_grad():
                vm = val_map(adapted_td, peer.encode)
            log({"stage": "infonce", "step": step, "loss": round(loss.item(), 4), "val_mAP": round(vm, 4)})
            if vm > best[0]:
                best = (vm, step, _state(peer))
    peer.load_state_dict(best[2])
    return peer.eval(), {"selected_step": best[1], "val_mAP": best[0]}


def train_all(
    fs: FeatureSet,
    records: list[Record],
    split: Split,
    cfg: TrainConfig,
    out_dir: str | Path,
    backbone=None,
    backbone_tensors: dict | None = None,
    extra_training: dict | None = None,
    progress: Callable[[dict], None] | None = None,
    int8_twins: FeatureSet | None = None,
) -> dict:
    """Train adapter, IIAE (and the peer); save the checkpoint under out_dir/model. Returns a summary.

    `backbone_tensors`: fine-tuned backbone tensors (model.finetune) that produced `fs`, saved in the
    checkpoint; `extra_training`: more entries for the config's "training" record; `progress`: called
    with every training-log entry as it is written (`sbir demo`'s progress bar); `int8_twins`: the
    int8 cache of the same rows, read with `cfg.int8_swap`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train_log.jsonl"
    log_file = log_path.open("w")

    def log(entry: dict) -> None:
        log_file.write(json.dumps(entry) + "\n")
        log_file.flush()
        LOG.info(" ".join(f"{k}={v}" for k, v in entry.items()))
        if progress is not None:
            progress(entry)

    if not cfg.query_twin_weight > 0:
        raise ValueError(f"the query twin's weight must be above 0, not {cfg.query_twin_weight}")
    if cfg.rerank == "infonce" and not cfg.peer:
        raise ValueError("re-ranking with the InfoNCE peer needs the peer: drop --no-peer or choose --rerank")
    twins = aligned_twins(fs, int8_twins) if cfg.int8_swap > 0 else None

    def data(split_: Split) -> TrainData:
        args = (records, split_, cfg.stroke_norm, cfg.extra_styles, cfg.norm_augment, cfg.freehand, cfg.silhouettes,
                cfg.skip_styles)
        td_ = prepare(fs, *args)
        if twins is not None:
            td_.twin = prepare(twins, *args).feats
        return td_

    def encoded(td_: TrainData, adapter_: FeatureAdapter):
        return adapted(td_, adapter_), (adapted(td_, adapter_, td_.twin) if td_.twin is not None else None)

    t0 = time.perf_counter()
    td = data(split)
    log({"stage": "data", **td.counts, "classes": len(td.classes), "val_classes": len(split.val)})
    adapter, a_info = train_adapter(td, cfg, log)
    a, a_twin = encoded(td, adapter)
    iiae, i_info = train_iiae(td, a, cfg, log, a_twin=a_twin)
    peer, p_info = train_peer(td, a, cfg, log, a_twin=a_twin) if cfg.peer else (None, {})
    t_select = time.perf_counter() - t0
    if cfg.refit and split.val:
        # Settings are chosen; the validation classes now become training data too (as in the
        # papers' 100-class training), each stage run for exactly the epochs/steps selected above.
        split_used = Split(name=split.name, seed=split.seed, train=sorted(split.train + split.val), val=[],
                           unseen=split.unseen, granularity=split.granularity)
        td = data(split_used)
        log({"stage": "refit", **td.counts, "classes": len(td.classes)})
        adapter, _ = train_adapter(td, cfg, log, stop_at=a_info["selected_epoch"])
        a, a_twin = encoded(td, adapter)
        iiae, _ = train_iiae(td, a, cfg, log, stop_at=i_info["selected_step"], a_twin=a_twin)
        if cfg.peer:
            peer, _ = train_peer(td, a, cfg, log, stop_at=p_info["selected_step"], a_twin=a_twin)
    if cfg.members < 1:
        raise ValueError(f"a model needs at least one member, not {cfg.members}")
    more_members = []
    for m in range(1, cfg.members):
        # the same data and the first member's selected epochs and steps; its own seed
        cfg_m = replace(cfg, seed=cfg.seed + MEMBER_SEED_STRIDE * m)
        log({"stage": "member", "member": m, "seed": cfg_m.seed})
        adapter_m, _ = train_adapter(td, cfg_m, log, stop_at=a_info["selected_epoch"])
        a_m, a_twin_m = encoded(td, adapter_m)
        iiae_m, _ = train_iiae(td, a_m, cfg_m, log, stop_at=i_info["selected_step"], a_twin=a_twin_m)
        peer_m = (train_peer(td, a_m, cfg_m, log, stop_at=p_info["selected_step"], a_twin=a_twin_m)[0]
                  if cfg.peer else None)
        more_members.append((adapter_m, iiae_m, peer_m))
    summary = {
        "adapter": {k: v for k, v in a_info.items() if k != "history"},
        "iiae": {k: v for k, v in i_info.items() if k != "history"},
        "refit_on_train_and_val": bool(cfg.refit and split.val),
        "seconds": {"selection": round(t_select, 1), "refit": round(time.perf_counter() - t0 - t_select, 1)},
        "members": cfg.members,
    }
    if peer is not None:
        save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(out_dir / "peer_infonce.safetensors"))
        summary["infonce"] = p_info
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    rerank = None
    if cfg.rerank != "none" and cfg.embedding == "iiae":
        dim = (cfg.latent_dim if cfg.rerank == "infonce" else cfg.adapter_dim) * cfg.members
        raw_dim = adapter.cfg.input_dim if cfg.rerank_raw_weight > 0 else 0
        rerank = RerankConfig(cfg.rerank, dim, cfg.rerank_top, cfg.rerank_weight, cfg.rerank_raw_weight,
                              raw_dim).to_dict()
    config = {
        "embedding": cfg.embedding,
        "rerank": rerank,
        "sketch_preprocessing": {"stroke_norm": cfg.stroke_norm, "stroke_norm_version": STROKE_NORM_VERSION,
                                 # only where training read the normalised twins beside the drawn sketches
                                 "query_twin": bool(cfg.query_twin and cfg.norm_augment and not cfg.stroke_norm
                                                    and ((td.view >= NORM_VIEW) & (td.part == "train")).any()),
                                 "query_twin_weight": cfg.query_twin_weight},
        "training": {
            "config": cfg.to_dict(),
            "split": split.to_dict(),
            "trained_on": td.split.to_dict(),
            "granularity": split.granularity,
            "data_sha256": td.data_sha256,
            "features": fs.meta.get("plan", {}),
            **({"int8_twins": {"plan_id": int8_twins.meta.get("plan_id"),
                               "backbone": int8_twins.meta.get("plan", {}).get("backbone")}} if twins else {}),
            "counts": td.counts,
            "selected": {"adapter_epoch": a_info["selected_epoch"], "iiae_step": i_info["selected_step"]},
            "val_mAP": {"adapter": a_info["val_mAP"], "iiae": i_info["val_mAP"]},
        } | (extra_training or {}),
    }
    with_peer = bool(rerank) and cfg.rerank == "infonce"
    if not with_peer:
        # the further members' peers are not in the served model: kept beside it, so that `sbir eval`
        # compares the InfoNCE peer member for member, as it does the adapter and IIAE
        for m, (_, _, peer_m) in enumerate(more_members, start=1):
            if peer_m is not None:
                save_file({k: v.contiguous() for k, v in peer_m.state_dict().items()},
                          str(out_dir / f"peer_infonce_member{m}.safetensors"))
    model = SBIRModel(backbone, adapter, iiae, config, device="cpu", peer=peer if with_peer else None,
                      more_members=[(a_, i_, p_ if with_peer else None) for a_, i_, p_ in more_members])
    model.backbone_tensors = dict(backbone_tensors or {})
    if backbone is None:
        config["backbone"] = fs.meta["plan"]["backbone"]
    sha = model.save(out_dir / "model")
    summary["model_sha256"] = sha
    log({"stage": "done", **summary["seconds"], "model_sha256": sha})
    log_file.close()
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
