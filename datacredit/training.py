"""The library's one training loop, with callbacks: the recipes (ground-truth retraining), the demo, LoRA fine-tuning,
the benchmark cases and In-Run / trajectory recording all train through :func:`train`.

:func:`train` draws the batch order from ``torch.Generator().manual_seed(seed)`` (``randperm`` each epoch, split into
``batch_size`` pieces) and, for every mini-batch, calls ``optimizer.zero_grad()``, enters each callback's
``batch(ids)`` context around the forward + backward of ``loss(model, batch)``, calls ``optimizer.step()`` and then
each callback's ``after_step()``. The model is in train mode during the loop and returned in eval mode. It draws
nothing from the global torch RNG itself (dropout in the model does: seed or fork it around the call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from .dataset import example_ids
from .errors import DataError
from .scores import Scores
from .task import Task
from .trajectory import TrajectoryRecorder

__all__ = ["Callback", "InRunCallback", "TrajectoryCallback", "classification_loss", "steps_per_epoch", "train",
           "train_classifier"]

LossFn = Callable[[nn.Module, tuple[Tensor, ...]], Tensor]


class Callback(Protocol):
    """What :func:`train` calls: ``start`` once with the model, optimizer and number of steps, ``batch(ids)`` around
    every forward + backward (a context manager), ``after_step()`` after every ``optimizer.step()``, ``end()`` once
    (after the model is put in eval mode)."""

    def start(self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None: ...

    def batch(self, ids: np.ndarray) -> contextlib.AbstractContextManager: ...

    def after_step(self) -> None: ...

    def end(self) -> None: ...


def classification_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Mean cross-entropy of ``model(x)`` (or its ``.logits``, for transformers outputs) against ``y``; scalar."""
    out = model(batch[0])
    return F.cross_entropy(getattr(out, "logits", out), batch[1])


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one pass over ``n`` examples (the last batch may be smaller)."""
    return -(-n // batch_size)


def _batches(dataset: Dataset, gen: torch.Generator, batch_size: int) -> Iterator[tuple[Tensor, tuple[Tensor, ...]]]:
    """``(row indices, batch tensors)`` in a random order: slices of an ArrayDataset's tensors, else collated items
    (the same order and batches as ``DataLoader(dataset, batch_size, shuffle=True, generator=gen)``)."""
    tensors = getattr(dataset, "tensors", None)
    for idx in torch.randperm(len(dataset), generator=gen).split(batch_size):
        if tensors is not None:
            yield idx, tuple(t[idx] for t in tensors)
        else:
            yield idx, tuple(default_collate([dataset[int(i)] for i in idx]))


def train(model: nn.Module, dataset: Dataset | DataLoader, *, optimizer: torch.optim.Optimizer, loss: LossFn,
          epochs: int, batch_size: int, seed: int, callbacks: Sequence[Callback] = (),
          progress: bool = False) -> nn.Module:
    """Train ``model`` in place on ``dataset`` (module docstring); returns it in eval mode.

    dataset: an ArrayDataset (its tensors are indexed; its ids go to the callbacks) or any map-style dataset of
    tuples (a DataLoader's ``.dataset`` is used; ids are then row positions). loss: ``(model, batch) -> scalar``,
    the mean over the batch's examples. seed: the batch order.
    """
    dataset = dataset.dataset if isinstance(dataset, DataLoader) else dataset
    if len(dataset) == 0:
        raise DataError("cannot train on an empty dataset")
    ids = example_ids(dataset)
    gen = torch.Generator().manual_seed(int(seed))
    steps = int(epochs) * steps_per_epoch(len(dataset), batch_size)
    for cb in callbacks:
        cb.start(model, optimizer, steps)
    model.train()
    for _ in tqdm(range(epochs), desc="train", disable=not progress, leave=False):
        for idx, batch in _batches(dataset, gen, batch_size):
            optimizer.zero_grad()
            with contextlib.ExitStack() as stack:
                for cb in callbacks:
                    stack.enter_context(cb.batch(ids[idx.numpy()]))
                loss(model, batch).backward()
            optimizer.step()
            for cb in callbacks:
                cb.after_step()
    model.eval()
    for cb in callbacks:
        cb.end()
    return model


def train_classifier(model: nn.Module, dataset: Dataset | DataLoader, *, epochs: int = 30, lr: float = 0.05,
                     batch_size: int = 64, momentum: float = 0.9, seed: int = 0, callbacks: Sequence[Callback] = (),
                     progress: bool = False) -> nn.Module:
    """:func:`train` with SGD + momentum on ``model``'s trainable parameters and :func:`classification_loss`:
    the loop of :class:`~datacredit.evaluate.ClassifierRecipe`, the demo and LoRA fine-tuning."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DataError("the model has no trainable parameters to train")
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    return train(model, dataset, optimizer=opt, loss=classification_loss, epochs=epochs, batch_size=batch_size,
                 seed=seed, callbacks=callbacks, progress=progress)


class TrajectoryCallback:
    """Records ``n_checkpoints`` evenly spaced checkpoints (the last one = the final model) into ``out_dir``;
    ``keep_optimizer`` as in :class:`~datacredit.TrajectoryRecorder`. After the run, :attr:`recorder` holds them."""

    def __init__(self, out_dir: str, n_checkpoints: int = 10, keep_optimizer: str = "none"):
        self.out_dir, self.n_checkpoints, self.keep_optimizer = out_dir, n_checkpoints, keep_optimizer
        self.recorder: TrajectoryRecorder | None = None

    def start(self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
        k = min(self.n_checkpoints, steps)
        at = sorted({int(round(s)) for s in np.linspace(steps / k, steps, k)})
        self.recorder = TrajectoryRecorder(model, self.out_dir, optimizer=optimizer, at_steps=at, overwrite=True,
                                           keep_optimizer=self.keep_optimizer)

    def batch(self, ids: np.ndarray) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def after_step(self) -> None:
        self.recorder.step()

    def end(self) -> None:
        self.recorder.save()


class InRunCallback:
    """In-Run Data Shapley during the run (:class:`~datacredit.InRunShapley` on the loop's model and optimizer).

    targeted=True values every (training example, query) pair; ``options`` go to InRunShapley (e.g.
    ``keep_history=True``). After the run, :attr:`shapley` is the closed InRunShapley and :meth:`values` its values.
    """

    def __init__(self, task: Task, validation: object, order: int = 1, targeted: bool = True, **options: object):
        self.task, self.validation, self.order, self.targeted = task, validation, order, targeted
        self.options = options
        self.shapley = None

    def start(self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
        from .methods import InRunShapley  # methods sit above the loop; imported when a run records values

        self.shapley = InRunShapley(model, self.task, validation=self.validation, optimizer=optimizer,
                                    order=self.order, targeted=self.targeted, **self.options)

    def batch(self, ids: np.ndarray) -> contextlib.AbstractContextManager:
        return self.shapley.step(ids)

    def after_step(self) -> None:
        pass

    def end(self) -> None:
        self.shapley.close()

    def values(self) -> Scores:
        """``(n_train, n_query)`` (targeted) or ``(n_train, 1)``; positive = lowered the query's loss."""
        return self.shapley.values()
