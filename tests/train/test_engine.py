"""A few CPU steps on tiny synthetic data: outputs, exact resume, crash safety, NaN stop."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from facebce.errors import FacebceError
from facebce.train import Callback, Trainer, TrainingDiverged, load_checkpoint, train, train_from_recipe
from facebce.train.checkpoint import latest_checkpoint, list_checkpoints
from tests.train.helpers import tiny, tiny_config

REPO = Path(__file__).resolve().parents[2]


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class StopAt(Callback):
    """Simulates an interruption: raises when step `n` is done, before that step's checkpoint."""

    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, trainer):
        if trainer.step == self.n:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 4-step run (checkpoints at 2 and 4)."""
    run = tmp_path_factory.mktemp("ref")
    result = train(tiny_config(run))
    return run, result


def test_run_writes_checkpoints_metrics_and_config(reference):
    run, result = reference
    assert result.steps == 4 and result.checkpoint == run / "checkpoints" / "step_00000004.pt"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002.pt", "step_00000004.pt"]
    ck = load_checkpoint(result.checkpoint)  # weights_only=True
    assert ck["step"] == 4 and ck["head"]["weight"].shape == (12, 16) and ck["world_size"] == 1
    assert set(ck["optimizer"]) >= {"head.weight", "head.bias"}
    assert "momentum_buffer" in ck["optimizer"]["head.weight"]
    assert (run / "config.yaml").is_file() and (run / "backbone.pth").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 for r in rows)
    assert rows[0]["lr"] == pytest.approx(0.05)  # warmup of one step reaches the base lr
    assert rows[-1]["lr"] == pytest.approx(0.05 * (1 - 2 / 3) ** 2)  # poly decay, power 2
    assert abs(rows[-1]["threshold"] - result.threshold) < 1e-6
    assert rows[-1]["bias"] == pytest.approx(64 * result.threshold)
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:7] == ["step", "epoch", "loss", "lr", "samples_per_s", "threshold", "bias"]


def test_weight_decay_spares_biases_and_threshold(reference, tmp_path):
    trainer = Trainer(tiny_config(tmp_path))
    try:
        decay, no_decay = trainer.optimizer.param_groups
        assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
        assert any(p is trainer.head.head.bias for p in no_decay["params"])
        assert any(p is trainer.head.head.weight for p in decay["params"])
        assert all(p.dim() <= 1 for p in no_decay["params"]) and all(p.dim() > 1 for p in decay["params"])
    finally:
        trainer.close()


def test_resume_is_bit_exact(reference, tmp_path):
    run, _ = reference
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path), callbacks=[StopAt(3)])  # dies after step 3; newest checkpoint: step 2
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002.pt"]
    result = train(tiny_config(tmp_path), resume=True)
    assert result.steps == 4
    a = load_checkpoint(run / "checkpoints" / "step_00000004.pt")
    b = load_checkpoint(tmp_path / "checkpoints" / "step_00000004.pt")
    assert states_equal(a["backbone"], b["backbone"])
    assert states_equal(a["head"], b["head"])
    for name in a["optimizer"]:
        assert states_equal(a["optimizer"][name], b["optimizer"][name]), name
    assert (a["epoch"], a["epoch_samples"]) == (b["epoch"], b["epoch_samples"])
    # metrics: the interrupted run's step 3 record is replaced, not duplicated
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FacebceError, match="no loadable checkpoint"):
        train(tiny_config(tmp_path), resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, checkpoint={"every_steps": 1}))
    forward = trainer.head.forward

    def poisoned(z, y):
        out = forward(z, y)
        if trainer.step == 2:  # computing step 3
            out.loss = out.loss * float("nan")
        return out

    trainer.head.forward = poisoned
    try:
        with pytest.raises(TrainingDiverged, match=r"at step 3: loss is nan.*step_00000002\.pt"):
            trainer.fit()
    finally:
        trainer.close()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000001.pt", "step_00000002.pt"]
    assert torch.isfinite(load_checkpoint(tmp_path / "checkpoints" / "step_00000002.pt")["head"]["weight"]).all()
    assert not (tmp_path / "backbone.pth").exists()


_KILL_SCRIPT = r"""
import io, sys, time, torch
import facebce.train.checkpoint as ck
from facebce.train import train
from tests.train.helpers import tiny_config
run = sys.argv[1]
real_save = torch.save
def slow_save(obj, f):
    if obj.get("step") == 2:
        buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
        f.write(data[: len(data) // 2]); f.flush()
        open(run + "/WRITING", "w").close()
        time.sleep(120)
    real_save(obj, f)
ck.torch.save = slow_save
train(tiny_config(__import__("pathlib").Path(run), steps=3, checkpoint={"every_steps": 1}))
"""


def test_kill_9_during_checkpoint_keeps_previous_loadable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "WRITING").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the training subprocess never reached the step-2 checkpoint"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckdir = tmp_path / "checkpoints"
    assert any(p.name.endswith(".tmp") for p in ckdir.iterdir())  # the half-written temp file is left over...
    assert [p.name for p in list_checkpoints(ckdir)] == ["step_00000001.pt"]  # ...but never under a checkpoint name
    path, state = latest_checkpoint(ckdir)
    assert state["step"] == 1
    result = train(tiny_config(tmp_path, steps=3, checkpoint={"every_steps": 1}), resume=True)
    assert result.steps == 3


def test_init_backbone_and_freeze(reference, tmp_path):
    run, _ = reference
    cfg = tiny_config(tmp_path, steps=2, model={"init_backbone": str(run / "backbone.pth"), "freeze_backbone_steps": 2},
                      checkpoint={"every_steps": 0})
    result = train(cfg)
    before = torch.load(run / "backbone.pth", weights_only=True)
    after = torch.load(tmp_path / "backbone.pth", weights_only=True)
    assert states_equal(before, after)  # frozen for both steps: weights and BN statistics untouched
    assert result.threshold is not None
    # a facebce training checkpoint also works as --init-backbone
    cfg2 = tiny_config(tmp_path / "b", steps=1, model={"init_backbone": str(run / "checkpoints" / "step_00000004.pt")})
    train(cfg2)


def test_train_from_recipe_with_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    import yaml
    recipe.write_text(yaml.safe_dump(tiny(tmp_path / "unused")))
    result = train_from_recipe(recipe, ["steps=1", "head.name=softmax_norm", "head.margin=arcface"],
                               out_dir=tmp_path / "run")
    assert result.steps == 1 and result.threshold is None
    assert (tmp_path / "run" / "checkpoints" / "step_00000001.pt").is_file()


def test_fresh_run_refuses_a_folder_with_checkpoints(reference):
    run, _ = reference
    with pytest.raises(FacebceError, match="already has checkpoints.*--resume"):
        Trainer(tiny_config(run))


def test_bf16_channels_last_and_grad_accum(tmp_path):
    result = train(tiny_config(tmp_path, steps=1, amp="bf16", channels_last=True,
                               optim={"grad_accum": 2}, checkpoint={"every_steps": 0}))
    ck = load_checkpoint(result.checkpoint)
    assert ck["epoch_samples"] == 2 * 4  # two micro-batches of 4 per optimizer step
    assert torch.isfinite(ck["head"]["weight"]).all()
    assert all(v.dtype != torch.bfloat16 for v in ck["backbone"].values())


@pytest.mark.parametrize("head, learned, every", [("bce_u_norm", True, 1), ("softmax_norm", False, 0)])
def test_verification_metrics(tmp_path, head, learned, every):
    cfg = tiny_config(tmp_path, steps=2, head={"name": head},
                      data={"synthetic": {"heldout_identities": 4, "heldout_images": 2, "heldout_pairs": 20}},
                      verification={"every_steps": every, "batch_size": 16}, checkpoint={"every_steps": 0})
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # end-of-training verification joins the last step's row
    verified = rows if every else rows[-1:]
    assert ("heldout/acc" in rows[0]) == bool(every)
    assert all(0.0 <= r["heldout/acc"] <= 1.0 and 0.0 <= r["heldout/best_acc"] <= 1.0 for r in verified)
    assert all(("heldout/learned_acc" in r) == learned for r in verified)
    assert set(result.verification["heldout"]) >= {"acc", "acc_std", "best_acc", "best_threshold"}
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "heldout/acc" in header and "heldout/learned_acc" in header


def test_dataloader_workers_do_not_change_the_run(tmp_path):
    a = train(tiny_config(tmp_path / "w0", steps=2, checkpoint={"every_steps": 0}))
    b = train(tiny_config(tmp_path / "w2", steps=2, data={"num_workers": 2}, checkpoint={"every_steps": 0}))
    assert states_equal(load_checkpoint(a.checkpoint)["backbone"], load_checkpoint(b.checkpoint)["backbone"])


@pytest.mark.slow
def test_torch_compile_runs(tmp_path):  # ~2 minutes of compilation on 2 CPU cores
    result = train(tiny_config(tmp_path, steps=2, compile=True, checkpoint={"every_steps": 0}))
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.loss))


def test_missing_verification_bin_is_a_config_error(tmp_path):
    from facebce.errors import ConfigError
    with pytest.raises(ConfigError, match=r"^verification.bins: .*nope.bin"):
        Trainer(tiny_config(tmp_path, verification={"bins": [str(tmp_path / "nope.bin")]}))


def test_bad_data_fails_before_any_run_folder_is_made(tmp_path):
    """A recipe whose data does not load (or whose .bin is missing) stops with one error and leaves
    no run folder behind."""
    from facebce.errors import ConfigError
    run_dir = tmp_path / "run"
    bad = tmp_path / "not_a_rec"
    bad.mkdir()
    with pytest.raises(FacebceError):
        Trainer(tiny_config(run_dir, data={"kind": "rec", "path": str(bad), "batch_size": 4, "num_workers": 0}))
    with pytest.raises(ConfigError, match="nope.bin"):
        Trainer(tiny_config(run_dir, verification={"bins": [str(tmp_path / "nope.bin")]}))
    assert not run_dir.exists()


# ------------------------------------------------------------------ damaged newest checkpoint on --resume

class _Evil:
    """Pickles as a call of os.system: what a malicious checkpoint holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _damaged_run(reference, tmp_path, how: str) -> Path:
    import shutil
    run, _ = reference
    shutil.copytree(run, tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "step_00000004.pt"
    if how == "truncated":
        newest.write_bytes(newest.read_bytes()[:5000])
    else:
        torch.save({"format": "facebce-train-checkpoint", "x": _Evil(tmp_path / "PWNED")}, newest)
    return tmp_path / "run"


@pytest.mark.parametrize("how, why", [("truncated", "checkpoint is truncated or not a torch file"),
                                      ("malicious", "not a weights-only checkpoint: it contains posix.system")])
def test_resume_refuses_a_damaged_newest_checkpoint(reference, tmp_path, how, why):
    run = _damaged_run(reference, tmp_path, how)
    with pytest.raises(FacebceError) as info:
        train(tiny_config(run), resume=True)
    msg = str(info.value)
    assert "\n" not in msg and f"{run / 'checkpoints' / 'step_00000004.pt'}: {why}" in msg
    assert msg.endswith("not resuming from an older one silently (1 older in "
                        f"{run / 'checkpoints'}): remove it or pass --resume-older")
    assert not (tmp_path / "PWNED").exists()


def test_resume_older_says_what_it_skipped(reference, tmp_path, capsys):
    run = _damaged_run(reference, tmp_path, "malicious")
    capsys.readouterr()
    result = train(tiny_config(run), resume=True, resume_older=True)
    err = capsys.readouterr().err
    assert result.steps == 4 and not (tmp_path / "PWNED").exists()
    assert err.splitlines() == [f"facebce: skipped checkpoint {run / 'checkpoints' / 'step_00000004.pt'}: not a "
                                "weights-only checkpoint: it contains posix.system (refused; nothing was executed); "
                                "resuming from step_00000002.pt"]
    assert load_checkpoint(run / "checkpoints" / "step_00000004.pt")["step"] == 4  # rewritten by the resumed run


def test_cli_resume_error_is_one_line_and_verbose_shows_detail(reference, tmp_path, capsys):
    import yaml

    from facebce.cli import main
    run = _damaged_run(reference, tmp_path, "truncated")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny(run)))
    capsys.readouterr()
    assert main(["train", str(recipe), "--resume"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("facebce: error: --resume: newest checkpoint refused: ")
    assert "Weights only load failed" not in err and "Traceback" not in err
    assert main(["--verbose", "train", str(recipe), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("facebce: error: --resume")
