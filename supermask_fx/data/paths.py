"""Cache locations and atomic file writing."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..atomic import atomic_file, umask

__all__ = ["atomic_torch_save", "chmod_default", "default_cache_dir", "is_writable_dir"]


def default_cache_dir() -> Path:
    """Where supermask_fx keeps caches and downloads: ``$SUPERMASK_FX_CACHE``, else
    ``$XDG_CACHE_HOME/supermask_fx``, else ``~/.cache/supermask_fx``."""
    env = os.environ.get("SUPERMASK_FX_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "supermask_fx"


def is_writable_dir(path: Path) -> bool:
    """True if ``path`` (or, if it does not exist yet, its closest existing ancestor) is a writable directory.

    A directory whose mode has no write bit at all counts as read-only even for root (who could write anyway),
    so shared read-only data folders are never written into.
    """
    p = Path(path)
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    try:
        mode = p.stat().st_mode
    except OSError:
        return False
    return p.is_dir() and bool(mode & 0o222) and os.access(p, os.W_OK | os.X_OK)


def chmod_default(path: Path, directory: bool = False) -> None:
    """Give a file made by ``mkstemp``/``mkdtemp`` (mode 0600/0700) the usual permissions under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the target directory, then ``os.replace`` it into place, so
    readers never see a half-written file."""
    with atomic_file(path) as f:
        torch.save(obj, f)
