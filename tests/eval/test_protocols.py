"""Protocol registry: every shipped file loads, users add protocols as YAML, bad keys are named."""
from __future__ import annotations

import pytest

from facebce.errors import ConfigError
from facebce.eval.protocols import (KINDS, PATH_ENV, describe_protocols, get_protocol, list_protocols,
                                    load_protocol_file)

SHIPPED = ["agedb_30", "calfw", "cfp_ff", "cfp_fp", "classification_folder", "cplfw", "custom_bin", "custom_pairs",
           "ijbb", "ijbc", "lfw", "open_set_folder"]


def test_shipped_protocols_are_all_there():
    assert list_protocols() == SHIPPED
    listing = describe_protocols().splitlines()
    assert [line.split()[0] for line in listing] == SHIPPED and "lfw.bin" in listing[SHIPPED.index("lfw")]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_protocol_loads(name):
    p = get_protocol(name)
    assert p.name == name and p.kind in KINDS and p.source.name == f"{name}.yaml"
    if p.kind in ("pairs_bin", "pairs_list"):
        assert p["folds"] == 10 and p["fold_scheme"] == "contiguous" and p["file"]
    if p.kind == "pairs_bin" and name != "custom_bin":  # the public benchmark sets
        assert p["file"] == f"{name}.bin" and p["pairs"] in (6000, 7000)
    if name == "custom_bin":  # any size: no pair-count warning
        assert p["file"] == "pairs.bin" and p.settings.get("pairs") is None
    if p.kind == "open_set_folder":
        assert (p["enrol_per_identity"], p["unknown_fraction"], p["seed"]) == (1, 0.3, 0)
        assert p["fpir_targets"] == [1e-3, 1e-2, 1e-1] and p["ranks"] == [1, 5] and p.metrics == ("identification",)


def _write(path, text):
    path.write_text(text)
    return path


def test_user_directory_adds_and_overrides(tmp_path, monkeypatch):
    _write(tmp_path / "vgg2_fp.yaml", "name: vgg2_fp\nkind: pairs_bin\nfile: vgg2_fp.bin\npairs: 5000\n")
    _write(tmp_path / "lfw.yaml", "name: lfw\nkind: pairs_bin\nfile: my_lfw.bin\n")
    assert "vgg2_fp" in list_protocols([tmp_path])
    p = get_protocol("vgg2_fp", [tmp_path])
    assert p["pairs"] == 5000 and p["folds"] == 10 and p.metrics == ("ten_fold", "tar_at_far")  # defaults
    assert get_protocol("lfw", [tmp_path])["file"] == "my_lfw.bin"  # the user's file wins
    assert get_protocol("lfw")["file"] == "lfw.bin"
    monkeypatch.setenv(PATH_ENV, str(tmp_path))
    assert get_protocol("vgg2_fp")["pairs"] == 5000
    assert get_protocol(str(tmp_path / "vgg2_fp.yaml")).name == "vgg2_fp"  # a YAML path works as a name


@pytest.mark.parametrize("text,needle", [
    ("name: x\nkind: pairs_bin\nfile: x.bin\nfolds_: 10\n", "unknown key 'folds_'"),
    ("name: x\nkind: pairs_bin\n", "missing required key 'file'"),
    ("name: x\nkind: pairs\nfile: x.bin\n", "key 'kind' is 'pairs'"),
    ("name: x\nkind: pairs_bin\nfile: x.bin\nfold_scheme: random\n", "key 'fold_scheme' is 'random'"),
    ("name: x\nkind: pairs_bin\nfile: x.bin\nmetrics: [accuracy]\n", "key 'metrics'"),
    ("name: x\nkind: ijb\nfolder: X\nmeta_prefix: x\nfiles: {tid: a.txt}\n", "unknown key 'files.tid'"),
    ("name: x\nkind: ijb\nfolder: X\nmeta_prefix: x\ntemplate: {flip: max}\n", "key 'template.flip' is 'max'"),
    ("name: x\nkind: ijb\nfolder: X\nmeta_prefix: x\nfar_targets: [2]\n", "key 'far_targets'"),
    ("name: x\nkind: open_set_folder\nunknown_fraction: 1\n", "key 'unknown_fraction' is 1"),
    ("name: x\nkind: open_set_folder\nenrol_per_identity: 0\n", "key 'enrol_per_identity' is 0"),
    ("name: x\nkind: open_set_folder\nfpir_targets: [0]\n", "key 'fpir_targets' is [0]"),
    ("name: x\nkind: open_set_folder\nranks: [1, 0]\n", "key 'ranks' is [1, 0]"),
    ("name: x\nkind: open_set_folder\nmetrics: [ten_fold]\n", "key 'metrics'"),
    ("name: x\nkind: open_set_folder\nfile: a.bin\n", "unknown key 'file'"),
    ("[1, 2]\n", "must be a mapping"),
    ("name: x\n  kind: : [\n", "not valid YAML"),
])
def test_bad_protocol_files_name_file_and_key(tmp_path, text, needle):
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_protocol_file(path)
    assert str(path) in str(err.value) and needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="bad.yaml"):
        list_protocols([tmp_path])  # a bad user file fails the registry, it is not skipped


def test_ijb_defaults_from_prefix_and_string_far_targets(tmp_path):
    p = load_protocol_file(_write(tmp_path / "x.yaml", "name: x\nkind: ijb\nfolder: X\nmeta_prefix: x\n"
                                                      "far_targets: [1e-4, 1.0e-2]\n"))
    assert p["files"]["tid_mid"] == "x_face_tid_mid.txt" and p["files"]["galleries"] is None
    assert p["far_targets"] == [1e-4, 1e-2]  # PyYAML reads 1e-4 as a string


def test_open_set_defaults_and_string_targets(tmp_path):
    p = load_protocol_file(_write(tmp_path / "x.yaml", "name: x\nkind: open_set_folder\nfpir_targets: [1e-2]\n"
                                                      "ranks: [10, 1, 5, 1]\nseed: 3\n"))
    assert p["fpir_targets"] == [1e-2] and p["ranks"] == [1, 5, 10] and p["seed"] == 3
    assert (p["enrol_per_identity"], p["unknown_fraction"], p["image_size"]) == (1, 0.3, 112)


def test_unknown_name_and_duplicates(tmp_path):
    with pytest.raises(ConfigError, match="unknown protocol 'nope'"):
        get_protocol("nope")
    _write(tmp_path / "a.yaml", "name: dup\nkind: pairs_bin\nfile: a.bin\n")
    _write(tmp_path / "b.yaml", "name: dup\nkind: pairs_bin\nfile: b.bin\n")
    with pytest.raises(ConfigError, match="also defined in"):
        list_protocols([tmp_path])
    with pytest.raises(ConfigError, match="no such protocol file or folder"):
        list_protocols([tmp_path / "missing"])
