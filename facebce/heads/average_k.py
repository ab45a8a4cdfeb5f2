"""Average-K two-head loss (docs/heads.md §6; Garcin et al., arXiv 2303.18118).

Head 1: softmax logits `u = W1 z − b1`, trained with CE.  Head 2: N sigmoid logits `v = W2 z − b2`,
trained with BCE against per-batch pseudo-labels from thresholding the detached softmax of head 1
so that exactly K labels per sample are positive on average.  At inference one global threshold on
head 2 (fitted on held-out data to return K·n labels over n samples) gives variable-size sets.
Thresholds are kept on the logit scale (σ is monotone; this avoids ties from fp32 saturation of σ).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from facebce.heads.base import WEIGHT_INITS, Head, HeadOutput, as_loss_dtype, init_weight, match_dtype, softplus
from facebce.heads.checks import check_choice, check_number
from facebce.heads.registry import register_head
from facebce.heads.softmax import softmax_cross_entropy


def kth_largest_with_ties(flat: Tensor, count: int) -> Tensor:
    """Flat indices of the `count` largest entries; ties at the cut are broken by smaller flat index."""
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    values, index = torch.topk(flat, count, sorted=False)
    cut = values.min()
    if int((flat == cut).sum()) == int((values == cut).sum()):  # no tie straddles the cut
        return index
    above = index[values > cut]
    at = torch.nonzero(flat == cut).squeeze(1)[: count - above.numel()]
    return torch.cat([above, at])


def average_k_pseudo_labels(probs: Tensor, labels: Tensor, k: float) -> tuple[Tensor, Tensor]:
    """Positive entries of the B×N pseudo-label matrix, as (rows, cols).

    The true label of every sample is positive; among the non-target entries, the (K−1)·B largest
    probabilities (rounded to an integer count) are positive, ties by flat index.
    """
    batch, n = probs.shape
    count = int(round((k - 1.0) * batch))
    q = probs.detach().clone()
    rows = torch.arange(batch, device=probs.device)
    q[rows, labels] = -1.0  # below every probability: never chosen as an extra positive
    extra = kth_largest_with_ties(q.reshape(-1), min(count, batch * (n - 1)))
    return torch.cat([rows, extra // n]), torch.cat([labels, extra % n])


def average_k_threshold(multilabel_logits: Tensor, k: float) -> float:
    """Global threshold (logit scale) = the (K·n)-th largest of the n×N head-2 logits."""
    n = multilabel_logits.shape[0]
    count = int(round(k * n))
    if not 1 <= count <= multilabel_logits.numel():
        raise ValueError(f"average_k_threshold: K·n = {count} outside [1, {multilabel_logits.numel()}]")
    return float(torch.topk(multilabel_logits.reshape(-1), count, sorted=False).values.min())


@register_head("average_k")
class AverageKHead(Head):
    """`average_k`: loss `CE(u, y) + μ·mean_{B·N} BCEWithLogits(v, pseudo)`.  `scores` are head 1's
    bias-free `W1 z`; `logits` = u; extras["multilabel_logits"] = v.  `fit_threshold` on held-out
    embeddings, then `predict_sets`."""

    def __init__(self, embedding_size: int, num_classes: int, *, k: float = 2.0, mu: float = 1.0,
                 weight_init: str = "linear", weight_std: float = 0.01) -> None:
        super().__init__(embedding_size, num_classes)
        self.k = check_number("k", k, low=1.0, high=float(num_classes))
        self.mu = check_number("mu", mu, non_negative=True)
        check_choice("weight_init", weight_init, WEIGHT_INITS)
        bound = 1.0 / math.sqrt(embedding_size)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        self.bias = nn.Parameter(torch.empty(num_classes).uniform_(-bound, bound))
        self.ml_weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        self.ml_bias = nn.Parameter(torch.empty(num_classes).uniform_(-bound, bound))
        init_weight(self.weight, weight_init, weight_std)
        init_weight(self.ml_weight, weight_init, weight_std)
        self.register_buffer("threshold_logit", torch.tensor(float("nan")))

    def scores(self, embeddings: Tensor) -> Tensor:
        return as_loss_dtype(match_dtype(embeddings, self.weight) @ self.weight.t())

    def multilabel_logits(self, embeddings: Tensor) -> Tensor:
        return as_loss_dtype(match_dtype(embeddings, self.ml_weight) @ self.ml_weight.t()) - self.ml_bias

    def forward(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:
        labels = labels.reshape(-1).long()
        scores = self.scores(embeddings)
        u = scores - self.bias
        v = self.multilabel_logits(embeddings)
        ce = softmax_cross_entropy(u, labels)
        with torch.no_grad():
            rows, cols = average_k_pseudo_labels(torch.softmax(u, dim=1), labels, self.k)
        bce = (softplus(v).sum() - v[rows, cols].sum()) / v.numel()
        loss = ce + self.mu * bce if self.mu != 0 else ce
        return HeadOutput(loss=loss, logits=u.detach(), scores=scores.detach(), bias=self.bias.detach(),
                          extras={"multilabel_logits": v.detach()})

    @torch.no_grad()
    def fit_threshold(self, embeddings: Tensor, k: Optional[float] = None) -> float:
        """Fit and store the global head-2 threshold on held-out embeddings (logit scale)."""
        tau = average_k_threshold(self.multilabel_logits(embeddings), self.k if k is None else k)
        self.threshold_logit.fill_(tau)
        return tau

    @torch.no_grad()
    def predict_sets(self, embeddings: Tensor) -> Tensor:
        """Boolean n×N membership `σ(v_j) ≥ τ` (compared on the logit scale)."""
        if torch.isnan(self.threshold_logit):
            raise RuntimeError("AverageKHead.predict_sets: call fit_threshold on held-out embeddings first")
        return self.multilabel_logits(embeddings) >= self.threshold_logit

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, k={self.k:g}, mu={self.mu:g}"
