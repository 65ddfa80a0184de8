"""`visrec rollback`: point the registry back at the release that was current before this one."""

from __future__ import annotations

import argparse

HELP = "undo the last production change: abort a running canary, or go back to the previous release"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", required=True, help="registry directory, local or gs://")
    parser.add_argument("--who", help="who rolls back (default: the current user)")
    parser.add_argument("--why", default="rollback", help="why, for the audit log")


def run(args: argparse.Namespace) -> int:
    from visrec.stages.release.promote import rollback
    from visrec.stages.release.registry import active_canary, current_version

    canary = active_canary(args.registry)
    before = canary["version"] if canary else current_version(args.registry)
    version = rollback(args.registry, who=args.who, why=args.why)
    print(f"rolled back{' the canary' if canary else ''}: {before} -> {version}")
    return 0
