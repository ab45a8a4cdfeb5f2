"""SoftMax heads (docs/heads.md §1) and the softmax cross-entropy that also runs across Partial-FC shards."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from facebce.errors import ConfigError
from facebce.heads._dist import all_reduce_, all_reduce_max_
from facebce.heads.base import ClassCentreHead
from facebce.heads.checks import check_choice
from facebce.heads.margins import MARGIN_KEYS, margin_from_config
from facebce.heads.registry import register_head


class _ShardedSoftmaxCE(Function):
    """Softmax CE over columns split across ranks (docs/heads.md §7), exact on one process too.

    Reductions: MAX of the row maxima, SUM of the exp-sums and SUM of the target logit (owned by one
    rank; label −1 elsewhere).  Loss `Σ_rows (log Σ exp(l − M) + M − l_y) / denom` — the target
    *logit* is reduced rather than its probability, so there is no 1e-30 floor and no underflow.
    Gradient w.r.t. the local logits: `(p − onehot) / denom`.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor, cols: Tensor, denom: int, group) -> Tensor:
        n_rows, n_cols = logits.shape
        if n_cols:
            row_max = logits.max(dim=1).values
        else:
            row_max = logits.new_full((n_rows,), float("-inf"))
        all_reduce_max_(row_max, group)
        probs = torch.exp(logits - row_max[:, None])
        sums = torch.zeros((2, n_rows), dtype=logits.dtype, device=logits.device)
        sums[0] = probs.sum(dim=1)
        sums[1, rows] = logits[rows, cols]
        all_reduce_(sums, group)
        loss = (torch.log(sums[0]) + row_max - sums[1]).sum() / denom
        probs /= sums[0][:, None]
        ctx.save_for_backward(probs, rows, cols)
        ctx.denom = denom
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        probs, rows, cols = ctx.saved_tensors
        g = grad_loss / ctx.denom
        grad = probs * g
        grad[rows, cols] -= g
        return grad, None, None, None, None


def softmax_cross_entropy(logits: Tensor, labels: Tensor, *, denom: int | None = None, group=None) -> Tensor:
    """Mean softmax CE `logsumexp(l) − l_y`; labels −1 mark rows whose target column lives on another
    rank.  `denom` defaults to the number of rows; `group` = the Partial-FC process group or None."""
    rows = torch.nonzero(labels >= 0).squeeze(1)
    return _ShardedSoftmaxCE.apply(logits, rows, labels[rows], logits.shape[0] if denom is None else denom, group)


class _SoftmaxLoss:
    """Mixin: the target entry (margin applied) is written into the logits, then softmax CE."""

    def _loss(self, logits, labels, rows, cols, target, *, denom, group=None, neg_weight=None):
        if neg_weight is not None:
            raise ConfigError("neg_rescale: only applies to BCE-family heads (softmax has no negative sum)")
        logits = logits.index_put((rows, cols), target)
        return _ShardedSoftmaxCE.apply(logits, rows, cols, denom, group)


@register_head("softmax")
class SoftmaxHead(_SoftmaxLoss, ClassCentreHead):
    """`softmax`: linear `l_j = w_j·z − b_j` (nn.Linear with β = −b; nn.Linear's default init)."""

    normalized = False
    bias_mode = "per_class"

    def __init__(self, embedding_size: int, num_classes: int, *, weight_init: str = "linear",
                 weight_std: float = 0.01, bias_init: float | None = None,
                 _total_classes: int | None = None) -> None:
        super().__init__(embedding_size, num_classes, weight_init=weight_init, weight_std=weight_std,
                         bias_init=bias_init, _total_classes=_total_classes)


@register_head("softmax_norm")
class NormSoftmaxHead(_SoftmaxLoss, ClassCentreHead):
    """`softmax_norm`: `l_j = s·c_j − b_j` with `bias` none (soft-n), unified (-nu: b cancels in the
    softmax, gets zero gradient and stays at `bias_init`; kept for API symmetry) or per_class (-nd).
    Margins (CosFace / ArcFace / combined) compose on the target column; ArcFace = margin='arcface'.
    """

    normalized = True
    extra_config_keys = MARGIN_KEYS

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0, bias: str = "none",
                 bias_init: float = 0.0, weight_init: str = "normal", weight_std: float = 0.01,
                 norm_eps: float = 1e-12, _total_classes: int | None = None, **margin: Any) -> None:
        check_choice("bias", bias, ("none", "unified", "per_class"))
        super().__init__(embedding_size, num_classes, scale=scale, margin=margin_from_config(margin, "none"),
                         weight_init=weight_init, weight_std=weight_std, norm_eps=norm_eps,
                         bias_init=bias_init, bias_mode=bias, _total_classes=_total_classes)

