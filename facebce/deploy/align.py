"""Face detection and ArcFace alignment for raw photos, equal to insightface's pipeline.

The shared LFW/CelebA crops were made with insightface's SCRFD and `norm_crop` (see the shared
data README, "How the crops were made"). A model trained or evaluated on those crops only sees
the same pixels at deploy time if photos are aligned the same way, so this module re-implements
that pipeline with numpy, OpenCV and onnxruntime only (no insightface, no scikit-image), and its
tests check it against insightface: `norm_crop` byte for byte, the detector to ~1e-3 px.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from tqdm import tqdm

from facebce.data.align import (ARCFACE_DST, estimate_similarity, norm_crop, points_from_68,  # noqa: F401
                                 reference_points)  # the geometry lives in data (eval aligns IJB with it)
from facebce.errors import ConfigError, DataFormatError, FacebceError, ModelError
from facebce.fileio import atomic_write_bytes, read_bgr

POLICIES = ("central", "largest", "best", "all")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # as facebce.data.image_folder; not imported to keep deploy torch-free
REPORT_JSON = "alignment_report.json"
REPORT_CSV = "alignment_report.csv"


# ----------------------------------------------------------------------------------------------
# SCRFD detector
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # arrays: compare fields explicitly
class Detections:
    """Faces in one image, highest score first, in that image's pixel coordinates."""
    boxes: np.ndarray   # (n, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (n,) float32
    kps: np.ndarray     # (n, 5, 2) float32 landmarks, order of ARCFACE_DST

    def __len__(self) -> int:
        return len(self.scores)

    def subset(self, index) -> Detections:
        return Detections(self.boxes[index], self.scores[index], self.kps[index])


class ScrfdDetector:
    """SCRFD face detector with 5 landmarks (`*_bnkps.onnx`: strides 8/16/32, 2 anchors each).

    Equivalent to insightface's `SCRFD.prepare(ctx_id=-1, input_size, det_thresh, nms_thresh)` +
    `detect(img, max_num=0)`: same letterbox, normalisation, decoding, ordering and NMS, so the
    landmarks (and therefore the crops) match what built the shared data. Runs on CPU unless
    `providers` names others, as the shared crops were made on CPU.
    """

    STRIDES = (8, 16, 32)
    ANCHORS_PER_CELL = 2

    def __init__(self, model_path: str | os.PathLike, input_size: tuple[int, int] = (320, 320),
                 det_thresh: float = 0.3, nms_thresh: float = 0.4, providers: Sequence[str] | None = None):
        import onnxruntime  # here, so that importing facebce.deploy does not need it

        self.model_path = Path(model_path)
        self.input_size = _check_input_size(input_size)
        self.det_thresh = float(det_thresh)
        self.nms_thresh = float(nms_thresh)
        if not self.model_path.is_file():
            raise ModelError(f"{self.model_path}: no such detector model file")
        try:
            self.session = onnxruntime.InferenceSession(
                str(self.model_path), providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # onnxruntime raises its own untyped errors for bad files
            raise ModelError(f"{self.model_path}: not a loadable ONNX model ({type(e).__name__}: {e})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = self._check_outputs()
        self.anchor_centers = [self._anchor_centers(stride) for stride in self.STRIDES]

    def _check_outputs(self) -> list[str]:
        """Outputs must be scores, boxes, landmarks for the 3 strides: (·,1)x3, (·,4)x3, (·,10)x3."""
        outputs = self.session.get_outputs()
        shapes = [o.shape for o in outputs]
        if [len(s) for s in shapes] != [2] * 9 or [s[-1] for s in shapes] != [1] * 3 + [4] * 3 + [10] * 3:
            raise ModelError(f"{self.model_path}: not an SCRFD *_bnkps detector (expected 9 outputs of "
                             f"shape (anchors, 1|4|10), got {shapes})")
        return [o.name for o in outputs]

    def _anchor_centers(self, stride: int) -> np.ndarray:
        """(x, y) of every anchor of one stride, row-major, each cell repeated per anchor."""
        width, height = self.input_size
        ys, xs = np.mgrid[:height // stride, :width // stride]
        centers = (np.stack([xs, ys], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
        return np.repeat(centers, self.ANCHORS_PER_CELL, axis=0)

    def detect(self, img_bgr: np.ndarray) -> Detections:
        """All faces scoring >= det_thresh after NMS, in `img_bgr` (HxWx3 uint8 BGR) coordinates."""
        img_bgr = _check_image(img_bgr)
        canvas, scale = self._letterbox(img_bgr)
        blob = ((canvas[:, :, ::-1].astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outputs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(blob)})
        boxes, scores, kps = self._decode(outputs)
        boxes, kps = boxes / scale, kps / scale  # before NMS: its +1 pixel is not scale-invariant
        keep = nms(boxes, scores, self.nms_thresh)  # also sorts: best first, ties in anchor order
        return Detections(boxes, scores, kps).subset(keep)

    def _letterbox(self, img: np.ndarray) -> tuple[np.ndarray, float]:
        """Aspect-preserving resize into the top-left of a zero canvas; returns (canvas, scale)."""
        width, height = self.input_size
        h, w = img.shape[:2]
        if h / w > height / width:
            new_h, new_w = height, int(height / (h / w))
        else:
            new_w, new_h = width, int(width * (h / w))
        if new_w == 0 or new_h == 0:
            raise DataFormatError(f"image: {w}x{h} is too elongated to detect at {width}x{height}")
        canvas = np.zeros((height, width, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(img, (new_w, new_h))
        return canvas, new_h / h

    def _decode(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes, scores and landmarks (letterbox pixels) of every anchor scoring >= det_thresh.

        The network predicts distances from the anchor centre in units of the stride: to the
        4 box sides (left, top, right, bottom) and to the 5 landmarks (dx, dy).
        """
        n = len(self.STRIDES)
        boxes, scores, kps = [], [], []
        for i, (stride, centers) in enumerate(zip(self.STRIDES, self.anchor_centers)):
            hit = np.where(outputs[i][:, 0] >= self.det_thresh)[0]
            c = centers[hit][:, None, :]
            dist = outputs[n + i][hit] * stride
            boxes.append(np.concatenate([c[:, 0] - dist[:, :2], c[:, 0] + dist[:, 2:]], axis=1))
            kps.append(c + (outputs[2 * n + i][hit] * stride).reshape(-1, 5, 2))
            scores.append(outputs[i][hit, 0])
        return np.concatenate(boxes), np.concatenate(scores), np.concatenate(kps)


def nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> np.ndarray:
    """Greedy NMS; indices kept, best first. Uses the legacy +1 pixel box size, as insightface does."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= thresh]
    return np.asarray(keep, dtype=np.int64)


def _check_input_size(input_size) -> tuple[int, int]:
    """(width, height) of the detector input (`--det-size` on the command line sets both)."""
    try:
        width, height = (int(v) for v in input_size)
    except (TypeError, ValueError):
        raise ConfigError(f"det-size (input_size={input_size!r}): expected (width, height)") from None
    if width <= 0 or height <= 0 or width % 32 or height % 32:
        raise ConfigError(f"det-size {width if width == height else (width, height)}: the detector input must "
                          f"be a positive multiple of 32 (the coarsest SCRFD stride), e.g. 320 or 640")
    return width, height


def _check_image(img) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or 0 in img.shape:
        raise DataFormatError(f"image: expected an HxWx3 uint8 BGR array, got {img.dtype} {img.shape}")
    return img


# ----------------------------------------------------------------------------------------------
# Choosing faces and aligning them
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # arrays: compare fields explicitly
class AlignedFace:
    """One aligned face: the crop and where it came from in the source image."""
    crop: np.ndarray   # (S, S, 3) uint8 BGR
    kps: np.ndarray    # (5, 2) landmarks in the source image
    bbox: np.ndarray   # (4,) x1, y1, x2, y2 in the source image
    score: float       # detector score
    index: int         # position among the detector's faces (highest score = 0)


class FaceAligner:
    """Detect, pick and align faces with one of these policies:

    - 'central' (default): max `box_area - 2 * ||box_centre - image_centre||^2`, the rule that
      built the shared LFW/CelebA crops, so aligned photos match them. Suits centred portraits;
      a small face near the centre can beat a large off-centre one.
    - 'largest': max box area.  - 'best': highest detector score.  - 'all': every face.

    `min_score` drops weaker detections before the choice (the shared README finds crops
    scoring < 0.5 are mostly not faces); None keeps everything the detector returns.
    """

    def __init__(self, detector: ScrfdDetector, size: int = 112, policy: str = "central",
                 min_score: float | None = None):
        if policy not in POLICIES:
            raise ConfigError(f"policy={policy!r}: expected one of {', '.join(POLICIES)}")
        reference_points(size)  # validates size now rather than at the first face
        self.detector, self.size, self.policy = detector, size, policy
        self.min_score = None if min_score is None else float(min_score)

    def align(self, img_bgr: np.ndarray) -> list[AlignedFace]:
        """The faces the policy picks, aligned; an empty list when there is none."""
        return self.align_detections(img_bgr, self.candidates(img_bgr))

    def candidates(self, img_bgr: np.ndarray) -> Detections:
        """The detector's faces that pass `min_score`: the faces the policy chooses from."""
        dets = self.detector.detect(img_bgr)
        if self.min_score is None:
            return dets
        return dets.subset(dets.scores >= self.min_score)

    def align_detections(self, img_bgr: np.ndarray, dets: Detections) -> list[AlignedFace]:
        """Apply the policy to already computed `candidates` and crop the chosen faces."""
        return [AlignedFace(norm_crop(img_bgr, dets.kps[i], self.size), dets.kps[i], dets.boxes[i],
                            float(dets.scores[i]), int(i))
                for i in self.choose(dets, img_bgr.shape[:2])]

    def choose(self, dets: Detections, image_hw: tuple[int, int]) -> list[int]:
        """Indices into `dets` the policy keeps."""
        if len(dets) == 0:
            return []
        if self.policy == "all":
            return list(range(len(dets)))
        if self.policy == "best":
            return [int(np.argmax(dets.scores))]
        boxes = dets.boxes
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        if self.policy == "largest":
            return [int(np.argmax(area))]
        # image centre as float (w/2, h/2) like build_lfw_bin.py; insightface's max_num>0 uses h//2, w//2
        centre = np.array([image_hw[1] / 2, image_hw[0] / 2])
        offset = (boxes[:, :2] + boxes[:, 2:4]) / 2 - centre
        return [int(np.argmax(area - 2.0 * np.sum(offset ** 2, axis=1)))]


# ----------------------------------------------------------------------------------------------
# Aligning a folder
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AlignRecord:
    """What happened to one source image.

    status: ok (faces written), multi_face_picked (several faces, the policy wrote one; policy
    'all' writes every face and says ok), no_face, unreadable (cannot be read or decoded, or
    declares more pixels than allowed), unusable (decodes, but cannot be detected on: e.g. 2x3000
    pixels). `reason` says why for the last two; one bad photo never stops the folder.
    """
    file: str                # path relative to src_root, '/'-separated
    status: str              # ok | multi_face_picked | no_face | unreadable | unusable
    faces: int               # faces found (after min_score)
    score: float | None      # detector score of the written face (policy 'all': the best one)
    outputs: list[str] = field(default_factory=list)  # written files, relative to dst_root
    reason: str = ""         # why a photo is unreadable or unusable


@dataclass
class AlignReport:
    """Per-file outcome of `align_folder`; `write` stores it as JSON and a one-line-per-file CSV."""
    src_root: str
    dst_root: str
    policy: str
    size: int
    records: list[AlignRecord] = field(default_factory=list)

    STATUSES = ("ok", "multi_face_picked", "no_face", "unreadable", "unusable")

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.records) for s in self.STATUSES}

    def write(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        doc = {k: v for k, v in asdict(self).items() if k != "records"}
        doc.update(counts=self.counts, files=[asdict(r) for r in self.records])
        atomic_write_bytes(folder / REPORT_JSON, (json.dumps(doc, indent=1) + "\n").encode())
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["file", "status", "faces", "score", "reason"])
        writer.writerows([r.file, r.status, r.faces, "" if r.score is None else f"{r.score:.4f}", r.reason]
                         for r in self.records)
        atomic_write_bytes(folder / REPORT_CSV, text.getvalue().encode())


def align_folder(src_root: str | os.PathLike, dst_root: str | os.PathLike, aligner: FaceAligner, *,
                 jpeg_quality: int = 95, progress: bool = True) -> AlignReport:
    """Align every image under `src_root` (`<identity>/*.jpg|png`, flat or nested) into `dst_root`.

    Each crop goes to the mirrored path (policy 'all': `<stem>_face<K><suffix>`, K = detector
    rank), written atomically so an interrupted run leaves no half-written crops. Images that
    cannot be decoded, are too large or too odd to detect on, or hold no face are skipped and
    reported with the reason, not fatal; the report is returned and written to `dst_root` as
    alignment_report.json / .csv (also when the run is interrupted: what was done is reported).
    """
    src_root, dst_root = Path(src_root), Path(dst_root)
    if not src_root.is_dir():
        raise DataFormatError(f"{src_root}: not a directory")
    if dst_root.exists() and not dst_root.is_dir():
        raise DataFormatError(f"{dst_root}: exists and is not a folder (the output folder for aligned crops)")
    if dst_root.resolve() == src_root.resolve():
        raise ConfigError(f"dst_root={str(dst_root)!r}: must differ from src_root (crops would overwrite photos)")
    report = AlignReport(str(src_root), str(dst_root), aligner.policy, aligner.size)
    try:
        for path in tqdm(_image_files(src_root, dst_root), desc="align", unit="img", disable=not progress):
            rel = path.relative_to(src_root)
            report.records.append(_align_file(path, rel, dst_root, aligner, jpeg_quality))
    finally:
        report.write(dst_root)
    return report


def _image_files(src_root: Path, dst_root: Path) -> list[Path]:
    """Image files under src_root, sorted; hidden entries and dst_root (if nested inside) skipped."""
    dst = dst_root.resolve()
    return sorted(p for p in src_root.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(src_root).parts)
                  and dst not in p.resolve().parents)


def _align_file(path: Path, rel: Path, dst_root: Path, aligner: FaceAligner, jpeg_quality: int) -> AlignRecord:
    try:
        img = read_bgr(path)  # header-checked: a decompression bomb is refused before decoding
    except FacebceError as e:
        return AlignRecord(rel.as_posix(), "unreadable", 0, None, reason=_reason(e, path))
    try:
        dets = aligner.candidates(img)
        faces = aligner.align_detections(img, dets)
    except (FacebceError, cv2.error) as e:  # a photo too odd to detect on: report it, go on
        reason, size = _reason(e, "image"), f"{img.shape[1]}x{img.shape[0]}"
        reason = reason if size in reason else f"{size}: {reason}"
        return AlignRecord(rel.as_posix(), "unusable", 0, None, reason=reason)
    if not faces:
        return AlignRecord(rel.as_posix(), "no_face", len(dets), None)
    outputs = []
    for face in faces:
        out = rel if aligner.policy != "all" else rel.with_name(f"{rel.stem}_face{face.index}{rel.suffix}")
        atomic_write_bytes(dst_root / out, _encode(face.crop, rel.suffix, jpeg_quality, path))
        outputs.append(out.as_posix())
    status = "multi_face_picked" if len(dets) > 1 and aligner.policy != "all" else "ok"
    return AlignRecord(rel.as_posix(), status, len(dets), faces[0].score, outputs)


def _reason(e: Exception, prefix) -> str:
    """An error's one line without the leading '<path>: ' (the report names the file already)."""
    text = " ".join(str(e).split()) if not isinstance(e, cv2.error) else "OpenCV: " + str(e).strip().splitlines()[-1]
    head = f"{prefix}: "
    return text[len(head):] if text.startswith(head) else text


def _encode(crop: np.ndarray, suffix: str, jpeg_quality: int, source: Path) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if suffix.lower() != ".png" else []
    ok, buf = cv2.imencode(suffix.lower(), crop, params)
    if not ok:
        raise DataFormatError(f"{source}: OpenCV could not encode the aligned crop as {suffix}")
    return buf.tobytes()
