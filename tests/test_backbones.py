"""Backbone registry: packaged weights verified by sha256, torchvision + local file, preprocessing."""

import numpy as np
import pytest
import torch
from PIL import Image

from model.backbones import BACKBONES, WeightsError, create_backbone
from model.ground.files import sha256_file
from model.images import pad_to_square


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_registered_backbones_load_from_their_packages(name):
    bb = create_backbone(name)
    x = torch.stack([bb.preprocess(Image.new("RGB", (300, 120), (200, 10, 10)))] * 2)
    assert x.dtype == torch.uint8 and x.shape == (2, 3, bb.image_size, bb.image_size)
    with torch.inference_mode():
        f = bb(x)
    assert f.shape == (2, bb.dim) and torch.isfinite(f).all()
    assert bb.weights_sha256 == sha256_file(bb.weights_path)


def test_default_weights_checksum_is_enforced(tmp_path):
    bb = create_backbone("efficientnet_lite2")
    with pytest.raises(WeightsError, match="sha256"):
        create_backbone("efficientnet_lite2", expected_sha256="0" * 64)
    assert bb.describe()["weights_sha256"].startswith("9656183e")


def test_torchvision_architecture_with_local_weights(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    bb = create_backbone("torchvision:resnet18", weights_path=path)
    assert bb.dim == 512
    with pytest.raises(WeightsError, match="does not match"):
        create_backbone("torchvision:resnet34", weights_path=path)
    with pytest.raises(WeightsError, match="needs a local weights file"):
        create_backbone("torchvision:resnet18")


def test_micro_batched_cpu_forward_matches_the_plain_module():
    bb = create_backbone("efficientnet_lite2", cpu_runtime="torch")
    assert bb.cpu_runtime == "torch"
    x = torch.randint(0, 255, (6, 3, 260, 260), dtype=torch.uint8)
    with torch.inference_mode():
        fast = bb(x)
        plain = bb.net((x.float() / 255 - bb._mean) / bb._std)
    torch.testing.assert_close(fast, plain, rtol=1e-3, atol=1e-3)


def test_onnxruntime_forward_matches_torch_for_batches_and_single_images():
    ort_bb = create_backbone("efficientnet_lite2", cpu_runtime="onnxruntime")
    torch_bb = create_backbone("efficientnet_lite2", cpu_runtime="torch")
    assert ort_bb.cpu_runtime.startswith("onnxruntime")
    x = torch.randint(0, 255, (5, 3, 260, 260), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = torch_bb(x)
        batch = ort_bb(x)  # spread over single-threaded runs
        single = torch.cat([ort_bb(x[i : i + 1]) for i in range(len(x))])  # one multi-threaded run each
    torch.testing.assert_close(batch, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single, want, rtol=1e-4, atol=1e-4)
    assert batch.dtype == torch.float32 and batch.shape == (5, ort_bb.dim)
    # float pixels in [0, 1] take the same graph (it normalises 0..255 pixels itself)
    torch.testing.assert_close(ort_bb(x.float() / 255), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(256, 256), (100, 300), (260, 260), (1000, 700), (13, 9)])
def test_preprocess_of_grey_images_equals_the_three_band_resize(size):
    """Grey images are resized as one band and repeated: the same pixels as resizing all three."""
    bb = create_backbone("efficientnet_lite2", cpu_runtime="torch")
    gen = np.random.default_rng(sum(size))
    grey = gen.integers(0, 256, size[::-1], dtype=np.uint8)
    colour = gen.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    for arr in (np.stack([grey] * 3, axis=-1), colour):
        img = Image.fromarray(arr)
        square = pad_to_square(img)
        if square.size != (260, 260):
            square = square.resize((260, 260), Image.BICUBIC, reducing_gap=3.0)
        want = torch.from_numpy(np.array(square)).permute(2, 0, 1)
        got = bb.preprocess(img)
        assert got.dtype == torch.uint8 and got.shape == (3, 260, 260)
        assert torch.equal(got, want)


def test_cpu_runtime_from_environment_and_unknown_names(monkeypatch):
    monkeypatch.setenv("SBIR_CPU_RUNTIME", "torch")
    assert create_backbone("efficientnet_lite2").cpu_runtime == "torch"
    with pytest.raises(ValueError, match="unknown CPU runtime"):
        create_backbone("efficientnet_lite2", cpu_runtime="tensorrt")


def test_onnxruntime_failure_keeps_torch_unless_required(monkeypatch, caplog):
    import model.backbones as backbones

    def broken(*args, **kwargs):
        raise RuntimeError("export exploded")

    monkeypatch.setattr(backbones, "OnnxRuntimeNet", broken)
    with caplog.at_level("WARNING", logger="model.backbones"):
        bb = create_backbone("efficientnet_lite2", cpu_runtime="auto")
    assert bb.cpu_runtime == "torch" and "export exploded" in caplog.text
    x = torch.randint(0, 255, (2, 3, 260, 260), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.isfinite(bb(x)).all()
    with pytest.raises(RuntimeError, match="onnxruntime cannot run backbone efficientnet_lite2: export exploded"):
        create_backbone("efficientnet_lite2", cpu_runtime="onnxruntime")


def test_multi_level_backbone_adds_pooled_blocks_to_the_same_head_features():
    ms = create_backbone("efficientnet_lite2_ms")
    plain = create_backbone("efficientnet_lite2")
    assert ms.dim == 120 + 208 + 352 + 1280 and ms.weights_sha256 == plain.weights_sha256
    x = torch.randint(0, 255, (2, 3, 260, 260), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        both, head = ms(x), plain(x)
    torch.testing.assert_close(both[:, -1280:], head, rtol=1e-4, atol=1e-4)
    assert both[:, :-1280].abs().sum() > 0  # the pooled blocks are really there
