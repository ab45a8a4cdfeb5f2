"""Margins for normalised heads (docs/heads.md §3): they change only the target cosine `c_y`.

`Margin.target(c)` maps the target cosines; `Margin.filter(cos, rows, cols)` applies arcface_torch's
interclass filtering (non-target cosines above τ become 0, with zero gradient) when τ > 0.
`build_margin` validates the config keys and translates arcface_torch's `margin_list`.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from facebce.errors import ConfigError
from facebce.heads.checks import check_bool, check_number

MARGINS = ("none", "cosface", "arcface", "combined")


class Margin:
    """Identity margin; subclasses override `target`."""

    name = "none"

    def __init__(self, interclass_filtering_threshold: float = 0.0) -> None:
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)

    @property
    def filters(self) -> bool:
        return self.interclass_filtering_threshold > 0

    def target(self, c: Tensor) -> Tensor:
        return c

    def filter(self, cos: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        if not self.filters:
            return cos
        with torch.no_grad():
            dirty = cos > self.interclass_filtering_threshold
            dirty[rows, cols] = False
        return cos.masked_fill(dirty, 0.0)

    def _params(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self._params()
        if self.filters:
            tau = f"interclass_filtering_threshold={self.interclass_filtering_threshold:g}"
            extra = f"{extra}, {tau}" if extra else tau
        return f"{self.name}({extra})"


class NoMargin(Margin):
    pass


class CosFace(Margin):
    """`c' = c − m` (additive cosine margin)."""

    name = "cosface"

    def __init__(self, m: float = 0.4, interclass_filtering_threshold: float = 0.0) -> None:
        super().__init__(interclass_filtering_threshold)
        self.m = float(m)

    def target(self, c: Tensor) -> Tensor:
        return c - self.m

    def _params(self) -> str:
        return f"m={self.m:g}"


class ArcFace(Margin):
    """`c' = cos(θ + m)` in the analytic form `c·cos m − sqrt(max(1−c², 1e-7))·sin m`.

    Default fallback past θ > π − m: `c − m·sin(π − m)`.  `easy_margin`: margin only where c > 0.
    `straight_through` (current arcface_torch): forward `cos(arccos(c) + m)` with no fallback,
    backward d c'/dc = 1.
    """

    name = "arcface"

    def __init__(self, m: float = 0.5, easy_margin: bool = False, straight_through: bool = False,
                 interclass_filtering_threshold: float = 0.0) -> None:
        super().__init__(interclass_filtering_threshold)
        self.m = float(m)
        self.easy_margin = easy_margin
        self.straight_through = straight_through
        self.cos_m, self.sin_m = math.cos(self.m), math.sin(self.m)
        self.th = math.cos(math.pi - self.m)
        self.mm = math.sin(math.pi - self.m) * self.m

    def target(self, c: Tensor) -> Tensor:
        if self.straight_through:
            with torch.no_grad():
                value = torch.cos(torch.arccos(c) + self.m)
            return value + (c - c.detach())
        sin = torch.sqrt(torch.clamp(1.0 - c * c, min=1e-7))
        phi = c * self.cos_m - sin * self.sin_m
        if self.easy_margin:
            return torch.where(c > 0, phi, c)
        return torch.where(c > self.th, phi, c - self.mm)

    def _params(self) -> str:
        out = f"m={self.m:g}"
        if self.easy_margin:
            out += ", easy_margin=True"
        if self.straight_through:
            out += ", straight_through=True"
        return out


class CombinedMargin(Margin):
    """insightface's combined margin `c' = cos(m1·θ + m2) − m3` (no fallback, as insightface)."""

    name = "combined"
    _EDGE = 1e-7  # keeps d arccos / dc finite at |c| = 1

    def __init__(self, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2,
                 interclass_filtering_threshold: float = 0.0) -> None:
        super().__init__(interclass_filtering_threshold)
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)

    def target(self, c: Tensor) -> Tensor:
        theta = torch.arccos(c.clamp(-1.0 + self._EDGE, 1.0 - self._EDGE))
        return torch.cos(self.m1 * theta + self.m2) - self.m3

    def _params(self) -> str:
        return f"m1={self.m1:g}, m2={self.m2:g}, m3={self.m3:g}"


# The margin keys every normalised head accepts (None = not given).
MARGIN_KEYS = ("margin", "m", "m1", "m2", "m3", "easy_margin", "straight_through",
               "interclass_filtering_threshold", "margin_list")


def build_margin(margin: Optional[str] = None, *, m: Optional[float] = None, m1: Optional[float] = None,
                 m2: Optional[float] = None, m3: Optional[float] = None, easy_margin: Optional[bool] = None,
                 straight_through: Optional[bool] = None, interclass_filtering_threshold: Optional[float] = None,
                 margin_list: Optional[Sequence[float]] = None, default: str = "none") -> Margin:
    """Validate margin keys and build the margin.  A key that the chosen margin does not use is an
    error (it would be silently ignored otherwise).

    `margin_list=(m1, m2, m3)` follows arcface_torch: `m1 == 1 and m3 == 0` -> ArcFace(m2) with
    straight-through gradients (unless `straight_through` is given); `m3 > 0` -> CosFace(m3), m1 and
    m2 ignored as arcface_torch does; anything else raises.
    """
    tau = 0.0 if interclass_filtering_threshold is None else check_number(
        "interclass_filtering_threshold", interclass_filtering_threshold, low=0.0)
    if margin_list is not None:
        if margin is not None or any(v is not None for v in (m, m1, m2, m3)):
            raise ConfigError("margin_list: give either margin_list (arcface_torch) or margin/m/m1/m2/m3, not both")
        if not isinstance(margin_list, (list, tuple)) or len(margin_list) != 3:
            raise ConfigError(f"margin_list: expected three numbers (m1, m2, m3), got {margin_list!r}")
        a, b, c = (check_number("margin_list", v) for v in margin_list)
        if a == 1.0 and c == 0.0:
            if easy_margin:
                raise ConfigError("easy_margin: arcface_torch's margin_list ArcFace has no easy margin")
            st = True if straight_through is None else check_bool("straight_through", straight_through)
            return ArcFace(b, straight_through=st, interclass_filtering_threshold=tau)
        if c > 0:
            if easy_margin is not None or straight_through is not None:
                raise ConfigError("easy_margin/straight_through: only apply to ArcFace, margin_list gives CosFace")
            return CosFace(c, interclass_filtering_threshold=tau)
        raise ConfigError(f"margin_list: {tuple(margin_list)} is not accepted by arcface_torch "
                          "(need m1 == 1 and m3 == 0 for ArcFace, or m3 > 0 for CosFace)")

    kind = default if margin is None else margin
    if kind not in MARGINS:
        raise ConfigError(f"margin: {kind!r} is not one of {', '.join(MARGINS)}")

    def unused(keys: dict[str, Any]) -> None:
        for key, value in keys.items():
            if value is not None:
                raise ConfigError(f"{key}: not used by margin={kind!r}")

    if kind == "none":
        unused(dict(m=m, m1=m1, m2=m2, m3=m3, easy_margin=easy_margin, straight_through=straight_through))
        return NoMargin(tau)
    if kind == "cosface":
        unused(dict(m1=m1, m2=m2, m3=m3, easy_margin=easy_margin, straight_through=straight_through))
        return CosFace(0.4 if m is None else check_number("m", m), interclass_filtering_threshold=tau)
    if kind == "arcface":
        unused(dict(m1=m1, m2=m2, m3=m3))
        em = False if easy_margin is None else check_bool("easy_margin", easy_margin)
        st = False if straight_through is None else check_bool("straight_through", straight_through)
        if em and st:
            raise ConfigError("easy_margin: cannot be combined with straight_through "
                              "(arcface_torch's straight-through ArcFace has no fallback to choose)")
        value = 0.5 if m is None else check_number("m", m)
        if not 0.0 <= value < math.pi:
            raise ConfigError(f"m: ArcFace margin must be in [0, pi), got {value!r}")
        return ArcFace(value, easy_margin=em, straight_through=st, interclass_filtering_threshold=tau)
    unused(dict(m=m, easy_margin=easy_margin, straight_through=straight_through))
    return CombinedMargin(1.0 if m1 is None else check_number("m1", m1),
                          0.3 if m2 is None else check_number("m2", m2),
                          0.2 if m3 is None else check_number("m3", m3), interclass_filtering_threshold=tau)


def margin_from_config(cfg: dict[str, Any], default: str) -> Margin:
    """`build_margin` for a head's leftover config keys; an unknown key is a ConfigError."""
    for key in cfg:
        if key not in MARGIN_KEYS:
            raise ConfigError(f"{key}: unknown key; valid margin keys: {', '.join(MARGIN_KEYS)}")
    return build_margin(default=default, **cfg)
