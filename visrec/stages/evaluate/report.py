"""The evaluation report: one self-contained HTML file (chart and pictures embedded as base64).

A reviewer deciding whether to approve a release should see, without opening
anything else: the decision and every gate check, the metrics of all rankings with
their bootstrap intervals, per-category slices, and what the candidate actually
recommends next to the baseline for a few real query items.
"""

from __future__ import annotations

import base64
import html

from visrec.stages.evaluate.metrics import IPS_METRIC, METRICS

RANKING_LABELS = {"candidate": "candidate", "baseline": "baseline (MobileNetV2)", "champion": "champion",
                  "random": "random ranking", "logged_order": "logged order"}
_COLOURS = {"candidate": "#1f77b4", "baseline": "#ff7f0e", "champion": "#2ca02c", "random": "#9e9e9e",
            "logged_order": "#8c564b"}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.deploy{background:#e3f6e3;border:2px solid #2e7d32}.reject{background:#fde7e7;border:2px solid #c62828}
.banner{padding:0.8em 1.2em;font-size:1.3em;margin:1em 0}.pass{color:#2e7d32;font-weight:600}
.fail{color:#c62828;font-weight:600}.ex{display:flex;gap:18px;align-items:flex-start;margin:10px 0;
border-bottom:1px solid #eee;padding-bottom:10px}.row{display:flex;gap:4px}.card{width:112px;font-size:10px;
text-align:center;word-break:break-all}.card img,.card .noimg{width:108px;height:108px;object-fit:contain;
border:2px solid #ddd;background:#fafafa}.card.tapped img,.card.tapped .noimg{border-color:#2e7d32}
.noimg{display:flex;align-items:center;justify-content:center;color:#999}.lbl{font-size:12px;color:#555}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _num(x, signed: bool = False, pct: bool = False) -> str:
    if x is None:
        return "-"
    if pct:
        return f"{x * 100:+.1f}%"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def _ci(ci, signed: bool = False) -> str:
    return "" if not ci else f" <span class=lbl>[{_num(ci[0], signed)}, {_num(ci[1], signed)}]</span>"


def bar_chart_png(per_ranking: dict[str, dict[str, dict]]) -> bytes:
    """Grouped bars: every metric for every ranking, with 95% bootstrap intervals as error bars."""
    import numpy as np

    from visrec.core.plots import figure_png, pyplot

    plt = pyplot()

    names = list(METRICS)
    rankings = [r for r in RANKING_LABELS if r in per_ranking]
    width = 0.8 / len(rankings)
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=100)
    x = np.arange(len(names))
    for i, r in enumerate(rankings):
        means = np.array([per_ranking[r][m]["mean"] for m in names], dtype=float)
        cis = [per_ranking[r][m]["ci95"] for m in names]
        err = None
        if all(cis):
            err = np.array([[mu - c[0] for mu, c in zip(means, cis)], [c[1] - mu for mu, c in zip(means, cis)]])
            err = np.clip(err, 0, None)
        ax.bar(x + (i - (len(rankings) - 1) / 2) * width, means, width, yerr=err, capsize=2,
               label=RANKING_LABELS[r], color=_COLOURS[r])
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean over lists")
    ax.set_title("Offline metrics on impression logs (95% paired-bootstrap intervals)")
    ax.legend(fontsize=8, ncols=len(rankings), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    return figure_png(fig)


def _gate_table(reasons: list[dict]) -> str:
    rows = []
    for r in reasons:
        signed = r["comparison"].startswith("vs_")
        pct = r["comparison"].endswith(".relative")
        cls = "pass" if r["passed"] else "fail"
        rows.append(f"<tr><td>{_e(r.get('slice') or '(all)')}</td><td>{_e(r['metric'] or '-')}</td>"
                    f"<td>{_e(r['comparison'])}</td><td class=num>{_num(r['value'], signed, pct)}</td>"
                    f"<td class=num>{_num(r['limit'], signed, pct)}</td>"
                    f"<td class={cls}>{'pass' if r['passed'] else 'FAIL'}</td><td>{_e(r['message'])}</td></tr>")
    return ("<table><tr><th>slice</th><th>metric</th><th>comparison</th><th>value</th><th>limit</th>"
            "<th>result</th><th>check</th></tr>" + "".join(rows) + "</table>")


def _metrics_table(per_ranking: dict) -> str:
    # The IPS metric is shown beside the paper's, labelled: informative, never gated.
    names = [*METRICS, *([IPS_METRIC] if any(IPS_METRIC in v for v in per_ranking.values()) else [])]
    head = "".join(f"<th>{_e(m)}{' (IPS, not gated)' if m == IPS_METRIC else ''}</th>" for m in names)
    rows = []
    for r in RANKING_LABELS:
        if r not in per_ranking:
            continue
        cells = "".join(f"<td class=num>{_num(per_ranking[r][m]['mean'])}{_ci(per_ranking[r][m]['ci95'])}</td>"
                        if m in per_ranking[r] else "<td>-</td>" for m in names)
        rows.append(f"<tr><th>{_e(RANKING_LABELS[r])}</th>{cells}</tr>")
    return f"<table><tr><th>ranking</th>{head}</tr>{''.join(rows)}</table>"


def _uplift_table(uplift: dict) -> str:
    head = "".join(f"<th>{_e(m)}</th>" for m in METRICS)
    rows = []
    for name, per_metric in uplift.items():
        if name == "slices":
            continue
        cells = "".join(f"<td class=num>{_num(e['absolute'], True)} ({_num(e['relative'], pct=True)})"
                        f"{_ci(e['ci95'], True)}</td>" for e in (per_metric[m] for m in METRICS))
        rows.append(f"<tr><th>{_e(name.replace('_vs_', ' vs '))}</th>{cells}</tr>")
    return f"<table><tr><th>comparison</th>{head}</tr>{''.join(rows)}</table>"


def _slices_table(metrics: dict) -> str:
    slices = (metrics["candidate"].get("slices") or {})
    if not slices:
        return "<p>No slices: pass <code>--listings</code> to slice by top-level category.</p>"
    models = [r for r in ("candidate", "baseline", "champion") if metrics.get(r)]
    head = "".join(f"<th>{_e(r)} {_e(m)}</th>" for m in METRICS for r in models)
    rows = []
    for name, values in slices.items():
        cells = "".join(f"<td class=num>{_num(metrics[r]['slices'][name][m])}</td>" for m in METRICS for r in models)
        rows.append(f"<tr><th>{_e(name)}</th><td class=num>{values['lists']}</td>{cells}</tr>")
    return f"<table><tr><th>top-level category</th><th>lists</th>{head}</tr>{''.join(rows)}</table>"


def _card(card: dict, caption: str = "") -> str:
    cls = "card tapped" if card.get("tapped") else "card"
    if card.get("image"):
        data = base64.b64encode(card["image"]).decode()
        pic = f"<img alt='{_e(card['item_id'])}' src='data:image/jpeg;base64,{data}'>"
    else:
        pic = "<div class=noimg>no image</div>"
    tag = " (tapped)" if card.get("tapped") else ""
    return f"<div class='{cls}'>{pic}<div>{_e(caption)}{_e(card['item_id'])}{tag}</div></div>"


def _examples(examples: list[dict]) -> str:
    if not examples:
        return "<p>No examples.</p>"
    out = ["<p class=lbl>Top 5 by brute-force cosine over each model's embedded catalog (query excluded); "
           "a green frame marks an item users tapped for this query in the logs.</p>"]
    for ex in examples:
        cand = "".join(_card(c) for c in ex["candidate"])
        base = "".join(_card(c) for c in ex["baseline"])
        out.append(f"<div class=ex><div><div class=lbl>query</div>{_card(ex['query'])}</div>"
                   f"<div><div class=lbl>candidate</div><div class=row>{cand}</div>"
                   f"<div class=lbl>baseline</div><div class=row>{base}</div></div></div>")
    return "".join(out)


def render_report(metrics: dict, per_ranking: dict, skipped: dict[str, int], examples: list[dict],
                  inputs: dict) -> str:
    """The whole report as an HTML string.

    metrics: the metrics.json content; per_ranking: ranking -> metric -> {mean, ci95}
    for every ranking incl. random and logged order; skipped: reason -> lists skipped;
    examples: from `visrec.stages.evaluate.evaluation.report_examples`; inputs: what was evaluated.
    """
    decision = metrics["decision"]
    chart = base64.b64encode(bar_chart_png(per_ranking)).decode()
    skipped_txt = ", ".join(f"{_e(k.replace('_', ' '))}: {v}" for k, v in skipped.items())
    inputs_rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in inputs.items())
    passed = sum(r["passed"] for r in metrics["reasons"])
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>visrec evaluation: {_e(decision)}</title>
<style>{_CSS}</style></head><body>
<h1>visrec evaluation report</h1>
<div class="banner {_e(decision)}">Decision: <b>{_e(decision)}</b> &mdash; {passed} of {len(metrics['reasons'])}
gate checks passed</div>
<p>Lists evaluated: <b>{metrics['lists_used']}</b>; skipped: <b>{metrics['lists_skipped']}</b> ({skipped_txt}).
Every ranking is scored on exactly the same lists; equal scores are ordered by a fixed random key per
impression (never by the logged position, which carries the production ranker's signal); a candidate item a
model has no embedding for ranks last.</p>
<h2>Gate</h2>{_gate_table(metrics['reasons'])}
<h2>Metrics</h2>
<img alt="metrics chart" src="data:image/png;base64,{chart}">
{_metrics_table(per_ranking)}
<h2>Uplift (absolute change, relative change, 95% paired-bootstrap interval)</h2>{_uplift_table(metrics['uplift'])}
<h2>Slices by top-level category of the query item</h2>{_slices_table(metrics)}
<h2>Examples: candidate vs baseline</h2>{_examples(examples)}
<h2>Inputs</h2><table>{inputs_rows}</table>
</body></html>
"""
