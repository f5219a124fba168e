"""A popupified model's state_dict: effective weights under the usual names, the settings record, the checks on
load, and ``restore`` from every form a framework saves in."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from supermask_fx import fix_masks, gated_layers, materialize, popupify, restore, supermask_parameters
from supermask_fx.core.state import RECORD_KEY


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])


def trained(**options):
    model = popupify(Net(), **{"k": 0.5, **options})
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.5, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        optimizer.step()
    return model.eval()


def test_state_dict_holds_effective_weights_scores_and_the_record():
    model = trained()
    state = model.state_dict()
    for module, gate in gated_layers(model):
        raw = module._parameters[gate.param]
        mask = gate.current_mask(module)
        assert torch.equal(state[f"{gate.layer}.weight"], raw * mask)  # what a plain model needs
        assert torch.equal(state[f"{gate.layer}.scores"], module.scores)
    assert state[RECORD_KEY].dtype == torch.uint8
    assert model.state_dict(keep_vars=True)["fc.weight"] is model.fc._parameters["weight"]


def test_plain_model_loads_the_subnetwork_non_strict_and_is_told_what_to_do_strict():
    model = trained()
    plain = Net().eval()
    with pytest.raises(RuntimeError, match="supermask_fx.restore"):
        plain.load_state_dict(model.state_dict())
    result = plain.load_state_dict(model.state_dict(), strict=False)
    assert set(result.unexpected_keys) == {RECORD_KEY, "conv.scores", "fc.scores"}
    assert torch.equal(plain(X), model(X))


def test_other_settings_are_refused_naming_the_fields():
    model = trained()
    other = popupify(Net(), k=0.3, seed=1)
    with pytest.raises(RuntimeError) as error:
        other.load_state_dict(model.state_dict())
    message = str(error.value)
    assert "k: 0.5 in the state_dict, 0.3 in this model" in message
    assert "seed: 0 in the state_dict, 1 in this model" in message
    assert "not this model's random weight" not in message  # the cause is named once, not per layer
    for field, value in (("init", "kaiming_normal"), ("method", "sampled"), ("scaled", True)):
        with pytest.raises(RuntimeError, match=f"{field}: "):
            popupify(Net(), k=0.5, **{field: value}).load_state_dict(model.state_dict())


def test_same_settings_load_bit_exactly_and_keep_the_frozen_weights():
    model = trained()
    again = popupify(Net(), k=0.5)
    frozen = {n: t.clone() for n, t in again.named_parameters() if not n.endswith("scores")}
    again.load_state_dict(model.state_dict())
    assert all(torch.equal(t, dict(again.named_parameters())[n]) for n, t in frozen.items() if "bn" not in n)
    assert torch.equal(again.eval()(X), model(X))


def test_damaged_or_foreign_weights_are_refused():
    model = trained()
    state = model.state_dict()
    nonzero = state["fc.weight"].nonzero()[0]
    state["fc.weight"][tuple(nonzero)] *= 1.5  # one damaged value
    with pytest.raises(RuntimeError, match="fc.weight: not this model's random weight"):
        popupify(Net(), k=0.5).load_state_dict(state)
    with pytest.raises(RuntimeError, match="no supermask_fx settings"):
        popupify(Net(), k=0.5).load_state_dict(Net().state_dict())  # a plain checkpoint


def test_trained_weights_load_as_they_are():
    dense = trained(method="dense")
    again = popupify(Net(), k=0.5, method="dense")
    again.load_state_dict(dense.state_dict())
    assert torch.equal(again.fc._parameters["weight"], dense.fc._parameters["weight"])
    retrained = fix_masks(trained(), train_weights=True)
    again = fix_masks(popupify(Net(), k=0.5), train_weights=True)
    again.load_state_dict(retrained.state_dict())
    assert torch.equal(again.eval()(X), retrained.eval()(X))


@pytest.mark.parametrize("form", ["state_dict", "torch.save", "safetensors", "lightning", "torchvision"])
def test_restore_from_every_form(form, tmp_path):
    model = trained()
    state = model.state_dict()
    if form == "state_dict":
        source = state
    elif form == "torch.save":
        source = tmp_path / "model.pt"
        torch.save(state, source)
    elif form == "safetensors":
        source = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, source)
        assert load_file(source)[RECORD_KEY].dtype == torch.uint8
    elif form == "lightning":
        source = {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}
    else:
        source = {"model": state, "optimizer": {}}
    fresh = restore(Net(), source).eval()
    assert torch.equal(fresh(X), model(X))
    assert torch.equal(fresh.fc.scores, model.fc.scores)
    assert not fresh.fc._parameters["weight"].requires_grad and fresh.fc.scores.requires_grad


def test_restore_refuses_plain_state_and_other_architectures():
    with pytest.raises(ValueError, match="no supermask_fx settings"):
        restore(Net(), Net().state_dict())

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 5)

    with pytest.raises(ValueError, match="another architecture"):
        restore(Other(), trained().state_dict())


def test_restore_into_another_width_is_a_value_error_naming_the_shapes():
    """A model built with another width: torch's load_state_dict raised its RuntimeError ("size mismatch") where
    restore promises a ValueError; it names each tensor and both shapes, and a plain model is left plain."""

    class Wide(Net):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3)
            self.bn = nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, 5)

    state = trained().state_dict()
    wide = Wide()
    with pytest.raises(ValueError, match="another architecture") as error:
        restore(wide, state)
    message = str(error.value)
    for name, saved, mine in [("conv.weight", (8, 3, 3, 3), (16, 3, 3, 3)), ("fc.weight", (5, 8), (5, 16))]:
        assert f"{name}: {saved} in the source, {mine} in this model" in message, message
    assert not isinstance(error.value, RuntimeError)
    assert not any("scores" in name for name in wide.state_dict())  # refused before popupify changed it
    with pytest.raises(ValueError, match=r"conv.scores: \(8, 3, 3, 3\) in the source, \(16, 3, 3, 3\) in this model"):
        restore(popupify(Wide(), k=0.5), state)  # already popupified: its scores are named too


def test_restore_with_other_settings_is_a_value_error():
    with pytest.raises(ValueError, match="k: 0.5 in the state_dict, 0.3 in this model") as error:
        restore(popupify(Net(), k=0.3), trained().state_dict())
    assert isinstance(error.value.__cause__, RuntimeError)


def test_restore_from_a_damaged_safetensors_file_names_it(tmp_path):
    source = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in trained().state_dict().items()}, source)
    source.write_bytes(source.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        restore(Net(), source)


def test_materialized_model_has_no_hooks_and_a_plain_state_dict():
    model = trained()
    plain = materialize(model)
    assert RECORD_KEY not in plain.state_dict()
    fresh = Net().eval()
    fresh.load_state_dict(plain.state_dict())  # strict
    assert torch.equal(fresh(X), model(X))


def test_pickled_and_copied_models_keep_the_record():
    model = trained()
    clone = copy.deepcopy(model)
    assert torch.equal(clone.state_dict()[RECORD_KEY], model.state_dict()[RECORD_KEY])
    other = popupify(Net(), k=0.3)
    with pytest.raises(RuntimeError, match="k: 0.5"):
        other.load_state_dict(clone.state_dict())
