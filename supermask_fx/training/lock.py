"""One run per run folder: ``RunLock(out_dir)`` holds ``out_dir/run.lock`` for the life of a training run.

Two runs writing one folder at once would interleave ``metrics.jsonl`` and overwrite each other's checkpoint (one
run's work lost, silently). The lock is an ``fcntl.flock`` on ``run.lock``: an exclusive lock on an open file,
which the operating system drops when the file is closed or its process ends, however it ends (``kill -9``, a
crash, a power loss), so a dead run never blocks the next one. ``flock`` locks belong to an open file, not to a
process: a second ``RunLock`` of the same folder is refused in the same process too. The holder writes its process
id, host and start time into the file, and a refused run names them. A run that ends removes the file; one that was
killed leaves it, unlocked, and the next run takes it over.

Where ``fcntl`` does not exist (Windows), or the file system refuses locks (some network file systems), the run goes
on unlocked, with a warning in the second case.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import warnings
from pathlib import Path

from .checkpoint import CheckpointError, write_failure_reason

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = "run.lock"

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]


class RunLockedError(CheckpointError):
    """Another training run holds the run folder (``out_dir``); the message names it (pid, host, start time)."""


class RunLock:
    """The lock of one run folder: ``acquire()`` (or refuse), ``release()`` (also on garbage collection)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> RunLock:
        """Create the folder if needed and lock it.

        Raises:
            RunLockedError: another run (in this process or another, on this host or another sharing the file
                system) holds the folder; the message names it.
            CheckpointError: the folder or the lock file cannot be created or written (permissions, a full disk).
        """
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CheckpointError(
                f"cannot create the run folder {self.folder}: {write_failure_reason(error, self.folder.parent)}"
            ) from error
        if fcntl is None:
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                raise CheckpointError(
                    f"cannot create {self.path}: {write_failure_reason(error, self.folder)}"
                ) from error
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read(fd))
                os.close(fd)
                raise RunLockedError(
                    f"{self.folder} is in use by another training run ({holder}; lock file {self.path}): two runs in "
                    "one out_dir would interleave metrics.jsonl and overwrite each other's checkpoint. Wait for it "
                    "to finish or stop it (its lock goes with its process), or give this run another out_dir."
                ) from None
            except OSError as error:  # a file system without locks: go on, unprotected
                os.close(fd)
                warnings.warn(
                    f"cannot lock {self.path} ({error.strerror or error}): a second run started in {self.folder} "
                    "meanwhile would not be refused",
                    stacklevel=3,
                )
                return self
            # The holder that just finished may have removed the file (and a third run made a new one): the lock
            # counts only on the file that is at the path now.
            try:
                now = os.stat(self.path)
                mine = os.fstat(fd)
                current = (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        self.fd = fd
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError as error:
            self.release()
            raise CheckpointError(f"cannot write {self.path}: {write_failure_reason(error, self.folder)}") from error
        return self

    def release(self) -> None:
        """Remove the lock file and unlock (the removal first: a run waiting on this file then sees it is gone)."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the modules may be gone: the OS unlocks anyway
            self.release()


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a run that is starting (its lock file holds no details yet)"
    pid, host = holder.get("pid"), holder.get("host")
    text = f"pid {pid} on {host}, started {holder.get('started')}"
    if pid == os.getpid() and host == socket.gethostname():
        text += "; that is this process: an earlier Run on this folder that was not closed (call its close())"
    return text
