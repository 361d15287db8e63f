"""The feature adapter between the frozen backbone and IIAE.

The paper fed IIAE features already adapted to the seen classes (VGG-16 fine-tuned with class
labels, then a 512-d projection). We do the same on cached features: each domain is standardised
with its own mean and std (measured on seen-class training data), then one projection, shared by
both domains, is trained with cross-entropy over the seen classes. Its output is what IIAE sees.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

DOMAINS = ("sketch", "photo")


@dataclass
class AdapterConfig:
    input_dim: int = 1280
    output_dim: int = 512
    hidden_dim: int = 0  # 0: a single linear projection; >0: Linear-BN-ReLU-Linear
    dropout: float = 0.5  # on the standardised input, in training only
    eps: float = 1e-4
    # What IIAE receives. "bn": the projection through a non-learned batch norm (unit variance per
    # dimension). "l2": the same vector L2-normalised and scaled by sqrt(output_dim): its direction
    # only, which is all the cosine classifier trains (the norm is untrained noise IIAE would
    # otherwise spend its reconstruction on). The adapter's own training is identical either way.
    output: str = "bn"

    def __post_init__(self) -> None:
        if self.output not in ("bn", "l2"):
            raise ValueError(f"adapter output must be 'bn' or 'l2', not {self.output!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class FeatureAdapter(nn.Module):
    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.input_dim
        for dom in DOMAINS:
            self.register_buffer(f"{dom}_mean", torch.zeros(d))
            self.register_buffer(f"{dom}_std", torch.ones(d))
        if cfg.hidden_dim > 0:
            self.proj = nn.Sequential(
                nn.Linear(d, cfg.hidden_dim),
                nn.BatchNorm1d(cfg.hidden_dim),
                nn.ReLU(),
                nn.Linear(cfg.hidden_dim, cfg.output_dim),
            )
        else:
            self.proj = nn.Linear(d, cfg.output_dim)
        # Unit-variance outputs keep IIAE's 10 * MSE reconstruction on a known scale.
        self.out_norm = nn.BatchNorm1d(cfg.output_dim, affine=False)
        self.dropout = nn.Dropout(cfg.dropout)

    @torch.no_grad()
    def fit_standardisation(self, feats: torch.Tensor, domain: str) -> None:
        assert domain in DOMAINS, domain
        getattr(self, f"{domain}_mean").copy_(feats.mean(0))
        getattr(self, f"{domain}_std").copy_(feats.std(0).clamp_min(self.cfg.eps))

    def standardise(self, feats: torch.Tensor, domain: str) -> torch.Tensor:
        assert domain in DOMAINS, domain
        return (feats - getattr(self, f"{domain}_mean")) / getattr(self, f"{domain}_std")

    def forward(self, feats: torch.Tensor, domain: str) -> torch.Tensor:
        out = self.out_norm(self.proj(self.dropout(self.standardise(feats, domain))))
        if self.cfg.output == "l2":
            out = F.normalize(out, dim=-1) * math.sqrt(self.cfg.output_dim)
        return out


class CosineClassifier(nn.Module):
    """Class logits as scaled cosine similarity: keeps the embedding's direction meaningful."""

    def __init__(self, dim: int, n_classes: int, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * 0.01)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).t()
