"""Training data: the dataset a recipe names, sharded over ranks in a resumable, deterministic order.

Order: epoch e is one permutation of all samples drawn from `seed + e`; the global batch b of an
epoch that starts at offset s is `perm[s + b·B·W : s + (b+1)·B·W]`, rank r taking every W-th
sample of it (DistributedSampler-style). So the data position is just (epoch, samples consumed),
and a run resumed at that position sees the same batches as an uninterrupted one — on any world
size or batch size. Augmentation is seeded per sample from (seed, epoch, index), so it does not
depend on DataLoader workers or on where a run was resumed.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from facebce.data import ImageFolderDataset, RecDataset, SyntheticFaceDataset, SyntheticFaces
from facebce.data.transforms import decode_image, train_transform
from facebce.train.config import DataConfig


def build_train_dataset(cfg: DataConfig) -> Dataset:
    """The recipe's training set: samples (FloatTensor[3,112,112], label), with `.num_classes`, `.labels`.

    With `val_fraction` > 0 the images held out by `split_per_identity` are left out (see `build_datasets`)."""
    return build_datasets(cfg)[0]


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Optional["Subset"]]:
    """(training set, held-out val set or None). The val set keeps every identity's class id and is
    never augmented; it is what the trainer scores against the class centres (uniform accuracy)."""
    full = _base_dataset(cfg)
    val = None
    if cfg.val_fraction > 0:
        train_idx, val_idx = split_per_identity(full.labels, cfg.val_fraction, cfg.val_seed)
        full, val = Subset(full, train_idx), Subset(full, val_idx)
    return (CachedImages(full) if cfg.cache else full), val


def split_per_identity(labels, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per identity, hold out round(fraction · n) of its n images (drawn with `seed`), always keeping
    at least one for training; identities with one image stay wholly in training. Returns sorted
    (train indices, val indices). The same labels, fraction and seed give the same split anywhere."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = min(int(round(fraction * idx.size)), idx.size - 1)
        chosen = rng.permutation(idx)
        val.append(chosen[:k])
        train.append(chosen[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class Subset(Dataset):
    """Some samples of a facebce dataset, keeping its class ids (`num_classes` is the full set's)."""

    def __init__(self, ds: Dataset, indices):
        self.ds, self.indices = ds, np.asarray(indices, dtype=np.int64)
        self.num_classes = ds.num_classes
        self.labels = np.asarray(ds.labels)[self.indices]
        self.image_size = getattr(ds, "image_size", None)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int):
        return self.ds[int(self.indices[i])]

    def raw(self, i: int):
        return self.ds.raw(int(self.indices[i]))

    def images_bgr(self) -> np.ndarray:
        """Every sample decoded, unaugmented, as BGR uint8 N x H x W x 3 (what the embedders take)."""
        return np.stack([CachedImages._rgb(self, i)[..., ::-1] for i in range(len(self))])


def _base_dataset(cfg: DataConfig) -> Dataset:
    if cfg.kind == "rec":
        ds = RecDataset(cfg.path, train=True)
    elif cfg.kind == "folder":
        ds = ImageFolderDataset(cfg.path, train=True)
    else:
        s = cfg.synthetic
        ds = SyntheticFaceDataset(SyntheticFaces(s.identities, s.images, seed=s.seed, difficulty=s.difficulty),
                                  train=True)
    return ds


class CachedImages(Dataset):
    """Every image decoded (or rendered) once into memory as uint8; augmentation still per sample."""

    def __init__(self, ds: Dataset):
        self.num_classes, self.labels = ds.num_classes, np.asarray(ds.labels)
        first = self._rgb(ds, 0)
        self.images = np.empty((len(ds),) + first.shape, np.uint8)
        self.images[0] = first
        for i in range(1, len(ds)):
            self.images[i] = self._rgb(ds, i)

    @staticmethod
    def _rgb(ds: Dataset, i: int) -> np.ndarray:
        if isinstance(ds, Subset):
            return CachedImages._rgb(ds.ds, int(ds.indices[i]))
        if isinstance(ds, SyntheticFaceDataset):
            return ds.faces[i][0]
        data, _ = ds.raw(i)
        return decode_image(data, where=f"sample {i}", size=getattr(ds, "image_size", None))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return train_transform(self.images[i]), int(self.labels[i])


class SeededSamples(Dataset):
    """Indexed by (epoch, i): runs `ds[i]` with torch's CPU RNG seeded from (seed, epoch, i), restoring
    the caller's RNG afterwards, so augmentation is a pure function of the sample and the epoch."""

    def __init__(self, ds: Dataset, seed: int):
        self.ds, self.seed = ds, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        s = np.random.SeedSequence((self.seed, epoch, i)).generate_state(2, np.uint32)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed also re-seeds every other backend, ~170 µs a call
            torch.default_generator.manual_seed(int(s[0]) << 32 | int(s[1]))
            return self.ds[i]


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int, start: int = 0) -> int:
    """Whole global batches left in an epoch that starts at sample offset `start` (the rest is dropped)."""
    return max(num_samples - start, 0) // (batch_size * world_size)


class ShardedBatchSampler(Sampler):
    """This rank's batches of one epoch, from sample offset `start` of the epoch's permutation.

    Yields lists of (epoch, index) keys for `SeededSamples`. Every rank yields the same number of
    equal-sized batches (Partial-FC's all-gathers need equal local batches).
    """

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0, start: int = 0):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.epoch, self.start = rank, world_size, seed, epoch, start

    def permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self.world_size, self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        n = len(self)
        if n == 0:
            return
        b, w = self.batch_size, self.world_size
        mine = self.permutation()[self.start + self.rank: self.start + n * b * w: w].tolist()
        for k in range(n):
            yield [(self.epoch, i) for i in mine[k * b:(k + 1) * b]]
