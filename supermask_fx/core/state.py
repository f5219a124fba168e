"""What a popupified model's ``state_dict`` holds, so that every framework's save and load stays correct.

``model.state_dict()`` of a popupified model holds, under today's keys:

* ``<layer>.weight`` (any gated name): the **effective** weight ``weight * mask`` (the evaluation mask), so that a
  plain model of the same architecture loaded from it with ``strict=False`` (Hugging Face ``from_pretrained``, timm
  and torchvision tools) *is* the subnetwork (bit-identical weights), never the unmasked random network;
* ``<layer>.scores`` (and ``<layer>.mask`` for fixed masks): as before;
* one more key, ``RECORD_KEY``: a uint8 tensor holding JSON of the ``popupify`` settings (the ``PopupConfig``, the
  rule version and, per gated weight, its name, ``k`` and layout). A tensor, so it survives ``torch.save`` and
  safetensors alike; its name says what to do with it, since a plain model's strict ``load_state_dict`` prints it
  among the unexpected keys.

``load_state_dict`` into a popupified model checks the record against the model's own settings and fails with an
error naming each field that differs and its two values; it checks that every effective weight is the model's own
random weight times a 0/1 mask (a checkpoint of other weights or a damaged one is refused); and it keeps the
model's frozen random weights (trained weights, ``method="dense"`` or retraining under ``fix_masks``, are loaded).
``restore(model, source)`` turns a freshly built model into the saved popupified one from a state_dict, a file, a
Hugging Face ``save_pretrained`` / ``Trainer`` directory or a Lightning checkpoint, with no discovery pass.
``state_dict(keep_vars=True)`` (used to find parameters, not to save them) returns the frozen Parameters.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..graph.discover import WeightRef
from .config import PopupConfig
from .gate import Gate, gates_of

RECORD_KEY = "supermask_fx.popupified__load_with_supermask_fx.restore__or_strict_False_for_the_plain_subnetwork"
FORMAT = "supermask_fx.state"
RULE_VERSION = 1

__all__ = ["RECORD_KEY", "restore", "record_of", "attach_hooks", "detach_hooks"]


def record_of(model: nn.Module) -> dict:
    """The settings record of a popupified ``model`` (names relative to ``model``)."""
    prefix = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    layers, configs = [], []
    for module in model.modules():
        for gate in gates_of(module).values():
            module_name = prefix[id(module)]
            layers.append(_layer_record(gate, module_name))
            configs.append(gate.config)
    if not layers:
        return {}
    config = configs[0]
    if any(c != config for c in configs):
        raise ValueError("the model mixes gated layers from several popupify calls")
    return {"format": FORMAT, "rule_version": RULE_VERSION, "config": config.to_dict(), "layers": layers}


def _layer_record(gate: Gate, module_name: str) -> dict:
    return {**gate.ref(module_name).to_record(), "k": gate.k}


def encode_record(record: dict) -> Tensor:
    return torch.frombuffer(bytearray(json.dumps(record, sort_keys=True).encode()), dtype=torch.uint8).clone()


def decode_record(tensor: Tensor, where: str = "") -> dict:
    try:
        record = json.loads(bytes(tensor.detach().cpu().to(torch.uint8).tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as error:
        raise ValueError(f"{where}{RECORD_KEY} is damaged: {error}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{where}{RECORD_KEY} is not a supermask_fx settings record")
    if record.get("rule_version", 0) > RULE_VERSION:
        raise ValueError(f"{where}the settings record is newer than this supermask_fx reads: upgrade supermask_fx")
    return record


def differences(saved: dict, mine: dict) -> list[str]:
    """Human-readable differences between two records: ``"k: 0.3 in the state_dict, 0.5 in this model"``."""
    out = []
    a, b = saved.get("config", {}), mine.get("config", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} in the state_dict, {b.get(key)!r} in this model")
    theirs = {layer["name"]: layer for layer in saved.get("layers", [])}
    ours = {layer["name"]: layer for layer in mine.get("layers", [])}
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    if missing:
        out.append(f"gated in the state_dict, not in this model: {', '.join(missing[:5])}")
    if extra:
        out.append(f"gated in this model, not in the state_dict: {', '.join(extra[:5])}")
    for field in ("k", "fan_in_fan_out", "expert_dims", "fans"):
        differ = [n for n in ours if n in theirs and theirs[n].get(field) != ours[n].get(field)]
        if differ and not (field == "k" and ("k" in a.keys() and a.get("k") != b.get("k"))):
            first = differ[0]
            out.append(
                f"{field} of {len(differ)} layer(s), e.g. {first}: {theirs[first].get(field)!r} in the state_dict, "
                f"{ours[first][field]!r} in this model"
            )
    return out


# ------------------------------------------------------------------------------------------------ hooks


# Set while a load_state_dict whose settings differ runs: the per-weight checks would only repeat the cause.
_loading = threading.local()


def settings_already_refused() -> bool:
    return getattr(_loading, "refused", False)


def attach_hooks(model: nn.Module) -> None:
    """Make ``model.state_dict()`` carry the record and ``model.load_state_dict`` check it (called by popupify)."""
    model._register_state_dict_hook(_add_record)
    model._register_load_state_dict_pre_hook(_check_record, with_module=True)
    model.register_load_state_dict_post_hook(_end_load)


def detach_hooks(model: nn.Module) -> None:
    """Remove the hooks of ``attach_hooks`` from every module of ``model`` (``materialize``)."""
    for module in model.modules():
        for hooks in (module._state_dict_hooks, module._load_state_dict_pre_hooks, module._load_state_dict_post_hooks):
            for key, hook in list(hooks.items()):
                if getattr(hook, "hook", hook) in (_add_record, _check_record, _end_load):
                    del hooks[key]


def _add_record(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    record = record_of(module)
    if record:
        state_dict[prefix + RECORD_KEY] = encode_record(record)


def _check_record(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    tensor = state_dict.pop(prefix + RECORD_KEY, None)
    mine = record_of(module)
    if not mine:
        return
    if tensor is None:
        gated = [prefix + layer["name"] for layer in mine["layers"]]
        if any(key in state_dict for key in gated):
            error_msgs.append(
                "the state_dict has no supermask_fx settings: it was not saved from a popupified model (a plain "
                "model's weights would replace the frozen random weights). Load it into a plain model, or, to "
                "start a popupified model from other weights, load them before popupify."
            )
        return
    try:
        saved = decode_record(tensor)
    except ValueError as error:
        error_msgs.append(str(error))
        return
    differ = differences(saved, mine)
    if differ:
        _loading.refused = True
        error_msgs.append(
            "the state_dict was saved from a model popupified with other settings: "
            + "; ".join(differ[:8])
            + (" ..." if len(differ) > 8 else "")
            + ". Popupify a fresh model with the saved settings: supermask_fx.restore(fresh_model, state_dict)."
        )


def _end_load(module, incompatible_keys) -> None:
    _loading.refused = False


# ------------------------------------------------------------------------------------------------ restore


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
    from .popup import popupify

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
