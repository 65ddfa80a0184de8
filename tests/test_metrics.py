"""Ranking metrics: hand-computed cases and the cross-check against scikit-learn."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import ndcg_score

from visrec.stages.evaluate.evaluation import LOGGED, RANDOM, group_lists, reference_rankings, score_lists
from visrec.stages.evaluate.metrics import hit_rate_at_k, ndcg_at_k, precision_at_k


def test_hand_computed_values():
    # Taps at ranks 1 and 3 (0-based) of a 6-item list.
    rel = np.array([[0, 1, 0, 1, 0, 0]])
    dcg = 1 / np.log2(3) + 1 / np.log2(5)
    idcg = 1 + 1 / np.log2(3)
    assert ndcg_at_k(rel, 5)[0] == pytest.approx(dcg / idcg)
    assert precision_at_k(rel, 1)[0] == 0.0
    assert precision_at_k(rel, 3)[0] == pytest.approx(1 / 3)
    assert hit_rate_at_k(rel, 1)[0] == 0.0
    assert hit_rate_at_k(rel, 3)[0] == 1.0


def test_relevant_items_below_the_cutoff_still_count_in_the_ideal():
    # Only the top 5 are passed, but the list has one more tap further down: the ideal DCG must see it.
    top = np.array([[1, 0, 0, 0, 0]])
    assert ndcg_at_k(top, 5, n_relevant=np.array([2]))[0] == pytest.approx(1 / (1 + 1 / np.log2(3)))
    assert ndcg_at_k(top, 5)[0] == pytest.approx(1.0)


def test_precision_of_a_short_list_uses_its_length():
    rel = np.array([[1, 1, 0]])
    assert precision_at_k(rel, 3, lengths=np.array([2]))[0] == pytest.approx(1.0)
    assert precision_at_k(rel, 3)[0] == pytest.approx(2 / 3)


def test_ndcg_matches_sklearn_on_lists_without_ties():
    rng = np.random.default_rng(3)
    n, m = 200, 9
    y_true = (rng.random((n, m)) < 0.25).astype(int)
    y_true[np.arange(n), rng.integers(0, m, n)] = 1  # every list has a tap
    y_score = rng.random((n, m))  # continuous: no ties
    order = np.argsort(-y_score, axis=1)
    ranked = np.take_along_axis(y_true, order, axis=1)
    ours = ndcg_at_k(ranked, 5)
    theirs = np.array([ndcg_score(y_true[i:i + 1], y_score[i:i + 1], k=5) for i in range(n)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)

    # The same through the evaluation's own grouping and ranking of impression rows.
    lists = [i for i in range(n) for _ in range(m)]
    table = pa.table({
        "query_item_id": [f"q{i:03d}" for i in lists], "item_id": [f"c{j}" for _ in range(n) for j in range(m)],
        "position": [j for _ in range(n) for j in range(m)], "tapped": y_true.ravel().tolist(),
        "session_id": ["s"] * (n * m)})
    grouped = group_lists(table)
    assert grouped.list_of_row.tolist() == lists  # rows keep the file order here, so scores line up
    per_list = score_lists(grouped, y_score.ravel())
    np.testing.assert_allclose(per_list["ndcg@5"], theirs, rtol=1e-12, atol=1e-12)
    assert per_list["ndcg@5"].mean() == pytest.approx(ndcg_score(y_true, y_score, k=5))


def test_ties_are_broken_at_random_not_by_logged_position():
    # 400 lists where the tapped item was always shown first: the logged order is perfect.
    n, m = 400, 8
    table = pa.table({
        "query_item_id": [f"q{i}" for i in range(n) for _ in range(m)],
        "item_id": [f"c{j}" for _ in range(n) for j in range(m)],
        "position": [j for _ in range(n) for j in range(m)],
        "tapped": [int(j == 0) for _ in range(n) for j in range(m)], "session_id": ["s"] * (n * m)})
    grouped = group_lists(table)
    references = reference_rankings(grouped, np.random.SeedSequence(0))
    assert references[LOGGED]["ndcg@5"].mean() == 1.0
    # A model that cannot tell the items apart must score like chance, not inherit the logged order.
    collapsed = score_lists(grouped, np.zeros(n * m))["ndcg@5"].mean()
    chance = references[RANDOM]["ndcg@5"].mean()
    assert collapsed == pytest.approx(chance, abs=0.06) and collapsed < 0.6
    # Scores still decide wherever they differ.
    scores = np.where(np.arange(n * m) % m == 0, 1.0, 0.0)
    assert score_lists(grouped, scores)["precision@1"].mean() == 1.0


def test_ips_ndcg_equals_ndcg_without_propensities_and_weights_explored_taps():
    from visrec.stages.evaluate.metrics import IPS_METRIC

    rows = {"query_item_id": ["q"] * 4 + ["r"] * 3, "item_id": ["a", "b", "c", "d", "a", "b", "c"],
            "position": [0, 1, 2, 3, 0, 1, 2], "tapped": [0, 1, 0, 1, 1, 0, 0], "session_id": ["s"] * 7,
            "ts": ["2025-01-01T00:00:00+00:00"] * 7}
    scores = np.array([4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0])  # the model ranks each list by these
    plain = score_lists(group_lists(pa.table(rows)), scores)
    np.testing.assert_allclose(plain[IPS_METRIC], plain["ndcg@5"])
    # The tap on d (ranked last by the model) was shown in an explored slot: it weighs 10x, so the
    # model's miss of it costs more than the plain metric says.
    weighted = score_lists(group_lists(pa.table({**rows, "propensity": [1, 1, 1, 0.1, 1, 1, 1]})), scores)
    assert weighted[IPS_METRIC][0] < plain[IPS_METRIC][0] and weighted[IPS_METRIC][1] == plain[IPS_METRIC][1]
    np.testing.assert_allclose(weighted["ndcg@5"], plain["ndcg@5"])  # the paper's metrics are unchanged
