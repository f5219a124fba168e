"""The PEFT-style folder of masks: ``save_masks`` writes the masks and a small JSON, nothing else of the model;
``load_masks`` puts them onto the base (the same logits), and refuses a base with other weights."""

from __future__ import annotations

import json

import pytest
import torch

from supermask_fx import (
    SubnetworkFileError,
    add_mask,
    load_masks,
    popupify,
    save_masks,
    set_mask,
    supermask_parameters,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def base(tmp_path, seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3
    )
    folder = tmp_path / f"base{seed}"
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def train_a_little(model, ids):
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.5)
    model.train()
    model(input_ids=ids).logits.square().mean().backward()
    optimizer.step()
    return model.eval()


def test_a_folder_of_two_masks_reloads_onto_its_base_and_refuses_another(tmp_path):
    from supermask_fx.integrations.huggingface import masks_from_pretrained

    cls = transformers.BertForSequenceClassification
    folder = base(tmp_path)
    ids = torch.randint(3, 96, (2, 8))
    model = train_a_little(popupify(cls.from_pretrained(folder), k=0.5, init="keep"), ids)
    add_mask(model, "task2")
    set_mask(model, "task2")
    train_a_little(model, ids)
    expected = {}
    for name in ("default", "task2"):
        set_mask(model, name)
        with torch.no_grad():
            expected[name] = model(input_ids=ids).logits
    save_masks(model, tmp_path / "masks")
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["subnetwork.safetensors", "supermask_config.json"]
    info = json.loads((tmp_path / "masks" / "supermask_config.json").read_text())
    assert info["base_model_name_or_path"] == str(folder) and info["masks"] == ["default", "task2"]
    assert info["active"] == "task2" and len(info["base_sha256"]) == 64
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("scores"))
    assert (tmp_path / "masks" / "subnetwork.safetensors").stat().st_size < 2 * weights / 8 + 20_000

    loaded = load_masks(cls.from_pretrained(folder), tmp_path / "masks")
    for again in (loaded, masks_from_pretrained(cls, tmp_path / "masks")):
        again.eval()
        for name in ("task2", "default"):
            set_mask(again, name)
            with torch.no_grad():
                assert torch.equal(again(input_ids=ids).logits, expected[name]), name
    with pytest.raises(SubnetworkFileError, match="not the base weights"):
        load_masks(cls.from_pretrained(base(tmp_path, seed=1)), tmp_path / "masks")
    with pytest.raises(SubnetworkFileError, match="not a folder written by save_masks"):
        load_masks(cls.from_pretrained(folder), tmp_path)
