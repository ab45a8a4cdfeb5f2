"""Data-set level operations behind `facebce data ...`: make synthetic sets, pack folders, inspect packs."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from facebce.data.rec_dataset import RecDataset
from facebce.data.pack import pack_image_folder
from facebce.data.synthetic import SyntheticFaces, make_pairs, write_image_folder
from facebce.data.verification_bin import load_bin, save_bin
from facebce.errors import DataFormatError


def synthesize(out: str | os.PathLike, *, identities: int = 50, images: int = 10, seed: int = 0,
               first_identity: int = 0, rec: bool = False, pairs: int = 0,
               pair_identities: int = 0) -> str:
    """Write synthetic identities as `out/images/<id>/<n>.jpg`, optionally packed to `out/rec/` and
    with a verification set `out/pairs.bin` of `pairs` pairs.

    The pairs come from `pair_identities` further identities that follow the training ones
    (held out: never in `images/`), or from the same identities when it is 0.
    Returns a human-readable summary.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataFormatError(f"{out}: exists and is not a folder (the synthetic set's output folder)")
    faces = SyntheticFaces(identities, images, seed=seed, first_identity=first_identity)
    lines = [f"synthetic identities {first_identity}..{first_identity + identities - 1} "
             f"x {images} images (seed {seed}) -> {write_image_folder(faces, out / 'images')}"]
    if rec:
        s = pack_image_folder(out / "images", out / "rec", progress=False)
        lines.append(f"packed {s.num_images} images of {s.num_classes} classes -> {out / 'rec'} "
                     f"({s.rec_bytes / 1e6:.1f} MB)")
    if pairs:
        held = (SyntheticFaces(pair_identities, images, seed=seed,
                               first_identity=first_identity + identities)
                if pair_identities else faces)
        imgs, issame = make_pairs(held, pairs, seed=seed)
        save_bin(out / "pairs.bin", imgs, issame)
        which = (f"held-out identities {held.first_identity}..{held.first_identity + held.num_identities - 1}"
                 if pair_identities else "the same identities")
        lines.append(f"{pairs} verification pairs ({int(issame.sum())} genuine) of {which} -> {out / 'pairs.bin'}")
    return "\n".join(lines)


def pack(image_root: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Pack `image_root/<identity>/*` into `out_dir/train.rec|.idx|property`; returns a summary."""
    s = pack_image_folder(image_root, out_dir)
    return (f"{out_dir}: {s.num_images} images, {s.num_classes} classes, "
            f"{s.image_size[0]}x{s.image_size[1]}, train.rec {s.rec_bytes / 1e6:.1f} MB")


def inspect_data(path: str | os.PathLike) -> str:
    """Summarise a verification `.bin`, or an MS1M-style pack (its folder or its train.rec)."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file or folder")
    if path.suffix == ".bin":
        vs = load_bin(path)
        n = vs.num_pairs
        folds = np.array_split(vs.issame, 10) if n >= 10 else [vs.issame]
        balanced = all(abs(2 * int(f.sum()) - len(f)) <= 1 for f in folds)
        return (f"{path}: verification set, {n} pairs ({int(vs.issame.sum())} genuine, "
                f"{n - int(vs.issame.sum())} impostor), {len(vs.images)} images "
                f"({len({id(b) for b in vs.images})} distinct objects); 10 contiguous folds "
                f"{'balanced' if balanced else 'NOT balanced'}")
    ds = RecDataset(path, train=False)
    counts = np.bincount(ds.labels, minlength=ds.num_classes)
    img, _ = ds[0]
    top = Counter(dict(enumerate(counts.tolist()))).most_common(1)[0]
    return (f"{ds.rec_path}: {len(ds)} images, {ds.num_classes} classes "
            f"({int((counts == 0).sum())} empty), {ds.image_size[0]}x{ds.image_size[1]}; "
            f"images per class min {counts.min()} median {int(np.median(counts))} max {top[1]} "
            f"(class {top[0]}); first image decodes to {tuple(img.shape)} in [{img.min():.2f}, {img.max():.2f}]")
