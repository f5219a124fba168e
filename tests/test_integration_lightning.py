"""PyTorch Lightning with a popupified network: fit, checkpoint, resume from ``ckpt_path`` bit-exactly (fixed data
order), the callback's logs and subnetwork file, ``restore`` from a Lightning checkpoint."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning")

from supermask_fx import load_subnetwork, popupify, restore, supermask_parameters  # noqa: E402
from supermask_fx.integrations.lightning import SUBNETWORK_FILE, SupermaskCallback  # noqa: E402


def net():
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = popupify(net(), k=0.5)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(supermask_parameters(self), lr=0.5, momentum=0.9)


g = torch.Generator().manual_seed(0)
DATA = torch.utils.data.TensorDataset(torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g))
X = DATA.tensors[0][:8]


def fit(root, epochs, ckpt_path=None):
    torch.manual_seed(0)
    model = Classifier()
    trainer = L.Trainer(
        default_root_dir=root,
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=L.pytorch.loggers.CSVLogger(root),
        callbacks=[SupermaskCallback(), L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1)],
    )
    trainer.fit(model, torch.utils.data.DataLoader(DATA, batch_size=16, shuffle=False), ckpt_path=ckpt_path)
    return model, trainer


def test_fit_checkpoint_resume_bit_exact(tmp_path):
    straight, trainer = fit(tmp_path / "a", 3)
    checkpoints = sorted((tmp_path / "a" / "ckpt").glob("*.ckpt"))
    assert len(checkpoints) == 3
    assert "supermask/kept_fraction" in trainer.logged_metrics
    assert 0 < float(trainer.logged_metrics["supermask/mask_changed"]) < 1
    first = next(c for c in checkpoints if "epoch=0" in c.name)
    resumed, _ = fit(tmp_path / "b", 3, ckpt_path=first)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name

    fresh = load_subnetwork(net(), tmp_path / "a" / "ckpt" / SUBNETWORK_FILE).eval()
    with torch.no_grad():
        assert torch.equal(fresh(X), straight.net.eval()(X))
    checkpoint = torch.load(checkpoints[-1], weights_only=True)
    restored = restore(net(), checkpoint).eval()  # "state_dict" with the "net." prefix
    with torch.no_grad():
        assert torch.equal(restored(X), straight.net(X))


class _Kept(L.Callback):
    """The kept count of the first layer at every training batch's start (the warm-up applied after the last)."""

    def __init__(self):
        self.kept = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from supermask_fx import gated_layers

        module, gate = next(iter(gated_layers(pl_module)))
        self.kept.append(int(gate.current_mask(module).sum()))


def test_k_warmup_in_a_real_fit_and_its_exact_resume(tmp_path):
    from supermask_fx import KWarmup

    def run(root, epochs, probe=None, ckpt_path=None):
        torch.manual_seed(0)
        model = Classifier()
        callbacks = [SupermaskCallback(write_subnetwork=False, k_warmup=KWarmup(2.0))]
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1))
        trainer = L.Trainer(
            default_root_dir=root, max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
            enable_model_summary=False, logger=False, callbacks=callbacks + ([probe] if probe else []),
        )  # fmt: skip
        trainer.fit(model, torch.utils.data.DataLoader(DATA, batch_size=16, shuffle=False), ckpt_path=ckpt_path)
        return model

    probe = _Kept()
    whole = run(tmp_path / "a", 3, probe)  # 4 steps per epoch; k from 1 to 0.5 over the first 8
    n = 10 * 32
    want = [n - int((1 - (0.5 + 0.5 * (1 - min(s / 8, 1.0)))) * n) for s in range(12)]
    assert probe.kept == want
    first = sorted((tmp_path / "a" / "ckpt").glob("*.ckpt"))[0]  # after epoch 1: in the middle of the warm-up
    resumed = run(tmp_path / "b", 3, ckpt_path=first)
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
