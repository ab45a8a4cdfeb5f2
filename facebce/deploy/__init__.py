"""Deployment: face alignment, ONNX export with parity checks, and the open-set gallery stores (FAISS, Milvus).

The names below load their module on first use, so a gallery or the service does not import the
export code (and torch with it)."""
from __future__ import annotations

import importlib

__all__ = ["ExportReport", "Gallery", "Match", "OnnxEmbedder", "SearchResult", "VariantReport", "convert_variant",
           "export_onnx", "open_gallery", "recall_against_exact"]
_LAZY = {**dict.fromkeys(("ExportReport", "VariantReport", "convert_variant", "export_onnx"), "facebce.deploy.export"),
         **dict.fromkeys(("Gallery", "Match", "SearchResult", "recall_against_exact"), "facebce.deploy.gallery"),
         "open_gallery": "facebce.deploy.stores", "OnnxEmbedder": "facebce.models.embedder"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'facebce.deploy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
