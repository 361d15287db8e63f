"""The demo's shortcut: an index built from training features equals one built from the pixels."""

import numpy as np
from PIL import Image, ImageDraw

from index_builder.build import BuildOptions, build
from index_builder.feature_reuse import seed_cache_from_features
from index_builder.snapshot import Snapshot
from model.backbones import create_backbone
from model.data.dataset import Record, write_manifest
from model.features import extract_features


def _dataset(root):
    root.mkdir(parents=True)
    records = []
    for i in range(5):
        img = Image.new("RGB", (48, 48), (50 * i, 120, 200 - 30 * i))
        ImageDraw.Draw(img).rectangle([5 + i, 5, 30, 30 + i], fill=(255, 255 - 40 * i, 0))
        img.save(root / f"p{i}.png")
        records.append(Record(path=f"p{i}.png", domain="photo", category=f"c{i % 2}", artist="a"))
    write_manifest(root, records)
    return records


def test_seeded_cache_gives_the_same_index_without_embedding(untrained_checkpoint, tmp_path):
    data = tmp_path / "data"
    records = _dataset(data)
    fs_dir = tmp_path / "features"
    extract_features(data, records, create_backbone("efficientnet_lite2"), fs_dir, sketch_views=0,
                     edge_artists=(), workers=0, progress=False)
    seeded_root, plain_root = tmp_path / "seeded", tmp_path / "plain"
    seeded_root.mkdir()
    assert seed_cache_from_features(seeded_root, untrained_checkpoint, data, records, fs_dir) == 5
    # fp32 features are never taken for a build in int8 (index and queries in one precision)
    assert seed_cache_from_features(tmp_path / "int8", untrained_checkpoint, data, records, fs_dir, "int8") == 0
    opts = BuildOptions(workers=0, progress=False)
    seeded = build(data, seeded_root, untrained_checkpoint, opts)
    plain = build(data, plain_root, untrained_checkpoint, opts)
    assert seeded.report["counts"]["embedded"] == 0
    assert plain.report["counts"]["embedded"] == 5
    a, b = Snapshot.open(seeded_root), Snapshot.open(plain_root)
    q = np.eye(a.dim, dtype=np.float32)[:3]
    sa, ia = a.search(q, 5)
    sb, ib = b.search(q, 5)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(sa, sb, atol=1e-4)
