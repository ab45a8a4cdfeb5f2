"""Naive float64 references (loops over rows, textbook formulas) and small helpers for the head tests."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def naive_softplus(x: Tensor) -> Tensor:
    return torch.log(1.0 + torch.exp(x))  # fine for the moderate values the references are given


def cosines(z: Tensor, w: Tensor) -> Tensor:
    zn = z / z.norm(dim=1, keepdim=True)
    wn = w / w.norm(dim=1, keepdim=True)
    return (zn @ wn.t()).clamp(-1, 1)


def margin_target(c: Tensor, kind: str, m: float = 0.0, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0) -> Tensor:
    if kind == "none":
        return c
    if kind == "cosface":
        return c - m
    if kind == "arcface":  # textbook cos(θ + m) with the standard fallback
        theta = torch.arccos(c)
        fallback = c - m * math.sin(math.pi - m)
        return torch.where(c > math.cos(math.pi - m), torch.cos(theta + m), fallback)
    if kind == "combined":
        return torch.cos(m1 * torch.arccos(c) + m2) - m3
    raise ValueError(kind)


def ref_softmax(logits_rows: list[Tensor], labels: Tensor) -> Tensor:
    total = 0.0
    for row, y in zip(logits_rows, labels.tolist()):
        total = total - torch.log(torch.exp(row[y]) / torch.exp(row).sum())
    return total / len(logits_rows)


def ref_bce(logits: Tensor, target_logits: Tensor, labels: Tensor, neg_weight: float = 1.0) -> Tensor:
    total = 0.0
    for i, y in enumerate(labels.tolist()):
        for j in range(logits.shape[1]):
            if j == y:
                total = total + naive_softplus(-target_logits[i])
            else:
                total = total + neg_weight * naive_softplus(logits[i, j])
    return total / logits.shape[0]


def ref_head_loss(name: str, z: Tensor, labels: Tensor, params: dict[str, Tensor], cfg: dict) -> Tensor:
    """The loss of head `name` written out from docs/heads.md, for the parameters in `params`."""
    w, b = params.get("weight"), params.get("bias")
    if name in ("softmax", "bce_u", "bce_d"):
        s = z @ w.t()
        scale, kind = 1.0, "none"
    elif name == "dismax":
        return ref_dismax(z, labels, params["prototypes"], params["distance_scale"])
    elif name == "average_k":
        return ref_average_k(z, labels, params, cfg.get("k", 2.0), cfg.get("mu", 1.0))
    else:
        s = cosines(z, w)
        scale = cfg.get("scale", 64.0)
        kind = cfg.get("margin", "cosface" if name == "uce" else "none")
    m = cfg.get("m", {"cosface": 0.4, "arcface": 0.5}.get(kind, 0.0))
    rows = torch.arange(len(labels))
    target = margin_target(s[rows, labels], kind, m, cfg.get("m1", 1.0), cfg.get("m2", 0.3), cfg.get("m3", 0.2))
    bias_cols = torch.zeros(s.shape[1], dtype=s.dtype) if b is None else b.expand(s.shape[1])
    logits = scale * s - bias_cols
    tlog = scale * target - bias_cols[labels]
    if name in ("softmax", "softmax_norm"):
        rows_l = []
        for i, y in enumerate(labels.tolist()):
            row = logits[i].clone()
            row[y] = tlog[i]
            rows_l.append(row)
        return ref_softmax(rows_l, labels)
    return ref_bce(logits, tlog, labels, cfg.get("neg_weight", 1.0))


def ref_dismax(z: Tensor, labels: Tensor, protos: Tensor, dscale: Tensor, entropic: float = 10.0) -> Tensor:
    zn = z / z.norm(dim=1, keepdim=True)
    pn = protos / protos.norm(dim=1, keepdim=True)
    d = torch.stack([torch.stack([torch.sqrt(((zn[i] - pn[j]) ** 2).sum()) for j in range(len(pn))])
                     for i in range(len(zn))]) * dscale.abs() / math.sqrt(2.0)
    logits = -(d + d.mean(dim=1, keepdim=True))
    return ref_softmax(list(entropic * logits), labels)


def ref_pseudo_labels(probs: Tensor, labels: Tensor, k: float) -> Tensor:
    """Dense pseudo-label matrix by a stable sort (ties by flat index)."""
    batch, n = probs.shape
    q = probs.clone()
    q[torch.arange(batch), labels] = -1.0
    order = torch.sort(q.reshape(-1), descending=True, stable=True).indices
    count = int(round((k - 1) * batch))
    t = torch.zeros(batch * n, dtype=probs.dtype)
    t[order[:count]] = 1.0
    t = t.reshape(batch, n)
    t[torch.arange(batch), labels] = 1.0
    return t


def ref_average_k(z: Tensor, labels: Tensor, params: dict[str, Tensor], k: float, mu: float) -> Tensor:
    u = z @ params["weight"].t() - params["bias"]
    v = z @ params["ml_weight"].t() - params["ml_bias"]
    ce = ref_softmax(list(u), labels)
    t = ref_pseudo_labels(torch.softmax(u.detach(), dim=1), labels, k)
    sig = torch.sigmoid(v)
    bce = -(t * torch.log(sig) + (1 - t) * torch.log(1 - sig)).mean()
    return ce + mu * bce
