import numpy as np
import pytest

from facebce.errors import DataFormatError
from facebce.eval.verification import accuracy_at_threshold, best_threshold


def test_hand_computed_case():
    scores = [0.9, 0.8, 0.3, 0.7, 0.2, 0.1]
    issame = [True, True, True, False, False, False]
    r = best_threshold(scores, issame)
    # Two cuts tie at 5/6: t in (0.2, 0.3) accepts the impostor 0.7; t in (0.7, 0.8) rejects the genuine 0.3.
    assert r.accuracy == pytest.approx(5 / 6)
    assert r.threshold == pytest.approx(0.25)  # lowest of the tied cuts
    assert (r.tar, r.far) == (pytest.approx(1.0), pytest.approx(1 / 3))


def test_all_same_and_all_different_extremes():
    assert best_threshold([0.1, 0.2], [True, True]).accuracy == 1.0
    r = best_threshold([0.1, 0.2], [False, False])
    assert r.accuracy == 1.0 and r.threshold == 0.2


def test_matches_brute_force_on_random_scores():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 200))
        scores = np.round(rng.normal(size=n), 1)  # many ties
        issame = rng.random(n) < 0.5
        r = best_threshold(scores, issame)
        cands = np.concatenate([[scores.min() - 1], np.unique(scores)])
        brute = max(np.mean((scores > t) == issame) for t in cands)
        assert r.accuracy == pytest.approx(brute)
        assert accuracy_at_threshold(scores, issame, r.threshold).accuracy == pytest.approx(brute)


def test_bad_input_is_named():
    with pytest.raises(DataFormatError, match="NaN"):
        best_threshold([0.1, float("nan")], [True, False])
    with pytest.raises(DataFormatError, match="2 scores but 3 labels"):
        best_threshold([0.1, 0.2], [True, False, True])
