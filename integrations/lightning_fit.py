"""Recipe: edge-popup in a PyTorch Lightning module (an MLP on random data, CPU), checkpoint and resume.

python integrations/lightning_fit.py --out runs/lightning
"""

import argparse
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from supermask_fx import popupify, supermask_parameters  # supermask_fx
from supermask_fx.integrations.lightning import SupermaskCallback  # supermask_fx


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = popupify(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4)), k=0.5)  # supermask_fx

    def training_step(self, batch, _):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(supermask_parameters(self), lr=0.1, momentum=0.9)  # supermask_fx: the scores


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="runs/lightning", help="output folder")
    parser.add_argument("--epochs", type=int, default=3, help="epochs")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 20, generator=g), torch.randint(0, 4, (256,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    trainer = L.Trainer(
        default_root_dir=args.out, max_epochs=args.epochs, accelerator="cpu", callbacks=[SupermaskCallback()]
    )
    trainer.fit(Classifier(), loader)
    last = sorted(Path(trainer.checkpoint_callback.dirpath).glob("*.ckpt"))[-1]
    print(f"checkpoint {last}; resume with trainer.fit(model, loader, ckpt_path={str(last)!r})")


if __name__ == "__main__":
    main()
