"""Stage-2 benchmark: `visrec train` throughput vs a bare PyTorch loop, and the learning check.

    python bench/train.py                      # CPU: tiny model, throughput ratio
    python bench/train.py --must-show          # + from-scratch training on 2,000 synthetic items,
                                               #   real titles vs shuffled titles
    python bench/train.py --must-show --options  # + the same with each scaling option (quality effect)
    python bench/train.py --full-size          # GPU: ViT-B/16-256 SigLIP (random weights), batch 256, bf16
    python bench/train.py --memory             # CPU: full-size activation memory per pair, memory plans

Both loops train the same model on the same prepared data (generated with
`visrec demo-data` + `visrec prepare`), with the same batch size, loader workers,
precision and checkpointing, on the same device, timed over optimizer steps after a
warm-up (validation and checkpoints excluded), with one loader for all steps. The bare
loop is what anyone would write: PIL decode, the processor, forward both towers, sigmoid
loss, AdamW. The ratio is the cost (or gain: uint8 batches) of everything `visrec train`
adds (DDP-ready loss, scheduler, clipping, step accounting, progress, checkpoints). Only
the last run's outputs are kept (a full-size run writes ~7 GB). Prints a table and writes
`bench/results/train.json`.
"""

from __future__ import annotations

import argparse
import io as bytes_io
import json
import logging
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from visrec.model.encoders import (TEXT_MAX_LENGTH, image_features, init_models, load_siglip, text_features,
                           train_title_tokenizer)
from visrec.stages.configs import TrainConfig
from visrec.stages.train.trainer import LOSS_READBACK_STEPS, TrainResult, train
from visrec.stages.train.data import read_prepared
from visrec.data.schema import PREPARED_SHARDS
from benchkit import RESULTS_DIR, machine_info, print_table, write_results

RESULTS = RESULTS_DIR / "train.json"
WARMUP_STEPS = LOSS_READBACK_STEPS  # untimed: `visrec train` reports throughput past its first read-back window
# Dense bf16 peak TFLOP/s by the exact name torch reports (less "NVIDIA "), for model FLOP
# utilisation. Exact, not a substring: "L4" is in "L40S", and an H100 PCIe (756) is not an SXM (989).
PEAK_BF16_TFLOPS = {
    "L4": 121.0, "L40": 181.0, "L40S": 362.0, "A10": 125.0,
    "A100-SXM4-40GB": 312.0, "A100-SXM4-80GB": 312.0, "A100-PCIE-40GB": 312.0, "A100 80GB PCIe": 312.0,
    "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0,
}


def peak_bf16_tflops(gpu_name: str | None) -> float | None:
    """Dense bf16 peak of `gpu_name` (torch.cuda.get_device_name), None when unknown (no MFU then)."""
    if not gpu_name:
        return None
    return PEAK_BF16_TFLOPS.get(gpu_name.removeprefix("NVIDIA ").strip())


def make_data(root: Path, items: int, image_size: int) -> tuple[str, str]:
    """Synthetic marketplace -> prepared dataset (20% validation); returns (listings, prepared dir)."""
    from visrec.sim.demo_data import DemoDataConfig, generate_marketplace
    from visrec.stages.configs import PrepareConfig
    from visrec.stages.prepare import run_prepare

    generate_marketplace(root / "marketplace", DemoDataConfig(items=items, seed=0,
                                                              image_size=max(64, image_size)))
    listings = str(root / "marketplace" / "listings.jsonl")
    run_prepare(PrepareConfig(listings_uri=listings, out_dir=str(root / "prepared"), val_fraction=0.2,
                              image_size=image_size, shards=2))
    return listings, str(root / "prepared")


def shuffled_copy(prepared: str, out: Path, seed: int = 0) -> str:
    """The same dataset with titles permuted across items: pairs that carry no signal."""
    out.mkdir(parents=True, exist_ok=True)
    for shard in sorted(Path(prepared).glob(PREPARED_SHARDS)):
        table = pq.read_table(shard)
        titles = table.column("title").to_pylist()
        random.Random(seed).shuffle(titles)
        table = table.set_column(table.column_names.index("title"), "title", [titles])
        pq.write_table(table, out / shard.name)
    return str(out)


def siglip_b16_256(pad_token_id: int = 0, eos_token_id: int = 1):
    """`google/siglip-base-patch16-256-multilingual`'s architecture (370.6M parameters), random weights."""
    from transformers import SiglipConfig, SiglipModel

    tower = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    return SiglipModel(SiglipConfig(
        text_config=dict(tower, vocab_size=250_000, max_position_embeddings=TEXT_MAX_LENGTH,
                         pad_token_id=pad_token_id, eos_token_id=eos_token_id),
        vision_config=dict(tower, image_size=256, patch_size=16)))


def full_size_siglip(out: Path, data: str) -> str:
    """The full-size architecture with random weights and a tokenizer of the data's titles, saved to `out`."""
    from transformers import SiglipImageProcessor, SiglipProcessor

    tokenizer = train_title_tokenizer(read_prepared(data)[0].column("title").to_pylist())
    model = siglip_b16_256(tokenizer.pad_token_id, tokenizer.eos_token_id)
    SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 256, "width": 256}),
                    tokenizer=tokenizer).save_pretrained(out)
    model.save_pretrained(out)
    return str(out)


# GPU memory assumed usable by training (total less the CUDA context), for the memory table.
GPU_USABLE_GIB = {"L4 (24 GB)": 21.9, "A100 40GB": 38.9, "A100 80GB / H100 80GB": 78.6}


def _probe_forward(model, device: torch.device, precision: str):
    from visrec.stages.train.encoder import PairEncoder, autocast

    encoder = PairEncoder(model).train()

    def forward(pairs: int):
        pixels = torch.randn(pairs, 3, 256, 256, device=device)
        ids = torch.zeros(pairs, TEXT_MAX_LENGTH, dtype=torch.long, device=device)
        with autocast(device, precision):
            return encoder(pixels, ids)

    return forward


def rss_probe(pairs: int, checkpointing: bool) -> None:
    """(Run in a fresh process.) Print the resident memory one training forward of `pairs` pairs
    adds and keeps for backward: an independent check of `measure_activations`."""
    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    torch.manual_seed(0)
    model = siglip_b16_256()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    forward = _probe_forward(model, torch.device("cpu"), "bf16")
    before = rss()
    out = forward(pairs)
    print(json.dumps({"pairs": pairs, "held_bytes": rss() - before}))
    del out


def memory_table() -> dict:
    """Activation memory per pair of the full-size model on CPU (bf16 autocast), with and without
    gradient checkpointing, and the memory plan at batch 256 on common GPUs."""
    from visrec.stages.train.resources import (GiB, MiB, checkpointable_layers, fits, measure_activations, model_sizes,
                                        plan_memory)

    model = siglip_b16_256()
    started = time.perf_counter()
    profile = measure_activations(model, _probe_forward(model, torch.device("cpu"), "bf16"))
    probe_s = time.perf_counter() - started
    in_vision = [any(layer is v for v in model.vision_model.encoder.layers) for layer in checkpointable_layers(model)]
    vision = [x for x, v in zip(profile.layer_per_pair, in_vision) if v]
    text = [x for x, v in zip(profile.layer_per_pair, in_vision) if not v]
    rss = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed blocks go back to the OS: RSS tracks live bytes
    for ckpt in (False, True):
        held = {}
        for pairs in (2, 10):
            out = subprocess.run([sys.executable, __file__, "--rss-probe", str(pairs)]
                                 + (["--rss-probe-checkpointing"] if ckpt else []),
                                 capture_output=True, text=True, check=True, env=env)
            held[pairs] = json.loads(out.stdout.strip().splitlines()[-1])["held_bytes"]
        rss[ckpt] = (held[10] - held[2]) / 8
    result = {
        "probe_seconds": round(probe_s, 1), "fixed_mib": round(profile.fixed_bytes / MiB, 1),
        "outside_layers_mib_per_pair": round(profile.outside_per_pair / MiB, 2),
        "vision_layers_mib_per_pair": round(sum(vision) / MiB, 2), "text_layers_mib_per_pair": round(sum(text) / MiB, 2),
        "layer_inputs_mib_per_pair": round(sum(profile.layer_input_per_pair) / MiB, 2),
        "per_pair_mib": {"off": round(profile.per_pair(False) / MiB, 2), "on": round(profile.per_pair(True) / MiB, 2)},
        "rss_held_after_forward_mib_per_pair": {"off": round(rss[False] / MiB, 2), "on": round(rss[True] / MiB, 2)},
        "plans": [],
    }
    for freeze in (False, True):
        if freeze:
            model.text_model.embeddings.token_embedding.weight.requires_grad_(False)
        sizes = model_sizes(model)
        for gpus in (1, 2, 8):
            for ckpt in (False, True):
                plan = plan_memory(profile, **sizes, pairs_per_process=256 // gpus, world_size=gpus,
                                   checkpointing=ckpt)
                result["plans"].append({"gpus": gpus, "checkpointing": ckpt, "freeze_token_embedding": freeze,
                                        **plan.as_dict(),
                                        "fits": {g: fits(plan, int(u * GiB)) for g, u in GPU_USABLE_GIB.items()}})
    return result


def print_memory(result: dict) -> None:
    print(f"\nSigLIP ViT-B/16-256 (370.6M params), bf16 autocast, CPU probe ({result['probe_seconds']} s)")
    print(f"saved for backward per pair: vision layers {result['vision_layers_mib_per_pair']} MiB, text layers "
          f"{result['text_layers_mib_per_pair']} MiB, outside the layers {result['outside_layers_mib_per_pair']} MiB;"
          f" fixed {result['fixed_mib']} MiB (bf16 weight copies)")
    for key, name in (("off", "without checkpointing"), ("on", "with checkpointing")):
        print(f"  {name:<24} estimate {result['per_pair_mib'][key]:7.2f} MiB/pair, "
              f"held after forward (RSS) {result['rss_held_after_forward_mib_per_pair'][key]:7.2f} MiB/pair")
    print_table(result["plans"], [
        ("GPUs", "gpus", ">4"), ("ckpt", lambda r: "on" if r["checkpointing"] else "off", ">5"),
        ("frozen emb", lambda r: "yes" if r["freeze_token_embedding"] else "no", ">10"),
        ("pairs/GPU", "pairs_per_process", ">9"), ("weights+state GiB", lambda r: r["weights_gib"]
                                                   + r["training_state_gib"], ">17.2f"),
        ("activations GiB", "activations_gib", ">15.2f"), ("peak GiB", "total_gib", ">9.2f"),
        *[(g, (lambda g: lambda r: "fits" if r["fits"][g] else "OOM")(g), f">{max(6, len(g))}")
          for g in GPU_USABLE_GIB]])



def train_flops_per_sample(model) -> float:
    """Forward+backward FLOPs of one image-title pair: 6 x (matmul params x tokens) + attention scores."""
    total = 0.0
    for tower, tokens in ((model.vision_model, (model.config.vision_config.image_size
                                                // model.config.vision_config.patch_size) ** 2),
                          (model.text_model, TEXT_MAX_LENGTH)):
        layers = tower.encoder.layers
        matmul = sum(p.numel() for layer in layers for n, p in layer.named_parameters() if p.ndim == 2)
        hidden = tower.config.hidden_size
        total += 6 * (matmul * tokens + 2 * len(layers) * tokens * tokens * hidden)
    return total


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, table):
        self.images = table.column("image")
        self.titles = table.column("title").to_pylist()

    def __len__(self):
        return len(self.titles)

    def __getitem__(self, i):
        return Image.open(bytes_io.BytesIO(self.images[i].as_py())).convert("RGB"), self.titles[i]


def bare_loop(model_dir: str, data: str, batch: int, steps: int, precision: str, device: torch.device,
              num_workers: int, lr: float, checkpointing: bool) -> float:
    """A minimal hand-written SigLIP training loop; samples/s over `steps` optimizer steps after
    `WARMUP_STEPS` (one loader for all: no worker restart in the timed window)."""
    model, processor = load_siglip(model_dir)
    model.to(device).train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    table, _ = read_prepared(data)

    def collate(samples):
        images, titles = zip(*samples)
        pixels = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        ids = processor.tokenizer(list(titles), padding="max_length", max_length=TEXT_MAX_LENGTH,
                                  truncation=True, return_tensors="pt")["input_ids"]
        return pixels, ids

    total = WARMUP_STEPS + steps
    sampler = torch.utils.data.RandomSampler(range(len(table)), num_samples=total * batch)  # cycles epochs
    loader = torch.utils.data.DataLoader(_Pairs(table), batch_size=batch, sampler=sampler, drop_last=True,
                                         num_workers=num_workers, collate_fn=collate,
                                         pin_memory=device.type == "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    started = None
    for done, (pixels, ids) in enumerate(loader):
        if done == WARMUP_STEPS:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        pixels, ids = pixels.to(device, non_blocking=True), ids.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            img = F.normalize(image_features(model, pixels).float(), dim=-1)
            txt = F.normalize(text_features(model, ids).float(), dim=-1)
        logits = img @ txt.T * model.logit_scale.exp() + model.logit_bias
        labels = 2 * torch.eye(len(img), device=device) - 1
        loss = -F.logsigmoid(labels * logits).sum() / len(img)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - started)


def visrec_loop(model_dir: str, data: str, out: Path, batch: int, steps: int, precision: str, device: torch.device,
                num_workers: int | None, lr: float, augment: bool, keep: bool) -> dict:
    """`visrec train` for `WARMUP_STEPS + steps` steps; samples/s past warm-up (its first loss
    read-back window), the memory plan it chose and (GPU) the peak memory it allocated. Only a
    `keep` run's outputs stay on disk (full-size: ~7 GB each)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    metrics = train(TrainConfig(data_uri=data, out_dir=str(out), model_uri=model_dir, epochs=1000, batch_size=batch,
                                lr=lr, precision=precision, max_steps=WARMUP_STEPS + steps,
                                checkpoint_every_steps=0, keep_checkpoints=1, augment=augment,
                                num_workers=num_workers, device=str(device), progress=False, val_max_items=256))
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return {"samples_per_s": metrics.steady_samples_per_second, "memory_plan": metrics.memory_plan,
            "num_workers": metrics.num_workers,
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda" else None}


def must_show(model_dir: str, paired: str, shuffled: str, out: Path, epochs: int, batch: int, lr: float,
              num_workers: int) -> dict:
    """From-scratch training on real vs shuffled titles: validation image->text recall@5 before/after."""
    result = {}
    for name, data in (("paired_titles", paired), ("shuffled_titles", shuffled)):
        started = time.perf_counter()
        m = train(TrainConfig(data_uri=data, out_dir=str(out / name), model_uri=model_dir, epochs=epochs,
                              batch_size=batch, lr=lr, checkpoint_every_steps=0, num_workers=num_workers,
                              progress=False))
        result[name] = {
            "seconds": round(time.perf_counter() - started, 1), "train_pairs": m.train_pairs,
            "val_pairs": m.val_pairs, "steps": m.global_step,
            "before": m.initial_val, "after": m.epochs[-1]["val"],
            "i2t_recall@5_by_epoch": [m.initial_val["image_to_text_recall@5"]]
            + [e["val"]["image_to_text_recall@5"] for e in m.epochs],
        }
    return result


def scaling_options(model_dir: str, data: str, out: Path, epochs: int, batch: int, lr: float,
                    num_workers: int) -> dict:
    """The must-show training with each scaling option, on the synthetic marketplace: validation
    recall@5 with a frozen token embedding, and with 2 processes (gloo) with and without bf16
    gradient compression. Same data, seed and batches in every run."""
    runs = {"1 process": ({}, 1), "1 process, frozen token embedding": ({"freeze_token_embedding": True}, 1),
            "2 processes": ({}, 2), "2 processes, bf16 gradients": ({"gradient_compression": "bf16"}, 2)}
    result = {}
    for name, (options, processes) in runs.items():
        run_dir = out / name.replace(" ", "-").replace(",", "")
        config = TrainConfig(data_uri=data, out_dir=str(run_dir), model_uri=model_dir, epochs=epochs, batch_size=batch,
                             lr=lr, checkpoint_every_steps=0, num_workers=num_workers, progress=False, device="cpu",
                             **options)
        started = time.perf_counter()
        if processes == 1:
            m = train(config)
        else:
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // processes)))
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={processes}", "-m", "visrec.stages.train.trainer", json.dumps(asdict(config))],
                           check=True, env=env, capture_output=True)
            m = TrainResult.from_dict(json.loads((run_dir / "train_metrics.json").read_text()))
        after = m.epochs[-1]["val"]
        result[name] = {"seconds": round(time.perf_counter() - started, 1), "processes": processes, **options,
                        "i2t_recall@5": after["image_to_text_recall@5"], "t2i_recall@5": after["text_to_image_recall@5"],
                        "val_loss": after["loss"], "trainable_parameters": m.memory_plan["trainable_parameters"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=None,
                        help="synthetic marketplace size (default 2000; --full-size: one epoch holds every step)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (tiny), 256 (--full-size)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per loop (default 20)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating runs of each loop; the ratio is the median of the paired runs' ratios")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="loader workers (default 0 on CPU; on GPU visrec train's own default)")
    parser.add_argument("--full-size", action="store_true", help="ViT-B/16-256 SigLIP architecture (needs a GPU)")
    parser.add_argument("--precision", default=None, help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--must-show", action="store_true", help="also run the learning check (minutes on CPU)")
    parser.add_argument("--must-show-epochs", type=int, default=20)
    parser.add_argument("--must-show-lr", type=float, default=3e-3)
    parser.add_argument("--must-show-batch-size", type=int, default=32)
    parser.add_argument("--options", action="store_true",
                        help="with --must-show: the learning check with each scaling option (frozen token "
                             "embedding, 2 processes with/without bf16 gradients)")
    parser.add_argument("--memory", action="store_true",
                        help="only the full-size model's activation memory and memory plans (CPU, ~2 min)")
    parser.add_argument("--rss-probe", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rss-probe-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help="keep data/models here (default: a temp dir)")
    parser.add_argument("--out", default=None, help="default bench/results/train.json (train_memory.json: --memory)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.rss_probe:
        return rss_probe(args.rss_probe, args.rss_probe_checkpointing)
    if args.memory:
        result = {"machine": machine_info(), "torch": torch.__version__, **memory_table()}
        print_memory(result)
        return write_results(args.out or RESULTS_DIR / "train_memory.json", result)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    batch = args.batch_size or (256 if args.full_size else 64)
    steps = args.steps or 20
    workers = args.num_workers if args.num_workers is not None else (None if device.type == "cuda" else 0)
    lr = 5e-5 if args.full_size else 1e-3
    # Full size: one epoch holds warm-up and timed steps (no validation inside a run). The tiny
    # model keeps the 2,000 items of the learning check; its epoch ends fall outside the timing.
    items = args.items or (math.ceil((WARMUP_STEPS + steps) * batch / 0.8) + batch if args.full_size else 2000)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="visrec-bench-train-"))
    root.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    listings, data = make_data(root / "data", items, 256 if args.full_size else 64)
    if args.full_size:
        model_dir = full_size_siglip(root / "siglip-b16-256", data)
    else:
        model_dir = init_models(root / "models", listings_uri=listings)["siglip"]
    setup_s = time.perf_counter() - t0
    model, _ = load_siglip(model_dir)
    params = sum(p.numel() for p in model.parameters())
    flops = train_flops_per_sample(model)
    del model

    bare, ours, ours_aug = [], [], []
    for r in range(args.repeats):
        ours.append(visrec_loop(model_dir, data, root / f"run-{r}", batch, steps, precision, device, workers, lr,
                                augment=False, keep=False))
        # The bare loop uses what visrec train chose (checkpointing where the GPU needs it), and its workers.
        bare.append(bare_loop(model_dir, data, batch, steps, precision, device, ours[-1]["num_workers"], lr,
                              ours[-1]["memory_plan"]["checkpointing"]))
    ours_aug.append(visrec_loop(model_dir, data, root / "run-aug", batch, steps, precision, device, workers, lr,
                                augment=True, keep=True))

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peak_bf16_tflops(gpu)
    ours_s = [o["samples_per_s"] for o in ours]
    results = {
        "machine": machine_info(gpu=gpu),
        "torch": torch.__version__, "model": "SiglipModel ViT-B/16-256 (random)" if args.full_size
        else "tiny SiglipModel (init-models)", "parameters": params, "precision": precision, "batch_size": batch,
        "warmup_steps": WARMUP_STEPS, "timed_steps": steps, "num_workers": ours[-1]["num_workers"], "items": items,
        "setup_seconds": round(setup_s, 1),
        "bare_loop_samples_per_s": bare, "visrec_train_samples_per_s": ours_s,
        "visrec_train_augmented_samples_per_s": [o["samples_per_s"] for o in ours_aug],
        "ratio": statistics.median(o / b for o, b in zip(ours_s, bare)), "ratio_goal": 0.9,
        "memory_plan": ours[-1]["memory_plan"], "peak_allocated_gib": [o["peak_allocated_gib"] for o in ours],
        "train_flops_per_sample": flops, "peak_bf16_tflops": peak,
        "mfu": (statistics.median(ours_s) * flops / (peak * 1e12)) if peak else None,
    }
    tiny = None
    if args.must_show:
        shuffled = shuffled_copy(data, root / "data" / "shuffled")
        tiny = model_dir if not args.full_size else init_models(root / "models", listings_uri=listings)["siglip"]
        results["must_show"] = must_show(tiny, data, shuffled, root / "must-show", args.must_show_epochs,
                                         args.must_show_batch_size, args.must_show_lr, workers or 0)
        if args.options:
            results["scaling_options"] = scaling_options(tiny, data, root / "options", args.must_show_epochs,
                                                         args.must_show_batch_size, args.must_show_lr, workers or 0)

    runs = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    rows = [("bare PyTorch loop", runs(bare)), ("visrec train", runs(ours_s)),
            ("visrec train + augmentation", runs(results["visrec_train_augmented_samples_per_s"]))]
    where = gpu or f"{results['machine']['processor']} CPU, {results['machine']['cpus']} cores"
    plan = results["memory_plan"]
    print(f"\n{results['model']} ({params / 1e6:.1f}M params), batch {batch}, {precision}, {where}, "
          f"{results['num_workers']} loader workers, checkpointing {'on' if plan['checkpointing'] else 'off'}, "
          f"timed {steps} steps after {WARMUP_STEPS}")
    print(f"{'loop':<30}{'samples/s per run':>30}")
    for name, value in rows:
        print(f"{name:<30}{value:>30}")
    print(f"{'ratio visrec/bare (median)':<30}{results['ratio']:>30.3f}")
    if device.type == "cuda":
        print(f"{'peak memory: estimated':<30}{plan['total_gib']:>29.2f}G\n"
              f"{'peak memory: allocated':<30}{max(results['peak_allocated_gib']):>29.2f}G")
    if results["mfu"] is not None:
        print(f"{'images/s':<30}{statistics.median(ours_s):>30.1f}\n"
              f"{'model FLOP utilisation':<30}{results['mfu']:>30.1%}")
    elif gpu:
        print(f"no bf16 peak known for {gpu!r}: add it to PEAK_BF16_TFLOPS for the MFU")
    for name, r in results.get("must_show", {}).items():
        print(f"must-show {name:<16} val i2t recall@5 {r['before']['image_to_text_recall@5']:.3f} -> "
              f"{r['after']['image_to_text_recall@5']:.3f} (t2i {r['before']['text_to_image_recall@5']:.3f} -> "
              f"{r['after']['text_to_image_recall@5']:.3f}), {r['steps']} steps, {r['seconds']:.0f}s")
    if "scaling_options" in results:
        print_table([dict(name=k, **v) for k, v in results["scaling_options"].items()], [
            ("training (must-show settings)", "name", "<36"), ("i2t R@5", "i2t_recall@5", ">8.3f"),
            ("t2i R@5", "t2i_recall@5", ">8.3f"), ("val loss", "val_loss", ">9.3f"),
            ("trainable", "trainable_parameters", ">10,"), ("seconds", "seconds", ">8.0f")])
    write_results(args.out or RESULTS, results)


if __name__ == "__main__":
    main()
