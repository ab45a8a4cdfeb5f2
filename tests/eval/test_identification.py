import numpy as np
import pytest

from facebce.errors import DataFormatError
from facebce.eval.identification import (
    FPIR_TARGETS, IJB_EVALS_FPIR_GRID, ijb_evals_mean, open_set_identification, operating_point,
)

GALLERY = np.array([10, 20, 30])
PROBES = np.array([10, 20, 30, 40, 50, 60, 10])
SIM = np.array([
    [.9, .5, .2],  # mated, rank 1, mate .9
    [.6, .4, .1],  # mated, rank 2 (0.6 beats the mate 0.4)
    [.3, .35, .3],  # mated, mate .3 ties a non-mate .3: rank 3 (a tie counts against it)
    [.7, .2, .1],  # non-mated, max .7
    [.1, .3, .2],  # non-mated, max .3
    [.5, .45, 0],  # non-mated, max .5
    [.8, .1, .3],  # mated, rank 1, mate .8
])


def test_hand_computed_open_set():
    r = open_set_identification(SIM, PROBES, GALLERY, fpir_targets=[0.1, 0.5, 0.7, 1.0], ranks=(1, 2, 5))
    assert (r.n_mated, r.n_non_mated) == (4, 3)
    assert r.cmc == {1: 0.5, 2: 0.75, 5: 1.0}
    # non-mated maxima sorted descending (.7, .5, .3), index max(int(3 f) - 1, 0) = 0, 0, 1, 2
    np.testing.assert_array_equal(r.thresholds, [.7, .7, .5, .3])
    np.testing.assert_array_equal(r.tpir, [.5, .5, .5, .5])  # only the rank-1 probes (.9, .8) count, both > .7
    np.testing.assert_allclose(r.fpir, [0, 0, 1 / 3, 2 / 3])  # strict >: the max equal to the threshold is no alarm


def test_operating_point_at_a_global_threshold():
    p = operating_point(SIM, PROBES, GALLERY, 0.85)
    assert (p.tpir, p.fpir) == (0.25, 0.0)
    p = operating_point(SIM, PROBES, GALLERY, 0.2)
    assert (p.tpir, p.fpir) == (0.5, 1.0)


def test_several_entries_per_subject_use_the_best_mate():
    gallery = np.array([10, 20, 10])
    sim = np.array([[.2, .5, .9], [.2, .5, .4]])  # probe 0: best mate .9 rank 1; probe 1: best mate .4 < .5 rank 2
    r = open_set_identification(sim, [10, 10], gallery, fpir_targets=[0.1])
    assert r.cmc[1] == 0.5 and r.cmc[5] == 1.0 and r.n_non_mated == 0
    assert np.isnan(r.thresholds[0])


def _ijb_evals_1n(query_feats, gallery_feats, query_ids, reg_ids, fars):
    """ijb_evals.py evaluation_1N (insightface recognition/_evaluation_/ijb, MIT), transcribed."""
    similarity = np.dot(query_feats, gallery_feats.T)
    top_1_count, top_5_count, top_10_count = 0, 0, 0
    pos_sims, neg_sims, non_gallery_sims = [], [], []
    for index, query_id in enumerate(query_ids):
        if query_id in reg_ids:
            gallery_label = np.argwhere(reg_ids == query_id)[0, 0]
            index_sorted = np.argsort(similarity[index])[::-1]
            top_1_count += gallery_label in index_sorted[:1]
            top_5_count += gallery_label in index_sorted[:5]
            top_10_count += gallery_label in index_sorted[:10]
            pos_sims.append(similarity[index][reg_ids == query_id][0])
            neg_sims.append(similarity[index][reg_ids != query_id])
        else:
            non_gallery_sims.append(similarity[index])
    pos_sims, neg_sims, non_gallery_sims = np.array(pos_sims), np.array(neg_sims), np.array(non_gallery_sims)
    correct_pos_cond = pos_sims > neg_sims.max(1)
    non_gallery_sims_sorted = np.sort(non_gallery_sims.max(1))[::-1]
    threshes, recalls = [], []
    for far in fars:
        thresh = non_gallery_sims_sorted[max(int((non_gallery_sims_sorted.shape[0]) * far) - 1, 0)]
        recall = np.logical_and(correct_pos_cond, pos_sims > thresh).sum() / pos_sims.shape[0]
        threshes.append(thresh)
        recalls.append(recall)
    return top_1_count, top_5_count, top_10_count, threshes, recalls, similarity


def test_identical_to_ijb_evals_on_two_galleries():
    rng = np.random.default_rng(0)
    dim, n_subjects = 8, 60
    centres = rng.normal(size=(n_subjects, dim))
    probe_ids = rng.integers(0, n_subjects, 700)
    probes = centres[probe_ids] + rng.normal(scale=0.9, size=(700, dim))
    results = []
    expected_counts = np.zeros(3)
    expected_recalls = []
    for g_ids in (np.arange(0, 30), np.arange(30, 55)):  # subjects 55..59 are in neither gallery
        gallery = centres[g_ids] + rng.normal(scale=0.5, size=(g_ids.size, dim))
        t1, t5, t10, threshes, recalls, sim = _ijb_evals_1n(probes, gallery, probe_ids, g_ids, IJB_EVALS_FPIR_GRID)
        r = open_set_identification(sim, probe_ids, g_ids, fpir_targets=IJB_EVALS_FPIR_GRID)
        np.testing.assert_array_equal(r.thresholds, threshes)
        np.testing.assert_array_equal(r.tpir, recalls)
        assert [round(r.cmc[k] * r.n_mated) for k in (1, 5, 10)] == [t1, t5, t10]
        results.append(r)
        expected_counts += (t1, t5, t10)
        expected_recalls.append(recalls)
    cmc, tpir = ijb_evals_mean(results)
    np.testing.assert_allclose([cmc[1], cmc[5], cmc[10]], expected_counts / 700, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(tpir, (np.array(expected_recalls[0]) + np.array(expected_recalls[1])) / 2)
    assert 0.1 < cmc[1] < 0.9  # a case where the numbers mean something


def test_default_targets_are_ijb_evals_shown_points():
    assert len(IJB_EVALS_FPIR_GRID) == 101 and IJB_EVALS_FPIR_GRID[-1] == 1
    np.testing.assert_allclose(FPIR_TARGETS, [1e-4, 1e-3, 1e-2, 1e-1], rtol=1e-13)


def test_bad_input_is_named():
    with pytest.raises(DataFormatError, match="shape \\(7, 3\\) does not match 6 probe ids x 3 gallery ids"):
        open_set_identification(SIM, PROBES[:6], GALLERY)
    bad = SIM.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataFormatError, match="1 scores are NaN"):
        operating_point(bad, PROBES, GALLERY, 0.5)
