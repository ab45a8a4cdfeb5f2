"""Synthetic identities for demos and tests: procedural "faces" that need no download and no licence.

Each identity is a stable set of drawing parameters (face shape, colours, skin texture, landmark
positions near insightface's 112x112 alignment template) derived from `(seed, identity)`; each image
of it is a nuisance variant (pose jitter, background, lighting, occluder, blur, noise) derived from
`(seed, identity, index)`, so any image can be drawn alone, in any order, and comes out the same.

The set is built to be hard in the way real aligned faces are: nuisance variation dwarfs the identity
signal in raw pixels, yet identity is learnable. On 1000 balanced pairs of held-out identities,
best-threshold accuracy is about 0.58 for raw-pixel cosine and 0.53-0.57 for randomly initialised
CNNs, but about 0.79 for PCA+LDA fitted on 150 other identities (tests/data/test_synthetic.py).
A held-out test set is the same generator with disjoint identities:
`SyntheticFaces(n, m, seed=s, first_identity=10_000)` shares no identity with `first_identity=0`
as long as the training set has fewer than 10,000 identities.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from facebce.data.transforms import eval_transform, train_transform
from facebce.errors import ConfigError, DataFormatError
from facebce.fileio import fsync_dir

# insightface's 112x112 alignment template: left eye, right eye, nose tip, left and right mouth corner.
TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]])
_SIZE = 112     # faces are drawn at 112x112 and resized for other image sizes
_PAD = 32       # the face is drawn on a padded canvas so pose jitter never pulls in empty border
_CANVAS = _SIZE + 2 * _PAD
_JPEG_QUALITY = 95  # insightface's packing tools
# Salts keep the identity and image random streams apart even when their integer keys coincide.
_IDENTITY_SALT, _IMAGE_SALT = 0x1D, 0x1A


@dataclass(frozen=True)
class _Identity:
    """Everything that stays fixed across one identity's images (pixels of the 112 frame)."""

    landmarks: np.ndarray   # 5x2, the template plus identity-specific offsets
    face_axes: tuple[float, float]
    skin: np.ndarray        # RGB float
    hair: np.ndarray
    iris: np.ndarray
    lips: np.ndarray
    hair_top: float         # y of the hairline
    hair_volume: float      # how far hair extends beyond the face outline
    eye_size: float
    brow_tilt: float
    nose_width: float
    texture: np.ndarray     # (k, 4): frequency x, frequency y, phase, amplitude of skin sinusoids
    marks: np.ndarray       # (k, 4): x, y, radius, signed darkness of moles/patches


def _rng(*key: int) -> np.random.Generator:
    """An independent stream per key: nothing depends on what was drawn before (call order, workers)."""
    return np.random.default_rng(np.random.SeedSequence(key))


def _colour(c) -> tuple[float, ...]:
    """cv2 wants a plain tuple of floats (or one float for single-channel layers)."""
    return tuple(float(v) for v in np.atleast_1d(c))


def _canvas_grid(step: int) -> tuple[np.ndarray, np.ndarray]:
    """x, y of the pixel centres of the canvas shrunk by `step`, in the 112 frame (cv2.resize's convention)."""
    centres = np.arange(_CANVAS // step, dtype=np.float32) * step + (step - 1) / 2 - _PAD
    return np.meshgrid(centres, centres)


_TEXTURE_STEP = 4
_TEXTURE_GRID = _canvas_grid(_TEXTURE_STEP)
# Image coordinates in [-0.5, 0.5) for gradients (background, lighting).
_UNIT = np.arange(_SIZE, dtype=np.float32) / _SIZE - 0.5
_UNIT_X, _UNIT_Y = np.meshgrid(_UNIT, _UNIT)


_HAIR_PALETTE = np.array([[25, 20, 20], [90, 60, 35], [200, 170, 110], [150, 70, 35], [160, 160, 160]])


def _draw_identity(rng: np.random.Generator) -> _Identity:
    """One identity's parameters. Ranges are modest next to the per-image nuisance, which is what
    keeps raw pixels near chance while a learned projection still separates identities."""
    tone = rng.uniform(0, 1)
    skin = (1 - tone) * np.array([140, 100, 80]) + tone * np.array([225, 185, 160]) + rng.normal(0, 8, 3)
    return _Identity(
        landmarks=TEMPLATE_112 + rng.normal(0, 2.5, (5, 2)),
        face_axes=(rng.uniform(33, 43), rng.uniform(45, 56)),
        skin=np.clip(skin, 0, 255),
        hair=np.clip(_HAIR_PALETTE[rng.integers(len(_HAIR_PALETTE))] + rng.normal(0, 15, 3), 0, 255),
        iris=rng.uniform(20, 140, 3),
        lips=np.clip(skin * rng.uniform(0.55, 0.85) + np.array([30, 0, 0]), 0, 255),
        hair_top=rng.uniform(10, 26),
        hair_volume=rng.uniform(0, 10),
        eye_size=rng.uniform(3.5, 6.0),
        brow_tilt=rng.uniform(-4, 4),
        nose_width=rng.uniform(5, 10),
        texture=np.column_stack([rng.uniform(-0.1, 0.1, (3, 2)), rng.uniform(0, 2 * np.pi, 3),
                                 rng.uniform(0.06, 0.15, 3)]),
        marks=np.column_stack([rng.uniform(30, 82, 4), rng.uniform(35, 100, 4), rng.uniform(2, 5, 4),
                               rng.choice([-1, 1], 4) * rng.uniform(0.2, 0.5, 4)]),
    )


def _canvas_pt(p) -> tuple[int, int]:
    """A 112-frame point on the padded canvas, in cv2's 4-bit sub-pixel fixed point."""
    return round((p[0] + _PAD) * 16), round((p[1] + _PAD) * 16)


def _ellipse(img: np.ndarray, centre, axes, angle: float, colour) -> None:
    """A filled anti-aliased ellipse at sub-pixel precision (112-frame coordinates)."""
    cv2.ellipse(img, _canvas_pt(centre), (round(axes[0] * 16), round(axes[1] * 16)), float(angle), 0, 360,
                _colour(colour), -1, cv2.LINE_AA, 4)


def _render_face(ident: _Identity, rng: np.random.Generator, d: float) -> tuple[np.ndarray, np.ndarray]:
    """The face on the padded canvas in the aligned frame: (RGB float32, alpha float32).

    `rng` adds small per-image expression changes (mouth opening, brow raise, gaze), scaled by `d`.
    """
    img = np.zeros((_CANVAS, _CANVAS, 3), np.float32)
    alpha = np.zeros((_CANVAS, _CANVAS), np.float32)
    lm = ident.landmarks
    eyes_mid = (lm[0] + lm[1]) / 2
    centre = (eyes_mid[0], eyes_mid[1] + 12)
    ax, ay = ident.face_axes
    hair_axes = (ax + ident.hair_volume, centre[1] - ident.hair_top + ident.hair_volume)
    neck = [_canvas_pt((centre[0] - ax * 0.55, centre[1])), _canvas_pt((centre[0] + ax * 0.55, _SIZE + _PAD))]
    for layer, hair, neck_colour, skin in ((img, ident.hair, ident.skin * 0.8, ident.skin), (alpha, 1, 1, 1)):
        _ellipse(layer, centre, hair_axes, 0, hair)
        cv2.rectangle(layer, neck[0], neck[1], _colour(neck_colour), -1, cv2.LINE_AA, 4)
        _ellipse(layer, centre, (ax, ay), 0, skin)
    img *= _skin_texture(ident)[..., None]
    # Fringe over the forehead; whatever spills outside the head has alpha 0 and never shows.
    _ellipse(img, (centre[0], ident.hair_top), (ax * 1.05, 10 + ident.hair_volume * 0.5), 0, ident.hair)
    _draw_features(img, ident, rng, d)
    return img, alpha


def _skin_texture(ident: _Identity) -> np.ndarray:
    """Multiplicative shading of the head: identity-specific sinusoids plus moles/patches.

    Smooth, so it is computed at a quarter of the resolution and upsampled.
    """
    xx, yy = _TEXTURE_GRID
    shade = np.ones_like(xx)
    for fx, fy, phase, amp in ident.texture:
        shade += amp * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
    for x, y, r, dark in ident.marks:
        shade -= dark * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * r * r))
    return cv2.resize(shade, (_CANVAS, _CANVAS), interpolation=cv2.INTER_LINEAR)


def _draw_features(img: np.ndarray, ident: _Identity, rng: np.random.Generator, d: float) -> None:
    """Eyes, brows, nose and mouth at the identity's landmarks, with a little per-image expression."""
    lm = ident.landmarks
    s = ident.eye_size
    gaze = rng.normal(0, 0.8, 2) * d
    brow_raise = rng.normal(0, 1.0) * d
    for eye, side in ((lm[0], -1), (lm[1], 1)):
        _ellipse(img, eye, (s * 1.9, s), 0, (245, 245, 240))
        _ellipse(img, eye + gaze, (s * 0.8, s * 0.8), 0, ident.iris)
        _ellipse(img, eye + gaze, (s * 0.35, s * 0.35), 0, (10, 10, 10))
        _ellipse(img, eye + (0, -s - 6 - brow_raise), (s * 2.2, 1.8), side * ident.brow_tilt, ident.hair * 0.8)
    nose = lm[2]
    cv2.line(img, _canvas_pt((nose[0], (lm[0][1] + lm[1][1]) / 2 + 4)), _canvas_pt(nose),
             _colour(ident.skin * 0.7), 2, cv2.LINE_AA, 4)
    _ellipse(img, nose, (ident.nose_width, 3), 0, ident.skin * 0.6)
    mouth_mid = (lm[3] + lm[4]) / 2
    half_width = np.linalg.norm(lm[4] - lm[3]) / 2
    angle = np.degrees(np.arctan2(lm[4][1] - lm[3][1], lm[4][0] - lm[3][0]))
    opening = abs(rng.normal(0, 1.5)) * d
    _ellipse(img, mouth_mid, (half_width, 2.5 + opening), angle, ident.lips)
    if opening > 1:
        _ellipse(img, mouth_mid, (half_width * 0.7, opening), angle, (40, 15, 15))


def _nuisance_transform(rng: np.random.Generator, d: float) -> np.ndarray:
    """Canvas -> 112 output affine: rotation, scale and shift about the image centre (residual misalignment)."""
    angle = rng.uniform(-8, 8) * d
    scale = np.exp(rng.uniform(-0.07, 0.07) * d)
    centre = _SIZE / 2 + _PAD
    m = cv2.getRotationMatrix2D((centre, centre), angle, scale)
    m[:, 2] += rng.uniform(-4, 4, 2) * d - _PAD
    return m


def _background(rng: np.random.Generator) -> np.ndarray:
    """A random colour gradient with a few random shapes: clutter that changes with every image."""
    theta = rng.uniform(0, 2 * np.pi)
    t = (np.cos(theta) * _UNIT_X + np.sin(theta) * _UNIT_Y)[..., None] + 0.5
    bg = (1 - t) * rng.uniform(0, 255, 3).astype(np.float32) + t * rng.uniform(0, 255, 3).astype(np.float32)
    for _ in range(rng.integers(1, 5)):
        colour = _colour(rng.uniform(0, 255, 3))
        corner = tuple(int(v) for v in rng.integers(0, _SIZE, 2))
        if rng.random() < 0.5:
            cv2.circle(bg, corner, int(rng.integers(5, 30)), colour, -1, cv2.LINE_AA)
        else:
            cv2.rectangle(bg, corner, tuple(int(v) for v in rng.integers(0, _SIZE, 2)), colour, -1)
    return bg


def _lighting(img: np.ndarray, rng: np.random.Generator, d: float) -> np.ndarray:
    """Directional light (a gain gradient), overall brightness/contrast and a colour cast."""
    theta = rng.uniform(0, 2 * np.pi)
    gain = 1 + rng.uniform(0, 1.5) * d * (np.cos(theta) * _UNIT_X + np.sin(theta) * _UNIT_Y)
    cast = np.exp(rng.normal(0, 0.15, 3) * d).astype(np.float32)
    img = img * (gain[..., None] * (cast * np.exp(rng.normal(0, 0.35) * d)))
    mean = img.mean()
    return (img - mean) * np.exp(rng.normal(0, 0.2) * d) + mean


def _occlude(img: np.ndarray, rng: np.random.Generator, lm: np.ndarray) -> None:
    """Sunglasses, a mask or a random patch, in a random colour (`lm`: landmarks in the output image)."""
    colour = _colour(rng.uniform(0, 255, 3))
    kind = rng.integers(3)
    if kind == 0:
        cv2.rectangle(img, (int(lm[0][0] - 14), int(lm[0][1] - 7)), (int(lm[1][0] + 14), int(lm[1][1] + 7)),
                      colour, -1, cv2.LINE_AA)
    elif kind == 1:
        cv2.rectangle(img, (int(lm[3][0] - 18), int(lm[2][1])), (int(lm[4][0] + 18), _SIZE), colour, -1, cv2.LINE_AA)
    else:
        x, y = rng.integers(0, _SIZE, 2)
        cv2.circle(img, (int(x), int(y)), int(rng.integers(10, 25)), colour, -1, cv2.LINE_AA)


class SyntheticFaces:
    """`num_identities` procedural identities x `images_per_identity` images each, fully determined by `seed`.

    `difficulty` scales all per-image nuisance (0: every image of an identity is its clean aligned
    face; 1: the default hard setting). Identity k here is global identity `first_identity + k`.
    """

    def __init__(self, num_identities: int, images_per_identity: int, *, seed: int = 0,
                 first_identity: int = 0, image_size: int = _SIZE, difficulty: float = 1.0):
        if num_identities < 1 or images_per_identity < 1:
            raise ConfigError(f"num_identities={num_identities} and images_per_identity={images_per_identity} "
                             "must both be >= 1")
        if image_size < 16:
            raise ConfigError(f"image_size={image_size} must be >= 16")
        if difficulty < 0:
            raise ConfigError(f"difficulty={difficulty} must be >= 0")
        if not (0 <= seed < 2**32 and 0 <= first_identity):
            raise ConfigError(f"seed={seed} must be in [0, 2**32) and first_identity={first_identity} >= 0")
        self.num_identities = num_identities
        self.images_per_identity = images_per_identity
        self.seed = seed
        self.first_identity = first_identity
        self.image_size = image_size
        self.difficulty = difficulty
        self.labels = np.repeat(np.arange(num_identities, dtype=np.int64), images_per_identity)

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        """Image i in identity-major order, with its label 0..num_identities-1."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        label, index = divmod(i, self.images_per_identity)
        return self.image(label, index), label

    def image(self, identity: int, index: int) -> np.ndarray:
        """RGB uint8 image `index` of identity `identity` (0-based, local to this set)."""
        if not (0 <= identity < self.num_identities and 0 <= index < self.images_per_identity):
            raise IndexError(f"image ({identity}, {index}) out of range for "
                             f"{self.num_identities} identities x {self.images_per_identity} images")
        global_id = self.first_identity + identity
        ident = _draw_identity(_rng(self.seed, _IDENTITY_SALT, global_id))
        img = self._render(ident, _rng(self.seed, _IMAGE_SALT, global_id, index))
        if self.image_size != _SIZE:
            img = cv2.resize(img, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
        return img

    def encoded(self, identity: int, index: int) -> bytes:
        """The image as JPEG bytes (quality 95, BGR-encoded like insightface's packers, so decoders give RGB)."""
        _, buf = cv2.imencode(".jpg", cv2.cvtColor(self.image(identity, index), cv2.COLOR_RGB2BGR),
                              [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        return buf.tobytes()

    def _render(self, ident: _Identity, rng: np.random.Generator) -> np.ndarray:
        d = self.difficulty
        face, alpha = _render_face(ident, rng, d)
        m = _nuisance_transform(rng, d)
        face = cv2.warpAffine(face, m, (_SIZE, _SIZE), flags=cv2.INTER_LINEAR)
        alpha = cv2.warpAffine(alpha, m, (_SIZE, _SIZE), flags=cv2.INTER_LINEAR)[..., None]
        bg = _background(rng) if d > 0 else np.full((_SIZE, _SIZE, 3), 128, np.float32)
        img = _lighting(bg * (1 - alpha) + face * alpha, rng, d)
        if rng.random() < 0.3 * d:
            _occlude(img, rng, cv2.transform((ident.landmarks + _PAD)[None], m)[0])
        sigma = rng.uniform(0, 1.5) * d
        if sigma > 0.3:
            img = cv2.GaussianBlur(img, (0, 0), sigma)
        img += rng.standard_normal(img.shape, np.float32) * (rng.uniform(0, 8) * d)
        return np.clip(img, 0, 255).round().astype(np.uint8)


class SyntheticFaceDataset(Dataset):
    """`SyntheticFaces` behind the sample interface all facebce datasets share.

    `__getitem__` gives (normalised 3xHxW float tensor, label); `raw` gives (JPEG bytes, label).
    Samples are rendered on demand, so any size costs no disk and no memory.
    """

    def __init__(self, faces: SyntheticFaces, train: bool = True,
                 transform: Callable[[np.ndarray], torch.Tensor] | None = None):
        self.faces = faces
        self.transform = transform or (train_transform if train else eval_transform)
        self.num_classes = faces.num_identities
        self.labels = faces.labels
        self.image_size = (faces.image_size, faces.image_size)

    def __len__(self) -> int:
        return len(self.faces)

    def decoded(self, i: int) -> tuple[np.ndarray, int]:
        """(the rendered RGB uint8 image, label) before the transform."""
        return self.faces[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.faces[i]
        return self.transform(img), label

    def raw(self, i: int) -> tuple[bytes, int]:
        label, index = divmod(i, self.faces.images_per_identity)
        return self.faces.encoded(label, index), label


def write_image_folder(faces: SyntheticFaces, root: str | os.PathLike) -> Path:
    """Write `root/id_<label>/<index>.jpg` (numbers zero-padded so that sorted order is numeric order).

    Everything goes into a temporary sibling folder that is renamed to `root` at the end (then the
    parent folder is fsynced: facebce.fileio), so an interrupted run never leaves a partial set where
    a reader would take it for a complete one. Files and folders get the umask's normal permissions.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise DataFormatError(f"{root}: already exists and is not empty; choose a new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    tmp.mkdir()
    id_width = max(4, len(str(faces.num_identities - 1)))
    index_width = max(4, len(str(faces.images_per_identity - 1)))
    try:
        for label in range(faces.num_identities):
            folder = tmp / f"id_{label:0{id_width}d}"
            folder.mkdir()
            for index in range(faces.images_per_identity):
                (folder / f"{index:0{index_width}d}.jpg").write_bytes(faces.encoded(label, index))
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root.parent)
    return root


def make_pairs(faces: SyntheticFaces, num_pairs: int, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    """A verification set `(images, issame)` for `save_bin`: pair k is images 2k and 2k+1.

    Pairs alternate genuine, impostor, genuine, ..., so a block of consecutive pairs that starts at
    an even index and has even length is balanced: insightface's 10-fold split (contiguous folds)
    is balanced whenever num_pairs is a multiple of 20.
    An image used twice is the same bytes object, which `save_bin` stores once.
    """
    n, m = faces.num_identities, faces.images_per_identity
    if num_pairs < 2 or num_pairs % 2:
        raise ConfigError(f"num_pairs={num_pairs} must be even and >= 2 (half genuine, half impostor)")
    if n < 2 or m < 2:
        raise ConfigError(f"make_pairs needs >= 2 identities with >= 2 images each, got {n} x {m}")
    rng = np.random.default_rng(seed)
    encoded: dict[tuple[int, int], bytes] = {}

    def encode(identity, index) -> bytes:
        key = (int(identity), int(index))
        if key not in encoded:
            encoded[key] = faces.encoded(*key)
        return encoded[key]

    images: list[bytes] = []
    for k in range(num_pairs):
        if k % 2 == 0:
            identity = rng.integers(n)
            images += [encode(identity, index) for index in rng.choice(m, 2, replace=False)]
        else:
            images += [encode(identity, rng.integers(m)) for identity in rng.choice(n, 2, replace=False)]
    return images, np.arange(num_pairs) % 2 == 0
