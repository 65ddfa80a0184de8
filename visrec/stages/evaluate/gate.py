"""The evaluation gate: a YAML policy of thresholds, checked against `metrics.json`.

In the spirit of TFX/TFMA model validation: per metric an optional bound on the
candidate's own value and optional change thresholds versus the baseline
(MobileNetV2) and versus the champion (the release in production), each with a
direction and an absolute and/or relative size, optionally requiring the paired
bootstrap interval to show a real improvement. Slices (per top-level category)
repeat the checks on their lists; a configured slice without lists fails. With
no champion the champion thresholds are skipped; with nothing left to check the
gate fails closed. The schema is documented in `docs/gate.md`; the default
policy is `visrec/configs/gate.yaml`, shipped as package data.

The gate also answers, from an evaluation's `metrics.json`, whether a candidate may
ship (`gate_refusal`, `gate_decision_of`): the pipeline's branch and every deploy and
promotion ask it, so they can never disagree. A rejected candidate is recorded in its
registry's `rejections.jsonl` (`record_rejection`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from visrec.core import io, tables
from visrec.core.clock import utc_now
from visrec.core.errors import UserError
from visrec.stages.evaluate.metrics import METRICS

log = logging.getLogger(__name__)

HIGHER = "higher_is_better"
LOWER = "lower_is_better"
DEPLOY = "deploy"
REJECT = "reject"
METRICS_FILE = "metrics.json"
REJECTIONS = "rejections.jsonl"


@dataclass(frozen=True)
class ChangeThreshold:
    """The candidate's change versus a reference model must be better than these limits.

    `absolute` limits `candidate - reference`, `relative` limits
    `(candidate - reference) / |reference|`; for higher-is-better metrics the change
    must be strictly greater than the limit, for lower-is-better strictly smaller.
    `require_ci_improvement`: the 95% bootstrap interval of the absolute change
    must lie strictly on the better side of 0.
    """

    absolute: float | None = None
    relative: float | None = None
    require_ci_improvement: bool = False

    def is_empty(self) -> bool:
        return self.absolute is None and self.relative is None and not self.require_ci_improvement


@dataclass(frozen=True)
class MetricThreshold:
    """Every check configured for one metric."""

    metric: str
    direction: str = HIGHER
    lower_bound: float | None = None
    upper_bound: float | None = None
    vs_baseline: ChangeThreshold = field(default_factory=ChangeThreshold)
    vs_champion: ChangeThreshold = field(default_factory=ChangeThreshold)


@dataclass(frozen=True)
class SliceSpec:
    """Queries of one top-level category, checked with their own (or the overall) thresholds."""

    top_level_category: str
    thresholds: tuple[MetricThreshold, ...]


@dataclass(frozen=True)
class GatePolicy:
    thresholds: tuple[MetricThreshold, ...] = ()
    slices: tuple[SliceSpec, ...] = ()


# ---------------------------------------------------------------- parsing

def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"gate policy: {where} must be a finite number, got {value!r}")
    return float(value)


def _mapping(value: Any, where: str, allowed: set[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"gate policy: {where} must be a mapping, got {type(value).__name__}")
    unknown = set(value) - allowed
    if unknown:
        raise UserError(f"gate policy: unknown key(s) {sorted(unknown)} in {where}; allowed: {sorted(allowed)}")
    return value


def _change(value: Any, where: str) -> ChangeThreshold:
    spec = _mapping(value, where, {"absolute", "relative", "require_ci_improvement"})
    ci = spec.get("require_ci_improvement", False)
    if not isinstance(ci, bool):
        raise UserError(f"gate policy: {where}.require_ci_improvement must be true or false, got {ci!r}")
    return ChangeThreshold(
        absolute=_number(spec["absolute"], f"{where}.absolute") if spec.get("absolute") is not None else None,
        relative=_number(spec["relative"], f"{where}.relative") if spec.get("relative") is not None else None,
        require_ci_improvement=ci,
    )


def _thresholds(value: Any, where: str) -> tuple[MetricThreshold, ...]:
    spec = _mapping(value, where, set(METRICS))
    out = []
    for metric, body in spec.items():
        w = f"{where}.{metric}"
        body = _mapping(body, w, {"direction", "value", "vs_baseline", "vs_champion"})
        direction = body.get("direction", HIGHER)
        if direction not in (HIGHER, LOWER):
            raise UserError(f"gate policy: {w}.direction must be {HIGHER} or {LOWER}, got {direction!r}")
        bounds = _mapping(body.get("value"), f"{w}.value", {"lower_bound", "upper_bound"})
        out.append(MetricThreshold(
            metric=metric,
            direction=direction,
            lower_bound=_number(bounds["lower_bound"], f"{w}.value.lower_bound")
            if bounds.get("lower_bound") is not None else None,
            upper_bound=_number(bounds["upper_bound"], f"{w}.value.upper_bound")
            if bounds.get("upper_bound") is not None else None,
            vs_baseline=_change(body.get("vs_baseline"), f"{w}.vs_baseline"),
            vs_champion=_change(body.get("vs_champion"), f"{w}.vs_champion"),
        ))
    return tuple(out)


def parse_policy(text: str, source: str = "<policy>") -> GatePolicy:
    """A `GatePolicy` from YAML text; `UserError` naming the bad key on any schema error.

    Unknown keys and metric names are errors, not ignored: a typo in a gate must
    never silently loosen it. Empty text is a policy without thresholds (fails closed).
    """
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"gate policy {source}: not valid YAML: {exc}") from exc
    doc = _mapping(doc, source, {"thresholds", "slices"})
    overall = _thresholds(doc.get("thresholds"), "thresholds")
    slices_doc = doc.get("slices") or []
    if not isinstance(slices_doc, list):
        raise UserError("gate policy: slices must be a list of {top_level_category, thresholds}")
    slices = []
    for i, entry in enumerate(slices_doc):
        entry = _mapping(entry, f"slices[{i}]", {"top_level_category", "thresholds"})
        name = entry.get("top_level_category")
        if not isinstance(name, str) or not name:
            raise UserError(f"gate policy: slices[{i}].top_level_category must be a non-empty string")
        own = entry.get("thresholds")
        slices.append(SliceSpec(name, _thresholds(own, f"slices[{i}].thresholds") if own is not None else overall))
    return GatePolicy(thresholds=overall, slices=tuple(slices))


DEFAULT_POLICY = "default policy (visrec/configs/gate.yaml)"


def read_policy_text(uri: str | None = None) -> str:
    """The policy YAML at `uri` (local or `gs://`); the packaged default policy when None."""
    if uri is None:
        return io.packaged_config("gate.yaml")
    try:
        return io.read_text(uri)
    except FileNotFoundError as exc:
        raise UserError(f"gate policy not found: {uri}") from exc


def load_policy(uri: str | None = None) -> GatePolicy:
    """The parsed policy at `uri`; the default policy when None."""
    return parse_policy(read_policy_text(uri), uri or DEFAULT_POLICY)


# ---------------------------------------------------------------- checking

def _reason(metric: str | None, comparison: str, value: Any, limit: Any, passed: bool, message: str,
            slice_name: str | None) -> dict:
    return {"metric": metric, "comparison": comparison, "value": value, "limit": limit,
            "passed": bool(passed), "message": message, "slice": slice_name}


def _fmt(x: float, pct: bool = False) -> str:
    return f"{x * 100:+.2f}%" if pct else f"{x:+.4f}"


def _relative(value: float, reference: float) -> float:
    if reference != 0:
        return (value - reference) / abs(reference)
    return 0.0 if value == reference else math.copysign(math.inf, value - reference)


def _check_metric(t: MetricThreshold, values: dict, uplift: dict, slice_name: str | None) -> list[dict]:
    """All checks of one metric threshold on one set of values (overall or a slice)."""
    prefix = f"[{slice_name}] " if slice_name else ""
    m = t.metric
    value = float(values[m])
    higher = t.direction == HIGHER
    better = (lambda change, limit: change > limit) if higher else (lambda change, limit: change < limit)
    op = ">" if higher else "<"
    out = []
    if t.lower_bound is not None:
        ok = value >= t.lower_bound
        out.append(_reason(m, "value.lower_bound", value, t.lower_bound, ok,
                           f"{prefix}{m} = {value:.4f} must be >= {t.lower_bound:.4f}", slice_name))
    if t.upper_bound is not None:
        ok = value <= t.upper_bound
        out.append(_reason(m, "value.upper_bound", value, t.upper_bound, ok,
                           f"{prefix}{m} = {value:.4f} must be <= {t.upper_bound:.4f}", slice_name))
    for ref_name, change in (("baseline", t.vs_baseline), ("champion", t.vs_champion)):
        ref_values = uplift.get(f"candidate_vs_{ref_name}")
        if change.is_empty() or ref_values is None:
            continue  # no champion yet (no comparison computed): only baseline and value thresholds apply
        entry = ref_values[m]
        ref = float(entry["reference"])
        if change.absolute is not None:
            delta = value - ref
            out.append(_reason(m, f"vs_{ref_name}.absolute", delta, change.absolute, better(delta, change.absolute),
                               f"{prefix}{m} vs {ref_name}: change {_fmt(delta)} ({value:.4f} vs {ref:.4f}) "
                               f"must be {op} {_fmt(change.absolute)}", slice_name))
        if change.relative is not None:
            rel = _relative(value, ref)
            out.append(_reason(m, f"vs_{ref_name}.relative", rel, change.relative, better(rel, change.relative),
                               f"{prefix}{m} vs {ref_name}: relative change {_fmt(rel, pct=True)} "
                               f"({value:.4f} vs {ref:.4f}) must be {op} {_fmt(change.relative, pct=True)}",
                               slice_name))
        if change.require_ci_improvement:
            ci = entry.get("ci95")
            if ci is None:
                out.append(_reason(m, f"vs_{ref_name}.ci", None, 0.0, False,
                                   f"{prefix}{m} vs {ref_name}: no bootstrap interval (0 resamples), "
                                   f"an improvement cannot be shown", slice_name))
                continue
            bound = float(ci[0] if higher else ci[1])
            side = "lower" if higher else "upper"
            out.append(_reason(m, f"vs_{ref_name}.ci_{side}", bound, 0.0, better(bound, 0.0),
                               f"{prefix}{m} vs {ref_name}: 95% interval of the change "
                               f"[{_fmt(ci[0])}, {_fmt(ci[1])}]: {side} bound must be {op} 0", slice_name))
    return out


def evaluate_gate(policy: GatePolicy, metrics: dict) -> tuple[str, list[dict]]:
    """Check `policy` against a metrics.json-shaped dict -> (`deploy` | `reject`, reasons).

    Every configured threshold that applies yields one reason (metric, comparison,
    value, limit, passed, message, slice). The decision is `deploy` only if there is
    at least one reason and all passed: no applicable thresholds fails closed.
    """
    champion = metrics.get("champion")
    reasons: list[dict] = []
    for t in policy.thresholds:
        reasons += _check_metric(t, metrics["candidate"], metrics["uplift"], None)
    slice_values = metrics["candidate"].get("slices") or {}
    slice_uplift = metrics["uplift"].get("slices") or {}
    for s in policy.slices:
        name = s.top_level_category
        lists = int((slice_values.get(name) or {}).get("lists", 0))
        if lists == 0:
            reasons.append(_reason(None, "slice.present", 0, 1, False,
                                   f"[{name}] slice has no evaluated lists (a configured slice must be present; "
                                   f"pass --listings so queries get a category)", name))
            continue
        for t in s.thresholds:
            reasons += _check_metric(t, slice_values[name], slice_uplift.get(name, {}), name)
    if not reasons:
        skipped = " (champion thresholds skipped: no champion)" if champion is None else ""
        reasons.append(_reason(None, "policy", None, None, False,
                               f"no applicable thresholds configured{skipped}: the gate fails closed", None))
    decision = DEPLOY if all(r["passed"] for r in reasons) else REJECT
    return decision, reasons


def format_table(reasons: list[dict]) -> str:
    """The reasons as a fixed-width text table (what the CLI prints)."""
    rows = [("slice", "metric", "comparison", "value", "limit", "result")]
    for r in reasons:
        signed = r["comparison"].startswith("vs_")  # changes print with their sign
        val = "-" if r["value"] is None else f"{r['value']:+.4f}" if signed else f"{r['value']:.4f}"
        lim = "-" if r["limit"] is None else f"{r['limit']:+.4f}"
        rows.append((r.get("slice") or "(all)", r["metric"] or "-", r["comparison"], val, lim,
                     "pass" if r["passed"] else "FAIL"))
    return tables.format_table(rows, rule=True)


# ---------------------------------------------------------------- may this candidate ship?

def read_metrics(uri: str) -> dict[str, Any]:
    """An evaluation's metrics.json; `UserError` if it is missing or not a JSON object."""
    try:
        metrics = io.read_json(uri)
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the evaluation's metrics.json at {uri}: {exc}") from exc
    if not isinstance(metrics, dict):
        raise UserError(f"{uri} is not a metrics.json object")
    return metrics


def gate_refusal(metrics: dict[str, Any]) -> str | None:
    """Why `metrics` (an evaluation's metrics.json) forbids deployment, or None if it allows it.

    Re-derived from the reasons rather than trusting `decision` alone: a deploy needs
    decision `deploy`, at least one checked threshold, and every threshold passed.
    """
    decision = metrics.get("decision")
    reasons = metrics.get("reasons") or []
    failed = [r for r in reasons if not r.get("passed")]
    if decision != DEPLOY:
        detail = "; ".join(r.get("message", str(r)) for r in failed) or "no reasons given"
        return f"the evaluation gate rejected this candidate (decision={decision!r}): {detail}"
    if not reasons:
        return "metrics.json says deploy but lists no checked thresholds (the gate fails closed)"
    if failed:
        detail = "; ".join(r.get("message", str(r)) for r in failed)
        return f"metrics.json says deploy but {len(failed)} threshold(s) failed: {detail}"
    return None


def gate_decision_of(evaluation_dir: str) -> str:
    """The decision (`deploy` | `reject`) in an evaluation directory's metrics.json.

    `deploy` only when `gate_refusal` agrees, so the pipeline branch and the deploy
    step can never disagree about a candidate.
    """
    metrics = read_metrics(io.join(evaluation_dir, METRICS_FILE))
    return REJECT if gate_refusal(metrics) else DEPLOY


def record_rejection(registry: str, evaluation_dir: str) -> str:
    """Append a rejected candidate's gate result to `REGISTRY/rejections.jsonl`; returns that path.

    Rejections are kept beside the releases so that "why did last Monday's retraining
    not ship?" is answered from the registry alone.
    """
    metrics = read_metrics(io.join(evaluation_dir, METRICS_FILE))
    failed = [r for r in metrics.get("reasons") or [] if not r.get("passed")]
    path = io.join(registry, REJECTIONS)
    io.append_jsonl(path, {"at": utc_now(), "evaluation": evaluation_dir, "decision": metrics.get("decision"),
                         "reason": gate_refusal(metrics), "failed_thresholds": failed,
                         "candidate": {k: v for k, v in (metrics.get("candidate") or {}).items()
                                       if isinstance(v, (int, float))},
                         "lists_used": metrics.get("lists_used")})
    log.info("recorded rejected candidate in %s", path)
    return path
