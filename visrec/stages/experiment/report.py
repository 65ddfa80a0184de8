"""`visrec ab-report`: an A/B experiment's result from the joined interactions.

Users are the unit of assignment, so they are the unit of every interval: per arm, CTR
(taps / impressions) and CVR (purchases / taps) are bootstrapped by resampling users, and the
treatment's relative uplift by dividing the two arms' independent draws. Before any metric is
trusted, the sample-ratio-mismatch test compares the users per arm with the configured share.

The recommendation (`decide`), in this order:
1. `stop`: sample-ratio mismatch (p < `srm_alpha`) or users seen in both arms: assignment or
   logging is broken, so no metric can be trusted.
2. `keep`: an arm has fewer than `min_users` users: keep collecting.
3. `stop`: the CTR uplift's interval lies below 0, or the CVR uplift's does (the guardrail).
4. `promote`: the CTR uplift's interval lies above 0 (and the CVR guardrail held).
5. `keep`: otherwise (the interval contains 0: no detectable difference yet).
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from visrec.core import io
from visrec.core.errors import UserError
from visrec.stages.experiment.assignment import ARMS, CONTROL, TREATMENT
from visrec.stages.experiment.config import ReportConfig
from visrec.stages.experiment.stats import percentile_ci, ratio_bootstrap, srm_p_value

REPORT_JSON, REPORT_HTML = "ab_report.json", "ab_report.html"


@dataclass
class UserTotals:
    """Per arm, one row per user: impressions, taps, purchases."""

    users: dict[str, list[str]]
    counts: dict[str, np.ndarray]  # arm -> (users, 3)
    in_both_arms: int


def user_totals(rows: list[dict[str, Any]]) -> UserTotals:
    """Interactions rows (with `arm`, `user_id` or `session_id`, `tapped`, `purchased`) -> per-user totals."""
    totals: dict[str, dict[str, list[int]]] = {arm: defaultdict(lambda: [0, 0, 0]) for arm in ARMS}
    for row in rows:
        arm = row.get("arm")
        if arm not in ARMS:
            continue
        user = str(row.get("user_id") or row["session_id"])
        cell = totals[arm][user]
        cell[0] += 1
        cell[1] += int(row["tapped"])
        cell[2] += int(row.get("purchased") or 0)
    users = {arm: sorted(totals[arm]) for arm in ARMS}
    counts = {arm: np.array([totals[arm][u] for u in users[arm]], dtype=np.float64).reshape(-1, 3) for arm in ARMS}
    return UserTotals(users, counts, len(set(users[CONTROL]) & set(users[TREATMENT])))


def read_rows(uri: str, experiment: str | None) -> list[dict[str, Any]]:
    """The interactions rows of `uri` (a `dt=` partition, or a prefix of them), of `experiment` only if given."""
    from visrec.data.schema import parse_json_line

    rows = []
    for file in io.list_files(uri, "interactions-*.jsonl"):
        for line in io.read_bytes(file).splitlines():
            row, _ = parse_json_line(line)
            if row is not None and (experiment is None or row.get("experiment") == experiment):
                rows.append(row)
    if not rows:
        raise UserError(f"no interactions rows{' of experiment ' + experiment if experiment else ''} under {uri} "
                        "(run visrec join-events first)")
    return rows


def summarise(totals: UserTotals, share: float, config: ReportConfig) -> dict[str, Any]:
    """Per-arm CTR/CVR with user-level intervals, the treatment's uplifts, SRM, and the decision."""
    rng = np.random.default_rng(config.seed)
    arms: dict[str, Any] = {}
    draws: dict[str, dict[str, np.ndarray]] = {}
    for arm in ARMS:
        c = totals.counts[arm]
        imps, taps, buys = c[:, 0], c[:, 1], c[:, 2]
        draws[arm] = {"ctr": ratio_bootstrap(taps, imps, config.resamples, rng)[:, 0],
                      "cvr": ratio_bootstrap(buys, taps, config.resamples, rng)[:, 0]}
        arms[arm] = {"users": len(totals.users[arm]), "impressions": int(imps.sum()), "taps": int(taps.sum()),
                     "purchases": int(buys.sum()),
                     "ctr": round(taps.sum() / imps.sum(), 6) if imps.sum() else None,
                     "ctr_ci95": percentile_ci(draws[arm]["ctr"]),
                     "cvr": round(buys.sum() / taps.sum(), 6) if taps.sum() else None,
                     "cvr_ci95": percentile_ci(draws[arm]["cvr"])}
    uplift = {}
    for metric in ("ctr", "cvr"):
        base, treated = arms[CONTROL][metric], arms[TREATMENT][metric]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = draws[TREATMENT][metric] / draws[CONTROL][metric] - 1.0
        uplift[metric] = {"relative": round(treated / base - 1.0, 6) if base and treated is not None else None,
                          "ci95": percentile_ci(ratio)}
    srm = srm_p_value((arms[CONTROL]["users"], arms[TREATMENT]["users"]), share)
    decision, why = decide(arms, uplift, srm, totals.in_both_arms, config)
    return {"arms": arms, "uplift": uplift, "share": share, "srm_p_value": round(srm, 6),
            "users_in_both_arms": totals.in_both_arms, "decision": decision, "why": why,
            "resamples": config.resamples}


def decide(arms: dict, uplift: dict, srm: float, in_both: int, config: ReportConfig) -> tuple[str, str]:
    """The recommendation and its reason, by the rule in this module's docstring."""
    if srm < config.srm_alpha:
        return "stop", f"sample-ratio mismatch (p = {srm:.2g} < {config.srm_alpha}): assignment or logging is broken"
    if in_both:
        return "stop", f"{in_both} users were served by both arms: assignment is not per user"
    fewest = min(arms[arm]["users"] for arm in ARMS)
    if fewest < config.min_users:
        return "keep", f"only {fewest} users in an arm (< {config.min_users}): keep collecting"
    ctr_low, ctr_high = uplift["ctr"]["ci95"]
    cvr_low, cvr_high = uplift["cvr"]["ci95"]
    if ctr_high is not None and ctr_high < 0:
        return "stop", f"the treatment lowers CTR (uplift interval [{ctr_low:+.1%}, {ctr_high:+.1%}])"
    if cvr_high is not None and cvr_high < 0:
        return "stop", f"the treatment lowers CVR (uplift interval [{cvr_low:+.1%}, {cvr_high:+.1%}])"
    if ctr_low is not None and ctr_low > 0:
        return "promote", f"CTR uplift interval [{ctr_low:+.1%}, {ctr_high:+.1%}] lies above 0, CVR held"
    return "keep", "the CTR uplift interval contains 0: no detectable difference yet"


def experiment_share(registry: str | None, experiment: str | None, share: float | None) -> tuple[float, str | None]:
    """The treatment share to test the sample ratio against, and the experiment id: given, or the
    registry's running (or, with `experiment`, recorded) experiment's."""
    if share is not None:
        return share, experiment
    if registry is None:
        raise UserError("give --share, or --registry to read the experiment's share")
    from visrec.stages.experiment.control import EXPERIMENTS_LOG, read_experiment

    records = [read_experiment(registry)] if experiment is None else [
        r for r in io.read_jsonl(io.join(registry, EXPERIMENTS_LOG)) if r["id"] == experiment]
    records = [r for r in records if r]
    if not records:
        raise UserError(f"no {'experiment ' + experiment if experiment else 'running experiment'} in {registry}")
    return float(records[-1]["share"]), records[-1]["id"]


def ab_report(config: ReportConfig, registry: str | None = None, experiment: str | None = None,
              share: float | None = None) -> dict[str, Any]:
    """Read, summarise and decide; writes `ab_report.json` and `ab_report.html` to `config.out` when given."""
    share, experiment = experiment_share(registry, experiment, share)
    result = {"experiment": experiment, "logs": config.logs,
              **summarise(user_totals(read_rows(config.logs, experiment)), share, config)}
    if config.out:
        io.write_json(io.join(config.out, REPORT_JSON), result)
        io.write_text(io.join(config.out, REPORT_HTML), render_html(result))
    return result


def _chart_png(result: dict[str, Any]) -> bytes:
    from visrec.core.plots import figure_png, pyplot

    fig, axes = pyplot().subplots(1, 2, figsize=(8, 3.2))
    for ax, metric in zip(axes, ("ctr", "cvr")):
        values = [result["arms"][arm][metric] or 0.0 for arm in ARMS]
        cis = [result["arms"][arm][f"{metric}_ci95"] for arm in ARMS]
        err = np.array([[v - (c[0] if c[0] is not None else v) for v, c in zip(values, cis)],
                        [(c[1] if c[1] is not None else v) - v for v, c in zip(values, cis)]]).clip(0)
        ax.bar(ARMS, values, yerr=err, capsize=4, color=["#ff7f0e", "#1f77b4"])
        ax.set_title(f"{metric.upper()} per arm (95% user bootstrap)")
    fig.tight_layout()
    return figure_png(fig)


def render_html(result: dict[str, Any]) -> str:
    """One self-contained page: the decision, per-arm figures, uplifts, SRM and the chart."""
    from visrec.stages.evaluate.report import _CSS

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:+.1%}"

    def ci(c: list) -> str:
        return "" if not c or c[0] is None else f"[{c[0]:.4f}, {c[1]:.4f}]"

    rows = "".join(
        f"<tr><td>{arm}</td>" + "".join(f"<td class=num>{result['arms'][arm][k]}</td>"
                                        for k in ("users", "impressions", "taps", "purchases"))
        + f"<td class=num>{result['arms'][arm]['ctr']} {ci(result['arms'][arm]['ctr_ci95'])}</td>"
        f"<td class=num>{result['arms'][arm]['cvr']} {ci(result['arms'][arm]['cvr_ci95'])}</td></tr>"
        for arm in ARMS)
    uplift = "".join(f"<tr><td>{m.upper()}</td><td class=num>{pct(u['relative'])}</td>"
                     f"<td class=num>[{pct(u['ci95'][0])}, {pct(u['ci95'][1])}]</td></tr>"
                     for m, u in result["uplift"].items())
    banner = "deploy" if result["decision"] == "promote" else "reject"
    chart = base64.b64encode(_chart_png(result)).decode()
    return (f"<!doctype html><meta charset=utf-8><title>A/B report {html.escape(str(result['experiment']))}</title>"
            f"<style>{_CSS}</style><h1>A/B experiment {html.escape(str(result['experiment']))}</h1>"
            f"<div class='banner {banner}'>Recommendation: <b>{result['decision']}</b> — "
            f"{html.escape(result['why'])}</div>"
            "<table><tr><th>arm</th><th>users</th><th>impressions</th><th>taps</th><th>purchases</th>"
            f"<th>CTR [95%]</th><th>CVR [95%]</th></tr>{rows}</table>"
            f"<table><tr><th>treatment vs control</th><th>uplift</th><th>95% interval</th></tr>{uplift}</table>"
            f"<p>Sample ratio: configured treatment share {result['share']:.0%}, SRM p-value "
            f"{result['srm_p_value']:.3g}; users in both arms: {result['users_in_both_arms']}. Intervals resample "
            f"users ({result['resamples']} resamples).</p><img src='data:image/png;base64,{chart}'>")
