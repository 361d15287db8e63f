"""A checkpoint's files and the digest index snapshots pin: read by the model, the index builder
and the service alike, so they live here, without torch."""

from __future__ import annotations

import hashlib
from pathlib import Path

from model.ground.files import sha256_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # a checkpoint directory holds exactly these


def checkpoint_sha256(ckpt_dir: str | Path) -> str:
    """One digest over a checkpoint's config and weights: what an index snapshot pins."""
    ckpt_dir = Path(ckpt_dir)
    h = hashlib.sha256()
    for name in MODEL_FILES:
        h.update(name.encode())
        h.update(bytes.fromhex(sha256_file(ckpt_dir / name)))
    return h.hexdigest()
