"""Feature caching: skips unreadable files with reasons, resumes after a crash, views are seeded."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

import model.features as features
from model.augment import freehand_sketch, silhouette_sketch, warp
from model.backbones import create_backbone
from model.data.dataset import Record, write_manifest
from model.features import (
    EDGE_VIEW,
    FREEHAND_VIEW,
    NORM_VIEW,
    SILHOUETTE_VIEW,
    FeatureSet,
    drawn_from_photo,
    extract_features,
    is_freehand,
    is_silhouette,
    plan_jobs,
)


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("efficientnet_lite2")


def _dataset(root, n=6):
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).ellipse([8 + i, 8, 50, 40 + i], outline="black", width=3)
        img.save(root / f"s{i}.png")
        records.append(Record(path=f"s{i}.png", domain="sketch", category=f"c{i % 2}", artist="pen"))
        Image.new("RGB", (64, 64), (40 * i, 100, 200)).save(root / f"p{i}.png")
        records.append(Record(path=f"p{i}.png", domain="photo", category=f"c{i % 2}", artist="paint"))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    records.append(Record(path="broken.png", domain="photo", category="c0", artist="paint"))
    (root / "empty.jpg").write_bytes(b"")
    records.append(Record(path="empty.jpg", domain="sketch", category="c1", artist="pen"))
    write_manifest(root, records)
    return records


def test_unreadable_files_are_skipped_and_listed(tmp_path, backbone):
    records = _dataset(tmp_path / "ds")
    fs = extract_features(tmp_path / "ds", records, backbone, tmp_path / "f", sketch_views=1,
                          edge_artists=["paint"], workers=0, progress=False)
    reasons = {s["path"]: s["reason"] for s in fs.meta["skipped"]}
    assert reasons["empty.jpg"].startswith("empty")
    assert reasons["broken.png"].startswith(("corrupt", "not-an-image"))
    # 6 sketches x 2 views + 6 photos x (image + edge map), and every sketch row (edge maps
    # included) again after stroke normalisation
    assert len(fs.feats) == 24 + 18 and fs.feats.shape[1] == backbone.dim
    assert set(fs.view.tolist()) == {0, 1, EDGE_VIEW, NORM_VIEW, NORM_VIEW + 1, NORM_VIEW + EDGE_VIEW}
    drawn = fs.for_sketches(records, False)
    assert len(drawn.feats) == 24 and set(drawn.view.tolist()) == {0, 1, EDGE_VIEW}
    normed = fs.for_sketches(records, True)
    assert len(normed.feats) == 24 and set(normed.view.tolist()) == {0, 1, EDGE_VIEW}
    photo_rows = np.isin(drawn.record, [i for i, r in enumerate(records) if r.domain == "photo"]) & (drawn.view == 0)
    np.testing.assert_array_equal(drawn.feats[photo_rows], normed.feats[photo_rows])  # photos: never normalised
    sketch0 = (drawn.record == 0) & (drawn.view == 0)
    assert not np.allclose(drawn.feats[sketch0], normed.feats[sketch0])
    again = FeatureSet.load(tmp_path / "f")
    np.testing.assert_array_equal(again.feats, fs.feats)
    # an augmented view differs from the original; the same seed gives the same view
    s0 = fs.feats[(fs.record == 0) & (fs.view == 0)][0]
    s1 = fs.feats[(fs.record == 0) & (fs.view == 1)][0]
    assert not np.allclose(s0, s1)


def test_a_killed_run_resumes_without_recomputing_finished_chunks(tmp_path, backbone, monkeypatch):
    records = _dataset(tmp_path / "ds")
    monkeypatch.setattr(features, "CHUNK_ROWS", 4)
    calls = {"n": 0}
    real_forward = type(backbone).forward

    def crashing_forward(self, x):
        calls["n"] += 1
        if calls["n"] == 3:  # batches of 4: s0 p0 s1 p1 | s2 p2 s3 p3 | s4 p4 s5 p5 | broken empty
            raise KeyboardInterrupt("simulated kill")
        return real_forward(self, x)

    monkeypatch.setattr(type(backbone), "forward", crashing_forward)
    with pytest.raises(KeyboardInterrupt):
        extract_features(tmp_path / "ds", records, backbone, tmp_path / "f", sketch_views=0, edge_artists=[],
                         stroke_norm=False, workers=0, batch_size=4, progress=False)
    chunk_dirs = list((tmp_path / "f").glob("chunks-*"))
    assert len(chunk_dirs) == 1 and len(list(chunk_dirs[0].glob("*.npz"))) == 2
    seen = []
    monkeypatch.setattr(type(backbone), "forward", lambda self, x: (seen.append(len(x)), real_forward(self, x))[1])
    fs = extract_features(tmp_path / "ds", records, backbone, tmp_path / "f", sketch_views=0, edge_artists=[],
                          stroke_norm=False, workers=0, batch_size=4, progress=False)
    assert sum(seen) == 4  # chunks 0-1 were kept; only s4 p4 s5 p5 reach the backbone again
    reference = extract_features(tmp_path / "ds", records, backbone, tmp_path / "g", sketch_views=0,
                                 edge_artists=[], stroke_norm=False, workers=0, batch_size=3, progress=False)
    np.testing.assert_allclose(fs.feats, reference.feats, rtol=1e-4, atol=1e-4)
    meta = json.loads((tmp_path / "f" / "features.json").read_text())
    assert meta["speed"]["images"] == 6
    assert not list((tmp_path / "f").glob("chunks-*"))


def test_rerun_of_complete_features_is_a_no_op(tmp_path, backbone, monkeypatch):
    records = _dataset(tmp_path / "ds", n=2)
    extract_features(tmp_path / "ds", records, backbone, tmp_path / "f", sketch_views=0, edge_artists=[],
                     workers=0, progress=False)
    monkeypatch.setattr(type(backbone), "forward", lambda self, x: pytest.fail("recomputed"))
    fs = extract_features(tmp_path / "ds", records, backbone, tmp_path / "f", sketch_views=0, edge_artists=[],
                          workers=0, progress=False)
    assert len(fs.feats) == 4 + 2  # 2 sketches and 2 photos, and the sketches stroke-normalised
    assert torch.get_num_threads() >= 1


def test_held_out_records_get_no_augmented_rows_and_can_be_left_out():
    records = [
        Record(path="s.png", domain="sketch", category="c", artist="pen"),
        Record(path="h.png", domain="sketch", category="c", artist="icons", meta={"heldout": "1"}),
        Record(path="p.png", domain="photo", category="c", artist="paint"),
    ]
    jobs = plan_jobs(records, sketch_views=2, edge_artists=[])
    assert [v for r, v in jobs if r == 0] == [0, 1, 2, NORM_VIEW, NORM_VIEW + 1, NORM_VIEW + 2]
    assert [v for r, v in jobs if r == 1] == [0, NORM_VIEW]  # evaluated as drawn, never augmented
    assert [v for r, v in jobs if r == 2] == [0]
    assert all(r != 1 for r, _ in plan_jobs(records, 2, [], heldout=False))
    assert all(v < NORM_VIEW for _, v in plan_jobs(records, 2, [], stroke_norm=False))


def test_int8_features_of_another_calibration_are_recomputed(tmp_path, backbone, monkeypatch):
    records = _dataset(tmp_path / "ds", n=2)
    kw = dict(sketch_views=0, edge_artists=[], stroke_norm=False, workers=0, progress=False)
    plan_ids, seen = [], []
    real_forward = type(backbone).forward
    monkeypatch.setattr(type(backbone), "forward", lambda self, x: (seen.append(len(x)), real_forward(self, x))[1])
    # the backbone as if quantized from one calibration file, then from another one (same forward here:
    # only what the cache's plan records matters)
    monkeypatch.setattr(backbone, "precision", "int8")
    for digest in ("1" * 64, "1" * 64, "2" * 64):
        monkeypatch.setattr(backbone, "int8_calibration", {"file": "x.int8.json", "sha256": digest})
        seen.clear()
        fs = extract_features(tmp_path / "ds", records, backbone, tmp_path / "f", **kw)
        plan_ids.append((fs.meta["plan_id"], sum(seen)))
        assert fs.meta["plan"]["backbone"]["int8_calibration"]["sha256"] == digest
    # the same calibration again: current, nothing computed; another one: stale, every row computed again
    assert plan_ids[0][0] == plan_ids[1][0] != plan_ids[2][0]
    assert [n for _, n in plan_ids] == [4, 0, 4]


def test_made_styles_are_planned_for_trainable_records_only():
    records = [
        Record(path="s.png", domain="sketch", category="c", artist="pen"),
        Record(path="h.png", domain="sketch", category="c", artist="icons", meta={"heldout": "1"}),
        Record(path="p.png", domain="photo", category="c", artist="paint"),
        Record(path="q.png", domain="photo", category="c", artist="other"),
        Record(path="hp.png", domain="photo", category="c", artist="paint", meta={"heldout": "1"}),
    ]
    jobs = plan_jobs(records, 1, [], stroke_norm=False, freehand_views=2, silhouette_views=2,
                     silhouette_artists=["paint"])
    assert [v for r, v in jobs if r == 0] == [0, 1, FREEHAND_VIEW + 1, FREEHAND_VIEW + 2]
    assert [v for r, v in jobs if r == 1] == [0]  # a held-out style gets no made drawings
    assert [v for r, v in jobs if r == 2] == [0, SILHOUETTE_VIEW, SILHOUETTE_VIEW + 1]
    assert [v for r, v in jobs if r == 3] == [0]  # not a silhouette artist
    assert [v for r, v in jobs if r == 4] == [0]
    views = np.array([0, 1, EDGE_VIEW, SILHOUETTE_VIEW, SILHOUETTE_VIEW + 1, FREEHAND_VIEW + 1,
                      NORM_VIEW + SILHOUETTE_VIEW, NORM_VIEW + EDGE_VIEW, NORM_VIEW + FREEHAND_VIEW + 2])
    assert drawn_from_photo(views).tolist() == [False, False, True, True, True, False, True, True, False]
    assert is_silhouette(views).tolist() == [False] * 3 + [True, True, False, True, False, False]
    assert is_freehand(views).tolist() == [False] * 5 + [True, False, False, True]


def test_silhouette_fills_the_shape_and_keeps_inner_lines_white():
    img = Image.new("RGB", (256, 256), "white")
    d = ImageDraw.Draw(img)
    d.ellipse([30, 30, 226, 226], fill=(250, 210, 40), outline="black", width=7)  # an outlined yellow disc
    d.line([80, 128, 176, 128], fill="black", width=7)  # an inner line
    sil = np.asarray(silhouette_sketch(img).convert("L"))
    assert sil[5, 5] == 255 and sil[100, 128] == 0  # background white, fill black
    assert sil[128, 128] == 255  # the inner line is left white
    assert sil[128, 32] == 0  # the outer outline stays black
    plain = np.asarray(silhouette_sketch(img, inner_lines=False).convert("L"))
    assert plain[128, 128] == 0
    a, b = (np.asarray(silhouette_sketch(img, np.random.default_rng(s))) for s in (1, 2))
    assert not np.array_equal(a, b)


def test_freehand_redraw_is_seeded_and_changes_the_strokes():
    img = Image.new("RGB", (256, 256), "white")
    ImageDraw.Draw(img).rectangle([60, 60, 196, 196], outline="black", width=6)
    a, b, c = (np.asarray(freehand_sketch(img, np.random.default_rng(s))) for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, np.asarray(img))
    assert a.min() < 100  # still a drawing
    # the warp alone keeps the frame and moves the inside
    w = np.asarray(warp(img, np.random.default_rng(0), cells=4, amount=0.04).convert("L"))
    assert w[0].min() == 255 and (w < 128).sum() > 0.5 * (np.asarray(img.convert("L")) < 128).sum()


def test_a_cache_with_more_views_reuses_the_rows_it_already_has(tmp_path, backbone, monkeypatch):
    records = _dataset(tmp_path / "ds", n=2)
    kw = dict(sketch_views=0, edge_artists=[], stroke_norm=False, workers=0, progress=False)
    first = extract_features(tmp_path / "ds", records, backbone, tmp_path / "f", **kw)
    seen = []
    real_forward = type(backbone).forward
    monkeypatch.setattr(type(backbone), "forward", lambda self, x: (seen.append(len(x)), real_forward(self, x))[1])
    more = extract_features(tmp_path / "ds", records, backbone, tmp_path / "f", freehand_views=1, silhouette_views=1,
                            silhouette_artists=["paint"], **kw)
    assert sum(seen) == 4  # one freehand redraw per sketch and one silhouette per photo; the rest reused
    assert more.meta["plan_id"] != first.meta["plan_id"]
    for rec, view, feat in zip(first.record, first.view, first.feats, strict=True):
        np.testing.assert_array_equal(more.feats[(more.record == rec) & (more.view == view)][0], feat)
    fresh = extract_features(tmp_path / "ds", records, backbone, tmp_path / "g", freehand_views=1, silhouette_views=1,
                             silhouette_artists=["paint"], **kw)
    np.testing.assert_array_equal(fresh.record, more.record)
    np.testing.assert_array_equal(fresh.view, more.view)
    np.testing.assert_allclose(fresh.feats, more.feats, rtol=1e-4, atol=1e-4)
    # another seed renders other rows: nothing is reused
    seen.clear()
    extract_features(tmp_path / "ds", records, backbone, tmp_path / "f", seed=1, **kw)
    assert sum(seen) == 4


def test_silhouette_erosion_matches_pil_rank_filter():
    from model.augment import _eroded

    rng = np.random.default_rng(0)
    mask = np.zeros((70, 90), bool)
    for _ in range(12):
        y, x = rng.integers(0, 60), rng.integers(0, 80)
        mask[y:y + rng.integers(3, 30), x:x + rng.integers(3, 30)] = True
    mask[:, :5] = True  # touching the border
    for k in (3, 9, 17):
        pil = np.asarray(Image.fromarray(np.where(mask, 0, 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(k))) == 0
        np.testing.assert_array_equal(_eroded(mask, k), pil)
