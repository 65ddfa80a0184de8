"""`visrec releases`: the releases in a registry, which one is current, their gate metric."""

from __future__ import annotations

import argparse

from visrec.core.tables import format_table

HELP = "list the releases in a registry (version, created, catalog snapshot, status, current, ndcg@5)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", required=True, help="registry directory, local or gs://")


def releases_table(rows: list[dict]) -> str:
    """Releases as a fixed-width table; `*` marks the current one."""
    header = ("", "version", "created", "catalog snapshot", "status", "ndcg@5", "approved by")
    return format_table([header] + [
        ("*" if r["current"] else "", r["version"], r["created_at"] or "-", r["catalog_snapshot_at"] or "-",
         r["status"],
         "-" if r["ndcg@5"] is None else f"{r['ndcg@5']:.4f}", r["approved_by"] or "-")
        for r in rows])


def run(args: argparse.Namespace) -> int:
    from visrec.stages.release.registry import list_releases

    rows = list_releases(args.registry)
    if not rows:
        print(f"no releases in {args.registry}")
        return 0
    print(releases_table(rows))
    return 0
