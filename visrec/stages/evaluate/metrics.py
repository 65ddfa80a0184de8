"""Ranking metrics over many impression lists at once (binary relevance = tapped).

Every function takes `ranked_relevance`, an `(n_lists, m)` array holding, for each
list, the relevance (0/1) of its items in the order a model ranked them; lists
shorter than `m` are padded with 0. Only the first `k` columns matter for the
top-k part, so a caller scoring huge lists may pass just the top `m >= k` items
together with `n_relevant` (taps in the whole list) and `lengths` (items in the
whole list). All functions return one value per list, so callers can average,
slice or bootstrap them without recomputing.
"""

from __future__ import annotations

import numpy as np

# The metrics the evaluation reports, name -> (function, k). Names are the keys of metrics.json.
METRICS: dict[str, tuple[str, int]] = {
    "ndcg@5": ("ndcg", 5),
    "precision@1": ("precision", 1),
    "precision@3": ("precision", 3),
    "hit_rate@1": ("hit_rate", 1),
    "hit_rate@3": ("hit_rate", 3),
}


# Reported beside METRICS, never gated: nDCG@5 with each tap weighted by 1 / the serving policy's
# logged propensity (position-debiased where the service explores; equal to nDCG@5 without propensities).
IPS_METRIC = "ips_ndcg@5"


def _top(ranked_relevance: np.ndarray, k: int) -> np.ndarray:
    rel = np.asarray(ranked_relevance, dtype=np.float64)
    if rel.ndim != 2:
        raise ValueError(f"ranked_relevance must be 2-D (n_lists, m), got shape {rel.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return (rel[:, :k] > 0).astype(np.float64)


def _discounts(k: int) -> np.ndarray:
    """1 / log2(rank + 2) for ranks 0..k-1 (the standard DCG discount)."""
    return 1.0 / np.log2(np.arange(k, dtype=np.float64) + 2.0)


def ndcg_at_k(ranked_relevance: np.ndarray, k: int, n_relevant: np.ndarray | None = None) -> np.ndarray:
    """nDCG@k per list: DCG of the model's top k divided by the DCG of a perfect ranking.

    `n_relevant` is each list's number of relevant items (defaults to the row sum,
    right when the rows hold whole lists). Lists without any relevant item get 0,
    as in `sklearn.metrics.ndcg_score`.
    """
    top = _top(ranked_relevance, k)
    disc = _discounts(k)[: top.shape[1]]
    dcg = top @ disc
    if n_relevant is None:
        n_relevant = (np.asarray(ranked_relevance) > 0).sum(axis=1)
    n_ideal = np.minimum(np.asarray(n_relevant, dtype=np.int64), k)
    ideal = np.concatenate([[0.0], np.cumsum(_discounts(k))])[n_ideal]
    out = np.zeros(len(top), dtype=np.float64)
    np.divide(dcg, ideal, out=out, where=ideal > 0)
    return out


def graded_ndcg_at_k(ranked_gains: np.ndarray, ideal_gains: np.ndarray, k: int) -> np.ndarray:
    """nDCG@k per list with graded gains (e.g. IPS-weighted taps): DCG of the model's top-k gains over
    the DCG of the same list's gains in descending order (`ideal_gains`); 0 for a list without gain."""
    disc = _discounts(k)
    dcg = np.asarray(ranked_gains, dtype=np.float64)[:, :k] @ disc[: min(k, np.shape(ranked_gains)[1])]
    ideal = np.asarray(ideal_gains, dtype=np.float64)[:, :k] @ disc[: min(k, np.shape(ideal_gains)[1])]
    out = np.zeros(len(dcg), dtype=np.float64)
    np.divide(dcg, ideal, out=out, where=ideal > 0)
    return out


def precision_at_k(ranked_relevance: np.ndarray, k: int, lengths: np.ndarray | None = None) -> np.ndarray:
    """Precision@k per list: the tapped fraction of the top k.

    A list shorter than k only has `length` items in its top k, so the denominator
    is `min(k, length)` (a perfect ranking scores 1). `lengths` defaults to `m`.
    """
    top = _top(ranked_relevance, k)
    if lengths is None:
        lengths = np.full(len(top), np.asarray(ranked_relevance).shape[1])
    denom = np.minimum(np.asarray(lengths, dtype=np.float64), k)
    out = np.zeros(len(top), dtype=np.float64)
    np.divide(top.sum(axis=1), denom, out=out, where=denom > 0)
    return out


def hit_rate_at_k(ranked_relevance: np.ndarray, k: int) -> np.ndarray:
    """Hit rate@k per list: 1 if at least one relevant item is in the top k, else 0."""
    return (_top(ranked_relevance, k).sum(axis=1) > 0).astype(np.float64)


def all_metrics(ranked_relevance: np.ndarray, n_relevant: np.ndarray | None = None,
                lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every metric in `METRICS`, per list."""
    out: dict[str, np.ndarray] = {}
    for name, (kind, k) in METRICS.items():
        if kind == "ndcg":
            out[name] = ndcg_at_k(ranked_relevance, k, n_relevant)
        elif kind == "precision":
            out[name] = precision_at_k(ranked_relevance, k, lengths)
        else:
            out[name] = hit_rate_at_k(ranked_relevance, k)
    return out
