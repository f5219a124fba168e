"""``weight_storage="bits"``: frozen weights held as one sign bit each plus a scale (``core.packed.PackedSigns``).

What a user relies on: the same values as ``"dense"`` everywhere (training steps, masks, files, state_dicts,
materialize) for every method that keeps its weights, 1/32 of the float32 weight's memory held between steps, and
clear refusals where the weights cannot be two-valued.
"""

from __future__ import annotations

import copy
import io
import math
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import supermask_fx as sfx
from supermask_fx.core.packed import PackedSigns
from supermask_fx.selection import native, set_backend
from supermask_fx.selection.bits import BitMask
from supermask_fx.selection.kernels import straight_through_grad

SETTINGS = "supermask_fx.popupified"  # the settings record's key prefix: it states the storage, so it differs


class TinyLM(nn.Module):
    """An embedding with a padding row, tied to the output layer, and two linear layers between."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16, padding_idx=3)
        self.fc1 = nn.Linear(16, 37)
        self.fc2 = nn.Linear(37, 16)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.fc2(torch.relu(self.fc1(self.emb(ids)))).mean(1))


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 50, (6, 5), generator=g), torch.randint(0, 50, (6,), generator=g)


def _train(model: nn.Module, steps: int = 6) -> nn.Module:
    opt = torch.optim.SGD(sfx.supermask_parameters(model), lr=0.5, momentum=0.9, weight_decay=1e-4)
    for step in range(steps):
        ids, y = _batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids), y).backward()
        opt.step()
    return model


def _state(model: nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(SETTINGS)}


def _packed_weights(model: nn.Module) -> list[PackedSigns]:
    return [
        m._parameters[g.param] for m, g in sfx.gated_layers(model) if isinstance(m._parameters[g.param], PackedSigns)
    ]


# ------------------------------------------------------------------------------------------- the packed form


@pytest.mark.parametrize("shape", [(5, 7), (3, 2, 3, 3), (16,), (1, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bits_are_little_endian_signs_and_expand_to_the_weight(shape, dtype):
    g = torch.Generator().manual_seed(1)
    signs = torch.rand(shape, generator=g) < 0.5
    weight = torch.where(signs, 0.375, -0.375).to(dtype)
    packed = PackedSigns.pack(weight)
    expected = np.packbits((weight > 0).reshape(-1).numpy(), bitorder="little")  # numpy's, not ours
    assert packed.bits.dtype == torch.uint8 and packed.bits.numel() == math.ceil(weight.numel() / 8)
    assert np.array_equal(packed.bits.numpy(), expected)
    assert packed.scale == 0.375 and packed.dtype == dtype and tuple(packed.shape) == shape
    assert torch.equal(packed.expanded(), weight)


def test_blocks_of_rows_and_channels_last():
    """Packing reads blocks of rows: a weight of several blocks (rows not a multiple of 8, zero rows in two blocks)
    packs as numpy packs its signs; a channels-last weight keeps its strides when expanded."""
    weight = torch.where(torch.rand(2**15 + 3, 97) < 0.5, 1.5, -1.5)
    weight[[5, 2**14 + 1]] = 0
    packed = PackedSigns.pack(weight)
    assert packed.zero_rows == (5, 2**14 + 1) and torch.equal(packed.expanded(), weight)
    expected = np.packbits((weight > 0).reshape(-1).numpy(), bitorder="little")
    assert np.array_equal(packed.bits.numpy(), expected)
    conv = torch.where(torch.rand(6, 5, 3, 3) < 0.5, 0.5, -0.5).contiguous(memory_format=torch.channels_last)
    packed = PackedSigns.pack(conv)
    assert packed.stride() == conv.stride() and packed.expanded().stride() == conv.stride()
    assert torch.equal(packed.expanded(), conv)
    assert packed.to(memory_format=torch.contiguous_format).expanded().is_contiguous()


def test_zero_rows_and_refusals():
    weight = torch.where(torch.rand(6, 4) < 0.5, 0.5, -0.5)
    weight[[0, 4]] = 0
    packed = PackedSigns.pack(weight)
    assert packed.zero_rows == (0, 4) and torch.equal(packed.expanded(), weight)
    two_magnitudes = weight.clone()
    two_magnitudes[1, 1] = 0.25
    with pytest.raises(ValueError, match="one magnitude"):
        PackedSigns.pack(two_magnitudes)
    stray_zero = torch.where(torch.rand(6, 4) < 0.5, 0.5, -0.5)
    stray_zero[2, 3] = 0  # a zero outside an all-zero row
    with pytest.raises(ValueError, match="one magnitude"):
        PackedSigns.pack(stray_zero)


def _two_valued(shape, seed=0, c=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(shape, generator=g) < 0.5, c, -c)


@pytest.mark.skipif(native.kernel() is None, reason="needs the compiled CPU passes")
def test_the_compiled_pack_and_expand_equal_the_pytorch_ones(monkeypatch):
    """``pack`` and ``expanded`` of float32 CPU weights run one compiled pass each; forced onto the PyTorch ops
    (blocks of rows, a table), every field, every error and every expanded value is the same."""
    import supermask_fx.core.packed as packed_module

    many_rows = _two_valued((2**14 + 9, 40), seed=1)  # several threads' blocks, a partial last byte
    many_rows[[0, 7, 2**13 + 5, 2**14 + 8]] = 0  # zero rows first, inside and last
    minus_zero_row = _two_valued((9, 7), seed=2)
    minus_zero_row[3] = -0.0
    infinite = _two_valued((5, 3), seed=3, c=math.inf)
    valid = [many_rows, minus_zero_row, infinite, torch.zeros(4, 3), _two_valued((3,), seed=4), _two_valued((1, 1))]
    mixed = _two_valued((6, 5), seed=5)
    mixed[2, 4] = 0.0
    minus_zero_in_row = _two_valued((6, 5), seed=6)
    minus_zero_in_row[1, 0] = -0.0
    other = _two_valued((6, 5), seed=7)
    other[5, 4] = 0.25
    nan = _two_valued((6, 5), seed=8)
    nan[0, 0] = math.nan
    invalid = [mixed, minus_zero_in_row, other, nan]

    def both(make):
        compiled = make()
        with monkeypatch.context() as patch:
            patch.setattr(packed_module, "_compiled", lambda tensor: None)
            blocks = make()
        return compiled, blocks

    for weight in valid:
        compiled, blocks = both(lambda weight=weight: PackedSigns.pack(weight))
        assert torch.equal(compiled.bits, blocks.bits), weight.shape
        assert (compiled.scale, compiled.zero_rows) == (blocks.scale, blocks.zero_rows)
        for expanded in both(compiled.expanded):
            assert torch.equal(expanded.view(torch.int32), torch.where(weight == 0, 0.0, weight).view(torch.int32))
    for weight in invalid:
        for use_blocks in (False, True):
            with monkeypatch.context() as patch:
                if use_blocks:
                    patch.setattr(packed_module, "_compiled", lambda tensor: None)
                with pytest.raises(ValueError, match="one magnitude"):
                    PackedSigns.pack(weight)


def test_operations_read_the_values_and_in_place_writes_pack_again():
    weight = torch.where(torch.rand(4, 9) < 0.5, 0.5, -0.5)
    packed = nn.Parameter(PackedSigns.pack(weight), requires_grad=False)
    assert isinstance(packed, nn.Parameter) and isinstance(packed, PackedSigns)
    assert torch.equal(packed * 3, weight * 3) and torch.equal(
        torch.ones(2, 9) @ packed.t(), torch.ones(2, 9) @ weight.t()
    )
    assert type(packed.detach()) is PackedSigns and type(torch.empty_like(packed)) is torch.Tensor
    half = packed.to(torch.bfloat16)
    assert isinstance(half, PackedSigns) and torch.equal(half.expanded(), weight.to(torch.bfloat16))
    for copied in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        assert isinstance(copied, nn.Parameter) and torch.equal(copied.expanded(), weight)
        assert copied.bits.data_ptr() != packed.bits.data_ptr()
    buffer = io.BytesIO()
    torch.save({"w": packed}, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)["w"].expanded(), weight)
    version = packed._version
    with torch.no_grad():
        packed.neg_()
    assert torch.equal(packed.expanded(), -weight) and packed._version > version  # counters move: masks refresh
    with torch.no_grad(), pytest.raises(ValueError, match="one magnitude"):
        packed.add_(1.0)
    assert torch.equal(packed.expanded(), -weight)  # a refused write leaves the weight as it was


# ------------------------------------------------------------------------------------------- in a model


def test_config_refuses_what_bits_cannot_hold():
    with pytest.raises(ValueError, match="init='kaiming_normal'.*weight_storage='dense'"):
        sfx.PopupConfig(k=0.5, init="kaiming_normal", weight_storage="bits")
    with pytest.raises(ValueError, match="init='keep'"):
        sfx.PopupConfig(k=0.5, init="keep", weight_storage="bits")
    with pytest.raises(ValueError, match="trains the weights"):
        sfx.PopupConfig(k=0.5, method="dense", weight_storage="bits")
    with pytest.raises(ValueError, match="unknown weight_storage 'packed'"):
        sfx.PopupConfig(k=0.5, weight_storage="packed")


@pytest.mark.skipif("SUPERMASK_FX_TEST_FORCE" in os.environ, reason="asserts the defaults a forced option replaces")
def test_bits_are_the_default_where_they_apply():
    """``weight_storage=None`` (the default) is ``"bits"`` for the inits of one magnitude per layer with a method
    that keeps the weights frozen, else ``"dense"``; ``rebuild_effective=None`` keeps ``w * mask`` with bits and
    full-precision scores, and rebuilds it with dense weights or bf16/fp16 scores."""
    assert sfx.PopupConfig.__dataclass_fields__["weight_storage"].default is None
    assert sfx.PopupConfig.__dataclass_fields__["rebuild_effective"].default is None
    expected = {  # (init, method) -> storage, written out rather than derived from packable()
        ("signed_constant", "edge_popup"): "bits",
        ("xavier_signed_constant", "edge_popup"): "bits",
        ("unsigned_constant", "edge_popup"): "bits",
        ("signed_constant", "sampled"): "bits",
        ("signed_constant", "iterand"): "bits",
        ("kaiming_normal", "edge_popup"): "dense",
        ("kaiming_uniform", "edge_popup"): "dense",
        ("xavier_normal", "edge_popup"): "dense",
        ("keep", "edge_popup"): "dense",
        ("signed_constant", "dense"): "dense",
    }
    for (init, method), storage in expected.items():
        config = sfx.PopupConfig(k=0.5, init=init, method=method)
        assert (config.weight_storage, config.rebuild_effective) == (storage, storage == "dense"), (init, method)
    assert sfx.PopupConfig(k=0.5, weight_storage="dense").rebuild_effective is True
    for dtype, rebuilds in (("bfloat16", True), ("float16", True), ("float32", False), (torch.bfloat16, True)):
        assert sfx.PopupConfig(k=0.5, score_dtype=dtype).rebuild_effective is rebuilds, dtype
    assert sfx.PopupConfig(k=0.5, rebuild_effective=True).weight_storage == "bits"
    model = sfx.popupify(TinyLM(), k=0.3)
    held = [model.emb._parameters["weight"], model.fc1._parameters["weight"], model.fc2._parameters["weight"]]
    assert all(isinstance(w, PackedSigns) for w in held) and model.out._parameters["weight"] is held[0]
    normal = sfx.popupify(TinyLM(), k=0.3, init="kaiming_normal")
    assert not any(isinstance(p, PackedSigns) for p in normal.parameters())


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"scope": "global", "scaled": True},
        {"init": "xavier_signed_constant", "score_dtype": "bfloat16"},
        {"method": "multicoat"},
        {"method": "iterand", "method_options": {"rerand_freq": 2, "rerand_lambda": 0.5}},
        {"method": "biprop"},
        {"method": "sampled"},
        {"norms": "learn"},
    ],
    ids=["layer", "global-scaled", "xavier-bf16", "multicoat", "iterand", "biprop", "sampled", "norms-learn"],
)
def test_training_with_bits_equals_dense_bit_for_bit(options, tmp_path):
    dense = _train(sfx.popupify(TinyLM(), k=0.3, weight_storage="dense", **options))
    bits = sfx.popupify(TinyLM(), k=0.3, weight_storage="bits", **options)
    assert not _packed_weights(dense) and _packed_weights(bits)
    packed = _packed_weights(bits)
    assert len(packed) == 3  # emb (tied to out), fc1, fc2: every gated weight, the tied one once
    assert bits.out._parameters["weight"] is bits.emb._parameters["weight"]
    _train(bits)
    assert all(isinstance(p, PackedSigns) for p in packed)  # still packed after the steps (IteRand's redraws too)
    mine, theirs = _state(bits), _state(dense)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    ids, _ = _batch(99)
    dense.eval(), bits.eval()
    assert torch.equal(bits(ids), dense(ids))
    if sfx.PopupConfig(k=0.3, **options).make_method().has_mask:
        path = tmp_path / "bits.sfx"
        sfx.save_subnetwork(bits, path)
        loaded = sfx.load_subnetwork(TinyLM(), path).eval()
        assert _packed_weights(loaded) and torch.equal(loaded(ids), dense(ids))
    plain = sfx.materialize(bits)
    assert not any(isinstance(p, PackedSigns) for p in plain.parameters())
    assert torch.equal(plain(ids), dense(ids))


def test_the_gated_step_holds_the_packed_weight_not_an_expanded_one():
    """What the model holds between steps, and what the backward keeps of each weight, is the packed form."""
    model = sfx.popupify(
        nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)), k=0.3, weight_storage="bits"
    )
    for weight in _packed_weights(model):
        assert weight.bits.numel() == math.ceil(weight.numel() / 8)
    float_bytes = sum(p.numel() * 4 for p in model.parameters() if not isinstance(p, PackedSigns))
    scores = sum(m._parameters[g.scores].numel() * 4 for m, g in sfx.gated_layers(model))
    biases = sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith("bias"))
    assert float_bytes == scores + biases  # no float32 copy of any gated weight
    loss = model(torch.randn(3, 256)).sum()
    saved = []
    nodes, seen = [loss.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "StraightThroughBackward":
            saved.extend(node.saved_tensors)
        nodes.extend(fn for fn, _ in node.next_functions)
    assert sum(isinstance(t, PackedSigns) for t in saved) == 2  # each layer's weight, packed
    assert not any(type(t) is torch.Tensor and t.dim() == 2 and not t.requires_grad for t in saved if t is not None)
    loss.backward()


@pytest.mark.skipif(native.kernel() is None, reason="needs the compiled CPU passes")
@pytest.mark.parametrize("shape", [(2 * (1 << 18) + 77,), (300, 1111), (5, 200), (7, 13)])
def test_compiled_passes_read_sign_bits_as_the_float_weight(shape):
    """``w * mask`` and the score gradient computed from the sign bits equal, bit for bit, the same passes over the
    expanded float weight, and the PyTorch ops as numbers: over several threads' chunks, a partial last word, a
    row of zeros and scores of every kind (signed zeros, NaN, inf)."""
    g = torch.Generator().manual_seed(sum(shape))
    weight = torch.where(torch.rand(shape, generator=g) > 0.5, 0.37, -0.37)
    if len(shape) == 2:
        weight[2] = 0
    packed = PackedSigns.pack(weight)
    keep = torch.rand(shape, generator=g) > 0.4
    mask = BitMask.empty(torch.Size(shape))
    flat = torch.zeros(mask.words.numel() * 64, dtype=torch.int64)
    flat[: weight.numel()] = keep.reshape(-1).long()
    mask.words.copy_((flat.view(-1, 64) << torch.arange(64)).sum(1))
    grad, scores = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    scores.view(-1)[:6] = torch.tensor([0.0, -0.0, math.nan, math.inf, -math.inf, -1.0])
    calls = []
    expanded = PackedSigns.expanded
    PackedSigns.expanded = lambda self: calls.append(self) or expanded(self)
    try:
        from_bits = mask.apply(packed), straight_through_grad(grad, scores, packed)
    finally:
        PackedSigns.expanded = expanded
    assert not calls  # read as bits, never expanded
    from_floats = mask.apply(weight), straight_through_grad(grad, scores, weight)
    for mine, theirs in zip(from_bits, from_floats):
        assert torch.equal(mine.view(torch.int32), theirs.view(torch.int32))
    assert torch.equal(from_bits[0], torch.where(keep, weight, 0.0))
    assert torch.equal(from_bits[1], torch.sign(scores) * weight * grad)


@pytest.mark.skipif(native.kernel() is None, reason="needs the compiled CPU passes")
def test_training_and_evaluation_never_expand_a_packed_weight_on_the_cpu(monkeypatch):
    """The forward's ``w * mask``, the backward's rebuild of it, the score gradient and the selection (with the
    cached ``w * mask`` of evaluation) read the sign bits: no float32 copy of a weight is made in a step, with the
    CPU's selection back-end (``cpu``, forced here: the others compute the cached ``w * mask`` with PyTorch ops)."""
    model = sfx.popupify(TinyLM(), k=0.3, weight_storage="bits", rebuild_effective=True)
    calls = []
    expanded = PackedSigns.expanded
    monkeypatch.setattr(PackedSigns, "expanded", lambda self: calls.append(self.shape) or expanded(self))
    set_backend("cpu")
    try:
        _train(model, steps=3)
        model.eval()
        with torch.no_grad():
            model(_batch(99)[0])
    finally:
        set_backend(None)
    assert calls == []
    monkeypatch.undo()
    reference = _train(sfx.popupify(TinyLM(), k=0.3, weight_storage="dense"), steps=3).eval()
    with torch.no_grad():
        assert torch.equal(model(_batch(99)[0]), reference(_batch(99)[0]))


def test_files_and_state_dicts_cross_between_the_two_storages(tmp_path):
    """The storage is how the same values are held: a subnetwork file or a state_dict made with one loads into a
    model popupified with the other, and gives the same outputs."""
    ids, _ = _batch(5)
    for made, loaded in (("bits", "dense"), ("dense", "bits")):
        model = _train(sfx.popupify(TinyLM(), k=0.3, weight_storage=made), steps=3).eval()
        path = tmp_path / f"{made}.sfx"
        sfx.save_subnetwork(model, path)
        other = sfx.popupify(TinyLM(), k=0.3, weight_storage=loaded)
        assert torch.equal(sfx.load_subnetwork(other, path).eval()(ids), model(ids))
        other = sfx.popupify(TinyLM(), k=0.3, weight_storage=loaded)
        other.load_state_dict(model.state_dict())
        assert torch.equal(other.eval()(ids), model(ids))
        assert bool(_packed_weights(other)) == (loaded == "bits")


def test_state_dict_round_trip_retrain_and_device_dtype_moves():
    model = _train(sfx.popupify(TinyLM(), k=0.4, weight_storage="bits"), steps=2)
    fresh = sfx.popupify(TinyLM(), k=0.4, weight_storage="bits")
    fresh.load_state_dict(model.state_dict())
    ids, _ = _batch(7)
    model.eval(), fresh.eval()
    assert torch.equal(fresh(ids), model(ids)) and _packed_weights(fresh)
    other_seed = sfx.popupify(TinyLM(), k=0.4, weight_storage="bits", seed=1)
    with pytest.raises(RuntimeError, match="seed: 0 in the state_dict, 1 in this model"):
        other_seed.load_state_dict(model.state_dict())
    copied = copy.deepcopy(model)
    assert torch.equal(copied(ids), model(ids)) and _packed_weights(copied)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert all(w.dtype == torch.bfloat16 for w in _packed_weights(half))
    assert torch.equal(half.fc1._parameters["weight"].expanded(), model.fc1._parameters["weight"].expanded().bfloat16())
    sfx.fix_masks(model, train_weights=True)  # retraining: the weights take any value, so they are plain again
    assert not _packed_weights(model) and model.fc1._parameters["weight"].requires_grad
    before = model.fc1._parameters["weight"].detach().clone()
    _train_weights = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    nn.functional.cross_entropy(model(ids), _batch(7)[1]).backward()
    _train_weights.step()
    assert not torch.equal(model.fc1._parameters["weight"], before)


def test_a_model_moves_while_a_graph_or_a_name_holds_its_packed_weights():
    """``model.to(...)`` swaps a tensor-subclass Parameter in place, which torch refuses while anything else holds
    it in C++ (a live autograd graph that saved it). The gated forward gives the graph an alias (the same bits and
    version counter), so a model moves after a forward without backward, as a model of float weights does; a
    Python name for the weight then sees the moved weight (the same object)."""
    model = sfx.popupify(TinyLM(), k=0.4, weight_storage="bits")
    held = model.fc1._parameters["weight"]
    ids, y = _batch(3)
    expected = model.eval()(ids)
    live = nn.functional.cross_entropy(model.train()(ids), y)  # train-mode graph, not yet backpropagated
    model.to(torch.float64)
    assert held.dtype == torch.float64 and isinstance(held, PackedSigns) and held is model.fc1._parameters["weight"]
    torch.testing.assert_close(model.eval()(ids), expected.double(), rtol=1e-5, atol=1e-6)
    assert live.requires_grad


def test_code_written_for_plain_parameters_gives_the_same_results_over_sign_bits(tmp_path):
    """What training scripts do with a model, done to a sign-bit model and to a float one of the same values: the
    same outputs. (Found by trying each: ``data_ptr()`` is 0 for every packed weight and ``untyped_storage()``
    raises, which none of these reads.)"""
    from safetensors.torch import load_model, save_model
    from torch.optim.swa_utils import AveragedModel

    timm_utils = pytest.importorskip("timm.utils")
    ids, y = _batch(5)

    def outputs(storage: str) -> dict:
        model = _train(sfx.popupify(TinyLM(), k=0.4, weight_storage=storage), steps=1)
        out = {}
        averaged, ema = AveragedModel(model), timm_utils.ModelEmaV3(model, decay=0.5)
        averaged.update_parameters(model)  # the first update copies
        _train(model, steps=2)
        averaged.update_parameters(model)
        ema.update(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)  # the whole model, pickled
        buffer.seek(0)
        whole = torch.load(buffer, weights_only=False)
        save_model(model, tmp_path / f"{storage}.safetensors")
        other = sfx.popupify(TinyLM(), k=0.4, weight_storage=storage)
        load_model(other, tmp_path / f"{storage}.safetensors")
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        with torch.no_grad():
            for name, m in (("model", model), ("averaged", averaged), ("ema", ema.module)):
                out[name] = m.eval()(ids)
            out["pickled"] = whole.eval()(ids)
            out["safetensors"] = other.eval()(ids)
            out["functional_call"] = torch.func.functional_call(model, state, (ids,))
            out["bfloat16"] = copy.deepcopy(model).to(torch.bfloat16)(ids)
            shared = copy.deepcopy(model).share_memory()  # torch.multiprocessing (Hogwild)
            assert all(p.is_shared() for p in shared.parameters())
            out["shared"] = shared(ids)
            out["numpy"] = torch.stack([torch.as_tensor(np.asarray(p.detach())).sum() for p in model.parameters()])
            out["tolist"] = torch.tensor([sum(torch.tensor(p.tolist()).flatten().tolist()) for p in model.parameters()])
        assert (storage == "bits") == bool(_packed_weights(whole)) == bool(_packed_weights(other))
        return out

    dense, bits = outputs("dense"), outputs("bits")
    for name in dense:
        assert torch.equal(dense[name], bits[name]), name
    for name in ("averaged", "ema"):  # the averages did average something
        assert not torch.equal(dense["model"], dense[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bits_on_cuda_equal_dense_on_cuda():
    ids, y = (t.cuda() for t in _batch(0))
    models = [sfx.popupify(TinyLM().cuda(), k=0.3, **o) for o in ({}, {"weight_storage": "bits"})]
    for model in models:
        opt = torch.optim.SGD(sfx.supermask_parameters(model), lr=0.5, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(ids), y).backward()
            opt.step()
    dense, bits = models
    assert _packed_weights(bits) and all(w.bits.is_cuda for w in _packed_weights(bits))
    assert all(torch.equal(a, b) for a, b in zip(_state(dense).values(), _state(bits).values()))
    opt = torch.optim.SGD(sfx.supermask_parameters(bits), lr=0.5, momentum=0.9)
    torch.cuda.set_sync_debug_mode("error")  # expanding the weights (zero rows included) waits for nothing
    try:
        nn.functional.cross_entropy(bits(ids), y).backward()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
