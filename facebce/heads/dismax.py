"""DisMax (docs/heads.md §5; Macêdo et al., dlmacedo/distinction-maximization-loss `losses/dismax.py`).

Isometric distances `D_j = |d_s|·‖ẑ − p̂_j‖/√2` to every prototype; logits
`L_j = −(D_j + mean_k D_k)/T`; training loss `−log softmax(E·L)_y` (E = 10), optionally with
fractional probability regularisation (FPR).  The composite OOD score (MMLES by default) is returned
in `HeadOutput.extras["ood_score"]` and by `ood_scores`.  Temperature calibration (ECE) is a metric
and belongs to facebce.eval; `set_temperature` installs its result.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facebce.heads.base import Head, HeadOutput, as_loss_dtype, match_dtype
from facebce.heads.checks import check_bool, check_choice, check_number
from facebce.heads.registry import register_head
from facebce.heads.softmax import softmax_cross_entropy

OOD_SCORES = ("MPS", "ES", "MDS", "MMLS", "MMLES", "MMLEPS")
DISTANCES = ("direct", "matmul")


def ood_scores(logits: Tensor, kind: str = "MMLES") -> Tensor:
    """DisMax's scores on the (temperature-scaled, no E) logits; higher = more in-distribution.

    MPS = max p; ES = Σ p log p; MDS = max L; MMLS = max L + mean L; MMLES = MMLS + ES;
    MMLEPS = MMLES + max p (p = softmax(L); log p via log_softmax, so saturated rows stay finite).
    """
    check_choice("score_type", kind, OOD_SCORES)
    logp = torch.log_softmax(logits, dim=1)
    p = logp.exp()
    if kind == "MPS":
        return p.max(dim=1).values
    es = (p * logp).sum(dim=1)
    if kind == "ES":
        return es
    mds = logits.max(dim=1).values
    if kind == "MDS":
        return mds
    mmls = mds + logits.mean(dim=1)
    if kind == "MMLS":
        return mmls
    if kind == "MMLES":
        return mmls + es
    return mmls + es + p.max(dim=1).values


def fpr_preprocess(images: Tensor, labels: Tensor, generator: Optional[torch.Generator] = None):
    """Fractional probability regularisation input mixing (NCHW), as the DisMax repo does.

    Shuffle the batch; in each image of the second part (from ⌊B/2⌋ on) keep the top-left quadrant and
    take bottom-left, top-right and bottom-right from the image 1, 2 and 3 positions earlier
    (cyclically within that part).  Returns (mixed images, shuffled labels); train with
    `DisMaxHead(..., fpr=True)`, whose loss rebuilds the four-label targets from the labels.
    """
    if images.dim() != 4:
        raise ValueError(f"fpr_preprocess: expected NCHW images, got shape {tuple(images.shape)}")
    batch = images.shape[0]
    idx = torch.randperm(batch, generator=generator).to(images.device)
    x, y = images[idx], labels[idx]
    rest = x[batch // 2:]
    h, w = x.shape[2] // 2, x.shape[3] // 2
    rest[:, :, h:, :w] = torch.roll(rest[:, :, h:, :w], 1, 0)
    rest[:, :, :h, w:] = torch.roll(rest[:, :, :h, w:], 2, 0)
    rest[:, :, h:, w:] = torch.roll(rest[:, :, h:, w:], 3, 0)
    return x, y


def fpr_kl(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over rows of KL(target ‖ softmax(logits)), target = 0.25 on the labels of the row and of
    the rows 1, 2, 3 positions earlier (cyclic; summed when equal) — computed sparsely."""
    logq = torch.log_softmax(logits, dim=1)
    src = torch.stack([torch.roll(labels, k, 0) for k in range(4)], dim=1)  # (R, 4)
    counts = (src[:, :, None] == src[:, None, :]).sum(dim=2).to(logq.dtype)
    logq_src = logq.gather(1, src)
    return (0.25 * (torch.log(0.25 * counts) - logq_src)).sum(dim=1).mean()


@register_head("dismax")
class DisMaxHead(Head):
    """`dismax`: prototypes N(0, 1); learnable distance scale d_s (init 1, used as |d_s|); temperature
    T (buffer, 1 while training); entropic scale E = 10.  `scores(z)` are the logits L (DisMax has no
    bias; the per-row mean term is part of its class score).  `fpr=True` expects batches from
    `fpr_preprocess`.  `distance='direct'` computes ‖ẑ − p̂‖ by differences (repo; zero distance gets
    zero gradient); 'matmul' uses sqrt(2 − 2c) (≈3–20× faster on CPU, less precise near 0)."""

    def __init__(self, embedding_size: int, num_classes: int, *, temperature: float = 1.0,
                 entropic_scale: float = 10.0, fpr: bool = False, alpha: float = 1.0,
                 score_type: str = "MMLES", distance: str = "direct", norm_eps: float = 1e-12) -> None:
        super().__init__(embedding_size, num_classes)
        self.entropic_scale = check_number("entropic_scale", entropic_scale, positive=True)
        self.fpr = check_bool("fpr", fpr)
        self.alpha = check_number("alpha", alpha, non_negative=True)
        self.score_type = check_choice("score_type", score_type, OOD_SCORES)
        self.distance = check_choice("distance", distance, DISTANCES)
        self.norm_eps = check_number("norm_eps", norm_eps, positive=True)
        self.prototypes = nn.Parameter(torch.randn(num_classes, embedding_size))
        self.distance_scale = nn.Parameter(torch.ones(1))
        self.register_buffer("temperature", torch.tensor([check_number("temperature", temperature, positive=True)]))

    def set_temperature(self, temperature: float) -> None:
        self.temperature.fill_(check_number("temperature", temperature, positive=True))

    def distances(self, embeddings: Tensor) -> Tensor:
        z = F.normalize(as_loss_dtype(match_dtype(embeddings, self.prototypes)), dim=1, eps=self.norm_eps)
        p = F.normalize(as_loss_dtype(self.prototypes), dim=1, eps=self.norm_eps)
        if self.distance == "direct":
            d = torch.cdist(z, p, p=2.0, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(2.0)
        else:
            x = 1.0 - F.linear(z, p)  # ‖ẑ − p̂‖²/2
            positive = x > 0
            d = torch.sqrt(torch.where(positive, x, torch.ones_like(x))) * positive
        return torch.abs(self.distance_scale) * d

    def logits(self, embeddings: Tensor) -> Tensor:
        d = self.distances(embeddings)
        return -(d + d.mean(dim=1, keepdim=True)) / self.temperature

    def scores(self, embeddings: Tensor) -> Tensor:
        return self.logits(embeddings)

    def ood_scores(self, embeddings: Tensor, kind: Optional[str] = None) -> Tensor:
        return ood_scores(self.logits(embeddings), kind or self.score_type)

    def forward(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:
        labels = labels.reshape(-1).long()
        logits = self.logits(embeddings)
        scaled = self.entropic_scale * logits
        if self.fpr and self.training:
            half = labels.shape[0] // 2
            if half == 0:
                raise ValueError("DisMax FPR needs a batch of at least 2")
            ce = softmax_cross_entropy(scaled[:half], labels[:half])
            loss = (ce + self.alpha * fpr_kl(scaled[half:], labels[half:])) / 2
        else:
            loss = softmax_cross_entropy(scaled, labels)
        with torch.no_grad():
            ood = ood_scores(logits, self.score_type)
        return HeadOutput(loss=loss, logits=logits.detach(), scores=logits.detach(), bias=None,
                          extras={"ood_score": ood})

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"fpr={self.fpr}, score_type={self.score_type}, distance={self.distance}")
