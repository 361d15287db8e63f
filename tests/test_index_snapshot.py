"""Snapshots on disk: atomic publication, pruning, the reader's contract, verification of damage."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from index_builder import faiss_index as fi
from index_builder.snapshot import (
    CURRENT,
    INDEX_FILE,
    SNAPSHOTS,
    Snapshot,
    SnapshotError,
    SnapshotWriter,
    list_snapshots,
    read_current,
    snapshots_dir,
)
from model.pipeline import checkpoint_sha256
from model.rerank import RerankConfig, rerank_matrix, second_scores, unit_parts
from sbir.cli import main as sbir_main

DIM = 16


def fake_checkpoint(path: Path, seed: int = 0) -> Path:
    """Bytes standing in for a checkpoint: snapshots only pin its sha256, they never load it here."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"format": "sbir-model/1", "seed": seed}))
    (path / "model.safetensors").write_bytes(np.random.default_rng(seed).bytes(256))
    return path


def write_snapshot(root: Path, ckpt: Path, n: int = 40, seed: int = 0, factory: str = "Flat", publish=True,
                   rerank: RerankConfig | None = None):
    """A snapshot of `n` random unit rows; with `rerank`, rows of [searched | re-ranking] parts."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(2**40, n, replace=False)).astype(np.int64)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = fi.build_index(vectors, ids, factory)
    recall = fi.tune_and_measure(index, vectors, ids, sample=20)
    if rerank is not None:
        vectors = np.hstack([vectors, rng.standard_normal((n, rerank.width)).astype(np.float32)])
        for part in unit_parts(vectors, DIM, rerank)[1:]:  # views: each re-ranking part a unit vector
            part /= np.linalg.norm(part, axis=1, keepdims=True)
    rows = [
        (
            int(pid),
            f"dir/photo {i}.jpg",
            f"/photos/dir/photo {i}.jpg",
            f"{i:064x}",
            json.dumps({"caption": f"photo nº{i}", "tags": ["a", i], "nested": {"w": i * 10}}),
        )
        for i, pid in enumerate(ids)
    ]
    manifest = {
        "dim": vectors.shape[1],
        "search_dim": DIM,
        "rerank": rerank.to_dict() if rerank is not None else None,
        "count": n,
        "model": {"sha256": checkpoint_sha256(ckpt)},
        "index": {"factory": factory, "search_params": recall.params, "recall": recall.to_dict()},
    }
    writer = SnapshotWriter(root)
    sid = writer.write(
        index=index, ids=ids, vectors=vectors, photo_rows=rows, model_dir=ckpt, manifest=manifest, report={}
    )
    if publish:
        writer.publish(sid)
    return sid, ids, vectors


@pytest.fixture
def ckpt(tmp_path):
    return fake_checkpoint(tmp_path / "ckpt")


def test_metadata_round_trip_through_lookup(tmp_path, ckpt):
    root = tmp_path / "index"
    sid, ids, _ = write_snapshot(root, ckpt)
    with Snapshot.open(root) as snap:
        assert snap.id == sid and snap.count == 40 and snap.dim == DIM
        assert snap.model_sha256 == checkpoint_sha256(ckpt) == checkpoint_sha256(snap.model_dir)
        wanted = [int(ids[3]), -1, 123456789, int(ids[0]), int(ids[3])]
        got = snap.lookup(wanted)
        assert got[1] is None and got[2] is None
        assert got[0] == {
            "id": int(ids[3]),
            "key": "dir/photo 3.jpg",
            "path": "/photos/dir/photo 3.jpg",
            "sha256": f"{3:064x}",
            "metadata": {"caption": "photo nº3", "tags": ["a", 3], "nested": {"w": 30}},
        }
        assert got[3]["id"] == int(ids[0]) and got[4] == got[0]
        assert snap.photo_path(int(ids[5])) == Path("/photos/dir/photo 5.jpg")
        assert snap.photo_path(99) is None
        assert snap.lookup([]) == []


def test_search_equals_numpy_and_pads_with_minus_one(tmp_path, ckpt):
    root = tmp_path / "index"
    _, ids, vectors = write_snapshot(root, ckpt, n=40)
    q = vectors[:5] + 0.1
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    with Snapshot.open(root) as snap:
        scores, found = snap.search(q, 50)
    ref = q @ vectors.T
    order = np.argsort(-ref, axis=1, kind="stable")
    np.testing.assert_array_equal(found[:, :40], ids[order])
    np.testing.assert_allclose(scores[:, :40], np.take_along_axis(ref, order, axis=1), atol=1e-5)
    assert (found[:, 40:] == -1).all() and np.isneginf(scores[:, 40:]).all()


@pytest.mark.parametrize("n, k, raw", [(40, 5, 0), (40, 60, 0), (300, 12, 0), (40, 5, 12), (300, 12, 12)])
def test_a_reranking_snapshot_answers_as_the_evaluation_ranks(tmp_path, ckpt, n, k, raw):
    """The index finds the top candidates by the first part; the second stage re-orders them
    (model/rerank.py), exactly as `sbir eval` scores the served method (for k <= top), with or
    without the standardised backbone features as a third part."""
    cfg = RerankConfig(vector="adapter", dim=8, top=20, weight=0.5, raw_weight=0.25 if raw else 0.0, raw_dim=raw)
    root = tmp_path / "index"
    _, ids, vectors = write_snapshot(root, ckpt, n=n, rerank=cfg)
    rng = np.random.default_rng(5)
    q = rng.standard_normal((4, DIM + cfg.width)).astype(np.float32)
    for part in unit_parts(q, DIM, cfg):
        part /= np.linalg.norm(part, axis=1, keepdims=True)
    with Snapshot.open(root, verify=True) as snap:
        assert snap.dim == DIM + 8 + raw and snap.search_dim == DIM and snap.rerank == cfg
        scores, found = snap.search(q, k)
    # asked for more than `top`, the second stage re-orders the first k candidates
    wide = RerankConfig(cfg.vector, cfg.dim, max(k, cfg.top), cfg.weight, cfg.raw_weight, cfg.raw_dim)
    full = rerank_matrix(q[:, :DIM] @ vectors[:, :DIM].T, second_scores(q[:, DIM:], vectors[:, DIM:], wide), wide)
    order = np.argsort(-full, axis=1, kind="stable")
    shown = min(k, n)
    np.testing.assert_array_equal(found[:, :shown], ids[order[:, :shown]])
    np.testing.assert_allclose(scores[:, :shown], np.take_along_axis(full, order[:, :shown], 1), atol=1e-5)
    assert (found[:, shown:] == -1).all() and np.isneginf(scores[:, shown:]).all()


def test_the_second_stage_reads_candidates_rows_in_place_as_a_gathered_copy_would(tmp_path, ckpt):
    """`second_stage` (FAISS reading rows from the memory map) gives the cosines a gathered copy of
    the candidates' rows gives, in any order, repeated, and 0 for a missing candidate (-1)."""
    cfg = RerankConfig(vector="adapter", dim=8, top=20, weight=0.5, raw_weight=0.25, raw_dim=12)
    root = tmp_path / "index"
    _, ids, vectors = write_snapshot(root, ckpt, n=50, rerank=cfg)
    rng = np.random.default_rng(3)
    second_q = rng.standard_normal((3, cfg.width)).astype(np.float32)
    cand = ids[rng.integers(0, 50, (3, 7))]
    cand[0, 2] = cand[0, 5]  # the same photo twice
    cand[1, -2:] = -1  # fewer candidates than asked for
    with Snapshot.open(root) as snap:
        got = snap.second_stage(second_q, cand)
    rows = vectors[np.searchsorted(ids, np.maximum(cand, 0)), DIM:]
    expected = np.einsum("nd,nrd->nr", second_q * np.r_[np.full(8, 0.5 / 0.75), np.full(12, 0.25 / 0.75)], rows)
    expected[cand < 0] = 0.0
    assert got.shape == (3, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got[0, 2] == got[0, 5] and (got[1, -2:] == 0).all()


def test_a_snapshot_with_fortran_ordered_vectors_is_refused(tmp_path, ckpt):
    """The second stage reads rows in place: vectors.npy must hold them contiguously (C order)."""
    cfg = RerankConfig(vector="adapter", dim=8, top=20, weight=0.5)
    root = tmp_path / "index"
    write_snapshot(root, ckpt, n=30, rerank=cfg)
    path = snapshots_dir(root) / read_current(root) / "vectors.npy"
    np.save(path, np.asfortranarray(np.load(path)))
    with pytest.raises(SnapshotError, match="Fortran order"):
        Snapshot.open(root)


def test_search_rejects_wrong_shapes(tmp_path, ckpt):
    root = tmp_path / "index"
    write_snapshot(root, ckpt)
    with Snapshot.open(root) as snap:
        with pytest.raises(ValueError, match="queries must be"):
            snap.search(np.zeros((2, DIM + 1), np.float32), 3)
        with pytest.raises(ValueError, match="k must be"):
            snap.search(np.zeros((2, DIM), np.float32), 0)


def test_search_and_lookup_from_many_threads_agree_with_one(tmp_path, ckpt):
    root = tmp_path / "index"
    _, ids, vectors = write_snapshot(root, ckpt, n=300, factory="IVF4,Flat")
    with Snapshot.open(root) as snap:
        expected = snap.search(vectors, 5)[1]
        expected_paths = [r["path"] for r in snap.lookup(expected[:, 0])]
        errors = []

        def worker(seed):
            rng = np.random.default_rng(seed)
            for _ in range(30):
                rows = rng.choice(300, 8, replace=False)
                got = snap.search(vectors[rows], 5)[1]
                paths = [r["path"] for r in snap.lookup(got[:, 0])]
                if not (got == expected[rows]).all() or paths != [expected_paths[r] for r in rows]:
                    errors.append(seed)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


def test_recorded_search_parameters_are_applied_on_open(tmp_path, ckpt):
    root = tmp_path / "index"
    write_snapshot(root, ckpt, n=400, factory="IVF8,Flat")
    with Snapshot.open(root) as snap:
        recorded = snap.manifest["index"]["search_params"]
        assert set(recorded) == {"nprobe"}
        assert fi.faiss.extract_index_ivf(snap._index).nprobe == recorded["nprobe"]


def test_current_switches_atomically_and_old_snapshots_are_pruned(tmp_path, ckpt):
    root = tmp_path / "index"
    assert read_current(root) is None
    with pytest.raises(SnapshotError, match="no published snapshot"):
        Snapshot.open(root)
    made = [write_snapshot(root, ckpt, seed=s)[0] for s in range(4)]
    assert read_current(root) == made[-1]
    assert list_snapshots(root) == made  # ids sort by creation time
    with Snapshot.open(root, made[0]) as old:
        assert old.id == made[0]
    writer = SnapshotWriter(root)
    writer.publish(made[1])  # roll back to an older one: it must survive pruning
    removed = writer.prune(keep=2)
    assert sorted(removed) == [made[0]]
    assert list_snapshots(root) == made[1:]
    writer.publish(made[3])
    assert writer.prune(keep=1) == [made[1], made[2]]
    assert list_snapshots(root) == [made[3]]
    assert not list((root / SNAPSHOTS).glob(".*"))


def test_unpublished_and_half_written_snapshots_are_invisible_and_cleaned(tmp_path, ckpt):
    root = tmp_path / "index"
    first, _, _ = write_snapshot(root, ckpt, seed=1)
    written, _, _ = write_snapshot(root, ckpt, seed=2, publish=False)
    assert read_current(root) == first  # written but not published
    half = snapshots_dir(root) / ".tmp-20990101T000000.000000Z-abcdef"
    half.mkdir()
    (half / INDEX_FILE).write_bytes(b"partial")
    (root / f"{CURRENT}.4242.tmp").write_text("garbage")
    assert half.name not in list_snapshots(root)
    SnapshotWriter(root).clean_leftovers()
    assert not half.exists() and not (root / f"{CURRENT}.4242.tmp").exists()
    assert read_current(root) == first and written in list_snapshots(root)


@pytest.mark.parametrize(
    "victim", ["index.faiss", "vectors.npy", "ids.npy", "photos.sqlite", "model/model.safetensors"]
)
def test_a_flipped_byte_anywhere_fails_verify(tmp_path, ckpt, victim):
    root = tmp_path / "index"
    sid, _, _ = write_snapshot(root, ckpt)
    Snapshot.open(root, verify=True).close()
    path = snapshots_dir(root) / sid / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=f"{victim} checksum mismatch"):
        Snapshot.open(root, verify=True)
    assert sbir_main(["-q", "index", "verify", str(root)]) == 2


def test_open_without_verify_still_refuses_a_swapped_model_and_broken_files(tmp_path, ckpt):
    root = tmp_path / "index"
    sid, _, _ = write_snapshot(root, ckpt)
    snap_dir = snapshots_dir(root) / sid
    other = fake_checkpoint(tmp_path / "other", seed=9)
    (snap_dir / "model" / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(SnapshotError, match="the index was built with"):
        Snapshot.open(root)
    (snap_dir / "model" / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    Snapshot.open(root).close()
    (snap_dir / INDEX_FILE).write_bytes((snap_dir / INDEX_FILE).read_bytes()[:50])
    with pytest.raises(SnapshotError, match="index.faiss"):
        Snapshot.open(root)
    (snap_dir / INDEX_FILE).unlink()
    with pytest.raises(SnapshotError, match="lacks index.faiss"):
        Snapshot.open(root)


def test_broken_manifest_current_and_missing_snapshot_are_snapshot_errors(tmp_path, ckpt):
    root = tmp_path / "index"
    sid, _, _ = write_snapshot(root, ckpt)
    (root / CURRENT).write_text("../../etc\n")
    with pytest.raises(SnapshotError, match="is not a snapshot id"):
        Snapshot.open(root)
    (root / CURRENT).write_text("20000101T000000.000000Z-000000\n")
    with pytest.raises(SnapshotError, match="does not exist"):
        Snapshot.open(root)
    (root / CURRENT).write_text(sid + "\n")
    (snapshots_dir(root) / sid / "manifest.json").write_text("{not json")
    with pytest.raises(SnapshotError, match="unreadable"):
        Snapshot.open(root)


def test_verify_catches_consistent_checksums_over_inconsistent_content(tmp_path, ckpt):
    """Files rewritten together with their checksums (a buggy tool, not a disk error) are still caught."""
    from model.ground.files import sha256_file

    root = tmp_path / "index"
    sid, ids, _ = write_snapshot(root, ckpt)
    snap_dir = snapshots_dir(root) / sid
    np.save(snap_dir / "ids.npy", ids + 1)
    manifest = json.loads((snap_dir / "manifest.json").read_text())
    manifest["files"]["ids.npy"]["sha256"] = sha256_file(snap_dir / "ids.npy")
    (snap_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="different ids"):
        Snapshot.open(root, verify=True)


def test_verify_reports_unexpected_files(tmp_path, ckpt):
    root = tmp_path / "index"
    sid, _, _ = write_snapshot(root, ckpt)
    (snapshots_dir(root) / sid / "stray.bin").write_bytes(b"x")
    with pytest.raises(SnapshotError, match="unexpected file stray.bin"):
        Snapshot.open(root, verify=True)


def test_cli_verify_and_info(tmp_path, ckpt, capsys):
    root = tmp_path / "index"
    sid, _, _ = write_snapshot(root, ckpt, seed=1)
    write_snapshot(root, ckpt, seed=2)
    assert sbir_main(["-q", "index", "verify", str(root), "--all"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok ") == 2 and "match their checksums" in out
    assert sbir_main(["-q", "index", "info", str(root), "--snapshot", sid]) == 0
    assert f"snapshot {sid}" in capsys.readouterr().out
    assert sbir_main(["-q", "index", "info", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 40


@pytest.mark.parametrize(
    "damage",
    [
        {"model": "not a dict"},
        {"dim": "sixteen"},
        {"count": None},
        {"index": {"factory": "Flat", "search_params": {"nprobe": 4}}},  # a parameter Flat does not have
        {"files": []},
    ],
)
def test_a_manifest_of_the_wrong_shape_is_a_snapshot_error(tmp_path, ckpt, damage):
    root = tmp_path / "index"
    sid, _, _ = write_snapshot(root, ckpt)
    mpath = snapshots_dir(root) / sid / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest.update(damage)
    mpath.write_text(json.dumps(manifest))
    for verify in (False, True):
        with pytest.raises(SnapshotError):
            Snapshot.open(root, verify=verify).close()
