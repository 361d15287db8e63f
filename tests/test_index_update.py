"""`sbir index update`: only new or changed content is embedded, and the result equals a full rebuild."""

from __future__ import annotations

import json
import shutil

import numpy as np
from test_index_support import build_cli, make_photos, photo, sbir, update_cli

from index_builder.collection import id_for_key
from index_builder.snapshot import Snapshot, list_snapshots, read_current


def all_neighbours(root, queries, k=5):
    with Snapshot.open(root) as snap:
        return snap.search(queries, k)


def stored(root):
    with Snapshot.open(root) as snap:
        ids = np.load(snap.path / "ids.npy")
        vectors = np.load(snap.path / "vectors.npy")
        rows = {r["id"]: r for r in snap.lookup(ids)}
    return ids, vectors, rows


def test_incremental_update_equals_a_full_rebuild(tmp_path, untrained_checkpoint):
    photos = tmp_path / "photos"
    paths = make_photos(photos, range(10))
    root = tmp_path / "index"
    first = build_cli(photos, untrained_checkpoint, root)
    first_id = read_current(root)
    ids_before, _, rows_before = stored(root)

    # change the collection: 2 new, 1 modified in place, 1 deleted, 1 renamed (= delete + add, same bytes)
    make_photos(photos, [20, 21], prefix="new")
    photo(77).save(paths[4])
    changed_id = id_for_key(paths[4].relative_to(photos).as_posix())
    deleted_id = id_for_key(paths[7].relative_to(photos).as_posix())
    paths[7].unlink()
    renamed_from = paths[8].relative_to(photos).as_posix()
    paths[8].rename(photos / "renamed.png" if paths[8].suffix == ".png" else photos / "renamed.jpg")

    report = update_cli(root, photos)
    assert report["counts"]["embedded"] == 3  # two new photos and the modified one; the rename is reused
    assert report["counts"]["from_previous"] == 8
    assert report["counts"]["added"] == 3 and report["counts"]["removed"] == 2
    assert report["counts"]["changed"] == 1 and report["counts"]["unchanged"] == 7
    assert read_current(root) != first_id and first_id in list_snapshots(root)
    with Snapshot.open(root, verify=True) as snap:
        assert snap.manifest["parent"] == first_id
        assert snap.lookup([deleted_id, id_for_key(renamed_from)]) == [None, None]
        (rec,) = snap.lookup([changed_id])
        assert rec["sha256"] != rows_before[changed_id]["sha256"]  # same id, new content

    # a full build of the same collection in a fresh root
    fresh = tmp_path / "fresh"
    full = build_cli(photos, untrained_checkpoint, fresh)
    assert full["counts"]["embedded"] == 11
    ids_u, vec_u, rows_u = stored(root)
    ids_f, vec_f, rows_f = stored(fresh)
    np.testing.assert_array_equal(ids_u, ids_f)
    np.testing.assert_allclose(vec_u, vec_f, atol=1e-5)
    assert {i: (r["path"], r["sha256"]) for i, r in rows_u.items()} == {
        i: (r["path"], r["sha256"]) for i, r in rows_f.items()
    }
    scores_u, nn_u = all_neighbours(root, vec_f)
    scores_f, nn_f = all_neighbours(fresh, vec_f)
    np.testing.assert_array_equal(nn_u, nn_f)
    np.testing.assert_allclose(scores_u, scores_f, atol=1e-5)
    # ids of unchanged photos are stable across builds
    assert set(ids_before) - {deleted_id, id_for_key(renamed_from)} <= set(ids_u)
    assert first["counts"]["indexed"] == 10


def test_nothing_changed_publishes_nothing_and_metadata_changes_do(tmp_path, untrained_checkpoint):
    folder = tmp_path / "coll"
    paths = make_photos(folder, range(4))
    manifest = folder / "m.csv"
    manifest.write_text(
        "path,caption\n" + "".join(f"{p.relative_to(folder)},c{i}\n" for i, p in enumerate(paths))
    )
    root = tmp_path / "index"
    build_cli(manifest, untrained_checkpoint, root)
    first = read_current(root)
    report = update_cli(root, manifest)
    assert report["counts"]["embedded"] == 0 and read_current(root) == first
    manifest.write_text(manifest.read_text().replace("c2", "a new caption"))
    report = update_cli(root, manifest)
    assert report["counts"]["embedded"] == 0 and report["counts"]["from_previous"] == 4
    assert read_current(root) != first
    with Snapshot.open(root) as snap:
        key = paths[2].relative_to(folder).as_posix()
        assert snap.lookup([id_for_key(key)])[0]["metadata"] == {"caption": "a new caption"}


def test_a_different_model_is_refused_unless_rebuild(tmp_path, untrained_checkpoint, capsys):
    photos = tmp_path / "photos"
    make_photos(photos, range(4))
    root = tmp_path / "index"
    build_cli(photos, untrained_checkpoint, root)
    first = read_current(root)
    other = tmp_path / "other-model"
    shutil.copytree(untrained_checkpoint, other)
    config = json.loads((other / "config.json").read_text())
    config["training"] = {"note": "another model"}
    (other / "config.json").write_text(json.dumps(config))

    code = sbir("index", "update", root, photos, "--model", other, "--workers", 0, "--no-progress")
    assert code == 2
    err = capsys.readouterr().err
    assert "was built with model" in err and "--rebuild" in err
    assert read_current(root) == first

    report = update_cli(root, photos, "--model", other, "--rebuild")
    assert report["counts"]["embedded"] == 4 and report["counts"]["from_previous"] == 0
    with Snapshot.open(root, verify=True) as snap:
        from model.pipeline import checkpoint_sha256

        assert snap.model_sha256 == checkpoint_sha256(other) == checkpoint_sha256(snap.model_dir)
        assert json.loads((snap.model_dir / "config.json").read_text())["training"] == {
            "note": "another model"
        }


def test_update_needs_a_published_snapshot(tmp_path, capsys):
    photos = tmp_path / "photos"
    make_photos(photos, range(1))
    assert sbir("index", "update", tmp_path / "nothing", photos) == 2
    assert "no published snapshot" in capsys.readouterr().err


def test_rebuild_recovers_from_a_damaged_current_snapshot(tmp_path, untrained_checkpoint, capsys):
    photos = tmp_path / "photos"
    make_photos(photos, range(3))
    root = tmp_path / "index"
    build_cli(photos, untrained_checkpoint, root)
    broken = read_current(root)
    with Snapshot.open(root) as snap:
        index_file = snap.path / "index.faiss"
    index_file.write_bytes(index_file.read_bytes()[:40])

    assert sbir("index", "update", root, photos, "--no-progress") == 2  # its vectors cannot be trusted
    assert "index.faiss" in capsys.readouterr().err
    assert sbir("index", "update", root, photos, "--rebuild", "--no-progress") == 2  # and no model to use
    assert "give --model" in capsys.readouterr().err
    report = update_cli(root, photos, "--rebuild", "--model", untrained_checkpoint)
    assert report["counts"]["embedded"] == 3
    assert read_current(root) != broken
    Snapshot.open(root, verify=True).close()
