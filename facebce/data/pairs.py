"""`facebce data pairs`: an insightface-format verification .bin from your own labelled faces.

The source is a labelled image folder (ROOT/<identity>/*.jpg) or an MS1M-style pack (its folder or
train.rec). The result follows LFW View 2's layout: `folds` contiguous folds, each of P / folds pairs,
its genuine pairs first and then as many impostor pairs (so `facebce eval custom_bin=OUT.bin` and the
insightface 10-fold split read it like LFW). Draws are seeded and reproducible:
- genuine pairs: identities with >= 2 images are visited in a seeded random order, round robin, each
  giving a random pair of two of its images not drawn before (so every identity contributes before
  any contributes twice);
- impostor pairs: two different identities drawn at random, a random image of each;
- no pair (unordered, by image) is drawn twice in the whole file, and a genuine pair's images differ;
- `disjoint_folds`: identities are dealt to the folds first, so no person appears in two folds.
`OUT.pairs.csv` beside the .bin names every image's source (relative path, or `train.rec#<record key>`).
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facebce.errors import ConfigError, DataFormatError

_MAX_TRIES = 50  # random draws per pair before a pool is declared exhausted


@dataclass(frozen=True)
class PairsSummary:
    out: Path
    csv: Path
    pairs: int
    genuine: int
    folds: int
    identities: int  # identities that appear in some pair
    images: int  # distinct images used
    disjoint: bool


class _Source:
    """Labels, raw bytes and a source name per image of a folder or a .rec pack."""

    def __init__(self, path: Path):
        if not path.exists():
            raise DataFormatError(f"{path}: no such image folder or .rec pack")
        is_rec = path.suffix == ".rec" or (path.is_dir() and (path / "train.rec").is_file())
        if is_rec:
            from facebce.data.rec_dataset import RecDataset
            ds = RecDataset(path, train=False)
            self.labels = np.asarray(ds.labels, np.int64)
            self.names = [f"{ds.rec_path.name}#{int(k)}" for k in ds.keys]
            self.identities = [str(c) for c in range(ds.num_classes)]
            self._raw = lambda i: ds.raw(i)[0]
        else:
            from facebce.data.image_folder import scan_image_folder
            classes, paths, labels = scan_image_folder(path)
            self.labels = labels
            self.names = [p.relative_to(path).as_posix() for p in paths]
            self.identities = classes
            self._raw = lambda i: paths[i].read_bytes()

    def raw(self, i: int) -> bytes:
        return self._raw(i)


def make_pairs(labels, n_pairs: int, *, folds: int = 10, seed: int = 0,
               disjoint_folds: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image index pairs P x 2, issame P, fold P) drawn as the module docstring says; a ConfigError
    when the labels cannot give that many distinct pairs."""
    labels = np.asarray(labels, np.int64).ravel()
    if folds < 1 or n_pairs < 2 * folds or n_pairs % (2 * folds):
        raise ConfigError(f"--pairs {n_pairs} --folds {folds}: the pairs must split into {folds} folds of equal "
                          "genuine and impostor halves (a multiple of 2 x folds)")
    rng = np.random.default_rng(seed)
    ids = np.unique(labels)
    members = {int(i): np.flatnonzero(labels == i) for i in ids}
    if disjoint_folds:
        order = rng.permutation(ids)
        groups = [order[f::folds] for f in range(folds)]
    else:
        groups = [ids] * folds
    per_fold = n_pairs // folds // 2
    used: set[tuple[int, int]] = set()
    pairs, issame, fold_of = [], [], []
    for f, group in enumerate(groups):
        gen = _genuine(rng, group, members, per_fold, used, f)
        imp = _impostor(rng, group, members, per_fold, used, f)
        pairs += gen + imp
        issame += [True] * len(gen) + [False] * len(imp)
        fold_of += [f] * (len(gen) + len(imp))
    return np.asarray(pairs, np.int64), np.asarray(issame, bool), np.asarray(fold_of, np.int64)


def _key(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


def _genuine(rng, group, members, need: int, used: set, fold: int) -> list[tuple[int, int]]:
    pool = [int(i) for i in rng.permutation(group) if members[int(i)].size >= 2]
    capacity = sum(members[i].size * (members[i].size - 1) // 2 for i in pool)
    out: list[tuple[int, int]] = []
    while len(out) < need:
        if not pool:
            raise ConfigError(f"fold {fold + 1}: only {len(out)} distinct genuine pairs can be drawn, {need} needed "
                              f"(identities with >= 2 images hold {capacity} pairs); ask for fewer --pairs"
                              f"{' or drop --disjoint-folds' if len(group) != len(members) else ''}")
        keep = []
        for i in pool:
            if len(out) == need:
                keep.append(i)
                continue
            m = members[i]
            for _ in range(_MAX_TRIES):
                a, b = rng.choice(m, size=2, replace=False)
                k = _key(int(a), int(b))
                if k not in used:
                    used.add(k)
                    out.append((int(a), int(b)))
                    keep.append(i)
                    break
            else:
                left = _unused_pairs(m, used)
                if left:
                    k = left[int(rng.integers(len(left)))]
                    used.add(k)
                    out.append(k if rng.integers(2) else (k[1], k[0]))
                    if len(left) > 1:
                        keep.append(i)
        pool = keep
    return out


def _unused_pairs(m: np.ndarray, used: set) -> list[tuple[int, int]]:
    return [_key(int(a), int(b)) for x, a in enumerate(m) for b in m[x + 1:] if _key(int(a), int(b)) not in used]


def _impostor(rng, group, members, need: int, used: set, fold: int) -> list[tuple[int, int]]:
    group = np.asarray(group)
    if group.size < 2:
        raise ConfigError(f"fold {fold + 1}: impostor pairs need at least 2 identities, it has {group.size}")
    out: list[tuple[int, int]] = []
    misses = 0
    while len(out) < need:
        i, j = rng.choice(group, size=2, replace=False)
        a, b = int(rng.choice(members[int(i)])), int(rng.choice(members[int(j)]))
        k = _key(a, b)
        if k in used:
            misses += 1
            if misses > _MAX_TRIES * need:
                raise ConfigError(f"fold {fold + 1}: could not draw {need} distinct impostor pairs "
                                  f"({len(out)} drawn); ask for fewer --pairs")
            continue
        used.add(k)
        out.append((a, b))
    return out


def build_pairs_bin(source: str | os.PathLike, out: str | os.PathLike, *, pairs: int = 6000, folds: int = 10,
                    seed: int = 0, disjoint_folds: bool = False) -> PairsSummary:
    """Draw the pairs (`make_pairs`), write OUT (.bin, via save_bin) and OUT.pairs.csv, both atomically."""
    from facebce.data.verification_bin import save_bin
    from facebce.fileio import atomic_write_text

    src_path, out = Path(source), Path(out)
    if out.suffix != ".bin":
        raise ConfigError(f"{out}: the output must be a .bin file")
    src = _Source(src_path)
    index, issame, fold = make_pairs(src.labels, pairs, folds=folds, seed=seed, disjoint_folds=disjoint_folds)
    flat = index.ravel()
    cache: dict[int, bytes] = {}
    images = [cache[i] if i in cache else cache.setdefault(i, src.raw(i)) for i in map(int, flat)]
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["pair", "fold", "issame", "identity1", "source1", "identity2", "source2"])
    for k, ((a, b), same, f) in enumerate(zip(index.tolist(), issame.tolist(), fold.tolist())):
        w.writerow([k, f + 1, int(same), src.identities[src.labels[a]], src.names[a],
                    src.identities[src.labels[b]], src.names[b]])
    csv_path = out.with_suffix(".pairs.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(csv_path, text.getvalue())
    save_bin(out, images, issame.tolist())
    return PairsSummary(out, csv_path, int(issame.size), int(issame.sum()), folds,
                        int(np.unique(src.labels[flat]).size), len(cache), disjoint_folds)


def describe(s: PairsSummary) -> str:
    return (f"{s.out}: {s.pairs} pairs ({s.genuine} genuine, {s.pairs - s.genuine} impostor) in {s.folds} folds "
            f"of {s.pairs // s.folds} (genuine first, then impostor), {s.identities} identities, {s.images} distinct "
            f"images{', identities disjoint across folds' if s.disjoint else ''}; sources: {s.csv}")
