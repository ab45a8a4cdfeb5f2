"""Every head against a naive float64 reference (loss and gradients) and torch.autograd.gradcheck."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from facebce.heads import build_head, build_margin, list_heads
from tests.heads.reference import cosines, ref_head_loss

CASES = [
    ("softmax", {}),
    ("softmax_norm", {"scale": 16.0}),
    ("softmax_norm", {"scale": 16.0, "bias": "unified"}),
    ("softmax_norm", {"scale": 16.0, "bias": "per_class", "margin": "cosface", "m": 0.3}),
    ("softmax_norm", {"scale": 8.0, "margin": "arcface"}),
    ("softmax_norm", {"scale": 8.0, "margin": "combined", "m1": 0.9, "m2": 0.4, "m3": 0.15}),
    ("bce_u", {}),
    ("bce_d", {}),
    ("bce_u_norm", {"scale": 32.0}),
    ("bce_d_norm", {"scale": 32.0, "margin": "cosface"}),
    ("bce_u_norm", {"scale": 32.0, "margin": "arcface", "neg_weight": 0.5}),
    ("uce", {}),
    ("uce", {"neg_weight": 2.0, "scale": 48.0}),
    ("dismax", {}),
    ("dismax", {"distance": "matmul"}),
    ("average_k", {"k": 2.5, "mu": 0.7}),
]


def test_every_registered_head_is_covered():
    assert {name for name, _ in CASES} == set(list_heads())


def make(name, cfg, batch=6, n=7, d=5, seed=0):
    torch.manual_seed(seed)
    head = build_head(name, d, n, **cfg).double()
    with torch.no_grad():  # move every parameter off its init so biases etc. matter
        for pname, p in head.named_parameters():
            if pname == "bias" or pname == "ml_bias":
                p.add_(0.3 * torch.randn_like(p))
            elif pname == "distance_scale":
                p.fill_(1.3)
            else:
                p.copy_(torch.randn_like(p))
    z = torch.randn(batch, d, dtype=torch.float64)
    y = torch.randint(0, n, (batch,))
    y[0] = n - 1
    if hasattr(head, "weight"):  # one target nearly opposite its centre: ArcFace's fallback branch
        with torch.no_grad():
            z[1] = -head.weight[y[1]] + 0.05 * torch.randn(d, dtype=torch.float64)
    return head, z, y


@pytest.mark.parametrize("name, cfg", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_loss_and_gradients_match_naive_reference(name, cfg):
    head, z, y = make(name, cfg)
    params = dict(head.named_parameters())
    z1 = z.clone().requires_grad_(True)
    out = head(z1, y)
    grads = torch.autograd.grad(out.loss, [z1] + list(params.values()), allow_unused=True)

    z2 = z.clone().requires_grad_(True)
    ref_params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    ref = ref_head_loss(name, z2, y, ref_params, cfg)
    ref_grads = torch.autograd.grad(ref, [z2] + list(ref_params.values()), allow_unused=True)

    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    for pname, g, r in zip(["z"] + list(params), grads, ref_grads):
        if r is None:  # e.g. the -nu softmax bias: cancels in the softmax
            assert g is None or torch.count_nonzero(g) == 0, pname
            continue
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-11), pname


@pytest.mark.parametrize("name, cfg", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_gradcheck(name, cfg):
    head, z, y = make(name, cfg, batch=3, n=4, d=3, seed=1)
    names = [k for k, p in head.named_parameters()]

    def f(z, *ps):
        return functional_call(head, dict(zip(names, ps)), (z, y)).loss

    inputs = (z.requires_grad_(True),) + tuple(p.detach().clone().requires_grad_(True) for p in head.parameters())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_scores_are_bias_free_and_logits_subtract_the_bias():
    head, z, y = make("bce_d_norm", {"scale": 32.0, "margin": "arcface"})
    out = head(z, y)
    c = cosines(z, head.weight.detach())
    assert torch.allclose(out.scores, c, atol=1e-12)
    assert torch.allclose(head.scores(z), c, atol=1e-12)
    assert torch.allclose(out.logits, 32.0 * c - head.bias.detach(), atol=1e-10)  # no margin in the logits
    assert torch.equal(out.bias, head.bias.detach())
    assert torch.allclose(head.class_thresholds, head.bias.detach() / 32.0)


@pytest.mark.parametrize("kind, kw", [("arcface", {}), ("arcface", {"easy_margin": True}),
                                      ("cosface", {}), ("combined", {})])
def test_margin_gradcheck_across_branches(kind, kw):
    margin = build_margin(kind, **kw)
    c = torch.tensor([0.7, 0.2, -0.1, -0.5, -0.95], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(margin.target, (c,), eps=1e-7, atol=1e-6)


def test_bce_loss_uses_per_column_negative_weights():
    from facebce.heads import bce_loss
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -3.0]], dtype=torch.float64)
    y = torch.tensor([2, -1])  # second row: no positive column here (Partial-FC)
    w = torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64)
    sp = torch.nn.functional.softplus
    expected = (sp(torch.tensor(-2.0)) + 2 * sp(torch.tensor(0.5)) + 3 * sp(torch.tensor(-1.0))
                + 2 * sp(torch.tensor(1.0)) + 3 * sp(torch.tensor(0.0)) + 5 * sp(torch.tensor(-3.0))) / 2
    assert bce_loss(logits, y, neg_weight=w).item() == pytest.approx(expected.item(), rel=1e-6)
