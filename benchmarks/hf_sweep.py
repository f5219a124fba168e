"""Sweep ``popupify(model, k=0.5)`` (no other argument) over Hugging Face transformers families built offline from
tiny configs, and check each result independently of the library's own answers.

Resumable: families already in the results file are skipped; one JSON line is appended per family as it finishes.
Each family runs in a forked child with a time limit (a hang or a crash costs one family, not the sweep).

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hf_sweep.py --budget 4200   # run / resume
    .venv/bin/python benchmarks/hf_sweep.py --summary                                        # failure classes
    .venv/bin/python benchmarks/hf_sweep.py --families gpt2,llama --timeout 120              # a few families

Per family (``model_type``), the record holds:

1. ``build``: ok or skipped (why; every try of class x config shrink); ``popupify``: ok or the exception; ``seconds``;
   ``path`` (``coverage(model).path``); ``warnings`` (text of the warnings popupify raised).
2. ``tree_changed`` / ``attrs_changed`` / ``config_changed``: module names and (base) classes, plain attributes of
   every module and the config dict, before vs after popupify (a gated ``SupermaskX`` counts as X).
3. ``forward``: a forward with our own inputs after popupify, at two sequence lengths for text models.
4. ``untrained_changed``: parameters (and buffers) with requires_grad=False before popupify that are not
   bit-identical after.
5. ``ungated``: every 2+-dim parameter that trained before and is not gated: coverage's reason, and our own walk of
   the ``torch.export`` ATen graph: whether a chain of parameter-only ops (not mixed with the inputs) carries it to
   an operand of a matrix product / linear / conv / embedding (``reach``: weight / product / input operand, the
   ops on the way). ``suspects`` are those that reach a weight or product operand.
   ``overgated``: gated weights our walk does not see reaching such an operand.
6. ``norms``: each module whose class name contains "Norm", fed a random input of its width after popupify, must
   return the plain layer-normalized or RMS-normalized input (no affine) to 1e-5 relative (batch/group/instance
   norms: the plain version of their own statistics).
7. ``experts``: gated weights with more than 2 dims (shape, expert_dims, fan_in_fan_out, std of the drawn weight and
   the fan-in it implies for signed constant, std = sqrt(2 / fan_in)); ``fan_in_mismatch``: any gated weight whose
   implied fan-in is not a fan-in our graph walk sees at its product (contracted size at the op; conv and
   embedding: torch.nn.init's rule on the operand).
8. ``subnetwork``: save_subnetwork, load_subnetwork into a freshly built model, identical outputs (torch.equal).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "hf_sweep.jsonl"

PRIORITY = """bert roberta deberta-v2 distilbert albert electra xlm-roberta mpnet gpt2 gpt-neo gpt-neox gptj opt bloom
falcon llama mistral mixtral qwen2 qwen2-moe qwen3 qwen3-moe gemma gemma2 gemma3 phi phi3 stablelm olmo olmo2 granite
granitemoe jamba mamba rwkv t5 mt5 bart mbart pegasus marian led bigbird longformer funnel mobilebert reformer xlnet
transfo-xl ctrl deberta convbert canine vit deit beit swin swinv2 convnext convnextv2 resnet regnet efficientnet
mobilenet_v2 mobilevit dinov2 clip siglip blip blip-2 llava whisper wav2vec2 hubert speecht5 sam detr
segformer""".split()

MAX_PARAMS = 40_000_000
TEXT_LENGTHS = (32, 64)

# ----------------------------------------------------------------------------------------------------------------
# families and model classes


def _mappings():
    from transformers.models.auto import modeling_auto as ma

    return ma


def all_families() -> list[str]:
    """Priority families first (resolved to model_type keys), then every other model_type of a model mapping,
    alphabetically."""
    ma = _mappings()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    known = set()
    for name in dir(ma):
        if name.endswith("_MAPPING_NAMES") and name != "CONFIG_MAPPING_NAMES":
            known |= set(getattr(ma, name))
    known &= set(CONFIG_MAPPING_NAMES)
    out = []
    for name in PRIORITY:
        if resolve(name) not in out:
            out.append(resolve(name))  # a name that is no model_type is recorded as skipped
    seen = set(out)
    out += sorted(n for n in known if n not in seen)
    return out


def resolve(name: str) -> str:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    for cand in (
        name,
        name.replace("-", "_"),
        name.replace("_", "-"),
        name.replace("-", ""),
        name.replace("bigbird", "big_bird"),
    ):
        if cand in CONFIG_MAPPING_NAMES:
            return cand
    return name


def class_candidates(family: str) -> list[str]:
    ma = _mappings()
    masked = family in ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    order = (
        ["MODEL_FOR_SEQUENCE_CLASSIFICATION", "MODEL_FOR_MASKED_LM"]
        if masked
        else [
            "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM",
            "MODEL_FOR_SPEECH_SEQ_2_SEQ",
            "MODEL_FOR_CAUSAL_LM",
            "MODEL_FOR_SEQUENCE_CLASSIFICATION",
            "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION",
            "MODEL_FOR_IMAGE_CLASSIFICATION",
            "MODEL_FOR_AUDIO_CLASSIFICATION",
            "MODEL_FOR_CTC",
            "MODEL_FOR_IMAGE_TEXT_TO_TEXT",
            "MODEL_FOR_OBJECT_DETECTION",
            "MODEL_FOR_SEMANTIC_SEGMENTATION",
        ]
    ) + ["MODEL"]
    out = []
    for mapping in order:
        value = getattr(ma, mapping + "_MAPPING_NAMES", {}).get(family)
        for name in value if isinstance(value, (tuple, list)) else [value]:
            if name and name not in out:
                out.append(name)
    return out


# ----------------------------------------------------------------------------------------------------------------
# shrinking a config dict generically

HIDDEN = {
    "hidden_size",
    "d_model",
    "n_embd",
    "n_embed",
    "embed_dim",
    "dim",
    "hidden_dim",
    "d_embed",
    "word_embed_proj_dim",
    "attention_hidden_size",
    "embedding_size",
    "text_embed_dim",
    "vision_embed_dim",
    "encoder_hidden_size",
    "output_hidden_size",
    "decoder_hidden_size",
    "cross_attention_hidden_size",
}
LAYERS = {
    "num_hidden_layers",
    "num_layers",
    "n_layer",
    "n_layers",
    "encoder_layers",
    "decoder_layers",
    "num_decoder_layers",
    "num_encoder_layers",
    "depth",
    "decoder_num_hidden_layers",
    "encoder_num_hidden_layers",
    "num_text_layers",
    "num_vision_layers",
}
HEAD_DIM_EXACT = {"d_kv", "d_head", "kv_channels", "attention_head_size"}
INTER = {
    "ffn_dim",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "d_ff",
    "n_inner",
    "d_inner",
    "ffn_hidden_size",
    "mlp_dim",
    "dim_feedforward",
    "feed_forward_size",
    "decoder_intermediate_size",
}
EXPERTS = {"num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_total"}
TOPK = {"num_experts_per_tok", "moe_topk", "n_activated_experts", "num_experts_per_token", "moe_top_k"}
SMALL = {  # key: value, applied when the current int is larger
    "projection_dim": 16,
    "num_query_tokens": 4,
    "num_queries": 8,
    "max_source_positions": 32,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    "codevector_dim": 32,
    "proj_codevector_dim": 32,
    "classifier_proj_size": 32,
    "num_codevectors_per_group": 16,
    "xvector_output_dim": 32,
    "rotary_dim": 8,
    "mm_tokens_per_image": 4,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "groups_width": 8,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "num_random_blocks": 1,
    "patch_size": 4,
    "window_size": 4,
    "attention_window": 8,
    "local_attn_chunk_length": 8,
    "lsh_attn_chunk_length": 8,
    "num_groups": 2,
    "n_groups": 1,
    "mamba_n_groups": 1,
}
STAGE_KEYS = ("depths", "block_sizes", "num_blocks", "stage_depths", "block_repeats", "num_block_repeats")
STAGE_COUNTS = ("num_stages", "num_encoder_blocks")
DROP_WITH_STAGES = ("out_features", "out_indices", "stage_names", "_out_features", "_out_indices")
TOKEN_KEY = re.compile(r"(_token_id|_token_index|_token_ids|_token)$")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def shrink(d: dict, rung: int) -> dict:
    """A shrunk copy of a config dict (``to_dict()``); rung 0 = smallest (stage lists truncated, vocab 96),
    1 = lists kept at their length, 2 = bigger widths and the original vocabulary."""
    o = {
        0: dict(hidden=32, heads=2, kv=1, head_dim=16, inter=64, vocab=96, image=32, truncate=True),
        1: dict(hidden=32, heads=2, kv=2, head_dim=16, inter=64, vocab=96, image=64, truncate=False),
        2: dict(hidden=64, heads=4, kv=2, head_dim=16, inter=128, vocab=None, image=64, truncate=False),
    }[rung]
    d = copy.deepcopy(d)
    _shrink(d, o)
    return d


TINY_RESNET = {
    "model_type": "resnet",
    "depths": [1, 1, 1, 1],
    "hidden_sizes": [16, 32, 64, 128],
    "embedding_size": 16,
    "layer_type": "basic",
    "out_indices": [1, 2, 3, 4],
}


def _shrink(d: dict, o: dict) -> None:
    original = dict(d)
    _shrink_keys(d, o)
    hidden_before, hidden_after = (
        original.get("hidden_size", original.get("d_model")),
        d.get("hidden_size", d.get("d_model")),
    )
    # keep relations of the original config
    if _is_int(hidden_before) and _is_int(hidden_after) and hidden_after < hidden_before:
        for key, value in list(d.items()):  # widths that equal the model width (codebook_dim, ...)
            if (
                _is_int(value)
                and value == hidden_before
                and value == original.get(key)
                and isinstance(key, str)
                and any(w in key for w in ("dim", "size", "hidden", "width"))
            ):
                d[key] = hidden_after
    if _is_int(original.get("qk_rope_head_dim")) and _is_int(d.get("qk_rope_head_dim")):  # DeepSeek-style MLA
        if original.get("head_dim") == original["qk_rope_head_dim"]:
            d["head_dim"] = d["qk_rope_head_dim"]
        if "qk_head_dim" in d and _is_int(d.get("qk_nope_head_dim")):
            d["qk_head_dim"] = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
    for heads, dim, expand in (("mamba_n_heads", "mamba_d_head", "mamba_expand"), ("num_heads", "head_dim", "expand")):
        if (
            all(k in d for k in (heads, dim, expand))
            and _is_int(d[heads])
            and isinstance(d[expand], (int, float))
            and _is_int(hidden_after)
            and any(k in d for k in ("state_size", "ssm_state_size", "mamba_d_state"))
        ):
            d[dim] = max(1, int(d[expand] * hidden_after) // d[heads])
    heads = d.get("num_attention_heads")
    if _is_int(hidden_after) and _is_int(heads) and heads > 0:  # derived fields some defaults leave None
        if "head_dim" in d and d["head_dim"] is None:
            d["head_dim"] = hidden_after // heads
        if "num_key_value_heads" in d and d["num_key_value_heads"] is None:
            d["num_key_value_heads"] = heads
    head_dim = (
        d.get("head_dim")
        if _is_int(d.get("head_dim"))
        else (hidden_after // heads if _is_int(hidden_after) and _is_int(heads) and heads else None)
    )
    for key in ("rope_scaling", "rope_parameters"):  # multimodal RoPE sections must sum to head_dim / 2
        rope = d.get(key)
        if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list) and head_dim:
            n, half = len(rope["mrope_section"]), head_dim // 2
            rope["mrope_section"] = [half // n + (1 if i < half % n else 0) for i in range(n)]
    layers_before = next((original[k] for k in ("num_hidden_layers", "num_layers") if _is_int(original.get(k))), None)
    layers_after = next((d[k] for k in ("num_hidden_layers", "num_layers") if _is_int(d.get(k))), None)
    if _is_int(layers_after):  # per-layer dicts keyed by layer index
        for key, value in list(d.items()):
            if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
                d[key] = {k: v for k, v in value.items() if int(k) < layers_after}
    if layers_before != layers_after:  # backbones name their outputs after layers: let the config recompute them
        for key in DROP_WITH_STAGES:
            d.pop(key, None)


def _shrink_keys(d: dict, o: dict) -> None:
    for key, value in list(d.items()):  # timm is not installed: a tiny transformers ResNet instead
        if isinstance(value, dict) and value.get("model_type") == "timm_backbone":
            d[key] = copy.deepcopy(TINY_RESNET)
    if "vision_config" in d:  # multimodal models without an image token id take a legacy path: give them one
        for key in ("image_token_index", "image_token_id"):
            if key in d and d[key] is None:
                d[key] = 10**9  # moved to the top of the vocabulary by _fix_token_ids
    layers_before = next(
        (
            d[k]
            for k in ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers")
            if _is_int(d.get(k))
        ),
        None,
    )
    for key, value in list(d.items()):
        if not isinstance(key, str):
            continue
        if isinstance(value, dict) and (
            "model_type" in value or key.endswith("_config") or key in ("encoder", "decoder")
        ):
            _shrink(value, o)
            continue
        k = key.lower()
        if _is_int(value):
            target = None
            if k in HIDDEN and not (k == "hidden_dim" and "width_coefficient" in d):
                target = o["hidden"]
            elif k in LAYERS:
                target = 2
            elif k in SMALL:
                target = SMALL[k]
            elif k.endswith("head_dim") or k in HEAD_DIM_EXACT:
                target = o["head_dim"]
            elif ("kv" in k or "key_value" in k) and k.endswith("heads") or k == "multi_query_group_num":
                target = o["kv"]
            elif k.endswith("heads") or k in ("n_head", "num_heads"):
                target = o["heads"]
            elif "intermediate_size" in k or k in INTER:
                target = o["inter"] // 2 if k.startswith(("moe", "shared_expert")) else o["inter"]
            elif k.endswith("vocab_size") and o["vocab"]:
                target = o["vocab"]
            elif k in EXPERTS:
                target = 4
            elif k in TOPK:
                target = 2
            elif k == "image_size":
                target = o["image"]
            elif k == "block_size" and "num_random_blocks" in d:
                target = 4
            elif k.endswith("_period") and value > 2:
                target = 2
            elif k.endswith("layer_offset") and value >= 2:
                target = 1
            if target is not None and value > target:
                d[key] = target
        elif (
            isinstance(value, float)
            and k in ("depth_multiplier", "width_coefficient", "depth_coefficient", "width_multiplier")
            and value > 0.25
        ):
            d[key] = 0.25
        elif isinstance(value, list) and value and all(_is_int(v) for v in value):
            if k in ("image_size", "patch_size") and len(value) in (2, 3):
                d[key] = [min(v, o["image"] if k == "image_size" else 4) for v in value]
            elif k in ("conv_dim", "tdnn_dim"):
                d[key] = [min(v, 32) for v in value]
        if key in ("use_pretrained_backbone", "use_timm_backbone") and value:
            d[key] = False
    if d.get("backbone") and d.get("backbone_config") is None and "use_timm_backbone" in d:
        d["backbone"] = None
        d["backbone_config"] = {
            "model_type": "resnet",
            "depths": [1, 1],
            "hidden_sizes": [16, 32],
            "embedding_size": 16,
            "out_features": ["stage1", "stage2"],
        }
    # per-layer lists (layer_types, attention_window, ...): keep two representative entries
    layers_after = next(
        (
            d[k]
            for k in ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers")
            if _is_int(d.get(k))
        ),
        None,
    )
    if _is_int(layers_before) and _is_int(layers_after) and layers_after < layers_before:
        for key, value in list(d.items()):
            if isinstance(value, list) and len(value) == layers_before and key not in STAGE_KEYS:
                first = value[0]
                other = next((v for v in value if v != first), value[1] if len(value) > 1 else first)
                d[key] = [first, other][:layers_after]
                if key == "attention_window":
                    d[key] = [8] * layers_after
    # stage lists (vision backbones)
    stage_key = next((k for k in STAGE_KEYS if isinstance(d.get(k), list) and d[k]), None)
    if stage_key is not None:
        n = len(d[stage_key])
        keep = min(n, 2) if o["truncate"] else n
        for key, value in list(d.items()):
            if isinstance(value, list) and len(value) == n and key not in ("image_mean", "image_std"):
                d[key] = value[:keep]
        d[stage_key] = [1] * keep
        for key in ("hidden_sizes", "embed_dims"):
            if isinstance(d.get(key), list) and len(d[key]) == keep:
                d[key] = [min(v, 16 * 2 ** min(i, 3)) for i, v in enumerate(d[key])]
        for key, value in list(d.items()):
            if isinstance(value, list) and len(value) == keep and key.endswith("heads"):
                d[key] = [min(v, 2) for v in value]
        if keep < n:
            for key in STAGE_COUNTS:
                if d.get(key) == n:
                    d[key] = keep
            for key in DROP_WITH_STAGES:
                d.pop(key, None)
    if "hash_seed" in d and d["hash_seed"] is None:  # Reformer's LSH hashing is random without a seed
        d["hash_seed"] = 1
    if isinstance(d.get("axial_pos_embds_dim"), list) and _is_int(d.get("hidden_size")):  # Reformer
        h = d["hidden_size"]
        d["axial_pos_embds_dim"] = [h // 2, h - h // 2]
        d["axial_pos_shape"] = [8, 8]
        d["max_position_embeddings"] = 64
    _fix_token_ids(d)


def _vocab_of(d: dict):
    if _is_int(d.get("vocab_size")):
        return d["vocab_size"]
    for key in ("text_config", "decoder", "language_config", "llm_config"):
        sub = d.get(key)
        if isinstance(sub, dict) and _is_int(sub.get("vocab_size")):
            return sub["vocab_size"]
    return None


def _fix_token_ids(d: dict) -> None:
    """Special token ids at or above the (shrunk) vocabulary go to distinct ids at its top."""
    vocab = _vocab_of(d)
    if not vocab:
        return
    remap: dict[int, int] = {}

    def fix(v):
        if _is_int(v) and v >= vocab:
            if v not in remap:
                remap[v] = vocab - 1 - len(remap)
            return remap[v]
        return v

    for key, value in list(d.items()):
        if not isinstance(key, str):
            continue
        if TOKEN_KEY.search(key) or key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            d[key] = [fix(v) for v in value] if isinstance(value, list) else fix(value)


def special_ids(config) -> set[int]:
    out = set()
    stack = [config.to_dict()]
    while stack:
        d = stack.pop()
        for key, value in d.items():
            if isinstance(value, dict):
                stack.append(value)
            elif isinstance(key, str) and (TOKEN_KEY.search(key) or key.endswith("token_id")):
                for v in value if isinstance(value, list) else [value]:
                    if _is_int(v):
                        out.add(v)
    return out


# ----------------------------------------------------------------------------------------------------------------
# building a model and its inputs (independently of supermask_fx)


def build(class_name: str, config_dict: dict, config_class_name: str):
    import torch
    import transformers

    config_class = getattr(transformers, config_class_name)
    config = config_class.from_dict(copy.deepcopy(config_dict))
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config)
    return model.eval()


def _text_config(config):
    for key in ("text_config", "decoder", "language_config", "llm_config"):
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            return sub
    return config


def _vision_config(config):
    for key in ("vision_config", "backbone_config", "encoder"):
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict") and (hasattr(sub, "image_size") or hasattr(sub, "num_channels")):
            return sub
    return config


def text_length(config, wanted: int) -> int:
    text = _text_config(config)
    for key in (
        "max_position_embeddings",
        "n_positions",
        "max_seq_len",
        "n_ctx",
        "max_sequence_length",
        "max_target_positions",
    ):
        positions = getattr(text, key, None)
        if _is_int(positions) and positions > 0:
            return min(wanted, positions - 2 if positions > 4 else positions)
    return wanted


def make_ids(config, length: int, batch: int = 2):
    import torch

    text = _text_config(config)
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None) or 96
    specials = special_ids(config)
    allowed = [i for i in range(3, vocab) if i not in specials] or list(range(vocab))
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, len(allowed), (batch, length), generator=gen)
    return torch.tensor(allowed)[idx]


def make_main(name: str, config):
    """Candidate tensors for the main input ``name`` (a list: the first that runs is used)."""
    import torch

    gen = torch.Generator().manual_seed(2)
    if name == "pixel_values":
        vision = _vision_config(config)
        size = getattr(vision, "image_size", None) or getattr(config, "image_size", None) or 64
        size = list(size)[-2:] if isinstance(size, (list, tuple)) else [size, size]
        channels = getattr(vision, "num_channels", None) or getattr(config, "num_channels", None) or 3
        return [torch.randn(2, channels, *size, generator=gen)]
    if name == "input_values":
        out = [torch.randn(2, 4000, generator=gen)]
        bins, frames = getattr(config, "num_mel_bins", None), getattr(config, "max_length", None)
        if _is_int(bins) and _is_int(frames):  # spectrogram transformers: (batch, frames, bins)
            out.insert(0, torch.randn(2, frames, bins, generator=gen))
        return out
    if name == "input_features":
        out = []
        bins = getattr(config, "num_mel_bins", None)
        src = getattr(config, "max_source_positions", None)
        if bins and src:
            out.append(torch.randn(2, bins, 2 * src, generator=gen))
        feat = getattr(config, "input_feat_per_channel", None) or getattr(config, "feature_size", None) or bins
        if feat:
            out.append(torch.randn(2, 64, feat * (getattr(config, "input_channels", 1) or 1), generator=gen))
            out.append(torch.randn(2, feat, 64, generator=gen))
        return out or [torch.randn(2, 80, 64, generator=gen)]
    return []


def image_token_counts(config) -> list[int]:
    """Candidate numbers of image tokens one image takes in the text (the first that runs is used)."""
    vision = _vision_config(config)
    out = []
    for obj in (config, vision):
        for key in (
            "num_query_tokens",
            "mm_tokens_per_image",
            "image_seq_length",
            "num_image_tokens",
            "image_seq_len",
            "num_patches",
        ):
            v = getattr(obj, key, None)
            if _is_int(v) and 0 < v <= 4096:
                out.append(v)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    if _is_int(size) and _is_int(patch) and patch > 0:
        n = (size // patch) ** 2
        out += [n, n + 1, n // 4, n // 16]
    seen = []
    for v in out:
        if v > 0 and v not in seen:
            seen.append(v)
    return seen[:6]


def image_ids(config, length: int, token: int, n: int):
    import torch

    ids = make_ids(config, length)
    return torch.cat([torch.full((ids.shape[0], n), token, dtype=ids.dtype), ids], dim=1)


def input_sets(model):
    """Functions ``length -> inputs`` (keyword dicts) to try, in order."""
    config = model.config
    try:
        accepted = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        accepted = set()
    main = getattr(model, "main_input_name", "input_ids")
    extra = {}
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in accepted:
        extra["decoder_input_ids"] = lambda L: make_ids(config, 5)
    sets = []
    if main == "input_ids":
        token = next(
            (getattr(config, k) for k in ("image_token_id", "image_token_index") if _is_int(getattr(config, k, None))),
            None,
        )
        if "pixel_values" in accepted and token is not None:  # multimodal: N image tokens, then text
            for t in make_main("pixel_values", config):
                for n in image_token_counts(config):
                    sets.append(
                        {"input_ids": lambda L, n=n: image_ids(config, L, token, n), "pixel_values": lambda L, t=t: t}
                    )
        sets.append({"input_ids": lambda L: make_ids(config, L)})
        if "pixel_values" in accepted:
            for t in make_main("pixel_values", config):
                sets.append({"input_ids": lambda L: make_ids(config, L), "pixel_values": lambda L, t=t: t})
        if "input_values" in accepted:
            sets.append(
                {
                    "input_ids": lambda L: make_ids(config, L),
                    "input_values": lambda L: make_main("input_values", config)[0],
                }
            )
    else:
        for t in make_main(main, config):
            sets.append({main: lambda L, t=t: t})
            if "input_ids" in accepted:
                sets.append({main: lambda L, t=t: t, "input_ids": lambda L: make_ids(config, L)})
    return [(s, extra) for s in sets], main == "input_ids" or "input_ids" in accepted


def materialize_inputs(spec, length):
    fns, extra = spec
    return {**{k: f(length) for k, f in fns.items()}, **{k: f(length) for k, f in extra.items()}}


def output_tensor(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    for key in (
        "logits",
        "logits_per_image",
        "last_hidden_state",
        "prediction_logits",
        "pred_masks",
        "reconstruction",
        "spectrogram",
    ):
        value = getattr(out, key, None) if not isinstance(out, dict) else out.get(key)
        if isinstance(value, torch.Tensor):
            return value
    items = out.to_tuple() if hasattr(out, "to_tuple") else out if isinstance(out, (tuple, list)) else []
    for value in items:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"no tensor in the output {type(out).__name__}")


def reason(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1 and len(text) < 80:  # validation errors: the cause is on the next line
        text += " / " + lines[1]
    return f"{type(error).__name__}: {text[:400]}"


# ----------------------------------------------------------------------------------------------------------------
# our own walk of the exported ATen graph

PRODUCT_NAMES = {
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "convolution",
    "_convolution",
    "conv_tbc",
    "embedding",
    "embedding_bag",
    "_embedding_bag",
    "mm",
    "bmm",
    "matmul",
    "mv",
    "addmm",
    "baddbmm",
    "addbmm",
    "addmv",
    "einsum",
    "_grouped_mm",
    "grouped_mm",
    "bilinear",
    "_trilinear",
    "tensordot",
    "dot",
    "vdot",
    "inner",
    "outer",
}
LINEAR_LIKE = {
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "convolution",
    "_convolution",
    "conv_tbc",
}
VIEWS = {
    "view",
    "_unsafe_view",
    "reshape",
    "t",
    "transpose",
    "permute",
    "_to_copy",
    "to",
    "contiguous",
    "clone",
    "expand",
    "unsqueeze",
    "squeeze",
    "alias",
    "detach",
    "lift_fresh_copy",
    "flatten",
    "unflatten",
    "_assert_tensor_metadata",
    "type_as",
    "view_as",
    "numpy_T",
    "mT",
    "getitem",
}


STOP = {
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "new_zeros",
    "new_ones",
    "new_empty",
    "new_full",
    "sym_size",
    "size",
    "sym_numel",
    "sym_stride",
    "_shape_as_tensor",
}


def op_name(target) -> str:
    if callable(target) and getattr(target, "__name__", "") == "getitem":
        return "getitem"
    s = str(target)
    if "::" in s:
        return s.split("::")[-1].split(".")[0]
    parts = s.split(".")
    if len(parts) >= 2 and parts[0] == "aten":
        return parts[1]
    if isinstance(target, __import__("torch")._ops.OpOverload) and len(parts) >= 3:
        return parts[-2]  # a custom op: namespace.name.overload
    return getattr(target, "__name__", parts[0])


def _shape(node):
    import torch

    v = node.meta.get("val") if hasattr(node, "meta") else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _args_of(user):
    """(position, node) for every node argument, flattening lists (einsum operands, cat lists)."""
    out = []
    for i, a in enumerate(user.args):
        if isinstance(a, (list, tuple)):
            out += [(i, b, j) for j, b in enumerate(a)]
        else:
            out.append((i, a, None))
    return out


def _contracted(user, operand) -> list[int]:
    """Fan-in(s) our reading gives ``operand`` at the product ``user``."""
    name = op_name(user.target)
    shape = _shape(operand)
    if not shape:
        return []
    positions = [(i, j) for i, a, j in _args_of(user) if a is operand]
    out = []
    for pos, sub in positions:
        if name in LINEAR_LIKE:
            if pos == 1:
                out.append(shape[-1] if name == "linear" else math.prod(shape[1:]))
            elif pos == 0:
                out.append(shape[-1] if name == "linear" else shape[1] if len(shape) > 1 else shape[0])
        elif name in ("embedding", "embedding_bag", "_embedding_bag"):
            if pos == 0 and len(shape) >= 2:
                out.append(math.prod(shape[1:]))
        elif name == "einsum" and sub is not None:
            eq = user.args[0].replace(" ", "")
            ins, _, outp = eq.partition("->")
            terms = ins.split(",")
            if sub < len(terms) and "." not in ins and len(terms[sub]) == len(shape):
                out.append(math.prod(s for c, s in zip(terms[sub], shape) if c not in outp) or 1)
        else:
            left, right = (1, 2) if name in ("addmm", "baddbmm", "addbmm", "addmv") else (0, 1)
            if pos == left:
                out.append(shape[-1])
            elif pos == right:
                out.append(shape[-2] if len(shape) >= 2 else shape[0])
    return out


def _operand_kind_any(user, node) -> int | None:
    return next((pos for pos, a, _ in _args_of(user) if a is node), None)


def _operand_kind(user, node) -> str | None:
    """'weight', 'product', 'input' or None (a bias / indices position)."""
    name = op_name(user.target)
    for pos, a, _sub in _args_of(user):
        if a is not node:
            continue
        if name in LINEAR_LIKE:
            return "weight" if pos == 1 else "input" if pos == 0 else None
        if name in ("embedding", "embedding_bag", "_embedding_bag"):
            return "weight" if pos == 0 else None
        if name in ("addmm", "baddbmm", "addbmm", "addmv"):
            return "product" if pos in (1, 2) else None
        return "product"
    return None


def walk_export(model, inputs) -> dict:
    """``{parameter name: {"reach": kind|None, "chain": [ops], "op": product, "fan_in": [..], "any": bool}}`` from
    our own reading of ``torch.export.export(model, (), inputs, strict=False)``."""
    import torch

    program = torch.export.export(model, (), inputs, strict=False)
    sig = program.graph_signature
    params = dict(sig.inputs_to_parameters)
    user_inputs = set(sig.user_inputs)
    graph = program.graph
    tainted = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name in user_inputs:
                tainted.add(node)
        elif any(isinstance(a, type(node)) and a in tainted for _, a, _ in _args_of(node)) or any(
            isinstance(v, type(node)) and v in tainted for v in node.kwargs.values()
        ):
            tainted.add(node)
    out = {}
    for node in graph.nodes:
        if node.op != "placeholder" or node.name not in params:
            continue
        best = None
        fan_ins: set[int] = set()
        any_reach = False
        frontier = [(node, [])]
        seen = {node}
        while frontier:
            current, chain = frontier.pop(0)
            for user in current.users:
                if user.op != "call_function":
                    continue
                name = op_name(user.target)
                if name in PRODUCT_NAMES or "grouped_mm" in name:
                    any_reach = True
                    kind = _operand_kind(user, current)
                    if kind is not None:
                        rank = {"weight": 0, "product": 1, "input": 2}[kind]
                        if best is None or rank < best[0]:
                            best = (rank, kind, name, [c for c in chain if c not in VIEWS])
                        if kind != "input":
                            fan_ins.update(_contracted(user, current))
                if name == "_weight_norm" and _operand_kind_any(user, current) == 1:
                    continue  # weight normalization's magnitude g: a per-output scale, not the matrix
                if name in ("reshape_as", "view_as", "expand_as", "type_as") and _operand_kind_any(user, current) != 0:
                    continue  # only a shape / dtype template
                if name in PRODUCT_NAMES or "grouped_mm" in name or name in STOP:
                    continue  # past a product the values are activations; *_like ops drop the data
                if user in seen or user in tainted:
                    if user in tainted and not any_reach:
                        any_reach = _any_product_downstream(user)
                    continue
                seen.add(user)
                frontier.append((user, chain + [name]))
        entry = {
            "used": bool(node.users),
            "reach": best[1] if best else None,
            "op": best[2] if best else None,
            "chain": best[3] if best else [],
            "fan_in": sorted(fan_ins),
            "any": any_reach,
        }
        name = params[node.name]
        out[name] = entry
    # tied Parameters: export may read one Parameter through the placeholder of another of its names; merge them
    groups: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        groups[id(p)].append(name)
    rank = {"weight": 0, "product": 1, "input": 2, None: 3}
    for names in groups.values():
        entries = [out[n] for n in names if n in out]
        if len(names) < 2 or not entries:
            continue
        best = min(entries, key=lambda e: rank[e["reach"]])
        merged = dict(
            best, fan_in=sorted({f for e in entries for f in e["fan_in"]}), any=any(e["any"] for e in entries)
        )
        for n in names:
            out[n] = merged
    return out


def _any_product_downstream(start, limit: int = 20000) -> bool:
    frontier, seen = [start], {start}
    while frontier and len(seen) < limit:
        current = frontier.pop()
        for user in current.users:
            if user.op == "call_function" and (
                op_name(user.target) in PRODUCT_NAMES or "grouped_mm" in op_name(user.target)
            ):
                return True
            if user not in seen:
                seen.add(user)
                frontier.append(user)
    return False


# ----------------------------------------------------------------------------------------------------------------
# normalization check


def check_norm(module, config) -> dict:
    """Feed a random input of the module's width; compare with plain layer / RMS / batch / group normalization."""
    import torch

    base = getattr(type(module), "_supermask_base", type(module))
    weight = module._parameters.get("weight")
    width = None
    for attr in ("normalized_shape", "num_features", "num_channels", "hidden_size", "dim"):
        v = getattr(module, attr, None)
        if isinstance(v, (tuple, list)) and len(v) == 1:
            v = v[0]
        if _is_int(v):
            width = v
            break
    if width is None and isinstance(weight, torch.Tensor) and weight.dim() == 1:
        width = weight.shape[0]
    if width is None:
        for p in module.parameters(recurse=False):
            if p.dim() == 1:
                width = p.shape[0]
                break
    if width is None:
        return {"status": "unknown width"}
    if any(any(True for _ in c.parameters()) for c in module.children()):
        return {"status": "has children with parameters: not a plain norm"}
    eps_values = {1e-5, 1e-6, 1e-12, 1e-8, 1e-3}
    for attr in ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "norm_eps", "rms_norm_eps"):
        v = getattr(module, attr, None)
        if isinstance(v, float):
            eps_values.add(v)
    gen = torch.Generator().manual_seed(3)
    name = base.__name__
    layouts = []
    if "BatchNorm1d" in name or "InstanceNorm1d" in name:
        layouts.append(("cf", (2, width, 5)))
    elif "3d" in name:
        layouts.append(("cf", (2, width, 2, 2, 2)))
    elif "Batch" in name or "Group" in name or "Instance" in name or "2d" in name:
        layouts.append(("cf", (2, width, 3, 3)))
    layouts += [("cl", (2, 7, width)), ("cf", (2, width, 3, 3)), ("cl", (2, 3, 3, width))]
    best = (float("inf"), None)
    errors = []
    dtype = next((p.dtype for p in module.parameters(recurse=False) if p.is_floating_point()), torch.float32)
    for layout, shape in layouts:
        x = (torch.randn(*shape, generator=gen) * 3 + 1.5).to(dtype)
        try:
            with torch.no_grad():
                y = module(x)
        except Exception as error:
            errors.append(reason(error))
            continue
        if isinstance(y, (tuple, list)):
            y = y[0]
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            errors.append(f"output {type(y).__name__} {getattr(y, 'shape', None)}")
            continue
        x, y = x.double(), y.double()
        dim = -1 if layout == "cl" else 1
        refs = {}
        for eps in eps_values:
            mean = x.mean(dim, keepdim=True)
            var = x.var(dim, unbiased=False, keepdim=True)
            refs[f"layer_norm(eps={eps:g})"] = (x - mean) / torch.sqrt(var + eps)
            refs[f"rms_norm(eps={eps:g})"] = x / torch.sqrt(x.pow(2).mean(dim, keepdim=True) + eps)
            refs["identity (a norm-free affine such as NoNorm)"] = x
            if layout == "cf":
                rm, rv = getattr(module, "running_mean", None), getattr(module, "running_var", None)
                view = (1, -1) + (1,) * (x.dim() - 2)
                if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
                    refs[f"batch_norm_running(eps={eps:g})"] = (x - rm.double().view(view)) / torch.sqrt(
                        rv.double().view(view) + eps
                    )
                dims = [0] + list(range(2, x.dim()))
                m, v = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
                refs[f"batch_norm_batch(eps={eps:g})"] = (x - m) / torch.sqrt(v + eps)
                groups = getattr(module, "num_groups", None)
                for g in ([groups] if _is_int(groups) else []) + [1]:
                    xg = x.reshape(x.shape[0], g, -1)
                    m, v = xg.mean(-1, keepdim=True), xg.var(-1, unbiased=False, keepdim=True)
                    refs[f"group_norm({g}, eps={eps:g})"] = ((xg - m) / torch.sqrt(v + eps)).reshape(x.shape)
                sd = list(range(2, x.dim()))
                m, v = x.mean(sd, keepdim=True), x.var(sd, unbiased=False, keepdim=True)
                refs[f"instance_norm(eps={eps:g})"] = (x - m) / torch.sqrt(v + eps)
        for label, ref in list(refs.items()):  # norms fused with their activation (BitGroupNormActivation)
            refs[label + " + relu"] = ref.clamp_min(0)
        for label, ref in refs.items():
            rel = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            if rel < best[0]:
                best = (rel, f"{label} on {layout} {tuple(shape)}")
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        if best[0] <= tol:
            return {"status": "ok", "match": best[1], "rel": best[0]}
    if best[1] is None:
        return {"status": "not callable with one input", "errors": errors[:2]}
    params = {
        n: [round(float(p.min()), 4), round(float(p.max()), 4)] for n, p in module.named_parameters(recurse=False)
    }
    return {"status": "not identity", "closest": best[1], "rel": best[0], "params_min_max": params}


# ----------------------------------------------------------------------------------------------------------------
# one family (runs in the forked child)


def _plain(obj) -> dict:
    return {
        k: repr(v)
        for k, v in vars(obj).items()
        if isinstance(v, (str, int, float, bool, type(None))) and not k.startswith("_supermask")
    }


def _hooks(m) -> dict:
    """Forward hooks, pre-hooks and (non-supermask) state-dict hooks a module holds."""

    def names(hooks):
        return sorted(getattr(getattr(h, "hook", h), "__qualname__", repr(h)) for h in hooks.values())

    return {
        "forward": names(m._forward_hooks),
        "forward_pre": names(m._forward_pre_hooks),
        "backward": names(m._backward_hooks),
    }


def _base(m) -> str:
    cls = getattr(type(m), "_supermask_base", type(m))
    return f"{cls.__module__}.{cls.__qualname__}"


def _config_dict(config) -> str:
    """The config as JSON, without the ``supermask_fx`` entry popupify records on purpose (how to reload)."""
    try:
        d = {k: v for k, v in config.to_dict().items() if not str(k).startswith("supermask")}
        return json.dumps(d, sort_keys=True, default=repr)
    except Exception as error:  # pragma: no cover
        return reason(error)


def run_family(family: str, send) -> dict:
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    import supermask_fx
    from supermask_fx import coverage, gated_layers, load_subnetwork, popupify, save_subnetwork

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    rec: dict = {"family": family, "status": "started"}
    t0 = time.perf_counter()

    def stage(name):
        rec["stage"] = name
        rec["elapsed"] = round(time.perf_counter() - t0, 2)
        send(("stage", copy.deepcopy(rec)))

    # 1. build
    stage("build")
    if family not in CONFIG_MAPPING_NAMES:
        rec.update(status="skipped", build="skipped", why="no such model_type in transformers")
        return rec
    config_class_name = CONFIG_MAPPING_NAMES[family]
    tries = []
    chosen = None
    try:
        config_class = getattr(transformers, config_class_name)
        default = config_class().to_dict()
    except Exception as error:
        rec.update(status="skipped", build="skipped", why=f"default config: {reason(error)}")
        return rec
    for class_name in class_candidates(family)[:3]:
        for rung in (0, 1, 2):
            if time.perf_counter() - t0 > 60:
                break
            try:
                d = shrink(default, rung)
                model = build(class_name, d, config_class_name)
                n = sum(p.numel() for p in model.parameters())
                if n > MAX_PARAMS:
                    tries.append(f"{class_name} rung {rung}: {n:,} parameters > {MAX_PARAMS:,}")
                    continue
                specs, is_text = input_sets(model)
                if not specs:
                    tries.append(
                        f"{class_name} rung {rung}: no inputs known for main input "
                        f"{getattr(model, 'main_input_name', '?')}"
                    )
                    break
                spec_errors = []
                for spec in specs:
                    L = text_length(model.config, TEXT_LENGTHS[0]) if is_text else TEXT_LENGTHS[0]
                    try:
                        with torch.no_grad():
                            output_tensor(model(**materialize_inputs(spec, L)))
                    except Exception as error:
                        spec_errors.append(f"{sorted(spec[0])}: {reason(error)}")
                        continue
                    chosen = (class_name, rung, d, model, spec, is_text, n)
                    break
                if chosen:
                    break
                tries.append(f"{class_name} rung {rung}: forward: " + " | ".join(spec_errors)[:600])
            except Exception as error:
                tries.append(f"{class_name} rung {rung}: {reason(error)}")
        if chosen:
            break
    rec["tries"] = tries
    if not chosen:
        rec.update(status="skipped", build="skipped", why=tries[-1] if tries else "no model class")
        return rec
    class_name, rung, d, model, spec, is_text, n = chosen
    lengths = [TEXT_LENGTHS[0]]
    if is_text:
        lengths = sorted({text_length(model.config, L) for L in TEXT_LENGTHS})
    # lengths the plain model accepts
    ok_lengths, shapes = [], {}
    for L in lengths:
        try:
            with torch.no_grad():
                shapes[L] = list(output_tensor(model(**materialize_inputs(spec, L))).shape)
            ok_lengths.append(L)
        except Exception as error:
            rec.setdefault("plain_forward_errors", {})[str(L)] = reason(error)
    rec.update(
        build="ok",
        model_class=class_name,
        rung=rung,
        params=n,
        inputs=sorted(spec[0]) + sorted(spec[1]),
        lengths=ok_lengths,
    )
    rebuild = lambda: build(class_name, d, config_class_name)  # noqa: E731
    if not ok_lengths:
        rec.update(status="skipped", build="skipped", why="plain forward failed at every length")
        return rec
    # the model popupify gets is fresh: no forward has run on it (a forward may install hooks or caches)
    del model
    model = rebuild()

    # 5 (graph part). our own export walk, on a separate copy
    stage("export_walk")
    walk = None
    try:
        other = rebuild()
        for c in [other.config] + [
            getattr(other.config, k) for k in vars(other.config) if hasattr(getattr(other.config, k), "to_dict")
        ]:
            if getattr(c, "use_cache", None):
                c.use_cache = False
        kw = materialize_inputs(spec, ok_lengths[0])
        try:
            if "use_cache" in inspect.signature(other.forward).parameters:
                kw["use_cache"] = False
        except (TypeError, ValueError):
            pass
        try:
            walk = walk_export(other, kw)
        except Exception as first:
            if hasattr(other, "set_experts_implementation"):
                try:
                    other.set_experts_implementation("grouped_mm")
                    walk = walk_export(other, kw)
                    rec["walk_note"] = "exported with grouped_mm experts"
                except Exception:
                    raise first from None
            else:
                raise
        del other
    except Exception as error:
        rec["walk_error"] = reason(error)

    # snapshot
    hooks_before = {name: _hooks(m) for name, m in model.named_modules(remove_duplicate=False)}
    modules_before = [(name, _base(m)) for name, m in model.named_modules(remove_duplicate=False)]
    attrs_before = {name: _plain(m) for name, m in model.named_modules(remove_duplicate=False)}
    config_before = _config_dict(model.config)
    params_before = dict(model.named_parameters())  # one name per Parameter
    trained_before = {name: p.requires_grad for name, p in params_before.items()}
    frozen_before = {
        name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad
    }
    buffers_before = {name: b.detach().clone() for name, b in model.named_buffers()}
    ids_before = {id(p): name for name, p in params_before.items()}

    # 1. popupify
    stage("popupify")
    caught = []
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            popupify(model, k=0.5)
    except Exception as error:
        rec.update(
            status="popupify_failed",
            popupify=reason(error),
            popupify_traceback=traceback.format_exc()[-2500:],
            seconds=round(time.perf_counter() - start, 2),
        )
        return rec
    rec["seconds"] = round(time.perf_counter() - start, 2)
    rec["popupify"] = "ok"
    rec["warnings"] = [
        f"{w.category.__name__}: {str(w.message)[:1500]}"
        for w in caught
        if "supermask_fx" in str(w.filename) or "supermask" in str(w.message).lower() or "popupify" in str(w.message)
    ]
    rec["other_warnings"] = len(caught) - len(rec["warnings"])
    report = coverage(model)
    rec["path"] = report.path
    rec["coverage_ungated"] = list(report.ungated)
    rec["n_gated"] = len(report.gated)
    reasons = {n: why for n, _, why in report.frozen}

    # 2. module tree, attributes, config
    stage("tree")
    modules_after = [(name, _base(m)) for name, m in model.named_modules(remove_duplicate=False)]
    if modules_after != modules_before:
        a, b = set(modules_before), set(modules_after)
        rec["tree_changed"] = {"removed": sorted(map(list, a - b))[:10], "added": sorted(map(list, b - a))[:10]}
    hooks = [
        f"{name or '<root>'}: {hooks_before[name]} -> {_hooks(m)}"
        for name, m in model.named_modules(remove_duplicate=False)
        if name in hooks_before and _hooks(m) != hooks_before[name]
    ]
    if hooks:
        rec["hooks_changed"] = hooks[:10]
    attrs_after = {name: _plain(m) for name, m in model.named_modules(remove_duplicate=False)}
    diffs = []
    for name in attrs_before:
        before, after = attrs_before[name], attrs_after.get(name, {})
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                diffs.append(f"{name or '<root>'}.{key}: {before.get(key)} -> {after.get(key)}")
    if diffs:
        rec["attrs_changed"] = diffs[:20]
    if _config_dict(model.config) != config_before:
        b, a = json.loads(config_before), json.loads(_config_dict(model.config))
        rec["config_changed"] = [
            f"{k}: {b.get(k)!r} -> {a.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
        ][:10]

    # 3. forward after popupify
    stage("forward")
    model.eval()
    forward = {}
    for L in ok_lengths:
        try:
            with torch.no_grad():
                out = output_tensor(model(**materialize_inputs(spec, L)))
            forward[str(L)] = "ok" if list(out.shape) == shapes[L] else f"shape {list(out.shape)} != {shapes[L]}"
            if forward[str(L)] == "ok" and not torch.isfinite(out.float()).all():
                forward[str(L)] = "non-finite output"
        except Exception as error:
            forward[str(L)] = reason(error)
    rec["forward"] = forward

    # 4. untrained parameters and buffers bit-identical
    stage("untrained")
    after = dict(model.named_parameters(remove_duplicate=False))
    changed = [
        n
        for n, t in frozen_before.items()
        if n not in after or after[n].dtype != t.dtype or not torch.equal(after[n].detach(), t)
    ]
    buffers_after = dict(model.named_buffers())
    changed += [
        f"buffer {n}"
        for n, t in buffers_before.items()
        if n not in buffers_after or not torch.equal(buffers_after[n], t)
    ]
    rec["n_untrained"] = len(frozen_before)
    if changed:
        rec["untrained_changed"] = changed[:20]

    # 5. ungated weights
    stage("ungated")
    gated = {}
    for module, gate in gated_layers(model):
        gated[id(module._parameters[gate.param])] = (module, gate)
    ungated, suspects, overgated = [], [], []
    for name, p in params_before.items():
        if p.dim() < 2 or not trained_before[name] or id(p) in gated:
            continue
        w = (walk or {}).get(name)
        entry = {"name": name, "shape": list(p.shape), "why": reasons.get(name, "(not listed by coverage)")}
        if w is not None and not w["used"]:
            entry["reach"] = "unused by our inputs"
        elif w is not None:
            entry.update(reach=w["reach"], op=w["op"], chain=w["chain"][:8], any_product=w["any"])
        elif walk is not None:
            entry["reach"] = "not in exported graph"
        ungated.append(entry)
        if w is not None and w["reach"] in ("weight", "product"):
            suspects.append(entry)
    rec["ungated"] = ungated
    rec["suspects"] = suspects
    if walk is not None:
        for pid, (_module, gate) in gated.items():
            name = ids_before.get(pid, gate.name)
            w = walk.get(name) or walk.get(gate.name)
            if w is None or w["reach"] not in ("weight", "product"):
                reach = (
                    "not in exported graph" if w is None else "unused by our inputs" if not w["used"] else w["reach"]
                )
                overgated.append({"name": gate.name, "reach": reach, "chain": (w or {}).get("chain", [])[:8]})
        rec["overgated"] = overgated

    # 7. gated weights: >2 dims, and fan-in implied by the drawn std vs our graph's fan-in
    stage("experts")
    experts, mismatch = [], []
    for pid, (module, gate) in gated.items():
        weight = module._parameters[gate.param].detach().float()
        nz = weight.abs()[weight != 0]
        std = float(nz.median()) if nz.numel() else 0.0
        implied = round(2.0 / std**2) if std > 0 else None
        name = ids_before.get(pid, gate.name)
        w = (walk or {}).get(name) or (walk or {}).get(gate.name)
        graph_fans = w["fan_in"] if w else []
        if weight.dim() > 2:
            experts.append(
                {
                    "name": gate.name,
                    "shape": list(weight.shape),
                    "expert_dims": gate.expert_dims,
                    "fan_in_fan_out": gate.fan_in_fan_out,
                    "std": std,
                    "implied_fan_in": implied,
                    "graph_fan_in": graph_fans,
                    "graph_op": w["op"] if w else None,
                }
            )
        if graph_fans and implied is not None and implied not in graph_fans:
            mismatch.append(
                {
                    "name": gate.name,
                    "shape": list(weight.shape),
                    "expert_dims": gate.expert_dims,
                    "fan_in_fan_out": gate.fan_in_fan_out,
                    "implied_fan_in": implied,
                    "graph_fan_in": graph_fans,
                    "graph_op": w["op"],
                    "chain": w["chain"][:8],
                }
            )
    rec["experts"] = experts
    rec["fan_in_mismatch"] = mismatch

    # 6. norms
    stage("norms")
    norms, bad_norms = {}, []
    for name, module in model.named_modules():
        cls = getattr(type(module), "_supermask_base", type(module)).__name__
        if "Norm" not in cls:
            continue
        try:
            result = check_norm(module, model.config)
        except Exception as error:
            result = {"status": f"check error: {reason(error)}"}
        norms[result["status"]] = norms.get(result["status"], 0) + 1
        if result["status"] == "not identity":
            bad_norms.append({"name": name, "class": cls, **result})
        elif result["status"] != "ok":
            rec.setdefault("norms_unchecked", []).append({"name": name, "class": cls, **result})
    rec["norms"] = norms
    rec["bad_norms"] = bad_norms[:12]
    if len(rec.get("norms_unchecked", [])) > 6:
        rec["norms_unchecked"] = rec["norms_unchecked"][:6]

    # 8. subnetwork file round trip
    stage("subnetwork")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{family}.safetensors"
            save_subnetwork(model, path)
            fresh = rebuild()
            load_subnetwork(fresh, path).eval()
            model.eval()
            L = ok_lengths[0]
            with torch.no_grad():
                a = output_tensor(model(**materialize_inputs(spec, L)))
                b = output_tensor(fresh(**materialize_inputs(spec, L)))
                again = output_tensor(model(**materialize_inputs(spec, L)))
            rec["subnetwork"] = (
                "identical"
                if torch.equal(a, b)
                else "model not deterministic"
                if not torch.equal(a, again)
                else (
                    f"differs: max abs {float((a.float() - b.float()).abs().max()):.3g}"
                    if a.shape == b.shape
                    else f"shape {list(b.shape)} != {list(a.shape)}"
                )
            )
    except Exception as error:
        rec["subnetwork"] = reason(error)
    rec["status"] = "done"
    rec["total_seconds"] = round(time.perf_counter() - t0, 2)
    rec.pop("stage", None)
    rec["library"] = supermask_fx.__version__
    return rec


def _child(family: str, conn) -> None:
    def send(msg):
        try:
            conn.send(msg)
        except Exception:
            pass

    try:
        rec = run_family(family, send)
    except BaseException as error:  # report anything, even a SystemExit from a model
        rec = {
            "family": family,
            "status": "harness_error",
            "error": reason(error),
            "traceback": traceback.format_exc()[-2500:],
        }
    send(("done", json.loads(json.dumps(rec, default=repr))))
    conn.close()


def run_one(family: str, timeout: float) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(family, writer), daemon=True)
    start = time.perf_counter()
    proc.start()
    writer.close()
    last = {"family": family}
    result = None
    while True:
        left = timeout - (time.perf_counter() - start)
        if left <= 0:
            break
        try:
            if not reader.poll(min(left, 5)):
                if not proc.is_alive() and not reader.poll(0.5):
                    break
                continue
            kind, payload = reader.recv()
        except (EOFError, OSError):
            break
        if kind == "done":
            result = payload
            break
        last = payload
    if result is None:
        alive = proc.is_alive()
        if alive:
            proc.kill()
        proc.join(10)
        result = dict(last)
        result["status"] = "timeout" if alive else "crashed"
        result["error"] = (
            f"no result within {timeout:.0f} s (last stage: {last.get('stage')})"
            if alive
            else f"child exited with code {proc.exitcode} (last stage: {last.get('stage')})"
        )
    else:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    reader.close()
    result["wall_seconds"] = round(time.perf_counter() - start, 2)
    return result


# ----------------------------------------------------------------------------------------------------------------
# results and summary


def load_results(path: Path = RESULTS) -> dict[str, dict]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[rec["family"]] = rec
    return out


def append(rec: dict, path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(rec, default=repr) + "\n")
        f.flush()
        os.fsync(f.fileno())


def norm_msg(text: str, n: int = 110) -> str:
    text = re.sub(r"^[A-Za-z0-9_]+ rung \d+: ", "", text)
    text = re.sub(r"\b[A-Z][a-z0-9]+(?:[A-Z][A-Za-z0-9]*)+(?=[.(: ])", "X", text)  # class names
    text = re.sub(r"0x[0-9a-f]+", "0x…", text)
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\d+", "N", text)
    return text[:n]


def _chain_class(entry) -> str:
    chain = [c for c in entry.get("chain", []) if c not in VIEWS]
    steps = []
    for c in chain:
        if c not in steps:
            steps.append(c)
    via = "->".join(steps[:4]) if steps else "directly"
    return f"{entry.get('reach')} operand of {entry.get('op')} via {via}"


def summary(path: Path = RESULTS) -> str:
    results = load_results(path)
    lines = []
    counts = defaultdict(int)
    for rec in results.values():
        counts[rec.get("status")] += 1
    lines.append(
        f"{len(results)} families in {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    )
    paths = defaultdict(list)
    for f, rec in results.items():
        if rec.get("path"):
            paths[rec["path"]].append(f)
    lines.append("graph path: " + ", ".join(f"{k} {len(v)}" for k, v in sorted(paths.items())))
    classes: dict[tuple[str, str], dict] = {}

    def add(section, key, family, example):
        c = classes.setdefault((section, key), {"families": [], "example": example})
        if family not in c["families"]:
            c["families"].append(family)

    for f, rec in results.items():
        status = rec.get("status")
        if status == "skipped":
            add("skipped (not built tiny)", norm_msg(rec.get("why", ""), 90), f, rec.get("why", "")[:300])
        elif status in ("timeout", "crashed", "harness_error"):
            add(f"harness: {status}", f"stage {rec.get('stage')}", f, rec.get("error", "")[:300])
        elif status == "popupify_failed":
            add("popupify raised", norm_msg(rec.get("popupify", "")), f, rec.get("popupify", "")[:400])
        if rec.get("path") == "modules":
            text = " ".join(rec.get("warnings", []))
            cause = re.search(r"could not capture it \((.*?)\)[:]", text)
            cause = cause.group(1) if cause else (re.search(r"could not trace \S+ \((.*?)\)", text) or [None, text])[1]
            add("fallback to module types (path 'modules')", norm_msg(cause or "", 100), f, text[:500])
        elif rec.get("warnings"):
            add("warning on the graph path", norm_msg(rec["warnings"][0], 100), f, rec["warnings"][0][:400])
        for key in ("tree_changed", "attrs_changed", "config_changed", "hooks_changed"):
            if rec.get(key):
                ex = rec[key]
                add("model changed by popupify", key, f, json.dumps(ex)[:300])
        for L, result in (rec.get("forward") or {}).items():
            if result != "ok":
                add("forward after popupify fails", norm_msg(result), f, f"length {L}: {result[:300]}")
        if rec.get("untrained_changed"):
            add("requires_grad=False parameters/buffers changed", "changed", f, ", ".join(rec["untrained_changed"][:5]))
        for s in rec.get("suspects", []):
            where = "graph path" if rec.get("path") in ("export", "fx") else "after the fallback to module types"
            add(
                f"ungated weight reaching a product (suspect, {where})",
                _chain_class(s),
                f,
                f"{s['name']} {tuple(s['shape'])}: coverage says '{s['why']}'; chain {s.get('chain')} -> {s.get('op')}",
            )
        for s in rec.get("ungated", []):
            if s not in rec.get("suspects", []) and s.get("reach") == "input":
                add(
                    "ungated parameter fed as the input operand of a linear/conv (learned queries, tables)",
                    f"{s.get('op')} via "
                    + ("->".join(dict.fromkeys(c for c in s.get("chain", []) if c not in VIEWS)) or "directly"),
                    f,
                    f"{s['name']} {tuple(s['shape'])}: '{s['why']}'",
                )
        for s in rec.get("overgated", []):
            add(
                "gated but no product operand in our walk",
                f"reach {s.get('reach')}",
                f,
                f"{s['name']}: chain {s.get('chain')}",
            )
        for m in rec.get("fan_in_mismatch", []):
            key = f"{m['graph_op']} expert_dims={m['expert_dims']} fan_in_fan_out={m['fan_in_fan_out']}"
            if any(c in ("cat", "stack") for c in m.get("chain", [])):
                key += " (joined by cat)"
            add(
                "drawn std implies another fan-in than the graph's product",
                key,
                f,
                f"{m['name']} {tuple(m['shape'])}: implied fan-in {m['implied_fan_in']}, graph {m['graph_fan_in']} "
                f"at {m['graph_op']}",
            )
        for b in rec.get("bad_norms", []):
            cls = re.sub(r"^[A-Z][A-Za-z0-9]*?(?=(RMS|Layer|Batch|Group|Instance|Norm))", "", b["class"])
            add(
                "norm not identity-affine",
                cls,
                f,
                f"{b['name']} ({b['class']}): closest {b['closest']} rel {b['rel']:.2g}; params {b['params_min_max']}",
            )
        sub = rec.get("subnetwork")
        if status == "done" and sub != "identical":
            add("save/load_subnetwork round trip", norm_msg(str(sub)), f, str(sub)[:300])
        if rec.get("walk_error"):
            add(
                "our own export walk failed (checks 5/7 partial)",
                norm_msg(rec["walk_error"], 90),
                f,
                rec["walk_error"][:300],
            )
    sections = defaultdict(list)
    for (section, key), c in classes.items():
        sections[section].append((key, c))
    for section in sections:
        items = sorted(sections[section], key=lambda kc: -len(kc[1]["families"]))
        total = len({f for _, c in items for f in c["families"]})
        lines.append("")
        lines.append(f"== {section}: {total} families")
        for key, c in items:
            lines.append(f"  [{len(c['families'])}] {key}")
            lines.append(f"      families: {', '.join(c['families'])}")
            lines.append(f"      e.g. {c['example']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", action="store_true", help="print the failure classes and exit")
    parser.add_argument("--families", help="comma-separated model_types (default: all, priority first)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per family")
    parser.add_argument("--budget", type=float, default=None, help="stop starting families after this many seconds")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--redo", action="store_true", help="run families already in the results again")
    parser.add_argument(
        "--retry",
        default="",
        help="comma-separated statuses (skipped,timeout,crashed) whose "
        "families run again; the new line supersedes the old one",
    )
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.results))
        return 0
    import torch  # noqa: F401  (imported once in the parent: forked children share it)
    import transformers  # noqa: F401
    import transformers.models.auto.modeling_auto  # noqa: F401

    import supermask_fx  # noqa: F401

    torch.set_num_threads(1)
    families = [resolve(f) for f in args.families.split(",")] if args.families else all_families()
    done = load_results(args.results)
    retry = {r for r in args.retry.split(",") if r}
    start = time.perf_counter()
    tried = 0
    for family in families:
        if family in done and not args.redo and done[family].get("status") not in retry:
            continue
        if args.budget is not None and time.perf_counter() - start > args.budget:
            print(f"budget of {args.budget:.0f} s spent; stopping", flush=True)
            break
        rec = run_one(family, args.timeout)
        append(rec, args.results)
        tried += 1
        flags = [
            k
            for k in ("tree_changed", "attrs_changed", "config_changed", "hooks_changed", "untrained_changed")
            if rec.get(k)
        ]
        flags += [f"suspects={len(rec['suspects'])}"] if rec.get("suspects") else []
        flags += [f"bad_norms={len(rec['bad_norms'])}"] if rec.get("bad_norms") else []
        flags += [f"fan_in_mismatch={len(rec['fan_in_mismatch'])}"] if rec.get("fan_in_mismatch") else []
        print(
            f"[{time.perf_counter() - start:7.1f}s] {family}: {rec.get('status')} path={rec.get('path')} "
            f"sub={rec.get('subnetwork')} {' '.join(flags)} ({rec.get('wall_seconds')} s)"
            + (f" why={rec.get('why', '')[:120]}" if rec.get("status") == "skipped" else "")
            + (
                f" err={rec.get('popupify', rec.get('error', ''))[:160]}"
                if rec.get("status") not in ("done", "skipped")
                else ""
            ),
            flush=True,
        )
    print(f"tried {tried} families this run", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
