"""`visrec compact-journal`: fold a release's serving journal into a snapshot of its state, so a
serving start-up replays only the journal after it (run it from Cloud Scheduler, cron or the
pipeline; serving processes also compact on their own once their tail is long)."""

from __future__ import annotations

import argparse
import json

from visrec.core.defaults import field_defaults

HELP = "fold a release's write journal into a snapshot of its serving state (bounds start-up replay)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.online.config import CompactionConfig

    defaults = field_defaults(CompactionConfig)
    parser.add_argument("--release", required=True,
                        help="release directory, or registry (its CURRENT release), local or gs://")
    parser.add_argument("--version", help="that release of the registry instead of its CURRENT")
    parser.add_argument("--min-tail", type=int, default=defaults["min_tail"],
                        help="write a snapshot only if at least this many journal entries follow the newest one")
    parser.add_argument("--keep", type=int, default=defaults["keep_snapshots"],
                        help="complete snapshots kept, newest first")
    parser.add_argument("--cache-dir", help="where a gs:// release is downloaded")


def run(args: argparse.Namespace) -> int:
    from visrec.core.errors import UserError
    from visrec.online.compaction import compact_journal
    from visrec.online.config import CompactionConfig
    from visrec.stages.release.registry import load_release

    try:
        config = CompactionConfig(min_tail=args.min_tail, keep_snapshots=args.keep)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    result = compact_journal(load_release(args.release, args.cache_dir, version=args.version), config)
    print(json.dumps(result.as_dict(), indent=2))
    return 0
