"""`visrec run-local`: the whole pipeline on this machine with kfp.local."""

from __future__ import annotations

import argparse

HELP = "run the whole pipeline locally with kfp.local (SubprocessRunner) and print a summary"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listings", required=True, help="listings URI (JSONL/CSV/Parquet, local or gs://)")
    parser.add_argument("--interactions", required=True, help="impression-log URI")
    parser.add_argument("--work-dir", required=True, help="pipeline root, tiny models, local registry")
    parser.add_argument("--config", help="run config YAML (default: visrec/configs/local.yaml)")
    parser.add_argument("--param", action="append", metavar="KEY=VALUE", help="override a pipeline parameter")


def run(args: argparse.Namespace) -> int:
    from pipelines.run_local import format_summary, run_local
    from visrec.orchestration.pipeline_config import parse_overrides

    summary = run_local(args.listings, args.interactions, args.work_dir, args.config,
                        parse_overrides(args.param))
    print(format_summary(summary))
    return 0
