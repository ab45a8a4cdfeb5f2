"""`facebce data pairs`: LFW-style balanced folds, no pair twice, seeded, disjoint identities on request,
a .bin that load_bin reads back with a pairs.csv naming every image, from a folder or a .rec pack."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from facebce.cli import main
from facebce.data.pairs import build_pairs_bin, make_pairs
from facebce.data.pack import pack_image_folder
from facebce.data.synthetic import SyntheticFaces, write_image_folder
from facebce.data.verification_bin import load_bin
from facebce.errors import ConfigError, DataFormatError


def _labels(n_id=30, per=5, seed=0):
    rng = np.random.default_rng(seed)
    return np.repeat(np.arange(n_id), rng.integers(1, per + 1, size=n_id))


def _check(labels, index, issame, fold, n_pairs, folds):
    assert index.shape == (n_pairs, 2) and issame.size == n_pairs
    per = n_pairs // folds
    for f in range(folds):
        block = issame[f * per:(f + 1) * per]
        assert (fold[f * per:(f + 1) * per] == f).all()
        assert block[: per // 2].all() and not block[per // 2:].any()  # genuine first, then impostor
    keys = {tuple(sorted(p)) for p in index.tolist()}
    assert len(keys) == n_pairs  # no pair twice, in either order
    a, b = labels[index[:, 0]], labels[index[:, 1]]
    assert (a[issame] == b[issame]).all() and (index[issame, 0] != index[issame, 1]).all()
    assert (a[~issame] != b[~issame]).all()


@pytest.mark.parametrize("disjoint", [False, True])
def test_folds_balanced_unique_and_seeded(disjoint):
    labels = _labels()
    index, issame, fold = make_pairs(labels, 100, folds=5, seed=3, disjoint_folds=disjoint)
    _check(labels, index, issame, fold, 100, 5)
    again = make_pairs(labels, 100, folds=5, seed=3, disjoint_folds=disjoint)
    for x, y in zip((index, issame, fold), again):
        np.testing.assert_array_equal(x, y)
    other = make_pairs(labels, 100, folds=5, seed=4, disjoint_folds=disjoint)[0]
    assert not np.array_equal(index, other)
    people = [set(labels[index[fold == f]].ravel().tolist()) for f in range(5)]
    overlap = any(people[i] & people[j] for i in range(5) for j in range(i + 1, 5))
    assert overlap != disjoint  # disjoint folds share no identity; free folds do (at this size)


def test_genuine_pairs_spread_over_identities():
    labels = np.repeat(np.arange(20), 6)
    index, issame, _ = make_pairs(labels, 40, folds=1, seed=0)
    counts = np.bincount(labels[index[issame, 0]], minlength=20)
    assert counts.min() == 1 and counts.max() == 1  # round robin: each identity once before any twice


def test_exhaustion_and_shape_errors():
    labels = np.repeat(np.arange(3), 2)  # 3 genuine pairs exist in all
    with pytest.raises(ConfigError, match="only 3 distinct genuine pairs can be drawn, 4 needed"):
        make_pairs(labels, 8, folds=1)
    index, issame, _ = make_pairs(labels, 6, folds=1)  # every genuine pair, exactly once
    assert sorted(map(tuple, np.sort(index[issame], axis=1).tolist())) == [(0, 1), (2, 3), (4, 5)]
    with pytest.raises(ConfigError, match="multiple of 2 x folds"):
        make_pairs(_labels(), 99, folds=10)
    with pytest.raises(ConfigError, match="impostor pairs need at least 2 identities"):
        make_pairs(np.repeat(np.arange(4), 5), 8, folds=4, disjoint_folds=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs_src")
    faces = SyntheticFaces(12, 4, seed=5)
    write_image_folder(faces, root / "images")
    pack_image_folder(root / "images", root / "rec", progress=False)
    return root


@pytest.mark.parametrize("source", ["images", "rec"])
def test_bin_and_csv_from_folder_or_rec(folder, tmp_path, source):
    s = build_pairs_bin(folder / source, tmp_path / "mine.bin", pairs=40, folds=4, seed=1)
    vs = load_bin(tmp_path / "mine.bin")
    assert vs.num_pairs == 40 and s.genuine == 20 and s.csv == tmp_path / "mine.pairs.csv"
    rows = list(csv.DictReader(s.csv.open()))
    assert len(rows) == 40 and [r["issame"] == "1" for r in rows] == vs.issame.tolist()
    assert {int(r["fold"]) for r in rows} == {1, 2, 3, 4}
    for k, r in enumerate(rows):
        if source == "images":
            assert (folder / "images" / r["source1"]).read_bytes() == vs.images[2 * k]
            assert r["source1"].split("/")[0] == r["identity1"]
        else:
            assert r["source1"].startswith("train.rec#")
        assert (r["identity1"] == r["identity2"]) == (r["issame"] == "1")
    # the same seed from the folder and from its pack gives the same pairs (the pack keeps folder order)
    if source == "rec":
        other = build_pairs_bin(folder / "images", tmp_path / "f.bin", pairs=40, folds=4, seed=1)
        assert load_bin(other.out).images == vs.images


def test_cli_and_one_line_errors(folder, tmp_path, capsys):
    out = tmp_path / "p.bin"
    assert main(["data", "pairs", str(folder / "images"), str(out), "--pairs", "20", "--folds", "2"]) == 0
    assert "20 pairs (10 genuine, 10 impostor) in 2 folds" in capsys.readouterr().out
    assert main(["data", "inspect", str(out)]) == 0
    for argv, msg in (([str(folder / "images"), str(tmp_path / "x.bin"), "--pairs", "21"], "multiple of 2 x folds"),
                      ([str(folder / "images"), str(tmp_path / "x.txt"), "--pairs", "20"], "must be a .bin"),
                      ([str(tmp_path / "nope"), str(tmp_path / "x.bin")], "no such image folder"),
                      ([str(folder / "images"), str(tmp_path / "x.bin"), "--pairs", "2000"], "distinct")):
        assert main(["data", "pairs", *argv]) == 1
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1
    assert not (tmp_path / "x.bin").exists()
    with pytest.raises(DataFormatError):
        build_pairs_bin(tmp_path / "nope", tmp_path / "y.bin")
