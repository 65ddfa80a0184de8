"""`visrec train`: fine-tune SigLIP on a prepared dataset (stage 2)."""

from __future__ import annotations

import argparse

HELP = "fine-tune SigLIP on prepared image-title pairs with the sigmoid loss (stage 2)"

# CLI flag -> TrainConfig field. Flags left out keep TrainConfig's defaults (the paper's),
# so the defaults live in one place; the help texts name them for the reader.
_FIELDS = {"data": "data_uri", "model": "model_uri", "out": "out_dir", "epochs": "epochs",
           "batch_size": "batch_size", "lr": "lr", "warmup_steps": "warmup_steps",
           "weight_decay": "weight_decay", "precision": "precision", "grad_accum": "grad_accum",
           "max_grad_norm": "max_grad_norm", "resume": "resume", "seed": "seed", "max_steps": "max_steps",
           "checkpoint_every": "checkpoint_every_steps", "keep_checkpoints": "keep_checkpoints",
           "augment": "augment", "num_workers": "num_workers", "val_max_items": "val_max_items",
           "device": "device", "gradient_checkpointing": "gradient_checkpointing",
           "memory_check": "memory_check", "freeze_token_embedding": "freeze_token_embedding",
           "gradient_compression": "gradient_compression",
           "process_group_timeout": "process_group_timeout_minutes", "progress": "progress"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    parser.add_argument("--data", required=True, help="prepared dataset directory (local or gs://)")
    parser.add_argument("--model", default=s,
                        help="hub id, local or gs:// model dir (default google/siglip-base-patch16-256-multilingual)")
    parser.add_argument("--out", required=True, help="output directory (local or gs://)")
    parser.add_argument("--epochs", type=int, default=s, help="default 5")
    parser.add_argument("--batch-size", type=int, default=s,
                        help="global pairs per optimizer step over all processes (default 256)")
    parser.add_argument("--lr", type=float, default=s, help="peak AdamW learning rate (default 5e-5)")
    parser.add_argument("--warmup-steps", type=int, default=s, help="linear warmup steps (default 5%% of all)")
    parser.add_argument("--weight-decay", type=float, default=s, help="default 0.1")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=s,
                        help="default bf16 on a GPU with bf16 tensor cores (L4, A100, H100), fp32 elsewhere (CPU, T4)")
    parser.add_argument("--grad-accum", type=int, default=s,
                        help="micro-batches per step; the loss sees batch-size/grad-accum pairs (default 1)")
    parser.add_argument("--max-grad-norm", type=float, default=s, help="gradient clipping norm (default 1.0)")
    parser.add_argument("--resume", action="store_true", default=s,
                        help="continue from the newest complete checkpoint in --out (fresh start if none)")
    parser.add_argument("--seed", type=int, default=s, help="default 0")
    parser.add_argument("--max-steps", type=int, default=s, help="stop, resumably, after N optimizer steps")
    parser.add_argument("--checkpoint-every", type=int, default=s,
                        help="checkpoint every N steps, besides each epoch end; 0: epoch ends only (default 500)")
    parser.add_argument("--keep-checkpoints", type=int, default=s, help="newest checkpoints kept (default 2)")
    parser.add_argument("--no-augment", dest="augment", action="store_false", default=s,
                        help="no random crop/flip of training images")
    parser.add_argument("--num-workers", type=int, default=s,
                        help="data loader processes per training process (default: the CPUs shared out, max 16)")
    parser.add_argument("--val-max-items", type=int, default=s,
                        help="validation pairs used for recall (default 10000; 0: all)")
    parser.add_argument("--device", default=s,
                        help="cpu, cuda[:N] or gpu (default: cuda:LOCAL_RANK if usable, else cpu); "
                             "cuda/gpu fail at once when CUDA is not usable")
    parser.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default=s,
                        help="recompute each layer's activations in the backward pass, ~3.5x less activation "
                             "memory for ~1/3 more compute (default auto: on when the run would not fit without)")
    parser.add_argument("--no-memory-check", dest="memory_check", action="store_false", default=s,
                        help="start even when the estimated peak memory exceeds the device's")
    parser.add_argument("--freeze-token-embedding", action="store_true", default=s,
                        help="do not train the text tower's token embedding (half the multilingual model)")
    parser.add_argument("--gradient-compression", choices=("none", "bf16"), default=s,
                        help="several processes: all-reduce gradients in bf16 (default none)")
    parser.add_argument("--process-group-timeout", type=int, default=s,
                        help="minutes a collective waits for the other processes (default 60)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=s,
                        help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import json
    import os

    from visrec.stages.train.trainer import TrainConfig, train

    values = {field: getattr(args, flag) for flag, field in _FIELDS.items() if hasattr(args, flag)}
    metrics = train(TrainConfig(**values))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary rather than one per process
        summary = {k: metrics[k] for k in ("global_step", "epochs_completed", "best_epoch", "best_val",
                                           "samples_per_second")}
        print(json.dumps(summary, indent=2))
    return 0
