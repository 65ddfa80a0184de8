"""`visrec evaluate`: offline metrics on impression logs, the evaluation gate and the HTML report."""

from __future__ import annotations

import argparse

from visrec.core.defaults import field_defaults

HELP = ("score candidate vs baseline (and champion) embeddings on impression logs, apply the gate policy, "
        "write metrics.json and report.html (exit 0 whatever the decision)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.stages.configs import EvaluateConfig

    defaults = field_defaults(EvaluateConfig)
    parser.add_argument("--interactions", required=True,
                        help="impression logs (JSON Lines, CSV or Parquet), local or gs://")
    parser.add_argument("--candidate", required=True, help="candidate embeddings directory (visrec embed output)")
    parser.add_argument("--baseline", required=True, help="baseline (MobileNetV2) embeddings directory")
    parser.add_argument("--champion", default=defaults["champion_uri"],
                        help="embeddings of the release now in production (omit before the first)")
    parser.add_argument("--listings", default=defaults["listings_uri"],
                        help="listings file: per-top-level-category slices and report pictures")
    parser.add_argument("--out", required=True, help="output directory for metrics.json and report.html")
    parser.add_argument("--config", default=defaults["gate_config"],
                        help="gate policy YAML (default: the policy in visrec/configs/gate.yaml)")
    parser.add_argument("--bootstrap", type=int, default=defaults["bootstrap_resamples"],
                        help="paired bootstrap resamples, 0 = none (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults["seed"],
                        help="seed of the random ranking, bootstrap and examples (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from visrec.stages.configs import EvaluateConfig
    from visrec.stages.evaluate.evaluation import run_evaluation
    from visrec.stages.evaluate.gate import format_table

    result = run_evaluation(EvaluateConfig(
        interactions_uri=args.interactions, candidate_uri=args.candidate, baseline_uri=args.baseline,
        out_dir=args.out, champion_uri=args.champion, listings_uri=args.listings, gate_config=args.config,
        bootstrap_resamples=args.bootstrap, seed=args.seed))
    print(format_table(result.reasons))
    for reason in result.reasons:
        if not reason["passed"]:
            print(f"FAIL: {reason['message']}")
    print(f"lists used: {result.lists_used}, skipped: {result.lists_skipped}")
    print(f"decision: {result.decision}  ({args.out}/metrics.json, {args.out}/report.html)")
    # The decision is data for the pipeline and the deploy stage, not an error.
    return 0
