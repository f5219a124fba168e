"""Training checkpoints: atomic writes, exact resume, and a clear error for a checkpoint of another run.

A checkpoint (``torch.save`` of a dict of tensors and plain values, read back with ``weights_only=True``) holds:
the model's ``state_dict`` (scores, weights, masks, BatchNorm statistics), the optimizer and scheduler states,
the random-number states of every process (python, numpy, torch, CUDA), the number of finished epochs and
optimizer steps, the metrics history, the ``TrainConfig`` and a fingerprint of the model (class, tensor names,
shapes and dtypes, trainable tensors, ``popupify`` config) that ``check_compatible`` compares when resuming.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_file

FORMAT = "supermask_fx.training.checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions) or read (truncated, not a checkpoint)."""


class CheckpointMismatchError(ValueError):
    """The checkpoint was made by another model or with other training settings; the message lists what differs."""


# ------------------------------------------------------------------------------------------------ writing


def atomic_save(obj, path: str | os.PathLike) -> int:
    """``torch.save(obj)`` to ``path`` atomically and durably; returns the file size.

    The data goes to a temporary file in the same folder, is flushed and fsync'ed, then renamed over ``path``
    (``os.replace``), and the folder is fsync'ed. A crash, a kill or a full disk at any moment leaves either the
    old file or the new one under ``path``, never a mixture, and no temporary file behind.

    Raises:
        CheckpointError: the write failed (the message names the reason; an existing ``path`` is unchanged).
    """
    path = Path(path)
    try:
        with atomic_file(path) as f:
            torch.save(obj, f)
    except OSError as error:
        kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
        raise CheckpointError(f"cannot write {path}: {_reason(error)}{kept}") from error
    return path.stat().st_size


def _reason(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "no space left on device (free some disk space, or point out_dir elsewhere)"
    return error.strerror or str(error)


# ------------------------------------------------------------------------------------------------ reading


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by the engine (tensors on the CPU).

    Raises:
        CheckpointError: no such file, not a checkpoint of this engine, truncated or corrupted.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle errors, ...
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupted?): {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a supermask_fx training checkpoint")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state['version']} is newer than this code reads")
    return state


# ------------------------------------------------------------------------------------------------ fingerprints


def model_fingerprint(model: nn.Module) -> dict:
    """What identifies a model's architecture and setup: compared when a run resumes from a checkpoint."""
    from ..masks import gated_layers

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


def check_compatible(path: str | os.PathLike, state: dict, model_fp: dict, result_fields: dict) -> None:
    """Raise ``CheckpointMismatchError`` if the checkpoint at ``path`` was made by another model or setting."""
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
        if _normal(saved_fields.get(key)) != _normal(value)
    ]
    if differs:
        raise CheckpointMismatchError(
            f"{path} was made with other training settings: " + "; ".join(differs) + ". A resumed run must use the "
            "settings it started with (the schedule and data order depend on them); start a new run in another "
            "out_dir to change them."
        )


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
