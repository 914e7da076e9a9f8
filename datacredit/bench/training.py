"""The benchmark cases' training runs, written once with callbacks, so the model under attribution, its trajectory
(TracIn), an In-Run Shapley run and the ground truth's retrainings all follow the same recipe.

A recipe here is a :class:`~datacredit.evaluate.ClassifierRecipe` or an :class:`LMRecipe`. :func:`train` runs its loop
step by step: build the model (from ``seed``, in a forked torch RNG), draw the batch order from
``torch.Generator().manual_seed(seed)``, and for every mini-batch call each callback's ``batch(ids)`` context around
the forward + backward and ``after_step()`` after ``optimizer.step()``. With no callbacks it is the recipe's own
``train`` (for ClassifierRecipe: ``datacredit.demo.train_classifier``, bit for bit — a test checks it).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.dataset import example_ids
from ..errors import DataError
from ..evaluate import ClassifierRecipe
from ..methods import InRunShapley
from ..models import TinyGPT
from ..scores import Scores
from ..task import LanguageModelingTask, Task
from ..trajectory import TrajectoryRecorder

__all__ = ["Callback", "InRunCallback", "LMRecipe", "TrajectoryCallback", "total_steps", "train"]

_EVAL_BATCH = 1024


class Callback(Protocol):
    """What :func:`train` calls: ``start`` once with the fresh model and optimizer, ``batch(ids)`` around every
    forward + backward (a context manager), ``after_step()`` after every ``optimizer.step()``, ``end()`` once."""

    def start(self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None: ...

    def batch(self, ids: np.ndarray) -> contextlib.AbstractContextManager: ...

    def after_step(self) -> None: ...

    def end(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class LMRecipe:
    """A character-level :class:`~datacredit.models.TinyGPT` trained with Adam on next-character prediction.

    Data: a :class:`~datacredit.data.CharDataset` (or an ArrayDataset of ``(n, seq_len + 1)`` token ids).
    Loss per example: the mean next-character cross-entropy of the sequence (``LanguageModelingTask()``); a
    mini-batch's loss is the mean over its sequences. Seed: initialisation and batch order, as ClassifierRecipe.
    Measure per query, shape ``(n_query,)``: ``"loss"`` (lower is better). Picklable (a frozen dataclass of numbers).
    """

    vocab_size: int
    seq_len: int
    d: int = 32
    n_layers: int = 2
    n_heads: int = 2
    tied: bool = False
    epochs: int = 8
    lr: float = 1e-2
    batch_size: int = 32

    measures: ClassVar[tuple[str, ...]] = ("loss",)

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.seq_len, self.d, self.n_layers, self.n_heads, self.epochs, self.batch_size) < 1:
            raise ValueError(f"LMRecipe: sizes and epochs must be positive, got {self}")
        if self.d % self.n_heads or not self.lr > 0:
            raise ValueError(f"LMRecipe: need d divisible by n_heads and lr > 0, got {self}")

    def build(self) -> nn.Module:
        """A freshly initialised TinyGPT (from the global torch RNG: seed or fork it first)."""
        return TinyGPT(self.vocab_size, d=self.d, n_layers=self.n_layers, n_heads=self.n_heads,
                       max_len=self.seq_len, tied=self.tied)

    def train(self, dataset: Dataset, seed: int) -> nn.Module:
        return train(self, dataset, seed)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, queries: Dataset) -> dict[str, np.ndarray]:
        """``{"loss": (Q,)}``: each query sequence's mean next-character cross-entropy, float64, eval mode."""
        model.eval()
        tokens = _tensors(queries)[0]
        task = LanguageModelingTask()
        losses = [task.loss(model, (tokens[s : s + _EVAL_BATCH],)).double()
                  for s in range(0, len(tokens), _EVAL_BATCH)]
        return {"loss": torch.cat(losses).numpy()}


def _tensors(dataset: Dataset) -> tuple[torch.Tensor, ...]:
    tensors = getattr(dataset, "tensors", None)
    if tensors is None:
        raise DataError(f"the benchmark recipes need an ArrayDataset, got {type(dataset).__name__}")
    return tensors


def _loop(recipe: Any) -> tuple[type, float, int, int]:
    """(optimizer class, lr, epochs, batch size) of a supported recipe."""
    if isinstance(recipe, ClassifierRecipe):
        return torch.optim.SGD, recipe.lr, recipe.epochs, recipe.batch_size
    if isinstance(recipe, LMRecipe):
        return torch.optim.Adam, recipe.lr, recipe.epochs, recipe.batch_size
    raise DataError(f"benchmark training supports ClassifierRecipe and LMRecipe, got {type(recipe).__name__}")


def total_steps(recipe: Any, n_train: int) -> int:
    """Optimizer steps of one training run on ``n_train`` examples."""
    _, _, epochs, batch_size = _loop(recipe)
    return epochs * -(-n_train // batch_size)


def _batch_loss(recipe: Any, model: nn.Module, tensors: tuple[torch.Tensor, ...], idx: torch.Tensor) -> torch.Tensor:
    if isinstance(recipe, ClassifierRecipe):
        return F.cross_entropy(model(tensors[0][idx]), tensors[1][idx])
    return LanguageModelingTask().loss(model, (tensors[0][idx],)).mean()


def train(recipe: Any, dataset: Dataset, seed: int, callbacks: Sequence[Callback] = ()) -> nn.Module:
    """Train ``recipe``'s model on ``dataset`` with training seed ``seed``, calling ``callbacks`` (module doc).

    Returns the trained model in eval mode. The caller's global torch RNG is left untouched.
    """
    tensors = _tensors(dataset)
    ids = example_ids(dataset)
    opt_class, lr, epochs, batch_size = _loop(recipe)
    steps = total_steps(recipe, len(ids))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = recipe.build()
        if tensors[0].is_floating_point():
            model = model.to(tensors[0].dtype)
        gen = torch.Generator().manual_seed(seed)
        opt = opt_class(model.parameters(), lr=lr, momentum=0.9) if opt_class is torch.optim.SGD else \
            opt_class(model.parameters(), lr=lr)
        for cb in callbacks:
            cb.start(model, opt, steps)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(ids), generator=gen).split(batch_size):
                opt.zero_grad()
                with contextlib.ExitStack() as stack:
                    for cb in callbacks:
                        stack.enter_context(cb.batch(ids[idx.numpy()]))
                    _batch_loss(recipe, model, tensors, idx).backward()
                opt.step()
                for cb in callbacks:
                    cb.after_step()
        model.eval()
        for cb in callbacks:
            cb.end()
    return model


class TrajectoryCallback:
    """Records ``n_checkpoints`` evenly spaced checkpoints (the last one = the final model) into ``out_dir``."""

    def __init__(self, out_dir: str, n_checkpoints: int = 10):
        self.out_dir, self.n_checkpoints = out_dir, n_checkpoints
        self.recorder: TrajectoryRecorder | None = None

    def start(self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
        k = min(self.n_checkpoints, steps)
        at = sorted({int(round(s)) for s in np.linspace(steps / k, steps, k)})
        self.recorder = TrajectoryRecorder(model, self.out_dir, optimizer=optimizer, at_steps=at, overwrite=True,
                                           keep_optimizer="none")

    def batch(self, ids: np.ndarray) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def after_step(self) -> None:
        self.recorder.step()

    def end(self) -> None:
        self.recorder.save()


class InRunCallback:
    """In-Run Data Shapley during the run: ``targeted=True`` values every (training example, query) pair."""

    def __init__(self, task: Task, validation: Dataset, order: int = 1, targeted: bool = True):
        self.task, self.validation, self.order, self.targeted = task, validation, order, targeted
        self.shapley: InRunShapley | None = None

    def start(self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
        self.shapley = InRunShapley(model, self.task, validation=self.validation, optimizer=optimizer,
                                    order=self.order, targeted=self.targeted)

    def batch(self, ids: np.ndarray) -> contextlib.AbstractContextManager:
        return self.shapley.step(ids)

    def after_step(self) -> None:
        pass

    def end(self) -> None:
        self.shapley.close()

    def values(self) -> Scores:
        """``(n_train, n_query)`` (targeted) or ``(n_train, 1)``; positive = lowered the query's loss."""
        return self.shapley.values()
