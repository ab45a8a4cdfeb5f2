"""Backbones by name (`build_backbone`), and loading of insightface arcface_torch checkpoints.

Every backbone maps a 112x112 RGB face in [-1, 1] to an un-normalised embedding, has the module tree
of its insightface counterpart (so `.pth` files from arcface_torch load as they are), and exposes
`embedding_size` and `input_size`. Imports nothing else of facebce but facebce.errors, .fileio and .lazy;
`facebce.models.card` is the training run's model card (model.json).

The names below live in `facebce.models.backbones` and load it (and torch) on first use, so the
ONNX path - `facebce.models.embedder`'s `OnnxEmbedder`, hence the service, galleries and the
evaluation of ONNX files - runs without importing torch (~3.7 s and ~180 MB per process here).
"""
from __future__ import annotations

from facebce.lazy import lazy_attributes

__all__ = ["IResNet", "MobileFaceNet", "build_backbone", "describe_backbones", "list_backbones",
           "load_insightface_weights", "register_backbone"]
_LAZY = {name: "facebce.models.backbones" for name in (*__all__, "BUILD_ERRORS")}

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
