"""A snapshot split into shards by id: exact results equal the unsharded index's, every shard is tuned
and verified, and the service answers from it."""

from __future__ import annotations

import io

import faiss
import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_index_support import build_cli, make_photos, photo, sbir, update_cli

from index_builder import faiss_index
from index_builder.snapshot import Snapshot, SnapshotError, read_current
from service.app import create_app
from service.settings import Settings


def unit_rows(n: int, d: int, seed: int, clusters: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if clusters:
        x = rng.standard_normal((clusters, d)).astype(np.float32)[rng.integers(0, clusters, n)] * 3 + x
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_sharded_search_equals_unsharded():
    vectors = unit_rows(3000, 32, seed=0)
    ids = np.sort(np.random.default_rng(1).choice(2**40, 3000, replace=False)).astype(np.int64)
    queries = unit_rows(64, 32, seed=2)
    whole = faiss_index.build_index(vectors, ids, "Flat")
    parts = faiss_index.split_shards(vectors, ids, 3)
    assert [len(i) for _, i in parts] == [int((ids % 3 == s).sum()) for s in range(3)]
    sharded = faiss_index.combine_shards(faiss_index.build_shards(parts, "Flat"), use_gpu=False)
    assert sharded.ntotal == 3000 and len(faiss_index.shard_parts(sharded)) == 3
    s1, i1 = faiss_index.search(whole, queries, 10)
    s2, i2 = faiss_index.search(sharded, queries, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    np.testing.assert_array_equal(np.sort(faiss_index.index_ids(sharded)), ids)


def test_ivf_shards_are_tuned_together_and_reach_the_recall_target():
    vectors = unit_rows(16000, 16, seed=3, clusters=64)
    ids = np.arange(16000, dtype=np.int64) * 3 + 1
    shards = faiss_index.build_shards(faiss_index.split_shards(vectors, ids, 4), "IVF32,Flat")
    sharded = faiss_index.combine_shards(shards, use_gpu=False)
    check = faiss_index.tune_and_measure(sharded, vectors, ids, target=0.95)
    assert check.params and check.recall >= 0.95
    nprobe = check.params["nprobe"]
    assert [faiss.extract_index_ivf(s).nprobe for s in faiss_index.shard_parts(sharded)] == [nprobe] * 4


def test_automatic_shard_count_rule():
    assert faiss_index.choose_shards(1_000_000, 264, 8 << 30) == 1
    assert faiss_index.choose_shards(100_000_000, 264, 8 << 30) == 4  # 26.4 GB of float vectors
    assert faiss_index.choose_shards(1_000_000_000, 72, 16 << 30) == 5  # 72 GB of 64-byte PQ codes
    assert faiss_index.choose_shards(10**9, None, 1) == 1  # unknown size (a factory given by hand)


@pytest.fixture(scope="module")
def two_roots(untrained_checkpoint, tmp_path_factory):
    """The same 30 photos indexed whole and in automatically chosen shards."""
    base = tmp_path_factory.mktemp("shards")
    photos = base / "photos"
    make_photos(photos, range(30))
    whole = build_cli(photos, untrained_checkpoint, base / "whole")
    # 30 photos x 264 bytes in shards of at most 4 KiB: two shards
    sharded = build_cli(photos, untrained_checkpoint, base / "sharded", "--shard-memory", "4KiB")
    return base, photos, whole, sharded


def test_a_sharded_snapshot_answers_like_the_unsharded_one(two_roots, capsys):
    base, _, whole, sharded = two_roots
    ix = sharded["index"]
    assert ix["shards"]["count"] == 2 and ix["shards"]["requested"] == "auto"
    assert sum(ix["shards"]["sizes"]) == 30 and "exceeds --shard-memory" in ix["shards"]["reason"]
    assert ix["factory"] == whole["index"]["factory"] == "Flat" and ix["recall"]["recall"] == 1.0
    assert whole["index"]["shards"]["count"] == 1
    with Snapshot.open(base / "whole") as a, Snapshot.open(base / "sharded", verify=True) as b:
        assert (a.shards, b.shards) == (1, 2) and b.manifest["format"] == "sbir-index-snapshot/2"
        assert a.manifest["format"] == "sbir-index-snapshot/1"
        np.testing.assert_array_equal(np.load(a.path / "ids.npy"), np.load(b.path / "ids.npy"))
        queries = np.load(a.path / "vectors.npy")
        s1, i1 = a.search(queries, 7)
        s2, i2 = b.search(queries, 7)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, atol=1e-5)
        assert set(b.manifest["files"]) >= {"index-shard-000.faiss", "index-shard-001.faiss"}
        assert "index.faiss" not in b.manifest["files"]
    capsys.readouterr()
    assert sbir("index", "verify", base / "sharded") == 0
    assert "in 2 shards" in capsys.readouterr().out
    assert sbir("index", "info", base / "sharded") == 0
    assert "index Flat in 2 shards" in capsys.readouterr().out


def test_the_service_answers_from_a_sharded_snapshot(two_roots):
    base = two_roots[0]
    buf = io.BytesIO()
    photo(7).save(buf, "PNG")
    answers = []
    for name in ("whole", "sharded"):
        settings = Settings(snapshot_root=base / name, device="cpu", reload_interval_s=0, torch_threads=2)
        with TestClient(create_app(settings)) as client:
            r = client.post(
                "/search", files={"file": ("s.png", buf.getvalue(), "image/png")}, params={"k": 10}
            )
            assert r.status_code == 200, r.text
            answers.append([(hit["id"], hit["score"]) for hit in r.json()["results"]])
    assert len(answers[0]) == 10
    assert [i for i, _ in answers[0]] == [i for i, _ in answers[1]]
    np.testing.assert_allclose([s for _, s in answers[0]], [s for _, s in answers[1]], atol=1e-5)


def test_verify_checks_every_shard(two_roots, tmp_path, capsys):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(two_roots[0] / "sharded", root)
    snap_dir = root / "snapshots" / read_current(root)
    shard = snap_dir / "index-shard-001.faiss"
    data = bytearray(shard.read_bytes())
    data[-8] ^= 0xFF  # same size, other content
    shard.write_bytes(bytes(data))
    assert sbir("index", "verify", root) == 2
    assert "index-shard-001.faiss checksum mismatch" in capsys.readouterr().err
    shard.unlink()
    with pytest.raises(SnapshotError, match="lacks index-shard-001.faiss"):
        Snapshot.open(root)


def test_an_unchanged_sharded_snapshot_is_not_republished_and_too_many_shards_is_refused(
    two_roots, tmp_path, capsys
):
    import shutil

    base, photos, _, _ = two_roots
    root = tmp_path / "copy"
    shutil.copytree(base / "sharded", root)
    before = read_current(root)
    report = update_cli(root, photos, "--shard-memory", "4KiB")
    assert report["counts"]["embedded"] == 0 and read_current(root) == before  # nothing changed
    report = update_cli(root, photos, "--shards", "1")  # a different layout is a change
    assert read_current(root) != before and report["counts"]["from_previous"] == 30
    with Snapshot.open(root, verify=True) as snap:
        assert snap.shards == 1
    capsys.readouterr()
    code = sbir("index", "update", root, photos, "--no-progress", "--shards", 40)
    assert code == 2 and "some shards would be empty with 30 photos" in capsys.readouterr().err
