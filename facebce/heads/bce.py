"""BCE-U / BCE-D heads (docs/heads.md §2), linear and normalised, and the BCE loss they (and UCE) share.

Loss per sample: `softplus(b_y − γc'_y) + λ Σ_{j≠y} softplus(γc_j − b_j)` (γ = 1 and c = s for the
linear heads; c' = margin-modified target cosine), summed over classes, averaged over the batch.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Union

import torch
from torch import Tensor

from facebce.errors import ConfigError
from facebce.heads.base import ClassCentreHead, softplus
from facebce.heads.checks import check_number
from facebce.heads.margins import MARGIN_KEYS, margin_from_config
from facebce.heads.registry import register_head

GAMMA_RANGE = (32.0, 192.0)


def bce_loss(logits: Tensor, labels: Tensor, *, target_logits: Optional[Tensor] = None,
             neg_weight: Union[float, Tensor] = 1.0, clamp: Optional[float] = None,
             denom: Optional[int] = None) -> Tensor:
    """`Σ_rows [softplus(−t_i) + Σ_{j≠y_i} w_j·softplus(l_ij)] / denom`.

    `logits` (R, n) are margin-free logits `score·scale − b`; `target_logits` (one per row with
    label >= 0, in row order) replace the target entry in the positive term (margins); labels −1 mark
    rows with no positive column here (Partial-FC).  `neg_weight`: λ, scalar or per column (n,).
    `clamp`: clamp both softplus arguments to [−clamp, clamp] (UniFace parity; zero gradient
    outside).  `denom` defaults to R.
    """
    rows = torch.nonzero(labels >= 0).squeeze(1)
    cols = labels[rows]
    if target_logits is None:
        target_logits = logits[rows, cols]
    return _bce(logits, rows, cols, target_logits, neg_weight=neg_weight, clamp=clamp,
                denom=logits.shape[0] if denom is None else denom)


def _bce(logits: Tensor, rows: Tensor, cols: Tensor, target: Tensor, *, neg_weight, clamp, denom) -> Tensor:
    if clamp is not None:
        logits = logits.clamp(-clamp, clamp)
        target = target.clamp(-clamp, clamp)
    neg = softplus(logits)
    neg = neg.index_put((rows, cols), neg.new_zeros(()))  # the target entry is not a negative
    if isinstance(neg_weight, Tensor):
        neg_sum = (neg.sum(dim=0) * neg_weight).sum()
    else:
        neg_sum = neg.sum() if neg_weight == 1.0 else neg.sum() * neg_weight
    return (softplus(-target).sum() + neg_sum) / denom


class BCEHead(ClassCentreHead):
    """Common part of bce_u, bce_d, bce_u_norm, bce_d_norm and uce."""

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float, margin, weight_init: str,
                 weight_std: float, norm_eps: float, bias_init: Optional[float], neg_weight: float,
                 clamp: Union[bool, float], _total_classes: Optional[int]) -> None:
        total = num_classes if _total_classes is None else _total_classes
        if bias_init is None:
            if total < 2:
                raise ConfigError(f"num_classes: BCE heads need at least 2 classes (bias_init = ln(N − 1)), "
                                  f"got {total}")
            bias_init = math.log(total - 1)
        super().__init__(embedding_size, num_classes, scale=scale, margin=margin, weight_init=weight_init,
                         weight_std=weight_std, norm_eps=norm_eps, bias_init=bias_init,
                         _total_classes=_total_classes)
        self.neg_weight = check_number("neg_weight", neg_weight, non_negative=True)
        if clamp is True:
            self.clamp: Optional[float] = self.scale
        elif clamp is False or clamp is None:
            self.clamp = None
        else:
            self.clamp = check_number("clamp", clamp, positive=True)

    def _loss(self, logits, labels, rows, cols, target, *, denom, group=None, neg_weight=None):
        weight = self.neg_weight if neg_weight is None else neg_weight * self.neg_weight
        return _bce(logits, rows, cols, target, neg_weight=weight, clamp=self.clamp, denom=denom)

    @property
    def threshold(self) -> Optional[float]:
        if self.bias_mode != "unified":
            return None
        return float(self.bias.detach()[0]) / self.scale

    @property
    def class_thresholds(self) -> Optional[Tensor]:
        if self.bias_mode != "per_class":
            return None
        return self.bias.detach() / self.scale


class _LinearBCE(BCEHead):
    normalized = False

    def __init__(self, embedding_size: int, num_classes: int, *, bias_init: Optional[float] = None,
                 neg_weight: float = 1.0, clamp: Union[bool, float] = False, weight_init: str = "linear",
                 weight_std: float = 0.01, _total_classes: Optional[int] = None) -> None:
        super().__init__(embedding_size, num_classes, scale=1.0, margin=None, weight_init=weight_init,
                         weight_std=weight_std, norm_eps=1e-12, bias_init=bias_init, neg_weight=neg_weight,
                         clamp=clamp, _total_classes=_total_classes)


class _NormBCE(BCEHead):
    normalized = True
    extra_config_keys = MARGIN_KEYS
    default_margin = "none"

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0,
                 bias_init: Optional[float] = None, neg_weight: float = 1.0, clamp: Union[bool, float] = False,
                 weight_init: str = "normal", weight_std: float = 0.01, norm_eps: float = 1e-12,
                 _total_classes: Optional[int] = None, **margin: Any) -> None:
        _check_gamma(scale)
        super().__init__(embedding_size, num_classes, scale=scale,
                         margin=margin_from_config(margin, self.default_margin),
                         weight_init=weight_init, weight_std=weight_std, norm_eps=norm_eps, bias_init=bias_init,
                         neg_weight=neg_weight, clamp=clamp, _total_classes=_total_classes)


def _check_gamma(scale: Any) -> None:
    gamma = check_number("scale", scale, positive=True)
    if not GAMMA_RANGE[0] <= gamma <= GAMMA_RANGE[1]:
        warnings.warn(f"scale: γ = {gamma:g} is outside [{GAMMA_RANGE[0]:g}, {GAMMA_RANGE[1]:g}], where the BCE "
                      "paper reports good uniform accuracy", stacklevel=3)


@register_head("bce_u")
class BCEUHead(_LinearBCE):
    """`bce_u`: linear scores, one learnable shared bias b (init ln(N − 1)); `threshold` = b."""

    bias_mode = "unified"


@register_head("bce_d")
class BCEDHead(_LinearBCE):
    """`bce_d`: linear scores, per-class biases b_j (init ln(N − 1)); `class_thresholds` = b_j."""

    bias_mode = "per_class"


@register_head("bce_u_norm")
class BCEUNormHead(_NormBCE):
    """`bce_u_norm` (bce-nu): `γ c_j − b`, γ = `scale` (default 64); `threshold` = b/γ."""

    bias_mode = "unified"


@register_head("bce_d_norm")
class BCEDNormHead(_NormBCE):
    """`bce_d_norm` (bce-nd): `γ c_j − b_j`; with margin='cosface' this is UniFace's Normalized_BCE_Loss."""

    bias_mode = "per_class"
