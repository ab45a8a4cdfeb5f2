"""The registry: every head builds by name from a config dict; bad names, keys and values raise
ConfigError naming the key; the thresholds each head exposes."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from facebce.errors import ConfigError
from facebce.heads import HeadOutput, build_head, config_keys, head_from_config, list_heads

EXPECTED = {"softmax", "softmax_norm", "bce_u", "bce_d", "bce_u_norm", "bce_d_norm", "uce", "dismax", "average_k"}


def test_registered_names():
    assert set(list_heads()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_head_builds_from_a_config_dict_and_trains(name):
    torch.manual_seed(0)
    head = head_from_config({"name": name}, 8, 6)
    z = torch.randn(5, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2, 5, 5])
    out = head(z, y)
    assert isinstance(out, HeadOutput)
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32 and out.loss.item() > 0
    assert out.logits.shape == out.scores.shape == (5, 6)
    assert not out.logits.requires_grad and not out.scores.requires_grad
    assert torch.allclose(head.scores(z), out.scores, atol=1e-6)
    out.loss.backward()
    assert z.grad.abs().sum() > 0
    opt = torch.optim.SGD(head.parameters(), lr=0.05)
    before = head(z, y).loss.item()
    for _ in range(20):
        opt.zero_grad()
        head(z, y).loss.backward()
        opt.step()
    assert head(z, y).loss.item() < before


def test_unknown_head_and_keys():
    with pytest.raises(ConfigError, match="unknown head 'arcfac'.*softmax_norm"):
        build_head("arcfac", 8, 6)
    with pytest.raises(ConfigError, match=r"head\.gamma.*valid: .*scale"):
        build_head("bce_u_norm", 8, 6, gamma=64)
    with pytest.raises(ConfigError, match=r"head\.margin.*valid"):
        build_head("bce_u", 8, 6, margin="cosface")  # linear heads take no margin
    with pytest.raises(ConfigError, match="name"):
        head_from_config({"scale": 3}, 8, 6)
    assert "margin" in config_keys("uce") and "r" in config_keys("uce") and "_total_classes" not in config_keys("uce")


@pytest.mark.parametrize("name, cfg, key", [
    ("softmax_norm", {"scale": -1.0}, "scale"),
    ("softmax_norm", {"bias": "shared"}, "bias"),
    ("softmax_norm", {"margin": "sphereface"}, "margin"),
    ("softmax_norm", {"m": 0.3}, "m"),  # m without a margin that uses it
    ("softmax_norm", {"margin": "cosface", "m1": 0.9}, "m1"),
    ("softmax_norm", {"margin_list": (0.9, 0.4, 0.0)}, "margin_list"),
    ("softmax_norm", {"margin_list": (1.0, 0.5, 0.0), "margin": "arcface"}, "margin_list"),
    ("softmax_norm", {"margin": "arcface", "easy_margin": True, "straight_through": True}, "easy_margin"),
    ("softmax_norm", {"margin": "arcface", "easy_margin": "yes"}, "easy_margin"),
    ("bce_u_norm", {"scale": 0}, "scale"),
    ("bce_u_norm", {"neg_weight": -1.0}, "neg_weight"),
    ("bce_u_norm", {"weight_init": "xavier"}, "weight_init"),
    ("bce_u", {"bias_init": "ln"}, "bias_init"),
    ("uce", {"r": 0.0}, "r"),
    ("dismax", {"score_type": "energy"}, "score_type"),
    ("dismax", {"temperature": 0.0}, "temperature"),
    ("average_k", {"k": 0.5}, "k"),
    ("average_k", {"k": 7.0}, "k"),
])
def test_invalid_values_name_the_key(name, cfg, key):
    with pytest.raises(ConfigError, match=key):
        build_head(name, 8, 6, **cfg)


def test_bce_needs_two_classes():
    with pytest.raises(ConfigError, match="num_classes"):
        build_head("bce_u", 8, 1)


def test_gamma_outside_the_papers_range_warns():
    with pytest.warns(UserWarning, match="outside"):
        build_head("bce_u_norm", 8, 6, scale=16.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_head("bce_u_norm", 8, 6, scale=192.0)


def test_thresholds_exposed_per_head():
    assert build_head("bce_u", 8, 6).threshold == pytest.approx(math.log(5))
    assert build_head("bce_u_norm", 8, 6, scale=32.0).threshold == pytest.approx(math.log(5) / 32)
    assert build_head("uce", 8, 6).threshold == pytest.approx(math.log(60) / 64)
    for name in ("softmax", "softmax_norm", "bce_d", "bce_d_norm", "dismax", "average_k"):
        assert build_head(name, 8, 6).threshold is None
    assert build_head("bce_d_norm", 8, 6, scale=32.0).class_thresholds.tolist() == pytest.approx([math.log(5) / 32] * 6)
    assert build_head("softmax_norm", 8, 6).bias is None
    assert build_head("softmax_norm", 8, 6, bias="unified").bias.shape == (1,)
    assert build_head("softmax_norm", 8, 6, bias="per_class").bias.shape == (6,)


def test_default_inits():
    torch.manual_seed(0)
    d, n = 512, 2000
    assert build_head("softmax_norm", d, n).weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert build_head("uce", d, n).weight.std().item() == pytest.approx(1 / math.sqrt(d), rel=0.02)  # Kaiming a=1
    lin = build_head("softmax", d, n)
    bound = 1 / math.sqrt(d)
    assert lin.weight.abs().max().item() <= bound and lin.weight.abs().max().item() > 0.99 * bound
    assert lin.bias.abs().max().item() <= bound and lin.bias.std().item() > 0.5 * bound / math.sqrt(3)
    dm = build_head("dismax", d, 50)
    assert dm.prototypes.std().item() == pytest.approx(1.0, rel=0.05)
    assert dm.distance_scale.item() == 1.0 and dm.temperature.item() == 1.0


def test_average_k_fit_threshold_and_sets():
    torch.manual_seed(0)
    head = build_head("average_k", 8, 6, k=2.0)
    z = torch.randn(40, 8)
    with pytest.raises(RuntimeError, match="fit_threshold"):
        head.predict_sets(z)
    head.fit_threshold(z)
    sets = head.predict_sets(z)
    assert sets.sum().item() == 80  # K·n labels over the fitting set
