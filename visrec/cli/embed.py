"""`visrec embed`: stage 3, Beam batch embedding of every catalog image, then PCA."""

from __future__ import annotations

import argparse

from visrec.cli.flags import add_beam_flags, add_encoder_placement_flags, beam_options
from visrec.core.defaults import field_defaults

HELP = ("embed every image (prepared Parquet or raw listings) with the SigLIP or MobileNetV2 image encoder "
        "in an Apache Beam pipeline, reduce with PCA, write embeddings-*.parquet and embed_stats.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.model.encoders import KINDS
    from visrec.stages.configs import EmbedConfig

    defaults = field_defaults(EmbedConfig)
    parser.add_argument("--data", required=True, help="prepared dataset dir (data-*.parquet) or a listings file "
                                                      "(JSONL/CSV/Parquet), local or gs://")
    parser.add_argument("--model", required=True, help="image encoder: model dir (local or gs://) or hub id")
    parser.add_argument("--out", required=True, help="output directory, local or gs://")
    parser.add_argument("--kind", choices=KINDS, default=defaults["kind"],
                        help="model kind: the SigLIP candidate or the MobileNetV2 baseline (default: the checkpoint's "
                             "own, from its config.json; a kind given must be the checkpoint's)")
    parser.add_argument("--pca-dims", type=int, default=defaults["pca_dims"],
                        help="PCA output dimensions; 0 = no PCA (default: %(default)s)")
    parser.add_argument("--pca", metavar="PCA_DIR", default=defaults["pca_uri"],
                        help="apply this existing PCA (pca.npz or a dir holding it) instead of fitting one")
    parser.add_argument("--pca-sample", type=int, default=defaults["pca_sample_size"],
                        help="at most this many vectors for the PCA fit (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                        help="inference batch size (default: %(default)s)")
    parser.add_argument("--min-batch-size", type=int, default=defaults["min_batch_size"],
                        help="let Beam's adaptive batching go down to this size (default: the batch size)")
    parser.add_argument("--shards", type=int, default=defaults["shards"],
                        help="number of embeddings-*.parquet files (default: %(default)s)")
    add_encoder_placement_flags(parser, defaults)
    parser.add_argument("--share-model", action="store_true", default=defaults["share_model"],
                        help="one model copy per worker machine shared by its processes (big model, one GPU)")
    parser.add_argument("--seed", type=int, default=defaults["seed"],
                        help="selects the PCA sample (default: %(default)s)")
    add_beam_flags(parser, defaults)


def run(args: argparse.Namespace) -> int:
    from visrec.stages.configs import EmbedConfig
    from visrec.stages.embed import run_embed

    stats = run_embed(EmbedConfig(
        data_uri=args.data, model_uri=args.model, out_dir=args.out, kind=args.kind, pca_dims=args.pca_dims,
        pca_uri=args.pca, pca_sample_size=args.pca_sample, batch_size=args.batch_size,
        min_batch_size=args.min_batch_size, runner=args.runner, beam_options=beam_options(args), shards=args.shards,
        device=args.device, precision=args.precision, share_model=args.share_model, seed=args.seed))
    explained = stats.pca_explained_variance
    print(f"embedded {stats.items} items ({stats.rejected} rejected) to {stats.dims} dims "
          f"in {stats.seconds:.1f} s ({stats.items_per_second:.1f} items/s)"
          + (f"; PCA explains {100 * explained:.1f}% of the variance" if explained is not None else ""))
    print(f"wrote {args.out}/embeddings-*.parquet, {args.out}/embed_stats.json, {args.out}/rejected.jsonl")
    return 0
