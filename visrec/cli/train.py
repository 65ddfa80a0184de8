"""`visrec train`: fine-tune SigLIP on a prepared dataset (stage 2)."""

from __future__ import annotations

import argparse
import dataclasses

from visrec.core.defaults import field_defaults

HELP = "fine-tune SigLIP on prepared image-title pairs with the sigmoid loss (stage 2)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.stages.configs import CHECKPOINTING, GRADIENT_COMPRESSION, TRAIN_PRECISIONS, TrainConfig

    # Each flag's dest is its TrainConfig field, so `run` passes them on by name.
    defaults = field_defaults(TrainConfig)
    parser.add_argument("--data", dest="data_uri", metavar="DATA", required=True,
                        help="prepared dataset directory (local or gs://)")
    parser.add_argument("--model", dest="model_uri", metavar="MODEL", default=defaults["model_uri"],
                        help="hub id, local or gs:// model dir (default: %(default)s)")
    parser.add_argument("--out", dest="out_dir", metavar="OUT", required=True, help="output directory (local or gs://)")
    parser.add_argument("--epochs", type=int, default=defaults["epochs"], help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                        help="global pairs per optimizer step over all processes (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults["lr"],
                        help="peak AdamW learning rate (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=defaults["warmup_steps"],
                        help="linear warmup steps (default: 5%% of all)")
    parser.add_argument("--weight-decay", type=float, default=defaults["weight_decay"], help="default: %(default)s")
    parser.add_argument("--precision", choices=TRAIN_PRECISIONS, default=defaults["precision"],
                        help="default bf16 on a GPU with bf16 tensor cores (L4, A100, H100), fp32 elsewhere (CPU, T4)")
    parser.add_argument("--grad-accum", type=int, default=defaults["grad_accum"],
                        help="micro-batches per step; the loss sees batch-size/grad-accum pairs (default: %(default)s)")
    parser.add_argument("--max-grad-norm", type=float, default=defaults["max_grad_norm"],
                        help="gradient clipping norm (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", default=defaults["resume"],
                        help="continue from the newest complete checkpoint in --out (fresh start if none)")
    parser.add_argument("--seed", type=int, default=defaults["seed"], help="default: %(default)s")
    parser.add_argument("--max-steps", type=int, default=defaults["max_steps"],
                        help="stop, resumably, after N optimizer steps")
    parser.add_argument("--checkpoint-every", dest="checkpoint_every_steps", metavar="CHECKPOINT_EVERY",
                        type=int,
                        default=defaults["checkpoint_every_steps"],
                        help="checkpoint every N steps, besides each epoch end; 0: epoch ends only "
                             "(default: %(default)s)")
    parser.add_argument("--keep-checkpoints", type=int, default=defaults["keep_checkpoints"],
                        help="newest checkpoints kept (default: %(default)s)")
    parser.add_argument("--no-augment", dest="augment", action="store_false", default=defaults["augment"],
                        help="no random crop/flip of training images")
    parser.add_argument("--num-workers", type=int, default=defaults["num_workers"],
                        help="data loader processes per training process (default: the CPUs shared out, max 16)")
    parser.add_argument("--val-max-items", type=int, default=defaults["val_max_items"],
                        help="validation pairs used for recall (0: all; default: %(default)s)")
    parser.add_argument("--device", default=defaults["device"],
                        help="cpu, cuda[:N] or gpu (default: cuda:LOCAL_RANK if usable, else cpu); "
                             "cuda/gpu fail at once when CUDA is not usable")
    parser.add_argument("--gradient-checkpointing", choices=CHECKPOINTING, default=defaults["gradient_checkpointing"],
                        help="recompute each layer's activations in the backward pass, ~3.5x less activation "
                             "memory for ~1/3 more compute (default %(default)s: on when the run would not fit "
                             "without)")
    parser.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                        default=defaults["memory_check"],
                        help="start even when the estimated peak memory exceeds the device's")
    parser.add_argument("--freeze-token-embedding", action="store_true", default=defaults["freeze_token_embedding"],
                        help="do not train the text tower's token embedding (half the multilingual model)")
    parser.add_argument("--gradient-compression", choices=GRADIENT_COMPRESSION,
                        default=defaults["gradient_compression"],
                        help="several processes: all-reduce gradients in bf16 (default: %(default)s)")
    parser.add_argument("--process-group-timeout", dest="process_group_timeout_minutes",
                        metavar="PROCESS_GROUP_TIMEOUT", type=int,
                        default=defaults["process_group_timeout_minutes"],
                        help="minutes a collective waits for the other processes (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=defaults["progress"],
                        help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import json
    import os

    from visrec.stages.configs import TrainConfig
    from visrec.stages.train.trainer import train

    result = train(TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                                  if hasattr(args, f.name)}))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary rather than one per process
        summary = {"global_step": result.global_step, "epochs_completed": result.epochs_completed,
                   "best_epoch": result.best_epoch, "best_val": result.best_val,
                   "samples_per_second": result.samples_per_second}
        print(json.dumps(summary, indent=2))
    return 0
