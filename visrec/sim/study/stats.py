"""The study's statistics: Table 1 scored with the evaluation stage's own functions, and the A/B
summary (user-level intervals from the online experiments' own `visrec.stages.experiment.stats`)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from visrec.model.pca import l2_normalise
from visrec.sim.study.config import ARMS, BASELINE, CANDIDATE, TAP_STREAM
from visrec.stages.experiment.stats import percentile_ci, ratio_bootstrap


def score_rankings(interactions_uri: str, models: dict[str, tuple[list[str], np.ndarray]],
                   comparisons: list[tuple[str, str]], resamples: int, seed: int) -> dict[str, Any]:
    """Score every model on the same impression lists with the evaluation stage's functions.

    A list counts if it has a tap and every model embeds its query item
    (`visrec.stages.evaluate.evaluation.score_models`, as in the evaluation stage). Also scores the seeded
    random ranking and the logged order. One
    paired bootstrap over the lists gives every interval and every uplift's interval.
    Returns {values: ranking -> metric -> {mean, ci95}, uplift: "a_vs_b" -> metric -> {...},
    lists_used, lists_skipped}.
    """
    from visrec.data.schema import read_interactions
    from visrec.stages.evaluate import evaluation as ev

    table, _ = read_interactions(interactions_uri)
    lists = ev.group_lists(table)
    seeds = np.random.SeedSequence(seed).spawn(2)
    used, _, per_list, _ = ev.score_models(lists, models, seeds[0])
    values, uplift = ev.summarise(per_list, comparisons, resamples, np.random.default_rng(seeds[1]))
    return {"values": values, "uplift": uplift, "lists_used": int(used.n_lists),
            "lists_skipped": int(lists.n_lists - used.n_lists)}


def summarise_ab(records: list[dict], variants: Sequence[str], resamples: int, seed: int) -> dict[str, Any]:
    """CTR per (variant, arm) with intervals, the candidate's uplift per variant, and each
    variant's change against the first (the full ranking) within an arm.

    `records`: one per (variant, session): variant, user_id, arm, impressions, taps,
    expected_taps, latency_ms. CTR = taps / impressions; intervals resample users.
    """
    rng = np.random.default_rng([seed, TAP_STREAM, 10**9])
    users = {arm: sorted({r["user_id"] for r in records if r["arm"] == arm}) for arm in ARMS}
    per_arm: dict[str, dict[str, np.ndarray]] = {}
    for arm in ARMS:
        row = {u: i for i, u in enumerate(users[arm])}
        cols = {key: np.zeros((len(row), len(variants))) for key in ("taps", "impressions", "expected", "sessions",
                                                                     "tapped_sessions")}
        for r in records:
            if r["arm"] != arm:
                continue
            i, j = row[r["user_id"]], variants.index(r["variant"])
            cols["taps"][i, j] += r["taps"]
            cols["impressions"][i, j] += r["impressions"]
            cols["expected"][i, j] += r["expected_taps"]
            cols["sessions"][i, j] += 1
            cols["tapped_sessions"][i, j] += r["taps"] > 0
        per_arm[arm] = cols
    draws = {arm: ratio_bootstrap(per_arm[arm]["taps"], per_arm[arm]["impressions"], resamples, rng)
             for arm in ARMS}
    out: dict[str, Any] = {"users": {arm: len(users[arm]) for arm in ARMS}, "variants": {}}
    for j, variant in enumerate(variants):
        entry: dict[str, Any] = {}
        for arm in ARMS:
            c = per_arm[arm]
            taps, imps = c["taps"][:, j].sum(), c["impressions"][:, j].sum()
            lat = [r["latency_ms"] for r in records if r["variant"] == variant and r["arm"] == arm]
            entry[arm] = {
                "sessions": int(c["sessions"][:, j].sum()), "impressions": int(imps), "taps": int(taps),
                "ctr": round(taps / imps, 6) if imps else None, "ctr_ci95": percentile_ci(draws[arm][:, j]),
                "expected_ctr": round(c["expected"][:, j].sum() / imps, 6) if imps else None,
                "session_ctr": round(c["tapped_sessions"][:, j].sum() / max(c["sessions"][:, j].sum(), 1), 6),
                "latency_ms_p50": round(float(np.percentile(lat, 50)), 3) if lat else None,
                "latency_ms_p99": round(float(np.percentile(lat, 99)), 3) if lat else None,
            }
            if j > 0:  # paired over the same users and sessions: the change the switch makes
                change = draws[arm][:, j] / draws[arm][:, 0] - 1.0
                ref = entry[arm]["ctr"], out["variants"][variants[0]][arm]["ctr"]
                entry[arm]["relative_change_vs_full"] = (round(ref[0] / ref[1] - 1.0, 6)
                                                         if ref[0] is not None and ref[1] else None)
                entry[arm]["relative_change_ci95"] = percentile_ci(change)
        base, cand = entry[BASELINE]["ctr"], entry[CANDIDATE]["ctr"]
        entry["ctr_uplift"] = round(cand / base - 1.0, 6) if base and cand is not None else None
        entry["ctr_uplift_ci95"] = percentile_ci(draws[CANDIDATE][:, j] / draws[BASELINE][:, j] - 1.0)
        out["variants"][variant] = entry
    return out


# The hidden attributes a photo shows, and the category, whose agreement `neighbour_agreement` reports.
NEIGHBOUR_ATTRIBUTES = ("shape", "colour", "pattern", "category")


def neighbour_agreement(models: dict[str, tuple[list[str], np.ndarray]], hidden: dict[str, dict], k: int = 5,
                        queries: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Per model, the share of each query's `k` nearest neighbours (cosine, the query excluded) that
    share its hidden shape, colour, pattern and category, over the same `queries` items drawn from the
    items every model embeds; plus the share at random.

    Table 1 says which model ranks better; this says why: what each embedding has learned to see.
    """
    common = sorted(set.intersection(*(set(ids) for ids, _ in models.values())))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(common), size=min(queries, len(common)), replace=False)
    values = {a: np.array([hidden[i][a] for i in common]) for a in NEIGHBOUR_ATTRIBUTES}
    out: dict[str, Any] = {"k": k, "queries": len(chosen), "attributes": list(NEIGHBOUR_ATTRIBUTES), "models": {}}
    for name, (ids, vecs) in models.items():
        index = {item: row for row, item in enumerate(ids)}
        pool = l2_normalise(vecs[[index[i] for i in common]])
        sims = pool[chosen] @ pool.T
        sims[np.arange(len(chosen)), chosen] = -np.inf
        neighbours = np.argpartition(-sims, k, axis=1)[:, :k]
        out["models"][name] = {a: round(float((values[a][neighbours] == values[a][chosen, None]).mean()), 4)
                               for a in NEIGHBOUR_ATTRIBUTES}
    out["random"] = {a: round(float(sum((np.unique(values[a], return_counts=True)[1] / len(common)) ** 2)), 4)
                     for a in NEIGHBOUR_ATTRIBUTES}
    return out
