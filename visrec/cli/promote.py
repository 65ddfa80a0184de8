"""`visrec promote`: move all traffic to the Vertex AI canary and make it the champion."""

from __future__ import annotations

import argparse

HELP = "promote the canary to champion (all traffic, aliases, CURRENT), or --auto by the bake policy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.stages.release.promote import BakePolicy

    policy = BakePolicy()
    parser.add_argument("version", nargs="?", help="the canary's version (see `visrec releases`); not with --auto")
    parser.add_argument("--registry", required=True, help="registry directory, gs://")
    parser.add_argument("--who", help="who promotes (name or e-mail); required without --auto")
    parser.add_argument("--why", help="why (e.g. the canary dashboards that were checked); required without --auto")
    parser.add_argument("--skip-smoke-query", action="store_true",
                        help="do not ask the canary's deployed model for similar items first")
    parser.add_argument("--auto", action="store_true",
                        help="promote the active canary only if the bake policy allows it now (for a timer)")
    parser.add_argument("--min-bake-minutes", type=float, default=policy.min_minutes,
                        help="with --auto: minutes the canary must have served first")


def run(args: argparse.Namespace) -> int:
    from visrec.core.errors import UserError
    from visrec.stages.release.promote import BakePolicy, auto_promote, promote_release

    if args.auto:
        if args.version:
            raise UserError("--auto promotes the active canary; give no version")
        result = auto_promote(args.registry, BakePolicy(min_minutes=args.min_bake_minutes,
                                                        smoke_query=not args.skip_smoke_query))
        if result is None:
            print("nothing promoted: no canary, or it has not baked long enough")
            return 0
    else:
        if not args.version or not args.who or not args.why:
            raise UserError("promote needs VERSION, --who and --why (or --auto)")
        result = promote_release(args.registry, args.version, who=args.who, why=args.why,
                                 smoke_query=not args.skip_smoke_query)
    print(f"promoted {result.version} (was {result.previous}) after {result.baked_minutes:.0f} min "
          "at canary; now champion with all traffic")
    return 0
