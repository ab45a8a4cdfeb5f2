"""Deployment: face alignment, ONNX export with parity checks, and the open-set gallery stores (FAISS, Milvus)."""
from facebce.deploy.export import ExportReport, VariantReport, convert_variant, export_onnx
from facebce.deploy.gallery import Gallery, Match, SearchResult, recall_against_exact
from facebce.deploy.stores import open_gallery
from facebce.models.embedder import OnnxEmbedder

__all__ = ["ExportReport", "Gallery", "Match", "OnnxEmbedder", "SearchResult", "VariantReport", "convert_variant",
           "export_onnx", "open_gallery", "recall_against_exact"]
