"""Gate policy: schema, default policy, decisions and reasons on metrics.json-shaped inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visrec.core.errors import UserError
from visrec.stages.evaluate.gate import (evaluate_gate, format_table, gate_decision_of, gate_refusal, load_policy,
                                         parse_policy, record_rejection)
from visrec.stages.evaluate.metrics import METRICS

REPO = Path(__file__).resolve().parents[1]


def _uplift(value: float, reference: float, ci: tuple[float, float] | None) -> dict:
    return {m: {"value": value, "reference": reference, "absolute": value - reference,
                "relative": (value - reference) / reference, "ci95": list(ci) if ci else None} for m in METRICS}


def metrics(cand: float, base: float, champ: float | None = None, ci: tuple[float, float] | None = None,
            slices: dict[str, tuple[float, float]] | None = None) -> dict:
    """A metrics.json-shaped dict where every metric of a model has the same value."""
    ci = ci if ci is not None else (cand - base - 0.01, cand - base + 0.01)
    out = {"candidate": {m: cand for m in METRICS}, "baseline": {m: base for m in METRICS},
           "champion": {m: champ for m in METRICS} if champ is not None else None,
           "uplift": {"candidate_vs_baseline": _uplift(cand, base, ci)}}
    if champ is not None:
        out["uplift"]["candidate_vs_champion"] = _uplift(cand, champ, (cand - champ - 0.01, cand - champ + 0.01))
    if slices:
        out["candidate"]["slices"] = {n: {"lists": 10, **{m: c for m in METRICS}} for n, (c, _) in slices.items()}
        out["uplift"]["slices"] = {n: {"candidate_vs_baseline": _uplift(c, b, (c - b - 0.01, c - b + 0.01))}
                                   for n, (c, b) in slices.items()}
    return out


def test_the_packaged_gate_yaml_is_the_default_policy():
    assert load_policy(str(REPO / "visrec" / "configs" / "gate.yaml")) == load_policy(None)


def test_default_policy_passes_a_better_candidate():
    decision, reasons = evaluate_gate(load_policy(), metrics(0.60, 0.40))
    assert decision == "deploy"
    assert [r["comparison"] for r in reasons] == ["vs_baseline.absolute", "vs_baseline.ci_lower"]
    assert all(r["passed"] for r in reasons)


@pytest.mark.parametrize("cand", [0.40, 0.35])
def test_default_policy_rejects_an_equal_or_worse_candidate_with_readable_reasons(cand):
    decision, reasons = evaluate_gate(load_policy(), metrics(cand, 0.40, ci=(cand - 0.4 - 0.02, cand - 0.4 + 0.02)))
    assert decision == "reject"
    failed = [r for r in reasons if not r["passed"]]
    assert failed
    assert any("ndcg@5 vs baseline" in r["message"] and "lower bound must be > 0" in r["message"] for r in failed)
    for r in reasons:
        assert set(r) == {"metric", "comparison", "value", "limit", "passed", "message", "slice"}
    assert "FAIL" in format_table(reasons)


def test_equal_point_estimates_with_a_positive_interval_still_fail_the_absolute_check():
    decision, reasons = evaluate_gate(load_policy(), metrics(0.4, 0.4, ci=(0.001, 0.01)))
    assert decision == "reject"
    assert [r["passed"] for r in reasons] == [False, True]


def test_champion_thresholds_apply_only_with_a_champion():
    # 5% below the champion: more than the 1% the default allows.
    decision, reasons = evaluate_gate(load_policy(), metrics(0.60, 0.40, champ=0.63))
    assert decision == "reject"
    champ = [r for r in reasons if r["comparison"] == "vs_champion.relative"]
    assert len(champ) == 1 and not champ[0]["passed"]
    assert champ[0]["value"] == pytest.approx(-0.03 / 0.63)
    assert "-4.76%" in champ[0]["message"] and "-1.00%" in champ[0]["message"]

    # 0.5% below the champion: within the tolerance.
    assert evaluate_gate(load_policy(), metrics(0.597, 0.40, champ=0.60))[0] == "deploy"

    # No champion: the champion threshold is skipped, not failed.
    decision, reasons = evaluate_gate(load_policy(), metrics(0.60, 0.40, champ=None))
    assert decision == "deploy"
    assert not [r for r in reasons if "champion" in r["comparison"]]


def test_no_thresholds_fails_closed():
    for text in ("", "thresholds: {}\n", "thresholds:\n  ndcg@5: {}\n"):
        decision, reasons = evaluate_gate(parse_policy(text), metrics(0.9, 0.1))
        assert decision == "reject"
        assert reasons[0]["comparison"] == "policy" and "fails closed" in reasons[0]["message"]
    # Only champion thresholds and no champion: nothing applies -> fails closed too.
    only_champion = parse_policy("thresholds:\n  ndcg@5:\n    vs_champion: {relative: -0.01}\n")
    decision, reasons = evaluate_gate(only_champion, metrics(0.9, 0.1))
    assert decision == "reject" and "no champion" in reasons[0]["message"]


def test_value_bounds_and_lower_is_better_direction():
    policy = parse_policy("""
thresholds:
  precision@1:
    value: {lower_bound: 0.5, upper_bound: 0.95}
  hit_rate@3:
    direction: lower_is_better
    vs_baseline: {absolute: 0.0, require_ci_improvement: true}
""")
    decision, reasons = evaluate_gate(policy, metrics(0.6, 0.4))
    by = {r["comparison"]: r for r in reasons}
    assert by["value.lower_bound"]["passed"] and by["value.upper_bound"]["passed"]
    # Higher value with lower_is_better is a regression, and so is its interval.
    assert not by["vs_baseline.absolute"]["passed"] and not by["vs_baseline.ci_upper"]["passed"]
    assert decision == "reject"
    assert evaluate_gate(policy, metrics(0.5, 0.55))[0] == "deploy"


def test_require_ci_without_a_bootstrap_fails():
    m = metrics(0.6, 0.4)
    for entry in m["uplift"]["candidate_vs_baseline"].values():
        entry["ci95"] = None
    decision, reasons = evaluate_gate(load_policy(), m)
    assert decision == "reject"
    assert any(r["comparison"] == "vs_baseline.ci" and "no bootstrap interval" in r["message"] for r in reasons)


def test_slices_pass_fail_and_missing():
    policy = parse_policy("""
thresholds:
  ndcg@5: {vs_baseline: {absolute: 0.0}}
slices:
  - top_level_category: Women
  - top_level_category: Men
    thresholds:
      precision@1: {value: {lower_bound: 0.5}}
""")
    ok = metrics(0.6, 0.4, slices={"Women": (0.55, 0.45), "Men": (0.7, 0.3)})
    decision, reasons = evaluate_gate(policy, ok)
    assert decision == "deploy"
    assert {(r["slice"], r["metric"], r["comparison"]) for r in reasons} == {
        (None, "ndcg@5", "vs_baseline.absolute"), ("Women", "ndcg@5", "vs_baseline.absolute"),
        ("Men", "precision@1", "value.lower_bound")}

    worse_slice = metrics(0.6, 0.4, slices={"Women": (0.40, 0.45), "Men": (0.7, 0.3)})
    decision, reasons = evaluate_gate(policy, worse_slice)
    assert decision == "reject"
    assert [r["message"] for r in reasons if not r["passed"]][0].startswith("[Women] ndcg@5 vs baseline")

    missing = metrics(0.6, 0.4, slices={"Women": (0.55, 0.45)})
    decision, reasons = evaluate_gate(policy, missing)
    assert decision == "reject"
    failed = [r for r in reasons if not r["passed"]]
    assert len(failed) == 1 and failed[0]["slice"] == "Men" and failed[0]["comparison"] == "slice.present"
    # Without listings there are no slices at all: every configured slice is missing.
    assert evaluate_gate(policy, metrics(0.6, 0.4))[0] == "reject"


@pytest.mark.parametrize("text, needle", [
    ("thresholds:\n  ndcg@10: {}\n", "ndcg@10"),
    ("thresholds:\n  ndcg@5: {vs_baseline: {absolut: 0.0}}\n", "absolut"),
    ("thresholds:\n  ndcg@5: {direction: up}\n", "direction"),
    ("thresholds:\n  ndcg@5: {vs_baseline: {relative: high}}\n", "relative"),
    ("thresholds:\n  ndcg@5: {vs_baseline: {require_ci_improvement: 'yes please'}}\n", "require_ci_improvement"),
    ("slices:\n  - thresholds: {}\n", "top_level_category"),
    ("tresholds: {}\n", "tresholds"),
    ("thresholds: [\n", "YAML"),
])
def test_schema_errors_name_the_problem(text, needle):
    with pytest.raises(UserError, match=needle.replace("@", ".")):
        parse_policy(text)


def test_missing_policy_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_policy(str(tmp_path / "nope.yaml"))


def test_may_this_candidate_ship_is_re_derived_from_the_reasons(tmp_path):
    """Deploy needs decision `deploy`, at least one checked threshold and every one passed."""
    passed = {"passed": True, "message": "ndcg@5 beats the baseline"}
    failed = {"passed": False, "message": "ndcg@5 does not beat the baseline"}
    assert gate_refusal({"decision": "deploy", "reasons": [passed]}) is None
    assert "rejected this candidate" in gate_refusal({"decision": "reject", "reasons": [failed]})
    assert "fails closed" in gate_refusal({"decision": "deploy", "reasons": []})
    assert "1 threshold(s) failed" in gate_refusal({"decision": "deploy", "reasons": [passed, failed]})
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps({"decision": "deploy", "reasons": [passed, failed],
                                                         "candidate": {"ndcg@5": 0.5, "slices": {}},
                                                         "lists_used": 7}))
    assert gate_decision_of(str(evaluation)) == "reject"  # the branch agrees with the deploy re-check
    path = record_rejection(str(tmp_path / "registry"), str(evaluation))
    [record] = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert record["failed_thresholds"] == [failed] and record["candidate"] == {"ndcg@5": 0.5}
    assert record["lists_used"] == 7 and "1 threshold(s) failed" in record["reason"] and record["at"]
    with pytest.raises(UserError, match="cannot read the evaluation's metrics.json"):
        gate_decision_of(str(tmp_path / "missing"))
