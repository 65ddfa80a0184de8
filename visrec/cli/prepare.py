"""`visrec prepare`: stage 1, listings -> sharded Parquet image-title pairs (Apache Beam)."""

from __future__ import annotations

import argparse
import json

from visrec.cli.flags import add_beam_flags, beam_options
from visrec.core.defaults import field_defaults

HELP = ("validate listings, drop reserved/duplicate/bad-image rows, resize images and write sharded Parquet "
        "train/val pairs, rejected.jsonl and stats.json (Apache Beam; extra Beam flags after `--`)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.stages.configs import PrepareConfig

    defaults = field_defaults(PrepareConfig)
    parser.add_argument("--listings", required=True,
                        help="listings .jsonl/.csv/.parquet file or a directory of them, local or gs://")
    parser.add_argument("--out", required=True, help="output directory, local or gs://")
    parser.add_argument("--max-pairs", type=int, default=defaults["max_pairs"],
                        help="keep at most N pairs, chosen by hash(item_id, seed) (default: all)")
    parser.add_argument("--val-fraction", type=float, default=defaults["val_fraction"],
                        help="share of items in the validation split (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults["seed"],
                        help="seed of the sampling and split hashes (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=defaults["image_size"],
                        help="output images are N x N, aspect kept, padded (default: %(default)s)")
    parser.add_argument("--jpeg-quality", type=int, default=defaults["jpeg_quality"],
                        help="JPEG quality of the stored images (default: %(default)s)")
    parser.add_argument("--shards", type=int, default=defaults["shards"],
                        help="number of Parquet files (default: %(default)s)")
    parser.add_argument("--direct-workers", type=int, default=1,
                        help="DirectRunner worker processes (>1: --direct_running_mode=multi_processing)")
    add_beam_flags(parser, defaults)


def beam_flags(args: argparse.Namespace) -> list[str]:
    """The Beam flags a command line asks for: the ones after `--`, plus `--direct-workers`."""
    flags = beam_options(args)
    if args.runner == "DirectRunner" and args.direct_workers > 1:
        flags += [f"--direct_num_workers={args.direct_workers}", "--direct_running_mode=multi_processing"]
    return flags


def run(args: argparse.Namespace) -> int:
    from visrec.stages.configs import PrepareConfig
    from visrec.stages.prepare import run_prepare

    stats = run_prepare(PrepareConfig(
        listings_uri=args.listings, out_dir=args.out, max_pairs=args.max_pairs, val_fraction=args.val_fraction,
        seed=args.seed, image_size=args.image_size, jpeg_quality=args.jpeg_quality, shards=args.shards,
        runner=args.runner, beam_options=beam_flags(args)))
    print(json.dumps(stats.as_dict(), indent=2, ensure_ascii=False))
    return 0
