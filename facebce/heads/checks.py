"""Validation of head and margin config values: one ConfigError line naming the key, shared by every head."""
from __future__ import annotations

import math
from typing import Any

from facebce.errors import ConfigError


def check_number(key: str, value: Any, *, positive: bool = False, non_negative: bool = False,
                 low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value!r}")
    if non_negative and value < 0:
        raise ConfigError(f"{key}: must be >= 0, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{key}: must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{key}: must be <= {high}, got {value!r}")
    return float(value)


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def check_choice(key: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(options)}")
    return value


def check_int(key: str, value: Any, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}: expected an integer >= {low}, got {value!r}")
    return value
