"""Zero-shot evaluation on unseen classes: IIAE next to its baselines, as REFERENCE §3 defines it.

Tasks on the split's unseen classes, with the dataset's core sketches (no style set):
- category: line-art sketches against every colour image, relevant = same class (primary);
- category_cross_artist: the same without the sketch artist's own colour images;
- instance: relevant = the same emoji / instance (fine-grained);
- edge_maps: edge maps of the sketch artist's colour images (a drawing style never trained on)
  against the cross-artist gallery.
Drawing styles: `edge_maps/instance` and, per style set of the dataset, `STYLE/instance` (every
image of the style against every gallery image, seen classes too: the style is what is new) and
`STYLE/category` (unseen classes); a set with its own photos (line icons against their colour
versions) has an instance task against those only. `on="val"` puts the validation classes in the
unseen classes' place and leaves out held-out styles and edge maps (for choosing settings).
Methods: what the service answers ("served": IIAE's zs finds the candidates and, where the model has
one, the second stage of model.rerank re-orders its top ones), IIAE's zs alone, the adapter alone, the
InfoNCE peer (each on what their model was trained on), and raw backbone features, as they are and
standardised per domain (on the images as they are). Several runs (split seeds) give mean and spread.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model.data.dataset import Record, Split, resolve_path
from model.features import EDGE_VIEW, FEATURES_FILE, FeatureSet
from model.images import load_image
from model.metrics import evaluate_retrieval, evaluate_scored, pr_curve, ranked_relevance
from model.peer import InfoNCEPeer
from model.pipeline import SBIRModel, join_members
from model.rerank import rerank_matrix, second_scores, split_rows
from model.train import prepare

LOG = logging.getLogger(__name__)

METHODS = ("served", "iiae", "adapter", "infonce", "standardised", "raw")


# The untrained baselines read the images as they are; the trained methods read what their model
# was trained on (stroke-normalised sketches where it says so).
UNTRAINED = ("raw", "standardised")


def _raw_statistics(fs_raw: FeatureSet, records: list[Record], model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-domain mean and std of the raw features of the rows the model was trained on (the
    adapter's own statistics when its sketches were not stroke-normalised)."""
    a = model.adapter
    own = {d: (getattr(a, f"{d}_mean"), getattr(a, f"{d}_std")) for d in ("sketch", "photo")}
    training = model.config["training"]
    if not model.stroke_norm and not training.get("config", {}).get("norm_augment"):
        return own
    split = Split.from_json(training.get("trained_on", training["split"]))
    extra = training.get("config", {}).get("extra_styles", True)
    skip = tuple(training.get("config", {}).get("skip_styles", ()))
    try:
        td = prepare(fs_raw, records, split, stroke_norm=False, extra_styles=extra, skip_styles=skip)
    except ValueError:  # a fine-tuned run's cache: no raw sketch rows to measure
        return own
    out = {}
    for d, name in ((0, "sketch"), (1, "photo")):
        x = td.feats[(td.label >= 0) & (td.domain == d)]
        out[name] = (x.mean(0), x.std(0).clamp_min(model.adapter.cfg.eps))
    return out


def _encoders(run: Path, fs_raw: FeatureSet, records: list[Record]):
    """Every method's encoder. A model of several members (`TrainConfig.members`) is compared member for
    member: its adapter, IIAE and peer methods join every member's, as its served rows do."""
    model = SBIRModel.load(run / "model", device="cpu", with_backbone=False)
    adapter = model.adapter
    stats = _raw_statistics(fs_raw, records, model)

    def raw(x, domain):
        return F.normalize(x, dim=-1)

    def standardised(x, domain):
        mean, std = stats[domain]
        return F.normalize((x - mean) / std, dim=-1)

    def adapted(x, domain):
        return join_members([F.normalize(a(x, domain), dim=-1) for a, _, _ in model.members])

    def iiae(x, domain):  # the served first stage
        return join_members([(i.encode_sketches if domain == "sketch" else i.encode_photos)(a(x, domain))
                             for a, i, _ in model.members])

    enc = {"served": model.encode_features, "raw": raw, "standardised": standardised, "adapter": adapted,
           "iiae": iiae}
    if model.n_members > 1 and all(p is not None for _, _, p in model.members):
        enc["infonce"] = lambda x, domain: join_members([p.encode(a(x, domain), domain) for a, _, p in model.members])
        return model, enc
    # a model that does not serve its peers: the peers' files beside it (one per member)
    paths = [run / "peer_infonce.safetensors"] + [run / f"peer_infonce_member{m}.safetensors"
                                                  for m in range(1, model.n_members)]
    if not paths[0].is_file():
        return model, enc
    if not all(p.is_file() for p in paths):
        LOG.warning("%s: the InfoNCE peer of member 0 only (the other members' peers were not saved)", run)
        paths = paths[:1]
    peers = []
    for path in paths:
        state = load_file(str(path))
        peer = InfoNCEPeer(adapter.cfg.output_dim, state["sketch.weight"].shape[0])
        peer.load_state_dict(state)
        peers.append(peer.eval())
    members = model.members[:len(peers)]
    enc["infonce"] = lambda x, domain: join_members([p.encode(a(x, domain), domain)
                                                     for (a, _, _), p in zip(members, peers, strict=True)])
    return model, enc


def _twin_rows(fs: FeatureSet, fs_model: FeatureSet, records: list[Record]) -> tuple[torch.Tensor, np.ndarray]:
    """For a model that encodes each query with its stroke-normalised twin: the normalised family's
    features and, for every row of `fs_model`, the row of its twin (-1 for photos, which have none)."""
    try:
        fs_norm = fs.for_sketches(records, True)
    except ValueError as exc:
        raise ValueError(f"this model encodes queries with their stroke-normalised twins, and {exc}") from None
    where = {(int(r), int(v)): i for i, (r, v) in enumerate(zip(fs_norm.record, fs_norm.view, strict=True))}
    rows = np.array([where.get((int(r), int(v)), -1) for r, v in zip(fs_model.record, fs_model.view, strict=True)])
    return torch.from_numpy(fs_norm.feats).float(), rows


def _served_scores(qe: np.ndarray, ge: np.ndarray, model):
    """Scores of queries in a slice against the gallery whose order is the service's: IIAE's
    candidates re-ranked by the model's second stage (model.rerank)."""
    (q1, q2), (g1, g2) = split_rows(qe, model.search_dim), split_rows(ge, model.search_dim)
    return lambda sl: rerank_matrix(q1[sl] @ g1.T, second_scores(q2[sl], g2, model.rerank), model.rerank)


def _task_rows(fs: FeatureSet, records: list[Record], split: Split, generalised: bool, seed: int,
               on: str = "unseen"):
    """Query and gallery rows (and their labels) of every task; `fs` holds one sketch family.
    `on` "val": the split's validation classes take the unseen classes' place everywhere, the
    instance tasks' queries included (model selection, for models trained without them)."""
    gran = split.granularity
    unseen = set(split.unseen if on == "unseen" else split.val)
    seen = set(split.train) | set(split.val)
    rec_label = np.array([r.label(gran) for r in records])
    rec_cat = np.array([r.category for r in records])
    rec_inst = np.array([r.instance or r.path for r in records])
    rec_dom = np.array([r.domain for r in records])
    rec_artist = np.array([r.artist for r in records])
    rec_style = np.array([r.style_set for r in records])
    row_label = rec_label[fs.record]
    row_style = rec_style[fs.record]
    row_dom = rec_dom[fs.record]
    is_unseen = np.isin(row_label, list(unseen))
    is_seen = np.isin(row_label, list(seen))
    core = row_style == ""
    sketch_artists = set(rec_artist[(rec_dom == "sketch") & (rec_style == "")])
    v0 = fs.view == 0
    q = np.flatnonzero(core & is_unseen & v0 & (row_dom == "sketch"))
    g = np.flatnonzero(core & is_unseen & v0 & (row_dom == "photo"))
    edge_q = np.flatnonzero(core & is_unseen & (fs.view == EDGE_VIEW))
    if generalised:
        rng = np.random.default_rng(seed)
        sq = np.flatnonzero(core & is_seen & v0 & (row_dom == "sketch"))
        sg = np.flatnonzero(core & is_seen & v0 & (row_dom == "photo"))
        q = np.concatenate([q, rng.choice(sq, min(len(sq), round(0.2 * len(q))), replace=False)])
        g = np.concatenate([g, rng.choice(sg, min(len(sg), round(0.2 * len(g))), replace=False)])
    cross = g[~np.isin(rec_artist[fs.record[g]], list(sketch_artists))]
    label_of = {"category": rec_label if gran == "category" else rec_cat, "instance": rec_inst}
    tasks = {
        "category": (q, g, "category"),
        "category_cross_artist": (q, cross, "category"),
        "instance": (q, g, "instance"),
        "edge_maps": (edge_q, cross, "category"),
    }
    # Drawing styles: the dataset's style sets (a held-out one was never trained on) and the edge
    # maps. Instance tasks rank every image of the style against every gallery image it may show
    # (seen classes too: the style is what is new); category tasks keep to the unseen classes.
    all_photos = np.flatnonzero(core & v0 & (row_dom == "photo"))
    all_cross = all_photos[~np.isin(rec_artist[fs.record[all_photos]], list(sketch_artists))]
    tasks["edge_maps/instance"] = (np.flatnonzero(core & (fs.view == EDGE_VIEW)), all_cross, "instance")
    for style in sorted(set(row_style[row_style != ""])):
        mine = (row_style == style) & v0
        sq = np.flatnonzero(mine & (row_dom == "sketch"))
        own_gallery = np.flatnonzero(mine & (row_dom == "photo"))
        if len(own_gallery):  # line icons against their own colour versions
            tasks[f"{style}/instance"] = (sq, own_gallery, "instance")
            continue
        tasks[f"{style}/instance"] = (sq if on == "unseen" else sq[is_unseen[sq]], all_photos, "instance")
        tasks[f"{style}/category"] = (sq[is_unseen[sq]], g, "category")
    if on != "unseen":
        # choosing settings: the held-out styles (and the edge maps) are not even computed
        heldout_styles = set(row_style[np.array([r.heldout for r in records])[fs.record]])
        tasks = {k: v for k, v in tasks.items()
                 if not k.startswith("edge_maps") and style_of(k) not in heldout_styles}
    return {
        name: (qq, gg, label_of[lab][fs.record[qq]], label_of[lab][fs.record[gg]])
        for name, (qq, gg, lab) in tasks.items()
        if len(qq) and len(gg)
    }


def task_kind(task: str) -> str:
    """"instance" or "category": which relevance a task's name stands for."""
    return "instance" if task == "instance" or task.endswith("/instance") else "category"


def style_of(task: str) -> str:
    """The drawing style a task's queries are in ("openmoji"-style core sketches: "")."""
    if "/" in task:
        return task.split("/", 1)[0]
    return "edge_maps" if task == "edge_maps" else ""


def evaluate_run(run: Path, records: list[Record], fs: FeatureSet, generalised: bool = False, on: str = "unseen",
                 **metric_kw) -> dict:
    tuned = (Path(run) / "features" / FEATURES_FILE).is_file()
    if tuned:  # a fine-tuned backbone: every method reads its features
        fs = FeatureSet.load(Path(run) / "features")
    fs_raw = fs.for_sketches(records, False)
    model, enc = _encoders(run, fs_raw, records)
    fs_model = fs.for_sketches(records, True) if model.stroke_norm else fs_raw
    split = Split.from_json(model.config["training"]["split"])
    if on == "val":
        trained_on = Split.from_json(model.config["training"].get("trained_on", model.config["training"]["split"]))
        if set(split.val) & set(trained_on.train) or not split.val:
            raise ValueError(f"{run}: this model was trained on its validation classes (or has none): "
                             "evaluating on them needs a model trained with --no-refit")
    twin_of = _twin_rows(fs, fs_model, records) if model.query_twin else None
    family = {}
    for name, f in (("raw", fs_raw), ("model", fs_model)):
        family[name] = (f, torch.from_numpy(f.feats).float(),
                        _task_rows(f, records, split, generalised, seed=split.seed or 0, on=on))
    results: dict = {"run": str(run), "split": split.name, "tasks": {}, "classes": on,
                     "backbone": "fine-tuned" if tuned else "frozen", "stroke_norm": model.stroke_norm,
                     "query_twin": model.query_twin}
    embeddings: dict = {}
    for task in family["model"][2]:
        results["tasks"][task] = {}
        for method, fn in enc.items():
            _f, feats, rows = family["raw" if method in UNTRAINED else "model"]
            if task not in rows:  # a fine-tuned run's cache holds its model's sketch family only
                _f, feats, rows = family["model"]
            q, g, ql, gl = rows[task]
            with torch.no_grad():
                qe = np.asarray(fn(feats[q], "sketch"))
                ge = np.asarray(fn(feats[g], "photo"))
                if method == "served" and twin_of is not None:  # as the service encodes a query
                    twin_feats, twin_rows = twin_of
                    if (twin_rows[q] < 0).any():
                        raise ValueError(f"{task}: {(twin_rows[q] < 0).sum()} queries have no stroke-normalised twin "
                                         "in the features; recompute them with `sbir features`")
                    qt = np.asarray(fn(twin_feats[twin_rows[q]], "sketch"))
                    qe = model.merge_views(np.stack([qe, qt], axis=1))
            if method == "served" and model.rerank is not None:
                rep = evaluate_scored(_served_scores(qe, ge, model), ql, gl, **metric_kw)
                qe, ge = qe[:, : model.search_dim], ge[:, : model.search_dim]  # figures: the first stage
            else:
                rep = evaluate_retrieval(qe, ql, ge, gl, **metric_kw)
            results["tasks"][task][method] = rep.to_dict()
            embeddings[(task, method)] = (qe, ge)
    results["_rows"] = family["model"][2]
    results["_fs"] = fs_model
    results["_embeddings"] = embeddings
    return results


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def _span(counts: list[int]) -> str:
    """"342", or "226-347" where split seeds hold different numbers of unseen images."""
    lo, hi = min(counts), max(counts)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _metrics(task: str) -> list[str]:
    if task == "instance":
        return ["mAP@all", "P@1"]
    if task_kind(task) == "instance":
        return ["P@1", "mAP@100", "mAP@all"]
    return ["mAP@all", "P@100", "P@1"]


def style_table(agg: dict) -> str:
    """One row per drawing-style task, one column per method: the headline table."""
    rows = [t for t in agg if style_of(t)]
    if not rows:
        return ""
    methods = [m for m in METHODS if any(m in agg[t] for t in rows)]
    lines = ["| style task | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for task in rows:
        ms = ["P@1", "mAP@100"] if task_kind(task) == "instance" else ["P@1", "mAP@all"]
        cells = []
        for m in methods:
            v = agg[task].get(m)
            cells.append(" / ".join(f"{v[k]['mean']:.3f}" for k in ms) if v else "")
        lines.append(f"| {task} ({' / '.join(ms)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def aggregate(results: list[dict]) -> tuple[dict, str]:
    agg: dict = {}
    lines = []
    tasks = list(dict.fromkeys(t for r in results for t in r["tasks"]))
    for task in tasks:
        present = [r["tasks"][task] for r in results if task in r["tasks"]]
        metrics = _metrics(task)
        lines.append(f"\n**{task}** ({_span([p['iiae']['n_queries'] for p in present])} queries x "
                     f"{_span([p['iiae']['n_gallery'] for p in present])} gallery, {len(present)} run(s); "
                     "mean ± std)\n")
        lines.append("| method | " + " | ".join(metrics) + " |")
        lines.append("|---" * (len(metrics) + 1) + "|")
        agg[task] = {}
        for method in METHODS:
            vals = [p[method] for p in present if method in p]
            if not vals:
                continue
            agg[task][method] = {
                m: {"mean": float(np.mean([v[m] for v in vals])), "std": float(np.std([v[m] for v in vals])),
                    "runs": [v[m] for v in vals]}
                for m in metrics
            }
            lines.append(f"| {method} | " + " | ".join(_fmt([v[m] for v in vals]) for m in metrics) + " |")
    styles = style_table(agg)
    if styles:
        lines = ["**Drawing styles** (mean over runs; per task below)\n", styles, *lines]
    return agg, "\n".join(lines)


def _figure(result: dict, records: list[Record], fs: FeatureSet, dataset: Path, path: Path) -> None:
    # imported here: only a run that asks for the figure needs matplotlib, whose import takes most of a second
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["_rows"]["category"]
    q, g, ql, gl = rows
    fig = plt.figure(figsize=(16, 9))
    ax = fig.add_axes([0.05, 0.1, 0.3, 0.8])
    for method in METHODS:
        if ("category", method) not in result["_embeddings"]:
            continue
        qe, ge = result["_embeddings"][("category", method)]
        rel = ranked_relevance(qe @ ge.T, ql[:, None] == gl[None, :])
        r, p = pr_curve(rel)
        ax.plot(r, p, label=f"{method} (mAP {result['tasks']['category'][method]['mAP@all']:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (interpolated)")
    ax.set_title(f"unseen classes, {result['split']}")
    ax.legend()
    qe, ge = result["_embeddings"][("category", "iiae")]
    picks = np.random.default_rng(0).choice(len(q), min(5, len(q)), replace=False)
    top_k = 8
    for i, qi in enumerate(picks):
        order = np.argsort(-(qe[qi] @ ge.T), kind="stable")[:top_k]
        cells = [(q[qi], "query", None)] + [(g[j], f"{gl[j][:14]}", gl[j] == ql[qi]) for j in order]
        for c, (row, title, ok) in enumerate(cells):
            a = fig.add_axes([0.4 + c * 0.066, 0.82 - i * 0.18, 0.06, 0.14])
            a.imshow(load_image(resolve_path(dataset, records[int(fs.record[row])])).resize((96, 96)))
            a.set_xticks([])
            a.set_yticks([])
            color = "black" if ok is None else ("green" if ok else "red")
            for s in a.spines.values():
                s.set_edgecolor(color)
                s.set_linewidth(3 if ok is not None else 1)
            a.set_title(title if c else ql[qi][:14], fontsize=7, color=color)
    fig.suptitle("IIAE zero-shot retrieval: PR curves and top results (green = same class)")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def evaluate_runs(
    dataset: Path,
    records: list[Record],
    fs: FeatureSet,
    runs: list[Path],
    out_dir: Path,
    generalised: bool = False,
    ties: str = "stable",
    precision_variant: str = "hits/k",
    map_variant: str = "topk",
    figures: bool = True,
    on: str = "unseen",
) -> dict:
    metric_kw = {"ks": (1, 100, 200), "map_ks": (100, 200), "ties": ties, "precision_variant": precision_variant,
                 "map_variant": map_variant}
    results = [evaluate_run(Path(r), records, fs, generalised, on=on, **metric_kw) for r in runs]
    agg, table = aggregate(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "dataset": str(dataset),
        "protocol": {"classes": on, "generalised": generalised, "ties": ties, "precision": precision_variant,
                     "mAP@200": map_variant, "mAP@all": "non-interpolated AP over the full ranking"},
        "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
        "aggregate": agg,
        "table_markdown": table,
    }
    (out_dir / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if figures and results and "category" in results[0]["_rows"]:
        _figure(results[0], records, results[0]["_fs"], dataset, out_dir / "eval_report.png")
    LOG.info("report written to %s", out_dir / "eval_report.json")
    return report
