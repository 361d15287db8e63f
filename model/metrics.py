"""Retrieval metrics of the ZS-SBIR literature, computed on a (queries x gallery) score matrix.

Every query is ranked against the whole gallery; relevant means same class.
- mAP@all: non-interpolated average precision over the full ranking (sklearn's
  `average_precision_score` on the query's score vector), averaged over queries.
- P@K: hits in the top K divided by K ("hits/k"); "hits/min(k,rel)" is offered by name.
- mAP@K variants, named because papers disagree: "topk" (AP over the top K, counting only the
  positives found there), "capped" (VOC style, divided by min(#relevant, K)), "divk" (divided by K,
  Yelamarthi et al.).
Ties: rankings use a STABLE descending sort, so equal scores keep gallery order (deterministic);
`ties="grouped"` instead treats a run of equal scores as one threshold, exactly like sklearn.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

MAP_AT_K_VARIANTS = ("topk", "capped", "divk")
PRECISION_VARIANTS = ("hits/k", "hits/min(k,rel)")


def _blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def ranked_relevance(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Relevance (bool, Q x G) reordered by descending score, stable in gallery order."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(relevant, order, axis=1)


def _ap_stable(rel: np.ndarray) -> np.ndarray:
    """Average precision per row of ranked relevance."""
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    n_rel = rel.sum(axis=1)
    ap = (rel * hits / ranks).sum(axis=1)
    return np.divide(ap, n_rel, out=np.zeros(len(rel)), where=n_rel > 0)


def _ap_grouped(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """sklearn's step-wise AP: each distinct score is one threshold."""
    out = np.zeros(len(scores))
    for i, (s, r) in enumerate(zip(scores, relevant, strict=True)):
        order = np.argsort(-s, kind="stable")
        s, r = s[order], r[order].astype(np.float64)
        last_of_run = np.r_[s[1:] != s[:-1], True]
        tp = np.cumsum(r)[last_of_run]
        pos = np.arange(1, len(s) + 1)[last_of_run]
        n_rel = r.sum()
        if n_rel == 0:
            continue
        precision = tp / pos
        recall_gain = np.diff(np.r_[0.0, tp]) / n_rel
        out[i] = (precision * recall_gain).sum()
    return out


def average_precision(scores: np.ndarray, relevant: np.ndarray, ties: str = "stable") -> np.ndarray:
    """AP of each query (row) over the whole gallery."""
    assert scores.shape == relevant.shape, (scores.shape, relevant.shape)
    assert ties in ("stable", "grouped"), ties
    if ties == "grouped":
        return _ap_grouped(scores, relevant)
    return _ap_stable(ranked_relevance(scores, relevant))


def precision_at_k(rel_ranked: np.ndarray, k: int, variant: str = "hits/k") -> np.ndarray:
    assert variant in PRECISION_VARIANTS, variant
    hits = rel_ranked[:, :k].sum(axis=1)
    if variant == "hits/k":
        return hits / k
    denom = np.minimum(k, rel_ranked.sum(axis=1))
    return np.divide(hits, denom, out=np.zeros(len(hits)), where=denom > 0)


def map_at_k(rel_ranked: np.ndarray, k: int, variant: str = "topk") -> np.ndarray:
    assert variant in MAP_AT_K_VARIANTS, variant
    top = rel_ranked[:, :k].astype(np.float64)
    prec = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    summed = (prec * top).sum(axis=1)
    if variant == "topk":
        denom = top.sum(axis=1)
    elif variant == "capped":
        denom = np.minimum(rel_ranked.sum(axis=1), k).astype(np.float64)
    else:
        denom = np.full(len(top), float(k))
    return np.divide(summed, denom, out=np.zeros(len(top)), where=denom > 0)


def pr_curve(rel_ranked: np.ndarray, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """Interpolated precision at evenly spaced recall levels, averaged over queries."""
    recall_levels = np.linspace(0, 1, points)
    n_rel = rel_ranked.sum(axis=1, keepdims=True)
    keep = n_rel[:, 0] > 0
    rel = rel_ranked[keep]
    hits = np.cumsum(rel, axis=1)
    precision = hits / np.arange(1, rel.shape[1] + 1)
    recall = hits / n_rel[keep]
    # interpolated precision: max precision at any recall >= r
    interp = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    out = np.zeros((len(rel), points))
    for j, r in enumerate(recall_levels):
        idx = np.argmax(recall >= r - 1e-12, axis=1)
        out[:, j] = interp[np.arange(len(rel)), idx]
    return recall_levels, out.mean(axis=0)


@dataclass
class RetrievalReport:
    map_all: float
    precision: dict[int, float]
    map_at: dict[int, float]
    n_queries: int
    n_gallery: int
    per_query_ap: np.ndarray

    def to_dict(self) -> dict:
        d = {"mAP@all": round(self.map_all, 4), "n_queries": self.n_queries, "n_gallery": self.n_gallery}
        d.update({f"P@{k}": round(v, 4) for k, v in self.precision.items()})
        d.update({f"mAP@{k}": round(v, 4) for k, v in self.map_at.items()})
        return d


def evaluate_retrieval(
    query_emb: np.ndarray, query_labels: np.ndarray, gallery_emb: np.ndarray, gallery_labels: np.ndarray, **kw
) -> RetrievalReport:
    """Cosine retrieval (embeddings are L2-normalised here) of every query against the gallery;
    `kw` as `evaluate_scored` takes them."""
    q = query_emb / np.maximum(np.linalg.norm(query_emb, axis=1, keepdims=True), 1e-12)
    g = gallery_emb / np.maximum(np.linalg.norm(gallery_emb, axis=1, keepdims=True), 1e-12)
    return evaluate_scored(lambda sl: q[sl] @ g.T, query_labels, gallery_labels, **kw)


def evaluate_scored(
    scores_of,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    ks: tuple[int, ...] = (1, 100, 200),
    map_ks: tuple[int, ...] = (200,),
    precision_variant: str = "hits/k",
    map_variant: str = "topk",
    ties: str = "stable",
    block: int = 256,
) -> RetrievalReport:
    """Retrieval metrics of any ranking: `scores_of(slice)` gives the (queries in slice, gallery)
    scores whose descending order is the ranking."""
    aps, precs, maps = [], {k: [] for k in ks}, {k: [] for k in map_ks}
    for sl in _blocks(len(query_labels), block):
        scores = scores_of(sl)
        relevant = query_labels[sl, None] == gallery_labels[None, :]
        aps.append(average_precision(scores, relevant, ties=ties))
        rel_ranked = ranked_relevance(scores, relevant)
        for k in ks:
            precs[k].append(precision_at_k(rel_ranked, k, precision_variant))
        for k in map_ks:
            maps[k].append(map_at_k(rel_ranked, k, map_variant))
    ap = np.concatenate(aps) if aps else np.zeros(0)
    return RetrievalReport(
        map_all=float(ap.mean()) if len(ap) else 0.0,
        precision={k: float(np.concatenate(v).mean()) if v else 0.0 for k, v in precs.items()},
        map_at={k: float(np.concatenate(v).mean()) if v else 0.0 for k, v in maps.items()},
        n_queries=len(query_labels),
        n_gallery=len(gallery_labels),
        per_query_ap=ap,
    )
