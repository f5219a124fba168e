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
A method that rewrites its frozen weights keeps what they depend on in buffers of its own (``Method.buffer_names``,
registered by ``Method.attach`` when ``popupify`` attaches these hooks: IteRand's ``generation``); a load brings
those in first and rebuilds the weight from them (``Method.weight_of``), so the check compares the incoming effective
weight with the weight the checkpoint's model held (``load_method_state``).
``supermask_fx.restore(model, source)`` (``files/restore.py``) turns a freshly built model into the saved popupified
one from a state_dict, a file, a Hugging Face ``save_pretrained`` / ``Trainer`` directory or a Lightning checkpoint,
with no discovery pass.
``state_dict(keep_vars=True)`` (used to find parameters, not to save them) returns the frozen Parameters.
"""

from __future__ import annotations

import json
import threading

import torch
from torch import Tensor, nn

from .config import config_differences
from .gate import Gate, gates_of
from .heads import heads_record

RECORD_KEY = "supermask_fx.popupified__load_with_supermask_fx.restore__or_strict_False_for_the_plain_subnetwork"
FORMAT = "supermask_fx.state"
RULE_VERSION = 1

__all__ = [
    "RECORD_KEY",
    "record_of",
    "attach_hooks",
    "detach_hooks",
    "encode_record",
    "decode_record",
    "differences",
    "load_method_state",
]


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
    record = {"format": FORMAT, "rule_version": RULE_VERSION, "config": config.to_dict(), "layers": layers}
    masks = heads_record([(None, g) for m in model.modules() for g in gates_of(m).values()])
    if masks is not None:
        record["masks"] = masks
    return record


def _layer_record(gate: Gate, module_name: str) -> dict:
    return {**gate.ref(module_name).to_record(), "k": getattr(gate, "k_popupify", gate.k)}


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
    for key, theirs, ours in config_differences(a, b):
        out.append(f"{key}: {theirs!r} in the state_dict, {ours!r} in this model")
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
    """Make ``model.state_dict()`` carry the record and ``model.load_state_dict`` check it (called by popupify), and
    let each gated layer's method register the buffers it keeps (``Method.attach``), so that every ``state_dict``
    of the model carries them."""
    for module in model.modules():
        for gate in gates_of(module).values():
            gate.method.attach(gate, module)
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
        return
    names = {id(m): name for name, m in module.named_modules(remove_duplicate=False)}
    for inner in module.modules():  # before any module's weight check (a tied weight's too)
        if gates_of(inner):
            load_method_state(inner, state_dict, prefix + (names[id(inner)] + "." if names[id(inner)] else ""))


def load_method_state(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Bring the buffers that the methods of ``module``'s gated weights keep (``Method.buffer_names``) in from a
    ``state_dict`` being loaded, and rebuild each such weight from them (``Method.weight_of``, in place), before the
    incoming effective weights are checked against the frozen ones. Buffers equal to the incoming ones (already
    brought in by the root's hook, or unchanged) cost one comparison; missing or misshapen entries are left to
    ``load_state_dict``'s own report. A buffer takes the incoming dtype (a count that outgrew a smaller one)."""
    if settings_already_refused():
        return
    for gate in gates_of(module).values():
        names = gate.method.buffer_names(gate)
        if names and _take_buffers(module, state_dict, prefix, names):
            _rebuild_weight(module, gate)


def _take_buffers(module: nn.Module, state_dict: dict, prefix: str, names: tuple[str, ...]) -> bool:
    """Copy the incoming ``names`` into ``module``'s buffers; whether any changed."""
    changed = False
    with torch.no_grad():
        for name in names:
            incoming, own = state_dict.get(prefix + name), module._buffers.get(name)
            if not isinstance(incoming, Tensor) or own is None or incoming.shape != own.shape:
                continue
            incoming = incoming.detach().to(own.device)
            if incoming.dtype == own.dtype and torch.equal(incoming, own):
                continue
            if incoming.dtype != own.dtype:
                own = module._buffers[name] = torch.empty_like(own, dtype=incoming.dtype)
            own.copy_(incoming)
            changed = True
    return changed


def _rebuild_weight(module: nn.Module, gate: Gate) -> None:
    """Write ``Method.weight_of``'s weight into the frozen parameter, in place (its version counter moves, and the
    gate's caches are cleared)."""
    from .popup import expected_weight  # popup imports this module

    weight = module._parameters[gate.param]
    with torch.no_grad():
        rebuilt = expected_weight(gate, weight.detach().cpu(), module)
        weight.copy_(rebuilt.to(weight.device, weight.dtype))
    gate.clear_cache()


def _end_load(module, incompatible_keys) -> None:
    _loading.refused = False
