"""FAISS layer of the index builder: exact search against numpy, recall of approximate indexes, choice rules."""

from __future__ import annotations

import numpy as np
import pytest

from index_builder import faiss_index as fi


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int, clusters: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit_rows(clusters, d, seed + 1)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def numpy_topk(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int):
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def test_exact_index_equals_numpy_brute_force():
    x = unit_rows(3000, 64, 0)
    ids = np.random.default_rng(1).choice(2**62, 3000, replace=False).astype(np.int64)  # arbitrary, unordered
    q = unit_rows(50, 64, 2)
    index = fi.build_index(x, ids, "Flat")
    scores, found = fi.search(index, q, 10)
    ref_scores, ref_ids = numpy_topk(q, x, ids, 10)
    np.testing.assert_array_equal(found, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
    assert found.dtype == np.int64 and scores.dtype == np.float32


def test_small_batches_and_single_queries_get_the_same_exact_answers():
    """Batches run one matrix product, lone queries the per-query scan: the answers must not differ."""
    x = unit_rows(5000, 64, 5)
    ids = np.arange(5000, dtype=np.int64) * 7
    q = unit_rows(8, 64, 6)
    index = fi.build_index(x, ids, "Flat")
    batch_scores, batch_ids = fi.search(index, q, 24)
    single = [fi.search(index, q[i : i + 1], 24) for i in range(len(q))]
    np.testing.assert_array_equal(batch_ids, np.concatenate([i for _, i in single]))
    np.testing.assert_allclose(batch_scores, np.concatenate([s for s, _ in single]), atol=1e-5)
    ref_scores, ref_ids = numpy_topk(q, x, ids, 24)
    np.testing.assert_array_equal(batch_ids, ref_ids)


def test_exact_knn_reference_matches_numpy_across_blocks():
    x = unit_rows(1000, 16, 3)
    q = unit_rows(7, 16, 4)
    scores, rows = fi.exact_knn(q, x, 12, block=97)  # many partial blocks
    ref_scores, ref_rows = numpy_topk(q, x, np.arange(1000), 12)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)


def test_fewer_than_k_results_are_minus_one_with_minus_inf_score():
    x = unit_rows(3, 8, 5)
    index = fi.build_index(x, np.array([7, 8, 9]), "Flat")
    scores, ids = fi.search(index, x[:1], 5)
    assert ids[0, 0] == 7 and set(ids[0, :3]) == {7, 8, 9}
    assert (ids[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()


@pytest.mark.parametrize("factory", ["IVF32,Flat", "HNSW16", "IVF32,SQ8"])
def test_approximate_index_is_tuned_to_the_recall_target_and_measured(factory):
    x = clustered(6000, 32, clusters=60, noise=0.35, seed=6)
    ids = np.arange(100, 6100, dtype=np.int64)
    index = fi.build_index(x, ids, factory)
    check = fi.tune_and_measure(index, x, ids, target=0.9, sample=200)
    assert check.k == 10 and check.queries == 200
    name = "nprobe" if factory.startswith("IVF") else "efSearch"
    assert list(check.params) == [name]
    assert check.tuning and check.tuning[-1][name] == check.params[name]
    assert check.tuning[-1]["recall"] >= 0.9  # the ladder stopped at the first value reaching the target
    assert all(step["recall"] < 0.9 for step in check.tuning[:-1])
    # the recorded recall is what an independent measurement with the chosen parameter finds
    q = x[np.random.default_rng(9).permutation(len(x))[:300]]
    q = q + 0.02 * np.random.default_rng(10).standard_normal(q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    _, found = fi.search(index, q, 10)
    _, truth = numpy_topk(q, x, ids, 10)
    independent = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])
    assert abs(independent - check.recall) < 0.08
    assert check.recall >= 0.85


def test_low_nprobe_has_lower_recall_than_the_tuned_one():
    x = clustered(5000, 32, clusters=50, noise=0.4, seed=11)
    ids = np.arange(5000, dtype=np.int64)
    index = fi.build_index(x, ids, "IVF64,Flat")
    fi.set_search_params(index, {"nprobe": 1})
    low = fi.tune_and_measure(index, x, ids, sample=200, tune=False)
    tuned = fi.tune_and_measure(index, x, ids, sample=200, target=0.95)
    assert low.params == {} and low.recall < 0.8
    assert tuned.recall >= 0.9 > low.recall


def test_build_is_deterministic_for_the_same_input():
    x = clustered(3000, 16, clusters=30, noise=0.3, seed=12)
    ids = np.arange(3000, dtype=np.int64) * 3
    a, b = fi.build_index(x, ids, "IVF16,Flat"), fi.build_index(x, ids, "IVF16,Flat")
    for index in (a, b):
        fi.set_search_params(index, {"nprobe": 2})
    np.testing.assert_array_equal(fi.search(a, x[:100], 10)[1], fi.search(b, x[:100], 10)[1])


def test_index_ids_lists_every_id_for_idmap_and_ivf():
    x = unit_rows(500, 8, 13)
    ids = np.random.default_rng(14).choice(2**62, 500, replace=False).astype(np.int64)
    for factory in ("Flat", "IVF4,Flat", "HNSW8"):
        index = fi.build_index(x, ids, factory)
        np.testing.assert_array_equal(np.sort(fi.index_ids(index)), np.sort(ids))


def test_choose_factory_exact_then_ivf_by_memory_budget():
    assert fi.choose_factory(1000, 64).factory == "Flat"
    assert fi.choose_factory(fi.EXACT_MAX, 64).kind == "flat"
    big = fi.choose_factory(1_000_000, 64, memory_budget=4 << 30)
    assert big.kind == "ivf-flat" and big.factory.startswith("IVF4096,")
    assert fi.choose_factory(1_000_000, 64, memory_budget=200 << 20).kind == "ivf-sq8"
    pq = fi.choose_factory(1_000_000, 64, memory_budget=30 << 20)
    assert pq.kind == "ivf-pq" and pq.bytes_per_vector * 1_000_000 <= 30 << 20
    with pytest.raises(ValueError, match="memory budget"):
        fi.choose_factory(1_000_000, 64, memory_budget=4 << 20)


def test_kind_of_and_bad_factory():
    assert fi.kind_of("IVF256,PQ16") == "ivf-pq"
    assert fi.kind_of("HNSW32") == "hnsw"
    with pytest.raises(ValueError, match="faiss cannot build"):
        fi.new_index("NotAnIndex", 16)


def test_recall_counts_ties_as_hits():
    # two identical vectors: either may come back; recall must not depend on which
    x = unit_rows(50, 8, 15)
    x[1] = x[0]
    ids = np.arange(50, dtype=np.int64)
    q = x[:1]
    exact_scores, _ = fi.exact_knn(q, x, 1)
    assert fi.recall_at_k(np.array([[1]]), q, x, ids, exact_scores, 1) == 1.0
    assert fi.recall_at_k(np.array([[0]]), q, x, ids, exact_scores, 1) == 1.0
    assert fi.recall_at_k(np.array([[5]]), q, x, ids, exact_scores, 1) == 0.0


def test_an_unreachable_target_settles_on_the_cheapest_value_near_the_plateau():
    x = clustered(4000, 32, clusters=40, noise=0.4, seed=16)
    ids = np.arange(4000, dtype=np.int64)
    index = fi.build_index(x, ids, "IVF16,PQ4")  # 4-byte codes: recall plateaus far below 0.99
    check = fi.tune_and_measure(index, x, ids, target=0.99, sample=200)
    recalls = [step["recall"] for step in check.tuning]
    assert len(check.tuning) == len(fi.tunable_parameter(index)[1])  # the whole ladder was tried
    assert max(recalls) < 0.99
    chosen = check.params["nprobe"]
    assert chosen < 16 and fi.faiss.extract_index_ivf(index).nprobe == chosen
    assert next(s["recall"] for s in check.tuning if s["nprobe"] == chosen) >= max(recalls) - 0.01


def test_hnsw_returns_k_results_when_k_exceeds_its_efsearch():
    """faiss's HNSW keeps efSearch candidates and does not raise it to k: a service asking for 100 (or a
    re-ranking model's 400) from an index tuned to efSearch 16 got holes. `search` raises it per call."""
    x = clustered(4000, 32, clusters=400, noise=0.1, seed=21)
    ids = np.arange(4000, dtype=np.int64) * 5
    index = fi.build_index(x, ids, "HNSW16")
    fi.set_search_params(index, {"efSearch": 16})
    q = x[:40]
    _, raw = index.search(q, 300)
    assert (raw < 0).any()  # what faiss itself does
    _, found = fi.search(index, q, 300)
    assert (found >= 0).all()
    _, truth = numpy_topk(q, x, ids, 300)
    assert np.mean([len(set(a) & set(b)) / 300 for a, b in zip(found, truth, strict=True)]) > 0.9
    assert fi._hnsw_ef_search(index) == 16  # the index's own setting is left as it was
    assert fi._hnsw_ef_search(fi.build_index(x, ids, "Flat")) is None
    # tuned at a depth past the ladder's first values, the ladder starts at the depth
    check = fi.tune_and_measure(index, x, ids, k=100, target=0.9, sample=100)
    assert check.tuning[0]["efSearch"] == 100 and check.params["efSearch"] >= 100 and check.recall >= 0.9
