"""What every post-hoc method shares: data in, per-example gradients out, one batching loop written once.

A method is ``fit(train)`` (cache what depends only on training data) then ``score(queries) -> Scores``,
``topk(queries, k) -> TopK`` and ``self_scores() -> Scores`` (after ``fit``). Shared here:

* :meth:`GradientMethod.stream` — the one loop "batches → Capture → per-example gradients" (resumable by skipping);
* :func:`products` — training gradients against prepared query weights, val-first or materialize + GEMM by cost;
* :func:`fill_scores` / :func:`score_rows` — the ``(n_train, n_query)`` matrix in row blocks, in memory or as a
  resumable chunked memmap in a store; :class:`TopKAccumulator` — the same blocks merged into the k best per query;
* :func:`own_store` — the :class:`~datacredit.gradstore.GradientStore` behind a method's own projected route (the
  one resumable chunked writer of per-example features; its header holds model, data and configuration digests);
  what caches depend on is digested by :mod:`datacredit.digests` (re-exported here for the methods);
* :func:`feature_stores` / :func:`store_products` — the projected route of every method on a
  :class:`~datacredit.gradstore.GradientStore` built once (the ``features=`` keyword of each method).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler, Subset
from tqdm.auto import tqdm

from ..capture import Capture, ExampleGrads, example_grads
from ..capture.pieces import CHUNK_ELEMENTS, Dense, Outer, Piece, val_first_dot
from ..dataset import ArrayDataset, example_ids
from ..digests import config_digest
from ..digests import data_digest as data_digest  # re-exported: the methods (influence, source too) import it here
from ..digests import ids_digest as ids_digest
from ..digests import model_digest as model_digest
from ..errors import DataError
from ..gradstore import MAX_BLOCK_ROWS, DenseProjection, ExactFeatures, GradientStore, SquareKronProjection
from ..store import Store
from ..task import Task, batch_size, to_device
from ..trajectory import Trajectory

Data = Dataset | DataLoader
C = TypeVar("C")  # a method's frozen config dataclass

# The val-first product (one ``(N·T × m)·(m × n)`` product per query, then an elementwise reduction over an ``N·T × n``
# temporary) runs several times slower per multiply-add than one GEMM with inner dimension ``m·n`` (measured 5× on a
# 784→64 layer, 256 examples × 500 queries, one thread): it is taken only when it needs this many times fewer
# multiply-adds than materializing the training gradients and multiplying.
VAL_FIRST_ADVANTAGE = 2
SCORE_CHUNK_BYTES = 64 * 2**20  # one chunk of an output matrix in a store (resumable unit of score)
CACHE_CHUNK_ROWS = 2048  # rows of a method's own feature store per resumable chunk (rounded to whole batches)


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
    if _rows_at_once(data):
        # One indexing per batch instead of one __getitem__ per example and a stack (default_collate): the same
        # tensors in 0.4x the CPU time (5,000 x 784 floats, batches of 256: 6 ms a pass instead of 15).
        sampler = BatchSampler(SequentialSampler(data), default_batch_size, drop_last=False)
        return DataLoader(data, batch_size=None, sampler=sampler, collate_fn=list), ids
    return DataLoader(data, batch_size=default_batch_size, shuffle=False), ids


def _rows_at_once(data: Dataset) -> bool:
    """Whether ``data[list_of_positions]`` is the batch ``default_collate`` would build from the items: an
    :class:`ArrayDataset` whose ``__getitem__`` is not overridden (its tensors index by a list), or a ``Subset`` of
    one (``Subset`` maps list indices through)."""
    base = data.dataset if type(data) is Subset else data
    return isinstance(base, ArrayDataset) and type(base).__getitem__ is ArrayDataset.__getitem__


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


@dataclass(frozen=True)
class TopK:
    """The ``k`` strongest training examples per query, found without the ``(n_train, n_query)`` matrix.

    train_ids, values: ``(n_query, k)``, strongest first (most positive; most negative for ``largest=False``); ties
    keep training order, as :meth:`Scores.topk`. query_ids: ``(n_query,)``. Same sign convention as the scores.
    """

    train_ids: np.ndarray
    values: np.ndarray
    query_ids: np.ndarray
    method: str

    def query(self, j: int) -> list[tuple[int, float]]:
        """``(train_id, score)`` pairs of query column ``j``, strongest first (the form of :meth:`Scores.topk`)."""
        return [(int(i), float(v)) for i, v in zip(self.train_ids[j], self.values[j], strict=True)]


class TopKAccumulator:
    """Running top-k per query over blocks of training rows: memory ``O((k + block rows) × n_query)``.

    Blocks of one column range must arrive in increasing row order (then a stable sort keeps earlier rows first
    among equal values, matching :meth:`Scores.topk`).
    """

    def __init__(self, k: int, n_query: int, largest: bool = True):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.sign = k, 1.0 if largest else -1.0
        self.rows = np.full((0, n_query), -1, dtype=np.int64)  # (≤ k, n_query) candidate rows
        self.values = np.zeros((0, n_query))

    def add(self, rows: slice, cols: slice, values: np.ndarray) -> None:
        """Merge ``values`` ``(len(rows), len(cols))`` of training rows ``rows`` for query columns ``cols``."""
        n_cols = self.values.shape[1]
        start, stop, _ = cols.indices(n_cols)
        if self.rows.shape[0] < self.k:  # grow the candidate table with empty slots (-inf) first
            pad = self.k - self.rows.shape[0]
            self.rows = np.concatenate([self.rows, np.full((pad, n_cols), -1, dtype=np.int64)])
            self.values = np.concatenate([self.values, np.full((pad, n_cols), -np.inf * self.sign)])
        r = np.arange(rows.start, rows.stop)[:, None].repeat(stop - start, 1)
        cand_rows = np.concatenate([self.rows[:, start:stop], r])
        cand_vals = np.concatenate([self.values[:, start:stop], np.asarray(values, dtype=np.float64)])
        order = np.argsort(-self.sign * cand_vals, axis=0, kind="stable")[: self.k]
        self.rows[:, start:stop] = np.take_along_axis(cand_rows, order, 0)
        self.values[:, start:stop] = np.take_along_axis(cand_vals, order, 0)

    def result(self, train_ids: np.ndarray, query_ids: np.ndarray, method: str) -> TopK:
        k = min(self.k, len(train_ids))
        rows, values = self.rows[:k].T, self.values[:k].T
        return TopK(np.asarray(train_ids)[rows], values.copy(), np.asarray(query_ids), method)


def score_rows(n: int, n_query: int, rows_multiple: int) -> list[slice]:
    """The row blocks :func:`fill_scores` (and top-k) use: about ``SCORE_CHUNK_BYTES`` of float64 each, a multiple of
    ``rows_multiple`` (the batch size) rows."""
    step = max(rows_multiple, (SCORE_CHUNK_BYTES // max(1, n_query * 8)) // rows_multiple * rows_multiple)
    return [slice(s, min(n, s + step)) for s in range(0, n, step)]


def configure(config_class: type[C], config: C | None, settings: dict[str, Any]) -> C:
    """A method's one frozen config: ``config`` as given, or ``config_class(**settings)`` from the keyword form (the
    same object results: ``GradDot(m, t, normalize=True).config == GradDotConfig(normalize=True)``). Raises TypeError
    naming the keywords when both are given, or when a keyword is not a field of the config."""
    names = [f.name for f in fields(config_class)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}: {config_class.__name__} holds {names}")
    if config is None:
        return config_class(**settings)
    if not isinstance(config, config_class):
        raise TypeError(f"config must be a {config_class.__name__}, got {type(config).__name__}")
    if settings:
        raise TypeError(f"give config= or the keyword(s) {sorted(settings)}, not both (config holds them)")
    return config


def nbytes(*objs: Any) -> int:
    """Bytes of the distinct numpy arrays (memmaps included) and torch tensors among ``objs`` and inside their lists,
    tuples and dict values; anything else (None, numbers, other objects) counts 0. How a method adds up its cache."""
    seen: set[int] = set()

    def count(obj: Any) -> int:
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            return int(obj.nbytes)
        if isinstance(obj, torch.Tensor):
            return int(obj.numel() * obj.element_size())
        if isinstance(obj, dict):
            return sum(count(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(count(v) for v in obj)
        return 0

    return sum(count(obj) for obj in objs)


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

    def cache_bytes(self) -> int:
        """Bytes of what ``fit`` keeps for scoring: the training ids here, plus each method's own cache (projected
        features, curvature, kernels; exact Grad-Dot keeps nothing else). 0 before ``fit``. Not counted: the model,
        the data, projection matrices (regenerated from their seed) and files a ``features=`` store holds. Ensembles
        report the sum over their members as stored bytes."""
        return nbytes(getattr(self, "train_ids", None))

    def stream(self, data: Data, *, measurement: bool = False, losses: Callable[[Batch], Tensor] | None = None,
               skip: Callable[[int], bool] | None = None, desc: str | None = None
               ) -> Iterator[tuple[int, Batch, ExampleGrads, Tensor]]:
        """The one batch loop of every post-hoc method: ``(k, batch, per-example gradients, per-example values (N,))``
        for each batch ``k`` of ``data`` not skipped (a skipped batch costs no forward or backward: what makes
        resuming cheap). The values are the measurement's, the training loss's, or ``losses(batch)``'s (e.g. a loss
        at sampled labels). The model is in eval mode throughout; recording is switched off while the consumer works
        on a batch, so model calls it makes then (Hessian-vector products, checkpoint loads) never leak into the
        capture."""
        _, it = batches(data, self.batch_size, self.device, desc or self.name, self.progress)
        fn = self.task.measurement if measurement else self.task.loss
        with eval_mode(self.model), Capture(self.model, self.modules) as cap:
            for k, batch in enumerate(it):
                if skip is not None and skip(k):
                    continue
                cap.enabled = True
                values = losses(batch) if losses is not None else fn(self.model, batch.data)
                grads = example_grads(cap, values, batch.ids)
                cap.enabled = False
                yield k, batch, grads, values.detach()

    def grads(self, data: Data, *, measurement: bool = False, desc: str | None = None
              ) -> tuple[np.ndarray, Iterator[tuple[Batch, ExampleGrads]]]:
        """Ids of ``data`` and an iterator of (batch, per-example gradients of the loss or the measurement)."""
        ids = as_loader(data, self.batch_size)[1]
        return ids, ((b, g) for _, b, g, _ in self.stream(data, measurement=measurement, desc=desc))

    def _blocks(self, queries: Data) -> tuple[np.ndarray, Callable[[slice], np.ndarray], dict[str, Any] | None]:
        """Query ids and ``block(rows) -> (len(rows), n_query)`` scores (and the stored scores' metadata)."""
        raise NotImplementedError(f"{type(self).__name__} has no block-wise scoring")

    def _fill(self, queries: Data) -> tuple[np.ndarray, np.ndarray]:
        """``(values (n_train, n_query), query_ids)`` from :meth:`_blocks`, row block by row block: in memory, or into
        the method's store (``self.store``) as resumable chunked scores."""
        query_ids, block, meta = self._blocks(queries)
        shape = (len(self.train_ids), len(query_ids))
        values = fill_scores(getattr(self, "store", None), shape, storage_dtype(self.model), self.batch_size, block,
                             meta)
        return values, query_ids

    def topk(self, queries: Data, k: int, *, largest: bool = True) -> TopK:
        """The ``k`` training examples with the largest (``largest=False``: smallest) scores for each query, computed
        block by block (:func:`score_rows`): never more than one block of ``(rows, n_query)`` scores plus the
        ``(k, n_query)`` candidates in memory, and nothing written to the store. Same numbers as
        ``score(queries).topk(k, j)``; cost the same as :meth:`score` without a store."""
        query_ids, block, _ = self._blocks(queries)
        acc = TopKAccumulator(k, len(query_ids), largest)
        for rows in score_rows(len(self.train_ids), len(query_ids), self.batch_size):
            acc.add(rows, slice(None), block(rows))
        return acc.result(self.train_ids, query_ids, getattr(self, "_method", self.name))


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
    if piece.n_examples <= step:
        return piece.materialize() @ wt
    if piece.indexed:
        chunks = range(0, piece.n_examples, step)
        return torch.cat([piece.select(slice(s, s + step)).materialize() @ wt for s in chunks])
    # one buffer for every chunk: a fresh multi-MB tensor per chunk can land in freshly mapped pages each time (the
    # allocator returns large blocks to the system), which measured 5x the page faults and 2-3x the time of a score
    # call in some processes (benchmarks/SCALING.md)
    buf = torch.empty(step, piece.m * piece.n, dtype=piece.v.dtype, device=piece.v.device)
    out = torch.empty(piece.n_examples, n_query, dtype=piece.v.dtype, device=piece.v.device)
    for s in range(0, piece.n_examples, step):
        chunk = piece.select(slice(s, s + step))
        torch.matmul(chunk.materialize(buf[: chunk.n_examples]), wt, out=out[s: s + chunk.n_examples])
    return out


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


# -- caches, digests and chunked scores shared by every method --------------------------------------------------------
def storage_dtype(model: nn.Module) -> np.dtype:
    """float64 for a float64 model (exact tests), else float32: the dtype of cached features and stored scores."""
    return np.dtype(np.float64 if next(model.parameters()).dtype == torch.float64 else np.float32)


def working_copy(model: nn.Module) -> nn.Module:
    """A private copy of ``model`` that checkpoints are loaded into (costs one more copy of the weights)."""
    return copy.deepcopy(model)


def as_trajectory(trajectory: Trajectory | str | os.PathLike[str]) -> Trajectory:
    return trajectory if isinstance(trajectory, Trajectory) else Trajectory.load(trajectory)


def row_subset(data: Data, rows: slice, n: int) -> Data:
    """The examples at positions ``rows`` of ``data`` (same batching and collation)."""
    if rows.start == 0 and rows.stop >= n:
        return data
    index = range(rows.start, min(rows.stop, n))
    if isinstance(data, DataLoader):
        return DataLoader(Subset(data.dataset, index), batch_size=data.batch_size, collate_fn=data.collate_fn)
    return Subset(data, index)


def fill_scores(store: Store | None, shape: tuple[int, int], dtype: np.dtype, rows_multiple: int,
                block: Callable[[slice], np.ndarray], meta: dict[str, Any]) -> np.ndarray:
    """The ``(n_train, n_query)`` matrix, ``block(rows) -> (len(rows), n_query)`` at a time.

    Without a store it is built in memory (float64). With one it goes to a chunked memmap named after ``meta``
    (same meta, same file: a finished one is reused, an interrupted one resumes) and is returned mapped read-only.
    """
    blocks = score_rows(*shape, rows_multiple)
    if store is None:
        out = np.empty(shape, dtype=np.float64)
        for rows in blocks:
            out[rows] = block(rows)
        return out
    key = config_digest(json.loads(json.dumps(meta)))[:16]
    name = f"scores-{key}"
    chunked = store.chunked(name, shape, dtype, len(blocks), meta=meta, overwrite=_stale(store, name, meta))
    for k, rows in enumerate(blocks):
        if not chunked.done(k):
            chunked.write(k, rows, block(rows).astype(dtype, copy=False))
    del chunked
    return store.load_array(name, mmap=True)


def _stale(store: Store, name: str, meta: dict[str, Any]) -> bool:
    return store.has(name) and store.info(name).get("meta") != json.loads(json.dumps(meta))


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


# -- the projected route on a gradient store (``features=``) ----------------------------------------------------------
def feature_stores(features: GradientStore | list[GradientStore] | tuple[GradientStore, ...], *, many: bool = False
                   ) -> list[GradientStore]:
    """``features`` as a list of :class:`~datacredit.gradstore.GradientStore` (one, or one per checkpoint / member
    where ``many``); anything else (a path, a :class:`~datacredit.store.Store`) is refused with what to pass."""
    stores = list(features) if many and isinstance(features, (list, tuple)) else [features]
    for s in stores:
        if not isinstance(s, GradientStore):
            raise TypeError(f"features= takes a GradientStore{' or a list of them' if many else ''}, got "
                            f"{type(s).__name__}; open one with GradientStore(path, model, task, projection=...)")
    if not stores:
        raise ValueError("features= got an empty list of gradient stores")
    return stores


def store_products(terms: list[tuple[GradientStore, Tensor, float | np.ndarray]], rows: slice) -> np.ndarray:
    """``Σ_s (Φ_s[rows] @ W_s) · c_s`` as float64 ``(len(rows), Q)``: for each term a store ``Φ_s`` ``(n_train, D_s)``,
    prepared query weights ``W_s`` ``(D_s, Q)`` (query features after the method's query-side transform; the product
    is taken in ``W_s``'s dtype) and a scale ``c_s`` (a number, or ``(n_train,)`` per training row).

    Rows are read in blocks of at most ``MAX_BLOCK_ROWS`` (``pread``, no memory map), so memory is one block of rows
    and its scores beside the output. Cost ``len(rows) · Σ_s D_s · Q`` multiply-adds and one read of those rows.
    """
    out = np.zeros((rows.stop - rows.start, terms[0][1].shape[1]))
    for start in range(rows.start, rows.stop, MAX_BLOCK_ROWS):
        stop = min(rows.stop, start + MAX_BLOCK_ROWS)
        part = out[start - rows.start : stop - rows.start]
        for store, weights, scale in terms:
            block = (store.read_rows(start, stop).to(weights.dtype) @ weights).double().cpu().numpy()
            part += block * (scale[start:stop, None] if isinstance(scale, np.ndarray) else scale)
    return out


def store_self_products(terms: list[tuple[GradientStore, Callable[[Tensor], Tensor], float | np.ndarray]]
                        ) -> np.ndarray:
    """``Σ_s ⟨φ_i, M_s φ_i⟩ · c_s`` per training row, float64 ``(n_train,)``: ``M_s`` is given as a callable on a
    block of rows ``(r, D_s) -> (r, D_s)`` (the identity: ``lambda x: x``). One read of each store."""
    n = len(terms[0][0].train_ids())
    out = np.zeros(n)
    for start in range(0, n, MAX_BLOCK_ROWS):
        stop = min(n, start + MAX_BLOCK_ROWS)
        for store, transform, scale in terms:
            f = store.read_rows(start, stop).double().cpu()
            vals = (transform(f) * f).sum(1).cpu().numpy()
            out[start:stop] += vals * (scale[start:stop] if isinstance(scale, np.ndarray) else scale)
    return out


def store_meta(stores: list[GradientStore]) -> list[dict[str, Any]]:
    """What scores computed on ``stores`` depend on: each store's root, model digest, data and configuration."""
    out = []
    for s in stores:
        header = s.header() or {}
        out.append({"root": str(s.root), "model": header.get("model"), "data": header.get("data"),
                    "config": header.get("config")})
    return out


# -- a method's own projected route: its features on a GradientStore ---------------------------------------------------
Featurizer = DenseProjection | SquareKronProjection | ExactFeatures


def projection_featurizer(dim: int | None, kind: str, seed: int) -> Featurizer:
    """The store featurizer with the numbers of ``Projector(shapes, dim, kind, seed)`` (the methods' projection):
    ``"gaussian"``/``"rademacher"`` → :class:`DenseProjection` (so such a store is shared with users' dense stores),
    ``"kronecker"`` → :class:`SquareKronProjection`; ``dim=None`` → :class:`ExactFeatures` (the flat gradient)."""
    if dim is None:
        return ExactFeatures()
    return SquareKronProjection(dim, seed) if kind == "kronecker" else DenseProjection(dim, kind, seed)


def own_store(method: GradientMethod, featurizer: Featurizer, *, suffix: str = "", train_target: str = "loss",
              on_mismatch: str = "raise") -> GradientStore:
    """The :class:`~datacredit.gradstore.GradientStore` holding ``method``'s own projected training features, on
    ``method.model`` (whatever state it holds when built or read: the store's header refuses another one).

    Where: ``method.store.root / "features-<target>-<key><suffix>"``, the key a digest of the projection, storage
    dtype and tracked modules, so every method (and query round, and process) asking for the same features of the
    same store directory finds them; without a store, a private temporary directory removed with the method. A
    store built for another model, data or task is refitted (``on_mismatch="refit"``) or refused by name
    (``"raise"``). Storage: float64 for a float64 model, else float32; chunks of whole batches, about
    :data:`CACHE_CHUNK_ROWS` rows (a killed build resumes at the first unfinished chunk)."""
    dtype = "float64" if storage_dtype(method.model) == np.float64 else "float32"
    key = config_digest({"projection": featurizer.describe(), "dtype": dtype, "modules": method.modules,
                         "train_target": train_target})[:12]
    store = getattr(method, "store", None)
    root = store.root if store is not None else _scratch(method)
    rows = max(1, CACHE_CHUNK_ROWS // method.batch_size) * method.batch_size
    return GradientStore(root / f"features-{train_target}-{key}{suffix}", method.model, method.task,
                         projection=featurizer, dtype=dtype, batch_size=method.batch_size, chunk_size=rows,
                         on_mismatch=on_mismatch, train_target=train_target)


def _scratch(method: GradientMethod) -> Path:
    """A private temporary directory for ``method``'s feature stores, removed when the method is collected."""
    path = getattr(method, "_scratch_dir", None)
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="datacredit-features-"))
        weakref.finalize(method, shutil.rmtree, str(path), True)
        method._scratch_dir = path
    return path
