"""KFP component for stage 5: evaluation against the baseline (and champion) and the gate decision."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(
    interactions: Input[Dataset],
    listings: Input[Dataset],
    candidate: Input[Dataset],
    baseline: Input[Dataset],
    champion_uri: str,
    gate_policy: str,
    bootstrap_resamples: int,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
) -> str:
    """Run `visrec.stages.evaluate.evaluation.run_evaluation`; return the decision (`deploy` | `reject`).

    The pipeline does not branch on this return value but on the `gate_decision` task, whose
    single plain-string output it reads from `evaluation`'s metrics.json: kfp.local skips a
    `dsl.If` on a named output of a multi-output component, and this one also emits artifacts.
    `interactions` / `listings`: the resolved inputs. `champion_uri`: '' when nothing is in
    production. `gate_policy`: the policy's YAML text, '' for the default policy.
    `evaluation` receives metrics.json, report.html and the policy used; `report` is the
    same HTML for the console.
    """
    import os

    from components.artifacts import location, log_metrics
    from visrec.core import io
    from visrec.orchestration.pipeline_config import from_kfp
    from visrec.stages.configs import EvaluateConfig
    from visrec.stages.evaluate.evaluation import run_evaluation

    out_dir = location(evaluation)
    policy_uri = None
    if gate_policy.strip():
        policy_uri = io.join(out_dir, "gate_policy.yaml")
        io.write_text(policy_uri, gate_policy)
    result = run_evaluation(EvaluateConfig(
        interactions_uri=location(interactions), candidate_uri=location(candidate), baseline_uri=location(baseline),
        out_dir=out_dir, champion_uri=champion_uri or None, listings_uri=location(listings), gate_config=policy_uri,
        **from_kfp(EvaluateConfig, bootstrap_resamples=bootstrap_resamples)))
    scores = {k: v for k, v in result.as_dict().items() if k not in ("decision", "reasons") and v is not None}
    log_metrics(metrics, scores)
    metrics.log_metric("deploy", float(result.decision == "deploy"))
    os.makedirs(os.path.dirname(report.path) or ".", exist_ok=True)
    with open(report.path, "wb") as fh:
        fh.write(io.read_bytes(io.join(out_dir, "report.html")))
    return result.decision
