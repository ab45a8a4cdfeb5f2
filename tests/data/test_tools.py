"""`facebce data synth|pack|inspect` behind the CLI: real files out, summaries that state what is there."""
import numpy as np
import pytest

from facebce.data import RecDataset
from facebce.data.tools import inspect_data, pack, synthesize
from facebce.data.verification_bin import load_bin
from facebce.errors import DataFormatError


def test_synthesize_writes_folder_rec_and_held_out_pairs(tmp_path):
    summary = synthesize(tmp_path / "s", identities=4, images=3, seed=1, rec=True, pairs=20, pair_identities=3)
    ds = RecDataset(tmp_path / "s" / "rec")
    assert (len(ds), ds.num_classes) == (12, 4)
    assert np.array_equal(np.bincount(ds.labels), [3, 3, 3, 3])
    vs = load_bin(tmp_path / "s" / "pairs.bin")
    assert vs.num_pairs == 20 and int(vs.issame.sum()) == 10
    # held-out pairs use identities 4..6, whose images never appear in the training pack
    train_bytes = {ds.raw(i)[0] for i in range(len(ds))}
    assert not train_bytes & set(vs.images)
    assert "held-out identities 4..6" in summary and "12 images of 4 classes" in summary


def test_pack_and_inspect_agree(tmp_path):
    synthesize(tmp_path / "s", identities=3, images=2)
    summary = pack(tmp_path / "s" / "images", tmp_path / "rec")
    assert "6 images, 3 classes, 112x112" in summary
    report = inspect_data(tmp_path / "rec")
    assert "6 images, 3 classes (0 empty), 112x112" in report
    assert "min 2 median 2 max 2" in report


def test_inspect_bin_reports_fold_balance(tmp_path):
    synthesize(tmp_path / "s", identities=4, images=3, pairs=40)
    report = inspect_data(tmp_path / "s" / "pairs.bin")
    assert "40 pairs (20 genuine, 20 impostor)" in report and "balanced" in report and "NOT" not in report


def test_inspect_real_packs(shared_data):
    report = inspect_data(shared_data / "celeba299" / "rec")
    assert "6240 images, 278 classes (0 empty), 112x112" in report
    assert "min 5" in report and "max 30" in report
    report = inspect_data(shared_data / "lfw.bin")
    assert "6000 pairs (3000 genuine, 3000 impostor), 12000 images (7701 distinct" in report


def test_inspect_missing_path(tmp_path):
    with pytest.raises(DataFormatError, match="no such file"):
        inspect_data(tmp_path / "missing")
