"""Alignment: SCRFD parity with insightface, policies, folders (the geometry: tests/data/test_align.py).

No raw photos ship with the shared data, so test photos are composites: aligned LFW gallery crops
pasted at known places and scales on a grey canvas. Knowing where each face went lets the tests
check that re-detecting and re-aligning puts it back where it was.
"""
from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from facebce.deploy.align import (ARCFACE_DST, AlignReport, FaceAligner, ScrfdDetector, align_folder,
                                  estimate_similarity, nms)
from facebce.cli import main
from facebce.errors import ConfigError, DataFormatError, ModelError

DETECTOR = "models/scrfd_2.5g_bnkps.onnx"
GALLERY = "lfw_aligned_10plus"
GREY = 127


# ---------------------------------------------------------------------------- composites from real crops

def _gallery_crops(shared_data: Path, n: int, step: int = 97) -> list[tuple[str, np.ndarray]]:
    files = sorted((shared_data / GALLERY).glob("*/*.jpg"))[::step][:n]
    assert len(files) == n
    return [(f.name, cv2.imread(str(f))) for f in files]


def _composite(size_wh, placements) -> np.ndarray:
    """Grey canvas with each (crop, x, y, side) pasted as a side x side square at (x, y)."""
    canvas = np.full((size_wh[1], size_wh[0], 3), GREY, np.uint8)
    for crop, x, y, side in placements:
        canvas[y:y + side, x:x + side] = crop if side == crop.shape[0] else cv2.resize(crop, (side, side))
    return canvas


def _apply(matrix, pts):
    return pts @ matrix[:, :2].T + matrix[:, 2]


def _paste_matrix(x, y, side) -> np.ndarray:
    """Where the ideal alignment maps canvas pixels: undo the paste (crop = (p - xy) * 112/side)."""
    s = 112 / side
    return np.array([[s, 0, -x * s], [0, s, -y * s]])


def _corner_error(matrix, x, y, side) -> float:
    """Largest distance (crop pixels) between where `matrix` and the ideal put the crop's corners."""
    corners = np.array([[x, y], [x + side, y], [x, y + side], [x + side, y + side]], float)
    return float(np.linalg.norm(_apply(matrix, corners) - _apply(_paste_matrix(x, y, side), corners), axis=1).max())


def _mad(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@functools.lru_cache(maxsize=1)
def _our_detector(path: Path) -> ScrfdDetector:
    return ScrfdDetector(path)


@functools.lru_cache(maxsize=1)
def _insightface_detector(path: Path):
    model_zoo = pytest.importorskip("insightface.model_zoo")
    det = model_zoo.get_model(str(path))
    det.prepare(ctx_id=-1, input_size=(320, 320), det_thresh=0.3)
    return det


@pytest.fixture
def detector(shared_data) -> ScrfdDetector:
    return _our_detector(shared_data / DETECTOR)


@pytest.fixture
def photos(shared_data) -> list[np.ndarray]:
    """Eleven test photos: 1-3 faces at scales 0.8-2x in landscape/portrait/square photos, a crowd
    of partly hidden faces (NMS at work) and a blank."""
    c = [crop for _, crop in _gallery_crops(shared_data, 14)]
    rng = np.random.default_rng(5)
    crowd = [(c[k % 14], *rng.integers(0, [1060, 740]), 220) for k in range(24)]
    return [
        _composite((250, 250), [(c[0], 69, 69, 112)]),
        _composite((250, 250), [(c[1], 40, 60, 160)]),
        _composite((400, 300), [(c[2], 200, 50, 200)]),
        _composite((300, 400), [(c[3], 20, 150, 224)]),
        _composite((640, 480), [(c[4], 300, 100, 90)]),
        _composite((400, 300), [(c[5], 10, 40, 220), (c[6], 250, 120, 90)]),
        _composite((250, 250), [(c[7], 0, 0, 120), (c[8], 130, 130, 120)]),
        _composite((500, 250), [(c[9], 20, 60, 150), (c[10], 300, 30, 180)]),
        _composite((320, 320), [(c[11], 104, 104, 112), (c[12], 0, 200, 112), (c[13], 208, 0, 112)]),
        _composite((1280, 960), crowd),
        np.full((250, 250, 3), GREY, np.uint8),
    ]


# ---------------------------------------------------------------------------- norm_crop and detector parity

def test_detector_matches_insightface(shared_data, detector, photos):
    reference = _insightface_detector(shared_data / DETECTOR)
    faces = []
    for i, img in enumerate(photos):
        dets, kpss = reference.detect(img, max_num=0)
        ours = detector.detect(img)
        assert len(ours) == len(dets), f"photo {i}"
        np.testing.assert_allclose(ours.boxes, dets[:, :4], atol=1e-3, err_msg=f"photo {i}")
        np.testing.assert_allclose(ours.scores, dets[:, 4], atol=1e-5, err_msg=f"photo {i}")
        np.testing.assert_allclose(ours.kps, kpss, atol=1e-3, err_msg=f"photo {i}")
        faces.append(len(ours))
    assert faces[:9] + faces[10:] == [1, 1, 1, 1, 1, 2, 2, 2, 3, 0]  # every pasted face found, nothing else
    assert 10 <= faces[9] < 24  # the crowd: most faces, less those mostly covered by later pastes


def test_nms_keeps_what_insightface_keeps(shared_data):
    reference = _insightface_detector(shared_data / DETECTOR)  # its nms_thresh is 0.4, as ours
    rng = np.random.default_rng(4)
    for _ in range(20):  # crowded small boxes, where the legacy +1 pixel in the IoU matters
        xy = rng.uniform(0, 30, (40, 2)).astype(np.float32)
        boxes = np.hstack([xy, xy + rng.uniform(2, 12, (40, 2)).astype(np.float32)])
        scores = rng.permutation(np.linspace(0.3, 0.99, 40)).astype(np.float32)
        expected = reference.nms(np.hstack([boxes, scores[:, None]]))
        np.testing.assert_array_equal(nms(boxes, scores, 0.4), expected)


def test_detector_finds_each_pasted_face_where_it_was_put(detector, photos):
    dets = detector.detect(photos[7])  # faces at (20, 60, side 150) and (300, 30, side 180)
    centres = (dets.boxes[:, :2] + dets.boxes[:, 2:]) / 2
    expected = np.array([[95, 135], [390, 120]])
    dist = np.linalg.norm(centres[:, None] - expected[None], axis=2)
    assert dist.min(axis=0).max() < 15
    assert np.all(np.diff(dets.scores) <= 0) and dets.scores.min() >= 0.3
    assert dets.boxes.dtype == dets.kps.dtype == np.float32 and dets.kps.shape == (2, 5, 2)


def test_detector_rejects_bad_models_and_inputs(shared_data, tmp_path):
    with pytest.raises(ModelError, match="no such"):
        ScrfdDetector(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="junk.onnx"):
        ScrfdDetector(tmp_path / "junk.onnx")
    with pytest.raises(ModelError, match="mobilefacenet.onnx: not an SCRFD"):
        ScrfdDetector(shared_data / "models/mobilefacenet.onnx")
    with pytest.raises(ConfigError, match="det-size 300: .* multiple of 32"):
        ScrfdDetector(shared_data / DETECTOR, input_size=(300, 300))
    det = _our_detector(shared_data / DETECTOR)
    with pytest.raises(DataFormatError, match="HxWx3 uint8"):
        det.detect(np.zeros((50, 50), np.uint8))
    with pytest.raises(DataFormatError, match="HxWx3 uint8"):
        det.detect(np.zeros((50, 50, 3), np.float32))


# ---------------------------------------------------------------------------- policies

def test_policies_on_a_two_face_photo(shared_data, detector):
    (_, big), (_, small) = _gallery_crops(shared_data, 2, step=501)
    # a large face off to the left, a small one right in the centre of the 400x300 photo
    photo = _composite((400, 300), [(big, 0, 75, 150), (small, 150, 100, 100)])
    picked = {p: FaceAligner(detector, policy=p).align(photo) for p in ("central", "largest", "best", "all")}
    assert [len(v) for v in picked.values()] == [1, 1, 1, 2]
    central, largest = picked["central"][0], picked["largest"][0]
    assert _mad(central.crop, small) < 20 < _mad(central.crop, big)
    assert _mad(largest.crop, big) < 20 < _mad(largest.crop, small)
    assert picked["best"][0].score == max(f.score for f in picked["all"])
    assert [f.index for f in picked["all"]] == [0, 1] and picked["all"][0].score >= picked["all"][1].score
    assert {central.index, largest.index} == {0, 1}
    assert FaceAligner(detector).policy == "central"  # the rule that built the shared crops


def test_min_score_drops_weak_faces(detector, photos):
    scores = detector.detect(photos[5]).scores
    between = float(scores.mean())
    assert len(FaceAligner(detector, policy="all", min_score=between).align(photos[5])) == 1
    assert FaceAligner(detector, min_score=float(scores.max()) + 1e-3).align(photos[5]) == []


def test_blank_photo_gives_no_face(detector, photos):
    assert FaceAligner(detector, policy="all").align(photos[-1]) == []
    dets = detector.detect(photos[-1])
    assert len(dets) == 0 and dets.boxes.shape == (0, 4) and dets.kps.shape == (0, 5, 2)


def test_aligner_rejects_bad_options(detector):
    with pytest.raises(ConfigError, match="policy='biggest'"):
        FaceAligner(detector, policy="biggest")
    with pytest.raises(ConfigError, match="size=100"):
        FaceAligner(detector, size=100)


# ---------------------------------------------------------------------------- round trip

def test_realigning_an_aligned_crop_gives_it_back(shared_data, detector):
    """An aligned crop pasted at scale 1 must come back near where it was (a few pixels at most)."""
    aligner = FaceAligner(detector)
    crops = _gallery_crops(shared_data, 20, step=211)
    errors, mads = [], []
    for name, crop in crops:
        faces = aligner.align(_composite((250, 250), [(crop, 69, 69, 112)]))
        assert len(faces) == 1, name
        errors.append(_corner_error(estimate_similarity(faces[0].kps, ARCFACE_DST), 69, 69, 112))
        mads.append(_mad(faces[0].crop, crop))
    other = np.mean([_mad(a, b) for (_, a), (_, b) in zip(crops, crops[1:])])
    # measured: corner error median ~2.5 px, max ~7 px; MAD ~6 vs ~60 between different photos
    assert np.median(errors) < 4 and max(errors) < 10
    assert np.median(mads) < 10 and max(mads) < 25 < other


# ---------------------------------------------------------------------------- align_folder

def _write_image(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def test_align_folder_end_to_end(shared_data, detector, tmp_path):
    src, dst = tmp_path / "photos", tmp_path / "aligned"
    crops = _gallery_crops(shared_data, 6, step=331)
    truth = {}
    for k, (_, crop) in enumerate(crops):
        rel = f"person{k // 2}/photo{k % 2}" + (".png" if k == 5 else ".jpg")
        x, side = (20 + 30 * k, 112 + 20 * k)
        _write_image(src / rel, _composite((400, 300), [(crop, x, 20, side)]))
        truth[rel] = crop
    (src / "person0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    _write_image(src / "person1" / "blank.jpg", np.full((200, 200, 3), GREY, np.uint8))
    (src / "person2" / "notes.txt").write_text("not an image")
    (src / ".hidden").mkdir()
    _write_image(src / ".hidden" / "skip.jpg", np.full((10, 10, 3), 0, np.uint8))

    report = align_folder(src, dst, FaceAligner(detector), progress=False)

    assert report.counts == {"ok": 6, "multi_face_picked": 0, "no_face": 1, "unreadable": 1, "unusable": 0}
    status = {r.file: r.status for r in report.records}
    assert status["person0/broken.jpg"] == "unreadable" and status["person1/blank.jpg"] == "no_face"
    written = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.suffix in (".jpg", ".png"))
    assert written == sorted(truth)
    assert not list(dst.rglob("*.tmp"))
    for rel, crop in truth.items():
        out = cv2.imread(str(dst / rel))
        assert out.shape == (112, 112, 3)
        assert _mad(out, crop) < 25, rel

    rows = list(csv.DictReader((dst / "alignment_report.csv").open()))
    assert len(rows) == 8 and set(rows[0]) == {"file", "status", "faces", "score", "reason"}
    row = {r["file"]: r for r in rows}
    assert row["person1/blank.jpg"]["faces"] == "0" and row["person1/blank.jpg"]["score"] == ""
    assert 0.3 <= float(row["person0/photo0.jpg"]["score"]) <= 1
    doc = json.loads((dst / "alignment_report.json").read_text())
    assert doc["counts"] == report.counts and doc["policy"] == "central" and len(doc["files"]) == 8


def test_align_folder_flat_folder_all_faces_and_multi_face(shared_data, detector, tmp_path):
    src = tmp_path / "flat"
    (_, a), (_, b) = _gallery_crops(shared_data, 2, step=777)
    _write_image(src / "pair.jpg", _composite((400, 300), [(a, 0, 75, 150), (b, 150, 100, 100)]))

    report = align_folder(src, tmp_path / "all", FaceAligner(detector, policy="all"), progress=False)
    assert [(r.file, r.status, r.faces, r.outputs) for r in report.records] == \
        [("pair.jpg", "ok", 2, ["pair_face0.jpg", "pair_face1.jpg"])]
    assert all(cv2.imread(str(tmp_path / "all" / o)).shape == (112, 112, 3) for o in report.records[0].outputs)

    report = align_folder(src, tmp_path / "one", FaceAligner(detector, policy="largest"), progress=False)
    assert (report.records[0].status, report.records[0].outputs) == ("multi_face_picked", ["pair.jpg"])
    assert _mad(cv2.imread(str(tmp_path / "one" / "pair.jpg")), a) < 25


def test_align_folder_refuses_to_overwrite_its_source(detector, tmp_path):
    with pytest.raises(ConfigError, match="must differ"):
        align_folder(tmp_path, tmp_path, FaceAligner(detector), progress=False)
    with pytest.raises(DataFormatError, match="not a directory"):
        align_folder(tmp_path / "nope", tmp_path / "out", FaceAligner(detector), progress=False)


def test_report_round_trips_through_json(tmp_path):
    report = AlignReport("src", "dst", "best", 112)
    report.write(tmp_path)
    assert json.loads((tmp_path / "alignment_report.json").read_text())["counts"] == \
        {"ok": 0, "multi_face_picked": 0, "no_face": 0, "unreadable": 0, "unusable": 0}
    assert (tmp_path / "alignment_report.csv").read_text() == "file,status,faces,score,reason\n"


# ---------------------------------------------------------------------------- hostile photos and options

def test_odd_photos_get_their_report_line_and_the_rest_go_on(shared_data, detector, tmp_path, capsys):
    """2x3000, 5000x1 and a 69-byte PNG declaring 40000x40000 pixels once aborted the whole folder."""
    from tests.data.hostile import png_bomb
    src, dst = tmp_path / "photos", tmp_path / "aligned"
    (_, crop), = _gallery_crops(shared_data, 1, step=331)
    _write_image(src / "a" / "good.jpg", _composite((300, 300), [(crop, 50, 50, 150)]))
    _write_image(src / "a" / "thin.png", np.full((3000, 2, 3), GREY, np.uint8))
    _write_image(src / "a" / "wide.png", np.full((1, 5000, 3), GREY, np.uint8))
    (src / "a" / "bomb.png").write_bytes(png_bomb())
    code = main(["align", str(src), str(dst), "--detector", str(shared_data / DETECTOR)])
    out = capsys.readouterr()
    assert code == 0, out.err
    rows = {r["file"]: r for r in csv.DictReader((dst / "alignment_report.csv").open())}
    assert {f: r["status"] for f, r in rows.items()} == {
        "a/bomb.png": "unreadable", "a/good.jpg": "ok", "a/thin.png": "unusable", "a/wide.png": "unusable"}
    assert rows["a/bomb.png"]["reason"] == ("image declares 40000x40000 pixels, over the limit of 100,000,000; "
                                            "refused before decoding")
    assert rows["a/thin.png"]["reason"] == "2x3000 is too elongated to detect at 320x320"
    assert rows["a/wide.png"]["reason"] == "5000x1 is too elongated to detect at 320x320"
    assert (dst / "a" / "good.jpg").is_file() and not (dst / "a" / "thin.png").exists()
    assert "unusable 2" in out.out and "unreadable 1" in out.out


@pytest.mark.parametrize("value", ["0", "33", "-32"])
def test_det_size_errors_name_the_option(shared_data, tmp_path, capsys, value):
    from tests.data.hostile import cli_error
    (tmp_path / "src").mkdir()
    line = cli_error(capsys, "align", tmp_path / "src", tmp_path / "dst", "--detector", shared_data / DETECTOR,
                     "--det-size", value)
    assert line.startswith(f"facebce: error: det-size {value}: the detector input must be a positive multiple of 32")
    with pytest.raises(ConfigError, match=f"det-size {value}:"):  # the API says the same, not only the CLI
        ScrfdDetector(shared_data / DETECTOR, input_size=(int(value), int(value)))


def test_align_into_a_regular_file_is_one_line(shared_data, tmp_path, capsys):
    from tests.data.hostile import cli_error
    (tmp_path / "src").mkdir()
    (tmp_path / "out").write_text("keep")
    line = cli_error(capsys, "align", tmp_path / "src", tmp_path / "out", "--detector", shared_data / DETECTOR)
    assert line.endswith(f"{tmp_path / 'out'}: exists and is not a folder (the output folder for aligned crops)")
    assert (tmp_path / "out").read_text() == "keep"
