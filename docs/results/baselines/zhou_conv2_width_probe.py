"""Probe: Zhou et al.'s supermask, faithful (their settings and Glorot signed constant), on Conv2 (CIFAR-10, the
JPEG copy) at several widths, the same number of steps each (constant lr 200, momentum 0.9, batch 128, no
augmentation, random batches of the 50,000 training images, seed 0). Prints the test accuracy on the first 2,000
test images with sampled masks (their rule) and with the threshold mask, and the share of keep probabilities
still in (0.2, 0.8). docs/reproducing.md, "Zhou et al. on Conv2", quotes zhou_conv2_width_probe.log.

    OMP_NUM_THREADS=1 python docs/results/baselines/zhou_conv2_width_probe.py 1200 0.25 0.5 1.0   # ~12 min here
"""

import sys
import time

import torch
import torch.nn.functional as F

from supermask_fx import popupify, supermask_parameters
from supermask_fx.data import load_dataset
from supermask_fx.methods.sampled import ZHOU_ET_AL, configure
from supermask_fx.models import build_model


def accuracy(model, images, targets) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == targets).float().mean().item()


def main(steps: int, widths: list[float]) -> None:
    torch.set_num_threads(1)
    train = load_dataset("cifar10", "train")
    test = load_dataset("cifar10", "test", limit=2000)
    test_images = torch.stack([test[i][0] for i in range(len(test))])
    for width in widths:
        torch.manual_seed(0)
        net = build_model("conv2", dataset="cifar10", width=width)
        model = popupify(net, k=0.5, method="sampled", method_options=ZHOU_ET_AL, init="xavier_signed_constant")
        optimizer = torch.optim.SGD(supermask_parameters(model), lr=200, momentum=0.9)
        start = time.time()
        for _ in range(steps):
            index = torch.randint(0, len(train.targets), (128,))
            images = torch.stack([train[i][0] for i in index.tolist()])
            loss = F.cross_entropy(model(images), train.targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        sampled = accuracy(model, test_images, test.targets)
        configure(model, eval_rule="threshold")
        threshold = accuracy(model, test_images, test.targets)
        p = torch.cat([torch.sigmoid(s).flatten() for s in supermask_parameters(model) if s.requires_grad])
        middle = ((p > 0.2) & (p < 0.8)).float().mean().item()
        print(
            f"width {width}: {steps} steps, test sampled {sampled:.3f}, threshold {threshold:.3f}, "
            f"p in (0.2,0.8) {middle:.2f}, {time.time() - start:.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]), [float(w) for w in sys.argv[2:]])
