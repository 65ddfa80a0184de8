"""`visrec init-models`: tiny random stand-ins for the real checkpoints (offline bootstrap)."""

from __future__ import annotations

import argparse

from visrec.core.defaults import field_defaults

HELP = ("create tiny randomly initialised SigLIP and MobileNetV2 models (same classes as the real "
        "checkpoints) for offline runs and tests")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.model.encoders import TinyModelConfig

    parser.add_argument("--out", required=True, help="directory (local or gs://) for siglip/ and mobilenet_v2/")
    parser.add_argument("--listings", help="listings (any format) whose titles train the tokenizer")
    parser.add_argument("--seed", type=int, default=field_defaults(TinyModelConfig)["seed"],
                        help="weight initialisation seed (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from visrec.model.encoders import TinyModelConfig, init_models

    paths = init_models(args.out, listings_uri=args.listings, config=TinyModelConfig(seed=args.seed))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
