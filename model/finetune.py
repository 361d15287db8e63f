"""Fine-tuning the backbone's top blocks with class labels, before the adapter and IIAE.

The paper's IIAE read VGG-16 features fine-tuned with class labels on the training classes. Our
default keeps the backbone frozen and adapts its features with a projection on cached features
(`model.adapter`). This module is the other option: the last N blocks of an EfficientNet-Lite
backbone (and its head convolution) are trained with the adapter's cross-entropy over the seen
classes on both domains.

How: the frozen part (the stem and the blocks before the tuned ones) runs once per feature row (the
same (record, view) rows as the feature cache, so the same sketch renders) and its output maps are
kept in memory as float16. Training then runs only the tuned blocks, which makes each epoch a
fraction of a full forward pass. Batch norms keep their ImageNet statistics (batches of one class
mix are too small to re-estimate them). Epochs are selected on the validation classes' mAP, as for
the adapter. Afterwards every row's features are recomputed with the tuned blocks, and the usual
pipeline (adapter, IIAE, peer) trains on them; the checkpoint stores the tuned tensors next to the
adapter's and IIAE's, and loading applies them to the registry's weights (whose sha256 is still
checked).

Memory: rows x C x H x W x 2 bytes for the maps (EfficientNet-Lite2, 6 blocks: 120 x 17 x 17, 69 KB
per row; the emoji benchmark's 14,700 rows: 1.0 GB). Time on a 2-core CPU is in docs/BENCHMARKS.md;
on a GPU host each stage takes seconds.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.adapter import AdapterConfig, CosineClassifier, FeatureAdapter
from model.backbones import (
    ORT_MAX_ERROR,
    Backbone,
    OnnxRuntimeNet,
    PooledEfficientNetLite,
    create_backbone,
    export_onnx,
)
from model.features import FeatureSet, ViewDataset, collate_views
from model.pipeline import resolve_device
from model.train import balanced_batch, class_loss, prepare, train_all, val_map
from model.tuned_tensors import PREFIX, tensors_sha256

LOG = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    blocks: int = 6  # the last N blocks of the backbone, plus its head convolution
    lr: float = 1e-4  # the tuned blocks' learning rate (the adapter and classifier keep theirs)
    max_epochs: int = 8
    patience: int = 2
    batch: int = 64  # sketch rows and photo rows per step, each


def _lite(net: nn.Module) -> PooledEfficientNetLite:
    if not isinstance(net, PooledEfficientNetLite):
        raise ValueError(f"fine-tuning is implemented for the EfficientNet-Lite backbones, not {type(net).__name__}")
    return net


class Stem(nn.Module):
    """The frozen part: stem convolution and blocks [0, start) of `trunk`. Output: the feature map."""

    def __init__(self, trunk: PooledEfficientNetLite, start: int):
        super().__init__()
        self.trunk = _lite(trunk)
        self.start = start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.blocks(self.trunk.stem(x), 0, self.start)


class Top(nn.Module):
    """The tuned part: blocks [start, end) of `trunk` and its head, pooled as the backbone pools them.

    Only those parts require gradients (`split_backbone`); the trunk's others are not run. A tap on
    block start-1 (the stem's output) is pooled from the input map; taps further down would need the
    stem to hand on more than its map, so `split_backbone` refuses them.
    """

    def __init__(self, trunk: PooledEfficientNetLite, start: int):
        super().__init__()
        self.trunk = _lite(trunk)
        self.start = start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.features_from(x, self.start)

    def train(self, mode: bool = True) -> Top:
        super().train(mode)
        for m in self.modules():  # batch norms keep their ImageNet running statistics
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


def split_backbone(backbone: Backbone, blocks: int) -> tuple[Stem, Top, int]:
    """(frozen stem, tuned top, index of the first tuned block), each on its own copy of the backbone's
    network."""
    lite = _lite(backbone.net)
    n = lite.num_blocks
    if not 1 <= blocks <= n:
        raise ValueError(f"--finetune-blocks must be 1..{n} for {backbone.name}, not {blocks}")
    start = n - blocks
    low = [t for t in lite.taps if t < start - 1]
    if low:
        raise ValueError(
            f"{backbone.name} pools block {min(low)}: tune at least {n - min(low) - 1} blocks so that every "
            f"pooled block but the first is tuned (or none of them)"
        )

    def trunk_copy() -> PooledEfficientNetLite:
        trunk = copy.deepcopy(lite).to(memory_format=torch.contiguous_format).float()
        for p in trunk.parameters():
            p.requires_grad_(False)
        return trunk

    stem, top = Stem(trunk_copy(), start).eval(), Top(trunk_copy(), start)
    for part in top.trunk.parts_from(start).values():
        part.requires_grad_(True)
    return stem, top, start


def top_state(top: Top) -> dict[str, torch.Tensor]:
    """The tuned tensors, named as in the backbone network's own state dict (PREFIX added)."""
    out = {}
    for name, part in top.trunk.parts_from(top.start).items():
        for k, v in part.state_dict(prefix=f"{PREFIX}{name}.").items():
            v = v.detach().cpu().contiguous()
            out[k] = v.float() if v.is_floating_point() else v
    return out


# --- the frozen maps -------------------------------------------------------------------------------
def _stem_on_onnxruntime(stem: Stem, backbone: Backbone, torch_run) -> OnnxRuntimeNet | None:
    """The frozen blocks as an onnxruntime graph (float32) when it gives torch's maps on a probe batch;
    None keeps torch's path, which is always correct."""
    size = backbone.image_size
    try:
        ort = OnnxRuntimeNet(export_onnx(stem, size, backbone.spec.mean, backbone.spec.std), torch.get_num_threads())
        probe = torch.randint(0, 256, (2, 3, size, size), generator=torch.Generator().manual_seed(0),
                              dtype=torch.uint8)
        with torch.no_grad():
            want, got = torch_run(probe).float(), ort(probe)
        error = float((got - want).abs().max() / want.abs().max().clamp_min(1.0))
        if not error <= ORT_MAX_ERROR:
            raise RuntimeError(f"its maps differ from torch's by {error:.2g} (relative)")
    except Exception as exc:  # torch's path is always correct
        LOG.warning("frozen blocks on torch's CPU path: onnxruntime is not usable (%s)", exc)
        return None
    LOG.info("frozen blocks: CPU forward by onnxruntime %s (%d threads)", ort.version, ort.threads)
    return ort


def stem_maps(
    root: str | Path,
    records: Sequence,
    record: np.ndarray,
    view: np.ndarray,
    backbone: Backbone,
    stem: Stem,
    seed: int,
    device: torch.device,
    batch_size: int = 32,
    workers: int = 1,
    progress: bool = True,
) -> torch.Tensor:
    """float16 (N, C, H, W) maps of the given (record, view) rows, rendered as the feature cache was."""
    jobs = list(zip(record.tolist(), view.tolist(), strict=True))
    size = backbone.image_size
    stem = stem.to(device).eval()
    mean = torch.tensor(backbone.spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.spec.std, device=device).view(1, 3, 1, 1)

    def torch_run(pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.to(device).float() / 255.0 - mean) / std
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            return stem(x)

    ort = _stem_on_onnxruntime(stem, backbone, torch_run) if device.type == "cpu" else None

    def run(pixels: torch.Tensor) -> torch.Tensor:
        return ort(pixels) if ort is not None else torch_run(pixels)

    with torch.no_grad():
        shape = run(torch.zeros(1, 3, size, size, dtype=torch.uint8)).shape[1:]
    out = torch.empty((len(jobs), *shape), dtype=torch.float16)
    ds = ViewDataset(Path(root), records, jobs, backbone.preprocess, seed)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_views,
                        prefetch_factor=4 if workers > 0 else None)
    pos = 0
    with torch.no_grad(), tqdm(total=len(jobs), unit="img", disable=not progress, desc="frozen blocks") as bar:
        for pixels, errors in loader:
            bad = [e for e in errors if e]
            if bad:  # these rows decoded when the feature cache was made
                raise RuntimeError(f"an image of the feature cache no longer decodes: {bad[0]}")
            out[pos : pos + len(pixels)] = run(pixels).to("cpu", torch.float16)
            pos += len(pixels)
            bar.update(len(pixels))
    return out


def top_features(top: Top, maps: torch.Tensor, device: torch.device, batch: int = 256) -> torch.Tensor:
    """float32 (N, D) features of cached maps through the (tuned) top."""
    top.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(maps), batch):
            x = maps[i : i + batch].to(device).float()
            out.append(top(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


# --- training --------------------------------------------------------------------------------------
def finetune_top(
    td,
    maps: torch.Tensor,
    top: Top,
    fcfg: FinetuneConfig,
    cfg,
    log,
    device: torch.device,
) -> tuple[Top, dict]:
    """Train `top` with a fresh adapter and cosine classifier (cross-entropy over td's train classes).

    `td` is model.train.TrainData of the frozen features (labels, parts, domains of the same rows as
    `maps`). The epoch with the best validation-class mAP of the adapter's embedding is kept.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 3)
    train = td.label >= 0
    sk = np.flatnonzero(train & (td.domain == 0))
    ph = np.flatnonzero(train & (td.domain == 1))
    adapter = FeatureAdapter(AdapterConfig(input_dim=td.feats.shape[1], output_dim=cfg.adapter_dim,
                                           hidden_dim=cfg.adapter_hidden, dropout=cfg.adapter_dropout,
                                           output=cfg.adapter_output))
    adapter.fit_standardisation(td.feats[sk], "sketch")
    adapter.fit_standardisation(td.feats[ph], "photo")
    head = CosineClassifier(cfg.adapter_dim, len(td.classes))
    top, adapter, head = top.to(device), adapter.to(device), head.to(device)
    opt = torch.optim.AdamW([
        {"params": [p for p in top.parameters() if p.requires_grad], "lr": fcfg.lr},
        {"params": list(adapter.parameters()) + list(head.parameters()), "lr": cfg.adapter_lr},
    ], weight_decay=cfg.adapter_weight_decay)
    labels = torch.from_numpy(td.label).to(device)
    steps = max(1, (len(sk) + len(ph)) // (2 * fcfg.batch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, fcfg.max_epochs * steps)
    q_val = np.flatnonzero((td.part == "val") & (td.view == 0))

    def encode_val() -> float:
        top.eval()
        adapter.eval()
        feats = td.feats.clone()
        feats[q_val] = top_features(top, maps[q_val], device)
        vtd = copy.copy(td)
        vtd.feats = feats
        with torch.no_grad():
            return val_map(vtd, lambda x, d: F.normalize(adapter(x.to(device), d), dim=-1).cpu())

    def state():
        return {k: v.detach().clone() for k, v in top.state_dict().items()}

    best = (encode_val(), 0, state())
    log({"stage": "finetune", "epoch": 0, "val_mAP": round(best[0], 4)})
    history = [{"epoch": 0, "val_mAP": best[0]}]
    t0 = time.perf_counter()
    for epoch in range(1, fcfg.max_epochs + 1):
        top.train()
        adapter.train()
        head.train()
        losses = []
        for _ in range(steps):
            bs, bp = balanced_batch(rng, sk, ph, fcfg.batch)
            f = top(maps[np.concatenate([bs, bp])].to(device).float())
            loss = class_loss(head, adapter, f[: len(bs)], f[len(bs):], labels[bs], labels[bp], cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        vm = encode_val()
        history.append({"epoch": epoch, "ce": float(np.mean(losses)), "val_mAP": vm})
        log({"stage": "finetune", "epoch": epoch, "ce": round(float(np.mean(losses)), 4), "val_mAP": round(vm, 4),
             "seconds": round(time.perf_counter() - t0, 1)})
        if vm > best[0]:
            best = (vm, epoch, state())
        elif epoch - best[1] >= fcfg.patience:
            break
    top.load_state_dict(best[2])
    top.eval()
    return top.cpu(), {"selected_epoch": best[1], "val_mAP": best[0], "history": history,
                       "seconds": round(time.perf_counter() - t0, 1)}


# --- the whole stage, then the usual training on the tuned features ------------------------------------
def finetune_and_train(
    dataset: str | Path,
    records: Sequence,
    fs,
    split,
    cfg,
    fcfg: FinetuneConfig,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    backbone_weights: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Tune the top blocks on `split`'s training classes, recompute every row's features with them
    (written to OUT/features for `sbir eval`), then `train_all` on those; the checkpoint carries the
    tuned tensors. Returns train_all's summary with a "finetune" entry."""
    device = resolve_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = fs.meta.get("plan", {})
    bb_desc = plan.get("backbone", {})
    if bb_desc.get("finetuned"):
        raise ValueError("these features come from a fine-tuned backbone: fine-tune from the frozen backbone's cache")
    backbone = create_backbone(bb_desc["name"], weights_path=backbone_weights,
                               expected_sha256=bb_desc.get("weights_sha256"), cpu_runtime="torch")
    stem, top, start = split_backbone(backbone, fcfg.blocks)
    with (out_dir / "finetune_log.jsonl").open("w") as log_file:

        def log(entry: dict) -> None:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()
            LOG.info(" ".join(f"{k}={v}" for k, v in entry.items()))

        t0 = time.perf_counter()
        # the model's sketch family only, its views as cached (stem_maps renders each row's view)
        keep = fs.family(records, cfg.stroke_norm)
        fs = FeatureSet(fs.feats[keep], fs.record[keep], fs.view[keep], fs.meta)
        td = prepare(fs, list(records), split, cfg.stroke_norm, cfg.extra_styles, skip_styles=cfg.skip_styles)
        maps = stem_maps(dataset, records, fs.record, fs.view, backbone, stem, seed=int(plan.get("seed", 0)),
                         device=device, workers=workers, progress=progress)
        t_maps = time.perf_counter() - t0
        # the split must reproduce the cached features (up to float16 maps and the CPU runtime)
        probe = np.arange(min(16, len(maps)))
        got = top_features(top, maps[probe], device)
        want = td.feats[probe]
        error = float((got - want).norm(dim=1).max() / want.norm(dim=1).min().clamp_min(1e-6))
        log({"stage": "finetune", "frozen_rows": len(maps), "map_shape": list(maps.shape[1:]),
             "map_bytes": maps.numel() * 2, "seconds": round(t_maps, 1), "split_check_rel_error": round(error, 5)})
        if not error < 0.05:
            raise RuntimeError(f"the split backbone does not reproduce the cached features (relative error {error:.3g})")
        top, info = finetune_top(td, maps, top, fcfg, cfg, log, device)
        feats = top_features(top, maps, device)
        del maps
    tensors = top_state(top)
    tuned_info = {"blocks": fcfg.blocks, "from_block": start, "tensors": len(tensors), "sha256": tensors_sha256(tensors)}
    meta = json.loads(json.dumps(fs.meta))
    meta.pop("plan_id", None)
    meta["plan"]["backbone"] = dict(bb_desc) | {"finetuned": tuned_info}
    meta["finetune"] = {"config": fcfg.__dict__, **{k: v for k, v in info.items() if k != "history"},
                        "frozen_seconds": round(t_maps, 1)}
    tuned_fs = FeatureSet(feats.numpy(), fs.record.copy(), fs.view.copy(), meta)
    tuned_fs.save(out_dir / "features")
    summary = train_all(tuned_fs, list(records), split, cfg, out_dir, backbone_tensors=tensors,
                        extra_training={"finetune": meta["finetune"]})
    summary["finetune"] = meta["finetune"]
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
