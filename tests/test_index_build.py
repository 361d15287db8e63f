"""`sbir index build` end to end with a real (untrained) model: bad input, reports, stored vectors, manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_index_support import build_cli, make_bad_files, make_photos, photo, sbir

from index_builder.snapshot import Snapshot, read_current
from model.images import load_image


@pytest.fixture(scope="module")
def model(untrained_checkpoint):
    from model.pipeline import SBIRModel

    return SBIRModel.load(untrained_checkpoint, device="cpu")


def test_bad_files_are_skipped_with_reasons_and_the_rest_is_indexed(tmp_path, untrained_checkpoint, model):
    photos = tmp_path / "photos"
    good = make_photos(photos, range(5))
    frames = [photo(50), photo(51)]
    frames[0].save(photos / "anim.gif", save_all=True, append_images=frames[1:])  # first frame counts
    expected = make_bad_files(photos, tmp_path / "outside")
    root = tmp_path / "index"
    report = build_cli(photos, untrained_checkpoint, root)

    reasons = {s["key"]: s["reason"] for s in report["skipped"]}
    assert reasons == expected
    assert all(s["path"] and s["detail"] for s in report["skipped"])
    assert report["counts"]["indexed"] == 6 and report["counts"]["embedded"] == 6
    assert report["skipped_by_reason"] == {r: 1 for r in expected.values()}
    assert sbir("index", "verify", root) == 0

    with Snapshot.open(root, verify=True) as snap:
        assert snap.count == 6 and snap.dim == model.dim
        assert snap.model_sha256 == model.sha256
        manifest = snap.manifest
        assert manifest["model"]["backbone_weights_sha256"] == model.config["backbone"]["weights_sha256"]
        assert manifest["index"]["factory"] == "Flat" and manifest["index"]["recall"]["recall"] == 1.0
        assert set(manifest["files"]) >= {"index.faiss", "photos.sqlite", "model/model.safetensors"}
        # the stored vector of a photo is the model's embedding of that photo, under that photo's id
        for path in (good[0], good[3], photos / "anim.gif"):
            pixels = torch.stack([model.preprocess(load_image(path))])
            expected_vec = model.encode_pixels(pixels, "photo")
            scores, ids = snap.search(expected_vec, 3)
            (rec,) = snap.lookup([int(ids[0, 0])])
            assert rec["path"] == str(path.resolve()) and scores[0, 0] == pytest.approx(1.0, abs=1e-4)
            assert len(rec["sha256"]) == 64
        # the report travels with the snapshot
        stored = json.loads((snap.path / "build_report.json").read_text())
        assert {s["key"] for s in stored["skipped"]} == set(expected)


def test_a_collection_without_any_usable_image_is_a_clear_error(tmp_path, untrained_checkpoint, capsys):
    photos = tmp_path / "photos"
    make_bad_files(photos, tmp_path / "outside")
    root = tmp_path / "index"
    report = tmp_path / "report.json"
    code = sbir(
        "index",
        "build",
        photos,
        "--model",
        untrained_checkpoint,
        "--out",
        root,
        "--workers",
        0,
        "--no-progress",
        "--report",
        report,
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "no usable image" in err and "Traceback" not in err
    assert {s["reason"] for s in json.loads(report.read_text())["skipped"]} == {
        "empty",
        "not-an-image",
        "corrupt",
        "too-large",
        "outside-root",
    }
    assert read_current(root) is None

    (tmp_path / "empty").mkdir()
    assert sbir("index", "build", tmp_path / "empty", "--model", untrained_checkpoint, "--out", root) == 2
    assert "no image files found" in capsys.readouterr().err


def test_manifest_metadata_and_ids_round_trip(tmp_path, untrained_checkpoint):
    folder = tmp_path / "coll"
    paths = make_photos(folder, range(3))
    rows = [
        {"path": str(p.relative_to(folder)), "id": 1000 + i, "caption": f"photo {i}", "tags": ["x", i]}
        for i, p in enumerate(paths)
    ]
    rows.append({"path": "missing.jpg", "id": 5, "caption": "gone"})
    (folder / "photos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp_path / "index"
    report = build_cli(folder / "photos.jsonl", untrained_checkpoint, root)
    assert [(s["key"], s["reason"]) for s in report["skipped"]] == [("5", "missing")]
    with Snapshot.open(root) as snap:
        recs = snap.lookup([1000, 1001, 1002, 5])
        assert recs[3] is None
        for i, rec in enumerate(recs[:3]):
            assert rec["id"] == 1000 + i
            assert rec["metadata"] == {"caption": f"photo {i}", "tags": ["x", i]}
            assert rec["path"] == str(paths[i].resolve())


def test_explicit_index_factory_and_bad_factory(tmp_path, untrained_checkpoint, capsys):
    photos = tmp_path / "photos"
    make_photos(photos, range(12))
    root = tmp_path / "index"
    report = build_cli(photos, untrained_checkpoint, root, "--index", "HNSW8", "--keep", "1")
    assert report["index"]["factory"] == "HNSW8" and report["index"]["search_params"].keys() == {"efSearch"}
    assert report["index"]["recall"]["recall"] >= 0.95
    # the fixture re-ranks (as trained models do): recall is measured as deep as the service searches,
    # here every other photo (11), not the top 10
    assert report["index"]["recall"]["k"] == 11
    code = sbir(
        "index",
        "build",
        photos,
        "--model",
        untrained_checkpoint,
        "--out",
        root,
        "--index",
        "Bogus12",
        "--workers",
        0,
        "--no-progress",
    )
    assert code == 2 and "faiss cannot build index 'Bogus12'" in capsys.readouterr().err
    with Snapshot.open(root) as snap:
        assert snap.factory == "HNSW8"  # the failed build published nothing


def test_one_job_at_a_time_per_root(tmp_path, untrained_checkpoint, capsys):
    import subprocess
    import sys

    from index_builder.build import RootLock

    photos = tmp_path / "photos"
    make_photos(photos, range(2))
    root = tmp_path / "index"
    root.mkdir()
    with RootLock(root):  # same process
        assert sbir("index", "build", photos, "--model", untrained_checkpoint, "--out", root) == 2
        assert "another index job holds" in capsys.readouterr().err
    holder = subprocess.Popen(  # another process
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from index_builder.build import RootLock; "
            "lock = RootLock(Path(sys.argv[1])).__enter__(); print('locked', flush=True); time.sleep(60)",
            str(root),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert sbir("index", "build", photos, "--model", untrained_checkpoint, "--out", root) == 2
        assert f"(pid {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert read_current(root) is None
    # the lock died with its holder: the next job runs
    assert (
        sbir("index", "build", photos, "--model", untrained_checkpoint, "--out", root, "--no-progress") == 0
    )


def test_a_file_changed_after_hashing_is_indexed_with_what_was_read(
    tmp_path, untrained_checkpoint, monkeypatch
):
    """Two copies of one photo; one is overwritten between the hash pass and decoding. The changed one is
    embedded under its new hash, the untouched copy (whose content was never decoded) in a second pass."""
    import hashlib

    import index_builder.build as build_module
    from index_builder.build import BuildOptions, build

    photos = tmp_path / "photos"
    make_photos(photos, range(3))
    photo(40).save(photos / "copy_a.png")
    (photos / "copy_b.png").write_bytes((photos / "copy_a.png").read_bytes())
    real_hash = build_module.hash_photos

    def hash_then_change(records, root, **kw):
        out = real_hash(records, root, **kw)
        first = min((r for r in records if r.key.startswith("copy_")), key=lambda r: r.id)
        photo(41).save(first.path)  # after hashing, before decoding
        return out

    monkeypatch.setattr(build_module, "hash_photos", hash_then_change)
    root = tmp_path / "index"
    result = build(photos, root, untrained_checkpoint, BuildOptions(workers=0, progress=False))
    assert result.report["counts"]["indexed"] == 5 and result.report["counts"]["embedded"] == 5
    with Snapshot.open(root, verify=True) as snap:
        ids = [int(i) for i in np.load(snap.path / "ids.npy")]
        recs = {r["path"]: r for r in snap.lookup(ids)}
        for name in ("copy_a.png", "copy_b.png"):
            path = photos / name
            assert recs[str(path.resolve())]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        vec = dict(zip(ids, np.load(snap.path / "vectors.npy"), strict=True))
        a, b = (recs[str((photos / n).resolve())]["id"] for n in ("copy_a.png", "copy_b.png"))
        assert np.abs(vec[a] - vec[b]).max() > 1e-3  # different content, different vectors


def test_a_reranking_models_index_is_tuned_at_the_depth_the_service_searches():
    """The service asks the index for the second stage's candidates (`rerank.top`), not the top 10.
    An IVF index tuned at 10 finds too few of them (docs/BENCHMARKS.md, "The first stage's depth")."""
    from test_index_faiss import clustered

    from index_builder import faiss_index as fi
    from index_builder.build import recall_depth

    top = 100
    reranking = {"rerank": {"vector": "infonce", "top": top}}
    assert recall_depth(reranking) == top
    assert recall_depth({"rerank": None}) == recall_depth({}) == fi.RECALL_K
    x = clustered(10_000, 32, clusters=1000, noise=0.1, seed=6)
    ids = np.arange(len(x), dtype=np.int64)
    index = fi.build_index(x, ids, "IVF128,Flat")
    shallow = fi.tune_and_measure(index, x, ids, target=0.95, sample=200)
    deep = fi.tune_and_measure(index, x, ids, k=recall_depth(reranking), target=0.95, sample=200)
    assert deep.k == top and deep.recall >= 0.95
    assert deep.params["nprobe"] > shallow.params["nprobe"]
    fi.set_search_params(index, shallow.params)
    assert fi.tune_and_measure(index, x, ids, k=top, sample=200, tune=False).recall < 0.85


def test_an_update_retunes_a_snapshot_whose_recall_was_measured_too_shallow():
    """Snapshots built before the depth was the model's recorded recall@10: the same photos must not
    count as 'nothing changed' for a re-ranking model, whose service searches 400 deep."""
    from types import SimpleNamespace

    from index_builder.build import BuildOptions, _unchanged

    rows = [(i, f"k{i}", f"/p/{i}.jpg", f"{i:064x}", "{}") for i in range(1000)]
    prev_rows = {r[0]: r[1:] for r in rows}
    opt = BuildOptions()

    def previous(k):
        recall = {"k": k, "target": opt.recall_target}
        return SimpleNamespace(manifest={"index": {"requested": "auto", "recall": recall}})

    reranking = {"rerank": {"top": 400}}
    assert not _unchanged(previous(10), prev_rows, rows, opt, reranking)
    assert _unchanged(previous(400), prev_rows, rows, opt, reranking)
    assert _unchanged(previous(10), prev_rows, rows, opt, {"rerank": None})
    few = rows[:8]  # fewer photos than the depth: recall was measured over all the others
    assert _unchanged(previous(7), {r[0]: r[1:] for r in few}, few, opt, reranking)
