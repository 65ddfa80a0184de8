"""`visrec rollback`: point the registry back at the release that was current before this one."""

from __future__ import annotations

import argparse

HELP = "roll back to the previous release in production (re-verified first)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", required=True, help="registry directory, local or gs://")
    parser.add_argument("--who", help="who rolls back (default: the current user)")
    parser.add_argument("--why", default="rollback", help="why, for the audit log")


def run(args: argparse.Namespace) -> int:
    from visrec.release import current_version, rollback

    before = current_version(args.registry)
    version = rollback(args.registry, who=args.who, why=args.why)
    print(f"rolled back: {before} -> {version}")
    return 0
