"""Photo collections: directory trees and CSV/JSONL/parquet manifests become records with stable ids."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from index_builder.collection import id_for_key, load_collection
from model.ground.errors import UserError


def touch_image(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)
    return path


def test_directory_tree_ids_derive_from_relative_paths(tmp_path):
    root = tmp_path / "photos"
    touch_image(root / "a.png")
    touch_image(root / "sub" / "b.JPG")
    (root / "notes.txt").write_text("not a photo")
    coll = load_collection(root)
    assert coll.kind == "directory"
    keys = {r.key: r for r in coll.records}
    assert set(keys) == {"a.png", "sub/b.JPG"}
    assert keys["sub/b.JPG"].id == id_for_key("sub/b.JPG")
    assert all(r.path.is_absolute() and 0 <= r.id < 2**63 for r in coll.records)
    assert [r.id for r in coll.records] == sorted(r.id for r in coll.records)
    # the same tree listed again (or moved elsewhere) gives the same ids
    moved = tmp_path / "moved"
    os.rename(root, moved)
    assert {r.key: r.id for r in load_collection(moved).records} == {k: r.id for k, r in keys.items()}


def test_symlinks_leaving_the_root_are_skipped_not_followed(tmp_path):
    root = tmp_path / "photos"
    touch_image(root / "inside.png")
    outside = touch_image(tmp_path / "secret" / "outside.png")
    os.symlink(outside, root / "escape.png")
    os.symlink(root / "inside.png", root / "alias.png")  # stays inside: allowed
    os.symlink(tmp_path / "secret", root / "linked_dir")  # directory links are not walked
    coll = load_collection(root)
    assert sorted(r.key for r in coll.records) == ["alias.png", "inside.png"]
    assert [(s.key, s.reason) for s in coll.skipped] == [("escape.png", "outside-root")]


def test_csv_manifest_with_integer_ids_and_metadata(tmp_path):
    touch_image(tmp_path / "img" / "x.png")
    touch_image(tmp_path / "img" / "y.png")
    (tmp_path / "m.csv").write_text(
        "path,id,caption,license\nimg/x.png,42,a red square,CC0\nimg/y.png,7,another,\n"
    )
    coll = load_collection(tmp_path / "m.csv")
    assert coll.kind == "csv" and coll.root == tmp_path.resolve()
    by_id = {r.id: r for r in coll.records}
    assert set(by_id) == {7, 42}
    assert by_id[42].metadata == {"caption": "a red square", "license": "CC0"}
    assert by_id[42].path == (tmp_path / "img" / "x.png").resolve()
    assert by_id[42].key == "42"


def test_jsonl_manifest_with_string_ids_hashes_them(tmp_path):
    touch_image(tmp_path / "x.png")
    rows = [{"path": "x.png", "id": "photo-x", "tags": ["red", "square"], "score": 0.5}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (rec,) = load_collection(tmp_path / "m.jsonl").records
    assert rec.id == id_for_key("photo-x") and rec.key == "photo-x"
    assert rec.metadata == {"tags": ["red", "square"], "score": 0.5}


def test_parquet_manifest_values_become_json(tmp_path):
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    touch_image(tmp_path / "x.png")
    table = pa.table(
        {
            "file": ["x.png"],
            "taken": [dt.datetime(2024, 5, 1, 12, 30)],
            "width": pa.array([12], pa.int32()),
            "nan": [float("nan")],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    (rec,) = load_collection(tmp_path / "m.parquet", path_column="file").records
    assert rec.key == "x.png" and rec.id == id_for_key("x.png")
    assert rec.metadata == {"taken": "2024-05-01T12:30:00", "width": 12, "nan": None}
    json.dumps(rec.metadata, allow_nan=False)


def test_manifest_paths_outside_the_root_are_skipped(tmp_path):
    base = tmp_path / "base"
    touch_image(base / "ok.png")
    touch_image(tmp_path / "elsewhere.png")
    os.symlink(tmp_path / "elsewhere.png", base / "link.png")
    (base / "m.csv").write_text(f"path\nok.png\n../elsewhere.png\n{tmp_path / 'elsewhere.png'}\nlink.png\n\n")
    coll = load_collection(base / "m.csv")
    assert [r.key for r in coll.records] == ["ok.png"]
    assert [s.reason for s in coll.skipped] == ["outside-root"] * 3
    # with a wider --photo-root, relative paths start there and the absolute one is inside it
    wide = load_collection(base / "m.csv", photo_root=tmp_path)
    assert sorted(r.key for r in wide.records) == ["elsewhere.png", "link.png", "ok.png"]
    assert [s.path for s in wide.skipped] == ["../elsewhere.png"]


def test_manifest_errors_are_user_errors(tmp_path):
    touch_image(tmp_path / "x.png")
    (tmp_path / "nopath.csv").write_text("file\nx.png\n")
    with pytest.raises(UserError, match="no 'path' column"):
        load_collection(tmp_path / "nopath.csv")
    (tmp_path / "dup.csv").write_text("path\nx.png\nx.png\n")
    with pytest.raises(UserError, match="listed twice"):
        load_collection(tmp_path / "dup.csv")
    (tmp_path / "bad.jsonl").write_text('{"path": "x.png"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        load_collection(tmp_path / "bad.jsonl")
    (tmp_path / "photos.txt").write_text("x.png\n")
    with pytest.raises(UserError, match="not a directory nor a manifest"):
        load_collection(tmp_path / "photos.txt")
    with pytest.raises(UserError, match="does not exist"):
        load_collection(tmp_path / "missing")


def test_rows_without_a_path_are_reported(tmp_path):
    touch_image(tmp_path / "x.png")
    (tmp_path / "m.csv").write_text("path,id\nx.png,1\n,2\n")
    coll = load_collection(tmp_path / "m.csv")
    assert [r.id for r in coll.records] == [1]
    assert [(s.key, s.reason) for s in coll.skipped] == [("row 2", "no-path")]
