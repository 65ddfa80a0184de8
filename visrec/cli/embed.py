"""`visrec embed`: stage 3, Beam batch embedding of every catalog image, then PCA."""

from __future__ import annotations

import argparse

HELP = ("embed every image (prepared Parquet or raw listings) with the SigLIP or MobileNetV2 image encoder "
        "in an Apache Beam pipeline, reduce with PCA, write embeddings-*.parquet and embed_stats.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared dataset dir (data-*.parquet) or a listings file "
                                                      "(JSONL/CSV/Parquet), local or gs://")
    parser.add_argument("--model", required=True, help="image encoder: model dir (local or gs://) or hub id")
    parser.add_argument("--out", required=True, help="output directory, local or gs://")
    parser.add_argument("--kind", choices=("siglip", "mobilenet_v2"), default="siglip",
                        help="model kind: the SigLIP candidate or the MobileNetV2 baseline (default: siglip)")
    parser.add_argument("--pca-dims", type=int, default=128, help="PCA output dimensions; 0 = no PCA (default: 128)")
    parser.add_argument("--pca", metavar="PCA_DIR",
                        help="apply this existing PCA (pca.npz or a dir holding it) instead of fitting one")
    parser.add_argument("--pca-sample", type=int, default=1_000_000,
                        help="at most this many vectors for the PCA fit (default: 1000000)")
    parser.add_argument("--batch-size", type=int, default=64, help="inference batch size (default: 64)")
    parser.add_argument("--min-batch-size", type=int,
                        help="let Beam's adaptive batching go down to this size (default: the batch size)")
    parser.add_argument("--shards", type=int, default=4, help="number of embeddings-*.parquet files (default: 4)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="where the model runs on each worker (default: auto = GPU when present)")
    # No default here: None is EmbedConfig's (bf16 on a GPU worker, fp32 on CPU, decided on the worker).
    parser.add_argument("--precision", choices=("bf16", "fp32"),
                        help="bf16 autocast or fp32 on each worker (default: bf16 on a GPU, fp32 on CPU)")
    parser.add_argument("--share-model", action="store_true",
                        help="one model copy per worker machine shared by its processes (big model, one GPU)")
    parser.add_argument("--runner", default="DirectRunner", help="Beam runner (default: DirectRunner)")
    parser.add_argument("--seed", type=int, default=0, help="selects the PCA sample (default: 0)")
    parser.add_argument("beam_options", nargs=argparse.REMAINDER,
                        help="Beam pipeline options after --, e.g. -- --project=P --region=R --temp_location=gs://...")


def run(args: argparse.Namespace) -> int:
    from visrec.stages.embed import EmbedConfig, run_embed

    beam_options = args.beam_options[1:] if args.beam_options[:1] == ["--"] else args.beam_options
    stats = run_embed(EmbedConfig(
        data_uri=args.data, model_uri=args.model, out_dir=args.out, kind=args.kind, pca_dims=args.pca_dims,
        pca_uri=args.pca, pca_sample_size=args.pca_sample, batch_size=args.batch_size,
        min_batch_size=args.min_batch_size, runner=args.runner, beam_options=beam_options, shards=args.shards,
        device=args.device, precision=args.precision, share_model=args.share_model, seed=args.seed))
    explained = stats["pca_explained_variance"]
    print(f"embedded {stats['items']} items ({stats['rejected']} rejected) to {stats['dims']} dims "
          f"in {stats['seconds']:.1f} s ({stats['items_per_second']:.1f} items/s)"
          + (f"; PCA explains {100 * explained:.1f}% of the variance" if explained is not None else ""))
    print(f"wrote {args.out}/embeddings-*.parquet, {args.out}/embed_stats.json, {args.out}/rejected.jsonl")
    return 0
