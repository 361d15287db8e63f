"""End to end on synthetic features: the trained pipeline beats raw features on unseen classes."""

import json

import numpy as np
import pytest
import torch

from model.data.dataset import Record, Split
from model.defaults import DEFAULT_RERANK_TOP
from model.evaluate import evaluate_runs
from model.features import NORM_VIEW, FeatureSet
from model.train import TrainConfig, train_all

STYLES = {"tabler": "", "lucide": "1"}  # a training style set and a held-out one (meta "heldout")


def synthetic(n_classes=24, d=64, seed=0):
    """Sketch and photo features of shared class factors seen through different domain maps.

    Every sketch row has a stroke-normalised twin (view NORM_VIEW + v); besides the core sketches
    (artist "a") each instance has a sketch in two style sets, one of them held out.
    """
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(n_classes, 8))
    w = {"sketch": rng.normal(size=(8, d)), "photo": rng.normal(size=(8, d))}
    offset = {"sketch": 3 * rng.normal(size=d), "photo": 3 * rng.normal(size=d)}
    records, feats, rec_idx, views = [], [], [], []

    def add(record, z, dom, n_views):
        records.append(record)
        for v in range(n_views):
            f = np.maximum(z @ w[dom], 0) + offset[dom] + 1.5 * rng.normal(size=d)
            twins = [(v, f)] + ([(NORM_VIEW + v, f + 0.2 * rng.normal(size=d))] if dom == "sketch" else [])
            for view, x in twins:
                feats.append(x)
                rec_idx.append(len(records) - 1)
                views.append(view)

    for c in range(n_classes):
        for dom, n, n_views in (("sketch", 4, 3), ("photo", 8, 1)):
            for i in range(n):
                z = protos[c] + 0.4 * rng.normal(size=8)
                add(Record(path=f"{dom}/{c}/{i}.png", domain=dom, category=f"c{c:02d}",
                           instance=f"c{c:02d}-{i}", artist="a" if dom == "sketch" else "b"), z, dom, n_views)
                if dom == "sketch":
                    for style, heldout in STYLES.items():
                        add(Record(path=f"{style}/{c}/{i}.png", domain="sketch", category=f"c{c:02d}",
                                   instance=f"c{c:02d}-{i}", artist=style,
                                   meta={"style_set": style, "heldout": heldout}),
                            z + 0.3 * rng.normal(size=8), dom, 1 if heldout else n_views)
    fs = FeatureSet(np.array(feats, np.float32), np.array(rec_idx), np.array(views),
                    {"plan": {"backbone": {"name": "synthetic", "dim": d, "weights_sha256": "0" * 64,
                                           "image_size": 0, "weights_file": "-"}}})
    classes = [f"c{c:02d}" for c in range(n_classes)]
    split = Split(name="synthetic", seed=0, train=classes[:14], val=classes[14:18], unseen=classes[18:])
    return fs, records, split


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    fs, records, split = synthetic()
    out = tmp_path_factory.mktemp("run")
    # one member: these tests read the parts of its rows (test_members_... covers two)
    cfg = TrainConfig(adapter_max_epochs=25, adapter_batch=32, iiae_max_steps=600, iiae_eval_every=100,
                      peer_max_steps=300, adapter_dim=32, latent_dim=16, members=1)
    summary = train_all(fs, records, split, cfg, out)
    return fs, records, split, out, summary


def test_training_writes_checkpoint_log_and_selects_on_validation(trained):
    fs, records, split, out, summary = trained
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["training"]["split"]["unseen"] == split.unseen
    assert len(cfg["training"]["data_sha256"]) == 64
    assert cfg["iiae"]["lam"] == 1.0 and cfg["iiae"]["beta"] == 0.5
    # training read the normalised twins beside the drawn sketches: queries are encoded with theirs
    assert cfg["sketch_preprocessing"]["query_twin"] is True and cfg["sketch_preprocessing"]["stroke_norm"] is False
    assert cfg["sketch_preprocessing"]["query_twin_weight"] == 0.5
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    iiae_epochs = [e for e in log if e["stage"] == "iiae" and "kl_zs_rx" in e]
    assert iiae_epochs and {"rec_x", "rec_y", "kl_zx", "kl_zy", "kl_zs", "kl_zs_ry"} <= set(iiae_epochs[0])
    assert summary["iiae"]["selected_step"] > 0


def test_unseen_class_retrieval_beats_raw_features_and_chance(trained, tmp_path):
    fs, records, split, out, _ = trained
    report = evaluate_runs(tmp_path, records, fs, [out], tmp_path, figures=False)
    res = report["runs"][0]["tasks"]["category"]
    chance = 1 / len(split.unseen)
    assert res["iiae"]["mAP@all"] > res["raw"]["mAP@all"] + 0.1, res
    assert res["iiae"]["mAP@all"] > 2 * chance, res
    assert "infonce" in res and "adapter" in res


def test_the_served_model_reranks_iiae_candidates_with_the_peer(trained, tmp_path):
    """The checkpoint holds the peer; a row is [zs | peer vector | standardised features]; `sbir eval`
    reports the served ranking (IIAE's candidates re-ordered) beside IIAE's zs alone."""
    from safetensors.torch import load_file

    from model.peer import InfoNCEPeer
    from model.pipeline import SBIRModel

    fs, records, split, out, _ = trained
    model = SBIRModel.load(out / "model", device="cpu", with_backbone=False)
    assert model.rerank is not None and model.rerank.vector == "infonce" and model.rerank.top == DEFAULT_RERANK_TOP
    d = fs.feats.shape[1]
    assert model.rerank.raw_dim == d and model.search_dim == 16 and model.dim == 32 + d
    rows = model.encode_features(fs.feats[:20], "photo")
    np.testing.assert_allclose(np.linalg.norm(rows[:, :16], axis=1), 1, atol=1e-5)
    standardised = (fs.feats[:20] - model.adapter.photo_mean.numpy()) / model.adapter.photo_std.numpy()
    np.testing.assert_allclose(rows[:, 32:], standardised / np.linalg.norm(standardised, axis=1, keepdims=True),
                               atol=1e-5)
    peer = InfoNCEPeer(32, 16)
    peer.load_state_dict(load_file(str(out / "peer_infonce.safetensors")))  # the comparison model's file
    import torch

    with torch.no_grad():
        v = peer.encode(model.adapter(torch.from_numpy(fs.feats[:20]).float(), "photo"), "photo").numpy()
    np.testing.assert_allclose(rows[:, 16:32], v, atol=1e-5)
    report = evaluate_runs(tmp_path, records, fs, [out], tmp_path, figures=False)
    res = report["runs"][0]["tasks"]["instance"]
    assert {"served", "iiae", "infonce"} <= set(res)
    assert res["served"]["mAP@all"] != res["iiae"]["mAP@all"]  # the second stage changed the ranking
    assert report["table_markdown"].index("| served |") < report["table_markdown"].index("| iiae |")


def test_without_the_peer_the_peer_cannot_rerank(tmp_path):
    fs, records, split = synthetic(n_classes=20)
    cfg = TrainConfig(adapter_max_epochs=2, iiae_max_steps=20, iiae_eval_every=10, peer=False, adapter_dim=32,
                      latent_dim=16)
    with pytest.raises(ValueError, match="peer"):
        train_all(fs, records, split, cfg, tmp_path)


def test_training_is_deterministic_under_a_seed(trained, tmp_path):
    fs, records, split, out, summary = trained
    cfg = TrainConfig(adapter_max_epochs=25, adapter_batch=32, iiae_max_steps=600, iiae_eval_every=100,
                      peer=False, rerank="none", adapter_dim=32, latent_dim=16)
    again = train_all(fs, records, split, cfg, tmp_path)
    assert again["model_sha256"] != ""
    assert again["iiae"]["selected_step"] == summary["iiae"]["selected_step"]
    assert again["iiae"]["val_mAP"] == pytest.approx(summary["iiae"]["val_mAP"])


def test_iiae_keeps_the_moving_average_of_its_weights():
    """With iiae_ema = d, the kept weights (batch-norm statistics too) are the EMA of the raw ones."""
    import torch

    from model.train import prepare, train_iiae

    fs, records, split = synthetic(n_classes=8)
    td = prepare(fs, records, split)
    a = td.feats
    quiet = lambda entry: None  # noqa: E731
    raw = [train_iiae(td, a, TrainConfig(latent_dim=8, iiae_ema=0.0), quiet, stop_at=n)[0].state_dict()
           for n in (1, 2)]
    d = 0.75
    ema = train_iiae(td, a, TrainConfig(latent_dim=8, iiae_ema=d), quiet, stop_at=2)[0].state_dict()
    changed = 0
    for k, v in ema.items():
        if not v.is_floating_point():
            continue
        torch.testing.assert_close(v, d * raw[0][k] + (1 - d) * raw[1][k])
        changed += not torch.allclose(v, raw[1][k])
    assert changed > 10  # the average is not simply the last weights
    with pytest.raises(ValueError, match="iiae_ema"):
        train_iiae(td, a, TrainConfig(iiae_ema=1.0), quiet, stop_at=1)


def test_held_out_styles_are_never_read_by_training(trained, tmp_path):
    """Changing every held-out row's features changes nothing in the trained model."""
    fs, records, split, out, summary = trained
    heldout = np.array([r.heldout for r in records])[fs.record]
    assert heldout.sum() > 0
    noisy = FeatureSet(fs.feats.copy(), fs.record, fs.view, fs.meta)
    noisy.feats[heldout] = np.random.default_rng(1).normal(size=(heldout.sum(), fs.feats.shape[1]))
    cfg = TrainConfig(adapter_max_epochs=4, adapter_batch=32, iiae_max_steps=100, iiae_eval_every=50,
                      peer=False, rerank="none", adapter_dim=32, latent_dim=16)
    a = train_all(fs, records, split, cfg, tmp_path / "a")
    b = train_all(noisy, records, split, cfg, tmp_path / "b")
    assert a["model_sha256"] == b["model_sha256"]
    # while the training style set is read: changing it changes the model
    styled = np.array([r.style_set == "tabler" for r in records])[fs.record]
    noisy.feats[styled] += 1.0
    c = train_all(noisy, records, split, cfg, tmp_path / "c")
    assert c["model_sha256"] != a["model_sha256"]


def test_every_style_is_evaluated_and_tabled(trained, tmp_path):
    fs, records, split, out, _ = trained
    report = evaluate_runs(tmp_path, records, fs, [out], tmp_path, figures=False)
    tasks = report["runs"][0]["tasks"]
    assert {"category", "instance", "lucide/instance", "lucide/category", "tabler/instance",
            "tabler/category"} <= set(tasks)
    assert tasks["lucide/category"]["iiae"]["n_queries"] == 4 * len(split.unseen)
    assert tasks["lucide/instance"]["iiae"]["n_queries"] == 4 * 24  # every class: the style is what is new
    assert {"P@1", "mAP@100"} <= set(tasks["lucide/instance"]["adapter"])
    table = report["table_markdown"]
    assert table.startswith("**Drawing styles**") and "| lucide/instance (P@1 / mAP@100) |" in table
    assert report["runs"][0]["stroke_norm"] is False  # the default: queries as drawn


def test_evaluation_on_validation_classes_needs_a_model_that_never_saw_them(trained, tmp_path):
    fs, records, split, out, _ = trained
    with pytest.raises(ValueError, match="--no-refit"):
        evaluate_runs(tmp_path, records, fs, [out], tmp_path, figures=False, on="val")
    cfg = TrainConfig(adapter_max_epochs=4, adapter_batch=32, iiae_max_steps=100, iiae_eval_every=50,
                      peer=False, rerank="none", adapter_dim=32, latent_dim=16, refit=False)
    train_all(fs, records, split, cfg, tmp_path / "sel")
    report = evaluate_runs(tmp_path, records, fs, [tmp_path / "sel"], tmp_path, figures=False, on="val")
    tasks = report["runs"][0]["tasks"]
    assert tasks["category"]["iiae"]["n_queries"] == 4 * len(split.val)
    assert tasks["tabler/instance"]["iiae"]["n_queries"] == 4 * len(split.val)
    assert not any(t.startswith(("lucide", "edge_maps")) for t in tasks)  # held-out styles are never shown


def test_normalised_twins_train_but_never_validate():
    from model.train import prepare

    fs, records, split = synthetic()
    td = prepare(fs, records, split, stroke_norm=False, norm_augment=True)
    train = td.label >= 0
    assert (td.view[train] >= NORM_VIEW).any() and (td.view[train] < NORM_VIEW).any()
    val_queries = (td.part == "val") & (td.domain == 0) & (td.view == 0)
    assert val_queries.any()
    plain = prepare(fs, records, split, stroke_norm=False, norm_augment=False)
    assert not (plain.view >= NORM_VIEW).any()
    normed = prepare(fs, records, split, stroke_norm=True)
    assert not (normed.view >= NORM_VIEW).any() and len(normed.feats) == len(plain.feats)
    assert not np.array_equal(normed.feats.numpy(), plain.feats.numpy())


def test_made_styles_train_as_sketches_only_when_asked():
    from model.features import FREEHAND_VIEW, SILHOUETTE_VIEW
    from model.train import prepare

    fs, records, split = synthetic()
    photo0 = np.flatnonzero((fs.view == 0) & np.array([records[r].domain == "photo" for r in fs.record]))
    sketch0 = np.flatnonzero((fs.view == 0) & np.array([records[r].domain == "sketch" and not records[r].style_set
                                                        for r in fs.record]))
    # a silhouette (and its normalised twin) of every photo, a freehand redraw of every core sketch
    extra_rec = np.concatenate([fs.record[photo0], fs.record[photo0], fs.record[sketch0]])
    extra_view = np.concatenate([np.full(len(photo0), SILHOUETTE_VIEW), np.full(len(photo0), NORM_VIEW + SILHOUETTE_VIEW),
                                 np.full(len(sketch0), FREEHAND_VIEW + 1)])
    more = type(fs)(np.concatenate([fs.feats, fs.feats[photo0], fs.feats[photo0], fs.feats[sketch0]]),
                    np.concatenate([fs.record, extra_rec]), np.concatenate([fs.view, extra_view]), fs.meta)
    sil = (more.view % NORM_VIEW) == SILHOUETTE_VIEW
    free = more.view == FREEHAND_VIEW + 1
    off = prepare(more, records, split, norm_augment=True)
    assert (off.part[sil | free] == "").all() and (off.label[sil | free] == -1).all()
    on = prepare(more, records, split, norm_augment=True, freehand=True, silhouettes=True)
    assert (on.domain[sil] == 0).all()  # drawings made from photos are sketch rows
    rec_label = np.array([r.category for r in records])[more.record]
    train = np.isin(rec_label, split.train)
    assert (on.part[sil & train] == "train").all() and (on.part[free & train] == "train").all()
    # never validation queries, never training rows of other classes
    assert not np.isin(on.part[(sil | free) & ~train], ["train", "val"]).any()
    assert (on.label[(sil | free) & ~train] == -1).all()
    assert on.counts["train_sketch_rows"] == off.counts["train_sketch_rows"] + int(((sil | free) & train).sum())
    assert on.counts["train_photo_rows"] == off.counts["train_photo_rows"]
    with pytest.raises(ValueError, match="--silhouette-views"):
        prepare(fs, records, split, silhouettes=True)


def test_the_adapter_can_be_validated_within_an_epoch_and_refit_to_the_same_fraction():
    from model.train import prepare, train_adapter

    fs, records, split = synthetic()
    td = prepare(fs, records, split, norm_augment=True)
    logged = []
    once = TrainConfig(adapter_max_epochs=3, adapter_batch=32, adapter_patience=99)
    _, info1 = train_adapter(td, once, logged.append)
    assert [e["epoch"] for e in info1["history"]] == [1, 2, 3]
    quarter = TrainConfig(adapter_max_epochs=3, adapter_batch=32, adapter_patience=99, adapter_evals_per_epoch=4)
    adapter, info4 = train_adapter(td, quarter, logged.append)
    epochs = [e["epoch"] for e in info4["history"]]
    assert len(epochs) == 12 and epochs[-1] == 3 and epochs[3] == 1
    # the same steps: the whole-epoch validations see the same adapter either way
    assert [h["val_mAP"] for h in info4["history"][3::4]] == pytest.approx([h["val_mAP"] for h in info1["history"]])
    assert info4["val_mAP"] == max(h["val_mAP"] for h in info4["history"])
    # a refit runs exactly the selected fraction of its epochs and validates nothing
    logged.clear()
    _, refit = train_adapter(td, quarter, logged.append, stop_at=0.5)
    assert [e["epoch"] for e in logged] == [0.25, 0.5] and refit["selected_epoch"] == 0.5


def test_int8_swap_reads_twins_and_refuses_a_cache_that_does_not_match(tmp_path):
    from model.train import _reader, aligned_twins

    fs, records, split = synthetic(n_classes=20)
    fs.meta["plan"] = dict(fs.meta["plan"], seed=0, sketch_views=2)
    rng = np.random.default_rng(1)
    order = rng.permutation(len(fs.feats))  # an int8 cache lists the same rows in any order
    twin_feats = (fs.feats + 0.05 * rng.normal(size=fs.feats.shape)).astype(np.float32)
    int8_plan = dict(fs.meta["plan"], backbone=dict(fs.meta["plan"]["backbone"], precision="int8"))
    twins = FeatureSet(twin_feats[order], fs.record[order], fs.view[order], {"plan": int8_plan, "plan_id": "t"})
    aligned = aligned_twins(fs, twins)
    np.testing.assert_array_equal(aligned.feats, twin_feats)
    # a float32 cache, another plan, a missing row: refused
    with pytest.raises(ValueError, match="int8 feature cache"):
        aligned_twins(fs, FeatureSet(twin_feats, fs.record, fs.view, {"plan": fs.meta["plan"]}))
    with pytest.raises(ValueError, match="another plan"):
        aligned_twins(fs, FeatureSet(twin_feats, fs.record, fs.view, {"plan": dict(int8_plan, seed=1)}))
    with pytest.raises(ValueError, match="lacks row"):
        aligned_twins(fs, FeatureSet(twin_feats[1:], fs.record[1:], fs.view[1:], {"plan": int8_plan}))
    with pytest.raises(ValueError, match="int8_swap needs"):
        aligned_twins(fs, None)
    # the reader: no share reads the main rows; a full share reads the twins; a half share mixes them
    main, twin = torch.zeros(100, 3), torch.ones(100, 3)
    rows = np.arange(100)
    assert _reader(main, twin, 0.0, 0)(rows).sum() == 0
    assert _reader(main, twin, 1.0, 0)(rows).sum() == 300
    assert 30 < _reader(main, twin, 0.5, 0)(rows)[:, 0].sum() < 70
    assert main.sum() == 0  # never written in place
    cfg = TrainConfig(adapter_max_epochs=3, adapter_batch=32, iiae_max_steps=60, iiae_eval_every=30,
                      peer_max_steps=60, adapter_dim=32, latent_dim=16, int8_swap=0.5)
    summary = train_all(fs, records, split, cfg, tmp_path / "swap", int8_twins=twins)
    config = json.loads((tmp_path / "swap" / "model" / "config.json").read_text())
    assert config["training"]["config"]["int8_swap"] == 0.5
    assert config["training"]["int8_twins"]["plan_id"] == "t"
    assert summary["model_sha256"]
    with pytest.raises(ValueError, match="int8_swap needs"):
        train_all(fs, records, split, cfg, tmp_path / "none")


def test_a_style_set_left_out_only_validates():
    """`skip_styles` (`sbir train --leave-out-style KEY`) keeps that set's rows out of training, as
    `extra_styles=False` does for every set, and they still validate; an unknown key is refused."""
    from model.train import prepare

    fs, records, split = synthetic(n_classes=20)
    rows = fs.for_sketches(records, False).record  # the rows prepare keeps by default, in order
    styled = np.array([r.style_set == "tabler" for r in records])[rows]
    trained = prepare(fs, records, split)
    left_out = prepare(fs, records, split, skip_styles=("tabler",))
    none = prepare(fs, records, split, extra_styles=False)
    assert (trained.part[styled] == "train").any()
    assert not (left_out.part[styled] == "train").any() and not (none.part[styled] == "train").any()
    assert (left_out.part[styled] == "val").any()
    np.testing.assert_array_equal(left_out.part[~styled], trained.part[~styled])
    with pytest.raises(ValueError, match="no style set"):
        prepare(fs, records, split, skip_styles=("nope",))


def test_the_served_ranking_encodes_each_query_with_its_normalised_twin(trained, tmp_path):
    """`sbir eval`'s served method joins each query's drawn and normalised rows as the service does
    (SBIRModel.merge_views); a model trained without the twins, or told not to, encodes queries once."""
    import shutil

    from model.evaluate import _task_rows, evaluate_run
    from model.metrics import evaluate_scored
    from model.pipeline import SBIRModel
    from model.rerank import rerank_matrix, second_scores, split_rows

    fs, records, split, out, _ = trained
    model = SBIRModel.load(out / "model", device="cpu", with_backbone=False)
    assert model.query_twin and model.sketch_views == 1 + 1
    drawn, norm = fs.for_sketches(records, False), fs.for_sketches(records, True)
    q, g, ql, gl = _task_rows(drawn, records, split, False, seed=0)["instance"]
    twin = {(r, v): i for i, (r, v) in enumerate(zip(norm.record.tolist(), norm.view.tolist(), strict=True))}
    qn = [twin[(drawn.record[i], drawn.view[i])] for i in q]
    qe = model.merge_views(np.stack([model.encode_features(drawn.feats[q], "sketch"),
                                     model.encode_features(norm.feats[qn], "sketch")], axis=1))
    for part in (qe[:, :16], qe[:, 16:32], qe[:, 32:]):
        np.testing.assert_allclose(np.linalg.norm(part, axis=1), 1, atol=1e-5)
    ge = model.encode_features(drawn.feats[g], "photo")
    (q1, q2), (g1, g2) = split_rows(qe, 16), split_rows(ge, 16)
    want = evaluate_scored(lambda sl: rerank_matrix(q1[sl] @ g1.T, second_scores(q2[sl], g2, model.rerank),
                                                    model.rerank), ql, gl)
    got = evaluate_run(out, records, fs)
    assert got["query_twin"] is True
    assert got["tasks"]["instance"]["served"]["mAP@all"] == pytest.approx(want.map_all, abs=6e-5)  # reports keep four decimals

    once = tmp_path / "once"
    shutil.copytree(out, once)
    cfg = json.loads((once / "model" / "config.json").read_text())
    cfg["sketch_preprocessing"]["query_twin"] = False
    (once / "model" / "config.json").write_text(json.dumps(cfg))
    plain = evaluate_run(once, records, fs)
    assert plain["query_twin"] is False
    assert plain["tasks"]["instance"]["served"]["mAP@all"] != pytest.approx(want.map_all, abs=6e-5)

    # the features must hold the twins of the queries
    drawn_only = FeatureSet(fs.feats[fs.view < NORM_VIEW], fs.record[fs.view < NORM_VIEW],
                            fs.view[fs.view < NORM_VIEW], fs.meta)
    with pytest.raises(ValueError, match="stroke-normalised twins"):
        evaluate_run(out, records, drawn_only)


def test_without_the_normalised_twins_in_training_queries_are_encoded_once(tmp_path):
    fs, records, split = synthetic(n_classes=20)
    small = dict(adapter_max_epochs=2, iiae_max_steps=20, iiae_eval_every=10, peer=False, rerank="none",
                 adapter_dim=32, latent_dim=16)
    for name, cfg in (("no-augment", TrainConfig(norm_augment=False, **small)),
                      ("no-twin", TrainConfig(query_twin=False, **small))):
        train_all(fs, records, split, cfg, tmp_path / name)
        saved = json.loads((tmp_path / name / "model" / "config.json").read_text())
        assert saved["sketch_preprocessing"]["query_twin"] is False, name
    with pytest.raises(ValueError, match="weight"):
        train_all(fs, records, split, TrainConfig(query_twin_weight=0.0, **small), tmp_path / "bad")


def test_style_mix_moves_a_rows_statistics_towards_another_style_of_its_domain():
    """`TrainConfig.style_mix` (`sbir train --style-mix`): share 0 leaves every row as it is; share 1
    re-styles each training row of a style that has a peer in its domain, and a style's rows re-styled
    all the way (a = 1) would take the other style's mean and std."""
    from model.train import _style_mixer, prepare

    fs, records, split = synthetic(n_classes=20)
    td = prepare(fs, records, split, norm_augment=True)
    train = td.label >= 0
    # with norm_augment the rows are the cache's own, in order
    names = {(int(d), records[r].style_set or records[r].artist, bool(v >= NORM_VIEW))
             for d, r, v in zip(td.domain[train], fs.record[train], td.view[train], strict=True)}
    # sketches: core and Tabler, drawn and normalised (4 styles, one domain); photos: one style
    assert len({k for k in names if k[0] == 0}) == 4 and len({k for k in names if k[0] == 1}) == 1
    assert len(np.unique(td.style[train])) == len(names)
    rows = np.flatnonzero(train)
    x = td.feats[rows]
    assert torch.equal(_style_mixer(td, 0.0, 0)(rows, x), x)
    mixed = _style_mixer(td, 1.0, 0)(rows, x)
    sketch = td.domain[rows] == 0
    changed = (mixed != x).any(1).numpy()
    assert changed[sketch].all() and not changed[~sketch].any()  # the one photo style has no peer
    assert torch.equal(x, td.feats[rows])  # never written in place
    # the same draws again under the same seed
    assert torch.equal(_style_mixer(td, 1.0, 0)(rows, x), mixed)
    # re-styled rows of a style move, on the mean, towards the other styles' statistics
    g = td.style[rows]
    core = sketch & (g == g[sketch][0])
    others = sketch & (g != g[sketch][0])
    before = (x[core].mean(0) - x[others].mean(0)).norm()
    after = (mixed[core].mean(0) - x[others].mean(0)).norm()
    assert after < before


def test_members_train_with_their_own_seeds_and_serve_the_mean_of_their_cosines(tmp_path):
    """`TrainConfig.members` (`sbir train --members K`): one checkpoint of K adapter + IIAE + peer
    members. Its first member is the one-member model of the same seed, bit for bit; the others differ
    (their own seeds); a row's zs and v are the members' joined, so the first stage's and the second
    stage's dot products are the means of the members' cosines; it round-trips through save and load."""
    from model.pipeline import SBIRModel

    fs, records, split = synthetic(n_classes=20)
    small = dict(adapter_max_epochs=2, iiae_max_steps=20, iiae_eval_every=10, adapter_dim=32, latent_dim=16,
                 refit=False)
    train_all(fs, records, split, TrainConfig(members=1, **small), tmp_path / "one")
    summary = train_all(fs, records, split, TrainConfig(members=2, **small), tmp_path / "two")
    assert summary["members"] == 2
    one = SBIRModel.load(tmp_path / "one" / "model", device="cpu", with_backbone=False)
    two = SBIRModel.load(tmp_path / "two" / "model", device="cpu", with_backbone=False)
    assert two.n_members == 2 and two.search_dim == 2 * one.search_dim and two.rerank.dim == 2 * one.rerank.dim
    assert json.loads((tmp_path / "two" / "model" / "config.json").read_text())["members"] == 2
    first, second = two.members
    for got, want in zip(first, one.members[0], strict=True):
        for (k, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
            assert torch.equal(a, b), k
    for a, b in zip(first, second, strict=True):  # adapter, IIAE, peer: each trained again
        assert any(not torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

    x = torch.from_numpy(fs.feats[:12]).float()
    q, g = two.encode_features(x[:6], "sketch"), two.encode_features(x[6:], "photo")
    sd, d = two.search_dim, two.rerank.dim
    for part in (q, g):
        assert np.allclose(np.linalg.norm(part[:, :sd], axis=1), 1, atol=1e-5)
    with torch.no_grad():
        zs = [(i.encode_sketches(a(x[:6], "sketch")).numpy(), i.encode_photos(a(x[6:], "photo")).numpy())
              for a, i, _ in two.members]
        vs = [(p.encode(a(x[:6], "sketch"), "sketch").numpy(), p.encode(a(x[6:], "photo"), "photo").numpy())
              for a, _, p in two.members]
    assert np.allclose(q[:, :sd] @ g[:, :sd].T, np.mean([s @ p.T for s, p in zs], 0), atol=1e-5)
    assert np.allclose(q[:, sd:sd + d] @ g[:, sd:sd + d].T, np.mean([s @ p.T for s, p in vs], 0), atol=1e-5)
    # a query's two views are joined member by member (each member's block its own direction)
    merged = two.merge_views(np.stack([q, q[::-1]], axis=1))
    blocks = merged[:, :sd].reshape(6, 2, -1)
    assert np.allclose(np.linalg.norm(blocks, axis=2), 1 / np.sqrt(2), atol=1e-5)
    # `sbir eval` compares it member for member: its adapter, peer and IIAE methods join both members'
    from model.evaluate import _encoders

    _, enc = _encoders(tmp_path / "two", fs, records)
    with torch.no_grad():
        assert enc["adapter"](x[:6], "sketch").shape[1] == 2 * 32
        assert np.allclose(enc["infonce"](x[:6], "sketch").numpy(), q[:, sd:sd + d], atol=1e-6)
        assert np.allclose(enc["iiae"](x[:6], "sketch").numpy(), q[:, :sd], atol=1e-6)
    # a model that does not serve its peers (re-ranked by the adapter) keeps every member's peer beside
    # it, and `sbir eval`'s InfoNCE row joins them as well
    train_all(fs, records, split, TrainConfig(members=2, rerank="adapter", **small), tmp_path / "adapter")
    assert (tmp_path / "adapter" / "peer_infonce_member1.safetensors").is_file()
    served, enc = _encoders(tmp_path / "adapter", fs, records)
    assert all(p is None for _, _, p in served.members)
    with torch.no_grad():
        assert enc["infonce"](x[:6], "sketch").shape[1] == 2 * 16
        joined = np.concatenate([vs[0][0], vs[1][0]], axis=1) / np.sqrt(2)  # the same seeds' peers as above
        assert np.allclose(enc["infonce"](x[:6], "sketch").numpy(), joined, atol=1e-5)
    (tmp_path / "adapter" / "peer_infonce_member1.safetensors").unlink()  # an older run: member 0's peer only
    _, enc = _encoders(tmp_path / "adapter", fs, records)
    with torch.no_grad():
        assert np.allclose(enc["infonce"](x[:6], "sketch").numpy(), vs[0][0], atol=1e-5)
    with pytest.raises(ValueError, match="at least one member"):
        train_all(fs, records, split, TrainConfig(members=0, **small), tmp_path / "none")
