"""Deployment: face alignment, ONNX export with parity checks, and the open-set gallery stores (FAISS, Milvus).

The names below load their module on first use, so a gallery or the service does not import the
export code (and torch with it)."""
from __future__ import annotations

from facebce.lazy import lazy_attributes

__all__ = ["ExportReport", "Gallery", "Match", "OnnxEmbedder", "SearchResult", "VariantReport", "convert_variant",
           "export_onnx", "open_gallery", "recall_against_exact"]
_LAZY = {**dict.fromkeys(("ExportReport", "VariantReport", "convert_variant", "export_onnx"), "facebce.deploy.export"),
         **dict.fromkeys(("Gallery", "Match", "SearchResult", "recall_against_exact"), "facebce.deploy.gallery"),
         "open_gallery": "facebce.deploy.stores", "OnnxEmbedder": "facebce.models.embedder"}

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
