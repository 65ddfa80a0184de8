"""The model being trained and how it is scored: both SigLIP towers in one module, autocast, the
learning-rate schedule, weight-decay groups, and retrieval recall on the validation pairs."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from visrec.model.encoders import image_features, text_features
from visrec.model.siglip_loss import sigmoid_loss
from visrec.stages.train.data import Collate, PairDataset


SELECTION_METRIC = "recall@5_mean"  # mean of image->text and text->image recall@5


RECALL_KS = (1, 5)


def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


class PairEncoder(torch.nn.Module):
    """`(pixel_values, input_ids) -> (image_emb, text_emb, logit_scale, logit_bias)`, embeddings L2-normalised.

    One forward for both towers so DDP sees every parameter used in its own forward.
    The text tower gets no attention mask: SigLIP was trained on max-length padded
    text without one and pools the last position.
    """

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor):
        img = image_features(self.model, pixel_values)
        txt = text_features(self.model, input_ids)
        return (F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1),
                self.model.logit_scale, self.model.logit_bias)


def lr_multiplier(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warmup from 0 to 1 over `warmup_steps`, then cosine decay to 0 at `total_steps`."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, or the logit scale/bias."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, titles: list[str],
                     ks: tuple[int, ...] = RECALL_KS, chunk: int = 4096) -> dict[str, float]:
    """Image->text and text->image recall@k of matching pairs (row i of both is one item).

    Items with identical titles share one text in the gallery (as captions of one image
    do), so an image counts as found when its title is among the top k distinct titles
    and a title when any of its images is among the top k images.
    """
    groups: dict[str, int] = {}
    first: list[int] = []  # row of each distinct title's first occurrence
    rows_group = []
    for i, title in enumerate(titles):
        if title not in groups:
            groups[title] = len(first)
            first.append(i)
        rows_group.append(groups[title])
    group = torch.tensor(rows_group)
    texts = text_emb[first]
    k_max = max(ks)
    i2t_hits = {k: 0 for k in ks}
    for s in range(0, len(image_emb), chunk):
        top = (image_emb[s:s + chunk] @ texts.T).topk(min(k_max, len(texts)), dim=1).indices
        match = top == group[s:s + chunk, None]
        for k in ks:
            i2t_hits[k] += int(match[:, :k].any(dim=1).sum())
    t2i_hits = {k: 0 for k in ks}
    for s in range(0, len(texts), chunk):
        top = (texts[s:s + chunk] @ image_emb.T).topk(min(k_max, len(image_emb)), dim=1).indices
        match = group[top] == torch.arange(s, s + len(top))[:, None]
        for k in ks:
            t2i_hits[k] += int(match[:, :k].any(dim=1).sum())
    out = {}
    for k in ks:
        out[f"image_to_text_recall@{k}"] = i2t_hits[k] / len(image_emb)
        out[f"text_to_image_recall@{k}"] = t2i_hits[k] / len(texts)
    out[SELECTION_METRIC] = (out["image_to_text_recall@5"] + out["text_to_image_recall@5"]) / 2
    return out


@torch.no_grad()
def validate(encoder: PairEncoder, dataset: PairDataset, collate: Collate, batch_size: int,
             device: torch.device, precision: str, num_workers: int = 0) -> dict[str, float]:
    """Sigmoid loss (over consecutive groups of `batch_size` pairs) and retrieval recall on `dataset`."""
    was_training = encoder.training
    encoder.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=[[(0, i) for i in range(s, min(s + batch_size, len(dataset)))]
                                for s in range(0, len(dataset), batch_size)],
        collate_fn=collate, num_workers=num_workers)
    images, texts, loss_sum = [], [], 0.0
    for pixels, input_ids in loader:
        with autocast(device, precision):
            img, txt, scale, bias = encoder(collate.normalise(on_device(device, pixels)), on_device(device, input_ids))
        loss_sum += float(sigmoid_loss(img, txt, scale, bias)) * len(img)
        images.append(img.cpu())
        texts.append(txt.cpu())
    encoder.train(was_training)
    out = {"loss": loss_sum / len(dataset)}
    out.update(retrieval_recall(torch.cat(images), torch.cat(texts), dataset.titles))
    return out


def on_device(device: torch.device, batch: Any) -> torch.Tensor:
    """A loader's tensor (or NumPy array, when batches come through pipes) on `device`."""
    return torch.as_tensor(batch).to(device, non_blocking=True)
