"""Several named masks over one set of frozen weights: training the active one leaves the others bit for bit, each
is held as 1 bit per weight, switching back gives the same outputs, and the heads survive the state_dict, ``restore``,
subnetwork files and ``materialize``. The task-incremental setting of Supermasks in Superposition (Wortsman et al.
2020) is checked end to end: after all tasks, each task's accuracy equals its accuracy right after its own training.
Expectations are computed here (masks read before and after, a top-k written in the test)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from supermask_fx import (
    active_mask,
    add_mask,
    delete_mask,
    gated_layers,
    kept_count,
    list_masks,
    load_subnetwork,
    materialize,
    popupify,
    restore,
    save_subnetwork,
    set_mask,
    supermask_parameters,
)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))


def masks(model):
    return [g.current_mask(m).clone() for m, g in gated_layers(model)]


def train(model, x, y, steps=5, lr=0.5):
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def logits(model, x):
    with torch.no_grad():
        return model(x)


def test_the_verbs():
    model = popupify(net(), k=0.5)
    assert list_masks(model) == ["default"] and active_mask(model) == "default"
    add_mask(model, "task2")
    add_mask(model, "small", k=0.1)
    assert list_masks(model) == ["default", "task2", "small"] and active_mask(model) == "default"
    with pytest.raises(ValueError, match="already has a mask named 'task2'"):
        add_mask(model, "task2")
    with pytest.raises(ValueError, match="no mask named 'nope'.*default, task2, small"):
        set_mask(model, "nope")
    with pytest.raises(ValueError, match="identifier"):
        add_mask(model, "two words")
    with pytest.raises(ValueError, match="active mask"):
        delete_mask(model, "default")
    set_mask(model, "small")
    for module, gate in gated_layers(model):  # its own k
        assert int(gate.current_mask(module).sum()) == kept_count(module._parameters["weight"].numel(), 0.1)
    delete_mask(model, "task2")
    assert list_masks(model) == ["default", "small"]


def test_training_one_mask_leaves_the_others_bit_for_bit_and_switching_back_gives_the_same_outputs():
    model = popupify(net(), k=0.5)
    x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))
    train(model, x, y)
    default_masks, default_logits = masks(model), logits(model, x)
    add_mask(model, "task2")
    set_mask(model, "task2")
    first = masks(model)
    assert any(not torch.equal(a, b) for a, b in zip(first, default_masks))  # another mask: other scores
    weights = [m._parameters["weight"].clone() for m, _ in gated_layers(model)]
    stored = [m._buffers["mask_bits_default"].clone() for m, _ in gated_layers(model)]
    train(model, x, 3 - y)
    assert any(not torch.equal(a, b) for a, b in zip(masks(model), first))  # the active mask trained
    for (module, _), w, bits in zip(gated_layers(model), weights, stored):
        assert torch.equal(module._parameters["weight"], w)
        assert torch.equal(module._buffers["mask_bits_default"], bits)  # untouched while task2 trained
        assert bits.dtype == torch.uint8 and bits.numel() == -(-w.numel() // 8)  # 1 bit per weight
    task2_masks, task2_logits = masks(model), logits(model, x)
    set_mask(model, "default")
    assert all(torch.equal(a, b) for a, b in zip(masks(model), default_masks))
    assert torch.equal(logits(model, x), default_logits)
    set_mask(model, "task2")  # back again: scores rebuilt from the bits give the same mask
    assert all(torch.equal(a, b) for a, b in zip(masks(model), task2_masks))
    assert torch.equal(logits(model, x), task2_logits)


def test_heads_survive_the_state_dict_files_and_materialize(tmp_path):
    model = popupify(net(), k=0.5, seed=4)
    x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))
    train(model, x, y)
    add_mask(model, "task2", k=0.3)
    set_mask(model, "task2")
    train(model, x, 3 - y)
    expected = {name: None for name in ("default", "task2")}
    for name in expected:
        set_mask(model, name)
        expected[name] = logits(model, x)
    set_mask(model, "task2")

    again = restore(net(), model.state_dict()).eval()
    assert active_mask(again) == "task2" and list_masks(again) == ["default", "task2"]
    save_subnetwork(model, tmp_path / "two.safetensors")
    loaded = load_subnetwork(net(), tmp_path / "two.safetensors").eval()
    for other in (again, loaded):
        for name in ("task2", "default", "task2"):
            set_mask(other, name)
            assert torch.equal(logits(other, x), expected[name]), name
    for name in ("default", "task2"):
        plain = materialize(model, mask=name).eval()
        assert not any("mask_bits" in n for n, _ in plain.named_buffers())
        assert torch.equal(logits(plain, x), expected[name])


def test_supermasks_in_superposition_do_not_forget():
    """Five tasks (permuted inputs, permuted labels) on one random network, one mask each, trained in turn: after
    the last, every task scores exactly what it scored right after its own training."""
    torch.manual_seed(1)
    base = torch.randn(256, 10)
    labels = (base[:, :4].argmax(1) + (base[:, 4] > 0).long()) % 4
    tasks = []
    for t in range(5):
        g = torch.Generator().manual_seed(t)
        tasks.append((base[:, torch.randperm(10, generator=g)], (labels + t) % 4))
    model = popupify(net(), k=0.5)
    right_after = []
    for t, (x, y) in enumerate(tasks):
        if t:
            add_mask(model, f"task{t}")
            set_mask(model, f"task{t}")
        train(model, x, y, steps=30, lr=0.2)
        right_after.append(logits(model, x).argmax(1).eq(y).float().mean().item())
    for t, (x, y) in enumerate(tasks):
        set_mask(model, "default" if t == 0 else f"task{t}")
        assert logits(model, x).argmax(1).eq(y).float().mean().item() == right_after[t]
    assert min(right_after) > 0.4  # each mask learned its task (chance: 0.25)


@pytest.mark.parametrize("backend", ["reference", "cpu", "device"])
def test_a_head_with_its_own_k_under_global_scope_keeps_its_count_on_every_back_end(backend):
    from supermask_fx.selection import set_backend

    set_backend(backend)
    try:
        model = popupify(net(), k=0.5, scope="global")
        total = sum(m._parameters["weight"].numel() for m, _ in gated_layers(model))
        add_mask(model, "sparse", k=0.2)
        set_mask(model, "sparse")
        assert sum(int(g.current_mask(m).sum()) for m, g in gated_layers(model)) == kept_count(total, 0.2)
        set_mask(model, "default")
        assert sum(int(g.current_mask(m).sum()) for m, g in gated_layers(model)) == kept_count(total, 0.5)
    finally:
        set_backend(None)


def test_a_second_mask_trained_by_the_hugging_face_trainer_reloads_with_both(tmp_path):
    pytest.importorskip("transformers")
    from hf_families import build
    from test_integration_hf import Pairs
    from transformers import Trainer, TrainingArguments

    from supermask_fx.integrations.huggingface import SupermaskCallback, from_pretrained

    model, inputs = build("bert")
    popupify(model, k=0.5)
    with torch.no_grad():
        default_logits = model.eval()(**inputs).logits
    add_mask(model, "task2")
    set_mask(model, "task2")
    args = TrainingArguments(
        str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=0.1,
        optim="sgd",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    Trainer(
        model=model, args=args, train_dataset=Pairs(), callbacks=[SupermaskCallback(write_subnetwork=False)]
    ).train()
    model.eval()
    with torch.no_grad():
        task2_logits = model(**inputs).logits
    model.save_pretrained(tmp_path / "final")
    again = from_pretrained(type(model), tmp_path / "final").eval()
    assert active_mask(again) == "task2"
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, task2_logits)
        set_mask(again, "default")
        assert torch.equal(again(**inputs).logits, default_logits)


def test_set_k_changes_the_kept_count_between_steps_and_is_recorded(tmp_path):
    from supermask_fx import set_k

    model = popupify(net(), k=0.5, seed=2)
    x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))
    train(model, x, y, steps=2)
    set_k(model, 0.2)
    for module, gate in gated_layers(model):  # the top-k of the same scores at the new k
        scores = module._parameters["scores"]
        flat = scores.detach().abs().flatten()
        kept = kept_count(flat.numel(), 0.2)
        expected = torch.zeros_like(flat, dtype=torch.bool)
        expected[torch.sort(flat, descending=True, stable=True).indices[:kept]] = True
        assert torch.equal(gate.current_mask(module), expected.view_as(scores))
    train(model, x, y, steps=2)  # trains on at k = 0.2
    expected_logits = logits(model, x)
    assert torch.equal(logits(restore(net(), model.state_dict()).eval(), x), expected_logits)
    save_subnetwork(model, tmp_path / "k02.safetensors")
    assert torch.equal(logits(load_subnetwork(net(), tmp_path / "k02.safetensors").eval(), x), expected_logits)
    with pytest.raises(ValueError, match="fraction"):
        set_k(model, 1.5)
