"""Test-only: a small synthetic IJB-C folder in the exact insightface IJB_release format (docs/formats.md §6).

`IJBC/loose_crop/<n>.jpg` are loose crops: a synthetic face (facebce.data.synthetic) scaled, rotated
and shifted into a larger frame, so alignment has real work to do; the 5 points written to the
meta file are the template points carried through that same transform. Templates hold several
media (stills and multi-frame "videos"), some media appear in two templates of a subject, template
and media ids are sparse, rows of a template are not contiguous, and the pair list holds a reversed
duplicate, as in the real files.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from facebce.data.synthetic import TEMPLATE_112, SyntheticFaces

LOOSE = 160  # loose crop side


def align_for_tests(img_bgr: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """A stand-in for facebce.deploy.align.norm_crop: least-squares similarity onto the template."""
    m, _ = cv2.estimateAffinePartial2D(np.asarray(kps, np.float32), TEMPLATE_112.astype(np.float32),
                                       method=cv2.LMEDS)
    return cv2.warpAffine(img_bgr, m, (size, size), borderValue=0.0)


def _loose_crop(face_rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Place a 112x112 face in a LOOSE x LOOSE frame; returns (BGR image, 5x2 landmarks in it)."""
    scale, angle = rng.uniform(0.9, 1.2), rng.uniform(-10, 10)
    centre = np.array([LOOSE / 2, LOOSE / 2]) + rng.uniform(-8, 8, 2)
    m = cv2.getRotationMatrix2D((56.0, 56.0), angle, scale)
    m[:, 2] += centre - 56.0
    img = cv2.warpAffine(cv2.cvtColor(face_rgb, cv2.COLOR_RGB2BGR), m, (LOOSE, LOOSE), borderMode=cv2.BORDER_REFLECT)
    kps = cv2.transform(TEMPLATE_112[None].astype(np.float64), m)[0]
    return img, kps


def write_synthetic_ijb(root: Path, *, subjects: int = 40, seed: int = 0, prefix: str = "ijbc",
                        folder: str = "IJBC", galleries=("G1", "G2")) -> Path:
    """Write `root/<folder>/{meta,loose_crop}`; returns root/<folder>. ~7-8 images per subject."""
    rng = np.random.default_rng(seed)
    faces = SyntheticFaces(subjects, 12, seed=seed, difficulty=0.5)
    base = root / folder
    (base / "meta").mkdir(parents=True)
    (base / "loose_crop").mkdir()
    rows = []  # (name, tid, mid, kps, score)
    templates_of: dict[int, list[int]] = {}
    next_tid, next_mid, next_img = 1, 50_000, 1
    for s in range(subjects):
        used = 0
        subject_medias: list[tuple[int, list[int]]] = []  # (media id, face indices)
        for _ in range(3):  # three templates per subject
            tid = next_tid
            next_tid += int(rng.integers(1, 4))  # sparse template ids
            templates_of.setdefault(s, []).append(tid)
            media = []
            if subject_medias and rng.random() < 0.5:  # reuse a media of another template
                media.append(subject_medias[int(rng.integers(len(subject_medias)))])
            for _ in range(int(rng.integers(1, 3))):
                n_frames = int(rng.integers(1, 3))  # a still (1) or a short video (2)
                frames = [(used + k) % 12 for k in range(n_frames)]
                used += n_frames
                media.append((next_mid, frames))
                subject_medias.append(media[-1])
                next_mid += int(rng.integers(1, 50))
            for mid, frames in media:
                for f in frames:
                    img, kps = _loose_crop(faces.image(s, f), rng)
                    name = f"{next_img}.jpg"
                    next_img += 1
                    cv2.imwrite(str(base / "loose_crop" / name), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
                    rows.append((name, tid, mid, kps, float(rng.uniform(0.3, 1.0))))
    order = rng.permutation(len(rows))  # a template's rows are not contiguous
    rows = [rows[i] for i in order]
    _write_lines(base / "meta" / f"{prefix}_face_tid_mid.txt", [f"{n} {t} {m}" for n, t, m, _, _ in rows])
    _write_lines(base / "meta" / f"{prefix}_name_5pts_score.txt",
                 [" ".join([n, *(f"{v:.3f}" for v in k.ravel()), f"{sc:.6f}"]) for n, _, _, k, sc in rows])
    _write_lines(base / "meta" / f"{prefix}_template_pair_label.txt", _pairs(templates_of, rng))
    _write_1n(base / "meta", prefix, templates_of, rows, galleries)
    return base


def _pairs(templates_of: dict[int, list[int]], rng: np.random.Generator) -> list[str]:
    lines = []
    subjects = list(templates_of)
    for s in subjects:
        t = templates_of[s]
        lines += [f"{t[i]} {t[j]} 1" for i in range(len(t)) for j in range(i + 1, len(t))]
        for o in rng.choice([x for x in subjects if x != s], 6, replace=False):
            lines.append(f"{t[int(rng.integers(len(t)))]} {templates_of[int(o)][int(rng.integers(3))]} 0")
    a, b, label = lines[5].split()
    lines.append(f"{b} {a} {label}")  # a reversed duplicate, as real pair lists contain
    return [lines[i] for i in rng.permutation(len(lines))]


def _write_1n(meta: Path, prefix: str, templates_of, rows, galleries) -> None:
    """Gallery k holds template 0 of the k-th share of the subjects; every subject's templates 1-2 are probes."""
    images_of: dict[int, list[str]] = {}
    for name, tid, _, _, _ in rows:
        images_of.setdefault(tid, []).append(name)
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n"
    subjects = sorted(templates_of)
    shares = np.array_split(subjects, len(galleries))
    for g, share in zip(galleries, shares):
        lines = [f"{templates_of[s][0]},{s + 1000},{img},{k}" for s in share for k, img in
                 enumerate(images_of[templates_of[s][0]])]
        (meta / f"{prefix}_1N_gallery_{g}.csv").write_text(header + "\n".join(lines) + "\n")
    lines = [f"{t},{s + 1000},{img},{k}" for s in subjects for t in templates_of[s][1:]
             for k, img in enumerate(images_of[t])]
    (meta / f"{prefix}_1N_probe_mixed.csv").write_text(header + "\n".join(lines) + "\n")


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")
