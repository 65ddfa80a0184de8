"""Stage-2 benchmark: `visrec train` throughput vs a bare PyTorch loop, and the learning check.

    python bench/train.py                      # CPU: tiny model, throughput ratio
    python bench/train.py --must-show          # + from-scratch training on 2,000 synthetic items,
                                               #   real titles vs shuffled titles
    python bench/train.py --full-size          # GPU: ViT-B/16-256 SigLIP (random weights), batch 256, bf16

Both loops train the same model on the same prepared data (generated with
`visrec demo-data` + `visrec prepare`), with the same batch size, loader workers and
precision, timed over their optimizer steps only (validation and checkpoints excluded).
The bare loop is what anyone would write: PIL decode, the processor, forward both
towers, sigmoid loss, AdamW. The ratio is the cost of everything `visrec train` adds
(DDP-ready loss, scheduler, clipping, step accounting, progress, checkpoint bookkeeping).
Prints a table and writes `bench/results/train.json`.
"""

from __future__ import annotations

import argparse
import io as bytes_io
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from visrec.models import (TEXT_MAX_LENGTH, image_features, init_models, load_siglip, text_features,
                           train_title_tokenizer)
from visrec.train import TrainConfig, train
from visrec.train_data import read_prepared
from visrec.schema import PREPARED_SHARDS
from benchkit import RESULTS_DIR, machine_info, write_results

RESULTS = RESULTS_DIR / "train.json"
# Dense bf16 peak TFLOP/s by GPU name, for model FLOP utilisation.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "V100": 125.0}


def make_data(root: Path, items: int, image_size: int) -> tuple[str, str]:
    """Synthetic marketplace -> prepared dataset (20% validation); returns (listings, prepared dir)."""
    from visrec.demo_data import DemoDataConfig, generate_marketplace
    from visrec.prepare import PrepareConfig, run_prepare

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


def full_size_siglip(out: Path, data: str) -> str:
    """`google/siglip-base-patch16-256-multilingual`'s architecture with random weights."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tokenizer = train_title_tokenizer(read_prepared(data)[0].column("title").to_pylist())
    tower = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    config = SiglipConfig(text_config=dict(tower, vocab_size=250_000, max_position_embeddings=TEXT_MAX_LENGTH,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id),
                          vision_config=dict(tower, image_size=256, patch_size=16))
    model = SiglipModel(config)
    SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 256, "width": 256}),
                    tokenizer=tokenizer).save_pretrained(out)
    model.save_pretrained(out)
    return str(out)


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
              num_workers: int, lr: float) -> float:
    """A minimal hand-written SigLIP training loop; samples/s over `steps` optimizer steps."""
    model, processor = load_siglip(model_dir)
    model.to(device).train()
    table, _ = read_prepared(data)

    def collate(samples):
        images, titles = zip(*samples)
        pixels = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        ids = processor.tokenizer(list(titles), padding="max_length", max_length=TEXT_MAX_LENGTH,
                                  truncation=True, return_tensors="pt")["input_ids"]
        return pixels, ids

    loader = torch.utils.data.DataLoader(_Pairs(table), batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=num_workers, collate_fn=collate,
                                         pin_memory=device.type == "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    done, seconds = 0, 0.0
    while done < steps:
        batches = iter(loader)
        started = time.perf_counter()
        for pixels, ids in batches:
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
            done += 1
            if done == steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - started
    return steps * batch / seconds


def visrec_loop(model_dir: str, data: str, out: Path, batch: int, steps: int, precision: str, device: torch.device,
                num_workers: int, lr: float, augment: bool) -> float:
    metrics = train(TrainConfig(data_uri=data, out_dir=str(out), model_uri=model_dir, epochs=1000, batch_size=batch,
                                lr=lr, precision=precision, max_steps=steps, checkpoint_every_steps=0,
                                augment=augment, num_workers=num_workers, device=str(device), progress=False,
                                val_max_items=256))
    return metrics["samples_per_second"]


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
            "seconds": round(time.perf_counter() - started, 1), "train_pairs": m["train_pairs"],
            "val_pairs": m["val_pairs"], "steps": m["global_step"],
            "before": m["initial_val"], "after": m["epochs"][-1]["val"],
            "i2t_recall@5_by_epoch": [m["initial_val"]["image_to_text_recall@5"]]
            + [e["val"]["image_to_text_recall@5"] for e in m["epochs"]],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000, help="synthetic marketplace size")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (tiny), 256 (--full-size)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per loop (default 20)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating runs of each loop; the ratio is the median of the paired runs' ratios")
    parser.add_argument("--num-workers", type=int, default=None, help="loader workers (default 0 on CPU, 8 on GPU)")
    parser.add_argument("--full-size", action="store_true", help="ViT-B/16-256 SigLIP architecture (needs a GPU)")
    parser.add_argument("--precision", default=None, help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--must-show", action="store_true", help="also run the learning check (minutes on CPU)")
    parser.add_argument("--must-show-epochs", type=int, default=20)
    parser.add_argument("--must-show-lr", type=float, default=3e-3)
    parser.add_argument("--must-show-batch-size", type=int, default=32)
    parser.add_argument("--workdir", help="keep data/models here (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    batch = args.batch_size or (256 if args.full_size else 64)
    steps = args.steps or 20
    workers = args.num_workers if args.num_workers is not None else (8 if device.type == "cuda" else 0)
    lr = 5e-5 if args.full_size else 1e-3
    root = Path(args.workdir or tempfile.mkdtemp(prefix="visrec-bench-train-"))
    root.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    listings, data = make_data(root / "data", args.items, 256 if args.full_size else 64)
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
        bare.append(bare_loop(model_dir, data, batch, steps, precision, device, workers, lr))
        ours.append(visrec_loop(model_dir, data, root / f"run-{r}", batch, steps, precision, device, workers, lr,
                                augment=False))
    ours_aug.append(visrec_loop(model_dir, data, root / "run-aug", batch, steps, precision, device, workers, lr,
                                augment=True))

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if gpu and k in gpu), None)
    results = {
        "machine": machine_info(gpu=gpu),
        "torch": torch.__version__, "model": "SiglipModel ViT-B/16-256 (random)" if args.full_size
        else "tiny SiglipModel (init-models)", "parameters": params, "precision": precision, "batch_size": batch,
        "timed_steps": steps, "num_workers": workers, "items": args.items, "setup_seconds": round(setup_s, 1),
        "bare_loop_samples_per_s": bare, "visrec_train_samples_per_s": ours,
        "visrec_train_augmented_samples_per_s": ours_aug,
        "ratio": statistics.median(o / b for o, b in zip(ours, bare)), "ratio_goal": 0.9,
        "train_flops_per_sample": flops,
        "mfu": (statistics.median(ours) * flops / (peak * 1e12)) if peak else None,
    }
    if args.must_show:
        shuffled = shuffled_copy(data, root / "data" / "shuffled")
        tiny = model_dir if not args.full_size else init_models(root / "models", listings_uri=listings)["siglip"]
        results["must_show"] = must_show(tiny, data, shuffled, root / "must-show", args.must_show_epochs,
                                         args.must_show_batch_size,
                                         args.must_show_lr, workers)

    runs = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    rows = [("bare PyTorch loop", runs(bare)), ("visrec train", runs(ours)),
            ("visrec train + augmentation", runs(ours_aug))]
    where = gpu or f"{results['machine']['processor']} CPU, {results['machine']['cpus']} cores"
    print(f"\n{results['model']} ({params / 1e6:.1f}M params), batch {batch}, {precision}, {where}")
    print(f"{'loop':<30}{'samples/s per run':>30}")
    for name, value in rows:
        print(f"{name:<30}{value:>30}")
    print(f"{'ratio visrec/bare (median)':<30}{results['ratio']:>30.3f}")
    if results["mfu"] is not None:
        print(f"{'images/s':<30}{statistics.median(ours):>30.1f}\n"
              f"{'model FLOP utilisation':<30}{results['mfu']:>30.1%}")
    for name, r in results.get("must_show", {}).items():
        print(f"must-show {name:<16} val i2t recall@5 {r['before']['image_to_text_recall@5']:.3f} -> "
              f"{r['after']['image_to_text_recall@5']:.3f} (t2i {r['before']['text_to_image_recall@5']:.3f} -> "
              f"{r['after']['text_to_image_recall@5']:.3f}), {r['steps']} steps, {r['seconds']:.0f}s")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
