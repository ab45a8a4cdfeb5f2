"""What to evaluate: a model file plus its preprocessing, named by a key that the embedding cache uses.

`ModelSpec` describes the model without loading it, so `evaluate` can re-score cached embeddings
without onnxruntime or torch touching the file; `build()` loads it only when a set is not cached.
Supported: an ONNX recognition model (OnnxEmbedder); an insightface arcface_torch state_dict
`.pth`/`.pt` with an architecture name (TorchEmbedder over build_backbone + load_insightface_weights);
and a facebce training run folder, whose `model.json` names the architecture, its options, the
weights file and the head's learned threshold (read here without importing the training code).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from facebce.errors import FacebceError, ModelError
from facebce.fileio import torch_load_weights_only
from facebce import models  # its backbones (and torch) load on first use: ONNX files need neither
from facebce.models.card import MODEL_CARD, ModelCard, read_model_card

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MODEL_CARD", "Classifier", "ModelCard", "ModelSpec", "class_scores",
           "file_digest", "learned_bias", "load_classifier", "read_model_card"]

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # torchvision Normalize on 0..255 pixels, RGB order
IMAGENET_STD = (58.395, 57.12, 57.375)
_TORCH_SUFFIXES = (".pth", ".pt")


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
        return (f"{self.path.stem}-{file_digest(self.weights_file)[:12]}-"
                f"{hashlib.sha256(options.encode()).hexdigest()[:8]}")

    @property
    def weights_file(self) -> Path:
        """The file holding the weights: the model file, or a run folder's backbone.pth."""
        if self.path.is_dir():
            return self.path / read_model_card(self.path).weights
        return self.path

    @property
    def learned_threshold(self) -> float | None:
        """A training run's learned unified threshold (b or b/γ of its head), else None."""
        return read_model_card(self.path).threshold if self.path.is_dir() else None

    @property
    def card(self) -> ModelCard | None:
        """The run folder's model card (validated), or None for a model file."""
        return read_model_card(self.path) if self.path.is_dir() else None

    def backbone(self):
        """The PyTorch backbone with its weights (a .pth with `arch`, or a run folder), in eval mode."""
        if self.path.is_dir():
            card = read_model_card(self.path)
            where = self.path / MODEL_CARD
            try:
                _check_fits_weights(card, self.path / card.weights)
                model = models.build_backbone(card.arch, embedding_size=card.embedding_size, **card.options)
            except ModelError as e:  # unknown arch, an option value its builder refuses, too big for the file
                raise ModelError(f"{where}: arch/options: {e}") from None
        else:
            model = models.build_backbone(self.arch, embedding_size=self.embedding_size)
        return models.load_insightface_weights(model, self.weights_file).eval()

    def classifier(self) -> "Classifier":
        """The run's closed-set classifier (class centres, score kind, thresholds); a one-line
        ModelError when the model is not a facebce run folder with centres."""
        return load_classifier(self.path)

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
        return TorchEmbedder(self.backbone(), preprocess=preprocess or Preprocess(color=self.color),
                             batch_size=self.batch_size, flip=flip, normalize=normalize)


@dataclass(frozen=True)
class Classifier:
    """A training run's head as evaluation needs it: bias-free scores of its classes from the centres."""

    scores: str  # "cosine" (normalised heads) | "linear" (w_j·z)
    centres: "object"  # torch float32 tensor, num_classes x embedding_size
    threshold: float | None  # the learned unified threshold (b or b/γ), on the score scale
    class_thresholds: "object | None"  # per-class learned thresholds (b_j or b_j/γ), or None

    @property
    def num_classes(self) -> int:
        return int(self.centres.shape[0])

    def class_scores(self, embeddings):
        """n x N float32 numpy matrix of bias-free scores, computed as the head's `scores()` does."""
        return class_scores(self.scores, self.centres, embeddings)


def load_classifier(run_dir: str | os.PathLike) -> Classifier:
    """Read a run folder's centres.pth (and class_thresholds.pth) as named by its model card."""

    path = Path(run_dir)
    if not path.is_dir():
        raise ModelError(f"{path}: closed-set classification needs a facebce training run folder "
                         "(its model.json and centres.pth), not a model file")
    card = read_model_card(path)
    kind, centres = card.scores, card.centres
    if kind is None or not centres:
        raise ModelError(f"{path}: the run has no class centres to classify with (head {card.head!r}: "
                         f"scores {kind!r}; runs trained before centres.pth was written need retraining)")
    file = path / centres
    if not file.is_file():
        raise ModelError(f"{path}: the run's class centres {centres} are missing")
    weight = _tensor_file(file, "class centres")
    n, d = card.num_classes, card.embedding_size
    if weight.ndim != 2 or weight.shape[1] != d or (n is not None and weight.shape[0] != n):
        raise ModelError(f"{file}: centres of shape {tuple(weight.shape)}, expected {n} x {d}")
    weight = weight.float()
    thresholds = None
    if card.class_thresholds:
        file = path / card.class_thresholds
        thresholds = _tensor_file(file, "per-class thresholds")
        if thresholds.shape != (weight.shape[0],):
            raise ModelError(f"{file}: per-class thresholds of shape {tuple(thresholds.shape)}, "
                             f"expected ({weight.shape[0]},)")
        thresholds = thresholds.double()
    return Classifier(kind, weight, card.threshold, thresholds)


def _check_fits_weights(card: ModelCard, weights: Path) -> None:
    """Build the card's backbone on the meta device (no memory) and refuse it when its parameters
    could not fit in the weights file: a card may not make facebce allocate more than the file holds."""
    import torch

    with torch.device("meta"):
        model = models.build_backbone(card.arch, embedding_size=card.embedding_size, **card.options)
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = weights.stat().st_size if weights.is_file() else 0
    if need > size:
        raise ModelError(f"embedding_size {card.embedding_size} and options {card.options} make a "
                         f"{card.arch} of {need:,} bytes, but {weights.name} holds only {size:,}")


def _tensor_file(file: Path, what: str):
    """A weights-only .pth holding one floating tensor; one ModelError line naming the file otherwise."""
    import torch

    try:
        value = torch_load_weights_only(file, what=what)
    except FacebceError as e:
        raise ModelError(str(e)) from None
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ModelError(f"{file}: expected one float tensor of {what}, got {type(value).__name__}")
    if not bool(torch.isfinite(value).all()):
        raise ModelError(f"{file}: {what} contain NaN or Inf")
    return value


def learned_bias(model, bias: float | None) -> float | None:
    """The learned threshold `evaluate` uses for `threshold="bias"` and the uniform gap: `bias` when
    given, else a training run's own (its model card's b/γ) when `model` is a ModelSpec of a run folder."""
    if bias is None and isinstance(model, ModelSpec):
        return model.learned_threshold
    return bias


def class_scores(kind: str, centres, embeddings):
    """Bias-free scores S (n x N, float32 numpy) of raw embeddings against class centres, exactly as the
    head computes them: cosine (both sides L2-normalised, centre norms clamped at 1e-12, clamped to
    [-1, 1]) or linear (w_j·z on the raw, unnormalised embeddings)."""
    import torch
    import torch.nn.functional as F

    z = torch.as_tensor(embeddings).float()
    w = torch.as_tensor(centres).float()
    with torch.no_grad():
        if kind == "cosine":
            norms = torch.linalg.vector_norm(w, dim=1).clamp_min(1e-12)
            s = (F.linear(F.normalize(z, dim=1, eps=1e-12), w) / norms).clamp(-1.0, 1.0)
        elif kind == "linear":
            s = F.linear(z, w)
        else:
            raise ModelError(f"scores {kind!r}: expected cosine or linear")
    return s.numpy()


def _check_kind(path: Path, arch: str | None) -> None:
    """One-line ModelErrors for what cannot be loaded, before any library touches the file."""
    if path.is_dir():
        weights = path / read_model_card(path).weights
        if not weights.is_file():
            raise ModelError(f"{path}: the run's weights {weights.name} are missing")
        return
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix in _TORCH_SUFFIXES and arch is None:
        raise ModelError(f"{path}: an insightface .pth needs its architecture (--arch one of "
                         f"{', '.join(models.list_backbones())})")
    if suffix not in (".onnx", *_TORCH_SUFFIXES):
        raise ModelError(f"{path}: unknown model file type {suffix or '(none)'}; "
                         "expected .onnx, .pth or a training run folder")


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
