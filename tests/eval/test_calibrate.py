"""Calibration: the exact threshold at a target FAR against brute force, bootstrap interval coverage on
known distributions, drift numbers recomputed from calib.json, the artifact's checks (checksum, model
digest), the threshold resolver, the eval integration, and one-line errors for bad input."""
from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np
import pytest

from facebce.data.synthetic import SyntheticFaces
from facebce.errors import ConfigError, DataFormatError, ModelError
from facebce.eval import calibrate as C
from facebce.eval.runner import evaluate
from tests.eval.fakes import ProjectionEmbedder, flatten_matmul_onnx, write_pair_sets


def brute_threshold(impostor, f):
    """The smallest threshold among -inf and the impostor scores whose FAR (#{s > t} / n) is <= f."""
    imp = np.asarray(impostor, np.float64)
    for t in np.concatenate([[-np.inf], np.unique(imp)]):
        if np.sum(imp > t) <= f * imp.size + 1e-9:
            return t
    raise AssertionError("unreachable")


@pytest.mark.parametrize("tied", [False, True])
def test_exact_threshold_equals_brute_force(tied):
    rng = np.random.default_rng(1 if tied else 0)
    for _ in range(300):
        n = int(rng.integers(1, 400))
        imp = rng.normal(size=n)
        if tied:  # few distinct values: ties straddle every cut
            imp = np.round(imp * rng.integers(1, 4)) / 4
        f = float(rng.choice([1e-3, 1e-2, 0.05, 0.1, 0.25, 0.5, 0.9, rng.uniform(0.001, 0.99)]))
        if C.allowed_false_accepts(n, f) < 1:
            with pytest.raises(DataFormatError, match="cannot resolve"):
                C.threshold_at_far(imp, f)
            continue
        t = C.threshold_at_far(imp, f)
        assert t == brute_threshold(imp, f), (n, f)
        assert np.sum(imp > t) <= f * n + 1e-9  # the target holds ...
        assert np.sum(imp >= t) > f * n - 1e-9  # ... and no lower threshold keeps it


def test_k_is_floor_of_target_times_n_without_float_slips():
    assert C.allowed_false_accepts(3000, 1e-3) == 3 and C.allowed_false_accepts(2999, 1e-3) == 2
    assert C.allowed_false_accepts(1000, 0.001) == 1 and C.allowed_false_accepts(300, 0.01) == 3
    for f in (1e-4, 1e-3, 3e-3, 0.07, 0.3):
        need = C.impostors_needed(f)
        assert C.allowed_false_accepts(need, f) >= 1 and C.allowed_false_accepts(need - 1, f) == 0


def test_bad_input_is_one_line():
    imp = np.linspace(0, 1, 500)
    with pytest.raises(DataFormatError, match=r"500 impostor pairs cannot resolve FAR 0.0001 \(at least 10000 are "
                                              r"needed"):
        C.threshold_at_far(imp, 1e-4)
    for bad in (0, 1, -0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ConfigError, match="must lie strictly between 0 and 1|expected a number"):
            C.threshold_at_far(imp, bad)
    with pytest.raises(DataFormatError, match="1 scores are NaN or Inf"):
        C.threshold_at_far(np.r_[imp, np.nan], 0.1)
    with pytest.raises(DataFormatError, match="no scores"):
        C.threshold_at_far([], 0.1)
    with pytest.raises(DataFormatError, match="x: 2 scores but 3 labels"):
        C.scored_pairs("x", [0.1, 0.2], [True, False, True])
    only_genuine = C.scored_pairs("g", [0.5, 0.6], [True, True])
    with pytest.raises(DataFormatError, match="g: no impostor pairs"):
        C.calibrate_scored([only_genuine], 0.1, replicates=0)
    with pytest.raises(ConfigError, match="no such set in this run"):
        C.calibrate_scored([only_genuine], 0.1, on="lfw", replicates=0)
    with pytest.raises(ConfigError, match="--pooled or --on"):
        C.calibrate_scored([only_genuine], 0.1, on="g", pooled=True, replicates=0)
    for e in (ConfigError, DataFormatError):
        assert issubclass(e, Exception)


def test_bootstrap_interval_covers_the_true_threshold():
    """Impostors ~ N(0, 1): the population threshold at FAR f is the (1 - f) quantile. The 95 % percentile
    interval from 2000 impostors should cover it in ~95 % of 200 independent samples."""
    f, n, reps = 0.02, 2000, 200
    true_t = NormalDist().inv_cdf(1 - f)
    true_tar = 1 - NormalDist(mu=3.0).cdf(true_t)
    rng = np.random.default_rng(7)
    covered = covered_tar = 0
    for r in range(reps):
        imp, gen = rng.normal(size=n), rng.normal(3.0, 1.0, size=n)
        b = C.bootstrap_pairs(gen, imp, f, replicates=200, seed=r)
        covered += b.threshold_ci[0] <= true_t <= b.threshold_ci[1]
        covered_tar += b.tar_ci[0] <= true_tar <= b.tar_ci[1]
    assert 0.88 <= covered / reps <= 0.99, covered / reps
    assert 0.85 <= covered_tar / reps <= 0.995, covered_tar / reps


def _folder(n_id=40, per=8, seed=0, spread=1.5):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_id), per)
    centres = rng.normal(size=(n_id, 16)) * spread
    return labels, centres[labels] + rng.normal(size=(labels.size, 16))


def test_folder_set_scores_every_pair_and_resamples_identities():
    labels, emb = _folder()
    s = C.scored_folder("folder", emb, labels)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    ia, ib = np.triu_indices(labels.size, 1)
    np.testing.assert_allclose(s.scores, np.sum(e[ia] * e[ib], axis=1), atol=1e-6)  # unit rows in float32
    np.testing.assert_array_equal(s.issame, labels[ia] == labels[ib])
    t = C.threshold_at_far(s.impostor, 0.01)
    b = C.bootstrap_identities(s, 0.01, replicates=100, seed=0)
    assert b.unit == "identities" and b.threshold_ci[0] <= t <= b.threshold_ci[1]
    # with every identity drawn exactly once (all weights 1) the weighted rule is the plain threshold
    assert C._impostor_weight(s, np.ones(s.n_identities)) == s.n_impostor
    spread = C.per_identity_far(s, t, 0.01)
    far = []
    for i in range(s.n_identities):
        mine = ~s.issame & ((s.id_a == i) | (s.id_b == i))
        far.append(np.mean(s.scores[mine] > t))
    assert spread["identities"] == 40 and spread["max"] == pytest.approx(max(far))
    assert spread["median"] == pytest.approx(np.median(far)) and spread["p90"] == pytest.approx(np.quantile(far, 0.9))
    o = C.opis(s, far_range=(0.001, 0.1))
    assert o["identities"] == 40 and o["value"] > 0
    # identical identities (every one the same utility curve) are perfectly consistent
    same = C.scored_folder("same", np.tile(np.eye(4), (1, 1)).repeat(2, axis=0), np.repeat(np.arange(4), 2))
    assert C.opis(same, far_range=(0.05, 0.5), grid=11)["value"] == pytest.approx(0.0)


def _two_sets():
    rng = np.random.default_rng(3)
    y = np.arange(4000) % 2 == 0
    a = np.where(y, rng.normal(0.6, 0.1, 4000), rng.normal(0.1, 0.1, 4000))
    b = np.where(y, rng.normal(0.5, 0.15, 4000), rng.normal(0.2, 0.12, 4000))  # a harder domain
    return [C.scored_pairs("dom_a", a, y, digest="aa"), C.scored_pairs("dom_b", b, y, digest="bb")]


def test_drift_numbers_recomputed_from_the_json(tmp_path):
    sets = _two_sets()
    labels, emb = _folder(seed=1)
    sets.append(C.scored_folder("people", emb, labels, digest="cc"))
    cal = C.calibrate_scored(sets, 1e-2, on="dom_a", replicates=200, seed=1, model={"digest": "d" * 64, "path": "m"})
    path = C.write_calibration(cal, tmp_path / "calib.json", sets=sets)
    assert (tmp_path / "calib.md").is_file() and (tmp_path / "calib.png").read_bytes()[:4] == b"\x89PNG"
    doc = json.loads(path.read_text())
    t, f = doc["threshold"], doc["target_far"]
    assert t == C.threshold_at_far(sets[0].impostor, f) and doc["calibrated_on"] == ["dom_a"]
    for row, s in zip(doc["sets"], sets):
        imp, gen = s.impostor, s.genuine
        assert row["far"] == np.mean(imp > t) and row["tar"] == np.mean(gen > t)
        assert row["far_drift"] == pytest.approx(np.mean(imp > t) / f)
        assert row["own_threshold"] == brute_threshold(imp, f)
        assert row["n_impostor"] == imp.size and row["digest"] == s.digest
    assert doc["sets"][0]["far_drift"] <= 1.0 < doc["sets"][1]["far_drift"]  # the harder domain drifts
    lo, hi = doc["bootstrap"]["threshold_ci"]
    assert lo <= t <= hi and doc["bootstrap"]["unit"] == "pairs"
    assert "per_identity_far" in doc["sets"][2] and doc["sets"][2]["opis"]["value"] > 0
    md = (tmp_path / "calib.md").read_text()
    assert f"**{doc['sets'][1]['far_drift']:.2f}**" in md
    pooled = C.calibrate_scored(sets, 1e-2, pooled=True, replicates=0)
    assert pooled.calibrated_on == ["dom_a", "dom_b"]
    assert pooled.threshold == C.threshold_at_far(np.r_[sets[0].impostor, sets[1].impostor], 1e-2)


def test_artifact_round_trip_tamper_and_other_model(tmp_path):
    sets = _two_sets()
    cal = C.calibrate_scored(sets, 1e-2, replicates=50, model={"digest": "a" * 64, "path": "m.onnx"})
    path = C.write_calibration(cal, tmp_path / "calib.json", report=False)
    back = C.load_calibration(path, model_digest="a" * 64)
    assert back.threshold == cal.threshold and back.threshold_ci == cal.threshold_ci and back.sets == cal.sets
    with pytest.raises(ModelError, match=r"calibrated with another model \(digest aaaaaaaaaaaa, this model "
                                         r"bbbbbbbbbbbb\)"):
        C.load_calibration(path, model_digest="b" * 64)
    doc = json.loads(path.read_text())
    doc["threshold"] = doc["threshold"] - 0.05  # a hand edit
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match="checksum mismatch"):
        C.load_calibration(tmp_path / "edited.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DataFormatError, match="not a calibration file"):
        C.load_calibration(tmp_path / "junk.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(DataFormatError, match="not a facebce calibration file"):
        C.load_calibration(tmp_path / "other.json")
    with pytest.raises(ConfigError, match="no such calibration file"):
        C.load_calibration(tmp_path / "missing.json")


def test_threshold_spec_resolver_and_metadata(tmp_path):
    cal = C.calibrate_scored(_two_sets(), 1e-2, replicates=50, model={"digest": "a" * 64, "path": "m.onnx"})
    path = C.write_calibration(cal, tmp_path / "calib.json", report=False)
    spec = C.resolve_threshold_spec(f"calibrated:{path}", model_digest="a" * 64)
    assert (spec.value, spec.source, spec.target_far) == (cal.threshold, "calibrated", 1e-2)
    meta = spec.metadata()
    assert float(meta["threshold"]) == cal.threshold and meta["threshold_source"] == "calibrated"
    assert float(meta["threshold_target_far"]) == 1e-2 and json.loads(meta["threshold_ci"]) == list(cal.threshold_ci)
    import hashlib
    assert meta["threshold_calibration"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert C.resolve_threshold_spec("0.43") == C.ThresholdSpec(0.43, "user")
    assert C.resolve_threshold_spec("fixed:0.3").value == 0.3 and C.resolve_threshold_spec(0.2).value == 0.2
    assert C.resolve_threshold_spec("0.43").metadata() == {"threshold": "0.43", "threshold_source": "user"}
    for bad, msg in (("2", r"lies in \[-1, 1\]"), ("nan", r"lies in \[-1, 1\]"), ("fit:lfw", "expected a cosine"),
                     ("calibrated:", "name the calibration file")):
        with pytest.raises(ConfigError, match=msg):
            C.resolve_threshold_spec(bad)
    with pytest.raises(ModelError, match="another model"):
        C.resolve_threshold_spec(f"calibrated:{path}", model_digest="c" * 64)


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    return write_pair_sets(tmp_path_factory.mktemp("calib_bins"), ("cal_a", "cal_b"), 200)


def test_scores_come_from_the_eval_machinery_and_eval_takes_the_artifact(bins, tmp_path):
    sets = [("cal_a", bins / "cal_a.bin"), ("cal_b", bins / "cal_b.bin")]
    kw = dict(protocol_paths=[bins / "protocols"], progress=False)
    cal = C.calibrate(ProjectionEmbedder(), sets, target_far=0.05, replicates=100, model_digest="e" * 64,
                      out=tmp_path / "calib.json", **kw)
    report = evaluate(ProjectionEmbedder(), sets, threshold="fixed:0", **kw)
    for row, s in zip(cal.sets, report.sets):
        assert row["far"] == np.mean(s.scores[~s.issame] > cal.threshold)
    assert cal.threshold == C.threshold_at_far(report.sets[0].scores[~report.sets[0].issame], 0.05)
    again = evaluate(ProjectionEmbedder(), sets, threshold=f"calibrated:{tmp_path / 'calib.json'}", **kw)
    assert again.threshold.value == cal.threshold and again.threshold.source.startswith("calibrated:")
    for s, row in zip(again.sets, cal.sets):
        assert s.at_global.far == row["far"] and s.at_global.tar == row["tar"]
    with pytest.raises(ConfigError, match="needs model_digest"):
        C.calibrate(ProjectionEmbedder(), sets, target_far=0.05, **kw)
    with pytest.raises(ConfigError, match="must lie strictly between 0 and 1"):
        C.calibrate(ProjectionEmbedder(), sets, target_far=2, model_digest="e", **kw)
    with pytest.raises(DataFormatError, match=r"cal_a: 100 impostor pairs cannot resolve FAR 0.001"):
        C.calibrate(ProjectionEmbedder(), sets, target_far=1e-3, model_digest="e", replicates=0, **kw)
    assert math.isfinite(cal.tar)


def _random_onnx(path, seed):
    return flatten_matmul_onnx(path, ["N", 3, 112, 112], out_dim=8, seed=seed)


def test_cli_calibrate_then_eval_with_the_artifact(bins, tmp_path, capsys):
    from facebce.cli import main
    from facebce.eval.model_loading import file_digest

    model = _random_onnx(tmp_path / "m.onnx", 0)
    other = _random_onnx(tmp_path / "other.onnx", 1)
    sets = [f"cal_a={bins / 'cal_a.bin'}", f"cal_b={bins / 'cal_b.bin'}"]
    common = ["--protocols", str(bins / "protocols"), "--mean", "127.5", "--std", "127.5"]
    out = tmp_path / "calib.json"
    assert main(["calibrate", str(model), *sets, *common, "--target-far", "0.05", "--on", "cal_b",
                 "--bootstrap", "50", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    cal = C.load_calibration(out, model_digest=file_digest(model))
    assert cal.calibrated_on == ["cal_b"] and f"**{cal.threshold:.4f}**" in printed
    assert (tmp_path / "calib.md").read_text().strip() == C.drift_markdown(cal)
    assert main(["eval", str(model), *sets, *common, "--threshold", f"calibrated:{out}"]) == 0
    assert f"global threshold: **{cal.threshold:.4f}** from `calibrated:{out}`" in capsys.readouterr().out
    assert main(["eval", str(other), *sets, *common, "--threshold", f"calibrated:{out}"]) == 1
    err = capsys.readouterr().err
    assert "calibrated with another model" in err and err.count("\n") == 1
    out.write_text(out.read_text().replace('"target_far": 0.05', '"target_far": 0.5'))
    assert main(["eval", str(model), *sets, *common, "--threshold", f"calibrated:{out}"]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert main(["calibrate", str(model), *sets, *common, "--target-far", "0", "--out", str(out)]) == 1
    assert "must lie strictly between 0 and 1" in capsys.readouterr().err


def test_round_trip_through_export_metadata(tmp_path):
    """calib.json -> `facebce export --threshold calibrated:` -> the ONNX metadata a gallery reads back."""
    import hashlib

    from facebce.deploy.export import export_onnx, threshold_option
    from facebce.eval.model_loading import file_digest
    from facebce.models.embedder import OnnxEmbedder
    from tests.deploy.test_export import Tiny

    weights = tmp_path / "run.pth"
    weights.write_bytes(b"the exported model's weights")
    cal = C.calibrate_scored(_two_sets(), 1e-2, replicates=100,
                             model={"digest": file_digest(weights), "path": "run.pth"})
    path = C.write_calibration(cal, tmp_path / "calib.json", report=False)
    value, provenance = threshold_option(f"calibrated:{path}", model=weights, arch="mbf")
    assert value == cal.threshold and provenance["ci"] == tuple(cal.threshold_ci)
    report = export_onnx(Tiny(), tmp_path / "m.onnx", metadata={"threshold": value}, threshold_provenance=provenance)
    emb = OnnxEmbedder(report.path)
    assert emb.threshold == cal.threshold
    meta = emb.metadata
    assert meta["threshold_source"] == "calibrated" and float(meta["threshold_target_far"]) == 1e-2
    assert json.loads(meta["threshold_ci"]) == list(cal.threshold_ci)
    assert meta["threshold_calibration"] == hashlib.sha256(path.read_bytes()).hexdigest()
    other = tmp_path / "other.pth"
    other.write_bytes(b"another model")
    with pytest.raises(ModelError, match="calibrated with another model"):
        threshold_option(f"calibrated:{path}", model=other, arch="mbf")
    no_ci = C.write_calibration(C.calibrate_scored(_two_sets(), 1e-2, replicates=0, model={"digest": "z"}),
                                tmp_path / "no_ci.json", report=False)
    with pytest.raises(ConfigError, match="no bootstrap interval"):
        threshold_option(f"calibrated:{no_ci}")


def test_round_trip_through_the_gallery(tmp_path, capsys):
    """calib.json -> `facebce gallery build/set-threshold --threshold calibrated:` -> the gallery's threshold."""
    from facebce.cli import main
    from facebce.deploy.gallery import resolve_threshold
    from facebce.deploy.stores import open_gallery
    from facebce.eval.model_loading import file_digest

    from facebce.data.synthetic import write_image_folder

    write_image_folder(SyntheticFaces(3, 2, seed=4), tmp_path / "faces")
    model = _random_onnx(tmp_path / "m.onnx", 0)
    cal = C.calibrate_scored(_two_sets(), 1e-2, replicates=50, model={"digest": file_digest(model), "path": "m.onnx"})
    path = C.write_calibration(cal, tmp_path / "calib.json", report=False)
    common = ["--model", str(model), "--mean", "127.5", "--std", "127.5"]
    g = str(tmp_path / "g.faiss")
    assert main(["gallery", "build", g, str(tmp_path / "faces"), *common, "--threshold", f"calibrated:{path}"]) == 0
    assert f"threshold {cal.threshold:.4f} (calibrated at FAR 0.01" in capsys.readouterr().out
    with open_gallery(g) as store:
        assert store.threshold == cal.threshold
    other = _random_onnx(tmp_path / "other.onnx", 1)
    assert main(["gallery", "set-threshold", g, f"calibrated:{path}", "--model", str(other)]) == 1
    err = capsys.readouterr().err
    assert "calibrated with another model" in err and err.count("\n") == 1
    doc = json.loads(path.read_text())
    doc["threshold"] = 0.1
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    assert main(["gallery", "set-threshold", g, f"calibrated:{tmp_path / 'edited.json'}"]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    with open_gallery(g) as store:
        assert store.threshold == cal.threshold  # nothing changed by the refused calls
    t, why = resolve_threshold(C.resolve_threshold_spec(f"calibrated:{path}"))
    assert t == cal.threshold and "calibrated" in why


def test_the_service_checks_the_calibration_against_its_model(tmp_path):
    """`facebce serve --threshold calibrated:calib.json`: the gallery it creates takes the calibrated
    threshold, and a calibration of another model is refused before anything is created."""
    from facebce.deploy.stores import open_gallery
    from facebce.eval.model_loading import file_digest
    from facebce.serve.config import load_config
    from facebce.serve.engine import Engine

    model = _random_onnx(tmp_path / "m.onnx", 0)
    cal = C.calibrate_scored(_two_sets(), 1e-2, replicates=50, model={"digest": file_digest(model), "path": "m.onnx"})
    path = C.write_calibration(cal, tmp_path / "calib.json", report=False)
    other = _random_onnx(tmp_path / "other.onnx", 1)
    common = {"mean": "127.5", "std": "127.5", "threshold": f"calibrated:{path}"}
    bad = load_config({"model": str(other), "gallery": str(tmp_path / "bad.faiss"), **common}, environ={})
    with pytest.raises(ModelError, match="calibrated with another model"):
        Engine(bad, log=lambda _: None)
    assert not (tmp_path / "bad.faiss").exists()
    good = load_config({"model": str(model), "gallery": str(tmp_path / "g.faiss"), **common}, environ={})
    engine = Engine(good, log=lambda _: None)
    try:
        assert engine.store.threshold == cal.threshold
    finally:
        engine.close()
    with open_gallery(tmp_path / "g.faiss") as store:
        assert store.threshold == cal.threshold


# ----------------------------------------------------------------------------- IJB sets: subjects resampled

@pytest.mark.parametrize("tied", [False, True])
def test_weighted_threshold_is_the_plain_rule_with_unit_or_repeated_weights(tied):
    rng = np.random.default_rng(7)
    for _ in range(30):
        n = int(rng.integers(50, 400))
        imp = np.round(rng.normal(size=n), 1) if tied else rng.normal(size=n)
        f = float(rng.choice([0.01, 0.05, 0.1, 0.2]))
        if C.allowed_false_accepts(n, f) < 1:
            continue
        assert C.weighted_threshold_at_far(imp, np.ones(n), f) == C.threshold_at_far(imp, f)
        w = rng.integers(0, 4, n)  # a bootstrap weight is a multiplicity: the same as repeating the score
        if C.allowed_false_accepts(int(w.sum()), f) >= 1:
            assert C.weighted_threshold_at_far(imp, w, f) == C.threshold_at_far(np.repeat(imp, w), f)


def _subject_set(n_subjects=150, templates=4, impostors_per_subject=60, offset=0.15, seed=0):
    """An IJB-like scored set: every subject has a random offset added to all its impostor scores, so the
    template pairs of one subject are strongly correlated (a pairs bootstrap treats them as independent)."""
    rng = np.random.default_rng(seed)
    off = rng.normal(0, offset, n_subjects)
    a_gen = np.repeat(np.arange(n_subjects), templates * (templates - 1) // 2)
    a_imp = np.repeat(np.arange(n_subjects), impostors_per_subject)
    b_imp = (a_imp + rng.integers(1, n_subjects, a_imp.size)) % n_subjects
    gen = rng.normal(0.6, 0.1, a_gen.size) + off[a_gen] / 2
    imp = rng.normal(0.0, 0.05, a_imp.size) + off[a_imp] + off[b_imp]
    return C.scored_ijb("ijb_like", np.r_[gen, imp], np.r_[np.ones(gen.size, bool), np.zeros(imp.size, bool)],
                        np.r_[a_gen, a_imp], np.r_[a_gen, b_imp], n_subjects)


def test_subject_bootstrap_is_wider_than_the_pairs_one_on_correlated_pairs():
    s = _subject_set()
    f = 0.01
    t = C.threshold_at_far(s.impostor, f)
    subj = C.bootstrap_subjects(s, f, replicates=300, seed=1)
    pairs = C.bootstrap_pairs(s.genuine, s.impostor, f, replicates=300, seed=1)
    assert subj.unit == "subjects" and pairs.unit == "pairs"
    assert subj.threshold_ci[0] <= t <= subj.threshold_ci[1]
    width = subj.threshold_ci[1] - subj.threshold_ci[0]
    ratio = width / (pairs.threshold_ci[1] - pairs.threshold_ci[0])
    assert ratio > 2.5  # the honest interval is wider (measured: 4.6)
    # the widening comes from the correlation: without subject offsets the ratio is far smaller (measured 1.5;
    # two-way resampling of independent pairs is somewhat wider too)
    flat = _subject_set(offset=0.0)
    w_subj = np.diff(C.bootstrap_subjects(flat, f, replicates=300, seed=1).threshold_ci)[0]
    w_pairs = np.diff(C.bootstrap_pairs(flat.genuine, flat.impostor, f, replicates=300, seed=1).threshold_ci)[0]
    assert ratio > 2 * (w_subj / w_pairs)
    # calibrate_scored picks the subject bootstrap for an IJB set, the pairs one for a pairs set
    cal = C.calibrate_scored([s, C.scored_pairs("p", s.scores, s.issame)], f, replicates=50)
    assert cal.bootstrap["unit"] == "subjects" and "resampling subjects" in C.drift_markdown(cal)
    assert C.calibrate_scored([s, C.scored_pairs("p", s.scores, s.issame)], f, on="p",
                              replicates=50).bootstrap["unit"] == "pairs"
    with pytest.raises(ConfigError, match="needs an IJB set"):
        C.bootstrap_subjects(C.scored_pairs("p", s.scores, s.issame), f)


def test_ijb_scores_are_evals_and_the_cli_calibrates_on_subjects(synthetic_ijb, bins, tmp_path, capsys):
    from facebce.cli import main
    from facebce.eval.ijb import load_ijb
    from facebce.eval.model_loading import file_digest
    from tests.eval.ijb_synthetic import align_for_tests

    sets = [("ijbc", synthetic_ijb), ("cal_a", bins / "cal_a.bin")]
    kw = dict(protocol_paths=[bins / "protocols"], progress=False)
    report = evaluate(ProjectionEmbedder(), sets[:1], threshold="fixed:0", align=align_for_tests, **kw)
    cal = C.calibrate(ProjectionEmbedder(), sets, target_far=0.05, replicates=100, model_digest="e" * 64,
                      align=align_for_tests, out=tmp_path / "calib.json", **kw)
    ijb = report.ijb[0]
    assert cal.calibrated_on == ["ijbc"] and cal.bootstrap["unit"] == "subjects"
    assert cal.threshold == C.threshold_at_far(ijb.scores[~ijb.labels].astype(np.float64), 0.05)
    assert cal.sets[0]["far"] == np.mean(ijb.scores[~ijb.labels] > cal.threshold)
    assert cal.sets[0]["kind"] == "ijb" and cal.sets[0]["n_pairs"] == ijb.n_pairs
    meta = load_ijb(synthetic_ijb, "ijbc", check_sizes=False)
    from facebce.eval.ijb import pair_subjects
    a, b, n = pair_subjects(meta)
    assert n == 40 and np.array_equal(a == b, meta.labels)

    model = _random_onnx(tmp_path / "m.onnx", 0)
    out = tmp_path / "cli" / "calib.json"
    out.parent.mkdir()
    args = ["calibrate", str(model), f"ijbc={synthetic_ijb}", f"cal_a={bins / 'cal_a.bin'}", "--protocols",
            str(bins / "protocols"), "--mean", "127.5", "--std", "127.5", "--target-far", "0.05", "--on", "ijbc",
            "--bootstrap", "50", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    saved = C.load_calibration(out, model_digest=file_digest(model))
    assert saved.bootstrap["unit"] == "subjects" and "resampling subjects" in printed
    assert [r["name"] for r in saved.sets] == ["ijbc", "cal_a"] and "\n| ijbc" in printed
    data = json.loads(out.read_text())
    assert data["bootstrap"]["unit"] == "subjects"


def test_ijb_without_1n_files_resamples_templates_and_a_wrong_label_is_one_line(synthetic_ijb, tmp_path):
    import shutil

    from tests.eval.ijb_synthetic import align_for_tests

    root = tmp_path / "IJBC"
    shutil.copytree(synthetic_ijb / "meta", root / "meta")
    (root / "loose_crop").symlink_to(synthetic_ijb / "loose_crop")
    pairs_file = root / "meta" / "ijbc_template_pair_label.txt"
    lines = pairs_file.read_text().splitlines()
    a, b, label = lines[0].split()
    pairs_file.write_text("\n".join([f"{a} {b} {1 - int(label)}", *lines[1:]]) + "\n")
    with pytest.raises(DataFormatError, match=f"pair {a} {b} is labelled {1 - int(label)} but its templates' "
                       "subjects say otherwise"):
        C.score_sets(ProjectionEmbedder(), [("ijbc", root)], align=align_for_tests, progress=False)
    pairs_file.write_text("\n".join(lines) + "\n")
    for f in (root / "meta").glob("*1N*"):
        f.unlink()
    with pytest.warns(UserWarning, match="1:N identification skipped"):
        (s,) = C.score_sets(ProjectionEmbedder(), [("ijbc", root)], align=align_for_tests, progress=False)
    assert s.kind == "ijb" and s.unit == "templates" and s.n_identities == 120  # 40 subjects x 3 templates
    assert C.bootstrap_subjects(s, 0.05, replicates=20).unit == "templates"
