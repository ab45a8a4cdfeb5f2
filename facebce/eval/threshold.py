"""The one global threshold of an evaluation: its sources, parsed before anything is embedded, and its value.

- `fit:union`  the best single threshold on all pairs sets pooled,
- `fit:<set>`  the best single threshold of one set (e.g. fit:lfw), applied to the others,
- `fixed:<t>`  a given cosine threshold,
- `bias`       the learned threshold of a -nu head (b/γ in cosine units), passed as `bias=`,
- `calibrated:<calib.json>` a calibration's threshold (facebce.eval.calibrate: checksum verified, and
  made with this model when the model's digest is known).
IJB and open-set sets never take part in fitting it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from facebce.errors import ConfigError
from facebce.eval.results import GlobalThreshold
from facebce.eval.verification import best_threshold

THRESHOLD_SOURCES = "fit:union | fit:<set> | fixed:<t> | bias | calibrated:<calib.json>"


def parse_threshold(spec: str, pair_set_names: Sequence[str], bias: float | None, *,
                    model_digest: str | None = None) -> tuple[str, str | float | tuple | None]:
    """('union', None) | ('set', name) | ('fixed', t) | ('bias', b) | ('calibrated', (source, t)); a
    ConfigError before any embedding."""
    spec = str(spec).strip()
    if spec.startswith("calibrated:"):
        from facebce.eval.calibrate import resolve_threshold_spec
        return "calibrated", (spec, resolve_threshold_spec(spec, model_digest=model_digest).value)
    if spec == "bias":
        if bias is None or not np.isfinite(bias):
            raise ConfigError(f"threshold 'bias' needs the learned threshold: pass bias=<b/γ> (got {bias!r})")
        return "bias", float(bias)
    kind, _, arg = spec.partition(":")
    if kind == "fixed":
        try:
            value = float(arg)
        except ValueError:
            value = float("nan")
        if not np.isfinite(value):
            raise ConfigError(f"threshold {spec!r}: fixed:<t> needs a finite number, e.g. fixed:0.3")
        return "fixed", value
    if kind == "fit" and arg:
        if not pair_set_names:
            raise ConfigError(f"threshold {spec!r} needs a pairs set to fit on (IJB and open-set sets are never "
                              "fitted on); add one, or use fixed:<t> or bias")
        if arg == "union":
            return "union", None
        if arg not in pair_set_names:
            raise ConfigError(f"threshold {spec!r}: no pairs set {arg!r} in this run ({', '.join(pair_set_names)})")
        return "set", arg
    raise ConfigError(f"threshold {spec!r}: expected {THRESHOLD_SOURCES}")


def global_threshold(parsed, scored: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> GlobalThreshold:
    """The threshold a parsed source names; `scored` = pairs set name -> (cosines, issame) for fit:*."""
    kind, arg = parsed
    if kind == "fixed":
        return GlobalThreshold(f"fixed:{arg:g}", arg)
    if kind == "bias":
        return GlobalThreshold("bias", arg)
    if kind == "calibrated":
        return GlobalThreshold(*arg)
    names = tuple(scored) if kind == "union" else (arg,)
    fit = best_threshold(np.concatenate([scored[n][0] for n in names]), np.concatenate([scored[n][1] for n in names]))
    return GlobalThreshold(f"fit:{'union' if kind == 'union' else arg}", fit.threshold, names, fit.accuracy)
