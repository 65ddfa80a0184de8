"""`visrec approve`: promote a pending release to production, recording who, when and why."""

from __future__ import annotations

import argparse

HELP = ("approve a pending release: record who/when/why in its audit log and make it current "
        "(on Vertex AI: start its canary)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", help="release version (see `visrec releases`)")
    parser.add_argument("--registry", required=True, help="registry directory, local or gs://")
    parser.add_argument("--who", required=True, help="who approves (name or e-mail)")
    parser.add_argument("--why", required=True, help="why (e.g. the review that was done)")


def run(args: argparse.Namespace) -> int:
    from visrec.stages.release.promote import approve_release
    from visrec.stages.release.release import CANARY_STATUS

    result = approve_release(args.registry, args.version, who=args.who, why=args.why)
    where = ("serving as a canary; `visrec promote` it after the bake" if result.status == CANARY_STATUS
             else "now current")
    print(f"approved {result.version} (was {result.previous_status}); {where}")
    return 0
