"""The model card (model.json): one typed, versioned record, read and written by one function each.

A run folder is untrusted input: every field of its card is validated and a bad one is one ModelError
line naming model.json and the field; evaluation reads the learned threshold from it without the CLI."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from facebce.cli import main
from facebce.errors import FacebceError, ModelError
from facebce.eval.model_loading import ModelSpec, load_classifier
from facebce.eval.runner import evaluate
from facebce.models import build_backbone, load_insightface_weights
from facebce.models.card import CARD_VERSION, MODEL_CARD, ModelCard, read_model_card, write_model_card

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# What facebce wrote before the card had a version (train/callbacks.py model_card() until this change).
OLD_CARD = {"format": "facebce-model", "arch": "mbf", "embedding_size": 16, "options": {},
            "head": "bce_u_norm", "bias": -9.6, "threshold": 0.3, "steps": 3, "weights": "backbone.pth",
            "scores": "cosine", "num_classes": 4, "centres": "centres.pth", "class_thresholds": None}


def _run_folder(path, card: dict | ModelCard = OLD_CARD, *, centres: bool = True):
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(build_backbone("mbf", embedding_size=16).state_dict(), path / "backbone.pth")
    if centres:
        torch.save(torch.randn(4, 16), path / "centres.pth")
    if isinstance(card, ModelCard):
        write_model_card(path, card)
    else:
        (path / MODEL_CARD).write_text(json.dumps(card))
    return path


def test_old_unversioned_cards_still_load(tmp_path):
    card = read_model_card(_run_folder(tmp_path / "run"))
    assert card == ModelCard(**{k: v for k, v in OLD_CARD.items() if k != "format"})
    assert card.version == CARD_VERSION and card.threshold == 0.3 and card.options == {}


def test_write_then_read_round_trips_atomically(tmp_path):
    card = ModelCard(arch="mbf", embedding_size=16, options={"scale": 1, "blocks": [1, 2, 2, 1]}, head="bce_u_norm",
                     bias=-3.5, threshold=0.11, steps=7, scores="linear", num_classes=4, centres="centres.pth")
    path = write_model_card(tmp_path, card)
    assert path == tmp_path / MODEL_CARD and read_model_card(tmp_path) == card
    data = json.loads(path.read_text())
    assert data["format"] == "facebce-model" and data["version"] == CARD_VERSION
    assert not [p for p in os.listdir(tmp_path) if p != MODEL_CARD]  # no temp file left behind
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # normal permissions, not the temp file's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


BAD_FIELDS = [
    ({"options": "scale=1"}, "options"),
    ({"embedding_size": None}, "embedding_size"),
    ({"weights": 7}, "weights"),
    ({"arch": ["mbf"]}, "arch"),
    ({"threshold": "abc"}, "threshold"),
    ({"bias": "1.0"}, "bias"),
    ({"weights": "../../etc/passwd"}, "weights"),
    ({"centres": "/etc/passwd"}, "centres"),
    ({"scores": "euclid"}, "scores"),
    ({"num_classes": -4}, "num_classes"),
    ({"embedding_size": True}, "embedding_size"),
    ({"version": 99}, "version"),
    ({"version": "2"}, "version"),
    ({"format": "something-else"}, "format"),
]


@pytest.mark.parametrize("change, field", BAD_FIELDS)
def test_every_field_is_validated_in_one_line(tmp_path, change, field):
    run = _run_folder(tmp_path / "run", {**OLD_CARD, **change})
    with pytest.raises(ModelError) as e:
        read_model_card(run)
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(run / MODEL_CARD)) and f": {field}: " in text


def test_missing_embedding_size_names_the_field(tmp_path):
    card = {k: v for k, v in OLD_CARD.items() if k != "embedding_size"}
    with pytest.raises(ModelError, match=r"model\.json: embedding_size: missing"):
        read_model_card(_run_folder(tmp_path / "run", card))


@pytest.mark.parametrize("text", ["{", "[1, 2]", '{"format": "facebce-model", "arch": "mbf", "embedding_size": NaN}',
                                  "\xff\xfe"])
def test_unreadable_cards_are_one_line(tmp_path, text):
    run = _run_folder(tmp_path / "run")
    (run / MODEL_CARD).write_bytes(text.encode("latin-1"))
    with pytest.raises(ModelError) as e:
        read_model_card(run)
    assert "\n" not in str(e.value) and MODEL_CARD in str(e.value)


@pytest.mark.parametrize("options, key", [({"scale": -1}, "scale"), ({"blocks": "abc"}, "blocks")])
def test_card_options_the_builder_refuses_name_model_json(tmp_path, options, key):
    """Today: a RuntimeError / TypeError traceback from inside the MobileFaceNet builder."""
    run = _run_folder(tmp_path / "run", {**OLD_CARD, "options": options})
    with pytest.raises(ModelError) as e:
        ModelSpec(run).backbone()
    assert "\n" not in str(e.value) and f"{MODEL_CARD}: arch/options" in str(e.value) and key in str(e.value)


def test_cli_eval_of_a_run_with_a_bad_card_is_one_line(tmp_path, capsys):
    run = _run_folder(tmp_path / "run", {**OLD_CARD, "options": "scale=1"})
    assert main(["eval", str(run), f"custom_bin={tmp_path / 'x.bin'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.json: options: expected an object" in err


def test_evaluate_threshold_bias_works_from_python(tmp_path):
    """Today: ConfigError "threshold 'bias' needs the learned threshold" unless the caller passes bias=."""
    from facebce.data.tools import synthesize
    synthesize(tmp_path / "s", identities=4, images=2, pairs=20)
    run = _run_folder(tmp_path / "run")
    report = evaluate(ModelSpec(run), [("custom_bin", tmp_path / "s" / "pairs.bin")], threshold="bias",
                      progress=False)
    assert report.threshold.source == "bias" and report.threshold.value == pytest.approx(0.3)
    assert report.bias == pytest.approx(0.3)
    explicit = evaluate(ModelSpec(run), [("custom_bin", tmp_path / "s" / "pairs.bin")], threshold="bias", bias=0.25,
                        progress=False)
    assert explicit.threshold.value == pytest.approx(0.25)  # an explicit bias= still wins


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("payload", ["malicious", "random"])
def test_bad_centres_pth_is_one_line_naming_it(tmp_path, payload):
    run = _run_folder(tmp_path / "run")
    if payload == "malicious":
        (run / "centres.pth").write_bytes(pickle.dumps(_Boom()))
    else:
        (run / "centres.pth").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(ModelError) as e:
        load_classifier(run)
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(run / "centres.pth"))
    if payload == "malicious":
        assert "not a weights-only" in text and "posix.system" in text


@pytest.mark.parametrize("payload", ["malicious", "random"])
def test_bad_weights_pth_is_one_line_naming_it(tmp_path, payload):
    path = tmp_path / "w.pth"
    path.write_bytes(pickle.dumps(_Boom()) if payload == "malicious" else np.random.default_rng(1).bytes(500))
    with pytest.raises(ModelError) as e:
        load_insightface_weights(build_backbone("mbf", embedding_size=16), path)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path))


def test_wrong_shape_weights_name_their_file(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(build_backbone("mbf", embedding_size=32).state_dict(), path)
    with pytest.raises(ModelError, match=rf"^{path}: .*does not fit|^{path} does not fit"):
        load_insightface_weights(build_backbone("mbf", embedding_size=16), path)
    state = torch.load(path, weights_only=True)
    with pytest.raises(ModelError, match=rf"^{path} does not fit"):
        load_insightface_weights(build_backbone("mbf", embedding_size=16), state, where=str(path))


def test_card_errors_are_facebce_errors():
    with pytest.raises(FacebceError):
        ModelCard(arch="mbf", embedding_size=-1)


@pytest.mark.parametrize("change", [{"embedding_size": 10**9}, {"options": {"scale": 10**5}}])
def test_card_cannot_make_facebce_allocate_more_than_the_weights_file_holds(tmp_path, change):
    run = _run_folder(tmp_path / "run", {**OLD_CARD, **change})
    with pytest.raises(ModelError, match=r"model\.json: arch/options: .* bytes, but backbone\.pth holds only"):
        ModelSpec(run).backbone()
