"""docs/heads.md worked examples, through the heads themselves where a head can be set up to produce them."""
from __future__ import annotations

import math

import pytest
import torch

from facebce.heads import bce_loss, build_head, build_margin, softmax_cross_entropy
from facebce.heads.average_k import average_k_pseudo_labels, average_k_threshold
from facebce.heads.dismax import fpr_kl, fpr_preprocess, ood_scores
from facebce.heads.partial_fc import num_sampled, shard_range
from tests.heads.reference import ref_pseudo_labels

S = torch.tensor([[2.0, 0.5, -1.0]], dtype=torch.float64)
COS = [0.6, 0.1, -0.2]
Y0 = torch.tensor([0])


def linear_head(name, **cfg):
    """A 3-d linear head with W = I, so the scores equal the embedding."""
    head = build_head(name, 3, 3, **cfg).double()
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
    return head


def cosine_setup(name, cos=COS, **cfg):
    """A 2-d normalised head whose cosines with z = (1, 0) are `cos`."""
    head = build_head(name, 2, len(cos), **cfg).double()
    c = torch.tensor(cos, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.stack([c, torch.sqrt(1 - c * c)], dim=1) * 3.0)  # norm must not matter
    return head, torch.tensor([[2.0, 0.0]], dtype=torch.float64)


def test_softmax_example():
    assert softmax_cross_entropy(S, Y0).item() == pytest.approx(0.241311, abs=1e-6)
    head = linear_head("softmax", bias_init=0.0)
    assert head(S, Y0).loss.item() == pytest.approx(0.241311, abs=1e-6)


def test_bce_u_linear_example():
    head = linear_head("bce_u", bias_init=1.0)
    out = head(S, Y0)
    assert out.loss.item() == pytest.approx(0.914267, abs=1e-6)
    assert bce_loss(S - 1.0, Y0).item() == pytest.approx(0.313262 + 0.601005, abs=1e-6)
    assert head.threshold == 1.0


def test_bce_d_linear_example():
    head = linear_head("bce_d")
    with torch.no_grad():
        head.bias.copy_(torch.tensor([1.0, 0.0, 2.0]))
    assert head(S, Y0).loss.item() == pytest.approx(1.335926, abs=1e-6)
    assert head.class_thresholds.tolist() == [1.0, 0.0, 2.0]


def test_bce_nu_example():
    head, z = cosine_setup("bce_u_norm", scale=64.0, bias_init=10.0)
    out = head(z, Y0)
    assert out.loss.item() == pytest.approx(0.0269571, rel=1e-5)
    assert torch.allclose(out.scores, torch.tensor([COS], dtype=torch.float64), atol=1e-12)
    assert head.threshold == pytest.approx(10.0 / 64.0)


def test_uce_example_and_clamp():
    head, z = cosine_setup("uce", bias_init=10.0)
    assert head(z, Y0).loss.item() == pytest.approx(0.0859899, rel=1e-5)
    # UniFace clamps both softplus arguments to [−s, s]: with b = 100 the negatives' arguments
    # (6.4 − 100 etc.) are clamped to −64, and the positive's (100 − 12.8 = 87.2) to 64
    head, z = cosine_setup("uce", bias_init=100.0, clamp=True)
    expected = math.log1p(math.exp(64.0)) + 2 * math.log1p(math.exp(-64.0))
    assert head(z, Y0).loss.item() == pytest.approx(expected, rel=1e-12)
    head, z = cosine_setup("uce", bias_init=100.0)
    assert head(z, Y0).loss.item() == pytest.approx(87.2, rel=1e-9)


def test_uce_default_bias_init_casia():
    head = build_head("uce", 4, 10572)
    assert head.bias.item() == pytest.approx(11.5685, abs=1e-4)
    assert build_head("uce", 4, 10572, r=0.1).bias.item() == pytest.approx(math.log(10572.0), rel=1e-6)


def test_bce_default_bias_init():
    for name in ("bce_u", "bce_d", "bce_u_norm", "bce_d_norm"):
        head = build_head(name, 4, 1001)
        assert torch.allclose(head.bias, torch.full_like(head.bias, math.log(1000.0)))


def b_star(n, a, b):
    return a + math.log(((n - 2) + math.sqrt((n - 2) ** 2 + 4 * (n - 1) * math.exp(b - a))) / 2)


def test_stationary_bias_of_bce_u():
    assert b_star(3, -1.0, 1.0) == pytest.approx(0.476275, abs=1e-6)
    assert b_star(2, -1.0, 3.0) == pytest.approx(1.0, abs=1e-12)
    # minimise the bce_u head's loss over b alone (positives score B = 1, negatives A = −1) by Newton
    head = linear_head("bce_u", bias_init=0.0)
    z = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    for _ in range(30):
        (g,) = torch.autograd.grad(head(z, y).loss, head.bias, create_graph=True)
        (h,) = torch.autograd.grad(g, head.bias)
        with torch.no_grad():
            head.bias -= g.detach() / h
    assert head.bias.item() == pytest.approx(0.476275, abs=1e-6)


@pytest.mark.parametrize("c, expected", [(0.6, 0.143009), (0.0, -0.479426), (-0.9, -1.139713)])
def test_arcface_examples(c, expected):
    arc = build_margin("arcface")
    assert arc.target(torch.tensor([c], dtype=torch.float64)).item() == pytest.approx(expected, abs=1e-6)
    assert arc.th == pytest.approx(-0.877583, abs=1e-6)
    assert arc.mm == pytest.approx(0.239713, abs=1e-6)


def test_arcface_easy_margin_and_straight_through():
    c = torch.tensor([0.6, -0.3, -0.9], dtype=torch.float64, requires_grad=True)
    easy = build_margin("arcface", easy_margin=True).target(c)
    assert easy.tolist() == pytest.approx([0.143009, -0.3, -0.9], abs=1e-6)
    st = build_margin("arcface", straight_through=True).target(c)
    # forward: cos(arccos(c) + m) with no fallback (−0.9 keeps increasing past π − m); backward: identity
    assert st.tolist() == pytest.approx([math.cos(math.acos(v) + 0.5) for v in (0.6, -0.3, -0.9)], abs=1e-12)
    (g,) = torch.autograd.grad(st.sum(), c)
    assert g.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("ms, expected", [((1.0, 0.3, 0.2), 0.136786), ((0.9, 0.4, 0.15), 0.179931)])
def test_combined_margin_examples(ms, expected):
    m = build_margin("combined", m1=ms[0], m2=ms[1], m3=ms[2])
    assert m.target(torch.tensor([0.6], dtype=torch.float64)).item() == pytest.approx(expected, abs=1e-6)


def test_cosface_and_margin_list_translation():
    assert build_margin("cosface").target(torch.tensor([0.6])).item() == pytest.approx(0.2)
    arc = build_margin(margin_list=(1.0, 0.5, 0.0))
    assert arc.name == "arcface" and arc.straight_through and arc.m == 0.5
    cos = build_margin(margin_list=(1.0, 0.0, 0.4))
    assert cos.name == "cosface" and cos.m == 0.4
    assert build_margin(margin_list=(0.9, 0.4, 0.15)).name == "cosface"  # m1, m2 silently ignored


def test_interclass_filtering_zeroes_noisy_negatives():
    head, z = cosine_setup("softmax_norm", cos=[0.6, 0.5, 0.3, -0.2], scale=10.0,
                           interclass_filtering_threshold=0.4)
    out = head(z, Y0)
    # training logits: [6, 0 (0.5 > 0.4 filtered), 3, −2]; the target (0.6) is never filtered
    expected = -math.log(math.exp(6) / (math.exp(6) + math.exp(0) + math.exp(3) + math.exp(-2)))
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.logits[0].tolist() == pytest.approx([6.0, 5.0, 3.0, -2.0], abs=1e-9)  # reported unfiltered


def dismax_setup(**cfg):
    head = build_head("dismax", 2, 3, **cfg).double()
    with torch.no_grad():
        head.prototypes.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    return head, torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("distance", ["direct", "matmul"])
def test_dismax_example(distance):
    head, z = dismax_setup(distance=distance)
    assert head.distances(z)[0].tolist() == pytest.approx([0.0, 1.0, math.sqrt(2.0)], abs=1e-7)
    out = head(z, Y0)
    # the original spec printed L_2 = −2.219036 and loss 4.6135e-5; −(√2 + mean D) = −2.218951 and
    # log(1 + e^-10 + e^-14.142) = 4.61202e-5 (its MMLES −3.3328 agrees with these; docs/heads.md §5 has them)
    assert out.logits[0].tolist() == pytest.approx([-0.804738, -1.804738, -2.218951], abs=1e-6)
    assert out.loss.item() == pytest.approx(4.61202e-5, rel=1e-5)
    assert out.extras["ood_score"].item() == pytest.approx(-3.3328, abs=1e-4)
    out.loss.backward()  # the sample sits exactly on prototype 0: zero distance, gradient must be finite
    assert torch.isfinite(z.grad).all() and torch.isfinite(head.prototypes.grad).all()


def test_dismax_equals_isomax_plus():
    torch.manual_seed(0)
    head = build_head("dismax", 5, 7).double()
    with torch.no_grad():
        head.distance_scale.fill_(-1.7)  # used as |d_s|
    z = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 6])
    d = torch.cdist(torch.nn.functional.normalize(z), torch.nn.functional.normalize(head.prototypes))
    isomax_plus = torch.nn.functional.cross_entropy(-10.0 * (1.7 / math.sqrt(2.0)) * d, y)
    assert head(z, y).loss.item() == pytest.approx(isomax_plus.item(), rel=1e-12)


def test_dismax_ood_score_kinds():
    logits = torch.tensor([[-0.804738, -1.804738, -2.219036]], dtype=torch.float64)
    p = torch.softmax(logits, 1)
    es = (p * p.log()).sum().item()
    mx, mean = logits.max().item(), logits.mean().item()
    assert ood_scores(logits, "MPS").item() == pytest.approx(p.max().item())
    assert ood_scores(logits, "ES").item() == pytest.approx(es)
    assert ood_scores(logits, "MDS").item() == pytest.approx(mx)
    assert ood_scores(logits, "MMLS").item() == pytest.approx(mx + mean)
    assert ood_scores(logits, "MMLEPS").item() == pytest.approx(mx + mean + es + p.max().item())
    # saturated rows stay finite (the repo's p·log p gives NaN there)
    assert torch.isfinite(ood_scores(torch.tensor([[0.0, -1e4]]), "ES")).all()


def test_dismax_fpr_mixing_and_targets():
    images = torch.arange(6, dtype=torch.float64).reshape(6, 1, 1, 1).expand(6, 1, 4, 4).clone()
    labels = torch.tensor([10, 11, 12, 13, 14, 15])
    g = torch.Generator().manual_seed(3)
    x, y = fpr_preprocess(images, labels, generator=g)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    assert y.tolist() == labels[perm].tolist()
    rest = perm[3:]  # image values are their index: each quadrant says where it came from
    assert x[:3, 0].flatten(1).eq(perm[:3, None].double()).all()  # first half untouched
    for i in range(3):
        assert x[3 + i, 0, 0, 0] == rest[i]              # top-left kept
        assert x[3 + i, 0, 3, 0] == rest[(i - 1) % 3]    # bottom-left from 1 earlier
        assert x[3 + i, 0, 0, 3] == rest[(i - 2) % 3]    # top-right from 2 earlier
        assert x[3 + i, 0, 3, 3] == rest[(i - 3) % 3]    # bottom-right from 3 earlier
    # KL against the four-label target, dense reference (labels repeat when the rest is small)
    logits = torch.randn(3, 5, dtype=torch.float64)
    lab = torch.tensor([1, 4, 1])
    target = torch.zeros(3, 5, dtype=torch.float64)
    for k in range(4):
        target[torch.arange(3), torch.roll(lab, k, 0)] += 0.25
    dense = torch.nn.functional.kl_div(torch.log_softmax(logits, 1), target, reduction="batchmean")
    assert fpr_kl(logits, lab).item() == pytest.approx(dense.item(), rel=1e-12)


def test_average_k_pseudo_labels_with_ties():
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1],
                          [0.1, 0.3, 0.3, 0.3],
                          [0.4, 0.4, 0.1, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    rows, cols = average_k_pseudo_labels(probs, labels, k=2.0)  # (K−1)·B = 3 extra positives
    dense = torch.zeros_like(probs)
    dense[rows, cols] = 1
    # non-target values: 0.4 (row 2, col 1) first, then the 0.3s (row 1, cols 2, 3), then ties at 0.2
    # in row 0 — none needed.  Exactly K = 2 per sample on average.
    assert dense.tolist() == [[1, 0, 0, 0], [0, 1, 1, 1], [1, 1, 0, 0]]
    assert dense.sum().item() == 2.0 * 3
    rows, cols = average_k_pseudo_labels(probs, labels, k=2 + 1 / 3)  # 4 extras: one 0.2 tie, lowest flat index
    dense = torch.zeros_like(probs)
    dense[rows, cols] = 1
    assert dense[0].tolist() == [1, 1, 0, 0]
    assert torch.equal(dense, ref_pseudo_labels(probs, labels, 2 + 1 / 3))


def test_average_k_threshold_returns_k_per_sample_on_average():
    v = torch.randn(50, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tau = average_k_threshold(v, 3.0)
    assert (v >= tau).sum().item() == 150


def test_partial_fc_shards_and_sample_count():
    assert [shard_range(10, 3, r) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
    assert [shard_range(10572, 8, r)[1] for r in range(8)] == [1322, 1322, 1322, 1322, 1321, 1321, 1321, 1321]
    assert num_sampled(0.29, 100) == 29  # int(0.29 * 100) would give 28
    assert num_sampled(0.1, 4) == 0 and num_sampled(1.0, 7) == 7
