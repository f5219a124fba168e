"""Atomic, durable file replacement: the one place the package writes a file that must never be half-written.

``with atomic_file(path) as f: f.write(...)`` writes to a temporary file in the same folder, flushes and fsyncs it,
gives it the usual permissions (``0666 & ~umask``; ``mkstemp`` makes 0600), renames it over ``path`` and fsyncs
the folder. A crash or a full disk at any moment leaves either the old file or the new one under ``path``, never a
mixture, and no temporary file behind. A kill (SIGKILL, power loss) cannot run the clean-up: it may leave the
temporary file, ``.<name>.<pid>.<random>.tmp``, which ``remove_stale_temporaries(path)`` removes later (the
writers of ``path`` call it before they write).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_file", "remove_stale_temporaries", "umask", "fsync_dir", "write_error_reason"]


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_error_reason(error: BaseException, target: str | os.PathLike) -> str:
    """Why writing ``target`` failed, in words that name the cause and not the hidden temporary file: a full disk,
    a folder without write permission, a directory where a file should go, ... (the first ``OSError`` in the
    chain of causes; else the error's type and message)."""
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen and not isinstance(cause, OSError):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if not isinstance(cause, OSError):
        return f"{type(error).__name__}: {error}"
    target = Path(target)
    if cause.errno == errno.ENOSPC or cause.errno == getattr(errno, "EDQUOT", None):
        return "no space left on device (free some disk space, or write elsewhere)"
    if cause.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {target.parent} is not writable by this user (choose a folder you can write to)"
    if cause.errno == errno.EROFS:
        return f"{target.parent} is on a read-only file system"
    if cause.errno == errno.EISDIR:
        return "it is a directory: give the path of a file in it"
    if cause.errno in (errno.ENOTDIR, errno.ENOENT) and not target.parent.is_dir():
        return f"{target.parent} is not a folder"
    return cause.strerror or str(cause)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that interrupted ``atomic_file(path)`` writes left beside ``path``; return them.

    Those are ``.<name>.<pid>.<random>.tmp`` files whose writer process is gone (or is this process: it is not
    writing ``path`` while it calls this), and ``.<name>.<random>.tmp`` ones of writers that did not record a
    pid. A temporary file of a live process on this machine is left alone: it may be a write in progress.
    """
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:  # no folder yet, or not readable: nothing to clean
        return removed
    for candidate in candidates:
        writer = candidate.name[len(prefix) : -len(".tmp")].split(".")[0]
        if writer.isdigit() and 0 < int(writer) != os.getpid() and _alive(int(writer)):
            continue
        with contextlib.suppress(OSError):
            candidate.unlink()
            removed.append(candidate)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or not a process id at all
        return False
    except PermissionError:  # another user's process
        return True
    return True


def umask() -> int:
    """The process umask (read without changing it for longer than a call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
