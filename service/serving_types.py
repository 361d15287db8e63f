"""What the service needs of a snapshot and of a model, as Protocols (the service only reads them).

`index_builder.snapshot.Snapshot` and `model.pipeline.SBIRModel` are the real ones; tests serve fakes
with the same shape. `tests/test_service_state.py` checks that both real classes satisfy these.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image


@runtime_checkable
class ServedSnapshot(Protocol):
    """An open index snapshot: its vectors' search, its photo records, and what it was built with."""

    @property
    def id(self) -> str: ...
    @property
    def path(self) -> Path: ...
    @property
    def dim(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def model_dir(self) -> Path: ...
    @property
    def model_sha256(self) -> str: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) float32 unit rows -> scores (n, k), ids (n, k); ids -1 where fewer than k exist."""
        ...

    def lookup(self, ids: Sequence[int]) -> list[dict | None]:
        """Photo records ({"id", "key", "path", "sha256", "metadata"}) for ids, in order; None if unknown."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class ServedModel(Protocol):
    """A loaded checkpoint that turns a sketch into the snapshot's embedding space."""

    @property
    def dim(self) -> int: ...
    @property
    def sha256(self) -> str | None: ...
    @property
    def precision(self) -> str: ...
    @property
    def int8_calibration(self) -> dict | None: ...

    def preprocess_sketch(self, img: Image.Image) -> torch.Tensor: ...

    def encode_pixels(self, pixels: torch.Tensor, domain: str) -> np.ndarray: ...

    def describe(self) -> dict: ...
