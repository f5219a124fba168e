"""Seeded random subsets: what every ``--limit`` of the example scripts takes.

The first N examples of a data set can be anything but a sample of it: in an image folder read in file order they
are all of one class. A subset drawn at random with a fixed seed is a sample, and the same one on every run.
"""

from __future__ import annotations

import torch

__all__ = ["LIMIT_HELP", "TEST_LIMIT_HELP", "random_subset", "subset_indices"]

#: The ``--limit`` help of every example script (docs/training.md uses the same words).
LIMIT_HELP = "use N training images drawn at random with --seed (the same N images on every run with that seed)"
TEST_LIMIT_HELP = "use N test images drawn at random with --seed (the same N images on every run with that seed)"


def subset_indices(length: int, n: int, seed: int) -> torch.Tensor:
    """``min(n, length)`` distinct indices of ``range(length)``, drawn at random from ``seed`` alone, in ascending
    order (an ``int64`` tensor): the same indices for the same ``(length, n, seed)`` on every machine."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the subset size must be a positive integer (got {n!r})")
    if n >= length:
        return torch.arange(length)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(length, generator=generator)[:n].sort().values


def random_subset(dataset, n: int | None, seed: int):
    """``n`` examples of an in-memory ``ImageTensorDataset`` drawn at random with ``seed`` (see
    :func:`subset_indices`), as a new ``ImageTensorDataset`` with the same metadata; ``dataset`` itself when ``n``
    is None or not smaller than it."""
    if n is None or n >= len(dataset):
        if n is not None and n < 1:
            raise ValueError(f"the subset size must be a positive integer (got {n!r})")
        return dataset
    from .vision import ImageTensorDataset

    keep = subset_indices(len(dataset), n, seed)
    d = dataset
    return ImageTensorDataset(d.images[keep], d.targets[keep], d.info, split=d.split, source=d.source, exact=d.exact)
