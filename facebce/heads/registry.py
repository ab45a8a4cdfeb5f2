"""The head registry: heads register themselves where they are defined, and are built by name.

`@register_head("bce_u_norm")` on a head class adds it; `build_head(name, embedding_size,
num_classes, **cfg)`, `head_from_config({"name": ..., **cfg}, d, N)`, `list_heads()`, `head_class`,
`config_keys` and `check_config` read it. Unknown names and unknown config keys raise a ConfigError
naming the key and the valid options. The registry knows no head: `facebce.heads` imports every head
module, so importing the package fills it; adding a head touches only its own file (and that import).
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Mapping

from facebce.errors import ConfigError

if TYPE_CHECKING:
    from facebce.heads.base import Head

_REGISTRY: dict[str, type[Head]] = {}


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    """Class decorator: register a head class under `name` (its `registry_name`)."""
    def wrap(cls: type[Head]) -> type[Head]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"head {name!r} is already registered")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls
    return wrap


def list_heads() -> list[str]:
    return sorted(_REGISTRY)


def head_class(name: str) -> type[Head]:
    if name not in _REGISTRY:
        raise ConfigError(f"head: unknown head {name!r}; valid: {', '.join(list_heads())}")
    return _REGISTRY[name]


def config_keys(name: str) -> tuple[str, ...]:
    """The config keys a head accepts (its keyword-only arguments plus its margin keys)."""
    cls = head_class(name)
    keys = [p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and not p.name.startswith("_")]
    return tuple(keys) + tuple(getattr(cls, "extra_config_keys", ()))


def check_config(name: str, cfg: Mapping[str, Any]) -> None:
    valid = config_keys(name)
    for key in cfg:
        if key not in valid:
            raise ConfigError(f"head.{key}: unknown key for head {name!r}; valid: {', '.join(valid)}")


def build_head(name: str, embedding_size: int, num_classes: int, **cfg: Any) -> Head:
    """Build a registered head; every key of `cfg` must be one the head accepts."""
    check_config(name, cfg)
    return head_class(name)(embedding_size, num_classes, **cfg)


def head_from_config(cfg: Mapping[str, Any], embedding_size: int, num_classes: int) -> Head:
    """`{"name": "bce_u_norm", "scale": 64, ...}` -> head."""
    if "name" not in cfg:
        raise ConfigError(f"head.name: missing; valid: {', '.join(list_heads())}")
    rest = {k: v for k, v in cfg.items() if k != "name"}
    return build_head(cfg["name"], embedding_size, num_classes, **rest)
