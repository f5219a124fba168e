"""Data plumbing of the engine: a resumable distributed batch order, whole-batch fetching, batch augmentation.

* ``EpochBatchSampler``: epoch ``e``'s order is a permutation drawn from ``(seed, e)`` alone, so a resumed run
  sees exactly the batches the uninterrupted one would; each process takes every ``world``-th index (the
  permutation padded to a multiple of ``world`` like ``DistributedSampler``), cut into micro-batches.
* ``batched(dataset)``: for datasets with ``get_batch(indices)`` (``supermask_fx.data.ImageTensorDataset``), a
  view whose ``__getitems__`` builds a whole batch in one tensor operation instead of per example.
* ``RandomCropFlip``: the standard CIFAR augmentation (pad 4, random 32x32 crop, horizontal flip) on whole uint8
  batches, drawn from the torch random stream (restored on resume).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch.utils.data import Dataset, default_collate


class EpochBatchSampler:
    """Micro-batches of indices for one process; the order depends only on ``(seed, epoch)``."""

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.per_process = math.ceil(num_examples / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> torch.Tensor:
        """All processes' indices of ``epoch`` (padded), before sharding."""
        if self.shuffle:
            digest = hashlib.sha256(f"supermask_fx.training/{self.seed}/{epoch}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            indices = torch.randperm(self.num_examples, generator=generator)
        else:
            indices = torch.arange(self.num_examples)
        pad = self.per_process * self.world_size - self.num_examples
        if pad:
            indices = torch.cat([indices, indices[:pad]])
        return indices

    def __iter__(self):
        mine = self.order(self.epoch)[self.rank :: self.world_size].tolist()
        for start in range(0, len(mine), self.batch_size):
            batch = mine[start : start + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield batch

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_process // self.batch_size
        return math.ceil(self.per_process / self.batch_size)


class Batch(tuple):
    """``(inputs, targets)`` already batched by the dataset (see ``batched``)."""


class _BatchedView(Dataset):
    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __getitems__(self, indices):
        inputs, targets = self.dataset.get_batch(torch.as_tensor(indices, dtype=torch.long))
        return Batch((inputs, targets))


def batched(dataset):
    """A view of ``dataset`` that builds whole batches through ``dataset.get_batch`` when it has one."""
    return _BatchedView(dataset) if callable(getattr(dataset, "get_batch", None)) else dataset


def collate(samples):
    """``default_collate``, except for batches the dataset built itself."""
    if isinstance(samples, Batch):
        return tuple(samples)
    return default_collate(samples)


class RandomCropFlip(Dataset):
    """``dataset`` (an ``ImageTensorDataset``) with random crops after zero padding and horizontal flips.

    As torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()`` on the raw images (padding is
    black), applied to whole uint8 batches in ``get_batch``; draws from the global torch random stream.
    """

    def __init__(self, dataset, padding: int = 4, flip: bool = True) -> None:
        self.dataset = dataset
        self.padding = padding
        self.flip = flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # info, targets, classes, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index):
        images, targets = self.get_batch(torch.tensor([index]))
        return images[0], int(targets[0])

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        p = self.padding
        if p:
            padded = torch.nn.functional.pad(images, (p, p, p, p))
            offsets = torch.randint(0, 2 * p + 1, (n, 2))
            images = torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets.tolist())])
        if self.flip:
            flips = torch.rand(n) < 0.5
            images = torch.where(flips.view(-1, 1, 1, 1), images.flip(3), images)
        return images

    def get_batch(self, indices, device=None):
        images = self.augment(self.dataset.images[indices])
        targets = self.dataset.targets[indices]
        if device is not None:
            images, targets = images.to(device), targets.to(device)
        return self.dataset.normalize(images), targets
