"""The embedding job's parts without a model: content hashes, decoding in workers, the chunk checkpoint."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from test_index_support import make_bad_files, make_photos

from index_builder.collection import load_collection
from index_builder.embed import DecodeItem, EmbeddingCache, PhotoDecodeDataset, collate_decoded, hash_photos


def fake_preprocess(img):
    import torch

    return torch.zeros((3, 4, 4), dtype=torch.uint8) + (img.size[0] % 251)


def test_hashes_are_sha256_of_the_bytes_and_unreadable_files_are_reported(tmp_path):
    photos = tmp_path / "photos"
    good = make_photos(photos, range(3))
    make_bad_files(photos, tmp_path / "outside")
    (photos / "gone.png").symlink_to(photos / "nowhere.png")  # dangling link inside the root
    coll = load_collection(photos)
    hashes, skipped = hash_photos(coll.records, coll.root, threads=2, progress=False)
    by_key = {r.key: r.id for r in coll.records}
    for path in good:
        key = path.relative_to(photos).as_posix()
        assert hashes[by_key[key]] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert {(s.key, s.reason) for s in skipped} == {("zero.jpg", "empty"), ("gone.png", "missing")}
    # corrupt files have hashes: whether they decode is the workers' business
    assert by_key["truncated.png"] in hashes and by_key["bomb.png"] in hashes


def test_decode_dataset_reports_what_it_read(tmp_path):
    photos = tmp_path / "photos"
    (path,) = make_photos(photos, [5])
    expected = make_bad_files(photos, tmp_path / "outside")
    root = photos.resolve()
    items = [DecodeItem("0" * 64, str(path))]  # a stale hash: the file changed since hashing
    items += [DecodeItem("1" * 64, str(photos / name)) for name in expected]
    items.append(DecodeItem("2" * 64, str(photos / "vanished.png")))
    ds = PhotoDecodeDataset(items, root, fake_preprocess)
    out = [ds[i] for i in range(len(ds))]
    i, digest, pixels, reason, _ = out[0]
    assert (
        digest == hashlib.sha256(path.read_bytes()).hexdigest() and reason == "" and pixels.shape == (3, 4, 4)
    )
    assert [o[3] for o in out[1:]] == [*expected.values(), "missing"]
    batch = collate_decoded(out)
    assert batch["index"] == [0] and batch["pixels"].shape == (1, 3, 4, 4)
    assert [f[2] for f in batch["failed"]] == [*expected.values(), "missing"]


def test_chunks_survive_a_restart_and_torn_or_corrupt_chunks_are_dropped(tmp_path):
    job = tmp_path / "job"
    cache = EmbeddingCache(job, dim=4)
    v = np.eye(4, dtype=np.float32)[:2]
    cache.write_chunk(["a" * 64, "b" * 64], v, [("c" * 64, "corrupt", "bad data")])
    cache.write_chunk(["d" * 64], np.eye(4, dtype=np.float32)[3:], [])
    (job / "chunk-99999999999999999999-deadbeef.npz.123.tmp").write_bytes(b"half a chunk")
    (job / "chunk-99999999999999999999-cafecafe.npz").write_bytes(b"not a zip")

    again = EmbeddingCache(job, dim=4)
    assert again.loaded_from_disk == 4
    assert "a" * 64 in again and "c" * 64 in again and "e" * 64 not in again
    np.testing.assert_array_equal(again.vectors()[again.row["b" * 64]], v[1])
    np.testing.assert_array_equal(again.vectors()[again.row["d" * 64]], np.eye(4)[3])
    assert again.failures["c" * 64] == ("corrupt", "bad data")
    assert sorted(os.listdir(job)) == sorted(p for p in os.listdir(job) if p.endswith(".npz"))
    assert len(os.listdir(job)) == 2  # the torn temp file and the corrupt chunk are gone


def test_a_chunk_of_another_dimension_is_not_trusted(tmp_path):
    EmbeddingCache(tmp_path, dim=8).write_chunk(["a" * 64], np.ones((1, 8), np.float32), [])
    assert "a" * 64 not in EmbeddingCache(tmp_path, dim=4)


@pytest.mark.parametrize("workers", [0, 1])
def test_dataloader_workers_decode_in_order(tmp_path, workers):
    from torch.utils.data import DataLoader

    photos = tmp_path / "photos"
    paths = make_photos(photos, range(6))
    items = [DecodeItem(hashlib.sha256(p.read_bytes()).hexdigest(), str(p)) for p in paths]
    loader = DataLoader(
        PhotoDecodeDataset(items, photos.resolve(), fake_preprocess),
        batch_size=4,
        num_workers=workers,
        collate_fn=collate_decoded,
        multiprocessing_context="fork" if workers else None,
    )
    got = [(i, s) for b in loader for i, s in zip(b["index"], b["sha256"], strict=True)]
    assert got == [(i, it.sha256) for i, it in enumerate(items)]
