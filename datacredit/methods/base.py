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
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from tqdm.auto import tqdm

from ..capture import Capture, ExampleGrads, example_grads
from ..capture.pieces import CHUNK_ELEMENTS, Dense, Outer, Piece, val_first_dot
from ..data.dataset import example_ids
from ..errors import DataError
from ..task import Task, batch_size

Data = Dataset | DataLoader

# The val-first product (one ``(N·T × m)·(m × n)`` product per query, then an elementwise reduction over an ``N·T × n``
# temporary) runs several times slower per multiply-add than one GEMM with inner dimension ``m·n`` (measured 5× on a
# 784→64 layer, 256 examples × 500 queries, one thread): it is taken only when it needs this many times fewer
# multiply-adds than materializing the training gradients and multiplying.
VAL_FIRST_ADVANTAGE = 2


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


def val_first_cost(piece: Outer, n_query: int) -> int:
    """Multiply-adds of ``Σ_t u_tᵀ V_q v_t`` for every example and query: ``N·T·m·n·Q`` (``N·T·n·Q`` for an indexed,
    one-hot ``u``: a row gather instead of a product)."""
    rows = piece.n_examples * piece.length
    return rows * piece.n * n_query * (1 if piece.indexed else piece.m)


def gemm_cost(piece: Outer, n_query: int) -> int:
    """Multiply-adds of materializing each example's ``G_i`` (``N·T·m·n``) and one ``(N × mn)·(mn × Q)`` GEMM."""
    mn = piece.m * piece.n
    return piece.n_examples * piece.length * mn + piece.n_examples * n_query * mn


def piece_products(piece: Piece, weights: Tensor) -> Tensor:
    """``⟨g_i, W_q⟩`` for one piece and ``weights`` ``(Q, numel)`` (the parameter's row-major layout): ``(N, Q)``.

    Exact either way; the route is chosen by :func:`val_first_cost` vs :func:`gemm_cost`. The GEMM route materializes
    at most ``CHUNK_ELEMENTS`` gradient entries at a time (chunks of examples), so memory stays bounded for wide layers.
    """
    weights = weights.to(piece.v.dtype if isinstance(piece, Outer) else piece.g.dtype)
    if isinstance(piece, Dense):
        return piece.g @ weights.T
    n_query = weights.shape[0]
    if VAL_FIRST_ADVANTAGE * val_first_cost(piece, n_query) < gemm_cost(piece, n_query):
        return val_first_dot(piece, weights.reshape(n_query, piece.m, piece.n))
    step = max(1, CHUNK_ELEMENTS // max(piece.m * piece.n, 1))
    wt = weights.T
    return torch.cat([piece.select(slice(s, s + step)).materialize() @ wt for s in range(0, piece.n_examples, step)])


def products(grads: ExampleGrads, weights: dict[str, Tensor]) -> Tensor:
    """``⟨g_i, W_q⟩`` summed over the parameters in ``weights`` (``{name: (Q, *shape)}``), ``(N, Q)``.

    The same numbers as :meth:`ExampleGrads.dot` (its slow twin in the tests), each piece by the cheaper route of
    :func:`piece_products`. Cost per piece ``min(N·T·m·n·Q, N·T·m·n + N·Q·m·n)``: with the queries prepared once,
    scoring grows as (training set) + (training set × queries) GEMM work instead of a full query-side pass per
    training example and query. Tied parameters' pieces each contribute (their sum is the parameter's gradient).
    """
    out = None
    for name, ps in grads.pieces.items():
        if name not in weights:
            continue
        w, numel = weights[name], grads.shapes[name].numel()
        w = w.reshape(1, numel) if w.shape == grads.shapes[name] else w.reshape(-1, numel)
        for piece in ps:
            term = piece_products(piece, w)
            out = term if out is None else out + term
    if out is None:
        raise ValueError("weights share no parameter with these gradients")
    return out
