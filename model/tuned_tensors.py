"""Fine-tuned backbone tensors as a checkpoint carries them: their name prefix, their hash, and how
they replace tensors of a freshly built backbone network (model.finetune makes them)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

# A tuned tensor is named "backbone." + its name in the backbone network's own state dict.
PREFIX = "backbone."


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def apply_state(net: nn.Module, tensors: dict[str, torch.Tensor]) -> int:
    """Load tuned tensors (PREFIX-named) into a freshly built backbone network; returns how many."""
    own = net.state_dict()
    state = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ValueError(f"the checkpoint's backbone tensors do not fit this backbone, e.g. {unknown[:3]}")
    bad = [k for k, v in state.items() if own[k].shape != v.shape]
    if bad:
        raise ValueError(f"the checkpoint's backbone tensors have other shapes, e.g. {bad[:3]}")
    net.load_state_dict(state, strict=False)
    return len(state)
