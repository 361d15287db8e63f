"""Fine-tuning the backbone's top blocks: the split is exact, tuned tensors travel in the checkpoint
and are applied on load (torch and onnxruntime paths), and the whole stage runs end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from model.backbones import create_backbone
from model.data.dataset import Record, Split, write_manifest
from model.evaluate import evaluate_runs
from model.features import FeatureSet, extract_features
from model.finetune import FinetuneConfig, _stem_on_onnxruntime, finetune_and_train, split_backbone, top_state
from model.ground.errors import UserError
from model.pipeline import SBIRModel
from model.train import TrainConfig


@pytest.fixture(scope="module")
def lite2_ms():
    return create_backbone("efficientnet_lite2_ms", cpu_runtime="torch")


def _input(bb, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, bb.image_size, bb.image_size, generator=g)


@pytest.mark.parametrize("name,blocks", [("efficientnet_lite2_ms", 6), ("efficientnet_lite2_ms", 21),
                                         ("efficientnet_lite2", 3)])
def test_stem_then_top_is_the_backbone(name, blocks):
    bb = create_backbone(name, cpu_runtime="torch")
    stem, top, start = split_backbone(bb, blocks)
    x = _input(bb)
    with torch.no_grad():
        want = bb.net(x.contiguous(memory_format=torch.channels_last))
        got = top.eval()(stem(x))
    assert start == bb.net.num_blocks - blocks
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_frozen_blocks_run_on_onnxruntime_with_torchs_maps(lite2_ms):
    """stem_maps' CPU path: the frozen blocks exported to onnxruntime, checked against torch (the
    export once failed with a TypeError, and every fine-tuning silently fell back to torch)."""
    stem, _, _ = split_backbone(lite2_ms, 6)
    stem.eval()
    mean = torch.tensor(lite2_ms.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(lite2_ms.spec.std).view(1, 3, 1, 1)

    def torch_run(pixels):
        return stem((pixels.float() / 255.0 - mean) / std)

    ort = _stem_on_onnxruntime(stem, lite2_ms, torch_run)
    assert ort is not None
    pixels = torch.randint(0, 256, (3, 3, lite2_ms.image_size, lite2_ms.image_size), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(ort(pixels), torch_run(pixels), rtol=1e-3, atol=1e-3)


def test_a_pooled_block_below_the_tuned_ones_is_refused(lite2_ms):
    with pytest.raises(ValueError, match="pools block 14"):
        split_backbone(lite2_ms, 2)
    with pytest.raises(ValueError, match="must be 1"):
        split_backbone(lite2_ms, 0)


def test_tuned_tensors_are_applied_on_load_on_both_cpu_paths(lite2_ms):
    stem, top, start = split_backbone(lite2_ms, 6)
    with torch.no_grad():
        for p in top.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tensors = top_state(top)
    assert all(k.startswith("backbone.net.") for k in tensors)
    assert f"backbone.net._blocks.{start}.{'_expand_conv.weight'}" in tensors
    x = _input(lite2_ms)
    with torch.no_grad():
        want = top.eval()(stem(x))
        frozen = lite2_ms.net(x)
    tuned_torch = create_backbone("efficientnet_lite2_ms", cpu_runtime="torch", tuned=tensors, tuned_info={"blocks": 6})
    tuned_ort = create_backbone("efficientnet_lite2_ms", cpu_runtime="onnxruntime", tuned=tensors)
    assert tuned_torch.describe()["finetuned"]["blocks"] == 6
    assert tuned_torch.describe()["finetuned"]["tensors"] == len(tensors)
    pixels = torch.randint(0, 256, (2, 3, lite2_ms.image_size, lite2_ms.image_size), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(tuned_torch.net(x), want, rtol=1e-4, atol=1e-4)
        a, b = tuned_torch(pixels), tuned_ort(pixels)
    assert not torch.allclose(want, frozen, atol=1e-2)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-3


def _images(root, n_classes=8, per_class=3):
    """Sketches (outlines) and photos (filled shapes) whose class is the shape's kind and place."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for c in range(n_classes):
        for i in range(per_class):
            box = [20 + 8 * c, 20 + 4 * i, 150 + 6 * c, 140 + 5 * i]
            for dom, fill, width in (("sketch", None, 5), ("photo", (30 * c, 200 - 20 * i, 90), 0)):
                img = Image.new("RGB", (200, 200), "white")
                draw = ImageDraw.Draw(img)
                shape = draw.ellipse if c % 2 else draw.rectangle
                shape(box, outline="black" if dom == "sketch" else None, fill=fill, width=width)
                path = f"{dom}/c{c}/{i}.png"
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                img.save(root / path)
                records.append(Record(path=path, domain=dom, category=f"c{c}", instance=f"c{c}-{i}",
                                      artist="pen" if dom == "sketch" else "paint"))
    write_manifest(root, records)
    return records


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    records = _images(tmp / "ds")
    bb = create_backbone("efficientnet_lite2_ms")
    fs = extract_features(tmp / "ds", records, bb, tmp / "features", sketch_views=1, edge_artists=[],
                          workers=0, progress=False)
    split = Split(name="tiny", seed=0, train=["c0", "c1", "c2", "c3"], val=["c4", "c5"], unseen=["c6", "c7"])
    cfg = TrainConfig(adapter_max_epochs=3, adapter_batch=8, iiae_max_steps=20, iiae_eval_every=10,
                      peer=False, rerank="none", adapter_dim=16, latent_dim=8)
    fcfg = FinetuneConfig(blocks=6, max_epochs=2, batch=8, lr=1e-3)
    summary = finetune_and_train(tmp / "ds", records, fs, split, cfg, fcfg, tmp / "run", device="cpu",
                                 workers=0, progress=False)
    return tmp, records, fs, summary


def test_finetuning_end_to_end_records_and_reloads_the_tuned_blocks(tuned_run):
    tmp, records, fs, summary = tuned_run
    run = tmp / "run"
    log = [json.loads(line) for line in (run / "finetune_log.jsonl").read_text().splitlines()]
    assert log[0]["split_check_rel_error"] < 0.05
    assert [e["epoch"] for e in log if "epoch" in e][:2] == [0, 1]
    cfg = json.loads((run / "model" / "config.json").read_text())
    info = cfg["backbone"]["finetuned"]
    assert info["blocks"] == 6 and info["from_block"] == 15 and len(info["sha256"]) == 64
    assert cfg["training"]["finetune"]["config"]["blocks"] == 6
    tuned = FeatureSet.load(run / "features")
    keep = fs.family(records, stroke_norm=False)  # the tuned cache holds the rows its model reads
    np.testing.assert_array_equal(tuned.record, fs.record[keep])
    # the served model (onnxruntime path, tuned tensors applied) embeds an image as training saw it
    model = SBIRModel.load(run / "model", device="cpu")
    assert model.backbone.describe()["finetuned"]["sha256"] == info["sha256"]
    row = int(np.flatnonzero((tuned.view == 0) & (tuned.record == 1))[0])  # a photo, as it is
    img = Image.open(tmp / "ds" / records[1].path)
    served = model.encode_photos([img])[0]
    from_cache = model.encode_features(tuned.feats[row : row + 1], "photo")[0]
    assert float(served @ from_cache) > 0.999
    # training moved the blocks (validation mAP rose on these easy shapes), so the features moved too
    assert summary["finetune"]["selected_epoch"] > 0
    assert summary["finetune"]["val_mAP"] > log[1]["val_mAP"]
    assert not np.allclose(tuned.feats, fs.feats[keep], atol=1e-3)
    report = evaluate_runs(tmp / "ds", records, fs, [run], tmp / "eval", figures=False)
    assert report["runs"][0]["backbone"] == "fine-tuned"


def test_a_checkpoint_whose_tuned_tensors_were_altered_is_refused(tuned_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    tmp, *_ = tuned_run
    ckpt = tmp_path / "model"
    shutil.copytree(tmp / "run" / "model", ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    key = next(k for k in tensors if k.startswith("backbone.") and tensors[k].is_floating_point())
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(UserError, match="do not match"):
        SBIRModel.load(ckpt, device="cpu", with_backbone=False)
