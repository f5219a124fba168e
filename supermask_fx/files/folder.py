"""A folder of masks for a base model, as PEFT saves an adapter beside the model it adapts.

``save_masks(model, directory)`` writes two files:

* ``subnetwork.safetensors``: the subnetwork file (``files/subnetwork.py``): every mask head of the model (1 bit per
  weight each, the active one entropy-coded), the state popupify does not regenerate, and per layer the SHA-256 of the
  base weight (for ``init="keep"``) or the seed the weights are drawn from;
* ``supermask_config.json``: what a person or a tool reads first: the format, the base it applies to
  (``base_model_name_or_path``, the base's class), the popupify settings, the mask names and the active one, and
  ``base_sha256``, one fingerprint of all base weights (SHA-256 of the layers' SHA-256s in order) for kept weights.

``load_masks(model, directory)`` puts them onto ``model`` (a freshly built or ``from_pretrained`` base): the file
checks the architecture, the settings and each base weight, and a model holding other weights is refused with a
``SubnetworkFileError``. The masks load fixed (``load_subnetwork``); to train further, keep the full ``state_dict``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from torch import nn

from ..core.heads import active_mask, list_masks
from ..core.masks import gated_layers
from ..core.wrappers import unwrap
from .atomic import atomic_file
from .mask_codec import SubnetworkFileError
from .subnetwork import load_subnetwork, save_subnetwork

__all__ = ["save_masks", "load_masks", "MASKS_CONFIG", "MASKS_FILE"]

MASKS_CONFIG = "supermask_config.json"
MASKS_FILE = "subnetwork.safetensors"
FORMAT = "supermask_fx.masks"
VERSION = 1


def save_masks(model: nn.Module, directory: str | os.PathLike, base: str | None = None) -> Path:
    """Write ``model``'s masks into ``directory`` (created if needed; see the module docstring) and return it.
    ``base``: what the masks apply to, for the JSON (default: a Hugging Face model's ``name_or_path``)."""
    model = unwrap(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_subnetwork(model, directory / MASKS_FILE)
    pairs = list(gated_layers(model))
    config = pairs[0][1].config
    hf_config = getattr(model, "config", None)
    if base is None:
        base = getattr(hf_config, "_name_or_path", None) or None
    info = {
        "format": FORMAT,
        "version": VERSION,
        "file": MASKS_FILE,
        "base_model_name_or_path": base,
        "base_model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "popupify": config.to_dict(),
        "masks": list_masks(model),
        "active": active_mask(model),
        "base_sha256": _base_fingerprint(directory / MASKS_FILE) if config.init == "keep" else None,
    }
    with atomic_file(directory / MASKS_CONFIG) as f:
        f.write(json.dumps(info, indent=2, sort_keys=True).encode())
    return directory


def load_masks(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Put the masks saved in ``directory`` onto ``model`` (the base) and return it (masks fixed; ``.eval()`` it).

    Raises:
        SubnetworkFileError: no masks folder, a damaged one, or a model of another architecture, settings or base
            weights (the message names what differs).
    """
    directory = Path(directory)
    try:
        info = json.loads((directory / MASKS_CONFIG).read_text())
    except FileNotFoundError:
        raise SubnetworkFileError(f"{directory}: no {MASKS_CONFIG}: not a folder written by save_masks") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SubnetworkFileError(f"{directory / MASKS_CONFIG}: damaged ({error})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise SubnetworkFileError(f"{directory / MASKS_CONFIG}: not a supermask_fx masks config")
    if info.get("version", 0) > VERSION:
        raise SubnetworkFileError(f"{directory / MASKS_CONFIG}: written by a newer supermask_fx: upgrade it")
    path = directory / str(info.get("file", MASKS_FILE))
    expected = info.get("base_sha256")
    if expected is not None and _base_fingerprint(path) != expected:
        raise SubnetworkFileError(f"{path}: its base fingerprint differs from {MASKS_CONFIG}'s: the folder is mixed")
    return load_subnetwork(model, path)


def _base_fingerprint(path: Path) -> str:
    """SHA-256 over the per-layer weight SHA-256s a subnetwork file records, in order."""
    from .subnetwork import _read_file

    info, _ = _read_file(path)
    digest = hashlib.sha256()
    for layer in info["layers"]:
        digest.update(layer["sha256"].encode())
    return digest.hexdigest()
