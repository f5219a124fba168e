"""Cache locations and atomic file writing."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..cache import default_cache_dir, is_writable_dir
from ..files.atomic import atomic_file, umask

__all__ = ["atomic_torch_save", "chmod_default", "default_cache_dir", "is_writable_dir"]


def chmod_default(path: Path, directory: bool = False) -> None:
    """Give a file made by ``mkstemp``/``mkdtemp`` (mode 0600/0700) the usual permissions under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the target directory, then ``os.replace`` it into place, so
    readers never see a half-written file."""
    with atomic_file(path) as f:
        torch.save(obj, f)
