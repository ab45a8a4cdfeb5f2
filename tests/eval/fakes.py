"""Test-only embedders with the facebce embedder interface: `.embed(uint8 N x H x W x 3 BGR) -> N x D`."""
from __future__ import annotations

import cv2
import numpy as np


class ProjectionEmbedder:
    """A fixed random projection of the 16x16 grey image: raw (not normalised), deterministic, fast."""

    def __init__(self, dim: int = 32, seed: int = 0):
        self.proj = np.random.default_rng(seed).normal(size=(256, dim)).astype(np.float32) / 16
        self.calls = 0

    def embed(self, images_bgr: np.ndarray) -> np.ndarray:
        self.calls += 1
        small = np.stack([cv2.resize(cv2.cvtColor(im, cv2.COLOR_BGR2GRAY), (16, 16), interpolation=cv2.INTER_AREA)
                          for im in images_bgr]).reshape(len(images_bgr), -1)
        # einsum's own loop, not BLAS: each row's bits do not depend on how many rows are in the batch
        return np.einsum("nk,kd->nd", (small.astype(np.float32) - 128) / 64, self.proj)


class BrokenEmbedder(ProjectionEmbedder):
    """Returns NaN for every 7th image (a diverged model)."""

    def embed(self, images_bgr: np.ndarray) -> np.ndarray:
        out = super().embed(images_bgr)
        out[::7] = np.nan
        return out
