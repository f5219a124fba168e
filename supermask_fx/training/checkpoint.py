"""Training checkpoints: atomic writes, an integrity digest, exact resume, and clear errors.

A checkpoint (``torch.save`` of a dict of tensors and plain values, read back with ``weights_only=True``) holds:
the model's ``state_dict`` (scores, weights, masks, BatchNorm statistics), the optimizer and scheduler states,
the random-number states of every process (python, numpy, torch, CUDA), the number of finished epochs and
optimizer steps, the metrics history, the ``TrainConfig``, a fingerprint of the model (class, tensor names,
shapes and dtypes, trainable tensors, ``popupify`` config) and of each data set (``data``: length and a hash of a
fixed sample of items, ``training.data.dataset_fingerprint``), which ``check_compatible`` compares when resuming.

Integrity (version 2): the file is the zip archive ``torch.save`` writes, with one addition its zip format allows,
a comment at the end: ``supermask_fx sha256=<64 hex digits>``, the SHA-256 of the archive as ``torch.save``
wrote it (with an empty comment). ``load_checkpoint`` checks it before unpickling anything, so every byte of the
file is covered: a changed byte in the scores, the frozen weights, the optimizer state, the zip structure or the
digest itself ends in ``CheckpointError`` ("damaged"), never in a resume from altered state. ``torch.load`` still
reads the file as it is. Version-1 checkpoints (no digest) still load, unchecked.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
from pathlib import Path

import torch
from torch import nn

from ..files.atomic import atomic_file, remove_stale_temporaries, write_error_reason

FORMAT = "supermask_fx.training.checkpoint"
VERSION = 2  # 2: the archive's SHA-256 in its zip comment; 1: no digest
CHECKPOINT_NAME = "checkpoint.pt"

_DIGEST = b"supermask_fx sha256="
_COMMENT = len(_DIGEST) + 64  # the zip comment: the prefix and 64 hex digits
_END_RECORD = b"PK\x05\x06"  # a zip archive's end-of-central-directory record: 22 bytes, then the comment


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions) or read (truncated, not a checkpoint)."""


class CheckpointMismatchError(ValueError):
    """The checkpoint was made by another model or with other training settings; the message lists what differs."""


# ------------------------------------------------------------------------------------------------ writing


def atomic_save(obj, path: str | os.PathLike) -> int:
    """``torch.save(obj)`` to ``path`` atomically and durably, with its SHA-256 digest; returns the file size.

    The data goes to a temporary file in the same folder, is flushed and fsync'ed, then renamed over ``path``
    (``os.replace``), and the folder is fsync'ed. A crash or a full disk at any moment leaves either the old file
    or the new one under ``path``, never a mixture, and no temporary file behind. Temporary files that killed
    writers of ``path`` left (``.<name>.<pid>.*.tmp``) are removed first.

    Raises:
        CheckpointError: the write failed, however (disk full, permissions, an object torch.save refuses); the
            message names the file and the reason; an existing ``path`` is unchanged.
    """
    path = Path(path)
    remove_stale_temporaries(path)
    try:
        with atomic_file(path) as f:
            out = _Digesting(f)
            try:
                torch.save(obj, out)
            except Exception as error:  # torch reports a full disk as RuntimeError("... unexpected pos ...")
                raise _WriteFailed(_reason(error, path.parent)) from error
            if out.tail[: len(_END_RECORD)] != _END_RECORD or out.tail[-2:] != b"\0\0":
                raise _WriteFailed(f"torch {torch.__version__} wrote a zip archive of an unknown layout")
            comment = _DIGEST + out.sha.hexdigest().encode()
            f.seek(-2, os.SEEK_END)
            f.write(len(comment).to_bytes(2, "little") + comment)
    except Exception as error:
        kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
        reason = str(error) if isinstance(error, _WriteFailed) else _reason(error, path.parent)
        raise CheckpointError(f"cannot write {path}: {reason}{kept}") from (error.__cause__ or error)
    return path.stat().st_size


class _WriteFailed(Exception):
    """Carries the reason of a failed write, told while the partial file still fills the disk."""


class _Digesting:
    """The file object ``torch.save`` writes to: passes every byte on and hashes it, keeping the last 22 (the
    zip archive's end record)."""

    def __init__(self, f) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.tail = b""

    def write(self, data) -> int:
        written = self.f.write(data)
        self.sha.update(data)
        self.tail = (self.tail + bytes(memoryview(data)[-22:]))[-22:]
        return written

    def flush(self) -> None:
        self.f.flush()


def _reason(error: BaseException, folder: Path) -> str:
    """What went wrong, in words: a full disk however torch reports it, else the error's own message."""
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return _NO_SPACE
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, RuntimeError) and "unexpected pos" in str(error) and _disk_full(folder):
        return _NO_SPACE  # torch writing to a path itself: the C++ stream's error, no errno
    if isinstance(error, OSError):  # permissions, a read-only file system, ...: the cause, never the temporary file
        return write_error_reason(error, folder / "file")
    return f"{type(error).__name__}: {error}"


write_failure_reason = _reason  # for the run log's metrics file: one wording of write failures

_NO_SPACE = "no space left on device (free some disk space, or point out_dir elsewhere)"


def _disk_full(folder: Path) -> bool:
    """Whether the file system of ``folder`` has (almost) no room left for this process."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    free = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return free * st.f_frsize < 1 << 16


# ------------------------------------------------------------------------------------------------ reading


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by the engine (tensors on the CPU), after checking its digest.

    Raises:
        CheckpointError: no such file, not a checkpoint of this engine, or damaged (truncated, or a byte changed
            anywhere: the digest does not match); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        digested = _verify_digest(path)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read: {error.strerror or error}") from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle errors, ...
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupted?): {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a supermask_fx training checkpoint")
    version = state.get("version", 0)
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version!r} is newer than this code reads")
    if version >= 2 and not digested:
        raise CheckpointError(f"{path}: damaged: a version-{version} checkpoint without its digest")
    return state


def _verify_digest(path: Path) -> bool:
    """Check the digest at the end of ``path``: ``True`` if it matches; ``False`` for a zip archive without one (a
    version-1 checkpoint) or a file that is no zip archive at all (``torch.load`` then says so). Raises
    ``CheckpointError`` ("damaged") if the digest does not match, or if a file that starts like a zip archive
    ends in neither a digest nor a plain end record (truncated, or a changed byte in the digest record)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, size - 22 - _COMMENT))
        end = f.read()
        if len(end) == 22 + _COMMENT and end.startswith(_END_RECORD) and end[20:22] != b"\0\0":
            comment = end[22:]
            stored = comment[len(_DIGEST) :]
            if (
                end[20:22] != _COMMENT.to_bytes(2, "little")
                or not comment.startswith(_DIGEST)
                or not re.fullmatch(rb"[0-9a-f]{64}", stored)
            ):
                raise CheckpointError(f"{path}: damaged: the digest record at its end is unreadable")
            sha = hashlib.sha256()
            f.seek(0)
            remaining = size - _COMMENT - 2
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:  # the file shrank while it was read
                    break
                sha.update(chunk)
                remaining -= len(chunk)
            sha.update(b"\0\0")  # the empty comment's length, as torch.save wrote it
            if sha.hexdigest().encode() != stored:
                raise CheckpointError(
                    f"{path}: damaged: its content does not match the SHA-256 digest written with it (a changed or "
                    "lost byte on disk or in a copy); resume from an intact copy, or start the run afresh"
                )
            return True
    if end[-22:-18] == _END_RECORD and end[-2:] == b"\0\0":
        return False  # a zip archive without a comment: a version-1 checkpoint (or another torch.save file)
    if head == b"PK\x03\x04":
        raise CheckpointError(f"{path}: damaged: truncated, or the digest record at its end is unreadable")
    return False


# ------------------------------------------------------------------------------------------------ fingerprints


def model_fingerprint(model: nn.Module) -> dict:
    """What identifies a model's architecture and setup: compared when a run resumes from a checkpoint."""
    from ..core.masks import gated_layers

    tensors = [[name, list(t.shape), str(t.dtype).replace("torch.", "")] for name, t in model.state_dict().items()]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    popup = sorted(
        {repr(sorted(gate.config.to_dict().items())) for _, gate in gated_layers(model) if gate.config is not None}
    )
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "tensors": tensors,
        "trainable": trainable,
        "popup": popup,
    }


#: Result fields added after checkpoints were first written, with the value an older checkpoint ran with.
_ADDED_FIELDS = {"k_warmup_epochs": 0.0, "k_warmup_shape": "linear"}


def check_compatible(
    path: str | os.PathLike, state: dict, model_fp: dict, result_fields: dict, data_fp: dict | None = None
) -> None:
    """Raise ``CheckpointMismatchError`` if the checkpoint at ``path`` was made by another model, setting or data
    (``data_fp``: ``{"train": dataset_fingerprint, "test": ... or None}``, compared with the checkpoint's ``"data"``;
    checkpoints written before data fingerprints have none, and are not compared)."""
    saved = state.get("fingerprint", {})
    problems = []
    if saved.get("class") != model_fp["class"]:
        problems.append(f"model class: checkpoint {saved.get('class')}, now {model_fp['class']}")
    theirs = {name: (shape, dtype) for name, shape, dtype in saved.get("tensors", [])}
    ours = {name: (shape, dtype) for name, shape, dtype in model_fp["tensors"]}
    missing = [n for n in theirs if n not in ours]
    extra = [n for n in ours if n not in theirs]
    if missing:
        problems.append(f"{len(missing)} tensors only in the checkpoint, e.g. {', '.join(missing[:3])}")
    if extra:
        problems.append(f"{len(extra)} tensors only in the model, e.g. {', '.join(extra[:3])}")
    shapes = [
        f"{n}: {tuple(theirs[n][0])} {theirs[n][1]} in the checkpoint, {tuple(ours[n][0])} {ours[n][1]} in the model"
        for n in ours
        if n in theirs and theirs[n] != ours[n]
    ]
    problems += shapes[:3] + ([f"... {len(shapes) - 3} more shape differences"] if len(shapes) > 3 else [])
    if not problems and saved.get("trainable") != model_fp["trainable"]:
        problems.append(
            "the trainable tensors differ (e.g. scores vs weights: another method, or fix_masks(train_weights=True))"
        )
    if not problems and saved.get("popup") != model_fp["popup"]:
        problems.append(f"popupify config: checkpoint {saved.get('popup')}, now {model_fp['popup']}")
    if problems:
        raise CheckpointMismatchError(
            f"{path} was saved from a different model: " + "; ".join(problems) + ". Resume it with the model it was "
            "made with, or start this run in another out_dir (or delete the checkpoint)."
        )
    saved_fields = state.get("config", {})
    differs = [
        f"{key}: checkpoint {saved_fields.get(key)!r}, now {value!r}"
        for key, value in result_fields.items()
        if (key in saved_fields or _normal(value) != _normal(_ADDED_FIELDS.get(key)))
        and _normal(saved_fields.get(key)) != _normal(value)
    ]
    if differs:
        raise CheckpointMismatchError(
            f"{path} was made with other training settings: " + "; ".join(differs) + ". A resumed run must use the "
            "settings it started with (the schedule and data order depend on them); start a new run in another "
            "out_dir to change them."
        )
    saved_data = state.get("data")
    if data_fp is not None and isinstance(saved_data, dict):
        differs = []
        for role, name in (("train", "training set"), ("test", "test set")):
            theirs, ours = saved_data.get(role), data_fp.get(role)
            if role == "test" and (theirs is None or ours is None):
                continue  # a test set added or dropped on resume changes only what is evaluated
            difference = _data_difference(theirs, ours)
            if difference:
                differs.append(f"the {name}: {difference}")
        if differs:
            raise CheckpointMismatchError(
                f"{path} was made with other data: " + "; ".join(differs) + ". A resumed run must see the data it "
                "started with (the order of the examples and what was learned so far depend on it): resume with "
                "that data, or start a new run in another out_dir."
            )


def _data_difference(theirs, ours) -> str | None:
    """How two ``dataset_fingerprint``s differ, in words; ``None`` if they do not (or cannot be compared)."""
    if not isinstance(theirs, dict) or not isinstance(ours, dict):
        return None if theirs == ours else f"{_describe_data(theirs)} in the checkpoint, {_describe_data(ours)} now"
    if theirs.get("length") != ours.get("length"):
        return f"{theirs.get('length')} examples in the checkpoint, {ours.get('length')} now"
    if theirs.get("items") and ours.get("items") and theirs["items"] != ours["items"]:
        return (
            f"{ours.get('length')} examples both times, but other items (of {ours.get('sampled')} sampled at fixed "
            "indices, some differ)"
        )
    return None


def _describe_data(fingerprint) -> str:
    return "none" if not isinstance(fingerprint, dict) else f"{fingerprint.get('length')} examples"


def _normal(value):
    return list(value) if isinstance(value, tuple) else value


# ------------------------------------------------------------------------------------------------ random states


def rng_state() -> dict:
    """This process's random-number states (python, numpy, torch CPU and every CUDA device), checkpoint-safe."""
    state = {"python": _python_state(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
