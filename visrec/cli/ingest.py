"""`visrec ingest`: listing events (a watched prefix or Pub/Sub) -> the serving release's journal."""

from __future__ import annotations

import argparse

from visrec.cli.flags import add_beam_flags, add_encoder_placement_flags, beam_options
from visrec.core.defaults import field_defaults

HELP = ("stream listing events (new/changed listing, status or price change, delete) from a watched prefix "
        "of JSON Lines files or a Pub/Sub subscription into the serving release's journal, embedding new "
        "listings' images with the release's encoder and PCA")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.online.ingest_config import IngestConfig

    defaults = field_defaults(IngestConfig)
    parser.add_argument("--release", required=True, help="registry (its CURRENT release) or release dir, local or gs://")
    parser.add_argument("--source", required=True,
                        help="prefix (local or gs://) watched for *.jsonl event files, or a Pub/Sub subscription "
                             "projects/P/subscriptions/S")
    parser.add_argument("--poll-seconds", type=float, default=defaults["poll_seconds"],
                        help="how often a watched prefix is listed (default: %(default)s)")
    parser.add_argument("--max-polls", type=int, default=defaults["max_polls"],
                        help="stop a watched prefix after this many polls (default: run until stopped)")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                        help="most images per encoder call (default: %(default)s)")
    parser.add_argument("--segment-size", type=int, default=defaults["segment_size"],
                        help="most journal entries per append (default: %(default)s)")
    add_encoder_placement_flags(parser, defaults)
    parser.add_argument("--cache-dir", default=defaults["cache_dir"],
                        help="where a gs:// release is downloaded (default: a temporary directory)")
    add_beam_flags(parser, defaults)


def run(args: argparse.Namespace) -> int:
    from visrec.online.ingest import run_ingest
    from visrec.online.ingest_config import IngestConfig

    files = run_ingest(IngestConfig(
        release=args.release, source=args.source, poll_seconds=args.poll_seconds, max_polls=args.max_polls,
        batch_size=args.batch_size, segment_size=args.segment_size, device=args.device, precision=args.precision,
        runner=args.runner, beam_options=beam_options(args), cache_dir=args.cache_dir))
    print(f"ingested {files} event file(s) from {args.source}")
    return 0
