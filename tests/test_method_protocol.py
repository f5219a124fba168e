"""A method defined outside the package, registered with one call, runs through everything a built-in one does:
popupify, a training step, the state_dict record and ``restore``, subnetwork files, ``materialize``.

The toy method keeps the weights whose score is above a threshold (an option), with a straight-through gradient;
the expectations below are computed here from its definition, not by the library."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from supermask_fx import (
    Method,
    PopupConfig,
    gated_layers,
    load_subnetwork,
    materialize,
    popupify,
    register_method,
    restore,
    save_subnetwork,
    supermask_parameters,
)


@dataclasses.dataclass(frozen=True)
class AboveOptions:
    threshold: float = 0.0


class _KeepAbove(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, weight, threshold):
        ctx.save_for_backward(weight)
        return weight * (scores > threshold)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad * weight, None, None


class KeepAbove(Method):
    """``w * (s > threshold)``; ``dL/ds = dL/dw_eff * w``."""

    name = "toy_keep_above"
    Options = AboveOptions

    @classmethod
    def check_options(cls, options):
        if not isinstance(options.threshold, (int, float)):
            raise ValueError(f"threshold={options.threshold!r} must be a number")

    def effective_weight(self, gate, module, weight):
        scores = module._parameters[gate.scores]
        return _KeepAbove.apply(scores, weight, self.options.threshold)

    def eval_mask(self, gate, module):
        return module._parameters[gate.scores].detach() > self.options.threshold


register_method(KeepAbove)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_the_registered_method_runs_through_popupify_training_files_and_materialize(tmp_path):
    model = popupify(net(), k=1.0, method=AboveOptions(threshold=0.05), seed=2)
    config = next(g.config for _, g in gated_layers(model))
    assert config.method == "toy_keep_above" and dict(config.method_options) == {"threshold": 0.05}
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for module, _ in gated_layers(model):  # the forward is the definition above
        w, s = module._parameters["weight"], module._parameters["scores"]
        assert torch.equal(module.weight, w * (s > 0.05))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not n.endswith("scores")}
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=1.0)
    before = [m._parameters["scores"].clone() for m, _ in gated_layers(model)]
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [m._parameters["scores"].grad.clone() for m, _ in gated_layers(model)]
    optimizer.step()
    for (module, _), old, grad in zip(gated_layers(model), before, grads):
        assert torch.equal(module._parameters["scores"], old - grad)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.eval()
    with torch.no_grad():
        expected = model(x)

    save_subnetwork(model, tmp_path / "toy.safetensors")
    with torch.no_grad():
        assert torch.equal(load_subnetwork(net(), tmp_path / "toy.safetensors").eval()(x), expected)
        assert torch.equal(restore(net(), model.state_dict()).eval()(x), expected)
        plain = materialize(model).eval()
        assert type(plain[0]) is nn.Linear and torch.equal(plain(x), expected)


def test_unknown_methods_and_options_are_named():
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*edge_popup.*toy_keep_above"):
        PopupConfig(k=0.5, method="nope")
    with pytest.raises(ValueError, match=r"no option 'treshold'.*threshold"):
        PopupConfig(k=0.5, method="toy_keep_above", method_options={"treshold": 1.0})
    with pytest.raises(ValueError, match="must be a number"):
        PopupConfig(k=0.5, method=AboveOptions(threshold="high"))


def test_a_name_is_registered_once():
    class Other(KeepAbove):
        pass

    Other.__qualname__ = "Other"
    with pytest.raises(ValueError, match="registered already"):
        register_method(Other)
    register_method(KeepAbove)  # the same class again: no-op


# ------------------------------------------------------------------------------- files from before the protocol

FIXTURES = Path(__file__).parent / "fixtures" / "before_redesign"
sys.path.insert(0, str(FIXTURES))
import make as before  # noqa: E402  (the builders the fixtures were written with)


@pytest.mark.parametrize("name", sorted(before.CASES))
def test_files_and_state_dicts_written_before_the_protocol_give_the_same_logits(name):
    build, _, _ = before.CASES[name]
    io = torch.load(FIXTURES / f"{name}.io.pt")
    state = torch.load(FIXTURES / f"{name}.state.pt")
    with torch.no_grad():
        assert torch.equal(restore(build(), state).eval()(io["x"]), io["logits"])
        if (FIXTURES / f"{name}.safetensors").exists():
            loaded = load_subnetwork(build(), FIXTURES / f"{name}.safetensors").eval()
            assert torch.equal(loaded(io["x"]), io["logits"])


class CountingSteps(KeepAbove):
    """KeepAbove that counts the optimizer steps that updated each layer's scores (a buffer: saved and restored)."""

    name = "toy_counting_steps"
    wants_steps = True

    def after_step(self, gate, module):
        steps = module._buffers.get("steps")
        if steps is None:
            module.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        module._buffers["steps"] += 1


register_method(CountingSteps)


@pytest.mark.parametrize("fused", [False, True])
def test_after_step_runs_once_per_optimizer_step_that_updates_the_scores(fused):
    model = popupify(net(), k=1.0, method="toy_counting_steps")
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.1, fused=fused)
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)  # holds no scores: no call
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for _ in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        other.step()
        optimizer.zero_grad()
    optimizer.zero_grad(set_to_none=True)
    optimizer.step()  # no gradient: not a step of the scores
    assert [int(m._buffers["steps"]) for m, _ in gated_layers(model)] == [3, 3]
