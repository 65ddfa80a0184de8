"""`visrec resolve-data`: what a run would read for each data input, and its content fingerprint."""

from __future__ import annotations

import argparse

from visrec.core.defaults import field_defaults

HELP = ("resolve data inputs (a file, a prefix, or the newest complete <key>=<value> partition of a prefix) and "
        "print what a run reads and a fingerprint of those files, one JSON object per input")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.data.datasource import ResolveConfig

    defaults = field_defaults(ResolveConfig)
    parser.add_argument("uris", nargs="+", metavar="URI",
                        help="listings or impression-log file or directory/prefix, local or gs://")
    parser.add_argument("--partition-key", default=defaults["partition_key"],
                        help="key of Hive-style <key>=<value>/ partitions (default: %(default)s)")
    parser.add_argument("--done-marker", default=defaults["done_marker"],
                        help="file that marks a partition complete (default: %(default)s; "
                             "'' = any partition holding a data file)")
    parser.add_argument("--out", help="also write the results as a JSON list to this file, local or gs://")


def run(args: argparse.Namespace) -> int:
    import json

    from visrec.core import io
    from visrec.data.datasource import ResolveConfig, resolve_input

    config = ResolveConfig(partition_key=args.partition_key, done_marker=args.done_marker)
    results = [resolve_input(uri, config).as_dict() for uri in args.uris]
    for result in results:
        print(json.dumps(result, ensure_ascii=False))
    if args.out:
        io.write_json(args.out, results)
    return 0
