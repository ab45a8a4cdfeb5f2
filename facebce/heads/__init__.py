"""Heads: class centres (and biases) + the loss, built by name.

`build_head(name, embedding_size, num_classes, **cfg)`; `head_from_config({"name": ..., **cfg}, d, N)`;
`list_heads()`; `register_head(name)(cls)`.  Unknown names and unknown or invalid config keys raise
ConfigError naming the key and the valid options.  Partial-FC: `PartialFC`.
Imports nothing of facebce but facebce.errors.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from facebce.errors import ConfigError
from facebce.heads.average_k import AverageKHead
from facebce.heads.base import ClassCentreHead, Head, HeadOutput
from facebce.heads.bce import BCEDHead, BCEDNormHead, BCEUHead, BCEUNormHead, bce_loss
from facebce.heads.dismax import DisMaxHead, fpr_preprocess, ood_scores
from facebce.heads.margins import ArcFace, CombinedMargin, CosFace, Margin, NoMargin, build_margin
from facebce.heads.softmax import NormSoftmaxHead, SoftmaxHead, softmax_cross_entropy
from facebce.heads.uce import UCEHead

_REGISTRY: dict[str, type[Head]] = {}


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
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


for _name, _cls in (("softmax", SoftmaxHead), ("softmax_norm", NormSoftmaxHead), ("bce_u", BCEUHead),
                    ("bce_d", BCEDHead), ("bce_u_norm", BCEUNormHead), ("bce_d_norm", BCEDNormHead),
                    ("uce", UCEHead), ("dismax", DisMaxHead), ("average_k", AverageKHead)):
    register_head(_name)(_cls)

from facebce.heads.partial_fc import PartialFC, shard_range  # noqa: E402  (uses the registry above)

__all__ = [
    "ArcFace", "AverageKHead", "BCEDHead", "BCEDNormHead", "BCEUHead", "BCEUNormHead", "ClassCentreHead",
    "CombinedMargin", "CosFace", "DisMaxHead", "Head", "HeadOutput", "Margin", "NoMargin", "NormSoftmaxHead",
    "PartialFC", "SoftmaxHead", "UCEHead", "bce_loss", "build_head", "build_margin", "check_config",
    "config_keys", "fpr_preprocess", "head_class", "head_from_config", "list_heads", "ood_scores",
    "register_head", "shard_range", "softmax_cross_entropy",
]
