"""The demo's exact replay recording with ``F.cross_entropy`` (the old ``ClassificationTask.loss``) against the
hand-written ``-log_softmax(...).gather(...)`` (d46230a): CPU s of 690 training steps, plain / old / new interleaved
in one process, 5 rounds, 1 thread; prints the medians, both ratios and the largest difference of the values.

    .venv/bin/python benchmarks/inrun_demo_loss_ab.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from datacredit import ClassificationTask
from datacredit.data import flip_labels, load_digits
from datacredit.evaluate import ClassifierRecipe
from datacredit.training import InRunCallback, train_classifier


class CrossEntropyTask(ClassificationTask):
    """ClassificationTask as it was before d46230a."""

    def loss(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def main(rounds: int = 5) -> None:
    torch.set_num_threads(1)
    clean, test = load_digits(seed=0)
    train, _ = flip_labels(clean, 0.1, 0, 10)
    order = np.random.default_rng(0).permutation(len(test))
    validation = test.subset(np.sort(order[30:]))  # the demo's split: 30 queries, the rest validation
    recipe = ClassifierRecipe(64, 10, hidden=(64,))

    def run(task: ClassificationTask, record: bool) -> tuple[float, np.ndarray | None]:
        torch.manual_seed(0)
        model = recipe.build()
        callbacks = [InRunCallback(task, validation.tensors, order=1, targeted=False, keep_history=True,
                                   defer_steps=64, replay="mean", data=train)] if record else []
        start = time.process_time()
        train_classifier(model, train, epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, seed=0,
                         callbacks=callbacks)
        return time.process_time() - start, (callbacks[0].values().values if record else None)

    run(ClassificationTask(), True)  # warm-up: torch.func and forward-mode AD
    run(CrossEntropyTask(), True)
    times: dict[str, list[float]] = {"plain": [], "old": [], "new": []}
    for _ in range(rounds):
        times["plain"].append(run(ClassificationTask(), False)[0])
        t, old = run(CrossEntropyTask(), True)
        times["old"].append(t)
        t, new = run(ClassificationTask(), True)
        times["new"].append(t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"CPU s medians: {med}; old / plain {med['old'] / med['plain']:.2f}x, new / plain "
          f"{med['new'] / med['plain']:.2f}x; max |old - new| = {float(np.abs(old - new).max()):.3g}")


if __name__ == "__main__":
    main()
