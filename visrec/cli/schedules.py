"""`visrec schedules`: list, pause, resume or delete retraining schedules."""

from __future__ import annotations

import argparse

HELP = "list / pause / resume / delete Vertex AI pipeline schedules"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", default="list", choices=["list", "pause", "resume", "delete"])
    parser.add_argument("name", nargs="?", help="schedule display name or resource name")
    parser.add_argument("--project", required=True)
    parser.add_argument("--region", required=True)


def run(args: argparse.Namespace) -> int:
    from visrec.orchestration.vertex_pipelines import manage_schedules

    rows = manage_schedules(args.project, args.region, args.action, args.name)
    for row in rows:
        print(f"{row['display_name']:<32} {row['state']:<12} {row['cron'] or '':<16} {row['name']}")
    if not rows:
        print("no schedules")
    return 0
