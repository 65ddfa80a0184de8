"""`visrec schedule`: a recurring retraining schedule on Vertex AI Pipelines."""

from __future__ import annotations

import argparse

from visrec.cli.submit import add_vertex_arguments, vertex_config_from_args

HELP = "create a recurring retraining schedule (cron) on Vertex AI Pipelines"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_vertex_arguments(parser)
    parser.add_argument("--cron", required=True, help="five-field cron, e.g. '0 3 * * 1' (optionally 'TZ=Asia/Tokyo ...')")
    parser.add_argument("--name", help="schedule display name")
    parser.add_argument("--max-concurrent-runs", type=int, default=1)
    parser.add_argument("--max-runs", type=int, help="stop after this many runs")


def run(args: argparse.Namespace) -> int:
    from visrec.orchestration.vertex_pipelines import create_schedule

    name = create_schedule(vertex_config_from_args(args), args.cron, args.name,
                           args.max_concurrent_runs, args.max_runs)
    print(f"created schedule {name}")
    return 0
