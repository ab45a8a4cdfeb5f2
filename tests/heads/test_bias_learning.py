"""BCE-U's learned bias moves toward the best global threshold t* (docs/metrics.md §1) on fixed synthetic
features.  The numbers are printed (run with -s) for the report."""
from __future__ import annotations

import torch

from facebce.heads import build_head
from facebce.eval import uniform_accuracy, uniform_accuracy_curve

N, D, PER_CLASS = 10, 32, 60


def features(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    y = torch.arange(N).repeat_interleave(PER_CLASS)
    return centres[y] + 0.22 * torch.randn(len(y), D, generator=g), y


def train(name: str, steps: int, lr: float, **cfg):
    z, y = features()
    torch.manual_seed(1000)
    head = build_head(name, D, N, **cfg)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)

    def snapshot():
        with torch.no_grad():
            s = head.scores(z)
        uni = uniform_accuracy(s, y)
        return {"threshold": head.threshold, "b": head.bias.item(), "t_star": uni.threshold, "acc_uni": uni.accuracy,
                "acc_at_threshold": float(uniform_accuracy_curve(s, y, [head.threshold])[0])}

    before = snapshot()
    for _ in range(steps):
        opt.zero_grad()
        head(z, y).loss.backward()
        opt.step()
    after = snapshot()
    print(f"\n{name} {cfg}: before {before}\n{name} {cfg}: after  {after}")
    return before, after


def test_bce_u_norm_bias_over_gamma_approaches_t_star():
    before, after = train("bce_u_norm", steps=300, lr=0.05, scale=64.0, weight_std=1.0)
    assert before["b"] == torch.log(torch.tensor(N - 1.0)).item()
    gap0 = before["t_star"] - before["threshold"]
    gap1 = after["t_star"] - after["threshold"]
    assert gap0 > 0.15  # t* starts well above b0/γ = ln(9)/64 ...
    assert after["b"] > before["b"]  # ... so b must rise
    assert abs(gap1) < 0.05 and abs(gap1) < abs(gap0) / 4  # docs/heads.md's target |b/γ − t*| ≤ 0.05
    assert after["acc_uni"] > 0.95
    assert after["acc_at_threshold"] >= after["acc_uni"] - 0.02  # b/γ is nearly as good as t*


def test_bce_u_linear_bias_approaches_t_star():
    before, after = train("bce_u", steps=300, lr=0.05)
    gap0 = before["threshold"] - before["t_star"]
    gap1 = after["threshold"] - after["t_star"]
    assert abs(gap1) < abs(gap0) / 2
    assert after["acc_uni"] > 0.9
    assert after["acc_at_threshold"] >= after["acc_uni"] - 0.1
