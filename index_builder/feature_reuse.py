"""Seed an index job's embedding cache from backbone features computed for training.

The backbone is frozen, so the features `sbir features` cached for a dataset are exactly what the
index builder would compute for the same files. Only the small heads (adapter + ry) run here; the
build then embeds nothing it finds in the cache. `sbir demo` uses this to index its gallery in
seconds instead of minutes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from index_builder.build import job_dir_of
from index_builder.embed import EmbeddingCache
from model.backbones import int8_calibration_of
from model.data.dataset import Record, resolve_path
from model.features import FeatureSet
from model.ground.files import sha256_file
from model.pipeline import SBIRModel, checkpoint_sha256

LOG = logging.getLogger(__name__)


def seed_cache_from_features(
    root: Path, model_dir: Path, dataset: Path, records: Sequence[Record], features_dir: Path,
    precision: str = "fp32",
) -> int:
    """Put the photo embeddings computable from cached features into ROOT's job cache for a build in
    `precision` (fp32 or int8); return how many."""
    model = SBIRModel.load(model_dir, device="cpu", with_backbone=False)
    fs = FeatureSet.load(features_dir)
    if fs.meta["plan"]["backbone"]["weights_sha256"] != model.config["backbone"]["weights_sha256"]:
        LOG.info("feature cache %s was made with another backbone: not reused", features_dir)
        return 0
    made_by = fs.meta["plan"]["backbone"]
    if made_by.get("precision", "fp32") != precision:
        LOG.info("feature cache %s was made in another precision than %s: not reused", features_dir, precision)
        return 0
    calibration = int8_calibration_of(model.config["backbone"]["name"]) if precision == "int8" else None
    if made_by.get("int8_calibration") != calibration:  # int8 features of another (or unrecorded) calibration
        LOG.info("feature cache %s was made with another int8 calibration: not reused", features_dir)
        return 0
    rows = np.flatnonzero(
        (fs.view == 0) & np.isin(fs.record, [i for i, r in enumerate(records) if r.domain == "photo"])
    )
    shas = [
        sha256_file(resolve_path(dataset, records[int(fs.record[i])]))
        for i in rows
    ]
    job_dir = job_dir_of(root, checkpoint_sha256(model_dir), precision, calibration)
    cache = EmbeddingCache(job_dir / "chunks", model.dim)
    keep = [j for j, s in enumerate(shas) if s not in cache]
    if not keep:
        return 0
    vectors = model.encode_features(fs.feats[rows[keep]], "photo")
    # identical files (the same image twice) need one row only
    seen: set[str] = set()
    order = []
    for k, j in enumerate(keep):
        if shas[j] not in seen:
            seen.add(shas[j])
            order.append(k)
    cache.write_chunk([shas[keep[k]] for k in order], vectors[order], [])
    return len(order)
