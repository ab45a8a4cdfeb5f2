"""UniFace's unified cross-entropy (docs/heads.md §4; CVI-SZU/UniFace `head.py`).

`L = softplus(b − s(c_y − m)) + λ Σ_{j≠y} softplus(s c_j − b)`: bce_u_norm with a CosFace margin and
UniFace's defaults (s = 64, m = 0.4, λ = 1, b0 = ln(10·r·N), Kaiming-normal centres).  The formula
is `bce._bce`, shared with every BCE head.  `r` only sets the bias init: sampling centres is
Partial-FC's job (`PartialFC('uce', d, N, sample_rate=r)` passes r to the init).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

from facebce.heads.bce import BCEUNormHead
from facebce.heads.checks import check_number
from facebce.heads.registry import register_head


@register_head("uce")
class UCEHead(BCEUNormHead):
    """`uce`; `threshold` = b/s.  `clamp=True` reproduces UniFace's clamp of both softplus arguments
    to [−s, s]; `neg_weight` is UniFace's `l` (λ); the per-class-bias variant is bce_d_norm with
    margin='cosface'."""

    default_margin = "cosface"

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0, r: float = 1.0,
                 bias_init: Optional[float] = None, neg_weight: float = 1.0, clamp: Union[bool, float] = False,
                 weight_init: str = "kaiming", weight_std: float = 0.01, norm_eps: float = 1e-12,
                 _total_classes: Optional[int] = None, **margin: Any) -> None:
        self_r = check_number("r", r, positive=True, high=1.0)
        total = num_classes if _total_classes is None else _total_classes
        if bias_init is None:
            bias_init = math.log(10.0 * self_r * total)
        super().__init__(embedding_size, num_classes, scale=scale, bias_init=bias_init, neg_weight=neg_weight,
                         clamp=clamp, weight_init=weight_init, weight_std=weight_std, norm_eps=norm_eps,
                         _total_classes=_total_classes, **margin)
        self.r = self_r
