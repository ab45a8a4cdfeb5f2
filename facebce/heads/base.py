"""What every head shares: the output record, config validation, and the class-centre base.

Conventions (docs/heads.md §0): scores are bias-free (`w_j·z`, or `cos θ_j` for normalised heads); biases
are thresholds and are *subtracted* (`logit = scale·score − b`); losses are computed in fp32 (or the
module's dtype when it is float64) and reduced as a per-sample sum over classes, mean over the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from facebce.heads.checks import check_choice, check_int, check_number
from facebce.heads.margins import Margin, NoMargin


@dataclass
class HeadOutput:
    """One training step's result.

    `loss`: scalar (fp32 under normal use). `logits`: inference logits `scale·score − b` (no margin,
    no filtering), detached. `scores`: bias-free scores (docs/heads.md §0), detached — what docs/metrics.md takes.
    `bias`: the head's bias (threshold convention) detached, or None. `extras`: head-specific values
    (e.g. DisMax's OOD score, Average-K's multi-label logits, Partial-FC's sampled class ids).
    """

    loss: Tensor
    logits: Optional[Tensor]
    scores: Optional[Tensor]
    bias: Optional[Tensor] = None
    extras: dict[str, Any] = field(default_factory=dict)


WEIGHT_INITS = ("linear", "normal", "kaiming")


def init_weight(weight: Tensor, kind: str, std: float) -> None:
    """Row-independent inits, so a Partial-FC shard is distributed like the same rows of a full head.

    linear: `nn.Linear` default, U(±1/√d); normal: N(0, std) (arcface_torch, std 0.01);
    kaiming: Kaiming normal, a=1, fan_in (UniFace).
    """
    with torch.no_grad():
        if kind == "linear":
            bound = 1.0 / math.sqrt(weight.shape[1])
            weight.uniform_(-bound, bound)
        elif kind == "normal":
            weight.normal_(0.0, std)
        else:
            nn.init.kaiming_normal_(weight, a=1, mode="fan_in", nonlinearity="leaky_relu")


def softplus(x: Tensor) -> Tensor:
    """Stable softplus (torch's kernel is `x` above its threshold and `log1p(exp(x))` below; the
    threshold is raised for float64 so the cut-over error stays below float64 resolution)."""
    return F.softplus(x, beta=1.0, threshold=20.0 if x.dtype != torch.float64 else 40.0)


def match_dtype(z: Tensor, weight: Tensor) -> Tensor:
    """Outside autocast, cast the embeddings to the parameters' dtype (bf16/fp16 backbones);
    under autocast the matmul picks its own precision."""
    if z.dtype != weight.dtype and not torch.is_autocast_enabled(z.device.type):
        return z.to(weight.dtype)
    return z


def as_loss_dtype(x: Tensor) -> Tensor:
    """Half-precision activations (AMP) are promoted to fp32; fp32/fp64 pass through."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _CosineMatrix(Function):
    """`ẑ·ŵ_jᵀ = (ẑ·w_j)/max(‖w_j‖, ε)` for normalised rows ẑ and raw centres W.

    Dividing the B×N product instead of normalising the N×d centres, with a hand-written backward
    `dW = (G/‖w‖)ᵀẑ − (Σ_b G∘S / ‖w‖)·ŵ` folded into the matmul's output, touches W about three
    times per step instead of ~10 (F.normalize forward and backward).  Same value and gradient.
    """

    @staticmethod
    def forward(ctx, zn: Tensor, weight: Tensor, eps: float) -> Tensor:
        norms = torch.linalg.vector_norm(weight.detach(), dim=1, dtype=torch.float32 if weight.dtype in (
            torch.float16, torch.bfloat16) else None).clamp_min(eps)
        raw = F.linear(zn, weight)  # under autocast: half precision, like any linear layer
        out = as_loss_dtype(raw) / norms
        ctx.save_for_backward(zn, weight, norms, out)
        ctx.eps, ctx.mm_dtype = eps, raw.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        zn, weight, norms, out = ctx.saved_tensors
        g = grad / norms
        gm = g.to(ctx.mm_dtype)  # the backward matmuls run in the forward's (autocast) precision
        grad_z = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_z = (gm @ weight.to(ctx.mm_dtype)).to(zn.dtype)
        if ctx.needs_input_grad[1]:
            coef = (g * out).sum(dim=0) / norms
            coef = torch.where(norms > ctx.eps, coef, torch.zeros_like(coef))  # clamped norm: no norm gradient
            grad_w = (gm.t() @ zn.to(ctx.mm_dtype)).to(weight.dtype)
            grad_w.addcmul_(weight, coef.to(weight.dtype)[:, None], value=-1.0)
        return grad_z, grad_w, None


def cosine_matrix(zn: Tensor, weight: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosines between already-normalised rows `zn` and the rows of `weight` (B×N)."""
    return _CosineMatrix.apply(zn, weight, eps)


# ----------------------------------------------------------------------------- base classes
class Head(nn.Module):
    """Base of every head: `forward(embeddings, labels) -> HeadOutput`, `scores(embeddings)`,
    the `bias` parameter (threshold convention, or None) and the learned unified `threshold`."""

    registry_name: str = ""

    def __init__(self, embedding_size: int, num_classes: int) -> None:
        super().__init__()
        self.embedding_size = check_int("embedding_size", embedding_size)
        self.num_classes = check_int("num_classes", num_classes)
        self.register_parameter("bias", None)

    def forward(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def scores(self, embeddings: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def threshold(self) -> Optional[float]:
        """Learned unified threshold on the score scale (b, or b/γ for normalised heads); None if
        the head has no learned unified threshold."""
        return None

    @property
    def class_thresholds(self) -> Optional[Tensor]:
        """Per-class learned thresholds on the score scale (b_j or b_j/γ), or None."""
        return None


class ClassCentreHead(Head):
    """Heads with one centre (and optionally one bias) per class: softmax, BCE and UCE families.

    The step is split so that the same code serves the full head and a Partial-FC shard:
    `_score_matrix(z, W)` -> bias-free scores; `_logits_and_targets` applies the interclass filter,
    scale, bias and margin (margin only on the target entry); `_loss` is the head's pure loss
    (softmax CE across shards or the BCE sum).  Labels may be −1 (no positive column here).
    """

    normalized: bool = False
    bias_mode: str = "none"  # none | unified | per_class

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 1.0,
                 margin: Margin | None = None, weight_init: str = "linear", weight_std: float = 0.01,
                 norm_eps: float = 1e-12, bias_init: float | None = 0.0, bias_mode: str | None = None,
                 _total_classes: int | None = None) -> None:
        super().__init__(embedding_size, num_classes)
        if bias_mode is not None:
            self.bias_mode = check_choice("bias", bias_mode, ("none", "unified", "per_class"))
        self.total_classes = num_classes if _total_classes is None else int(_total_classes)
        self.scale = check_number("scale", scale, positive=True)
        self.margin = margin if margin is not None else NoMargin()
        check_choice("weight_init", weight_init, WEIGHT_INITS)
        self.weight_init = weight_init
        self.weight_std = check_number("weight_std", weight_std, positive=True)
        self.norm_eps = check_number("norm_eps", norm_eps, positive=True)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        init_weight(self.weight, weight_init, self.weight_std)
        if bias_init is not None:
            bias_init = check_number("bias_init", bias_init)
        if self.bias_mode == "unified":
            self.bias = nn.Parameter(torch.full((1,), float(bias_init)))
        elif self.bias_mode == "per_class":
            if bias_init is None:  # nn.Linear default: b = −β, β ~ U(±1/√d) is symmetric
                bound = 1.0 / math.sqrt(embedding_size)
                self.bias = nn.Parameter(torch.empty(num_classes).uniform_(-bound, bound))
            else:
                self.bias = nn.Parameter(torch.full((num_classes,), float(bias_init)))

    # -- pieces shared with Partial-FC -------------------------------------------------------
    def sharded_names(self) -> tuple[str, ...]:
        """State-dict entries with one row per class (split across Partial-FC ranks)."""
        return ("weight", "bias") if self.bias_mode == "per_class" else ("weight",)

    def _bias_cols(self, index: Tensor | None) -> Tensor | None:
        if self.bias is None:
            return None
        if self.bias_mode == "per_class" and index is not None:
            return self.bias[index]
        return self.bias

    def _score_matrix(self, z: Tensor, weight: Tensor) -> Tensor:
        z = match_dtype(z, weight)
        if self.normalized:
            return cosine_matrix(F.normalize(z, dim=1, eps=self.norm_eps), weight, self.norm_eps).clamp(-1.0, 1.0)
        return as_loss_dtype(F.linear(z, weight))

    def _logits_and_targets(self, scores: Tensor, rows: Tensor, cols: Tensor, bias: Tensor | None):
        """-> (logits without margin, margin-modified target logits at (rows, cols))."""
        train = self.margin.filter(scores, rows, cols)
        logits = train * self.scale if self.scale != 1.0 else train
        target = self.margin.target(train[rows, cols])
        target = target * self.scale if self.scale != 1.0 else target
        if bias is not None:
            logits = logits - bias
            target = target - (bias[cols] if self.bias_mode == "per_class" else bias)
        return logits, target

    def _loss(self, logits: Tensor, labels: Tensor, rows: Tensor, cols: Tensor, target: Tensor, *,
              denom: int, group=None, neg_weight: Tensor | float | None = None) -> Tensor:
        raise NotImplementedError

    def _step(self, z: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None, *, denom: int,
              group=None, neg_weight=None, all_labelled: bool = False):
        """The whole per-shard step: returns (loss, inference logits, scores).  Labels −1 = no
        positive column here; `all_labelled` skips that search (full head: no device sync)."""
        scores = self._score_matrix(z, weight)
        if all_labelled:
            rows, cols = torch.arange(labels.shape[0], device=labels.device), labels
        else:
            rows = torch.nonzero(labels >= 0).squeeze(1)
            cols = labels[rows]
        logits, target = self._logits_and_targets(scores, rows, cols, bias)
        loss = self._loss(logits, labels, rows, cols, target, denom=denom, group=group, neg_weight=neg_weight)
        with torch.no_grad():
            if self.margin.filters:  # the training logits were filtered; report the plain ones
                logits = scores * self.scale
                logits = logits - bias if bias is not None else logits
        return loss, logits.detach(), scores.detach()

    # -- public API --------------------------------------------------------------------------
    def forward(self, embeddings: Tensor, labels: Tensor) -> HeadOutput:
        labels = labels.reshape(-1).long()
        loss, logits, scores = self._step(embeddings, labels, self.weight, self._bias_cols(None),
                                          denom=embeddings.shape[0], all_labelled=True)
        return HeadOutput(loss=loss, logits=logits, scores=scores,
                          bias=None if self.bias is None else self.bias.detach())

    def scores(self, embeddings: Tensor) -> Tensor:
        return self._score_matrix(embeddings, self.weight)

    def extra_repr(self) -> str:
        parts = [f"embedding_size={self.embedding_size}", f"num_classes={self.num_classes}"]
        if self.normalized:
            parts.append(f"scale={self.scale:g}")
        if not isinstance(self.margin, NoMargin):
            parts.append(f"margin={self.margin!r}")
        return ", ".join(parts)
