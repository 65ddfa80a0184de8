"""`visrec init-models`: stand-ins for the real checkpoints (offline bootstrap): tiny random ones, or with
`--pretrained` a MobileNetV2 pretrained by classification and a SigLIP pretrained contrastively on the
synthetic web corpus, built once and cached by content."""

from __future__ import annotations

import argparse

from visrec.core.defaults import field_defaults

HELP = ("create SigLIP and MobileNetV2 stand-ins (same classes as the real checkpoints) for offline runs and "
        "tests: tiny random ones, or --pretrained ones trained on a synthetic web corpus (cached)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.model.encoders import TinyModelConfig

    parser.add_argument("--out", help="directory (local or gs://) for siglip/ and mobilenet_v2/ (required for "
                                      "random models; with --pretrained, a copy of the cached ones)")
    parser.add_argument("--listings", help="listings (any format) whose titles train the tokenizer (random models)")
    parser.add_argument("--seed", type=int, default=field_defaults(TinyModelConfig)["seed"],
                        help="weight initialisation seed of random models (default: %(default)s)")
    parser.add_argument("--pretrained", action="store_true",
                        help="pretrain both on the synthetic web corpus (MobileNetV2: classification; SigLIP: "
                             "image-caption pairs), or take them from the cache if built before")
    parser.add_argument("--cache-dir", help="the pretrained models' cache (default $VISREC_CACHE_DIR/models, "
                                            "else ~/.cache/visrec/models)")
    parser.add_argument("--rebuild", action="store_true", help="with --pretrained: build again even if cached")


def run(args: argparse.Namespace) -> int:
    from visrec.core.errors import UserError

    if not args.pretrained:
        if not args.out:
            raise UserError("--out is required (or pass --pretrained)")
        from visrec.model.encoders import TinyModelConfig, init_models

        paths = init_models(args.out, listings_uri=args.listings, config=TinyModelConfig(seed=args.seed))
        for kind, path in paths.items():
            print(f"{kind}: {path}")
        return 0
    if args.listings:
        raise UserError("--listings trains a random model's tokenizer; a pretrained SigLIP's comes from its corpus")
    from visrec.sim.pretrain import copy_models, pretrained_models

    models = pretrained_models(cache_dir=args.cache_dir, rebuild=args.rebuild)
    paths = copy_models(models, args.out) if args.out else models.paths
    how = "built now" if models.built_now else "from the cache"
    print(f"pretrained models {models.key} ({how}; building took {models.build_seconds:.0f}s):")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
