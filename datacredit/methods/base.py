"""What every post-hoc method shares: data in, per-example gradients out, one batching loop written once.

A method is ``fit(train)`` (cache what depends only on training data) then ``score(queries) -> Scores`` and
``self_scores(train) -> Scores``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from tqdm.auto import tqdm

from ..capture import Capture, ExampleGrads, example_grads
from ..data.dataset import example_ids
from ..errors import DataError
from ..task import Task, batch_size

Data = Dataset | DataLoader


@dataclass(frozen=True)
class Batch:
    """One batch of examples: their ids ``(B,)``, the raw batch, and its rows in the dataset."""

    ids: np.ndarray
    data: Any
    rows: slice


def as_loader(data: Data, default_batch_size: int) -> tuple[DataLoader, np.ndarray]:
    """A sequential loader over ``data`` and the stable ids of its examples, ``(n,)`` int64.

    A user's DataLoader is accepted only if it is sequential (a shuffled loader would misalign scores and ids).
    """
    if isinstance(data, DataLoader):
        if not isinstance(data.sampler, SequentialSampler) or data.batch_size is None:
            raise DataError(
                "a DataLoader given to a method must be sequential (shuffle=False, no custom sampler, a batch_size);"
                " pass the dataset instead and set batch_size"
            )
        return data, example_ids(data.dataset)
    if not isinstance(data, Dataset):
        raise DataError(f"expected a torch Dataset or DataLoader, got {type(data).__name__}")
    ids = example_ids(data)
    return DataLoader(data, batch_size=default_batch_size, shuffle=False), ids


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(x, device) for x in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def batches(data: Data, batch_size_default: int, device: torch.device, desc: str | None = None,
            progress: bool = True) -> tuple[np.ndarray, Iterator[Batch]]:
    """Ids of all examples and an iterator over batches on ``device`` with their ids and rows."""
    loader, ids = as_loader(data, batch_size_default)

    def gen() -> Iterator[Batch]:
        start = 0
        for raw in tqdm(loader, desc=desc, disable=not progress, leave=False):
            n = batch_size(raw)
            yield Batch(ids[start : start + n], to_device(raw, device), slice(start, start + n))
            start += n
        if start != len(ids):
            raise DataError(f"the loader yielded {start} examples but the dataset has {len(ids)} ids")

    return ids, gen()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Attribution sees the deterministic model (dropout off); the model's own mode is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class GradientMethod:
    """Base of gradient-based post-hoc methods: owns the model, task, capture and batching.

    batch_size: examples per backward pass. device: defaults to the model's. progress: tqdm bars.
    """

    name = "gradient-method"

    def __init__(self, model: nn.Module, task: Task, *, batch_size: int = 64, progress: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model, self.task = model, task
        self.batch_size, self.progress = batch_size, progress
        self.device = next(model.parameters()).device
        self.modules = task.tracked_modules(model)
        Capture(model, self.modules)  # fail now, not in the middle of a pass, on an unsupported module

    def grads(self, data: Data, *, measurement: bool = False, desc: str | None = None
              ) -> tuple[np.ndarray, Iterator[tuple[Batch, ExampleGrads]]]:
        """Ids of ``data`` and an iterator of (batch, per-example gradients of the loss or the measurement)."""
        ids, it = batches(data, self.batch_size, self.device, desc or self.name, self.progress)
        fn = self.task.measurement if measurement else self.task.loss

        def gen() -> Iterator[tuple[Batch, ExampleGrads]]:
            with eval_mode(self.model), Capture(self.model, self.modules) as cap:
                for batch in it:
                    yield batch, example_grads(cap, fn(self.model, batch.data), batch.ids)

        return ids, gen()
