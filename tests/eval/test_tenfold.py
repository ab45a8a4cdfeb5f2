import numpy as np
import pytest

from facebce.errors import DataFormatError
from facebce.eval.tenfold import (
    ACCURACY_THRESHOLDS, VAL_THRESHOLDS, fold_bounds, pair_distances, ten_fold, ten_fold_from_distances,
)
from tests.eval import reference_insightface as ref


def _pairs(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.5
    if kind == "normal":
        d = np.where(same, rng.normal(0.9, 0.35, n), rng.normal(1.6, 0.35, n)).clip(0, 4)
    elif kind == "grid":  # distances equal to grid thresholds: the strict `<` decides
        grid = np.concatenate([ACCURACY_THRESHOLDS, VAL_THRESHOLDS])
        d = rng.choice(grid[(grid > 0.5) & (grid < 2.2)], n)
        d = np.where(same, d - 0.4, d).clip(0, 4)
        d = np.where(same, ACCURACY_THRESHOLDS[np.searchsorted(ACCURACY_THRESHOLDS, d).clip(0, 399)], d)
    else:  # "rounded": heavy ties between pairs
        d = np.round(np.where(same, rng.uniform(0.2, 1.6, n), rng.uniform(0.9, 2.4, n)), 1)
    return d, same


def _assert_same_roc(r, d, same, n_folds=10):
    tpr, fpr, acc, best = ref.calculate_roc(ACCURACY_THRESHOLDS, d, same, nrof_folds=n_folds)
    np.testing.assert_array_equal(r.fold_accuracies, acc)
    np.testing.assert_array_equal(r.fold_thresholds, best)
    np.testing.assert_array_equal(r.tpr, tpr)
    np.testing.assert_array_equal(r.fpr, fpr)
    assert r.accuracy == np.mean(acc) and r.std == np.std(acc)


def _assert_same_val(r, d, same, n_folds=10, scipy_interp=False):
    val, val_std, far = ref.calculate_val(VAL_THRESHOLDS, d, same, 1e-3, nrof_folds=n_folds, scipy_interp=scipy_interp)
    assert (r.val, r.val_std, r.far) == (val, val_std, far)


def test_metrics_md_toy_case_strict_less():
    # docs/metrics.md §2: best train accuracy 1.0 at 0.91; 0.90 fails because 0.9 < 0.9 is false.
    d, same = np.array([0.5, 1.5, 0.9, 2.5]), np.array([True, False, True, False])
    r = ten_fold_from_distances(d, same, n_folds=1)  # one fold trains and tests on all pairs (LFold(1))
    assert ACCURACY_THRESHOLDS[90] == 0.9
    assert r.fold_thresholds[0] == ACCURACY_THRESHOLDS[91] == pytest.approx(0.91)
    assert r.accuracy == 1.0
    _assert_same_roc(r, d, same, n_folds=1)
    # Two folds: each trains on the other half and picks the first grid value above its same-pair distance.
    r2 = ten_fold_from_distances(d, same, n_folds=2)
    np.testing.assert_allclose(r2.fold_thresholds, [0.91, 0.51])
    np.testing.assert_array_equal(r2.fold_accuracies, [1.0, 0.5])  # 0.9 is not < 0.51
    _assert_same_roc(r2, d, same, n_folds=2)


def test_folds_are_sklearn_kfold():
    from sklearn.model_selection import KFold
    for n in (10, 11, 19, 6000, 6007):
        b = fold_bounds(n)
        tests = [t for _, t in KFold(10, shuffle=False).split(np.arange(n))]
        assert [(t[0], t[-1] + 1) for t in tests] == list(zip(b[:-1], b[1:]))
    np.testing.assert_array_equal(np.diff(fold_bounds(6007)), [601] * 7 + [600] * 3)


@pytest.mark.parametrize("kind", ["normal", "grid", "rounded"])
@pytest.mark.parametrize("n,seed", [(10, 1), (23, 2), (97, 3), (250, 4), (601, 5), (1003, 6)])
def test_accuracy_and_roc_identical_to_insightface(kind, n, seed):
    d, same = _pairs(kind, n, seed)
    _assert_same_roc(ten_fold_from_distances(d, same), d, same)


@pytest.mark.parametrize("kind,n,seed,scipy_interp", [("normal", 97, 7, False), ("grid", 311, 8, False),
                                                      ("rounded", 1003, 9, False), ("normal", 800, 12, True)])
def test_val_far_identical_to_insightface(kind, n, seed, scipy_interp):
    # scipy_interp: the original interp1d(kind='slinear') on the de-duplicated curve gives the same numbers,
    # so the de-duplication (docs/metrics.md §2.7) is the only deviation.
    d, same = _pairs(kind, n, seed)
    _assert_same_val(ten_fold_from_distances(d, same), d, same, scipy_interp=scipy_interp)


def test_6000_pairs_everything_identical():
    d, same = _pairs("normal", 6000, 10)
    r = ten_fold_from_distances(d, same)
    _assert_same_roc(r, d, same)
    _assert_same_val(r, d, same)
    assert 0.8 < r.accuracy < 0.9 and 0 < r.far < 2e-3  # a realistic operating regime, not a degenerate one


def test_from_embeddings_matches_insightface_evaluate():
    rng = np.random.default_rng(11)
    emb = rng.normal(size=(2 * 2003, 16))
    emb[1::2][:1000] = emb[0::2][:1000] + rng.normal(scale=0.8, size=(1000, 16))  # 1000 "same" pairs
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    same = np.arange(2003) < 1000
    perm = rng.permutation(2003)
    emb = emb.reshape(2003, 2, 16)[perm].reshape(-1, 16)
    same = same[perm]
    tpr, fpr, acc, best, val, val_std, far = ref.evaluate(emb, same)
    r = ten_fold(emb[0::2], emb[1::2], same)
    np.testing.assert_array_equal(r.fold_accuracies, acc)
    np.testing.assert_array_equal(r.tpr, tpr)
    assert (r.val, r.val_std, r.far) == (val, val_std, far)
    np.testing.assert_array_equal(pair_distances(emb[0::2], emb[1::2]), np.sum(np.square(emb[0::2] - emb[1::2]), 1))


def test_val_threshold_zero_when_far_target_unreachable():
    # All impostor distances above the last VAL grid value: train FAR stays 0 < 1e-3, so thr = 0 and VAL = 0.
    d, same = _pairs("normal", 200, 13)
    d[~same] = 3.9995
    r = ten_fold_from_distances(d, same)
    assert (r.val, r.far) == (0.0, 0.0)
    _assert_same_val(r, d, same)


def _brute_exact_fold(d_train, s_train, d_test, s_test):
    """Smallest threshold over every cut of the train distances; returns (train acc, test acc)."""
    v = np.unique(d_train)
    cands = np.concatenate([[v[0]], (v[:-1] + v[1:]) / 2, [v[-1] + 1]])
    train = [np.mean((d_train < t) == s_train) for t in cands]
    t = cands[int(np.argmax(train))]
    return max(train), np.mean((d_test < t) == s_test)


@pytest.mark.parametrize("kind,n,seed", [("normal", 157, 14), ("rounded", 420, 15), ("grid", 97, 16)])
def test_exact_mode_is_the_best_cut_per_fold(kind, n, seed):
    d, same = _pairs(kind, n, seed)
    r = ten_fold_from_distances(d, same, exact=True)
    grid = ten_fold_from_distances(d, same)
    b = fold_bounds(n)
    for f in range(10):
        test = slice(b[f], b[f + 1])
        d_tr, s_tr = np.delete(d, test), np.delete(same, test)
        best_train, test_acc = _brute_exact_fold(d_tr, s_tr, d[test], same[test])
        assert r.fold_accuracies[f] == pytest.approx(test_acc, abs=1e-15)
        assert np.mean((d_tr < r.fold_thresholds[f]) == s_tr) == best_train
        assert best_train >= np.mean((d_tr < grid.fold_thresholds[f]) == s_tr)  # the grid is a subset of cuts
    np.testing.assert_array_equal(r.tpr, grid.tpr)  # ROC and VAL stay on their grids
    assert (r.val, r.far) == (grid.val, grid.far) and r.exact and not grid.exact


def test_report_format_and_bad_input():
    d, same = _pairs("normal", 100, 17)
    r = ten_fold_from_distances(d, same)
    assert str(r) == "%1.5f+-%1.5f" % (r.accuracy, r.std)
    with pytest.raises(DataFormatError, match="9 pairs cannot make 10 folds"):
        ten_fold_from_distances(d[:9], same[:9])
    with pytest.raises(DataFormatError, match="100 distances but 99 labels"):
        ten_fold_from_distances(d, same[:99])
    d[3] = np.nan
    with pytest.raises(DataFormatError, match="1 distances are NaN"):
        ten_fold_from_distances(d, same)
    with pytest.raises(DataFormatError, match="shapes"):
        ten_fold(np.zeros((4, 3)), np.zeros((4, 2)), [True] * 4)


# ---- VAL@FAR parity with what insightface's verification.py prints (defect 6) ------------------------------
def _assert_parity(r, d, same, n_folds=10):
    val, val_std, far = ref.calculate_val_original(VAL_THRESHOLDS, d, same, 1e-3, nrof_folds=n_folds)
    p = r.parity
    assert p.rule == "insightface"
    np.testing.assert_allclose([p.val, p.val_std, p.far], [val, val_std, far], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind,n,seed", [("normal", 100, 21), ("normal", 600, 22), ("grid", 311, 23),
                                         ("rounded", 1003, 24), ("normal", 2000, 25)])
def test_val_parity_equals_verification_py_on_random_data(kind, n, seed):
    d, same = _pairs(kind, n, seed)
    r = ten_fold_from_distances(d, same)
    _assert_parity(r, d, same)
    _assert_same_val(r, d, same)  # facebce's own VAL is unchanged


def test_val_parity_when_far_target_unreachable_is_zero_as_in_verification_py():
    d, same = _pairs("normal", 200, 13)
    d[~same] = 3.9995
    r = ten_fold_from_distances(d, same)
    assert (r.parity.val, r.parity.far) == (0.0, 0.0)
    _assert_parity(r, d, same)


def test_the_two_rules_split_on_small_sets_only():
    """On 100 pairs one train false accept is 1/45 > 1e-3: facebce reads VAL ~ 0 (threshold ~ 0),
    verification.py the edge of the zero-FAR plateau; on 6000 pairs they agree closely."""
    d, same = _pairs("normal", 100, 31)
    small = ten_fold_from_distances(d, same)
    assert small.val < 0.05 < small.parity.val
    d, same = _pairs("normal", 6000, 32)
    big = ten_fold_from_distances(d, same)
    assert abs(big.val - big.parity.val) < 0.02


def _lfw_subset_distances(shared_data, n: int):
    """mobilefacenet.onnx (ImageNet mean/std, RGB, no flip) on every (6000/n)th lfw.bin pair: n pairs with
    both classes in every fold (lfw.bin's own order puts 300 genuine pairs first)."""
    import cv2

    from facebce.data.verification_bin import load_bin
    from facebce.eval.model_loading import IMAGENET_MEAN, IMAGENET_STD
    from facebce.models.embedder import OnnxEmbedder, Preprocess

    vs = load_bin(shared_data / "lfw.bin")
    pairs = np.arange(0, 6000, 6000 // n)
    images = np.stack([cv2.imdecode(np.frombuffer(vs.images[i], np.uint8), cv2.IMREAD_COLOR)  # BGR, only these
                       for i in np.stack([2 * pairs, 2 * pairs + 1], 1).ravel()])
    emb = OnnxEmbedder(shared_data / "models" / "mobilefacenet.onnx", Preprocess(mean=IMAGENET_MEAN, std=IMAGENET_STD),
                       intra_op_threads=1, progress=False).embed(images)
    return pair_distances(emb[0::2], emb[1::2]), np.asarray(vs.issame, dtype=bool)[pairs]


# 100 pairs (200 images through the batch-1 model) in the default suite; 600 pairs (1200 images: over 10
# minutes on the shared CPU when 8 jobs run) with the slow tests.
@pytest.mark.parametrize("n", [pytest.param(600, marks=pytest.mark.slow), 100])
def test_val_parity_equals_verification_py_on_real_lfw_subsets(shared_data, n):
    d, same = _lfw_subset_distances(shared_data, n)
    assert same.size == n and 0 < same.sum() < n
    r = ten_fold_from_distances(d, same)
    _assert_parity(r, d, same)
    _assert_same_val(r, d, same)
