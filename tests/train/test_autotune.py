"""`amp: auto` / `channels_last: auto`: autotune.choose on a tiny model (a valid choice, the cosine gate, the
run's weights untouched) and through the Trainer (tuned once, recorded, applied; reused on resume; skipped
when a setting is given or the run is too short to pay for it). Speed is never asserted: timings are
whatever this machine gives."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch
import yaml
from torch import nn

from facebce.errors import ConfigError
from facebce.heads import PartialFC
from facebce.train import autotune, load_checkpoint, load_config, train
from facebce.train.config import TrainConfig
from tests.train.helpers import run_two_ranks, tiny_config

SMALL = {"arch": "mbf", "embedding_size": 16, "options": {"scale": 1, "blocks": [1, 1, 1, 1]}}


def tiny_tuned(run_dir, **over):
    """The train tests' tiny run (4 steps of 4) with a smaller mbf."""
    over = {"model": SMALL, "data": {"batch_size": 4, "synthetic": {"identities": 12, "images": 3}}} | over
    return tiny_config(run_dir, **over)


@pytest.fixture
def small_model():
    """A small conv net (conv, BN, PReLU, dropout: what the layout and precision change) on 32x32 crops,
    and a sampled Partial-FC head: choose() takes any backbone; the trainer tests below use mbf."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.PReLU(8),
                             nn.Conv2d(8, 16, 3, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(16, 16))
    head = PartialFC({"name": "bce_u_norm"}, 16, 12, 0.5)
    head.generator = torch.Generator().manual_seed(5)
    g = torch.Generator().manual_seed(1)
    return backbone, head, torch.rand(8, 3, 32, 32, generator=g) * 2 - 1, torch.randint(0, 12, (8,), generator=g)


def snapshot(backbone, head):
    return ({k: v.clone() for k, v in backbone.state_dict().items()},
            {k: v.clone() for k, v in head.state_dict().items()}, head.generator.get_state(), torch.get_rng_state())


@pytest.fixture
def tune_everything(monkeypatch):
    """Tune even a 4-step run (normally tuning waits for runs it costs at most a tenth of)."""
    monkeypatch.setattr(autotune, "RUN_FRACTION", 1e9)


def no_choose(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("autotune.choose must not run")
    monkeypatch.setattr(autotune, "choose", refuse)


# --------------------------------------------------------------------------------------- choose()
def test_choose_picks_a_timed_candidate_and_leaves_the_model_alone(small_model):
    backbone, head, x, y = small_model
    before = snapshot(backbone, head)
    lines = []
    result = autotune.choose(backbone, head, x, y, "cpu", say=lines.append)
    labels = ["fp32 NCHW", "fp32 channels_last", "bf16 NCHW", "bf16 channels_last"]
    assert list(result.timings) == labels == list(result.cosines)
    assert result.chosen_label in labels and all(t > 0 for t in result.timings.values())
    chosen = next(c for c in autotune.candidate_settings("cpu") if c.label == result.chosen_label)
    assert (result.amp, result.channels_last) == (chosen.amp, chosen.channels_last)
    assert result.cosines["fp32 NCHW"] == pytest.approx(1.0, abs=1e-9)
    assert result.cosines["fp32 channels_last"] > 0.999  # same arithmetic, other memory order
    assert result.cosines[result.chosen_label] >= 0.99
    eligible = [k for k, c in result.cosines.items() if c >= 0.99]
    assert result.timings[result.chosen_label] == min(result.timings[k] for k in eligible)
    # a copy was tuned: weights, BN statistics, the head's sampling stream and torch's RNG are as they were
    after = snapshot(backbone, head)
    assert all(torch.equal(before[0][k], v) for k, v in after[0].items())
    assert all(torch.equal(before[1][k], v) for k, v in after[1].items())
    assert torch.equal(before[2], after[2]) and torch.equal(before[3], after[3])
    assert all(p.grad is None for p in backbone.parameters())
    assert backbone[0].weight.is_contiguous()  # the model's own layout untouched
    record = result.as_dict()
    assert json.loads(json.dumps(record))["chosen"] == result.chosen_label


SLOW_ROWS = []  # batch sizes the slow layer saw in channels_last (module level: choose() deep-copies the model)


class SlowInChannelsLast(nn.Module):
    """Identity, but 250 ms per image when its input is in channels_last order: a candidate that
    cannot win, as bf16 is on a CPU without bf16 instructions. (At 20 ms the fp32 pass it is
    compared with, ~1 ms alone, could pass a third of that on 2 cores busy with other tests.)"""

    def forward(self, x):
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            SLOW_ROWS.append(len(x))
            time.sleep(0.25 * len(x))
        return x


def test_a_candidate_slow_on_the_batch_slice_never_runs_on_the_whole_batch(small_model):
    backbone, head, x, y = small_model
    x = torch.cat([x, x])  # 16 images: the probe slice is 2
    y = torch.cat([y, y])
    SLOW_ROWS.clear()
    result = autotune.choose(nn.Sequential(SlowInChannelsLast(), backbone), head, x, y, "cpu",
                             candidates=[("none", False), ("none", True)], say=lambda line: None)
    assert SLOW_ROWS == [2, 2]  # the two slice passes, then dropped: no whole-batch warm-up or timing
    assert result.probe_only == ["fp32 channels_last"] and result.chosen_label == "fp32 NCHW"
    assert result.timings["fp32 channels_last"] >= 0.25 * 16  # the slice's time scaled to the batch
    assert math.isnan(result.cosines["fp32 channels_last"]) and "(batch slice only)" in result.summary()
    assert json.loads(json.dumps(result.as_dict()))["probe_only"] == ["fp32 channels_last"]


def test_min_cosine_above_one_leaves_only_fp32_nchw(small_model):
    backbone, head, x, y = small_model
    result = autotune.choose(backbone, head, x, y, "cpu", candidates=[("none", True), ("none", False)],
                             min_cosine=1.5, say=lambda line: None)
    assert (result.amp, result.channels_last, result.chosen_label) == ("none", False, "fp32 NCHW")
    assert set(result.timings) == {"fp32 NCHW", "fp32 channels_last"}


def test_no_eligible_candidate_falls_back_to_fp32_nchw(small_model):
    backbone, head, x, y = small_model
    lines = []
    result = autotune.choose(backbone, head, x, y, "cpu", candidates=[("none", True)], min_cosine=1.5,
                             steps=2, say=lines.append)
    assert (result.amp, result.channels_last) == ("none", False)
    assert "fp32 channels_last" in result.timings and "fp32 NCHW" not in result.timings  # reference not timed
    assert result.note and any("no candidate reached" in line for line in lines)


def test_candidate_settings():
    assert [c.label for c in autotune.candidate_settings("cpu", "bf16", None)] == ["bf16 NCHW", "bf16 channels_last"]
    assert [c.label for c in autotune.candidate_settings("cpu", None, True, compile=True)] == [
        "fp32 channels_last compile", "bf16 channels_last compile"]
    assert not autotune.worth_tuning(100, 4, 3) and autotune.worth_tuning(130, 4, 3)
    with pytest.raises(ValueError, match="steps"):
        autotune.choose(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), torch.zeros(1, 1), torch.zeros(1), "cpu",
                        steps=1)


# -------------------------------------------------------------------------------------------- config
def test_auto_is_the_default():
    assert (TrainConfig().amp, TrainConfig().channels_last) == ("auto", "auto")
    cfg = load_config("base.yaml", ["data.kind=synthetic"])
    assert (cfg.amp, cfg.channels_last) == ("auto", "auto")
    cfg = load_config("base.yaml", ["data.kind=synthetic", "amp=bf16", "channels_last=true"])
    assert (cfg.amp, cfg.channels_last) == ("bf16", True)


@pytest.mark.parametrize("override, message", [
    ("amp=fast", "amp: 'fast' is not one of none, bf16, fp16, auto"),
    ("channels_last=maybe", "channels_last: 'maybe' is not one of true, false, auto"),
    ("channels_last=1", "channels_last: expected bool or str, got 1 (int)"),
    ("channels_last=[true]", "channels_last: expected bool or str, got [True] (list)"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("base.yaml", ["data.kind=synthetic", override])
    assert str(e.value) == message


# ------------------------------------------------------------------------------------------ trainer
def test_auto_run_tunes_once_records_and_applies_the_choice(tmp_path, tune_everything, capsys):
    run = tmp_path / "run"
    result = train(tiny_tuned(run))
    assert result.steps == 4
    record = json.loads((run / "autotune.json").read_text())
    assert record["amp"] in ("none", "bf16") and isinstance(record["channels_last"], bool)
    assert set(record["seconds_per_step"]) == {"fp32 NCHW", "fp32 channels_last", "bf16 NCHW", "bf16 channels_last"}
    out = capsys.readouterr().out
    assert "autotune (" in out and f"autotune: amp {record['amp']}, channels_last {record['channels_last']}" in out
    assert out.count("autotune: amp") == 1
    # the resolved values are what the run records of its config (a resume reuses them)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["amp"], saved["channels_last"]) == (record["amp"], record["channels_last"])
    state = load_checkpoint(run / "checkpoints" / "step_00000004.pt")
    assert (state["config"]["amp"], state["config"]["channels_last"]) == (record["amp"], record["channels_last"])


def test_resume_reuses_the_recorded_choice(tmp_path, tune_everything, monkeypatch, capsys):
    run = tmp_path / "run"
    train(tiny_tuned(run, amp="none"))  # layout tuned (fp32 only: bf16 passes are slow on CPUs without it)
    record = json.loads((run / "autotune.json").read_text())
    capsys.readouterr()
    no_choose(monkeypatch)
    result = train(tiny_tuned(run, steps=6, amp="auto"), resume=True)  # amp recorded as none: not tuned either
    assert result.steps == 6
    out = capsys.readouterr().out
    assert f"autotune: recorded: amp {record['amp']}, channels_last {record['channels_last']}" in out
    state = load_checkpoint(run / "checkpoints" / "step_00000006.pt")
    assert (state["config"]["amp"], state["config"]["channels_last"]) == (record["amp"], record["channels_last"])


def test_a_checkpoint_from_before_auto_keeps_its_explicit_settings(tmp_path, tune_everything, monkeypatch):
    run = tmp_path / "run"
    train(tiny_tuned(run, amp="none", channels_last=True))
    assert not (run / "autotune.json").exists()
    no_choose(monkeypatch)
    from facebce.train import Trainer
    trainer = Trainer(tiny_tuned(run, steps=6), resume=True)  # auto now; the checkpoint says none / true
    try:
        assert (trainer.amp, trainer.channels_last, trainer.autocast_dtype) == ("none", True, None)
        conv = next(p for p in trainer.backbone.parameters() if p.dim() == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last)
    finally:
        trainer.close()


def test_explicit_settings_skip_autotune(tmp_path, tune_everything, monkeypatch):
    no_choose(monkeypatch)
    run = tmp_path / "run"
    train(tiny_tuned(run, amp="bf16", channels_last=False))
    assert not (run / "autotune.json").exists()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["amp"], saved["channels_last"]) == ("bf16", False)


def test_only_the_auto_setting_is_tuned(tmp_path, tune_everything):
    run = tmp_path / "run"
    train(tiny_tuned(run, amp="none", steps=2, checkpoint={"every_steps": 0}))
    record = json.loads((run / "autotune.json").read_text())
    assert set(record["seconds_per_step"]) == {"fp32 NCHW", "fp32 channels_last"} and record["amp"] == "none"


def test_a_short_run_is_not_tuned(tmp_path, monkeypatch, capsys):
    no_choose(monkeypatch)
    run = tmp_path / "run"
    train(tiny_tuned(run, steps=2, checkpoint={"every_steps": 0}))
    out = capsys.readouterr().out
    assert "autotune: not tuned: a 2-pass run (tuning costs ~13): amp none, channels_last False" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["amp"], saved["channels_last"]) == ("none", False)


_DIST_WORKER = r"""
import os, sys
from pathlib import Path
from facebce.train import Trainer, autotune
from tests.train.helpers import tiny_config
autotune.RUN_FRACTION = 1e9  # tune even this 2-step run
real_choose = autotune.choose
def disagreeing_choose(*args, **kwargs):  # the real tuning, then the ranks' answers made to differ
    result = real_choose(*args, **kwargs)
    result.channels_last = os.environ["RANK"] == "0"
    return result
autotune.choose = disagreeing_choose
cfg = tiny_config(Path(sys.argv[1]), steps=2, amp="none", channels_last="auto",
                  head={"name": "bce_u_norm", "sample_rate": 0.5}, checkpoint={"every_steps": 0})
trainer = Trainer(cfg)
try:
    r = trainer.fit()
finally:
    trainer.close()
print("RESULT", r.steps, r.loss, trainer.amp, trainer.channels_last)
"""


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_two_gloo_processes_tune_together_and_agree(tmp_path):
    """Both ranks time the candidates in step (the head all-gathers); rank 0's choice (made channels_last
    here, rank 1's made NCHW) is what both train with, DDP re-wrapped around the channels_last backbone."""
    results = run_two_ranks(_DIST_WORKER, tmp_path)
    assert len(results) == 2 and results[0] == results[1]  # same loss, same amp and layout on both ranks
    assert results[0][3:] == ["none", "True"]
    record = json.loads((tmp_path / "autotune.json").read_text())
    assert (record["amp"], record["channels_last"]) == ("none", True)
    assert record["world_size"] == 2
