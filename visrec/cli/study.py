"""`visrec study`: the paper's offline study (Table 1, PCA trade-off, simulated A/B test) on synthetic data."""

from __future__ import annotations

import argparse
import shlex
import sys

from visrec.core.defaults import field_defaults

HELP = ("reproduce the paper's offline study on a generated marketplace: Table 1, the PCA trade-off and a "
        "simulated A/B test against real serving processes (synthetic data, not the paper's figures)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.sim.study.config import PCA_DIMS, StudyConfig

    d = field_defaults(StudyConfig)
    parser.add_argument("--out", required=True, help="the folder everything is written to (local)")
    parser.add_argument("--items", type=int, default=d["items"], help="marketplace size (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d["seed"], help="seed of data, training, bootstrap and traffic")
    parser.add_argument("--image-size", type=int, default=d["image_size"], help="rendered photo size in px")
    parser.add_argument("--marketplace", help="reuse a `visrec demo-data` directory instead of generating one")
    parser.add_argument("--models", help="reuse a `visrec init-models` directory instead of creating one")
    parser.add_argument("--random-init", action="store_true",
                        help="start from tiny random models instead of the ones pretrained on the synthetic web "
                             "corpus (`visrec init-models --pretrained`, cached)")
    parser.add_argument("--cache-dir", help="the pretrained models' cache (default $VISREC_CACHE_DIR/models, "
                                            "else ~/.cache/visrec/models)")
    parser.add_argument("--full-size", action="store_true",
                        help="SigLIP ViT-B/16-256 + MobileNetV2 1.4 architectures with random weights (needs a GPU)")
    parser.add_argument("--siglip-model", help="a real SigLIP checkpoint (hub id, local or gs:// dir)")
    parser.add_argument("--baseline-model", help="a real MobileNetV2 checkpoint, e.g. google/mobilenet_v2_1.4_224")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default 5, the paper's)")
    parser.add_argument("--batch-size", type=int, help="default 64 CPU stand-ins, 256 full size")
    parser.add_argument("--lr", type=float, help="default 1e-3 CPU stand-ins (far from converged), 5e-5 full size")
    parser.add_argument("--shuffled-titles-control", action="store_true",
                        help="also fine-tune a negative control on the titles shuffled between items, which the "
                             "gate must reject (one more prepare, fine-tuning and embedding)")
    parser.add_argument("--pca-dims", type=int, nargs="+", default=list(PCA_DIMS),
                        help=f"PCA sizes of the trade-off (default {' '.join(map(str, PCA_DIMS))})")
    parser.add_argument("--bootstrap", type=int, default=d["bootstrap_resamples"], help="bootstrap resamples")
    parser.add_argument("--ab-users", type=int, default=d["ab_users"], help="simulated users")
    parser.add_argument("--ab-sessions-per-user", type=int, default=d["ab_sessions_per_user"],
                        help="page views per simulated user")
    parser.add_argument("--ab-k", type=int, default=d["ab_k"], help="recommendations per page view")
    parser.add_argument("--workers", type=int, default=d["workers"], help="processes rendering images")
    parser.add_argument("--device", help="torch device for training and embedding (default: GPU if any)")
    parser.add_argument("--resume", action="store_true", help="reuse stages an earlier run in --out finished")


def config_from_args(args: argparse.Namespace):
    """The `StudyConfig` these flags describe (bench/study.py parses the same flags)."""
    from visrec.sim.study.config import StudyConfig

    return StudyConfig(
        out_dir=args.out, items=args.items, seed=args.seed, image_size=args.image_size,
        marketplace_dir=args.marketplace, models_dir=args.models, pretrained=not args.random_init,
        cache_dir=args.cache_dir, full_size=args.full_size,
        siglip_model=args.siglip_model, baseline_model=args.baseline_model, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, shuffled_titles_control=args.shuffled_titles_control,
        pca_dims=tuple(args.pca_dims), bootstrap_resamples=args.bootstrap,
        ab_users=args.ab_users, ab_sessions_per_user=args.ab_sessions_per_user, ab_k=args.ab_k,
        workers=args.workers, device=args.device, resume=args.resume)


def run(args: argparse.Namespace) -> int:
    from visrec.sim.study.report import summary_lines
    from visrec.sim.study.run import run_study

    result = run_study(config_from_args(args), command="visrec " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print("\n".join(summary_lines(result)))
    return 0
