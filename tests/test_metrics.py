"""Retrieval metrics against sklearn and against rankings worked out by hand."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from model.metrics import average_precision, evaluate_retrieval, map_at_k, precision_at_k, ranked_relevance


def test_ap_equals_sklearn_without_ties():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20, 50))
    relevant = rng.random((20, 50)) < 0.2
    relevant[:, 0] = True
    ours = average_precision(scores, relevant)
    ref = [average_precision_score(r, s) for s, r in zip(scores, relevant, strict=True)]
    np.testing.assert_allclose(ours, ref, rtol=1e-10)


def test_grouped_ties_equal_sklearn_and_stable_ties_follow_gallery_order():
    scores = np.array([[0.9, 0.5, 0.5, 0.5, 0.1]])
    relevant = np.array([[False, False, False, True, True]])
    grouped = average_precision(scores, relevant, ties="grouped")[0]
    assert grouped == pytest.approx(average_precision_score(relevant[0], scores[0]))
    # stable: ranking is 0,1,2,3,4 -> hits at ranks 4 and 5: (1/4 + 2/5) / 2
    assert average_precision(scores, relevant)[0] == pytest.approx((1 / 4 + 2 / 5) / 2)
    rng = np.random.default_rng(1)
    s = rng.integers(0, 4, size=(10, 30)).astype(float)
    r = rng.random((10, 30)) < 0.3
    r[:, 0] = True
    np.testing.assert_allclose(average_precision(s, r, ties="grouped"),
                               [average_precision_score(rr, ss) for ss, rr in zip(s, r, strict=True)])


def test_hand_made_ranking_precision_and_map_at_k_variants():
    # ranked relevance: 1 0 1 0 0 | one more relevant item never retrieved in the top 5
    scores = np.array([[5.0, 4, 3, 2, 1, 0]])
    relevant = np.array([[1, 0, 1, 0, 0, 1]], dtype=bool)
    rel = ranked_relevance(scores, relevant)
    assert precision_at_k(rel, 1)[0] == 1.0
    assert precision_at_k(rel, 5)[0] == pytest.approx(2 / 5)
    assert precision_at_k(rel, 5, "hits/min(k,rel)")[0] == pytest.approx(2 / 3)
    assert map_at_k(rel, 5, "topk")[0] == pytest.approx((1 + 2 / 3) / 2)
    assert map_at_k(rel, 5, "capped")[0] == pytest.approx((1 + 2 / 3) / 3)
    assert map_at_k(rel, 5, "divk")[0] == pytest.approx((1 + 2 / 3) / 5)
    assert average_precision(scores, relevant)[0] == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)


def test_evaluate_retrieval_perfect_and_blocked():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 4)
    centers = rng.normal(size=(5, 8))
    g = centers[labels] + 0.01 * rng.normal(size=(20, 8))
    q = centers[np.arange(5)]
    rep = evaluate_retrieval(q, np.arange(5), g, labels, ks=(1, 4), map_ks=(4,), block=2)
    assert rep.map_all == pytest.approx(1.0)
    assert rep.precision[4] == pytest.approx(1.0)
    shuffled = evaluate_retrieval(q, np.arange(5), rng.normal(size=(20, 8)), labels, ks=(4,))
    assert shuffled.map_all < 0.8


def test_aggregate_table_names_each_runs_counts_and_means_them():
    from model.evaluate import aggregate

    def run(n_q, n_g, m):
        row = {"mAP@all": m, "P@100": m, "P@1": m, "n_queries": n_q, "n_gallery": n_g}
        return {"tasks": {"category": {"iiae": row, "raw": dict(row, **{"mAP@all": m / 2})}}}

    agg, table = aggregate([run(342, 1360, 0.4), run(226, 899, 0.2)])
    assert "226-342 queries x 899-1360 gallery, 2 run(s)" in table
    assert agg["category"]["iiae"]["mAP@all"]["mean"] == pytest.approx(0.3)
    assert agg["category"]["raw"]["mAP@all"]["runs"] == [0.2, 0.1]
    _, same = aggregate([run(342, 1360, 0.4), run(342, 1360, 0.2)])
    assert "(342 queries x 1360 gallery, 2 run(s)" in same
