"""In-Run Data Shapley inside a transformers.Trainer: a GPT-2 built from a small config (no weights download).

Trains a 2-layer GPT-2 on chunks of the bundled public-domain text for a few steps with the callback, then prints
the training chunks that lowered the validation loss most and least.

    python examples/gpt2_trainer_callback.py
"""

import torch
import transformers

import datacredit as dc
from datacredit.integrations.transformers import InRunShapleyCallback

T = 64


class Chunks(torch.utils.data.Dataset):
    """Each item carries its stable id under "example_id" and per-example position ids (GPT-2's default (1, T)
    position ids are shared by the batch and have no per-example gradient)."""

    def __init__(self, data: dc.data.CharDataset):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        (x,) = self.data[i]
        return {"input_ids": x[:-1], "labels": x[:-1], "position_ids": torch.arange(T),
                "example_id": int(self.data.ids[i])}


def collate(items):
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def main(max_steps: int = 20, out_dir: str = "runs/gpt2-example") -> dc.Scores:
    torch.manual_seed(0)
    chars = dc.data.CharDataset(dc.data.load_text_sample(), seq_len=T)
    train, val = chars.subset(range(0, len(chars) - 8)), chars.subset(range(len(chars) - 8, len(chars)))
    config = transformers.GPT2Config(vocab_size=chars.vocab_size, n_positions=T, n_embd=64, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    task = dc.LanguageModelingTask(position_ids=True)
    validation = torch.stack([val[i][0] for i in range(len(val))])
    callback = InRunShapleyCallback(task, validation, order=1)
    args = transformers.TrainingArguments(output_dir=out_dir, per_device_train_batch_size=8, max_steps=max_steps,
                                          learning_rate=1e-3, report_to=[], use_cpu=True, logging_strategy="no",
                                          save_strategy="no", remove_unused_columns=False)
    transformers.Trainer(model=model, args=args, train_dataset=Chunks(train), data_collator=collate,
                         callbacks=[callback]).train()
    values = callback.values()
    by_id = {int(i): k for k, i in enumerate(train.ids)}
    for label, items in (("most helpful", values.topk(2)), ("most harmful", values.bottomk(2))):
        for train_id, value in items:
            text = chars.decode(train[by_id[train_id]][0])
            print(f"{label} {value:+.4f}: {text[:60]!r}")
    return values


if __name__ == "__main__":
    main()
