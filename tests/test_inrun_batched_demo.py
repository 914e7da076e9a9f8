"""The demo's In-Run recording (replay of 64 steps at a time, nothing captured during training) gives the exact
values of the per-step route on the demo's own float32 run (issue 16)."""

from __future__ import annotations

import numpy as np
import torch

from datacredit import ClassificationTask
from datacredit.data import flip_labels, load_digits
from datacredit.demo import DEFER_STEPS
from datacredit.evaluate import ClassifierRecipe
from datacredit.training import InRunCallback


def test_the_demo_recording_equals_the_per_step_route():
    clean, test = load_digits(seed=0)
    train, _ = flip_labels(clean, 0.1, 0, 10)
    val = test.subset(np.arange(30, len(test))).tensors
    recipe = ClassifierRecipe(64, 10, hidden=(64,), epochs=4)  # 92 steps: a full window and a partial one

    def values(**options):
        recorder = InRunCallback(ClassificationTask(), val, order=1, targeted=False, **options)
        torch.manual_seed(0)
        recipe.train(train, 0, callbacks=[recorder])
        return recorder.values()

    ref, got = values(), values(defer_steps=DEFER_STEPS, replay="mean", data=train)
    assert np.array_equal(got.train_ids, ref.train_ids)
    a, b = got.values[:, 0], ref.values[:, 0]
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)  # float32 rounding (measured 7e-8 on the full run)
