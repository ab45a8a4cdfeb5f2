"""What to evaluate: a model file plus its preprocessing, named by a key that the embedding cache uses.

`ModelSpec` describes the model without loading it, so `evaluate` can re-score cached embeddings
without onnxruntime or torch touching the file; `build()` loads it only when a set is not cached.
Supported files: an ONNX recognition model (OnnxEmbedder), and an insightface arcface_torch
state_dict `.pth`/`.pt` with an architecture name (TorchEmbedder over build_backbone +
load_insightface_weights). facebce training checkpoints come with the training engine.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from facebce.errors import ModelError
from facebce.models import build_backbone, list_backbones, load_insightface_weights

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # torchvision Normalize on 0..255 pixels, RGB order
IMAGENET_STD = (58.395, 57.12, 57.375)
_TORCH_SUFFIXES = (".pth", ".pt")
_CHECKPOINT_SUFFIXES = (".ckpt",)


@dataclass(frozen=True)
class ModelSpec:
    """A model file and how to feed it. mean/std None: the ONNX file's own (facebce metadata or
    insightface's node-name rule); for `.pth` the insightface convention 127.5/127.5.

    `color`, `mean`, `std` follow facebce.models.embedder.Preprocess: values in the model's channel order.
    """

    path: Path
    arch: str | None = None
    embedding_size: int = 512
    color: str = "rgb"
    mean: float | tuple[float, float, float] | None = None
    std: float | tuple[float, float, float] | None = None
    batch_size: int = 64

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        if (self.mean is None) != (self.std is None):
            raise ModelError(f"{self.path}: give both mean and std, or neither (the model's own)")
        if self.mean is None and self.color != "rgb":
            raise ModelError(f"{self.path}: color={self.color!r} needs mean and std too (without them the "
                             "model's own preprocessing is used, RGB)")

    @property
    def key(self) -> str:
        """Cache key: file name, a digest of its bytes and of the options that change embeddings."""
        _check_kind(self.path, self.arch)
        options = json.dumps([self.arch, self.embedding_size, self.color, self.mean, self.std])
        return f"{self.path.stem}-{file_digest(self.path)[:12]}-{hashlib.sha256(options.encode()).hexdigest()[:8]}"

    def describe(self) -> str:
        pre = "model's own" if self.mean is None else f"{self.color}, mean {self.mean}, std {self.std}"
        arch = f" ({self.arch})" if self.arch else ""
        return f"{self.path.name}{arch}, preprocessing: {pre}"

    def build(self, *, flip: bool, normalize: bool):
        """The embedder (OnnxEmbedder or TorchEmbedder); imported here so re-scoring never needs it."""
        from facebce.models.embedder import OnnxEmbedder, Preprocess, TorchEmbedder

        _check_kind(self.path, self.arch)
        preprocess = None if self.mean is None else Preprocess(color=self.color, mean=self.mean, std=self.std)
        if self.path.suffix.lower() == ".onnx":
            return OnnxEmbedder(self.path, preprocess=preprocess, batch_size=self.batch_size, flip=flip,
                                normalize=normalize)
        model = load_insightface_weights(build_backbone(self.arch, embedding_size=self.embedding_size), self.path)
        return TorchEmbedder(model.eval(), preprocess=preprocess or Preprocess(color=self.color),
                             batch_size=self.batch_size, flip=flip, normalize=normalize)


def _check_kind(path: Path, arch: str | None) -> None:
    """One-line ModelErrors for what cannot be loaded, before any library touches the file."""
    if path.is_dir() or path.suffix.lower() in _CHECKPOINT_SUFFIXES:
        raise ModelError(f"{path}: facebce checkpoints arrive with the training engine; "
                         "evaluate an exported .onnx or an insightface .pth with --arch for now")
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix in _TORCH_SUFFIXES and arch is None:
        raise ModelError(f"{path}: an insightface .pth needs its architecture (--arch one of "
                         f"{', '.join(list_backbones())})")
    if suffix not in (".onnx", *_TORCH_SUFFIXES):
        raise ModelError(f"{path}: unknown model file type {suffix or '(none)'}; expected .onnx or .pth")


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
