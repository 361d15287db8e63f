"""The feature adapter's two output modes ("bn", "l2") and what they leave unchanged."""

import math

import pytest
import torch

from model.adapter import AdapterConfig, CosineClassifier, FeatureAdapter


def _pair(output: str) -> FeatureAdapter:
    torch.manual_seed(0)
    return FeatureAdapter(AdapterConfig(input_dim=16, output_dim=8, output=output))


def test_l2_output_is_the_bn_output_direction_scaled_to_unit_variance():
    bn, l2 = _pair("bn"), _pair("l2")
    l2.load_state_dict(bn.state_dict())
    x = torch.randn(32, 16)
    bn.train()
    bn(x * 3 + 1, "sketch")  # move the running statistics away from their initial values
    l2.load_state_dict(bn.state_dict())
    bn.eval()
    l2.eval()
    a, b = bn(x, "photo"), l2(x, "photo")
    torch.testing.assert_close(b.norm(dim=-1), torch.full((32,), math.sqrt(8)))
    torch.testing.assert_close(torch.nn.functional.normalize(a, dim=-1), b / math.sqrt(8))
    assert not torch.allclose(a.norm(dim=-1), b.norm(dim=-1))


def test_cosine_classifier_training_is_the_same_for_both_outputs():
    """The cosine classifier ignores the norm, so the adapter trains identically either way."""
    grads = []
    for output in ("bn", "l2"):
        adapter = _pair(output)
        torch.manual_seed(1)
        head = CosineClassifier(8, 5)
        adapter.train()
        x, y = torch.randn(32, 16), torch.randint(0, 5, (32,))
        torch.manual_seed(2)  # the same dropout mask
        loss = torch.nn.functional.cross_entropy(head(adapter(x, "sketch")), y)
        loss.backward()
        grads.append((loss.detach(), adapter.proj.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)


def test_old_configs_load_as_bn_and_unknown_outputs_are_refused():
    cfg = AdapterConfig(**{"input_dim": 16, "output_dim": 8, "hidden_dim": 0, "dropout": 0.5, "eps": 1e-4})
    assert cfg.output == "bn"
    with pytest.raises(ValueError, match="'bn' or 'l2'"):
        AdapterConfig(output="cosine")
