"""`visrec join-events`: the service's impression and event logs -> interactions partitions."""

from __future__ import annotations

import argparse

from visrec.cli.flags import add_beam_flags, beam_options
from visrec.core.defaults import field_defaults

HELP = ("join the serving logs' impressions with their taps and purchases into interactions partitions "
        "(OUT/dt=YYYY-MM-DD/) that the pipeline's evaluation reads")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.stages.configs import JoinConfig

    defaults = field_defaults(JoinConfig)
    parser.add_argument("--logs", required=True, help="the service's log root (visrec serve --log-uri), local or gs://")
    parser.add_argument("--out", required=True, help="interactions prefix, e.g. gs://B/data/impressions/")
    parser.add_argument("--date", action="append", dest="dates",
                        help="a day to join, YYYY-MM-DD (repeatable; default: every finished day not joined yet)")
    parser.add_argument("--attribution-hours", type=float, default=defaults["attribution_hours"],
                        help="how long after an impression a tap still counts (default: %(default)s)")
    parser.add_argument("--impressions-from", default=defaults["impressions_from"],
                        help="read impressions from Vertex AI's request-response log table, exported from "
                             "BigQuery as JSON Lines to this prefix, instead of LOGS/impressions")
    parser.add_argument("--shards", type=int, default=defaults["shards"],
                        help="output files per day (default: %(default)s)")
    add_beam_flags(parser, defaults)


def run(args: argparse.Namespace) -> int:
    from visrec.stages.configs import JoinConfig
    from visrec.stages.join_events import join_events

    result = join_events(JoinConfig(logs=args.logs, out=args.out, dates=args.dates,
                                    attribution_hours=args.attribution_hours, shards=args.shards,
                                    impressions_from=args.impressions_from,
                                    runner=args.runner, beam_options=beam_options(args)))
    for day, counts in result.days.items():
        print(f"{day}: {counts['rows']} impressions, {counts['taps']} tapped, {counts['purchases']} purchased, "
              f"{counts['rejected']} rejected -> {counts['partition']}")
    return 0
