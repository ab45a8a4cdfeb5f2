"""Where an evaluation's embeddings come from: the `.npy` cache first, then the model (built once, only when needed).

The cache lives under `cache_dir/<model key>/` with one file per set, named by the set, a digest of
its files and the embedding kind, so a changed set never hits a stale file:
- `<set>-<digest>-flip.npy` / `-noflip.npy`: pairs sets and open-set folders, one row per image
  (2P x D, or N x D in folder order), float32, **L2-normalised** (flip-summed first when flip is on);
- `<set>-<digest>-raw.npy`: classification folders, raw float32 embeddings (no flip, not normalised:
  what a head scores in training);
- `<set>-<digest>-views<1|2>.npy`: IJB sets, raw per-image features (rows x views x D; eval_ijbc.py
  uses their norms as quality weights).
Files are written atomically (facebce.fileio), so a reader never sees half an array; an unreadable
file is a one-line error that says to delete it.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facebce.errors import ConfigError, DataFormatError, FacebceError
from facebce.eval.ijb import embed_ijb
from facebce.eval.image_sets import ImageSet
from facebce.eval.model_loading import ModelSpec, file_digest
from facebce.fileio import atomic_open, unit_rows

_CHUNK = 256  # images per embed call: a progress step, and a bound on the crops held at once


class EmbeddingSource:
    """Where embeddings come from: the cache first, then the model (built once, only when needed)."""

    def __init__(self, model, *, flip: bool, cache_dir=None, model_name: str | None = None, progress: bool = True):
        self.model, self.flip, self.progress = model, flip, progress
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._built: dict[str, object] = {}
        if isinstance(model, ModelSpec):
            self.key = model_name or model.key
            self.label = model.describe()
        else:
            self.key = model_name
            self.label = model_name or getattr(model, "name", None) or type(model).__name__
        if model is None and (self.cache_dir is None or model_name is None):
            raise ConfigError("model=None re-scores cached embeddings: give cache_dir and model_name")
        if self.cache_dir is not None and self.key is None and not isinstance(model, Mapping):
            raise ConfigError("cache_dir needs a model_name to key the cache (or pass a ModelSpec)")
        if hasattr(model, "embed") and getattr(model, "flip", False) and not flip:
            raise ConfigError("evaluate(flip=False) but the embedder flips (its flip=True); make them agree")

    def image_embeddings(self, name: str, images: ImageSet) -> np.ndarray:
        """L2-normalised float32 embeddings of every image of a pairs set (2P x D) or an open-set
        folder (N x D); the cache holds exactly these rows (normalised, flip-summed when flip is on)."""
        n_images = images.n_images
        if isinstance(self.model, Mapping):
            if name not in self.model:
                raise ConfigError(f"embeddings: none given for set {name!r} (have {', '.join(self.model)})")
            return _normalised(self.model[name], name, n_images)
        cache = self._cache_path(f"{name}-{images.digest[:16]}-{'flip' if self.flip else 'noflip'}")
        if cache is not None and cache.is_file():
            return _normalised(_load_npy(cache), f"{name} (cache {cache})", n_images)
        if self.model is None:
            raise ConfigError(f"{name}: no cached embeddings at {cache} and no model to compute them")
        raw = self._embed_distinct(self._embedder("crops"), images, name)[images.inverse]
        emb = _normalised(raw, name, n_images)
        if cache is not None:  # rows of unit length are read back bit-unchanged: a cache hit gives the same bits
            _save_npy(cache, emb)
        return emb

    def raw_embeddings(self, name: str, images: ImageSet) -> np.ndarray:
        """Raw float32 embeddings (no flip, not normalised: what a head scores in training) of every
        image of a classification set, cached apart from the flip-summed ones."""
        n_images = images.n_images
        cache = self._cache_path(f"{name}-{images.digest[:16]}-raw")
        if cache is not None and cache.is_file():
            raw = _load_npy(cache)
        else:
            raw = self._embed_distinct(self._embedder("classify"), images, name, mirror=False)
            if cache is not None:
                _save_npy(cache, raw)
        raw = np.asarray(raw, np.float32)
        if raw.ndim != 2 or raw.shape[0] != n_images or not np.isfinite(raw).all():
            raise DataFormatError(f"{name}: raw embeddings of shape {raw.shape} (expected {n_images} x D, finite)")
        return raw

    def ijb_features(self, meta, *, views: int, align) -> np.ndarray:
        """Raw per-image features (rows x views x D) of an IJB set, cached like the pairs sets."""
        if isinstance(self.model, Mapping):
            return _checked_raw(self.model[meta.name], meta.name, meta.templates.size, views)
        cache = self._cache_path(f"{meta.name}-{file_digest(meta.points_file)[:16]}-views{views}")
        if cache is not None and cache.is_file():
            return _checked_raw(_load_npy(cache), f"{meta.name} (cache {cache})", meta.templates.size, views)
        if self.model is None:
            raise ConfigError(f"{meta.name}: no cached features at {cache} and no model to compute them")
        if align is None:  # insightface's norm_crop, as eval_ijbc.py aligns
            from facebce.data.align import norm_crop as align
        embedder = self._embedder("ijb")
        if getattr(embedder, "flip", False):
            raise ConfigError(f"{meta.name}: the embedder flips; IJB needs the two views apart (flip=False)")
        if getattr(embedder, "normalize", False):
            warnings.warn(f"{meta.name}: the embedder L2-normalises, so image feature norms (eval_ijbc.py's "
                          "quality weight) are lost; build it with normalize=False", stacklevel=3)
        raw = _checked_raw(embed_ijb(meta, embedder, align, flip=views == 2, progress=self.progress),
                           meta.name, meta.templates.size, views)
        if cache is not None:
            _save_npy(cache, raw)
        return raw

    def _embedder(self, purpose: str):
        """The embedder; a ModelSpec is built with the flip/normalise each purpose needs."""
        if not isinstance(self.model, ModelSpec):
            return self.model
        if purpose not in self._built:
            crops = purpose == "crops"  # aligned crops, flip-summed and normalised; IJB wants the views apart;
            # "classify": single unflipped raw embeddings, as the head saw them in training
            self._built[purpose] = self.model.build(flip=self.flip and crops, normalize=crops)
        return self._built[purpose]

    def inference(self) -> str | None:
        """How the embedders that ran used the CPU (an OnnxEmbedder's `layout` and, when it measured,
        the calls per second of each layout), for the report; None when nothing was embedded."""
        embedders = list(self._built.values()) if isinstance(self.model, ModelSpec) else [self.model]
        parts = []
        for e in embedders:
            layout, rates = getattr(e, "layout", None), getattr(e, "layout_rates", None) or {}
            if layout is None:
                continue
            if layout in rates:
                others = ", ".join(f"{other} {rate:.1f}" for other, rate in rates.items() if other != layout)
                layout += f" (measured {rates[layout]:.1f} model calls/s vs {others})"
            parts.append(layout)
        return "; ".join(dict.fromkeys(parts)) or None

    def _embed_distinct(self, embedder, images: ImageSet, name: str, *, mirror: bool | None = None) -> np.ndarray:
        """Embeddings of the distinct images; the runner mirrors only embedders that do not flip themselves."""
        if mirror is None:
            mirror = self.flip and not getattr(embedder, "flip", False)
        out = []
        first = images.first
        for start in tqdm(range(0, first.size, _CHUNK), desc=f"embed {name}", unit="chunk",
                          disable=not self.progress):
            crops = images.read(first[start:start + _CHUNK])
            try:
                emb = np.asarray(embedder.embed(crops), np.float32)
                if mirror:
                    emb = emb + np.asarray(embedder.embed(np.ascontiguousarray(crops[:, :, ::-1])), np.float32)
            except FacebceError as e:
                raise type(e)(f"{name}: {e}") from None
            out.append(emb)
        return np.concatenate(out)

    def _cache_path(self, stem: str) -> Path | None:
        if self.cache_dir is None or self.key is None:
            return None
        return self.cache_dir / re.sub(r"[^\w.+-]", "_", self.key) / f"{stem}.npy"


def _normalised(emb, where: str, n_images: int) -> np.ndarray:
    """Check shape, NaN/Inf and zero norms (errors name the set), then L2-normalise in float32
    (embeddings already of unit length are returned as they are)."""
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] != n_images:
        raise DataFormatError(f"{where}: embeddings of shape {emb.shape}, expected {n_images} x D (one row per image)")
    return unit_rows(emb, where, what="embeddings")


def _checked_raw(raw, where: str, n_rows: int, views: int) -> np.ndarray:
    raw = np.asarray(raw, dtype=np.float32)
    if raw.ndim != 3 or raw.shape[0] != n_rows or raw.shape[1] < views:
        raise DataFormatError(f"{where}: features of shape {raw.shape}, expected {n_rows} x {views} x D")
    bad = np.flatnonzero(~np.isfinite(raw).all(axis=(1, 2)))
    if bad.size:
        raise DataFormatError(f"{where}: {bad.size} images have NaN or Inf features (first: row {bad[0] + 1})")
    return raw[:, :views]


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataFormatError(f"{path}: unreadable cached embeddings ({e}); delete it to recompute") from None


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Atomic: a reader sees the old file or the whole new array, never half of one."""
    with atomic_open(path, "wb") as f:
        np.save(f, array)
