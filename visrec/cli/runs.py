"""`visrec runs`: how the pipeline's runs ended, as their exit handler recorded it in the registry."""

from __future__ import annotations

import argparse

from visrec.core.tables import format_table

HELP = "list pipeline runs recorded in a registry (state, failed tasks, error), newest last"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", required=True, help="registry directory, local or gs://")
    parser.add_argument("--last", type=int, default=20, help="show this many runs (0: all)")


# Fixed widths, so the runs of one registry line up from one call to the next.
_WIDTHS = (25, 10, len("failed: ") + 24, 0)


def runs_table(rows: list[dict]) -> str:
    """Runs as a fixed-width table; the error of a failed run on its own line, under the state."""
    table: list[tuple[str, ...]] = []
    for r in rows:
        table.append((r["at"], r["state"], f"failed: {','.join(r['failed_tasks']) or '-'}", r["run"]))
        if r.get("error"):
            table.append(("", r["error"][:200]))
    return format_table(table, _WIDTHS)


def run(args: argparse.Namespace) -> int:
    from visrec.orchestration.runs import list_runs

    rows = list_runs(args.registry)
    if args.last:
        rows = rows[-args.last:]
    print(runs_table(rows) if rows else f"no runs recorded in {args.registry}")
    return 1 if rows and rows[-1]["state"] != "SUCCEEDED" else 0
