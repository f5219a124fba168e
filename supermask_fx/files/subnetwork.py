"""Compact subnetwork files: the masks, entropy-coded, plus what cannot be regenerated from the seed.

A found subnetwork is fully described by (architecture, ``PopupConfig``, masks, buffers): the weights are
redrawn from the seed. ``save_subnetwork`` writes a safetensors file (format version 2) with

* ``mask/<layer>.<param>``: the evaluation mask as uint8, in the smaller of two encodings (``mask_codec`` has the
  exact layout): ``"bits"``, bit-packed (8 weights a byte, first weight in the most significant bit, zero-padded:
  1 bit per weight), or ``"rice"``, a Golomb-Rice code of the gaps between the positions of the less frequent
  value (about ``H(k)`` bits per weight: 0.89 at ``k = 0.3``). A mask at ``k = 0.5`` stays at 1 bit per weight;
* ``extra/<layer>.<param>/<key>``: what the layer's method needs beyond the seed to rebuild the weights the mask
  keeps (``Method.file_tensors``; IteRand: the generation of each kept weight, in the smallest unsigned integer
  type that holds them). Methods whose frozen weights are the seeded draw store none;
* ``state/<state_dict key>``: every other ``state_dict`` entry that ``popupify`` does not regenerate: BatchNorm
  running statistics, and parameters like ViT's position embeddings. Gated weights, scores, the methods' own buffers
  (``Method.buffer_names``), zeroed biases and normalization affine values at 1/0 are regenerated and not stored;
* metadata ``supermask_fx``: JSON with the format name and version, the ``PopupConfig``, the model class, per layer
  its name, shape, kept count, the SHA-256 of its seeded float32 draw and the mask's encoding (with the Rice code's
  parameters; for a layer with extras, ``kept_sha256``: the SHA-256 of the float32 weight the method rebuilds, zero
  where the mask drops it), the SHA-256 of the data, and the SHA-256 of the header
  (``supermask_fx.header_sha256``: the JSON header in canonical form without that key, so every byte of the file is
  covered by one checksum or the other).

``load_subnetwork`` rebuilds the supermask network from a freshly built model of the same architecture and
checks everything it can: format, checksums (corruption), the metadata field by field, architecture (names and
shapes), each layer's kept count against the config's ``k`` (top-k methods), regenerated weights (after the
method has read its extras: ``Method.load_file_tensors``), the masks against their metadata. It reads version 2
with both checksums; a file without the header checksum is refused (every released version writes it: one without
it was edited or damaged). A file without extras (every file of a method without them, and every file written
before they existed) loads as it always did.

The file is written and read by the ``safetensors`` package (``safetensors.torch.save``, ``safe_open``). Reading
streams: the header (a few kB) is parsed for its checksum, the data section is hashed in 1 MiB chunks, and the
tensors are read one at a time as the loader needs them, so loading holds about one mask at a time beside the
model, not the whole file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize
from torch import Tensor, nn

from ..core.config import PopupConfig, config_differences
from ..core.gate import Gate, aliases_of, is_gated
from ..core.heads import heads_record, install_heads
from ..core.masks import gated_layers, install_fixed_masks
from ..core.method import Method
from ..core.popup import constant_parameters, expected_weight, popupify
from ..core.state import RECORD_KEY
from ..core.wrappers import unwrap
from ..graph.discover import WeightRef
from .atomic import atomic_file, write_error_reason
from .mask_codec import SubnetworkFileError, decode_mask, encode_mask, pack_bits, unpack_bits

FORMAT = "supermask_fx.subnetwork"
VERSION = 2  # masks as "bits" or "rice" (per layer); version 1 (bits only) was never released
_META = "supermask_fx"
_CHECKSUM = "supermask_fx.content_sha256"
_HEADER_CHECKSUM = "supermask_fx.header_sha256"
_EXTRA = "extra/"  # extra/<gate name>/<key>: a method's file tensors (Method.file_tensors)

__all__ = ["save_subnetwork", "load_subnetwork", "SubnetworkFileError", "pack_bits", "unpack_bits", "unwrap"]


def save_subnetwork(model: nn.Module, path: str | os.PathLike) -> int:
    """Write ``model``'s subnetwork to ``path`` (atomically) and return the file size in bytes.

    For random weights the file stores the seed (the weights are drawn again at load); for kept weights
    (``init="keep"``) a SHA-256 fingerprint of each layer's weights, which a load checks against the model it is
    given. Either way the masks take about 1 bit per weight.

    Raises:
        ValueError: the model is not popupified, uses ``method="dense"``, or its gated weights are no longer the
            ones its seed gives (retrained weights): those need ``materialize`` and a full checkpoint.
        SubnetworkFileError: ``path`` cannot be written (a directory, a folder without write permission, a full
            disk); the message names ``path`` and the cause, the original ``OSError`` is its ``__cause__``, and an
            existing file at ``path`` is unchanged.
    """
    model = unwrap(model)
    pairs = list(gated_layers(model))
    if not pairs:
        raise ValueError("the model has no gated layer: call supermask_fx.popupify(model, k) first")
    config = _single_config(pairs)
    if not pairs[0][1].method.has_mask:
        raise ValueError(
            f"method={config.method!r} trains the weights and has no mask: save it with torch.save(state_dict)"
        )
    tensors: dict[str, Tensor] = {}
    layers = []
    with torch.no_grad():
        for module, gate in pairs:
            weight = module._parameters[gate.param]
            drawn = expected_weight(gate, weight.detach().cpu())  # kept weights: the weight itself
            regenerated = gate.method.weight_of(gate, module, drawn)  # IteRand: with its redraws
            if not torch.equal(weight.detach().cpu(), regenerated.to(weight.dtype)):
                raise ValueError(
                    f"the weights of {gate.name} are not the ones seed {config.seed} gives (were they retrained?); "
                    "a subnetwork file stores masks only: use supermask_fx.materialize(model) and save its "
                    "state_dict instead"
                )
            mask = gate.current_mask(module)
            tensors[f"mask/{gate.name}"], encoding = encode_mask(mask)
            layer = {
                "name": gate.name,
                "shape": list(weight.shape),
                "kept": int(torch.count_nonzero(mask)),
                "sha256": _sha(drawn),
                **gate.ref().to_record(),
                **encoding,
            }
            extras = gate.method.file_tensors(gate, module, mask)
            for key, value in extras.items():
                tensors[f"{_EXTRA}{gate.name}/{key}"] = value.detach().cpu().contiguous()
            if extras:
                layer["kept_sha256"] = _kept_sha(regenerated, mask)
            layers.append(layer)
        for key, value in _stored_state(model, pairs, config).items():
            tensors[f"state/{key}"] = value
    info = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "torch_version": torch.__version__,
        "layers": layers,
    }
    masks = heads_record(pairs)
    if masks is not None:  # named masks: the active one above, the others as state (1 bit per weight each)
        info["masks"] = masks
    return write_file(path, tensors, {_META: json.dumps(info)}, _CHECKSUM, _HEADER_CHECKSUM)


def write_file(
    path: str | os.PathLike,
    tensors: dict[str, Tensor],
    metadata: dict[str, str],
    checksum_key: str | None = None,
    header_checksum_key: str | None = None,
) -> int:
    """Write ``tensors`` and ``metadata`` as a safetensors file, atomically (``atomic.atomic_file``: a temporary
    file in the same folder, fsynced, renamed over ``path``); return its size in bytes.

    With ``checksum_key``, the SHA-256 of the data section is stored under that metadata key; with
    ``header_checksum_key``, the SHA-256 of the rest of the header (``header_sha256``), data checksum included.
    The package lays the data out by dtype and name, whatever the metadata: a first serialization without
    metadata gives the data section (and the tensor entries) the checksums cover, the second writes the file.
    """
    metadata = dict(metadata)
    if checksum_key is not None or header_checksum_key is not None:
        bare = serialize(tensors)
        size = int.from_bytes(bare[:8], "little")
        header = json.loads(bare[8 : 8 + size])
        if checksum_key is not None:
            metadata[checksum_key] = hashlib.sha256(memoryview(bare)[8 + size :]).hexdigest()
        del bare
        if header_checksum_key is not None:
            header["__metadata__"] = metadata
            metadata[header_checksum_key] = header_sha256(header, header_checksum_key)
    data = serialize(tensors, metadata=metadata)
    if header_checksum_key is not None:  # the layout the checksums describe is the one written
        size = int.from_bytes(data[:8], "little")
        if header_sha256(json.loads(data[8 : 8 + size]), header_checksum_key) != metadata[header_checksum_key]:
            raise RuntimeError("safetensors laid the same tensors out differently in two serializations")
    path = Path(path)
    if path.is_dir():
        raise SubnetworkFileError(f"cannot write {path}: it is a directory: give the path of a file in it")
    try:
        with atomic_file(path) as f:
            f.write(data)
    except OSError as error:  # the temporary file's name or none at all: say which file, and why
        kept = f"; the previous {path.name} is unchanged" if path.is_file() else ""
        raise SubnetworkFileError(f"cannot write {path}: {write_error_reason(error, path)}{kept}") from error
    return len(data)


def header_sha256(header: dict, checksum_key: str) -> str:
    """SHA-256 of a parsed safetensors header (tensor entries and ``__metadata__``) without
    ``__metadata__[checksum_key]``, serialized canonically:
    ``json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``. A header that parses to the
    same JSON (other whitespace or padding) has the same checksum; any other change to it does not."""
    metadata = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != checksum_key}
    canonical = {**header, "__metadata__": metadata}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_subnetwork(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the subnetwork saved at ``path`` in ``model`` and return it (masks fixed; call ``.eval()``).

    ``model`` is a freshly built model of the saved architecture (it is popupified with the stored config), or
    one already popupified with the same config; for a file of kept weights (``init="keep"``), a model holding
    the same base weights (e.g. the same ``from_pretrained`` checkpoint). Eval logits equal those of the saved
    model.

    Raises:
        SubnetworkFileError: not a subnetwork file, truncated or corrupted (anywhere: data or header), another
            architecture, another config, or weights that regenerate differently; the message names the file and
            what differs.
    """
    path = Path(path)
    info, config = _read_file(path)
    model = unwrap(model)
    if any(is_gated(m) for m in model.modules()):
        differs = _config_differences(_single_config(list(gated_layers(model))), config)
        if differs:
            raise SubnetworkFileError(f"{path}: the model was popupified with another config: {differs}")
    else:
        layers = info.get("layers", [])
        recorded = all(isinstance(layer, dict) and "expert_dims" in layer for layer in layers)
        popupify(model, config, weights=_recorded_weights(path, info, model) if recorded else None)
        install_heads(model, info.get("masks"))
    pairs = list(gated_layers(model))
    _check_layers(path, info, pairs)
    _check_kept_counts(path, info, pairs, config)
    with torch.no_grad():
        for (module, gate), layer in zip(pairs, info["layers"]):
            _check_drawn(path, info, config, gate, module._parameters[gate.param], layer)
        with _tensors(path) as file:
            names = set(file.keys())
            masks = []
            for (module, gate), layer in zip(pairs, info["layers"]):
                if f"mask/{gate.name}" not in names:
                    raise SubnetworkFileError(f"{path}: corrupted: the file lacks the mask of {gate.name}")
                mask = decode_mask(file.get_tensor(f"mask/{gate.name}"), layer, where=f"{path}: ")
                _load_extras(path, file, names, module, gate, mask)
                _check_rebuilt(path, info, module, gate, layer, mask)
                masks.append(mask)
            install_fixed_masks(model, pairs, masks)  # the file's masks; none is selected first
            del masks
            stored = {name[len("state/") :]: name for name in names if name.startswith("state/")}
            expected = _stored_state(model, pairs, config, include_changed_constants=False)
            missing = sorted(set(expected) - set(stored))
            if missing:
                raise SubnetworkFileError(f"{path}: another architecture: the file lacks state entries {missing[:5]}")
            own = model.state_dict(keep_vars=True)  # the tensors themselves: no weight * mask of every layer
            for key, name in sorted(stored.items()):
                if key not in own:
                    raise SubnetworkFileError(f"{path}: another architecture: the model has no entry {key!r}")
                shape = tuple(file.get_slice(name).get_shape())
                if tuple(own[key].shape) != shape:
                    raise SubnetworkFileError(
                        f"{path}: another architecture: {key} has shape {shape} in the file, "
                        f"{tuple(own[key].shape)} in the model"
                    )
                own[key].copy_(file.get_tensor(name))
    for _, gate in pairs:
        gate.clear_cache()
    return model


def _check_drawn(path: Path, info: dict, config: PopupConfig, gate: Gate, weight: Tensor, layer: dict) -> None:
    """The layer's seeded draw (or kept base weight) against the file's SHA-256 of it and, for a method whose frozen
    weight is that draw (``Method.weight_of`` not overridden), against the model's weight."""
    regenerated = expected_weight(gate, weight.detach().cpu())
    if _sha(regenerated) != layer["sha256"] and not config.source.regenerates:
        raise SubnetworkFileError(
            f"{path}: the model's weights of {gate.name} are not the base weights the file's masks were "
            "found on (their SHA-256 differs): load those weights into the model (e.g. the same "
            "from_pretrained checkpoint) before load_subnetwork"
        )
    if _sha(regenerated) != layer["sha256"]:
        raise SubnetworkFileError(
            f"{path}: the weights regenerated for {gate.name} from seed {config.seed} differ from those the "
            f"file was made with (torch {info.get('torch_version')} then, {torch.__version__} now)"
        )
    if _weight_is_drawn(gate) and not torch.equal(weight.detach().cpu(), regenerated.to(weight.dtype)):
        raise SubnetworkFileError(f"{path}: the model's weights of {gate.name} are not the seed's weights")


def _weight_is_drawn(gate: Gate) -> bool:
    """Whether the layer's frozen weight is its seeded draw itself (the method keeps ``Method.weight_of``)."""
    return type(gate.method).weight_of is Method.weight_of


def _load_extras(path: Path, file, names: set[str], module: nn.Module, gate: Gate, mask: Tensor) -> None:
    """Hand the layer's ``extra/<gate name>/<key>`` tensors (none in a file of a method without extras) to its
    method (``Method.load_file_tensors``), which makes the module hold the weights they describe."""
    stem = f"{_EXTRA}{gate.name}/"
    extras = {name[len(stem) :]: file.get_tensor(name) for name in sorted(names) if name.startswith(stem)}
    try:
        gate.method.load_file_tensors(gate, module, extras, mask)
    except ValueError as error:
        raise SubnetworkFileError(f"{path}: corrupted: {error}") from None


def _check_rebuilt(path: Path, info: dict, module: nn.Module, gate: Gate, layer: dict, mask: Tensor) -> None:
    """For a method that rewrites its frozen weights: the model's weight against what the method makes of the seeded
    draw (``Method.weight_of``, after ``_load_extras``) and, for a layer with extras, the kept weights against the
    file's ``kept_sha256``."""
    if _weight_is_drawn(gate) and "kept_sha256" not in layer:
        return  # checked against the draw already (_check_drawn)
    weight = module._parameters[gate.param]
    expected = expected_weight(gate, weight.detach().cpu(), module)
    if "kept_sha256" in layer and _kept_sha(expected, mask) != layer["kept_sha256"]:
        raise SubnetworkFileError(
            f"{path}: the weights rebuilt for {gate.name} from seed {gate.config.seed} and the file's extras differ "
            f"from those the file was made with (torch {info.get('torch_version')} then, {torch.__version__} now), "
            "or the extras are damaged"
        )
    if not torch.equal(weight.detach().cpu(), expected.to(weight.dtype)):
        raise SubnetworkFileError(f"{path}: the model's weights of {gate.name} are not the seed's weights")


def _read_file(path: Path) -> tuple[dict, PopupConfig]:
    """The file's ``supermask_fx`` metadata and config, after every check that needs no model: a readable,
    complete safetensors header, both checksums (the data section streamed through SHA-256), the ``safetensors``
    package's own checks of the header, then the metadata field by field. Every failure is a
    ``SubnetworkFileError`` naming the file and what is wrong. The tensors are read later (``_tensors``)."""
    try:
        with open(path, "rb") as f:
            header, data_sha256 = _read_header_and_hash(path, f)
    except FileNotFoundError:
        raise SubnetworkFileError(f"{path}: no such file") from None
    except OSError as error:
        raise SubnetworkFileError(f"{path}: cannot be read: {error.strerror or error}") from None
    metadata = header["__metadata__"]
    ours = {_META, _CHECKSUM, _HEADER_CHECKSUM}
    if not ours & set(metadata):
        raise SubnetworkFileError(f"{path}: a safetensors file, but not a supermask_fx subnetwork (no metadata)")
    if _HEADER_CHECKSUM not in metadata:
        # Every file supermask_fx has released writes it: a file without it was edited or damaged, and its header
        # (the config, the kept counts) can no longer be trusted.
        raise SubnetworkFileError(
            f"{path}: corrupted: the header checksum ({_HEADER_CHECKSUM}) is missing"
            + (f" (metadata keys {sorted(metadata)})" if set(metadata) - ours else "")
            + "; every subnetwork file carries one, so the header was edited or damaged: save the subnetwork again "
            "from its model (supermask_fx.save_subnetwork)"
        )
    if metadata[_HEADER_CHECKSUM] != header_sha256(header, _HEADER_CHECKSUM):
        raise SubnetworkFileError(
            f"{path}: corrupted: the header does not match its SHA-256 checksum ({_HEADER_CHECKSUM})"
        )
    if _META not in metadata:
        raise SubnetworkFileError(f"{path}: corrupted: the supermask_fx metadata is missing")
    if _CHECKSUM not in metadata:
        raise SubnetworkFileError(f"{path}: corrupted: the data checksum ({_CHECKSUM}) is missing")
    if metadata[_CHECKSUM] != data_sha256:
        raise SubnetworkFileError(f"{path}: corrupted: the data does not match its SHA-256 checksum")
    with _tensors(path):  # the package's own checks of the header, before the model is changed
        pass
    try:
        info = json.loads(metadata[_META])
    except (ValueError, RecursionError) as error:
        raise SubnetworkFileError(f"{path}: corrupted: the supermask_fx metadata is not valid JSON ({error})") from None
    if not isinstance(info, dict):
        raise SubnetworkFileError(f"{path}: corrupted: the supermask_fx metadata is not a JSON object")
    if info.get("format") != FORMAT or not isinstance(info.get("version"), int) or isinstance(info["version"], bool):
        raise SubnetworkFileError(f"{path}: unknown format {info.get('format')!r}")
    if info["version"] > VERSION:
        raise SubnetworkFileError(
            f"{path}: format version {info['version']} is newer than this supermask_fx reads ({VERSION}): upgrade"
        )
    if info["version"] < VERSION:  # version 1 was written only before the first release
        raise SubnetworkFileError(f"{path}: format version {info['version']} predates 0.1.0 and is not read")
    _check_layer_entries(path, info)
    if not isinstance(info.get("config"), dict):
        raise SubnetworkFileError(f"{path}: corrupted: the metadata has no config")
    try:
        config = PopupConfig.from_dict(info["config"])
    except (ValueError, TypeError, KeyError) as error:
        raise SubnetworkFileError(f"{path}: corrupted: invalid config in the metadata: {error}") from None
    return info, config


def _read_header_and_hash(path: Path, f) -> tuple[dict, str]:
    """The parsed JSON header of the open safetensors file ``f`` (``header["__metadata__"]`` always there: a dict
    of strings, empty if the file has none) and the SHA-256 of its data section, read in 1 MiB chunks.
    Raises ``SubnetworkFileError`` for a truncated file or a header that is not a safetensors header."""
    start = f.read(8)
    file_size = os.fstat(f.fileno()).st_size
    if len(start) < 8:
        raise SubnetworkFileError(
            f"{path}: only {len(start)} bytes, truncated (a safetensors file starts with 8 bytes)"
        )
    size = int.from_bytes(start, "little")
    if size > file_size - 8:
        raise SubnetworkFileError(f"{path}: header claims {size} bytes but the file has {file_size - 8}: truncated")
    try:
        header = json.loads(f.read(size))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise SubnetworkFileError(
            f"{path}: header is not valid JSON ({error}): not safetensors, or corrupted"
        ) from None
    if not isinstance(header, dict):
        raise SubnetworkFileError(f"{path}: header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SubnetworkFileError(f"{path}: header's __metadata__ is not a map of strings: corrupted")
    header["__metadata__"] = metadata
    data_size = file_size - 8 - size
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) and name != "__metadata__" else None
        if isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(x) for x in offsets):
            if offsets[1] > data_size:
                raise SubnetworkFileError(
                    f"{path}: tensor {name!r} ends at byte {offsets[1]}, data has {data_size}: truncated"
                )
    digest = hashlib.sha256()
    while chunk := f.read(1 << 20):
        digest.update(chunk)
    return header, digest.hexdigest()


@contextlib.contextmanager
def _tensors(path: Path) -> Iterator:
    """The file opened by the ``safetensors`` package (``safe_open``: ``keys()``, ``get_tensor(name)`` reads that
    tensor alone); its errors become a ``SubnetworkFileError`` naming the file."""
    try:
        with safe_open(path, framework="pt") as file:
            yield file
    except SafetensorError as error:
        raise SubnetworkFileError(f"{path}: not a readable safetensors file ({error}): corrupted") from None


def _check_layer_entries(path: Path, info: dict) -> None:
    """Each ``layers`` entry has the fields and types the loader reads (the mask encodings' own fields are
    checked by ``decode_mask``)."""
    layers = info.get("layers")
    if not isinstance(layers, list):
        raise SubnetworkFileError(f"{path}: corrupted: the metadata has no list of layers")
    for i, layer in enumerate(layers):
        problem = None
        if not isinstance(layer, dict) or not isinstance(layer.get("name"), str):
            problem = "no name"
        elif not isinstance(layer.get("shape"), list) or not all(_is_count(d) for d in layer["shape"]):
            problem = f"shape {layer.get('shape')!r}"
        elif not _is_count(layer.get("kept")):
            problem = f"kept {layer.get('kept')!r}"
        elif not isinstance(layer.get("sha256"), str):
            problem = "no weight sha256"
        elif not isinstance(layer.get("fan_in_fan_out", False), bool):
            problem = f"fan_in_fan_out {layer.get('fan_in_fan_out')!r}"
        elif not _is_count(layer.get("expert_dims", 0)):
            problem = f"expert_dims {layer.get('expert_dims')!r}"
        elif "fans" in layer and not (
            isinstance(layer["fans"], list) and len(layer["fans"]) == 2 and all(_is_count(f) for f in layer["fans"])
        ):
            problem = f"fans {layer.get('fans')!r}"
        elif not isinstance(layer.get("encoding", "bits"), str):
            problem = f"encoding {layer.get('encoding')!r}"
        elif not isinstance(layer.get("kept_sha256", ""), str):
            problem = f"kept_sha256 {layer.get('kept_sha256')!r}"
        if problem is not None:
            raise SubnetworkFileError(f"{path}: corrupted: layer entry {i} of the metadata: {problem}")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _recorded_weights(path: Path, info: dict, model: nn.Module) -> list[WeightRef]:
    """The gated weights as the file lists them (names and layouts): no discovery pass at load time. Checked
    against ``model`` first (every listed weight exists with its shape), so that another architecture is refused
    before the model is changed."""
    params = dict(model.named_parameters(remove_duplicate=False))
    refs, problems = [], []
    for layer in info.get("layers", []):
        if not isinstance(layer, dict) or not isinstance(layer.get("name"), str):
            raise SubnetworkFileError(f"{path}: corrupted: a layer entry without a name")
        name, shape = layer["name"], tuple(layer.get("shape", ()))
        if name not in params:
            problems.append(f"{name}: missing from the model")
        elif tuple(params[name].shape) != shape:
            problems.append(f"{name}: shape {shape} in the file, {tuple(params[name].shape)} in the model")
        refs.append(WeightRef.from_record(layer))
    if problems:
        raise SubnetworkFileError(
            f"{path}: saved from another architecture ({info.get('model_class')}): "
            + "; ".join(problems[:6])
            + (" ..." if len(problems) > 6 else "")
        )
    return refs


def _stored_state(
    model: nn.Module, pairs: list[tuple[nn.Module, Gate]], config: PopupConfig, include_changed_constants: bool = True
) -> dict[str, Tensor]:
    """``state_dict`` entries that are not regenerated by ``popupify``, hence stored in the file."""
    prefix = {id(m): name + "." if name else "" for name, m in model.named_modules(remove_duplicate=False)}
    regenerated: set[str] = set()
    for module, gate in pairs:
        p = prefix[id(module)]
        regenerated.update({p + gate.param, p + gate.mask_buffer} | ({p + gate.scores} if gate.scores else set()))
        regenerated.update(p + name for name in gate.method.buffer_names(gate))  # in extra/ if the file needs them
    for module in model.modules():  # tied to a gated weight: regenerated with it
        regenerated.update(prefix[id(module)] + name for name in aliases_of(module))
    discovery = model.__dict__.get("_supermask_discovery")
    constants = constant_parameters(model, pairs, config, getattr(discovery, "untrained", ()))
    out = {}
    seen: set[int] = set()  # a tensor held under several names (tied parameters) is stored once, under its first
    # keep_vars: gated weights come as the Parameters (skipped here), not as weight * mask: no copy of every layer
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            continue
        seen.add(id(value))
        value = value.detach()
        if key in regenerated or key.endswith(RECORD_KEY):
            continue
        if key in constants:
            if not include_changed_constants or bool((value == constants[key]).all()):
                continue
        out[key] = value
    return out


def _single_config(pairs: list[tuple[nn.Module, Gate]]) -> PopupConfig:
    configs = {gate.config for _, gate in pairs}
    if len(configs) != 1:
        raise ValueError("the model mixes gated layers from several popupify calls; save each part separately")
    return configs.pop()


def _config_differences(mine: PopupConfig, theirs: PopupConfig) -> str:
    differ = config_differences(theirs.to_dict(), mine.to_dict())
    return "; ".join(f"{key}: file has {file!r}, model has {model!r}" for key, file, model in differ)


def _check_layers(path: Path, info: dict, pairs: list[tuple[nn.Module, Gate]]) -> None:
    ours = [(gate.name, list(module._parameters[gate.param].shape)) for module, gate in pairs]
    theirs = [(layer["name"], list(layer["shape"])) for layer in info["layers"]]
    if ours == theirs:
        return
    our_names, their_names = dict(ours), dict(theirs)
    problems = [f"{n}: missing from the model" for n in their_names if n not in our_names]
    problems += [f"{n}: not in the file" for n in our_names if n not in their_names]
    problems += [
        f"{n}: shape {tuple(their_names[n])} in the file, {tuple(our_names[n])} in the model"
        for n in their_names
        if n in our_names and our_names[n] != their_names[n]
    ]
    problems = problems or ["the layers come in another order"]
    raise SubnetworkFileError(
        f"{path}: saved from another architecture ({info.get('model_class')}, {len(theirs)} gated layers; "
        f"this model: {len(ours)}): " + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else "")
    )


def _check_kept_counts(path: Path, info: dict, pairs: list[tuple[nn.Module, Gate]], config: PopupConfig) -> None:
    """The kept count of each layer in the file against what ``k`` keeps: a top-k mask keeps exactly
    ``kept_count(n, k)`` of the ``n`` entries it ranks (per layer, per expert matrix of a stack, or over all
    globally ranked layers together: the ``TopKSelector`` popupify built for the config). ``decode_mask`` then
    checks each mask against its kept count. ``sampled`` masks (a threshold of the scores) have no such count."""
    groups: dict[int, tuple[object, list[tuple[Gate, int]]]] = {}
    for (_, gate), layer in zip(pairs, info["layers"]):
        if gate.method.uses_topk and gate.selector is not None:
            groups.setdefault(id(gate.selector), (gate.selector, []))[1].append((gate, layer["kept"]))
    for selector, members in groups.values():
        segments = selector.segments()  # (entries ranked, entries kept) of each group ranked on its own
        expected = sum(kept for _, kept in segments)
        found = sum(count for _, count in members)
        if found != expected:
            if len(members) == 1:
                gate = members[0][0]
                what, k = f"{gate.name} keeps", gate.k
                ranked = f"{segments[0][0]:,} weights" + (
                    f" in each of {len(segments)} experts" if len(segments) > 1 else ""
                )
            else:
                what, k = f"the {len(members)} globally ranked layers keep", config.k
                ranked = f"{segments[0][0]:,} weights"
            raise SubnetworkFileError(
                f"{path}: corrupted: {what} {found:,} weights in the file, but k={k} keeps exactly {expected:,} "
                f"(of {ranked}, method {config.method!r}): the header's config and its masks disagree; save the "
                "subnetwork again from its model"
            )


def _kept_sha(weight: Tensor, mask: Tensor) -> str:
    """SHA-256 (``_sha``) of the float32 ``weight`` where ``mask`` keeps it, 0 elsewhere."""
    return _sha(torch.where(mask.to("cpu", torch.bool), weight.to("cpu", torch.float32), 0.0))


def _sha(t: Tensor) -> str:
    """SHA-256 of the raw little-endian bytes of ``t`` in row-major order."""
    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy()).hexdigest()  # hashed in place: no copy of the bytes
