import itertools

import numpy as np
import pytest
import torch

from facebce.errors import DataFormatError
from facebce.eval.uniform import (
    bias_gap, class_wise_accuracy, class_wise_accuracy_opt, positive_and_hardest_negative, sample_wise_accuracy,
    uniform_accuracy, uniform_accuracy_curve,
)

S = np.array([[.9, .5, .2], [.1, .4, .3], [.2, .6, .8], [.3, .7, .1]])
Y = np.array([0, 1, 2, 0])


def test_metrics_md_worked_example():
    p, q = positive_and_hardest_negative(S, Y)
    np.testing.assert_array_equal(p, [.9, .4, .8, .3])
    np.testing.assert_array_equal(q, [.5, .3, .6, .7])
    assert sample_wise_accuracy(S, Y) == 0.75
    r = uniform_accuracy(S, Y)
    assert (r.accuracy, r.n_correct, r.segment) == (0.5, 2, (0.6, 0.8))
    assert r.threshold == pytest.approx(0.7)


def test_torch_input_same_as_numpy():
    r = uniform_accuracy(torch.tensor(S, dtype=torch.float32), torch.tensor(Y))
    assert (r.accuracy, r.n_correct) == (0.5, 2)
    assert r.segment == pytest.approx((0.6, 0.8)) and r.threshold == pytest.approx(0.7)
    assert sample_wise_accuracy(torch.tensor(S), torch.tensor(Y)) == 0.75


def test_ties_are_errors_and_no_correct_sample_gives_nan():
    tie = np.array([[.5, .5], [.2, .9]])
    assert sample_wise_accuracy(tie, [0, 1]) == 0.5
    r = uniform_accuracy(np.array([[.1, .9], [.9, .1]]), [0, 1])
    assert r.accuracy == 0 and np.isnan(r.threshold)


def _random_case(rng, decimals):
    n, n_classes = int(rng.integers(1, 60)), int(rng.integers(2, 6))
    y = rng.integers(0, n_classes, n)
    s = np.round(rng.normal(size=(n, n_classes)) + 1.2 * np.eye(n_classes)[y], decimals)
    return s, y


def test_uniform_matches_brute_force_over_all_midpoints():
    rng = np.random.default_rng(0)
    for trial in range(200):
        s, y = _random_case(rng, decimals=int(rng.integers(0, 3)))
        p, q = positive_and_hardest_negative(s, y)
        v = np.unique(np.r_[p, q])
        cands = np.concatenate([[v[0] - 1], (v[:-1] + v[1:]) / 2, [v[-1] + 1]])
        acc = np.array([np.mean((q < t) & (t < p)) for t in cands])
        r = uniform_accuracy(s, y)
        assert r.accuracy == acc.max(), trial
        assert r.accuracy <= sample_wise_accuracy(s, y)
        if r.accuracy > 0:
            assert np.mean((q < r.threshold) & (r.threshold < p)) == r.accuracy
            t_low = cands[np.argmax(acc)]  # lowest brute-force optimum lies in the returned (lowest) segment
            assert r.segment[0] < t_low < r.segment[1], trial
        np.testing.assert_array_equal(uniform_accuracy_curve(s, y, cands), acc)


def test_class_wise_at_given_thresholds_by_definition():
    rng = np.random.default_rng(1)
    for _ in range(50):
        s, y = _random_case(rng, decimals=1)
        tau = np.round(rng.normal(0.5, 0.5, s.shape[1]), 1)
        want = np.mean([s[i, y[i]] > tau[y[i]] and all(s[i, j] < tau[j] for j in range(s.shape[1]) if j != y[i])
                        for i in range(len(y))])
        assert class_wise_accuracy(s, y, tau).accuracy == want
    # At one shared threshold t*, class-wise accuracy is the uniform accuracy.
    t = uniform_accuracy(S, Y).threshold
    assert class_wise_accuracy(S, Y, [t] * 3).accuracy == 0.5


def test_class_wise_opt_beats_uniform_on_hand_case():
    # Intervals (0.7, 0.9), (0.3, 0.5), (0.2, 0.8): one threshold serves 2 of 3; τ = (0.2..0.5, 0.7..0.8) serves all.
    s = np.array([[.9, .7], [.5, .3], [.2, .8]])
    y = np.array([0, 0, 1])
    assert uniform_accuracy(s, y).accuracy == pytest.approx(2 / 3)
    r = class_wise_accuracy_opt(s, y)
    assert r.accuracy == 1.0 and r.passes == 2
    np.testing.assert_allclose(r.thresholds, [0.4, 0.75])  # τ_0 stays at t* = 0.4, τ_1 moves to mid(0.7, 0.8)
    assert class_wise_accuracy(s, y, r.thresholds).accuracy == 1.0


def test_class_wise_opt_thresholds_between_adjacent_float32_scores():
    # τ_1 must fall strictly between 0.7 and the next float32: only a float64 threshold can.
    above = np.nextafter(np.float32(0.7), np.float32(1))
    s = np.array([[.9, .7], [.5, .3], [.2, above]], dtype=np.float32)
    r = class_wise_accuracy_opt(s, [0, 0, 1])
    assert r.accuracy == 1.0 and np.float32(0.7) < r.thresholds[1] < above


def test_class_wise_opt_bounds_on_random_cases():
    rng = np.random.default_rng(2)
    for trial in range(40):
        n, n_classes = int(rng.integers(2, 12)), int(rng.integers(2, 4))
        y = rng.integers(0, n_classes, n)
        s = np.round(rng.normal(size=(n, n_classes)) + np.eye(n_classes)[y] + rng.normal(size=n_classes), 1)
        r = class_wise_accuracy_opt(s, y)
        assert r.accuracy >= uniform_accuracy(s, y).accuracy
        assert class_wise_accuracy(s, y, r.thresholds).accuracy == r.accuracy
        # True optimum by brute force over every combination of per-column cut midpoints.
        cols = []
        for j in range(n_classes):
            v = np.unique(s[:, j])
            cols.append(np.concatenate([[v[0] - 1], (v[:-1] + v[1:]) / 2, [v[-1] + 1]]))
        best = max(class_wise_accuracy(s, y, tau).accuracy for tau in itertools.product(*cols))
        assert r.accuracy <= best, trial


def test_bias_gap():
    assert bias_gap(0.75, 0.7) == pytest.approx(0.05)
    assert bias_gap(32.0, 0.45, gamma=64.0) == pytest.approx(0.05)
    np.testing.assert_allclose(bias_gap([0.7, 0.8], 0.7), [0.0, 0.1])


def test_bad_input_is_named():
    with pytest.raises(DataFormatError, match=r"labels: 3 labels for 4 score rows"):
        uniform_accuracy(S, [0, 1, 2])
    with pytest.raises(DataFormatError, match=r"labels: need integer class indices in \[0, 3\)"):
        uniform_accuracy(S, [0, 1, 3, 0])
    with pytest.raises(DataFormatError, match="thresholds: 2 thresholds for 3 classes"):
        class_wise_accuracy(S, Y, [0.1, 0.2])
    with pytest.raises(DataFormatError, match="n x N matrix"):
        sample_wise_accuracy(S[0], [0])
