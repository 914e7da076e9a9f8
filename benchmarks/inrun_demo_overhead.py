"""In-Run recording cost in the demo's own training run (digits MLP 64-64-10, batch 64, 30 epochs = 690 steps,
329 validation images): CPU seconds of plain training vs training with first-order In-Run recording, interleaved,
3 repeats each, for the full validation set (per-step route, and ``defer_steps=64`` as the demo records: the same
values computed 64 steps at a time) and validation budgets of 64 and 16 images.

    .venv/bin/python benchmarks/inrun_demo_overhead.py
"""

from __future__ import annotations

import time

import numpy as np
import torch

from datacredit import ClassificationTask
from datacredit.data import flip_labels, load_digits
from datacredit.evaluate import ClassifierRecipe
from datacredit.training import InRunCallback, train_classifier


def main() -> None:
    torch.set_num_threads(1)
    clean, test = load_digits(seed=0)
    train, _ = flip_labels(clean, 0.1, 0, 10)
    order = np.random.default_rng(0).permutation(len(test))
    validation = test.subset(np.sort(order[30:]))  # the demo's split: 30 queries, the rest validation
    recipe, task = ClassifierRecipe(64, 10, hidden=(64,)), ClassificationTask()

    def run(budget: int | None, record: bool, defer: int | None = None) -> float:
        torch.manual_seed(0)
        model = recipe.build()
        extra = {} if budget is None else {"validation_subsample": budget}
        if defer is not None:
            extra["defer_steps"] = defer
        recorder = InRunCallback(task, validation.tensors, order=1, targeted=False, keep_history=True, **extra)
        callbacks = [recorder] if record else []
        start = time.process_time()
        train_classifier(model, train, epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, seed=0,
                         callbacks=callbacks)
        return time.process_time() - start

    run(None, False)  # warm-up
    print("| validation | plain CPU s | recorded CPU s | recorded / plain |\n|---|---|---|---|")
    for budget, defer in ((None, None), (None, 64), (64, None), (16, None)):
        plain, recorded = [], []
        for _ in range(3):
            plain.append(run(budget, False))
            recorded.append(run(budget, True, defer))
        label = f"{len(validation)} images (exact)" if budget is None else f"subsample {budget}"
        label += f", defer_steps={defer}" if defer else ""
        print(f"| {label} | {np.median(plain):.2f} | {np.median(recorded):.2f} | "
              f"{np.median(recorded) / np.median(plain):.2f}× |")


if __name__ == "__main__":
    main()
