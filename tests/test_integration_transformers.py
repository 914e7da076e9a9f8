"""The transformers.Trainer callback gives the same In-Run values as the plain-loop API on the same steps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from datacredit import LanguageModelingTask  # noqa: E402
from datacredit.integrations.transformers import InRunShapleyCallback  # noqa: E402
from datacredit.methods.inrun import InRunShapley  # noqa: E402

T = 6


class Tokens(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        x = self.tokens[i]
        return {"input_ids": x, "labels": x, "position_ids": torch.arange(T), "example_id": i}


def collate(items):
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


@pytest.mark.parametrize("order", [1, 2])
def test_trainer_callback_equals_plain_loop(tmp_path, order):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=11, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    # eager attention: the CPU SDPA kernel has no double backward (second order needs Hessian-vector products)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager").double()
    start = copy.deepcopy(model)
    data = Tokens(torch.randint(0, 11, (12, T)))
    val = torch.randint(0, 11, (3, T + 1))
    task = LanguageModelingTask(position_ids=True)

    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    callback = InRunShapleyCallback(task, val, order=order, keep_history=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, max_grad_norm=0.05,
        report_to=[], use_cpu=True, logging_strategy="no", save_strategy="no", seed=0,
        remove_unused_columns=False, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collate,
                                   optimizers=(opt, sched), callbacks=[callback])
    trainer.train()
    got = callback.values()
    history = callback.shapley.history
    assert [h[0] for h in history] == [0, 1, 2] and all(len(h[1]) == 4 for h in history)
    assert args.max_grad_norm == 0.05  # restored after training

    # the same steps by hand: same batches (from the history), same loss, same clipping
    manual = start
    opt2 = torch.optim.SGD(manual.parameters(), lr=0.5, momentum=0.9)
    shapley = InRunShapley(manual, task, val, opt2, order=order)
    manual.train()
    for _, ids, _ in history:
        batch = collate([data[int(i)] for i in ids])
        batch.pop("example_id")
        opt2.zero_grad()
        with shapley.step(ids):
            manual(**batch).loss.backward()
        shapley.clip_grad_norm_(0.05)
        opt2.step()
    want = shapley.values()
    assert got.train_ids.tolist() == want.train_ids.tolist()
    # rtol 1e-6, not 1e-9: the Trainer normalizes the float64 loss by a float32 token count (measured: 1.4e-7
    # relative difference already at step 0, no drift over steps)
    np.testing.assert_allclose(got.values, want.values, rtol=1e-6, atol=1e-6 * np.abs(want.values).max())
    assert np.abs(want.values).max() > 0


def run_trainer(tmp_path, scaler=None, max_grad_norm=0.05):
    """Three Trainer steps of a tiny float64 GPT-2 with the callback; ``scaler``: put into the Trainer's accelerator,
    as ``fp16=True`` does on a GPU (on CPU accelerate makes none), so the backward runs on the scaled loss."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=11, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager").double()
    data = Tokens(torch.randint(0, 11, (12, T)))
    val = torch.randint(0, 11, (3, T + 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    callback = InRunShapleyCallback(LanguageModelingTask(position_ids=True), val, order=1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, max_grad_norm=max_grad_norm,
        report_to=[], use_cpu=True, logging_strategy="no", save_strategy="no", seed=0,
        remove_unused_columns=False, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collate,
                                   optimizers=(opt, sched), callbacks=[callback])
    if scaler is not None:
        trainer.accelerator.scaler = scaler
    trainer.train()
    return callback, model


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_trainer_callback_with_a_grad_scaler_equals_unscaled_training(tmp_path, max_grad_norm):
    """fp16's GradScaler (scale 2^16): before, values came out ×65536. Clipping unscales first, as accelerate does."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaled, model_a = run_trainer(tmp_path / "a", scaler, max_grad_norm)
    plain, model_b = run_trainer(tmp_path / "b", None, max_grad_norm)
    assert scaled.shapley.scaler is scaler and scaled.shapley.skipped == 0 and scaled.shapley.steps == 3
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)
    got, want = scaled.values(), plain.values()
    assert got.train_ids.tolist() == want.train_ids.tolist()
    np.testing.assert_allclose(got.values, want.values, rtol=1e-9, atol=1e-12 * np.abs(want.values).max())
