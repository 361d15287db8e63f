"""Checkpoints: safetensors + JSON config round trip; the backbone is verified by sha256 on load."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from model.defaults import DEFAULT_RERANK_TOP
from model.ground.errors import UserError
from model.pipeline import SBIRModel, checkpoint_sha256


def _images():
    out = []
    for i in range(3):
        img = Image.new("RGB", (120, 90), "white")
        ImageDraw.Draw(img).line([(10, 10 + i * 20), (100, 80)], fill="black", width=4)
        out.append(img)
    return out


def test_checkpoint_round_trip(untrained_checkpoint, tmp_path):
    model = SBIRModel.load(untrained_checkpoint, device="cpu")
    a = model.encode_sketches(_images())
    # a row is [zs | the peer's vector | standardised backbone features] (model/rerank.py), each part a
    # unit vector; the last is the adapter's standardisation of the backbone's features
    d = model.adapter.cfg.input_dim
    assert model.search_dim == 64 and model.rerank.vector == "infonce" and model.rerank.dim == 64
    assert model.rerank.raw_dim == d and model.dim == 128 + d
    assert a.shape == (3, 128 + d) and a.dtype == np.float32
    for part in (a[:, :64], a[:, 64:128], a[:, 128:]):
        np.testing.assert_allclose(np.linalg.norm(part, axis=1), 1, atol=1e-5)
    feats = model.backbone_features(torch.stack([model.preprocess_sketch(im) for im in _images()]))
    r = torch.nn.functional.normalize(model.adapter.standardise(feats, "sketch"), dim=-1).numpy()
    np.testing.assert_allclose(a[:, 128:], r, atol=1e-5)
    sha = model.save(tmp_path / "copy")
    assert sha == checkpoint_sha256(tmp_path / "copy") == model.sha256
    again = SBIRModel.load(tmp_path / "copy", device="cpu")
    np.testing.assert_allclose(again.encode_sketches(_images()), a, atol=1e-6)
    cfg = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert cfg["backbone"]["name"] == "efficientnet_lite2"
    assert len(cfg["backbone"]["weights_sha256"]) == 64
    assert cfg["iiae"]["latent_dim"] == 64 and cfg["adapter"]["output_dim"] == 512
    assert cfg["dim"] == 128 + d and cfg["search_dim"] == 64 and cfg["rerank"]["top"] == DEFAULT_RERANK_TOP
    # sketch and photo encoders are different networks
    assert not np.allclose(again.encode_photos(_images()), a)


def test_backbone_weights_mismatch_and_bad_checkpoints_are_refused(untrained_checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(untrained_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["backbone"]["weights_sha256"] = "f" * 64
    (bad / "config.json").write_text(json.dumps(cfg))
    from model.backbones import WeightsError

    with pytest.raises(WeightsError, match="sha256"):
        SBIRModel.load(bad, device="cpu")
    with pytest.raises(UserError):
        SBIRModel.load(tmp_path / "nothing", device="cpu")
    assert checkpoint_sha256(bad) != checkpoint_sha256(untrained_checkpoint)


def test_a_reranking_checkpoint_without_its_peer_is_refused(untrained_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nopeer"
    shutil.copytree(untrained_checkpoint, bad)
    tensors = {k: v for k, v in load_file(str(bad / "model.safetensors")).items() if not k.startswith("peer.")}
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(UserError, match="peer"):
        SBIRModel.load(bad, device="cpu", with_backbone=False)


def test_gpu_batches_are_padded_to_a_few_shapes_and_run_on_one_thread(untrained_checkpoint, monkeypatch):
    """On a GPU (simulated: `pad_batches` forced on the CPU) a batch runs padded to the next power of
    two, answers exactly as unpadded, and every forward (warm-up included) runs on the model's one
    device thread, where cuDNN's per-thread plans stay warm."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from model.pipeline import gpu_batch

    assert [gpu_batch(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 64)] == [1, 2, 4, 8, 8, 16, 16, 32, 64]
    model = SBIRModel.load(untrained_checkpoint, device="cpu")
    pixels = torch.stack([model.preprocess_sketch(im) for im in _images()])
    plain = model.encode_pixels(pixels, "sketch")
    monkeypatch.setattr(SBIRModel, "pad_batches", property(lambda self: True))
    seen, real = [], model.backbone_features

    def recording(px):
        seen.append((threading.get_ident(), threading.current_thread().name, px.shape[0]))
        return real(px)

    monkeypatch.setattr(model, "backbone_features", recording)
    with ThreadPoolExecutor(3) as callers:
        outs = list(callers.map(lambda _: model.encode_pixels(pixels, "sketch"), range(6)))
    for out in outs:
        np.testing.assert_allclose(out, plain, atol=1e-5)
        assert out.shape == plain.shape
    assert {n for _, _, n in seen} == {4}  # three sketches ran as four
    model.warm_up(5)
    assert [n for _, _, n in seen[6:]] == [1, 2, 4, 8]
    assert len({ident for ident, _, _ in seen}) == 1 and seen[0][1].startswith("sbir-gpu")


def _twin_checkpoint(untrained_checkpoint, tmp_path, version=None):
    import shutil

    from model.stroke_norm import VERSION

    path = tmp_path / "twin"
    shutil.copytree(untrained_checkpoint, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["sketch_preprocessing"] = {"stroke_norm": False, "query_twin": True,
                                   "stroke_norm_version": VERSION if version is None else version}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_a_query_is_encoded_with_its_stroke_normalised_twin(untrained_checkpoint, tmp_path, monkeypatch):
    """With `query_twin` a sketch becomes two images (as drawn, then normalised) that run in one batch,
    and each part of its row is the mean direction of the two views' unit parts."""
    from model.stroke_norm import normalise_strokes

    model = SBIRModel.load(_twin_checkpoint(untrained_checkpoint, tmp_path), device="cpu")
    plain = SBIRModel.load(untrained_checkpoint, device="cpu")
    assert model.query_twin and model.sketch_views == 2 and not plain.query_twin and plain.sketch_views == 1
    images = _images()
    pixels = model.preprocess_sketch(images[0])
    assert pixels.shape[0] == 2 and torch.equal(pixels[0], plain.preprocess_sketch(images[0]))
    assert torch.equal(pixels[1], plain.preprocess(normalise_strokes(images[0])))
    drawn = plain.encode_sketches(images)
    normalised = plain.encode_sketches([normalise_strokes(im) for im in images])
    got = model.encode_sketches(images)
    assert got.shape == drawn.shape
    d = model.search_dim
    for a, b in ((0, d), (d, d + model.rerank.dim), (d + model.rerank.dim, model.dim)):
        want = drawn[:, a:b] + normalised[:, a:b]
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(got[:, a:b], want, atol=1e-5)
    # the normalised view weighted as the checkpoint says (the default training writes 0.5)
    model.config["sketch_preprocessing"]["query_twin_weight"] = 0.5
    half = model.encode_sketches(images)
    for a, b in ((0, d), (d, d + model.rerank.dim), (d + model.rerank.dim, model.dim)):
        want = drawn[:, a:b] + 0.5 * normalised[:, a:b]
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(half[:, a:b], want, atol=1e-5)
    model.config["sketch_preprocessing"]["query_twin_weight"] = 1.0
    # the service's path: a batch of (n, 2, 3, S, S) from preprocess_sketch, one forward of 2n images
    seen, real = [], model.backbone_features
    monkeypatch.setattr(model, "backbone_features", lambda px: seen.append(px.shape[0]) or real(px))
    batch = torch.stack([model.preprocess_sketch(im) for im in images])
    np.testing.assert_allclose(model.encode_pixels(batch, "sketch"), got, atol=1e-5)
    assert seen == [6]
    # on a GPU every padded size of up to max_batch twins is warmed
    monkeypatch.setattr(SBIRModel, "pad_batches", property(lambda self: True))
    seen.clear()
    model.warm_up(3)
    assert seen == [2, 4, 8]


def test_a_twin_checkpoint_of_another_stroke_normaliser_is_refused(untrained_checkpoint, tmp_path):
    with pytest.raises(UserError, match="stroke normalisation version"):
        SBIRModel.load(_twin_checkpoint(untrained_checkpoint, tmp_path, version=-1), device="cpu")
