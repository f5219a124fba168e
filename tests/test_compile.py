"""A popupified model under ``torch.compile``: the same masks, gradients and outputs as in eager mode, and no
recompilation from one training step to the next (the masks' thresholds change every step; the graphs must not
depend on them)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supermask_fx import fix_masks, mask_stats, popupify, supermask_parameters
from supermask_fx.core.gate import gates_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _masks(model):
    return [gate.current_mask(m).clone() for m in model.modules() for gate in gates_of(m).values()]


def _train(model, forward, optimizer, x, y):
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(forward(x), y).backward()
    optimizer.step()


def _side_by_side(method: str, backend: str, steps: int = 4):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = popupify(Net(), k=0.4, method=method, seed=3)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend=backend)
    params = [list(supermask_parameters(m)) for m in (eager, twin)]
    optimizers = [torch.optim.SGD(p, lr=0.5, momentum=0.9) for p in params]
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    for step in range(steps):
        # The first step builds every graph: later steps, whose thresholds differ, must reuse them.
        with torch._dynamo.config.patch(error_on_recompile=step >= 1):
            torch.manual_seed(step)  # the same Bernoulli draws for the sampled method
            _train(eager, eager, optimizers[0], x, y)
            torch.manual_seed(step)
            _train(twin, compiled, optimizers[1], x, y)
        for a, b in zip(*params):
            torch.testing.assert_close(b.grad, a.grad)
            torch.testing.assert_close(b, a)
        for a, b in zip(_masks(eager), _masks(twin)):
            assert torch.equal(a, b)
    return eager, twin, compiled, x


@pytest.mark.parametrize("method", ["edge_popup", "sampled"])
def test_compiled_training_matches_eager_and_never_recompiles(method):
    eager, twin, compiled, x = _side_by_side(method, backend="aot_eager")
    assert any(not torch.equal(m, (m.float().mean() > 2).expand_as(m)) for m in _masks(twin))  # real masks
    eager.eval(), twin.eval()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=False):
        torch.testing.assert_close(compiled(x), eager(x))
    assert mask_stats(twin) == mask_stats(eager)


def test_compiled_model_with_fixed_masks():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = popupify(Net(), k=0.4, seed=3)
    fix_masks(eager, train_weights=True)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="aot_eager")
    params = [list(supermask_parameters(m)) for m in (eager, twin)]
    optimizers = [torch.optim.SGD(p, lr=0.1) for p in params]
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    for _ in range(3):
        _train(eager, eager, optimizers[0], x, y)
        _train(twin, compiled, optimizers[1], x, y)
    for a, b in zip(*params):
        torch.testing.assert_close(b, a)


@pytest.mark.slow
def test_inductor_training_matches_eager():
    """The default backend (inductor: generated C++ on the CPU) fuses the graphs between the gated reads."""
    _side_by_side("edge_popup", backend="inductor", steps=3)
