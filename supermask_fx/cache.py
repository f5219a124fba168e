"""Where supermask_fx keeps caches (compiled kernels, decoded data sets, downloads), shared by the selection
back-ends and the data loaders."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir", "is_writable_dir"]


def default_cache_dir() -> Path:
    """Where supermask_fx keeps caches and downloads: ``$SUPERMASK_FX_CACHE``, else
    ``$XDG_CACHE_HOME/supermask_fx``, else ``~/.cache/supermask_fx``.

    Inside: ``native/`` (compiled kernels), ``data/`` (torchvision downloads), ``extracted/`` (archives of data
    sets, extracted once) and ``imagefolder/`` (decoded image folders). The data loaders write their caches here
    only, never beside the data they read."""
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
