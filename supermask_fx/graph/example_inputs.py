"""Small example inputs for a Hugging Face ``PreTrainedModel`` (built from its config) or a timm model (its
``pretrained_cfg["input_size"]``): what ``popupify`` exports the model with when ``torch.fx`` cannot trace it and the
user gave no ``example_inputs``.

Export in non-strict mode runs the forward on fake tensors, so the sizes cost nothing; they only have to be valid
and take the model's usual path: two sequences of token ids (from 3 up, clear of the usual special tokens), 8 long
or as long as the config's attention pattern needs (``sequence_length``: BigBird's block-sparse attention needs more
than ``(5 + 2 * num_random_blocks) * block_size`` tokens, Longformer-style local attention two windows), images of
the config's size, audio of one second, mel features of the encoder's full length, and 4 decoder ids for
encoder-decoders. Models that name ``use_cache`` get ``use_cache=False`` (a ``DynamicCache`` output is not a pytree;
discovery also turns it off in the config while it captures the graph). ``transformers`` is never imported here:
a model is recognised as a Hugging Face one only when ``transformers`` is already loaded.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

__all__ = ["example_inputs_for", "hf_example_inputs", "is_hf_model"]


def example_inputs_for(model: nn.Module) -> tuple[tuple, dict] | None:
    """Inputs built from what the model says of itself: a Hugging Face config, or a timm ``pretrained_cfg``
    (``input_size``); ``None`` otherwise."""
    inputs = hf_example_inputs(model)
    if inputs is not None:
        return inputs
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if isinstance(size, (tuple, list)) and len(size) == 3:
        return (torch.zeros(2, *size, device=_device(model)),), {}
    return None


def is_hf_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def hf_example_inputs(model: nn.Module) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` for one forward of a Hugging Face model, or ``None`` if it is not one or its inputs are
    not known here (the caller then asks for ``example_inputs=``)."""
    if not is_hf_model(model):
        return None
    config = model.config
    accepted = set(inspect.signature(model.forward).parameters)
    device = _device(model)
    kwargs: dict = {}
    wanted = {getattr(model, "main_input_name", "input_ids")}
    if (
        {"input_ids", "pixel_values"} <= accepted
        and hasattr(config, "vision_config")
        and hasattr(config, "text_config")
    ):
        wanted |= {"input_ids", "pixel_values"}  # dual encoders (CLIP, SigLIP)
    for name in wanted:
        value = _input(name, config, device)
        if value is None or name not in accepted:
            return None
        kwargs[name] = value
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in accepted:
        kwargs["decoder_input_ids"] = _ids(config, device, length=4)
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    return (), kwargs


def _input(name: str, config, device: torch.device) -> torch.Tensor | None:
    vision = getattr(config, "vision_config", None) or config
    if name == "input_ids":
        return _ids(config, device)
    if name == "pixel_values":
        size = getattr(vision, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return torch.zeros(2, getattr(vision, "num_channels", 3), *size, device=device)
    if name == "input_features":
        bins = getattr(config, "num_mel_bins", None)
        positions = getattr(config, "max_source_positions", None)
        if bins is None or positions is None:
            return None
        return torch.zeros(2, bins, 2 * positions, device=device)  # Whisper: two frames per encoder position
    if name == "input_values":
        return torch.zeros(2, 16000, device=device)
    return None


def sequence_length(config, shortest: int = 8) -> int:
    """A token count long enough for the model's own attention pattern (so that capturing the graph takes the path
    real inputs take), at most its number of positions: ``shortest``, or more for block-sparse attention (BigBird:
    more than ``(5 + 2 * num_random_blocks) * block_size`` tokens, a multiple of ``block_size``) and local attention
    windows (Longformer, LED: two of the widest window)."""
    text = getattr(config, "text_config", None) or config
    length = shortest
    block, random_blocks = getattr(text, "block_size", None), getattr(text, "num_random_blocks", None)
    if getattr(text, "attention_type", None) == "block_sparse" and isinstance(block, int) and block > 0:
        length = max(length, (6 + 2 * int(random_blocks or 0)) * block)
    window = getattr(text, "attention_window", None)
    windows = [w for w in (window if isinstance(window, (list, tuple)) else [window]) if isinstance(w, int) and w > 0]
    if windows:
        length = max(length, 2 * max(windows))
    positions = getattr(text, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        length = min(length, positions - 2) if positions > shortest + 2 else min(length, positions)
    return length


def _ids(config, device: torch.device, length: int | None = None) -> torch.Tensor:
    text = getattr(config, "text_config", None) or config
    length = sequence_length(config) if length is None else length
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None) or 16
    return torch.arange(length, device=device).repeat(2, 1) % max(1, vocab - 3) + min(3, vocab - 1)


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
