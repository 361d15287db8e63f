"""Zero-shot evaluation on unseen classes: IIAE next to its baselines, as REFERENCE §3 defines it.

Tasks (all queries and galleries from the split's unseen classes):
- category: line-art sketches against every colour image, relevant = same class (primary);
- category_cross_artist: the same without the sketch artist's own colour images;
- instance: relevant = the same emoji / instance (fine-grained);
- edge_maps: edge maps of the sketch artist's colour images (a drawing style never trained on)
  against the cross-artist gallery.
Methods: raw backbone features, raw features standardised per domain, the adapter alone, the
InfoNCE peer and IIAE. Several runs (split seeds) give mean and spread.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.data.dataset import Record, Split, resolve_path
from model.features import EDGE_VIEW, FEATURES_FILE, FeatureSet
from model.metrics import evaluate_retrieval, pr_curve, ranked_relevance

LOG = logging.getLogger(__name__)

METHODS = ("raw", "standardised", "adapter", "infonce", "iiae")
TASKS = ("category", "category_cross_artist", "instance", "edge_maps")


def _encoders(run: Path, fs: FeatureSet):
    from model.pipeline import SBIRModel
    from model.train import InfoNCEPeer

    model = SBIRModel.load(run / "model", device="cpu", with_backbone=False)
    adapter = model.adapter

    def raw(x, domain):
        return F.normalize(x, dim=-1)

    def standardised(x, domain):
        return F.normalize(adapter.standardise(x, domain), dim=-1)

    def adapted(x, domain):
        return F.normalize(adapter(x, domain), dim=-1)

    def iiae(x, domain):
        a = adapter(x, domain)
        return model.iiae.encode_sketches(a) if domain == "sketch" else model.iiae.encode_photos(a)

    enc = {"raw": raw, "standardised": standardised, "adapter": adapted, "iiae": iiae}
    peer_path = run / "peer_infonce.safetensors"
    if peer_path.is_file():
        from safetensors.torch import load_file

        state = load_file(str(peer_path))
        peer = InfoNCEPeer(adapter.cfg.output_dim, state["sketch.weight"].shape[0])
        peer.load_state_dict(state)
        peer.eval()
        enc["infonce"] = lambda x, domain: peer.encode(adapter(x, domain), domain)
    return model, enc


def _task_rows(fs: FeatureSet, records: list[Record], split: Split, generalised: bool, seed: int):
    gran = split.granularity
    unseen = set(split.unseen)
    seen = set(split.train) | set(split.val)
    rec_label = np.array([r.label(gran) for r in records])
    rec_cat = np.array([r.category for r in records])
    rec_inst = np.array([r.instance or r.path for r in records])
    rec_dom = np.array([r.domain for r in records])
    rec_artist = np.array([r.artist for r in records])
    row_label = rec_label[fs.record]
    is_unseen = np.isin(row_label, list(unseen))
    is_seen = np.isin(row_label, list(seen))
    sketch_artists = set(rec_artist[rec_dom == "sketch"])
    v0 = fs.view == 0
    q = np.flatnonzero(is_unseen & v0 & (rec_dom[fs.record] == "sketch"))
    g = np.flatnonzero(is_unseen & v0 & (rec_dom[fs.record] == "photo"))
    edge_q = np.flatnonzero(is_unseen & (fs.view == EDGE_VIEW))
    if generalised:
        rng = np.random.default_rng(seed)
        sq = np.flatnonzero(is_seen & v0 & (rec_dom[fs.record] == "sketch"))
        sg = np.flatnonzero(is_seen & v0 & (rec_dom[fs.record] == "photo"))
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
    return {
        name: (qq, gg, label_of[lab][fs.record[qq]], label_of[lab][fs.record[gg]])
        for name, (qq, gg, lab) in tasks.items()
        if len(qq) and len(gg)
    }


def evaluate_run(run: Path, records: list[Record], fs: FeatureSet, generalised: bool = False, **metric_kw) -> dict:
    tuned = (Path(run) / "features" / FEATURES_FILE).is_file()
    if tuned:  # a fine-tuned backbone: every method reads its features
        fs = FeatureSet.load(Path(run) / "features")
    model, enc = _encoders(run, fs)
    split = Split.from_json(model.config["training"]["split"])
    feats = torch.from_numpy(fs.feats).float()
    rows = _task_rows(fs, records, split, generalised, seed=split.seed or 0)
    results: dict = {"run": str(run), "split": split.name, "tasks": {},
                     "backbone": "fine-tuned" if tuned else "frozen"}
    embeddings: dict = {}
    for task, (q, g, ql, gl) in rows.items():
        results["tasks"][task] = {}
        for method, fn in enc.items():
            with torch.no_grad():
                qe = np.asarray(fn(feats[q], "sketch"))
                ge = np.asarray(fn(feats[g], "photo"))
            rep = evaluate_retrieval(qe, ql, ge, gl, **metric_kw)
            results["tasks"][task][method] = rep.to_dict()
            embeddings[(task, method)] = (qe, ge)
    results["_rows"] = rows
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


def aggregate(results: list[dict]) -> tuple[dict, str]:
    agg: dict = {}
    lines = []
    for task in TASKS:
        present = [r["tasks"][task] for r in results if task in r["tasks"]]
        if not present:
            continue
        metrics = ["mAP@all", "P@100", "P@1"] if task != "instance" else ["mAP@all", "P@1"]
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
    return agg, "\n".join(lines)


def _figure(result: dict, records: list[Record], fs: FeatureSet, dataset: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from model.images import load_image

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
) -> dict:
    metric_kw = {"ks": (1, 100, 200), "map_ks": (200,), "ties": ties, "precision_variant": precision_variant,
                 "map_variant": map_variant}
    results = [evaluate_run(Path(r), records, fs, generalised, **metric_kw) for r in runs]
    agg, table = aggregate(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "dataset": str(dataset),
        "protocol": {"generalised": generalised, "ties": ties, "precision": precision_variant,
                     "mAP@200": map_variant, "mAP@all": "non-interpolated AP over the full ranking"},
        "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
        "aggregate": agg,
        "table_markdown": table,
    }
    (out_dir / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if figures and results and "category" in results[0]["_rows"]:
        _figure(results[0], records, fs, dataset, out_dir / "eval_report.png")
    LOG.info("report written to %s", out_dir / "eval_report.json")
    return report
