"""The one training loop (datacredit.training): the recipes, the demo and LoRA fine-tuning train through it and give
the weights the earlier hand-written loop gave, bit for bit; the judge (evaluate) never imports the demo."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datacredit.data import load_digits
from datacredit.evaluate import ClassifierRecipe
from datacredit.models import mlp
from datacredit.task import ClassificationTask
from datacredit.training import InRunCallback, train_classifier


def reference_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
                   batch_size: int, seed: int) -> torch.nn.Module:
    """The loop the demo and ClassifierRecipe used before datacredit.training (SGD + momentum 0.9, mean CE)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def digits(n: int = 200):
    data, test = load_digits(seed=0)
    return data.subset(np.arange(n)), test.subset(np.arange(20))


def test_recipe_model_equals_the_earlier_loop():
    data, _ = digits()
    for recipe, seed in ((ClassifierRecipe(64, 10, (8,), epochs=2), 3), (ClassifierRecipe(64, 10, (), epochs=3), 0),
                         (ClassifierRecipe(64, 10, (8,), epochs=2, dropout=0.3, batch_size=50), 1)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ref = reference_loop(recipe.build(), *data.tensors, recipe.epochs, recipe.lr, recipe.batch_size, seed)
        assert max_abs_diff(recipe.train(data, seed), ref) == 0.0, recipe


def test_callbacks_do_not_change_the_model():
    data, val = digits()
    recipe = ClassifierRecipe(64, 10, (8,), epochs=2)
    recorder = InRunCallback(ClassificationTask(), val, order=1, targeted=True)
    model = recipe.train(data, 5, callbacks=[recorder])
    assert max_abs_diff(model, recipe.train(data, 5)) == 0.0
    values = recorder.values()
    assert values.values.shape == (len(data), len(val)) and np.isfinite(values.values).all()
    assert np.abs(values.values).max() > 0


class TupleDataset(Dataset):
    """A map-style dataset of ``(x, y)`` tuples without ``.tensors``: the collated path of the loop."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def test_collated_batches_equal_indexed_batches():
    data, _ = digits(130)
    models = []
    for dataset in (data, TupleDataset(*data.tensors)):
        torch.manual_seed(0)
        models.append(train_classifier(mlp(64, [8], 10), dataset, epochs=2, seed=4))
    assert max_abs_diff(*models) == 0.0


def test_the_judge_never_imports_the_demo():
    code = "import sys, datacredit.evaluate, datacredit.training; print('datacredit.demo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
