"""docs/plugging-in.md, checked: a plain PyTorch training script with only the two-line change.

The script below is written the way a user's script is (its own model, data, loop, no supermask_fx code) except
for the two lines marked ``# supermask_fx``. The loss must fall and the frozen weights stay bit-identical.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from supermask_fx import mask_stats, popupify, supermask_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):  # a user's own model
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 3 * 3, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def user_data():
    g = torch.Generator().manual_seed(0)
    prototypes = torch.randn(10, 1, 12, 12, generator=g)
    labels = torch.randint(0, 10, (640,), generator=g)
    images = prototypes[labels] + 0.5 * torch.randn(640, 1, 12, 12, generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=64, shuffle=True, generator=g)


def user_script(snapshot):
    torch.manual_seed(0)
    model = Net()
    model = popupify(model, k=0.5)  # supermask_fx: weights random and frozen, scores learned
    snapshot(model)
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.1, momentum=0.9, weight_decay=1e-4)  # supermask_fx
    losses = []
    for _epoch in range(4):
        total = 0.0
        for images, labels in user_data():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            total += loss.item()
        losses.append(total)
    return model, losses


def test_two_line_change_trains_the_mask_and_never_the_weights():
    frozen = {}

    def snapshot(model):
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                frozen[name] = module._parameters["weight"].detach().clone()

    model, losses = user_script(snapshot)
    assert len(frozen) == 4
    assert losses[-1] < 0.5 * losses[0], losses  # it learns
    for name, module in model.named_modules():
        if name in frozen:
            assert torch.equal(module._parameters["weight"], frozen[name]), name  # bit-identical
            assert module.weight.count_nonzero() <= module._parameters["weight"].numel() // 2 + 1
    optimizer_params = list(supermask_parameters(model))
    assert all(
        p is m._parameters["scores"] for p, m in zip(optimizer_params, (model.conv1, model.conv2, model.fc1, model.fc2))
    )
    assert mask_stats(model).fraction == 0.5
