"""IJB-B/C pipeline on a synthetic IJB folder in the exact file format, against eval_ijbc.py's own code."""
from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest

from facebce.errors import ConfigError, DataFormatError
from facebce.eval.identification import open_set_identification
from facebce.eval.ijb import (embed_ijb, evaluate_ijb, image_features, load_ijb, pair_scores,
                              template_features)
from facebce.eval.protocols import get_protocol
from facebce.eval.roc import Roc
from tests.eval import reference_eval_ijbc as ref
from tests.eval.fakes import ProjectionEmbedder
from tests.eval.ijb_synthetic import align_for_tests


@pytest.fixture(scope="module")
def ijb_root(synthetic_ijb):
    return synthetic_ijb


@pytest.fixture(scope="module")
def meta(ijb_root):
    return load_ijb(ijb_root, "ijbc", check_sizes=False)


@pytest.fixture(scope="module")
def raw(meta):
    return embed_ijb(meta, ProjectionEmbedder(), align_for_tests, progress=False)


def test_reads_the_synthetic_folder(meta, ijb_root):
    assert 250 <= meta.templates.size <= 450  # ~300 images
    assert np.unique(meta.templates).size == 120  # 40 subjects x 3 templates
    assert meta.landmarks.shape == (meta.templates.size, 5, 2) and meta.face_scores.min() >= 0.3
    assert set(meta.galleries) == {"G1", "G2"}
    assert sum(len(t) for t, _ in meta.galleries.values()) == 40 and len(meta.probes[0]) == 80
    # the root may be the set's folder or its parent
    assert load_ijb(ijb_root.parent, "ijbc", check_sizes=False).templates.size == meta.templates.size
    with pytest.warns(UserWarning, match="sizes differ from the published ones"):
        load_ijb(ijb_root, "ijbc")


def test_alignment_recovers_the_face(meta, raw):
    crop = align_for_tests(cv2.imread(str(meta.image_dir / meta.image_names[0])), meta.landmarks[0])
    assert crop.shape == (112, 112, 3)
    assert raw.shape == (meta.templates.size, 2, 32) and raw.dtype == np.float32
    assert not np.allclose(raw[:, 0], raw[:, 1])  # the mirrored view is a different input


def test_template_features_bit_identical_to_eval_ijbc(meta, raw):
    feats = image_features(raw, meta.face_scores)
    expected = ref.step3_image_features(raw.reshape(len(raw), -1), meta.face_scores)
    np.testing.assert_array_equal(feats, expected)
    tids, tfeats = template_features(feats, meta.templates, meta.medias)
    ref_feats, ref_tids = ref.image2template_feature(expected, meta.templates, meta.medias)
    np.testing.assert_array_equal(tids, ref_tids)
    np.testing.assert_array_equal(tfeats, ref_feats)


@pytest.mark.parametrize("precision, atol", [("float64", 1e-12), ("float32", 1e-6)])
def test_tar_at_far_identical_to_eval_ijbc(meta, raw, precision, atol):
    result = evaluate_ijb(meta, raw, precision=precision, progress=False)
    feats = ref.step3_image_features(raw.reshape(len(raw), -1), meta.face_scores)
    ref_feats, ref_tids = ref.image2template_feature(feats, meta.templates, meta.medias)
    score = ref.verification(ref_feats, ref_tids, meta.pairs[:, 0], meta.pairs[:, 1])
    assert result.scores.dtype == np.dtype(precision)
    np.testing.assert_allclose(result.scores, score, rtol=0, atol=atol)
    np.testing.assert_array_equal(result.tar_at_far_parity.tar, ref.tpr_at_fpr_table(meta.labels.astype(int), score))
    assert result.tar_at_far.mode == "conservative" and result.tar_at_far_parity.mode == "insightface"
    assert (result.n_templates, result.n_pairs) == (120, len(meta.pairs))


def test_parity_on_larger_random_features():
    """Random features, many templates and pairs, the reference's 100k-pair chunks: same table to the bit."""
    rng = np.random.default_rng(3)
    n, n_templates, dim = 6000, 900, 64
    templates = rng.integers(0, n_templates, n) * 7 + 3
    medias = rng.integers(0, 4000, n)
    raw = rng.normal(size=(n, 2, dim)).astype(np.float32)
    raw += np.repeat(rng.normal(size=(n_templates, 1, dim)).astype(np.float32), 1, 0)[(templates - 3) // 7] * 0.3
    scores = rng.uniform(0.2, 1, n).astype(np.float32)
    tids_all = np.unique(templates)
    pairs = rng.choice(tids_all, (150_000, 2))
    subject = (tids_all // 7) % 40  # templates of one "subject" are genuine pairs
    labels = subject[np.searchsorted(tids_all, pairs[:, 0])] == subject[np.searchsorted(tids_all, pairs[:, 1])]
    tids, tfeats = template_features(image_features(raw, scores), templates, medias)
    feats = ref.step3_image_features(raw.reshape(n, -1), scores)
    ref_feats, ref_tids = ref.image2template_feature(feats, templates, medias)
    np.testing.assert_array_equal(tfeats, ref_feats)
    theirs = ref.verification(ref_feats, ref_tids, pairs[:, 0], pairs[:, 1])
    table_ref = ref.tpr_at_fpr_table(labels.astype(int), theirs)
    for precision, atol in (("float64", 1e-12), ("float32", 1e-6)):
        whole = pair_scores(tids, tfeats, pairs, precision=precision, progress=False)  # one block: unblocked
        # a Gram block of 128 rows (the memory bound cuts 900 templates into 8 blocks)
        blocked = pair_scores(tids, tfeats, pairs, precision=precision, max_bytes=128 * 900 * 8, progress=False)
        np.testing.assert_allclose(whole, theirs, rtol=0, atol=atol)
        np.testing.assert_allclose(blocked, whole, rtol=0, atol=atol)  # BLAS rounds row blocks alike to 1 ulp
        for ours in (whole, blocked):
            table = Roc.from_labels(ours, labels).tar_at_far(mode="insightface").tar
            np.testing.assert_array_equal(table, table_ref)


def test_pair_scores_blocks_and_reverse_pairs():
    """Any block size gives the unblocked scores; a pair and its reverse score the same."""
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(300, 16))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    tids = np.arange(300) * 2 + 5
    pairs = rng.choice(tids, (5000, 2))
    direct = np.sum(feats[(pairs[:, 0] - 5) // 2] * feats[(pairs[:, 1] - 5) // 2], axis=1)
    whole = pair_scores(tids, feats, pairs, precision="float64", progress=False)
    np.testing.assert_allclose(whole, direct, rtol=0, atol=1e-13)
    for block in (1, 7, 64, 299, 300, 1000):
        np.testing.assert_allclose(pair_scores(tids, feats, pairs, precision="float64", block=block, progress=False),
                                   whole, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(pair_scores(tids, feats, pairs[:, ::-1], progress=False),
                                  pair_scores(tids, feats, pairs, progress=False))
    with pytest.raises(ConfigError, match="precision"):
        pair_scores(tids, feats, pairs, precision="float16", progress=False)


def test_pair_scores_of_enrolment_x_verification_pairs_read_only_that_rectangle(monkeypatch):
    """IJB-C's layout: first column from 40 enrolment templates, second from 260 others. Only the
    40 x 260 rectangle is multiplied (not the 300-template triangle), in any block size, and the
    scores are the direct dots; sparse ids far above the count take the binary-search lookup."""
    import facebce.eval.ijb as ijb

    rng = np.random.default_rng(6)
    feats = rng.normal(size=(300, 16))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    calls = []
    real = ijb._gram_gather
    monkeypatch.setattr(ijb, "_gram_gather", lambda left, right, *a, **k: calls.append(
        (len(left), len(right), k.get("triangle", False))) or real(left, right, *a, **k))
    for tids in (np.arange(300) * 2 + 5, np.arange(300) * 10 ** 9 + 7):
        order = rng.permutation(300)
        enrol, verif = order[:40], order[40:]
        pairs = np.stack([tids[rng.choice(enrol, 4000)], tids[rng.choice(verif, 4000)]], 1)
        direct = np.sum(feats[np.searchsorted(tids, pairs[:, 0])] * feats[np.searchsorted(tids, pairs[:, 1])], axis=1)
        for block in (None, 1, 7, 39, 40):
            calls.clear()
            got = pair_scores(tids, feats, pairs, precision="float64", block=block, progress=False)
            np.testing.assert_allclose(got, direct, rtol=0, atol=1e-13)
            assert calls == [(40, 260, False)]
        with pytest.raises(DataFormatError, match="no features"):
            pair_scores(tids, feats, np.array([[tids[0], tids[-1] + 2]]), progress=False)


def test_flip_and_norm_options(raw, meta):
    concat = image_features(raw, meta.face_scores, flip="concat", face_score_weight=False)
    assert concat.shape[1] == 64 and np.array_equal(concat[:, :32], raw[:, 0])
    none = image_features(raw, None, flip="none", image_l2norm=True, face_score_weight=False)
    np.testing.assert_allclose(np.linalg.norm(none, axis=1), 1, rtol=1e-6)
    with pytest.raises(ConfigError, match="mirrored view"):
        image_features(raw[:, :1], meta.face_scores, flip="sum")
    with pytest.raises(ConfigError, match="flip='x'"):
        image_features(raw, meta.face_scores, flip="x")


def test_identification_matches_direct_metric_call(meta, raw):
    result = evaluate_ijb(meta, raw, threshold=0.3, progress=False)
    tids, tfeats = template_features(image_features(raw, meta.face_scores), meta.templates, meta.medias)
    probe = tfeats[np.searchsorted(tids, meta.probes[0])]
    g_tids, g_sids = meta.galleries["G1"]
    direct = open_set_identification(probe @ tfeats[np.searchsorted(tids, g_tids)].T, meta.probes[1], g_sids)
    got = result.identification.galleries["G1"]
    assert (got.n_mated, got.n_non_mated) == (direct.n_mated, direct.n_non_mated) == (40, 40)
    np.testing.assert_array_equal(got.tpir, direct.tpir)
    assert got.cmc == direct.cmc
    assert set(result.identification.at_threshold) == {"G1", "G2"}
    assert result.at_threshold.threshold == 0.3


def _copy(ijb_root, tmp_path):
    dst = tmp_path / "IJBC"
    shutil.copytree(ijb_root, dst)
    return dst


def test_missing_meta_file_is_one_line_error(ijb_root, tmp_path):
    root = _copy(ijb_root, tmp_path)
    (root / "meta" / "ijbc_name_5pts_score.txt").unlink()
    with pytest.raises(DataFormatError) as err:
        load_ijb(root, "ijbc", check_sizes=False)
    assert "ijbc_name_5pts_score.txt: IJB meta file is missing" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataFormatError, match="no meta/ folder"):
        load_ijb(tmp_path / "nowhere", "ijbc")


def test_name_mismatch_is_one_line_error(ijb_root, tmp_path):
    root = _copy(ijb_root, tmp_path)
    path = root / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    lines[3], lines[4] = lines[4], lines[3]  # same rows, swapped order: a join by order would be wrong
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as err:
        load_ijb(root, "ijbc", check_sizes=False)
    message = str(err.value)
    assert "row 4 names" in message and "joined by order" in message and "\n" not in message


def test_bad_pair_file_and_unknown_template(ijb_root, tmp_path):
    root = _copy(ijb_root, tmp_path)
    path = root / "meta" / "ijbc_template_pair_label.txt"
    good = path.read_text()
    path.write_text(good + "1 2\n")
    with pytest.raises(DataFormatError, match=r"line \d+ has 2 fields, expected 3"):
        load_ijb(root, "ijbc", check_sizes=False)
    path.write_text(good + "1 999999 0\n")
    with pytest.raises(DataFormatError, match="template 999999 has no image"):
        load_ijb(root, "ijbc", check_sizes=False)
    path.write_text(good + "1 2 7\n")
    with pytest.raises(DataFormatError, match="label 7, expected 0 or 1"):
        load_ijb(root, "ijbc", check_sizes=False)


def test_ijb_protocols_load():
    for name in ("ijbb", "ijbc"):
        p = get_protocol(name)
        assert p.kind == "ijb" and len(p["files"]["galleries"]) == 2
        assert p["far_targets"] == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
        assert p["template"] == {"flip": "sum", "image_l2norm": False, "face_score_weight": True}


@pytest.mark.filterwarnings("ignore:.*sizes differ from the published ones")
def test_runner_caches_ijb_features(ijb_root, tmp_path):
    from facebce.eval.runner import evaluate

    spy = ProjectionEmbedder()
    first = evaluate(spy, [("ijbc", ijb_root)], threshold="fixed:0.3", align=align_for_tests, cache_dir=tmp_path,
                     model_name="proj", progress=False)
    assert spy.calls > 0 and len(list((tmp_path / "proj").glob("ijbc-*-views2.npy"))) == 1
    again = evaluate(None, [("ijbc", ijb_root)], threshold="fixed:0.3", cache_dir=tmp_path, model_name="proj",
                     progress=False)
    np.testing.assert_array_equal(first.ijb[0].scores, again.ijb[0].scores)
    assert first.ijb[0].at_threshold == again.ijb[0].at_threshold
    # without `align` the runner aligns with insightface's norm_crop itself (the CLI passes nothing)
    from facebce.data.align import norm_crop
    default = evaluate(ProjectionEmbedder(), [("ijbc", ijb_root)], threshold="fixed:0.3", progress=False)
    explicit = evaluate(ProjectionEmbedder(), [("ijbc", ijb_root)], threshold="fixed:0.3", align=norm_crop,
                        progress=False)
    np.testing.assert_array_equal(default.ijb[0].scores, explicit.ijb[0].scores)
    with pytest.raises(ConfigError, match="needs a pairs set to fit on"):
        evaluate(ProjectionEmbedder(), [("ijbc", ijb_root)], progress=False)


@pytest.mark.filterwarnings("ignore:.*sizes differ from the published ones")
def test_only_the_three_1to1_files_run_1to1_and_skip_1toN_with_a_note(ijb_root, tmp_path, capsys):
    """eval_ijbc.py needs only *_face_tid_mid.txt, *_name_5pts_score.txt and *_template_pair_label.txt.
    Today: 'ijbc_1N_gallery_G1.csv: IJB meta file is missing' and nothing runs."""
    from facebce.cli import main
    from facebce.eval.runner import evaluate

    root = _copy(ijb_root, tmp_path)
    for f in (root / "meta").glob("*1N*"):
        f.unlink()
    with pytest.warns(UserWarning, match=r"1:N identification skipped \(no ijbc_1N_gallery_G1.csv, "):
        meta = load_ijb(root, "ijbc", check_sizes=False)
    assert meta.galleries == {} and meta.probes is None and len(meta.pairs) > 0
    with pytest.warns(UserWarning, match="1:N identification skipped"):
        report = evaluate(ProjectionEmbedder(), [("ijbc", root)], threshold="fixed:0.3", align=align_for_tests,
                          progress=False)
    full = load_ijb(ijb_root, "ijbc", check_sizes=False)
    result = report.ijb[0]
    assert result.identification is None and len(result.scores) == len(full.pairs)
    # the CLI prints the note as one line and runs 1:1 (no model here: re-scoring from a missing cache fails
    # after the note, naming the set; the note is what this checks)
    main(["eval", "-", f"ijbc={root}", "--threshold", "fixed:0.3", "--cache", str(tmp_path / "c"),
          "--model-name", "m"])
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "1:N" in ln]
    assert notes == [f"facebce: note: {root / 'meta'}: ijbc 1:N identification skipped (no ijbc_1N_gallery_G1.csv, "
                     "ijbc_1N_gallery_G2.csv, ijbc_1N_probe_mixed.csv); 1:1 verification runs"]
