"""Backbone registry: packaged weights verified by sha256, torchvision + local file, preprocessing."""

import pytest
import torch
from PIL import Image

from model.backbones import BACKBONES, WeightsError, create_backbone, sha256_file


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
    bb = create_backbone("efficientnet_lite2")
    x = torch.randint(0, 255, (6, 3, 260, 260), dtype=torch.uint8)
    with torch.inference_mode():
        fast = bb(x)
        plain = bb.net((x.float() / 255 - bb._mean) / bb._std)
    torch.testing.assert_close(fast, plain, rtol=1e-3, atol=1e-3)
