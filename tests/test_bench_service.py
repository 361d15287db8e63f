"""benchmarks/bench_service.py measures the model `sbir train` serves: its synthetic snapshot re-ranks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from index_builder.snapshot import Snapshot
from model.defaults import (
    DEFAULT_RERANK,
    DEFAULT_RERANK_RAW_WEIGHT,
    DEFAULT_RERANK_TOP,
    DEFAULT_RERANK_WEIGHT,
)
from model.rerank import RerankConfig


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).parent.parent / "benchmarks" / "bench_service.py"
    spec = importlib.util.spec_from_file_location("bench_service", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_snapshot_re_ranks_as_trained_models_do(tmp_path, bench):
    """The untrained model has the InfoNCE peer and the training defaults' second stage; every part
    of every synthetic row is a unit vector (checked by `Snapshot.open(verify=True)`); searches
    go through the second stage; `--zs-only` keeps the older model for comparison."""
    bench.make_index(tmp_path / "rr", 300, None, 0, "fp32")
    with Snapshot.open(tmp_path / "rr", verify=True) as snap:
        raw = snap.rerank.raw_dim
        assert snap.rerank == RerankConfig(DEFAULT_RERANK, 64, DEFAULT_RERANK_TOP, DEFAULT_RERANK_WEIGHT,
                                           DEFAULT_RERANK_RAW_WEIGHT, raw)
        assert raw > 0 and snap.search_dim == 64 and snap.dim == 64 + 64 + raw
        query = bench.synthetic_rows(2, snap.search_dim, snap.rerank, seed=9)
        scores, ids = snap.search(query, 5)
        first, _ = snap.first_stage(query[:, :64], 5)
        assert (ids >= 0).all() and not np.allclose(scores, first)  # the second stage changed the scores
    bench.make_index(tmp_path / "zs", 300, None, 0, "fp32", rerank=False)
    with Snapshot.open(tmp_path / "zs", verify=True) as snap:
        assert snap.rerank is None and snap.dim == snap.search_dim == 64
