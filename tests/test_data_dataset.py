"""The dataset format: records, manifest round trip, splits."""

from __future__ import annotations

import json

import pytest

from model.data.dataset import (
    Record,
    Split,
    format_split_summary,
    list_splits,
    load_split,
    make_split,
    read_manifest,
    read_split,
    records_in,
    resolve_path,
    split_counts,
    split_path,
    split_with_unseen,
    write_manifest,
    write_split,
)
from model.ground.errors import UserError

CLASSES = [f"class_{i:02d}" for i in range(40)]


def test_make_split_is_deterministic_and_disjoint():
    a = make_split(CLASSES, seed=3)
    b = make_split(list(reversed(CLASSES)) + CLASSES[:5], seed=3)  # order and duplicates do not matter
    assert a == b
    assert set(a.train).isdisjoint(a.val)
    assert set(a.train).isdisjoint(a.unseen)
    assert set(a.val).isdisjoint(a.unseen)
    assert sorted(a.train + a.val + a.unseen) == CLASSES
    # 20% of 40 unseen, 15% of the 32 seen for val (round half up: 4.8 -> 5)
    assert (len(a.unseen), len(a.val), len(a.train)) == (8, 5, 27)
    assert a.train == sorted(a.train) and a.val == sorted(a.val) and a.unseen == sorted(a.unseen)
    assert a.seed == 3 and a.name == "category_seed3"


def test_make_split_depends_on_seed():
    unseen = {tuple(make_split(CLASSES, seed=s).unseen) for s in range(5)}
    assert len(unseen) == 5


def test_make_split_without_seed_records_the_drawn_seed():
    s = make_split(CLASSES, seed=None)
    assert isinstance(s.seed, int)
    assert make_split(CLASSES, seed=s.seed).unseen == s.unseen


def test_make_split_small_and_bad_inputs():
    s = make_split(["a", "b", "c"], seed=0)
    assert len(s.unseen) == 1 and len(s.train) >= 1
    with pytest.raises(UserError):
        make_split(["only"], seed=0)
    with pytest.raises(UserError):
        make_split(CLASSES, seed=0, unseen_fraction=1.0)


def test_split_check_rejects_overlap_and_duplicates():
    with pytest.raises(UserError, match="share"):
        Split("bad", 0, ["a", "b"], ["b"], ["c"]).check()
    with pytest.raises(UserError, match="more than once"):
        Split("bad", 0, ["a", "a"], [], ["c"]).check()
    with pytest.raises(UserError, match="no unseen"):
        Split("bad", 0, ["a"], [], []).check()


def test_split_json_round_trip(tmp_path):
    s = make_split(CLASSES, seed=1, name="mine", description="test split")
    path = write_split(s, tmp_path / "splits" / "mine.json")
    assert read_split(path) == s
    assert Split.from_json(s.to_json()) == s
    assert Split.from_json(json.loads(s.to_json())) == s
    data = json.loads(path.read_text())
    assert data["train"] == s.train and data["granularity"] == "category"


def test_split_from_json_rejects_overlap(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"name": "x", "seed": 0, "train": ["a", "b"], "val": [], "unseen": ["b"]}))
    with pytest.raises(UserError, match="share"):
        read_split(path)
    with pytest.raises(UserError, match="missing key"):
        Split.from_json('{"name": "x", "train": []}')
    with pytest.raises(UserError, match="not valid JSON"):
        Split.from_json("{")


def test_split_validate_names_missing_classes():
    s = Split("s", 0, ["a", "b"], ["c"], ["d"])
    assert s.validate(["a", "b", "c", "d", "e"]) == ["e"]
    with pytest.raises(UserError, match="unseen.*not in the data: d"):
        s.validate(["a", "b", "c"])


def test_split_with_unseen_keeps_the_given_unseen_set():
    s = split_with_unseen(CLASSES, ["class_03", "class_07"], name="pub", seed=0)
    assert s.unseen == ["class_03", "class_07"]
    assert len(s.val) == 6  # 15% of 38 = 5.7 -> 6
    assert set(s.val) | set(s.train) == set(CLASSES) - {"class_03", "class_07"}
    assert split_with_unseen(CLASSES, ["class_03", "class_07"], name="pub", seed=0) == s
    assert split_with_unseen(CLASSES, ["class_03", "class_07"], name="pub", seed=1).val != s.val
    with pytest.raises(UserError, match="nope"):
        split_with_unseen(CLASSES, ["class_03", "nope"], name="pub")


def _records():
    return [
        Record("images/sketch/a/1.png", "sketch", "cat", "1f431", "openmoji", {"emoji": "🐱", "note": "a,b"}),
        Record(
            "images/photo/noto/1.png", "photo", "cat", "1f431", "noto", {"emoji": "🐱", "note": 'say "hi"'}
        ),
        Record("/abs/path/x.jpg", "photo", "dog", "", "", {"emoji": "", "note": ""}),
    ]


def test_manifest_round_trip(tmp_path):
    records = _records()
    write_manifest(tmp_path, records)
    back = read_manifest(tmp_path)
    assert back == records
    header = (tmp_path / "manifest.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "path,domain,category,instance,artist,emoji,note"


def test_manifest_missing_meta_becomes_empty_column(tmp_path):
    write_manifest(tmp_path, [Record("a.png", "sketch", "c", meta={"x": "1"}), Record("b.png", "photo", "c")])
    back = read_manifest(tmp_path)
    assert back[1].meta == {"x": ""}


def test_manifest_errors(tmp_path):
    with pytest.raises(UserError, match="not a dataset directory"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,domain,category\nx,sketch,c\n")
    with pytest.raises(UserError, match="missing column"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,domain,category,instance,artist\nx,drawing,c,,\n")
    with pytest.raises(UserError, match="line 2.*domain"):
        read_manifest(tmp_path)


def test_record_validation():
    with pytest.raises(ValueError):
        Record("a.png", "video", "c")
    with pytest.raises(ValueError):
        Record("a.png", "sketch", "")
    with pytest.raises(ValueError):
        Record("a.png", "sketch", "c", meta={"category": "x"})
    assert hash(Record("a.png", "sketch", "c", meta={"k": "v"}))  # hashable despite the dict


def test_resolve_path(tmp_path):
    rel, _, absolute = _records()
    assert resolve_path(tmp_path, rel) == tmp_path / "images/sketch/a/1.png"
    assert str(resolve_path(tmp_path, absolute)) == "/abs/path/x.jpg"


def test_list_and_load_splits(tmp_path):
    assert list_splits(tmp_path) == {}
    for seed in (2, 0):
        make_split(CLASSES, seed).write(split_path(tmp_path, f"category_seed{seed}"))
    found = list_splits(tmp_path)
    assert list(found) == ["category_seed0", "category_seed2"]
    assert load_split(tmp_path, "category_seed2").seed == 2
    assert load_split(tmp_path, found["category_seed0"]).seed == 0
    with pytest.raises(UserError, match="available: category_seed0, category_seed2"):
        load_split(tmp_path, "nope")


def test_records_in_and_counts():
    records = _records()
    s = Split("s", 0, ["cat"], [], ["dog"])
    assert [r.path for r in records_in(records, s, "train", domain="photo")] == ["images/photo/noto/1.png"]
    assert len(records_in(records, s, ("train", "unseen"))) == 3
    counts = split_counts(records, s)
    assert counts["train"] == {"classes": 1, "sketches": 1, "photos": 1}
    assert counts["unseen"] == {"classes": 1, "sketches": 0, "photos": 1}
    text = format_split_summary(records, s)
    assert "unseen" in text and "split s" in text
    inst = Split("i", 0, ["1f431"], [], ["x"], granularity="instance")
    assert len(records_in(records, inst, "train")) == 2
