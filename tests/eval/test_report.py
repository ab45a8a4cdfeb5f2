"""Reports render: JSON with every number (NaN as null), Markdown tables, non-empty PNGs, atomic writes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from facebce.data.synthetic import SyntheticFaces, make_pairs
from facebce.data.verification_bin import save_bin
from facebce.eval.report import to_markdown, write_report
from facebce.eval.runner import evaluate
from facebce.eval.uniform import uniform_accuracy
from tests.eval.fakes import ProjectionEmbedder
from tests.eval.ijb_synthetic import align_for_tests

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory, synthetic_ijb):
    root = tmp_path_factory.mktemp("report")
    (root / "protocols").mkdir()
    for name, seed in (("set_a", 1), ("set_b", 2)):
        images, issame = make_pairs(SyntheticFaces(10, 4, seed=seed, difficulty=0.4), 40, seed=seed)
        save_bin(root / f"{name}.bin", images, issame)
        (root / "protocols" / f"{name}.yaml").write_text(f"name: {name}\nkind: pairs_bin\nfile: {name}.bin\n")
    scores, labels = _uniform_inputs()
    with pytest.warns(UserWarning, match="sizes differ"):
        return evaluate(ProjectionEmbedder(), [("set_a", root / "set_a.bin"), ("set_b", root / "set_b.bin"),
                                               ("ijbc", synthetic_ijb)],
                        protocol_paths=[root / "protocols"], bias=0.31, uniform=(scores, labels),
                        align=align_for_tests, progress=False)


def test_writes_every_file(report, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    written = write_report(report, tmp_path)
    assert set(written) == {"report.json", "report.md", "scores.npz", "roc.png", "accuracy_bars.png",
                            "hist_set_a.png", "hist_set_b.png"}
    for name in written:
        if name.endswith(".png"):
            data = (tmp_path / name).read_bytes()
            assert data.startswith(PNG) and len(data) > 5000, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*written, "keep.txt"])  # no temp folder left
    write_report(report, tmp_path)  # a second write replaces the files
    with np.load(tmp_path / "scores.npz") as z:
        np.testing.assert_array_equal(z["set_a.scores"], report.set("set_a").scores)


def test_inference_line_says_how_the_model_ran(report):
    from dataclasses import replace

    assert report.inference is None and "- inference:" not in to_markdown(report)  # a Python embedder
    ran = replace(report, inference="2 sessions x 1 thread (measured 92.0 model calls/s vs 1 session x 2 threads 70.1)")
    assert "\n- inference: 2 sessions x 1 thread (measured 92.0 model calls/s" in to_markdown(ran)


def test_json_has_every_number_and_no_nan(report, tmp_path):
    write_report(report, tmp_path)
    text = (tmp_path / "report.json").read_text()
    d = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    s, r = d["sets"][0], report.sets[0]
    assert s["name"] == "set_a" and s["ten_fold"]["accuracy"] == r.ten_fold.accuracy
    assert s["ten_fold"]["fold_accuracies"] == r.ten_fold.fold_accuracies.tolist()
    assert len(s["ten_fold"]["tpr"]) == len(s["ten_fold"]["roc_thresholds"]) == 400
    assert s["best"]["threshold"] == r.best.threshold and s["at_global"]["accuracy"] == r.at_global.accuracy
    assert s["tar_at_far"]["tar"][0] is None  # FAR 1e-6 with 20 impostors: NaN -> null
    assert d["threshold"] == {"source": "fit:union", "value": report.threshold.value,
                              "fitted_on": ["set_a", "set_b"], "fitted_accuracy": report.threshold.fitted_accuracy}
    ijb = d["ijb"][0]
    assert ijb["name"] == "ijbc" and ijb["tar_at_far_parity"]["mode"] == "insightface"
    assert set(ijb["identification"]["galleries"]) == {"G1", "G2"} and "scores" not in ijb
    assert d["uniform"]["uniform"]["accuracy"] == report.uniform.uniform.accuracy
    assert d["uniform"]["gap"] == pytest.approx(0.31 - report.uniform.uniform.threshold)


def test_markdown_tables(report):
    md = to_markdown(report)
    t = report.threshold
    assert f"global threshold: **{t.value:.4f}** from `fit:union`" in md
    assert "TAR@FAR mode: conservative; flip: flip-sum" in md and "- model: ProjectionEmbedder" in md
    for s in report.sets:
        row = (f"| {s.name} | 40 | {100 * s.ten_fold.accuracy:.2f} ± {100 * s.ten_fold.std:.2f} |")
        assert row in md
        assert f"| {100 * s.best.accuracy:.2f} | {s.best.threshold:.4f} | {100 * s.at_global.accuracy:.2f} |" in md
    assert "## ijbc (1:1)" in md and "| insightface (eval_ijbc.py) |" in md and "## ijbc (1:N, open set)" in md
    assert "| G1 | 40 | 40 |" in md
    u = uniform_accuracy(*_uniform_inputs())
    assert "## Uniform classification" in md and f"| {u.threshold:.4f} |" in md


def _uniform_inputs():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, 200)
    scores = rng.normal(0, 0.2, (200, 8))
    scores[np.arange(200), labels] += 0.6
    return scores, labels


def test_open_set_section_json_and_plots(labelled_folder, tmp_path):
    report = evaluate(ProjectionEmbedder(), [("open_set_folder", labelled_folder)], threshold="fixed:0.8",
                      progress=False)
    o = report.open_set[0]
    written = write_report(report, tmp_path)
    assert set(written) == {"report.json", "report.md", "scores.npz", "dir_fpir_open_set_folder.png",
                            "hist_open_set_folder.png"}
    for name in ("dir_fpir_open_set_folder.png", "hist_open_set_folder.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    d = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"constant {c}"))
    j = d["open_set"][0]
    assert d["sets"] == [] and j["name"] == "open_set_folder" and "probes" not in j and "curve" not in j
    assert (j["n_gallery_images"], j["n_mated"], j["n_non_mated"], j["n_enrolled_identities"]) == (8, 32, 20, 8)
    assert j["unknown_identities"] == list(o.unknown_identities) and j["seed"] == 0
    r = o.identification
    assert j["identification"]["cmc"] == {"1": r.cmc[1], "5": r.cmc[5]}
    assert j["identification"]["tpir"] == r.tpir.tolist() and j["identification"]["thresholds"] == r.thresholds.tolist()
    assert j["identification"]["fpir_targets"] == [1e-3, 1e-2, 1e-1]
    assert j["at_global"] == {"threshold": 0.8, "tpir": o.at_global.tpir, "fpir": o.at_global.fpir}
    with np.load(tmp_path / "scores.npz") as z:
        np.testing.assert_array_equal(z["open_set_folder.non_mated_max"], o.probes.non_mated_max)
        np.testing.assert_array_equal(z["open_set_folder.curve_dir"], o.curve.dir)
    md = (tmp_path / "report.md").read_text()
    assert md == to_markdown(report) and "## open_set_folder (1:N, open set)" in md
    assert ("60 images of 12 identities: 8 enrolled (8 gallery images, first 1 per identity), 4 never enrolled "
            "(unknown_fraction 0.3, seed 0); 32 mated probes, 20 non-mated probes.") in md
    assert f"| CMC % | {100 * r.cmc[1]:.2f} | {100 * r.cmc[5]:.2f} |" in md
    assert (f"| FPIR target 1e-02 (unresolved) | {r.thresholds[1]:.4f} | {100 * r.tpir[1]:.2f} "
            f"| {100 * r.fpir[1]:.3f} |") in md
    assert f"| FPIR target 1e-01 | {r.thresholds[2]:.4f} |" in md and r.fpir[2] == 0.05  # 20 probes: 1 alarm
    assert (f"| **global** `fixed:0.8` | 0.8000 | {100 * o.at_global.tpir:.2f} | {100 * o.at_global.fpir:.3f} |"
            in md)


def test_val_parity_in_json_and_markdown(report, tmp_path):
    """Defect 6: insightface's VAL@FAR beside facebce's, in report.json and report.md."""
    write_report(report, tmp_path)
    d = json.loads((tmp_path / "report.json").read_text())
    for s, r in zip(d["sets"], report.sets):
        p = r.ten_fold.parity
        assert s["ten_fold"]["parity"] == {"rule": "insightface", "val": p.val, "val_std": p.val_std, "far": p.far}
    md = (tmp_path / "report.md").read_text()
    assert "| VAL@FAR=1e-3 % | VAL@FAR (insightface rule) % |" in md
    for r in report.sets:
        tf = r.ten_fold
        assert (f"(FAR {100 * tf.far:.3f} %) | {100 * tf.parity.val:.2f} ± {100 * tf.parity.val_std:.2f} "
                f"(FAR {100 * tf.parity.far:.3f} %) | " in md)


def test_out_naming_an_existing_file_is_one_line_before_any_work(tmp_path, capsys):
    """Today: FileExistsError traceback from mkdir, after every set was embedded."""
    from facebce.cli import main
    from facebce.errors import FacebceError

    images, issame = make_pairs(SyntheticFaces(10, 4, seed=1, difficulty=0.4), 40, seed=1)
    save_bin(tmp_path / "s.bin", images, issame)
    (tmp_path / "taken").write_text("a file")
    spy = ProjectionEmbedder()
    for out in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        with pytest.raises(FacebceError, match=r"taken: exists and is not a folder") as e:
            evaluate(spy, [("custom_bin", tmp_path / "s.bin")], out_dir=out, progress=False)
        assert "\n" not in str(e.value)
    assert spy.calls == 0 and (tmp_path / "taken").read_text() == "a file"
    with pytest.raises(FacebceError, match=r"taken: exists and is not a folder"):
        write_report(report_of(spy, tmp_path / "s.bin"), tmp_path / "taken")
    onnx_path = _tiny_onnx(tmp_path / "m.onnx")
    assert main(["eval", onnx_path, f"custom_bin={tmp_path / 's.bin'}", "--out", str(tmp_path / "taken")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("facebce: error: ") and "exists and is not a folder" in err and "\n" not in err


def report_of(embedder, path):
    return evaluate(embedder, [("custom_bin", path)], progress=False)


def _tiny_onnx(path) -> str:
    import onnx
    from onnx import TensorProto, helper
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["g"]), helper.make_node("Flatten", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return str(path)


@pytest.mark.parametrize("pairs", [0, 1, 9])
def test_bin_too_small_for_ten_folds_names_the_set_and_the_size(tmp_path, pairs, capsys):
    """Today: 'distances: 9 pairs cannot make 10 folds' without the set, after embedding everything."""
    from facebce.cli import main
    from facebce.errors import DataFormatError

    images, issame = make_pairs(SyntheticFaces(10, 4, seed=1, difficulty=0.4), 40, seed=1)
    save_bin(tmp_path / "small.bin", images[: 2 * pairs], issame[:pairs])
    spy = ProjectionEmbedder()
    with pytest.raises(DataFormatError) as e:
        evaluate(spy, [("custom_bin", tmp_path / "small.bin")], threshold="fixed:0.3", progress=False)
    text = str(e.value)
    assert text.startswith(f"custom_bin ({tmp_path / 'small.bin'}): {pairs} pairs, but 10-fold verification "
                           "needs at least 10 pairs") and "\n" not in text
    assert spy.calls == 0
    assert main(["eval", _tiny_onnx(tmp_path / "m.onnx"), f"custom_bin={tmp_path / 'small.bin'}"]) == 1
    assert "needs at least 10 pairs" in capsys.readouterr().err
