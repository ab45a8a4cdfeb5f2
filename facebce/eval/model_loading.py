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

from facebce.errors import ModelError
from facebce.models import build_backbone, list_backbones, load_insightface_weights

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # torchvision Normalize on 0..255 pixels, RGB order
IMAGENET_STD = (58.395, 57.12, 57.375)
_TORCH_SUFFIXES = (".pth", ".pt")
MODEL_CARD = "model.json"  # written by facebce.train at the end of a run


def read_model_card(run_dir: str | os.PathLike) -> dict:
    """The run folder's model.json: arch, embedding_size, options, head, bias, threshold, weights."""
    path = Path(run_dir) / MODEL_CARD
    if not path.is_file():
        raise ModelError(f"{run_dir}: not a finished facebce training run (no {MODEL_CARD}; "
                         f"a run writes it with backbone.pth when it ends)")
    try:
        card = json.loads(path.read_text())
    except ValueError as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(card, dict) or card.get("format") != "facebce-model" or "arch" not in card:
        raise ModelError(f"{path}: not a facebce model card")
    return card


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
            return self.path / read_model_card(self.path).get("weights", "backbone.pth")
        return self.path

    @property
    def learned_threshold(self) -> float | None:
        """A training run's learned unified threshold (b or b/γ of its head), else None."""
        return read_model_card(self.path).get("threshold") if self.path.is_dir() else None

    def backbone(self):
        """The PyTorch backbone with its weights (a .pth with `arch`, or a run folder), in eval mode."""
        if self.path.is_dir():
            card = read_model_card(self.path)
            model = build_backbone(card["arch"], embedding_size=card["embedding_size"], **card.get("options", {}))
        else:
            model = build_backbone(self.arch, embedding_size=self.embedding_size)
        return load_insightface_weights(model, self.weights_file).eval()

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
    import torch

    path = Path(run_dir)
    if not path.is_dir():
        raise ModelError(f"{path}: closed-set classification needs a facebce training run folder "
                         "(its model.json and centres.pth), not a model file")
    card = read_model_card(path)
    kind, centres = card.get("scores"), card.get("centres")
    if kind not in ("cosine", "linear") or not centres:
        raise ModelError(f"{path}: the run has no class centres to classify with (head {card.get('head')!r}: "
                         f"scores {kind!r}; runs trained before centres.pth was written need retraining)")
    file = path / centres
    if not file.is_file():
        raise ModelError(f"{path}: the run's class centres {centres} are missing")
    weight = torch.load(file, map_location="cpu", weights_only=True).float()
    n = card.get("num_classes")
    if weight.ndim != 2 or weight.shape[1] != card["embedding_size"] or (n is not None and weight.shape[0] != n):
        raise ModelError(f"{file}: centres of shape {tuple(weight.shape)}, expected {n} x {card['embedding_size']}")
    thresholds = None
    if card.get("class_thresholds"):
        thresholds = torch.load(path / card["class_thresholds"], map_location="cpu", weights_only=True).double()
    return Classifier(kind, weight, card.get("threshold"), thresholds)


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
        weights = path / read_model_card(path).get("weights", "backbone.pth")
        if not weights.is_file():
            raise ModelError(f"{path}: the run's weights {weights.name} are missing")
        return
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix in _TORCH_SUFFIXES and arch is None:
        raise ModelError(f"{path}: an insightface .pth needs its architecture (--arch one of "
                         f"{', '.join(list_backbones())})")
    if suffix not in (".onnx", *_TORCH_SUFFIXES):
        raise ModelError(f"{path}: unknown model file type {suffix or '(none)'}; expected .onnx, .pth or a training run folder")


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
