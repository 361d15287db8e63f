"""Shared fixtures: a real (untrained) model checkpoint on the default backbone, built once."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _fp32_unless_told():
    """The suite runs the float32 backbone (its tests compare with torch to 1e-4) unless
    SBIR_CPU_PRECISION says otherwise; tests/test_int8.py covers int8 and "auto" explicitly.
    Set in os.environ so that the `sbir` subprocesses of the end-to-end tests inherit it."""
    import os

    os.environ.setdefault("SBIR_CPU_PRECISION", "fp32")


@pytest.fixture(scope="session")
def untrained_checkpoint(tmp_path_factory):
    """A complete checkpoint directory: EfficientNet-Lite2 + adapter + IIAE with seeded random heads.

    Good for testing plumbing (index builder, service): embeddings are deterministic and the
    backbone is real, so similar images still land near each other.
    """
    from model.adapter import AdapterConfig, FeatureAdapter
    from model.backbones import create_backbone
    from model.defaults import (
        DEFAULT_RERANK,
        DEFAULT_RERANK_RAW_WEIGHT,
        DEFAULT_RERANK_TOP,
        DEFAULT_RERANK_WEIGHT,
    )
    from model.iiae import IIAE, IIAEConfig
    from model.peer import InfoNCEPeer
    from model.pipeline import SBIRModel
    from model.rerank import RerankConfig

    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite2")
    adapter = FeatureAdapter(AdapterConfig(input_dim=backbone.dim))
    iiae = IIAE(IIAEConfig())
    # as trained models are served: IIAE's zs finds candidates, the peer's vector and the standardised
    # backbone features re-rank them (model/rerank.py), with the training defaults
    peer = InfoNCEPeer(adapter.cfg.output_dim, 64)
    rerank = RerankConfig(DEFAULT_RERANK, 64, DEFAULT_RERANK_TOP, DEFAULT_RERANK_WEIGHT, DEFAULT_RERANK_RAW_WEIGHT,
                          backbone.dim)
    config = {"training": {"note": "untrained test fixture"}, "rerank": rerank.to_dict()}
    model = SBIRModel(backbone, adapter, iiae, config, peer=peer)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    model.save(path)
    return path
