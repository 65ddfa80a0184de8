"""`visrec runs`: how the pipeline's runs ended, as their exit handler recorded it in the registry."""

from __future__ import annotations

import argparse

HELP = "list pipeline runs recorded in a registry (state, failed tasks, error), newest last"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", required=True, help="registry directory, local or gs://")
    parser.add_argument("--last", type=int, default=20, help="show this many runs (0: all)")


def format_table(rows: list[dict]) -> str:
    """Runs as a fixed-width table; the error of a failed run on its own line."""
    lines = []
    for r in rows:
        failed = ",".join(r["failed_tasks"]) or "-"
        lines.append(f"{r['at']:<25}  {r['state']:<10}  failed: {failed:<24}  {r['run']}")
        if r.get("error"):
            lines.append(f"{'':<25}  {r['error'][:200]}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from visrec.orchestration.runs import list_runs

    rows = list_runs(args.registry)
    if args.last:
        rows = rows[-args.last:]
    print(format_table(rows) if rows else f"no runs recorded in {args.registry}")
    return 1 if rows and rows[-1]["state"] != "SUCCEEDED" else 0
