"""The InfoNCE peer: two linear maps from the adapter's output into one space, trained with a
symmetric InfoNCE loss on the same sketch-photo pairs as IIAE (model/train.py). It is the
discriminative comparison model of the benchmark and, in a served checkpoint, the second stage that
re-ranks IIAE's candidates (model/rerank.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InfoNCEPeer(nn.Module):
    """The discriminative peer: two linear projections trained with a symmetric InfoNCE loss."""

    def __init__(self, in_dim: int, out_dim: int = 64):
        super().__init__()
        self.sketch = nn.Linear(in_dim, out_dim)
        self.photo = nn.Linear(in_dim, out_dim)

    @property
    def out_dim(self) -> int:
        return self.sketch.out_features

    def encode(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        return F.normalize((self.sketch if domain == "sketch" else self.photo)(x), dim=-1)
