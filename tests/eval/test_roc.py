import numpy as np
import pytest
from sklearn.metrics import roc_curve

from facebce.errors import DataFormatError
from facebce.eval.roc import FAR_TARGETS, Roc, tar_at_far
from tests.eval.reference_eval_ijbc import tpr_at_fpr_table

G = [.9, .8, .7, .4]
IMP = [.85, .6, .5, .3, .2, .1, .05, 0, -.1, -.2]


def test_metrics_md_worked_example():
    r = Roc(G, IMP)
    fpr, tpr, thr = r.curve()
    np.testing.assert_allclose(fpr, [0, 0, .1, .1, .3, .3, 1])
    np.testing.assert_allclose(tpr, [0, .25, .25, .75, .75, 1, 1])
    expected = {"insightface": (.75, .75), "ijb_evals": (.25, 0), "conservative": (.75, .25), "interpolated": (.75, .5)}
    for mode, tars in expected.items():
        # 0.05 < 1/|I|: (c) and (d) only read it with nan_unresolved=False (docs/metrics.md §4's NaN rule)
        np.testing.assert_allclose(r.tar_at_far([0.1, 0.05], mode, nan_unresolved=False).tar, tars, err_msg=mode)
    assert np.isnan(r.tar_at_far([0.05], "conservative").tar[0])
    # f = 0.05 in mode (a) is an exact FPR tie between 0 and 0.1; the reversed order reads FPR 0.1.
    assert r.tar_at_far([0.05], "insightface").far[0] == pytest.approx(0.1)
    c = r.tar_at_far([0.1, 0.05], "conservative", nan_unresolved=False)
    np.testing.assert_allclose(c.far, [.1, 0])
    np.testing.assert_allclose(c.threshold, [.7, .9])  # accept iff score >= threshold


def _random_scores(rng, n_gen, n_imp, decimals=None, dtype=np.float64):
    g, i = rng.normal(1.0, 1.0, n_gen), rng.normal(-1.0, 1.0, n_imp)
    if decimals is not None:
        g, i = np.round(g, decimals), np.round(i, decimals)
    return g.astype(dtype), i.astype(dtype)


@pytest.mark.parametrize("seed,n_gen,n_imp,decimals", [(0, 5, 40, 1), (1, 30, 2000, 2), (2, 200, 30000, None),
                                                       (3, 50, 1000, 0), (4, 1, 1, None), (5, 300, 50000, 3)])
def test_insightface_mode_identical_to_eval_ijbc(seed, n_gen, n_imp, decimals):
    g, i = _random_scores(np.random.default_rng(seed), n_gen, n_imp, decimals)
    x_labels = [10 ** -6, 10 ** -5, 10 ** -4, 10 ** -3, 10 ** -2, 10 ** -1]
    expected = tpr_at_fpr_table(np.r_[np.ones(n_gen), np.zeros(n_imp)], np.r_[g, i], x_labels)
    np.testing.assert_array_equal(tar_at_far(g, i, x_labels, mode="insightface").tar, expected)
    # ×100 with 2 decimals, as the script prints its table
    assert [f"{t * 100:.2f}" for t in tar_at_far(g, i, FAR_TARGETS, mode="insightface").tar] == \
        [f"{t * 100:.2f}" for t in expected]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("drop", [True, False])
def test_curve_identical_to_sklearn(dtype, drop):
    rng = np.random.default_rng(6)
    for _ in range(30):
        g, i = _random_scores(rng, int(rng.integers(1, 40)), int(rng.integers(1, 300)), int(rng.integers(0, 3)), dtype)
        expected = roc_curve(np.r_[np.ones(g.size), np.zeros(i.size)], np.r_[g, i], drop_intermediate=drop)
        for got, want in zip(Roc(g, i).curve(drop), expected):
            np.testing.assert_array_equal(got, want)


def test_exact_modes_against_brute_force():
    rng = np.random.default_rng(7)
    targets = np.array([1e-3, 3e-3, 0.01, 0.05, 0.1, 0.5, 1.0])
    for _ in range(25):
        g, i = _random_scores(rng, int(rng.integers(1, 30)), int(rng.integers(1000, 3000)), int(rng.integers(0, 3)))
        taus = np.concatenate([[np.inf], np.unique(np.r_[g, i])])
        tar = np.array([np.mean(g >= t) for t in taus])
        far = np.array([np.mean(i >= t) for t in taus])
        r = Roc(g, i)
        c = r.tar_at_far(targets, "conservative")
        np.testing.assert_array_equal(c.tar, [tar[far <= f].max() for f in targets])
        np.testing.assert_array_equal([np.mean(i >= t) for t in c.threshold], c.far)
        fars = np.unique(far)
        envelope = [tar[far == f].max() for f in fars]
        np.testing.assert_allclose(r.tar_at_far(targets, "interpolated").tar, np.interp(targets, fars, envelope),
                                   rtol=0, atol=1e-12)
        # Mode (b) as docs/metrics.md §4 defines it: nearest FPR in roc_curve's ascending order, first on ties.
        fpr, tpr, _ = roc_curve(np.r_[np.ones(g.size), np.zeros(i.size)], np.r_[g, i])
        np.testing.assert_array_equal(r.tar_at_far(targets, "ijb_evals").tar,
                                      [tpr[np.argmin(np.abs(fpr - f))] for f in targets])


def test_targets_below_one_impostor_are_nan_in_exact_modes_only():
    r = Roc(G, IMP)  # 10 impostors: 1/|I| = 0.1
    for mode in ("conservative", "interpolated"):
        res = r.tar_at_far([1e-6, 0.099, 0.1], mode)
        assert np.isnan(res.tar[:2]).all() and np.isnan(res.far[:2]).all() and res.tar[2] == 0.75
    for mode in ("insightface", "ijb_evals"):
        assert not np.isnan(r.tar_at_far([1e-6], mode).tar).any()
    np.testing.assert_allclose(r.tar_at_far([1e-6], "insightface").tar, [.25])  # nearest to 0, highest TAR


def test_from_labels_and_bad_input():
    r = Roc.from_labels(np.r_[G, IMP], np.r_[[1] * 4, [0] * 10])
    np.testing.assert_array_equal(r.tp[-1], 4)
    np.testing.assert_allclose(r.tar_at_far([0.05], "interpolated", nan_unresolved=False).tar, [0.5])
    with pytest.raises(DataFormatError, match="mode: 'nearest' is not one of"):
        tar_at_far(G, IMP, mode="nearest")
    with pytest.raises(DataFormatError, match="impostor: 1 scores are NaN"):
        Roc(G, [0.1, np.nan])
    with pytest.raises(DataFormatError, match="genuine: no scores"):
        Roc([], IMP)
