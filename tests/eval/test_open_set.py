"""Open-set folder sets: the gallery/probe split is right and deterministic, every number is
open_set_identification / operating_point on the same similarity matrix, the global threshold is
fitted on pairs sets only, and cached embeddings re-score (any split) without the model."""
from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest

from facebce.data.image_folder import scan_image_folder
from facebce.data.synthetic import SyntheticFaces, make_pairs
from facebce.data.verification_bin import save_bin
from facebce.errors import ConfigError, DataFormatError
from facebce.eval.identification import open_set_identification, operating_point
from facebce.eval.open_set import split_gallery_probe
from facebce.eval.runner import evaluate
from tests.eval.fakes import ProjectionEmbedder

LABELS = np.repeat(np.arange(12), 5)  # the labelled_folder fixture: 12 identities x 5 images


def test_split_counts_and_determinism():
    s = split_gallery_probe(LABELS)  # defaults: enrol 1, unknown_fraction 0.3, seed 0
    np.testing.assert_array_equal(s.unknown, [2, 4, 7, 9])  # round(0.3 x 12) = 4 of them, from default_rng(0)
    known = np.setdiff1d(np.arange(12), s.unknown)
    np.testing.assert_array_equal(s.gallery, 5 * known)  # each known identity's first image
    np.testing.assert_array_equal(s.probes, np.setdiff1d(np.arange(60), s.gallery))
    mated = np.isin(LABELS[s.probes], known)
    assert (s.gallery.size, mated.sum(), (~mated).sum()) == (8, 32, 20)
    again = split_gallery_probe(LABELS, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((s.gallery, s.probes, s.unknown),
                                                   (again.gallery, again.probes, again.unknown)))
    other = split_gallery_probe(LABELS, seed=1, enrol_per_identity=2)
    np.testing.assert_array_equal(other.unknown, [4, 7, 8, 11])
    assert other.gallery.size == 16 and np.isin(LABELS[other.probes], other.unknown).sum() == 20
    closed = split_gallery_probe(LABELS, unknown_fraction=0, enrol_per_identity=9)  # enrols all of a short identity
    assert closed.unknown.size == 0 and closed.gallery.size == 60 and closed.probes.size == 0


def test_split_follows_index_order_not_label_order():
    labels = np.array([3, 1, 3, 1, 1, 3, 2])
    s = split_gallery_probe(labels, unknown_fraction=0, enrol_per_identity=2)
    np.testing.assert_array_equal(s.gallery, [0, 1, 2, 3, 6])
    np.testing.assert_array_equal(s.probes, [4, 5])


@pytest.mark.parametrize("kwargs,needle", [
    ({"unknown_fraction": 0.97}, "leaves none of the 12 identities"),
    ({"unknown_fraction": 1.0}, "expected a number in"),
    ({"enrol_per_identity": 0}, "enrol_per_identity=0"),
])
def test_split_rejects_bad_settings(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        split_gallery_probe(LABELS, **kwargs)


@pytest.fixture(scope="module")
def pairs_set(tmp_path_factory):
    """A pairs .bin and its protocol, so that fit:union has something to fit on."""
    root = tmp_path_factory.mktemp("pairs")
    images, issame = make_pairs(SyntheticFaces(10, 4, seed=1, first_identity=500, difficulty=0.3), 40, seed=1)
    save_bin(root / "synth_a.bin", images, issame)
    (root / "protocols").mkdir()
    (root / "protocols" / "synth_a.yaml").write_text("name: synth_a\nkind: pairs_bin\nfile: synth_a.bin\n")
    return root


def _direct(folder, embedder, **split):
    """(similarity, probe ids, gallery ids, split) computed without the runner."""
    _, paths, labels = scan_image_folder(folder)
    bgr = np.stack([cv2.imread(str(p)) for p in paths])
    e = embedder.embed(bgr) + embedder.embed(np.ascontiguousarray(bgr[:, :, ::-1]))
    e = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float64)
    s = split_gallery_probe(labels, **split)
    return e[s.probes] @ e[s.gallery].T, labels[s.probes], labels[s.gallery], s


def _assert_same(a, b):
    """Two OpenSetSetResults with identical numbers."""
    assert a.identification.cmc == b.identification.cmc and a.at_global == b.at_global
    for field in ("fpir_targets", "thresholds", "tpir", "fpir"):
        np.testing.assert_array_equal(getattr(a.identification, field), getattr(b.identification, field))
    np.testing.assert_array_equal(a.probes.non_mated_max, b.probes.non_mated_max)


def test_every_number_is_the_identification_functions(labelled_folder, pairs_set):
    report = evaluate(ProjectionEmbedder(), [("synth_a", pairs_set / "synth_a.bin"),
                                             ("open_set_folder", labelled_folder)],
                      protocol_paths=[pairs_set / "protocols"], progress=False)
    alone = evaluate(ProjectionEmbedder(), [("synth_a", pairs_set / "synth_a.bin")],
                     protocol_paths=[pairs_set / "protocols"], progress=False)
    assert report.threshold == alone.threshold and report.threshold.fitted_on == ("synth_a",)  # pairs only
    sim, probe_ids, gallery_ids, split = _direct(labelled_folder, ProjectionEmbedder())
    (o,) = report.open_set
    r = o.identification
    expected = open_set_identification(sim, probe_ids, gallery_ids, [1e-3, 1e-2, 1e-1], [1, 5])
    assert r.cmc == expected.cmc and (r.n_mated, r.n_non_mated) == (32, 20)
    for field in ("fpir_targets", "thresholds", "tpir", "fpir"):
        np.testing.assert_array_equal(getattr(r, field), getattr(expected, field))
    assert o.at_global == operating_point(sim, probe_ids, gallery_ids, report.threshold.value)
    assert (o.n_images, o.n_identities, o.n_enrolled_identities, o.n_gallery_images) == (60, 12, 8, 8)
    assert (o.n_mated, o.n_non_mated, o.embedding_size) == (32, 20, 32)
    assert o.unknown_identities == ("id_0002", "id_0004", "id_0007", "id_0009")
    assert (o.enrol_per_identity, o.unknown_fraction, o.seed) == (1, 0.3, 0)
    # numbers that mean something: identities are mostly told apart, and DIR never beats rank-1
    assert r.cmc[1] > 0.5 and r.cmc[5] >= r.cmc[1] and np.all(r.tpir <= r.cmc[1])
    assert o.at_global.tpir <= r.cmc[1] and 0 < o.at_global.fpir <= 1
    # the curve for the plot is the same function at every resolvable threshold
    assert o.curve.thresholds[0] == r.thresholds[0] and np.all(np.diff(o.curve.thresholds) <= 0)
    assert o.curve.fpir.size == 20 and np.all(np.diff(o.curve.fpir) >= 0)
    # embeddings given directly (one row per image, folder order) give the same numbers
    given = evaluate({"open_set_folder": _embeddings(labelled_folder)}, [("open_set_folder", labelled_folder)],
                     threshold=f"fixed:{report.threshold.value!r}", progress=False)
    _assert_same(given.open_set[0], o)


def _embeddings(folder):
    _, paths, _ = scan_image_folder(folder)
    bgr = np.stack([cv2.imread(str(p)) for p in paths])
    e = ProjectionEmbedder()
    return e.embed(bgr) + e.embed(np.ascontiguousarray(bgr[:, :, ::-1]))


def test_protocol_settings_change_the_split(labelled_folder, tmp_path):
    (tmp_path / "open_set_folder.yaml").write_text(
        "name: open_set_folder\nkind: open_set_folder\nenrol_per_identity: 2\nunknown_fraction: 0.25\nseed: 7\n"
        "fpir_targets: [5e-2, 0.2]\nranks: [3, 1]\n")
    report = evaluate(ProjectionEmbedder(), [("open_set_folder", labelled_folder)], threshold="fixed:0.8",
                      protocol_paths=[tmp_path], progress=False)
    o = report.open_set[0]
    sim, probe_ids, gallery_ids, split = _direct(labelled_folder, ProjectionEmbedder(), enrol_per_identity=2,
                                                 unknown_fraction=0.25, seed=7)
    assert (o.n_gallery_images, o.n_mated, o.n_non_mated) == (18, 27, 15)  # 9 known x 2; 9 x 3; 3 x 5
    assert list(o.identification.cmc) == [1, 3]
    expected = open_set_identification(sim, probe_ids, gallery_ids, [0.05, 0.2], [1, 3])
    np.testing.assert_array_equal(o.identification.tpir, expected.tpir)
    assert o.at_global == operating_point(sim, probe_ids, gallery_ids, 0.8)


def test_global_threshold_is_never_fitted_on_open_set(labelled_folder, pairs_set):
    only = [("open_set_folder", labelled_folder)]
    for spec in ("fit:union", "fit:open_set_folder"):
        with pytest.raises(ConfigError, match=r"needs a pairs set to fit on .*use fixed:<t> or bias"):
            evaluate(ProjectionEmbedder(), only, threshold=spec, progress=False)
    with pytest.raises(ConfigError, match="no pairs set 'open_set_folder'"):
        evaluate(ProjectionEmbedder(), [("synth_a", pairs_set / "synth_a.bin"), *only],
                 threshold="fit:open_set_folder", protocol_paths=[pairs_set / "protocols"], progress=False)
    r = evaluate(ProjectionEmbedder(), only, threshold="bias", bias=0.7, progress=False)
    assert r.threshold.value == 0.7 and r.open_set[0].at_global.threshold == 0.7 and not r.sets


def test_cached_rescoring_needs_no_model(labelled_folder, tmp_path):
    only = [("open_set_folder", labelled_folder)]
    spy = ProjectionEmbedder()
    first = evaluate(spy, only, threshold="fixed:0.8", cache_dir=tmp_path / "c", model_name="proj", progress=False)
    assert spy.calls > 0
    (cached,) = (tmp_path / "c" / "proj").iterdir()
    assert cached.name.startswith("open_set_folder-") and cached.name.endswith("-flip.npy")
    again = evaluate(None, only, threshold="fixed:0.8", cache_dir=tmp_path / "c", model_name="proj", progress=False)
    _assert_same(again.open_set[0], first.open_set[0])
    # another split of the same images re-scores from the same cache, as if embedded afresh
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "open_set_folder.yaml").write_text("name: open_set_folder\nkind: open_set_folder\nseed: 5\n")
    kwargs = dict(threshold="fixed:0.8", protocol_paths=[tmp_path / "p"], progress=False)
    resplit = evaluate(None, only, cache_dir=tmp_path / "c", model_name="proj", **kwargs)
    _assert_same(resplit.open_set[0], evaluate(ProjectionEmbedder(), only, **kwargs).open_set[0])
    assert resplit.open_set[0].unknown_identities != first.open_set[0].unknown_identities
    # a changed image changes the key: no stale embeddings
    changed = shutil.copytree(labelled_folder, tmp_path / "changed")
    shutil.copy(changed / "id_0000" / "0001.jpg", changed / "id_0000" / "0000.jpg")
    with pytest.raises(ConfigError, match="no cached embeddings"):
        evaluate(None, [("open_set_folder", changed)], threshold="fixed:0.8", cache_dir=tmp_path / "c",
                 model_name="proj", progress=False)


def test_bad_folders_give_one_line_errors(labelled_folder, tmp_path):
    with pytest.raises(DataFormatError, match="no such open_set_folder folder"):
        evaluate(ProjectionEmbedder(), [("open_set_folder", tmp_path / "none")], threshold="fixed:0.5")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "small.yaml").write_text("name: small\nkind: open_set_folder\nimage_size: 64\n")
    with pytest.raises(DataFormatError, match=r"small: image .*0000.jpg is 112x112, expected an aligned 64x64"):
        evaluate(ProjectionEmbedder(), [("small", labelled_folder)], threshold="fixed:0.5",
                 protocol_paths=[tmp_path / "p"], progress=False)
    (tmp_path / "p" / "small.yaml").write_text("name: small\nkind: open_set_folder\nunknown_fraction: 0.99\n")
    with pytest.raises(ConfigError, match=r"small \(.*small.yaml\) on .*faces: unknown_fraction=0.99 leaves none"):
        evaluate(ProjectionEmbedder(), [("small", labelled_folder)], threshold="fixed:0.5",
                 protocol_paths=[tmp_path / "p"])
    with pytest.raises(DataFormatError, match=r"open_set_folder: embeddings of shape \(3, 8\), expected 60 x D"):
        evaluate({"open_set_folder": np.ones((3, 8))}, [("open_set_folder", labelled_folder)],
                 threshold="fixed:0.5", progress=False)
