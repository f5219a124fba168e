"""``restore``: a saved popupified model back from a state_dict, a file, a Hugging Face directory or a checkpoint.

Reading the sources (safetensors and ``torch.save`` files, ``save_pretrained`` directories with their shard index,
Lightning and torchvision checkpoint dicts) lives here, with the other files; what a popupified ``state_dict``
holds, and the checks its load runs, live in ``core.state``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..core.config import PopupConfig
from ..core.gate import gates_of
from ..core.heads import install_heads
from ..core.popup import popupify
from ..core.state import RECORD_KEY, decode_record
from ..graph.discover import WeightRef

__all__ = ["restore"]


def restore(model: nn.Module, source) -> nn.Module:
    """Rebuild a saved popupified model: ``model`` is freshly built (plain) or already popupified with the same
    settings; ``source`` is a ``state_dict``, a ``.safetensors`` / ``.pt`` / ``.bin`` / ``.ckpt`` file, a Hugging
    Face ``save_pretrained`` / ``Trainer.save_model`` directory, or a checkpoint dict holding the state_dict under
    ``"state_dict"`` (Lightning) or ``"model"`` (torchvision). Returns ``model``, with scores, masks and every
    other entry loaded (train it further, or ``.eval()`` it: the same logits as the saved model).

    Raises:
        ValueError: the source has no settings record, was saved from another architecture (the message names
            the missing or unexpected entries, or each tensor of another shape with both shapes), or was
            popupified with other settings than ``model`` (the message names the fields).
    """
    state, where = _read(source)
    record_key = next((key for key in state if key.endswith(RECORD_KEY)), None)
    if record_key is None:
        raise ValueError(
            f"{where}no supermask_fx settings ({RECORD_KEY}): not a popupified model's state_dict (a plain "
            "state_dict loads with model.load_state_dict; a subnetwork file with supermask_fx.load_subnetwork)"
        )
    prefix = record_key[: -len(RECORD_KEY)]
    state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    record = decode_record(state[RECORD_KEY], where)
    _check_shapes(model, state, where)  # before popupify: a refused source leaves the model as it was
    if not any(gates_of(m) for m in model.modules()):
        names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        unknown = [layer["name"] for layer in record["layers"] if layer["name"] not in names]
        if unknown:
            raise ValueError(f"{where}saved from another architecture: this model has no {', '.join(unknown[:5])}")
        refs = [WeightRef.from_record(layer) for layer in record["layers"]]
        config = PopupConfig.from_dict(record["config"])
        popupify(model, config, weights=refs)
        model.__dict__["_supermask_discovery"].path = "recorded"
        install_heads(model, record.get("masks"))  # named masks: buffers for the state_dict to fill
    _check_shapes(model, state, where)  # the scores and masks popupify added
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # the settings or weight checks of the load hooks: the documented ValueError
        raise ValueError(f"{where}{error}") from error
    tied = _tied_names(model)
    missing = [key for key in result.missing_keys if not (tied.get(key, set()) & state.keys())]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{where}saved from another architecture: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model


def _check_shapes(model: nn.Module, state: Mapping, where: str) -> None:
    """``ValueError`` naming every entry of ``state`` whose shape differs from the model's tensor of that name
    (a model of another width or depth), instead of torch's ``RuntimeError`` from ``load_state_dict``."""
    own = {name: t for name, t in model.state_dict(keep_vars=True).items() if not name.endswith(RECORD_KEY)}
    differ = [
        f"{name}: {tuple(value.shape)} in the source, {tuple(own[name].shape)} in this model"
        for name, value in state.items()
        if name in own and isinstance(value, Tensor) and tuple(value.shape) != tuple(own[name].shape)
    ]
    if differ:
        raise ValueError(
            f"{where}saved from another architecture: {len(differ)} tensor(s) of another shape: "
            + "; ".join(differ[:10])
            + (f"; and {len(differ) - 10} more" if len(differ) > 10 else "")
            + ". Build the model with the configuration it was saved from (same widths and sizes), then restore."
        )


def _tied_names(model: nn.Module) -> dict[str, set[str]]:
    """``{name: other names of the same tensor}`` for parameters and buffers held under several names."""
    by_id: dict[int, set[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        by_id.setdefault(id(t), set()).add(name)
    return {name: names - {name} for names in by_id.values() for name in names}


def _read(source) -> tuple[dict, str]:
    if isinstance(source, Mapping):
        state = dict(source)
        where = ""
    else:
        path = Path(os.fspath(source))
        where = f"{path}: "
        if path.is_dir():
            state = _read_directory(path)
        elif path.suffix == ".safetensors":
            state = _load_safetensors(path)
        elif path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"{path}: no such file or directory")
    for key in ("state_dict", "model"):  # Lightning, torchvision reference checkpoints
        if not any(k.endswith(RECORD_KEY) for k in state) and isinstance(state.get(key), Mapping):
            state = dict(state[key])
    return state, where


def _read_directory(path: Path) -> dict:
    """A Hugging Face save directory: ``model.safetensors``, its sharded index, or ``pytorch_model.bin``."""
    if (path / "model.safetensors").is_file():
        return _load_safetensors(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(_load_safetensors(path / shard))
        return state
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin in it")


def _load_safetensors(path: Path) -> dict:
    """Every tensor of a safetensors file (the ``safetensors`` package: a state_dict is loaded whole); a damaged
    or truncated file is a ``ValueError`` naming it."""
    try:
        return load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
