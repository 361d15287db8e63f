"""The served second stage (model/rerank.py): IIAE's candidates re-ordered by a weighted mean of cosines,
the same in the evaluation's full-gallery form and in the service's candidate form."""

import numpy as np
import pytest

from model.rerank import RerankConfig, fuse, rerank, rerank_matrix, second_scores, split_rows, unit_parts


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_rerank_orders_candidates_by_the_mean_of_both_cosines():
    cand = np.array([[7, 3, 5]])
    first = np.array([[0.9, 0.8, 0.1]])
    second = np.array([[0.0, 0.9, 0.95]])
    scores, ids = rerank(cand, first, second, 0.5, 3)
    assert ids.tolist() == [[3, 5, 7]]  # means 0.85, 0.525, 0.45
    np.testing.assert_allclose(scores, [[0.85, 0.525, 0.45]], rtol=1e-6)
    scores, ids = rerank(cand, first, second, 0.0, 2)  # weight 0: the first stage's order
    assert ids.tolist() == [[7, 3]]


def test_missing_candidates_go_last_as_minus_one():
    cand = np.array([[4, -1, 2]])
    scores, ids = rerank(cand, np.array([[0.1, 0.0, 0.5]]), np.array([[0.2, 0.9, 0.1]]), 0.5, 3)
    assert ids.tolist() == [[2, 4, -1]] and np.isneginf(scores[0, 2])


def test_the_full_gallery_form_ranks_as_the_candidate_form():
    rng = np.random.default_rng(0)
    q, g = _unit(rng.normal(size=(6, 8))), _unit(rng.normal(size=(50, 8)))
    q2, g2 = _unit(rng.normal(size=(6, 4))), _unit(rng.normal(size=(50, 4)))
    cfg = RerankConfig(vector="adapter", dim=4, top=10, weight=0.5)
    first, second = q @ g.T, q2 @ g2.T
    full = rerank_matrix(first, second, cfg)
    order = np.argsort(-full, axis=1, kind="stable")
    cand = np.argsort(-first, axis=1, kind="stable")[:, :10]
    _, ids = rerank(cand, np.take_along_axis(first, cand, 1), np.take_along_axis(second, cand, 1), 0.5, 10)
    np.testing.assert_array_equal(order[:, :10], ids)  # the candidates, re-ordered, come first
    rest = np.argsort(-first, axis=1, kind="stable")[:, 10:]
    np.testing.assert_array_equal(order[:, 10:], rest)  # then the others in IIAE's order
    np.testing.assert_allclose(np.take_along_axis(full, ids, 1), fuse(
        np.take_along_axis(first, ids, 1), np.take_along_axis(second, ids, 1), 0.5), rtol=1e-6)


def test_rows_split_into_the_searched_and_the_reranking_part():
    rows = np.arange(12.0).reshape(2, 6)
    a, b = split_rows(rows, 4)
    assert a.shape == (2, 4) and b.shape == (2, 2) and b[0].tolist() == [4.0, 5.0]


@pytest.mark.parametrize("bad", [{"vector": "pixels"}, {"top": 0}, {"weight": 1.5}, {"dim": 0},
                                 {"weight": 0.8, "raw_weight": 0.3, "raw_dim": 8}, {"raw_weight": 0.2},
                                 {"raw_dim": 8}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        RerankConfig(**bad)
    assert RerankConfig.from_dict(None) is None
    assert RerankConfig.from_dict(RerankConfig().to_dict()) == RerankConfig()


def test_three_parts_score_as_the_weighted_mean_of_their_cosines():
    """`[zs | v | r]` rows: the second stage's one dot product (`second_query`) gives
    (1 - w - u) cos(zs) + w cos(v) + u cos(r), ranked over the top candidates."""
    rng = np.random.default_rng(1)
    cfg = RerankConfig(vector="adapter", dim=4, top=30, weight=0.5, raw_weight=0.25, raw_dim=6)
    q, g = rng.normal(size=(5, 3 + cfg.width)), rng.normal(size=(40, 3 + cfg.width))
    for rows in (q, g):
        for part in unit_parts(rows, 3, cfg):
            part /= np.linalg.norm(part, axis=1, keepdims=True)
    zs, v, r = (a @ b.T for a, b in zip(unit_parts(q, 3, cfg), unit_parts(g, 3, cfg), strict=True))
    expected = 0.25 * zs + 0.5 * v + 0.25 * r
    (q1, q2), (g1, g2) = split_rows(q, 3), split_rows(g, 3)
    full = rerank_matrix(q1 @ g1.T, second_scores(q2, g2, cfg), cfg)
    cand = np.argsort(-zs, axis=1, kind="stable")[:, :30]
    np.testing.assert_allclose(np.take_along_axis(full, cand, 1), np.take_along_axis(expected, cand, 1), atol=1e-9)
    assert cfg.width == 10 and cfg.share == 0.75


def test_rows_of_a_model_without_raw_features_are_two_parts():
    cfg = RerankConfig(vector="adapter", dim=4)
    rows = np.ones((2, 7))
    assert [p.shape[1] for p in unit_parts(rows, 3, cfg)] == [3, 4]
    assert [p.shape[1] for p in unit_parts(rows, 7, None)] == [7]
    assert RerankConfig.from_dict({"vector": "infonce", "dim": 64, "top": 200, "weight": 0.5}).raw_dim == 0
