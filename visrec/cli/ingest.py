"""`visrec ingest`: listing events (a watched prefix or Pub/Sub) -> the serving release's journal."""

from __future__ import annotations

import argparse

from visrec.cli.flags import add_beam_flags, add_encoder_placement_flags, file_defaults, resolve_flags
from visrec.core.defaults import field_defaults
from visrec.core.errors import UserError

HELP = ("stream listing events (new/changed listing, status or price change, delete) from a watched prefix "
        "of JSON Lines files or a Pub/Sub subscription into the serving release's journal, embedding new "
        "listings' images with the release's encoder and PCA, following the registry's CURRENT")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.online.ingest_config import IngestConfig

    defaults = file_defaults({"release": None, "source": None, **field_defaults(IngestConfig)})
    parser.add_argument("--config",
                        help="a run config YAML whose `ingest:` section sets any of these flags (given flags win), "
                             "e.g. visrec/configs/vertex.yaml")
    parser.add_argument("--release", default=defaults["release"],
                        help="registry (its CURRENT release, followed) or release dir, local or gs://")
    parser.add_argument("--source", default=defaults["source"],
                        help="prefix (local or gs://) watched for *.jsonl event files, or a Pub/Sub subscription "
                             "projects/P/subscriptions/S")
    parser.add_argument("--poll-seconds", type=float, default=defaults["poll_seconds"],
                        help="how often a watched prefix is listed (default: %(default)s)")
    parser.add_argument("--max-polls", type=int, default=defaults["max_polls"],
                        help="stop after this many polls (default: run until stopped)")
    parser.add_argument("--follow-seconds", type=float, default=defaults["follow_seconds"],
                        help="how often the registry's CURRENT is re-read (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                        help="most images per encoder call (default: %(default)s)")
    parser.add_argument("--segment-size", type=int, default=defaults["segment_size"],
                        help="most journal entries per append (default: %(default)s)")
    add_encoder_placement_flags(parser, defaults)
    parser.add_argument("--cache-dir", default=defaults["cache_dir"],
                        help="where a gs:// release is downloaded (default: a temporary directory)")
    add_beam_flags(parser, defaults)


def config_from(args: argparse.Namespace):
    """The `IngestConfig` of a command line and its `--config` file's `ingest:` section."""
    from visrec.online.ingest_config import IngestConfig
    from visrec.orchestration.pipeline_config import load_run_config

    section = load_run_config(args.config, "vertex.yaml")["ingest"] if args.config else {}
    values = resolve_flags(args, {"release": None, "source": None, **field_defaults(IngestConfig)}, section)
    missing = [name for name in ("release", "source") if values[name] is None]
    if missing:
        raise UserError(f"visrec ingest needs {' and '.join('--' + m for m in missing)} (a flag or the config's "
                        "ingest: section)")
    return IngestConfig(**values)


def run(args: argparse.Namespace) -> int:
    from visrec.online.ingest import run_ingest

    config = config_from(args)
    files = run_ingest(config)
    print(f"ingested {files} event file(s) from {config.source}")
    return 0
