"""Recipe: edge-popup inside a Hugging Face ``Trainer`` run (a tiny BERT from a config, random data, CPU).

    python integrations/hf_trainer.py --out runs/hf_trainer

The diff against a usual Trainer script is the lines marked ``# supermask_fx``.
"""

import argparse

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from supermask_fx import coverage, popupify  # supermask_fx
from supermask_fx.integrations.huggingface import SupermaskCallback, from_pretrained  # supermask_fx


class RandomPairs(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.ids, self.labels = torch.randint(3, 96, (n, 8), generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="runs/hf_trainer", help="output folder")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    args = parser.parse_args()
    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = BertForSequenceClassification(config)
    model = popupify(model, k=0.5)  # supermask_fx: weights redrawn and frozen; only scores train
    print(f"gated {len(coverage(model).gated)} weights (found by {coverage(model).path})")
    training = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        save_steps=10,
        logging_steps=5,
        per_device_train_batch_size=16,
        optim="sgd",  # supermask_fx: scores want SGD at lr 0.1, as in the paper
        learning_rate=0.1,
        use_cpu=True,
        report_to=[],
    )
    trainer = Trainer(model=model, args=training, train_dataset=RandomPairs(), callbacks=[SupermaskCallback()])
    trainer.train()
    trainer.save_model(f"{args.out}/final")
    again = from_pretrained(BertForSequenceClassification, f"{args.out}/final")  # supermask_fx: scores and all
    plain = BertForSequenceClassification.from_pretrained(f"{args.out}/final")  # the subnetwork, masks baked in
    batch = RandomPairs()[0]["input_ids"][None]
    with torch.no_grad():
        same = torch.equal(again.eval()(batch).logits, model.eval()(batch).logits)
        # plain: the very same weights; logits may differ in the last bit (BLAS on memory-mapped, other alignment)
        close = torch.allclose(plain.eval()(batch).logits, model(batch).logits, rtol=1e-5, atol=1e-6)
    print(f"reloaded with from_pretrained: identical logits {same}; plain from_pretrained: same logits {close}")


if __name__ == "__main__":
    main()
