"""The pairwise sigmoid loss against a hand computation (distributed equivalence: test_train_ddp.py)."""

from __future__ import annotations

import math

import pytest
import torch

from visrec.model.siglip_loss import distributed_sigmoid_loss, sigmoid_loss


def _log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


def test_matches_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    t, b = math.log(10.0), -10.0
    dots = [[0.6, 0.0, 1.0], [0.8, 1.0, 0.0]]
    expected = 0.0
    for i in range(2):
        for j in range(3):
            label = 1.0 if i == j else -1.0
            expected -= _log_sigmoid(label * (10.0 * dots[i][j] + b))
    expected /= 2  # summed over pairs, divided by the number of images
    got = sigmoid_loss(img, txt, torch.tensor([t]), torch.tensor([b]))
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_offset_places_images_inside_a_larger_text_batch():
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 4, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 4, generator=gen), dim=-1)
    scale, bias = torch.tensor([2.0]), torch.tensor([-5.0])
    whole = sigmoid_loss(img, txt, scale, bias)
    parts = [sigmoid_loss(img[s:s + 3], txt, scale, bias, positive_offset=s) for s in (0, 3)]
    assert float(whole) == pytest.approx(float(sum(parts) / 2), rel=1e-6)


def test_matching_pairs_lower_the_loss_and_train_scale_and_bias():
    eye = torch.eye(4)
    scale = torch.tensor([math.log(10.0)], requires_grad=True)
    bias = torch.tensor([-10.0], requires_grad=True)
    matched = sigmoid_loss(eye, eye, scale, bias)
    swapped = sigmoid_loss(eye, eye[[1, 0, 3, 2]], scale, bias)
    assert float(matched) < float(swapped)
    matched.backward()
    # Positives sit at logit 0 (loss log 2 each): raising the scale and the bias both help them.
    assert scale.grad.item() < 0 and bias.grad.item() < 0


def test_single_process_distributed_loss_is_the_plain_loss():
    eye = torch.eye(3)
    args = (torch.tensor([1.0]), torch.tensor([-1.0]))
    assert torch.equal(distributed_sigmoid_loss(eye, eye, *args), sigmoid_loss(eye, eye, *args))


def test_bf16_inputs_are_scored_in_float32():
    eye = torch.eye(3)
    args = (torch.tensor([math.log(10.0)]), torch.tensor([-10.0]))
    loss = sigmoid_loss(eye.bfloat16(), eye.bfloat16(), *args)
    assert loss.dtype == torch.float32 and float(loss) == pytest.approx(float(sigmoid_loss(eye, eye, *args)))
