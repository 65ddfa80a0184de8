"""SigLIP's pairwise sigmoid loss, single-process and with negatives shared across processes.

Every image-text pair of the (global) batch is an independent binary classification:
matching pairs are positives, all others negatives, with logits
`exp(logit_scale) * <img, txt> + logit_bias` (Zhai et al., 2023, "Sigmoid Loss for
Language Image Pre-Training"). Under DDP each process scores its local images
against the texts of *all* processes, so every image sees the same negatives as on
one big device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def sigmoid_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor, positive_offset: int = 0) -> torch.Tensor:
    """Sum over all (image, text) pairs of -log sigmoid(label * logit), divided by the number of images.

    `image_emb` (n, d) and `text_emb` (m, d) must be L2-normalised. Image `i` matches
    text `i + positive_offset` (the offset places a process's images inside a gathered
    text batch); every other pair is a negative. Computed in float32 whatever the
    autocast dtype, because the bias (-10 at init) makes most logits strongly negative
    and bf16 would round their small losses away.
    """
    image_emb, text_emb = image_emb.float(), text_emb.float()
    logits = image_emb @ text_emb.T * logit_scale.float().exp() + logit_bias.float()
    n = image_emb.shape[0]
    labels = -torch.ones_like(logits)
    rows = torch.arange(n, device=logits.device)
    labels[rows, rows + positive_offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / n


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns each process the gradient summed over all processes.

    Every process's loss depends on every process's texts; the gradient of the total
    loss w.r.t. this process's shard is therefore the sum of the gradients all
    processes computed for it. All-reduce + slice (rather than reduce-scatter) because
    gloo has no reduce-scatter and the tensors are only (batch, dim).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        ctx.n = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(ctx.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (equal shapes) from all processes, in rank order, keeping gradients."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def distributed_sigmoid_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                             logit_bias: torch.Tensor) -> torch.Tensor:
    """This process's share of the global-batch sigmoid loss, with texts gathered from all processes.

    Each process returns (its images vs all texts) / local batch. DDP averages
    gradients over processes, and the gathered texts carry every process's gradient
    back to their owner, so the applied gradient equals that of `sigmoid_loss` on the
    whole global batch; the mean of the returned values equals that loss.
    """
    all_text = gather_with_grad(text_emb)
    offset = dist.get_rank() * image_emb.shape[0] if all_text is not text_emb else 0
    return sigmoid_loss(image_emb, all_text, logit_scale, logit_bias, positive_offset=offset)
