"""Hugging Face ``Trainer`` with a popupified model: train, save, reload the documented way and the plain way,
resume bit-exactly; the callback's logs and subnetwork files."""

import warnings

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
from hf_families import build  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments, logging  # noqa: E402

from supermask_fx import load_subnetwork, materialize, popupify  # noqa: E402
from supermask_fx.integrations.huggingface import SUBNETWORK_FILE, SupermaskCallback, from_pretrained  # noqa: E402

logging.set_verbosity_error()


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 96, (n, 8), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def trainer_for(out_dir, max_steps=6):
    model, _ = build("bert")
    popupify(model, k=0.5)
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=max_steps,
        save_steps=3,
        logging_steps=2,
        per_device_train_batch_size=4,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=Pairs(), callbacks=[SupermaskCallback()])


def logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    trainer = trainer_for(out)
    trainer.train()
    saved = out / "final"
    trainer.save_model(saved)
    return trainer, out, saved


def test_only_scores_are_optimized_and_the_callback_logs_and_writes(run):
    trainer, out, _ = run
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in trainer.model.named_parameters() if n.endswith("scores")}
    logged = [entry for entry in trainer.state.log_history if "supermask/kept_fraction" in entry]
    assert logged and all(abs(entry["supermask/kept_fraction"] - 0.5) < 0.01 for entry in logged)
    assert any(entry.get("supermask/mask_changed", 0) > 0 for entry in logged)  # the masks moved
    _, inputs = build("bert")
    for step in (3, 6):
        assert (out / f"checkpoint-{step}" / SUBNETWORK_FILE).is_file()
    fresh, _ = build("bert")
    load_subnetwork(fresh, out / SUBNETWORK_FILE)
    assert torch.equal(logits(fresh, inputs), logits(trainer.model, inputs))


def test_documented_reload_gives_the_trainable_model(run):
    trainer, _, saved = run
    _, inputs = build("bert")
    model = from_pretrained(type(trainer.model), saved)
    assert torch.equal(logits(model, inputs), logits(trainer.model, inputs))
    assert (
        torch.equal(model.classifier.scores, trainer.model.classifier.scores) and model.classifier.scores.requires_grad
    )


def test_plain_from_pretrained_is_the_subnetwork(run):
    trainer, _, saved = run
    _, inputs = build("bert")
    plain = type(trainer.model).from_pretrained(saved)
    assert not any(n.endswith("scores") for n, _ in plain.named_parameters())
    expected = materialize(trainer.model)  # the subnetwork: every parameter and buffer bit-identical
    for (name, a), b in zip(expected.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    # logits: equal up to BLAS rounding (from_pretrained's tensors are memory-mapped, at another alignment)
    torch.testing.assert_close(logits(plain, inputs), logits(trainer.model, inputs), rtol=1e-5, atol=1e-6)


def test_resume_is_bit_exact(run, tmp_path):
    trainer, out, _ = run
    resumed = trainer_for(tmp_path)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    for (name, a), b in zip(trainer.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def default_trainer(out_dir, callbacks=(), **overrides):
    """The ``Trainer``'s own defaults (its fused AdamW, lr 5e-5, linear decay): only what a CPU test needs."""
    model, _ = build("bert")
    popupify(model, k=0.5)
    settings = dict(
        output_dir=str(out_dir),
        max_steps=8,
        save_steps=2,
        logging_steps=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        seed=0,
        disable_tqdm=True,
    )
    args = TrainingArguments(**{**settings, **overrides})
    return Trainer(model=model, args=args, train_dataset=Pairs(), eval_dataset=Pairs(8), callbacks=list(callbacks))


def test_resume_is_bit_exact_with_the_default_fused_optimizer(tmp_path):
    whole = default_trainer(tmp_path / "whole")
    assert whole.args.optim.value == "adamw_torch_fused"  # the default this test is about
    whole.train()
    stopped = default_trainer(tmp_path / "stopped", callbacks=[_StopAt(4)])
    stopped.train()
    resumed = default_trainer(tmp_path / "stopped")
    resumed.train(resume_from_checkpoint=str(tmp_path / "stopped" / "checkpoint-4"))
    for step in (6, 8):
        a = load_file(tmp_path / "whole" / f"checkpoint-{step}" / "model.safetensors")
        b = load_file(tmp_path / "stopped" / f"checkpoint-{step}" / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (step, key)


def test_callback_warns_once_when_no_mask_changes_and_prefixes_eval_metrics(tmp_path):
    trainer = default_trainer(tmp_path, callbacks=[SupermaskCallback(write_subnetwork=False)], learning_rate=1e-12)
    with pytest.warns(UserWarning, match=r"no mask bit changed in the first 2 steps.*learning_rate=0.1") as caught:
        trainer.train()
    assert sum("no mask bit changed" in str(w.message) for w in caught) == 1
    metrics = trainer.evaluate()
    assert "eval_supermask/kept_fraction" in metrics and "supermask/kept_fraction" not in metrics
    assert abs(metrics["eval_supermask/kept_fraction"] - 0.5) < 0.01


def test_callback_does_not_warn_when_masks_move(tmp_path):
    trainer = default_trainer(
        tmp_path, callbacks=[SupermaskCallback(write_subnetwork=False)], learning_rate=0.1, optim="sgd", max_steps=4
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.train()
    changed = [e["supermask/mask_changed"] for e in trainer.state.log_history if "supermask/mask_changed" in e]
    assert changed and changed[0] > 0


class _KeptAtStepBegin(TrainerCallback):
    """The kept fraction of the first gated layer at every step's beginning (after the warm-up's update)."""

    def __init__(self):
        self.kept = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        from supermask_fx import gated_layers

        module, gate = next(iter(gated_layers(model)))
        self.kept.append(int(gate.current_mask(module).sum()))


def test_k_warmup_in_a_real_trainer_and_its_exact_resume(tmp_path):
    from supermask_fx import KWarmup, gated_layers

    def trainer(out, callbacks=()):
        model, _ = build("bert")
        popupify(model, k=0.5)
        args = TrainingArguments(
            output_dir=str(out), num_train_epochs=2, save_steps=3, logging_steps=3, per_device_train_batch_size=4,
            learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", use_cpu=True, report_to=[], seed=0,
            disable_tqdm=True,
        )  # fmt: skip
        callback = SupermaskCallback(write_subnetwork=False, k_warmup=KWarmup(1.0))
        return Trainer(model=model, args=args, train_dataset=Pairs(), callbacks=[callback, *callbacks])

    probe = _KeptAtStepBegin()
    whole = trainer(tmp_path / "whole", [probe])
    whole.train()  # 24 examples / 4 = 6 steps per epoch, 12 in all; k from 1 to 0.5 over the first 6
    module, gate = next(iter(gated_layers(whole.model)))
    n = module._parameters[gate.param].numel()
    want = [n - int((1 - (0.5 + 0.5 * (1 - min(s / 6, 1.0)))) * n) for s in range(12)]
    assert probe.kept == want
    assert int(gate.current_mask(module).sum()) == n - int(0.5 * n)

    stopped = trainer(tmp_path / "stopped", [_StopAt(3)])
    stopped.train()
    resumed = trainer(tmp_path / "stopped")
    resumed.train(resume_from_checkpoint=str(tmp_path / "stopped" / "checkpoint-3"))
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
