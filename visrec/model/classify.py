"""Supervised classification pretraining of an image backbone, as ImageNet pretraining is.

The paper's baseline is MobileNetV2 trained to classify ImageNet photos and then used frozen as
a feature extractor: its pooled features are the embedding. `train_classifier` does the same
with any backbone whose output has a `pooler_output` (a `MobileNetV2Model`): a linear head on
the pooled features, cross-entropy on class labels, the standard random-crop and flip
augmentation (no colour jitter, as in torchvision's ImageNet recipe), AdamW with a cosine
schedule. The head is dropped afterwards; the backbone keeps its weights and BatchNorm
statistics. Inputs are preprocessed tensors, so the function does no I/O and is a function of
its arguments and `seed`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from visrec.core.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierConfig:
    """Settings of `train_classifier`.

    epochs, batch_size, lr, weight_decay: AdamW, cosine decay after `warmup_fraction` of the steps.
    crop_padding: random crops of the image padded by this many pixels per side (reflected), as
        CIFAR/ImageNet-style training does; 0 turns it off. hflip: random horizontal flips.
    label_smoothing: cross-entropy label smoothing.
    seed: initialisation of the head, batch order and augmentation.
    """

    epochs: int = 3
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    crop_padding: int = 6
    hflip: bool = True
    label_smoothing: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise UserError("classifier training needs epochs >= 1, batch_size >= 2 and lr > 0")
        if self.crop_padding < 0 or not 0 <= self.warmup_fraction < 1:
            raise UserError("crop_padding must be >= 0 and warmup_fraction in [0, 1)")


def _augment(pixels: Any, config: ClassifierConfig, generator: Any) -> Any:
    """Random crops of the reflect-padded batch and random horizontal flips (one draw per image)."""
    import torch

    n, _, h, w = pixels.shape
    if config.crop_padding:
        pad = config.crop_padding
        padded = torch.nn.functional.pad(pixels, (pad, pad, pad, pad), mode="reflect")
        xs = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
        ys = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
        pixels = torch.stack([padded[i, :, y:y + h, x:x + w] for i, (x, y) in enumerate(zip(xs, ys))])
    if config.hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    return pixels


def accuracy(backbone: Any, head: Any, pixels: Any, labels: Any, batch_size: int = 256) -> float:
    """Top-1 accuracy of `head(backbone(pixels).pooler_output)` in eval mode."""
    import torch

    backbone.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            logits = head(backbone(pixel_values=pixels[start:start + batch_size]).pooler_output)
            correct += int((logits.argmax(-1) == labels[start:start + batch_size]).sum())
    return correct / max(len(labels), 1)


def train_classifier(backbone: Any, train: tuple[Any, Any], val: tuple[Any, Any], classes: int,
                     config: ClassifierConfig) -> dict[str, Any]:
    """Train `backbone` (in place) with a linear head to classify `train` = (pixel_values (n, 3, H, W)
    float32, labels (n,) int64) into `classes` classes; returns the run's figures.

    `val` (same form, may be empty) gives the held-out accuracy after each epoch. Returns
    {epochs: [{epoch, train_loss, train_accuracy, val_accuracy, seconds}], initial_val_accuracy,
    val_accuracy, samples_per_second, seconds}. The backbone ends in eval mode.
    """
    import torch

    pixels, labels = train
    if len(labels) < config.batch_size:
        raise UserError(f"{len(labels)} training images are fewer than one batch of {config.batch_size}")
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # the head's initialisation
    features = int(backbone(pixel_values=pixels[:2]).pooler_output.shape[-1])
    head = torch.nn.Linear(features, classes)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(labels) // config.batch_size
    # Linear warm-up then cosine decay (torch's one-cycle schedule, Adam's betas left alone).
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=steps_per_epoch * config.epochs,
        pct_start=max(config.warmup_fraction, 1e-6), anneal_strategy="cos", cycle_momentum=False)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    has_val = len(val[1]) > 0
    initial = accuracy(backbone, head, *val) if has_val else None
    epochs, started = [], time.perf_counter()
    for epoch in range(config.epochs):
        backbone.train()
        t0, losses, correct = time.perf_counter(), [], 0
        order = torch.randperm(len(labels), generator=generator)
        for step in range(steps_per_epoch):
            rows = order[step * config.batch_size:(step + 1) * config.batch_size]
            batch, target = _augment(pixels[rows], config, generator), labels[rows]
            logits = head(backbone(pixel_values=batch).pooler_output)
            loss = loss_fn(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            correct += int((logits.detach().argmax(-1) == target).sum())
        entry = {"epoch": epoch + 1, "train_loss": sum(losses) / len(losses),
                 "train_accuracy": correct / (steps_per_epoch * config.batch_size),
                 "val_accuracy": accuracy(backbone, head, *val) if has_val else None,
                 "seconds": round(time.perf_counter() - t0, 2)}
        epochs.append(entry)
        log.info("classifier epoch %d/%d: loss %.4f, train accuracy %.3f, val accuracy %s (%.1fs)", epoch + 1,
                 config.epochs, entry["train_loss"], entry["train_accuracy"], entry["val_accuracy"], entry["seconds"])
    seconds = time.perf_counter() - started
    backbone.eval()
    return {"epochs": epochs, "initial_val_accuracy": initial, "val_accuracy": epochs[-1]["val_accuracy"],
            "train_images": len(labels), "val_images": len(val[1]), "classes": classes,
            "samples_per_second": round(steps_per_epoch * config.epochs * config.batch_size / seconds, 1),
            "seconds": round(seconds, 2)}
