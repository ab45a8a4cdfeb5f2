"""The CLI is a thin shell: subcommands exist, bad input exits non-zero with one line on stderr."""
import subprocess
import sys

import pytest

from facebce.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "facebce.cli", *args], capture_output=True, text=True)


def test_help_lists_every_subcommand():
    out = run("--help")
    assert out.returncode == 0
    for name in ["data", "models", "train", "eval", "export", "gallery", "align"]:
        assert name in out.stdout


def test_models_lists_manifest_sizes(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "r50    IResNet          43,590,848" in out
    assert "mbf    MobileFaceNet     2,059,520" in out


def test_data_round_trip_through_cli(tmp_path, capsys):
    assert main(["data", "synth", str(tmp_path / "s"), "--identities", "3", "--images", "2", "--rec"]) == 0
    assert main(["data", "inspect", str(tmp_path / "s" / "rec")]) == 0
    assert "6 images, 3 classes" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["data", "inspect", "/nonexistent/x.bin"], "/nonexistent/x.bin: no such file"),
    (["data", "synth", "OUT", "--identities", "0"], "num_identities=0"),
])
def test_bad_input_one_line_error(argv, message, tmp_path, capsys):
    argv = [a.replace("OUT", str(tmp_path / "o")) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("facebce: error: ") and message in err and "\n" not in err


def test_eval_pth_then_rescore_from_cache(tmp_path, capsys):
    import json

    import torch

    from facebce.data.tools import synthesize
    from facebce.models import build_backbone
    synthesize(tmp_path / "s", identities=6, images=3, pairs=40)
    torch.manual_seed(0)
    torch.save(build_backbone("mbf").state_dict(), tmp_path / "mbf.pth")
    bin_arg = f"custom={tmp_path / 's' / 'pairs.bin'}"
    argv = [str(tmp_path / "mbf.pth"), bin_arg, "--arch", "mbf", "--cache", str(tmp_path / "c"),
            "--threshold", "fixed:0.5", "--out", str(tmp_path / "r")]
    assert main(["eval", *argv]) == 1  # 'custom' is not a pairs .bin protocol name
    assert "custom" in capsys.readouterr().err
    argv[1] = bin_arg.replace("custom=", "lfw=")
    argv.insert(2, f"open_set_folder={tmp_path / 's' / 'images'}")  # 6 identities x 3 images: 2 never enrolled
    assert main(["eval", *argv]) == 0
    first = json.loads((tmp_path / "r" / "report.json").read_text())
    out = capsys.readouterr().out
    assert "| lfw | 40 |" in out and "fixed:0.5" in out and "## open_set_folder (1:N, open set)" in out
    assert [first["open_set"][0][k] for k in ("n_gallery_images", "n_mated", "n_non_mated")] == [4, 8, 6]
    assert (tmp_path / "r" / "dir_fpir_open_set_folder.png").is_file()
    name = out.split("--model-name ")[1].split()[0]
    assert main(["eval", "-", *argv[1:3], "--cache", str(tmp_path / "c"), "--model-name", name,
                 "--threshold", "fixed:0.5", "--out", str(tmp_path / "r2")]) == 0
    second = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert second["sets"] == first["sets"] and second["open_set"] == first["open_set"]
    assert main(["eval", "-", argv[2], "--cache", str(tmp_path / "c"), "--model-name", name]) == 1
    assert "needs a pairs set to fit on" in capsys.readouterr().err  # fit:union on an open-set set alone


def test_export_then_gallery_build_search_remove(tmp_path, capsys):
    import torch

    from facebce.data.synthetic import SyntheticFaces, write_image_folder
    from facebce.models import build_backbone
    torch.manual_seed(0)
    torch.save(build_backbone("mbf").state_dict(), tmp_path / "mbf.pth")
    onnx_path = tmp_path / "mbf.onnx"
    assert main(["export", str(tmp_path / "mbf.pth"), str(onnx_path), "--arch", "mbf", "--threshold", "0.25"]) == 0
    assert "min cosine vs PyTorch 0.99999" in capsys.readouterr().out
    write_image_folder(SyntheticFaces(3, 2, seed=5), tmp_path / "faces")
    g = str(tmp_path / "g.faiss")
    assert main(["gallery", "build", g, str(tmp_path / "faces"), "--model", str(onnx_path)]) == 0
    assert "enrolled 6 images of 3 identities" in capsys.readouterr().out
    assert main(["gallery", "info", g]) == 0
    assert "threshold: 0.25" in capsys.readouterr().out  # taken from the exported model's metadata
    probe = str(tmp_path / "faces" / "id_0001" / "0000.jpg")
    assert main(["gallery", "search", g, probe, "--model", str(onnx_path), "-k", "1"]) == 0
    assert "id_0001 1.000" in capsys.readouterr().out  # the enrolled image itself
    assert main(["gallery", "remove", g, "--identity", "id_0001"]) == 0
    assert "removed 2 entries; 4 remain" in capsys.readouterr().out
    assert main(["gallery", "build", g, str(tmp_path / "faces"), "--model", str(onnx_path)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_align_reports_every_photo(tmp_path, shared_data, capsys):
    import cv2
    import numpy as np
    src = tmp_path / "raw" / "a"
    src.mkdir(parents=True)
    canvas = np.full((300, 400, 3), 90, np.uint8)
    canvas[80:192, 140:252] = cv2.imread(str(next((shared_data / "lfw_aligned_10plus" / "Abdullah_Gul").glob("*.jpg"))))
    cv2.imwrite(str(src / "photo.jpg"), canvas)
    cv2.imwrite(str(src / "blank.jpg"), np.zeros((200, 200, 3), np.uint8))
    (src / "broken.jpg").write_bytes(b"xx")
    assert main(["align", str(tmp_path / "raw"), str(tmp_path / "out"), "--detector",
                 str(shared_data / "models" / "scrfd_2.5g_bnkps.onnx")]) == 0
    assert "no_face 1, ok 1, unreadable 1" in capsys.readouterr().out
    assert cv2.imread(str(tmp_path / "out" / "a" / "photo.jpg")).shape == (112, 112, 3)


def test_train_then_eval_export_gallery_from_the_run_folder(tmp_path, capsys):
    """The deployment path on one tiny run: train -> eval (learned threshold) -> export -> gallery."""
    import json

    import yaml

    from facebce.data.tools import synthesize
    synthesize(tmp_path / "s", identities=4, images=2, pairs=20)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "steps": 3, "seed": 1, "num_threads": 1, "model": {"arch": "mbf", "embedding_size": 16},
        "data": {"kind": "synthetic", "batch_size": 4, "num_workers": 0,
                 "synthetic": {"identities": 6, "images": 2}},
        "head": {"name": "bce_u_norm"}, "optim": {"lr": 0.05, "warmup_steps": 1},
        "verification": {"every_steps": 0}, "log": {"every_steps": 1, "progress": False, "tensorboard": False}}))
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), "--set", "optim.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "learned threshold" in out
    card = json.loads((run / "model.json").read_text())
    assert card["arch"] == "mbf" and card["head"] == "bce_u_norm" and card["threshold"] is not None

    assert main(["eval", str(run), f"custom_bin={tmp_path / 's' / 'pairs.bin'}", "--threshold", "bias",
                 "--out", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["threshold"]["value"] == pytest.approx(card["threshold"])

    # the head's b/γ is recorded as what it is (a class-centre threshold), never as the pair threshold
    assert main(["export", str(run), str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert f"head bce_u_norm, bias {card['bias']:.4f})" in out
    assert f"learned_threshold {card['threshold']:.4f} (the head's b/γ" in out and "no pair threshold recorded" in out
    from facebce.models.embedder import OnnxEmbedder
    emb = OnnxEmbedder(tmp_path / "m.onnx")
    assert emb.threshold is None and emb.learned_threshold == pytest.approx(card["threshold"])
    assert emb.metadata["learned_threshold_kind"] == "class_centre" and "threshold_source" not in emb.metadata
    # a pair threshold is recorded only when given, with its source
    assert main(["export", "--threshold", "0.43", str(run), str(tmp_path / "m.onnx")]) == 0
    assert "threshold 0.4300 (pair threshold, user)" in capsys.readouterr().out
    emb = OnnxEmbedder(tmp_path / "m.onnx")
    assert emb.threshold == 0.43 and emb.metadata["threshold_source"] == "user"
    assert emb.learned_threshold == pytest.approx(card["threshold"])
    g = str(tmp_path / "g.faiss")
    assert main(["gallery", "build", g, str(tmp_path / "s" / "images"), "--model", str(tmp_path / "m.onnx")]) == 0
    assert main(["gallery", "info", g]) == 0
    assert "threshold: 0.43" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# issue 12 defect 3: options before, between and after PROTOCOL=PATH arguments


@pytest.mark.parametrize("argv", [
    ["eval", "M.onnx", "--arch", "r50", "custom_bin=x.bin"],  # was: "unrecognized arguments: custom_bin=x.bin"
    ["eval", "--arch", "r50", "M.onnx", "custom_bin=x.bin"],
    ["eval", "M.onnx", "custom_bin=x.bin", "--arch", "r50"],
    ["eval", "M.onnx", "lfw=a.bin", "--arch", "r50", "custom_bin=x.bin", "--no-flip"],
])
def test_eval_options_intermix_with_sets(argv):
    from facebce.cli import build_parser
    args = build_parser().parse_args(argv)
    assert (args.model, args.arch) == ("M.onnx", "r50")
    assert args.sets in (["custom_bin=x.bin"], ["lfw=a.bin", "custom_bin=x.bin"])


def test_every_subcommand_intermixes():
    from facebce.cli import build_parser
    p = build_parser()
    g = p.parse_args(["gallery", "build", "g.faiss", "--model", "m.onnx", "a", "--index", "hnsw", "b"])
    assert (g.gallery, g.inputs, g.model, g.index) == ("g.faiss", ["a", "b"], "m.onnx", "hnsw")
    x = p.parse_args(["export", "--threshold", "0.4", "run", "--variants", "fp16", "m.onnx"])
    assert (x.model, x.out, x.threshold, x.variants) == ("run", "m.onnx", "0.4", "fp16")
    t = p.parse_args(["train", "--set", "steps=2", "demo_synthetic", "--set", "seed=1"])
    assert (t.recipe, t.set) == ("demo_synthetic", ["steps=2", "seed=1"])
    assert p.parse_args(["eval", "--list"]).list and p.parse_args(["eval", "--list"]).model == "-"


# ---------------------------------------------------------------------------------------------
# issue 12: shipped recipes by name, `base:` beside the recipe else shipped


def test_train_list_names_the_shipped_recipes(capsys):
    assert main(["train", "--list"]) == 0
    out = capsys.readouterr().out
    assert "  demo_synthetic\n" in out and "  base\n" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "no_such_recipe"], "recipe: no_such_recipe: no such file, nor a shipped recipe (shipped: base, "),
    (["train"], "train: give a recipe file or a shipped recipe's name"),
    (["export", "R", "m.onnx", "--threshold", "high"], "--threshold 'high': expected a cosine in [-1, 1]"),
])
def test_train_and_export_one_line_errors(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("facebce: error: ") and message in err and "\n" not in err
