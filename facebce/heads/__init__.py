"""Heads: class centres (and biases) + the loss, built by name.

`build_head(name, embedding_size, num_classes, **cfg)`; `head_from_config({"name": ..., **cfg}, d, N)`;
`list_heads()`; `@register_head(name)` on a head class (facebce.heads.registry). Unknown names and
unknown or invalid config keys raise ConfigError naming the key and the valid options. Partial-FC:
`PartialFC`. Importing this package imports every head module, and each registers its heads where
they are defined. Imports nothing of facebce but facebce.errors.
"""
from __future__ import annotations

from facebce.heads.average_k import AverageKHead
from facebce.heads.base import ClassCentreHead, Head, HeadOutput
from facebce.heads.bce import BCEDHead, BCEDNormHead, BCEUHead, BCEUNormHead, bce_loss
from facebce.heads.dismax import DisMaxHead, fpr_preprocess, ood_scores
from facebce.heads.margins import ArcFace, CombinedMargin, CosFace, Margin, NoMargin, build_margin
from facebce.heads.partial_fc import PartialFC, shard_range
from facebce.heads.registry import (build_head, check_config, config_keys, head_class, head_from_config, list_heads,
                                    register_head)
from facebce.heads.softmax import NormSoftmaxHead, SoftmaxHead, softmax_cross_entropy
from facebce.heads.uce import UCEHead

__all__ = [
    "ArcFace", "AverageKHead", "BCEDHead", "BCEDNormHead", "BCEUHead", "BCEUNormHead", "ClassCentreHead",
    "CombinedMargin", "CosFace", "DisMaxHead", "Head", "HeadOutput", "Margin", "NoMargin", "NormSoftmaxHead",
    "PartialFC", "SoftmaxHead", "UCEHead", "bce_loss", "build_head", "build_margin", "check_config",
    "config_keys", "fpr_preprocess", "head_class", "head_from_config", "list_heads", "ood_scores",
    "register_head", "shard_range", "softmax_cross_entropy",
]
