"""The study's PNG figures: Table 1, the PCA trade-off and the A/B test, with their intervals."""

from __future__ import annotations

import numpy as np

from visrec.sim.study.config import ARMS


def plot_table1(rows: list[dict]) -> bytes:
    from visrec.core.plots import figure_png, pyplot

    plt = pyplot()

    metrics = ("ndcg@5", "precision@1", "precision@3")
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        means = [row["metrics"][m]["mean"] for m in metrics]
        cis = [row["metrics"][m]["ci95"] or [mu, mu] for m, mu in zip(metrics, means)]
        err = np.array([[mu - c[0] for mu, c in zip(means, cis)], [c[1] - mu for mu, c in zip(means, cis)]])
        ax.bar(np.arange(len(metrics)) + (i - (len(rows) - 1) / 2) * width, means, width, yerr=err, capsize=3,
               label=row["label"])
    ax.set_xticks(np.arange(len(metrics)), metrics)
    ax.set_ylabel("mean over impression lists")
    ax.set_title("Table 1 on synthetic data (95% bootstrap intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def plot_tradeoff(points: list[dict]) -> bytes:
    from visrec.core.plots import figure_png, pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [p["bytes_per_item"] for p in points]
    y = [p["ndcg@5"] for p in points]
    err = np.array([[p["ndcg@5"] - (p["ndcg@5_ci95"] or [p["ndcg@5"]] * 2)[0] for p in points],
                    [(p["ndcg@5_ci95"] or [p["ndcg@5"]] * 2)[1] - p["ndcg@5"] for p in points]])
    ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3)
    for p in points:
        ax.annotate(p["label"], (p["bytes_per_item"], p["ndcg@5"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("index bytes per item (measured)")
    ax.set_ylabel("nDCG@5")
    ax.set_title("PCA trade-off (synthetic data)")
    fig.tight_layout()
    return figure_png(fig)


def plot_ab(summary: dict) -> bytes:
    from visrec.core.plots import figure_png, pyplot

    plt = pyplot()

    names = list(summary["variants"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, arm in enumerate(ARMS):
        ctr = [summary["variants"][n][arm]["ctr"] for n in names]
        ci = [summary["variants"][n][arm]["ctr_ci95"] for n in names]
        err = np.array([[c - lo[0] for c, lo in zip(ctr, ci)], [lo[1] - c for c, lo in zip(ctr, ci)]])
        ax.bar(np.arange(len(names)) + (i - 0.5) * 0.4, ctr, 0.4, yerr=err, capsize=3, label=arm)
    ax.set_xticks(np.arange(len(names)), names, fontsize=8)
    ax.set_ylabel("simulated CTR (taps / impressions)")
    ax.set_title("Simulated A/B test (hidden user model, synthetic data)")
    ax.legend()
    fig.tight_layout()
    return figure_png(fig)
