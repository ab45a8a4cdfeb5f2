"""Extreme logits (|x| ≈ 1e4, γ = 192): finite losses and gradients, and fp32 values that agree with
the same head evaluated in float64."""
from __future__ import annotations

import math

import pytest
import torch

from facebce.heads import bce_loss, build_head, list_heads, softmax_cross_entropy

BATCH, N, D = 8, 11, 6


def extreme_case(name, sign, seed=0):
    torch.manual_seed(seed)
    cfg = {}
    if name in ("softmax_norm", "bce_u_norm", "bce_d_norm", "uce"):
        cfg = {"scale": 192.0, "bias_init": sign * 1e4}  # logits 192·c − b ≈ ∓1e4
        if name == "softmax_norm":
            cfg["bias"] = "per_class"
    head = build_head(name, D, N, **cfg)
    z = torch.randn(BATCH, D)
    if name in ("softmax", "bce_u", "bce_d", "average_k"):
        with torch.no_grad():
            head.weight.copy_(torch.randn(N, D))
            if name == "average_k":
                head.ml_weight.copy_(torch.randn(N, D))
        z = z * 1e4 / z.norm(dim=1, keepdim=True) * sign  # scores w·z of order 1e4
    elif name == "dismax":
        z = z * 1e4 * sign
        with torch.no_grad():
            head.distance_scale.fill_(1e3)  # E·L of order 1e4
    y = torch.randint(0, N, (BATCH,))
    return head, z, y


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", sorted(list_heads()))
def test_extreme_logits_are_finite_and_accurate(name, sign):
    head, z, y = extreme_case(name, sign)
    z32 = z.clone().requires_grad_(True)
    out = head(z32, y)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    assert torch.isfinite(z32.grad).all()
    for pname, p in head.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), pname
    ref = head.double()(z.double(), y).loss.item()
    assert math.isfinite(ref)
    assert out.loss.item() == pytest.approx(ref, rel=1e-4, abs=1e-4)


def test_softmax_ce_has_no_probability_floor():
    # arcface_torch's −log max(p, 1e-30) would stop at 69.08; the loss here is exact
    logits = torch.tensor([[-1e4, 1e4, 0.0]], requires_grad=True)
    loss = softmax_cross_entropy(logits, torch.tensor([0]))
    assert loss.item() == pytest.approx(2e4)
    loss.backward()
    assert logits.grad[0].tolist() == pytest.approx([-1.0, 1.0, 0.0])


def test_bce_extremes_exact():
    logits = torch.tensor([[1e4, -1e4, 1e4, -1e4]], requires_grad=True)
    # positive (col 0) at +1e4 costs 0; negatives: +1e4 costs 1e4, −1e4 costs 0
    loss = bce_loss(logits, torch.tensor([0]))
    assert loss.item() == 1e4
    loss.backward()
    assert logits.grad.tolist() == [[0.0, 0.0, 1.0, 0.0]]
    loss = bce_loss(torch.tensor([[-1e4, 0.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(1e4 + math.log(2.0))


@pytest.mark.parametrize("name", ["softmax_norm", "bce_u_norm", "uce", "softmax", "dismax", "average_k"])
def test_half_precision_gives_fp32_loss(name):
    head = build_head(name, D, N)
    y = torch.randint(0, N, (BATCH,))
    z = torch.randn(BATCH, D)
    full = head(z, y).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # AMP: bf16 matmul, fp32 loss
        out = head(z, y)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(full, rel=0.05)
    out = head(z.to(torch.bfloat16), y)  # half-precision embeddings without autocast
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(full, rel=0.05)
