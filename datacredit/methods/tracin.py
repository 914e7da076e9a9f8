"""TracIn-CP (Pruthi, Liu, Kale, Sundararajan 2020, eq. 3): ``score(i, q) = Σ_k η_k ⟨∇ℓ_i(θ_k), ∇f_q(θ_k)⟩``.

The sum runs over the checkpoints ``θ_k`` of a :class:`~datacredit.trajectory.Trajectory`; ``ℓ_i`` is training
example i's loss and ``f_q`` the query's measurement (by default its loss), each per example (no ``1/B`` batch factor).
``η_k`` is the learning rate in force during the interval that ends at checkpoint k, as in the paper
(``weighting="lr"``). The number of steps in the interval does **not** multiply in by default; ``weighting="lr_sum"``
uses the learning rates of the interval's steps summed (``η_k · steps_k`` for a constant rate: the first-order
approximation of the whole interval's effect), ``"uniform"`` uses 1 for every checkpoint. Momentum is ignored, as in
the paper.

Sign: a positive score means gradient steps on i at the checkpoints lower ``f_q`` to first order, i.e. i helps q.

Two routes, as Grad-Dot:

* exact (``projection=None``): ghost / val-first dots (:meth:`ExampleGrads.gram`) per checkpoint; ``fit`` caches only
  the training ids; ``score`` computes the queries' gradients once per checkpoint, then streams the training set
  once per checkpoint.
* projected (``projection=k``): ``fit`` stores each checkpoint's ``(n_train, k)`` projected training gradients
  (resumable, in the store when one is given); ``score`` is one projected backward over the queries per checkpoint
  and a matrix product.

Checkpoints are loaded into a private copy of the model: the user's model is never modified. With a store, the
``(n_train, n_query)`` scores are written chunk by chunk into a memmap in the store (resumable) and returned mapped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..capture import Capture, ExampleGrads, example_grads, resolve_modules
from ..capture.projection import Projector
from ..errors import DataError, StoreError
from ..scores import Scores
from ..store import Store
from ..task import Task
from ..trajectory import Trajectory
from .base import Batch, Data, GradientMethod, as_loader, batches, eval_mode

WEIGHTINGS = ("lr", "lr_sum", "uniform")
SCORE_CHUNK_BYTES = 64 * 2**20  # one chunk of the output matrix
CACHE_CHUNK_ROWS = 2048  # rows of cached features per resumable chunk


@dataclass(frozen=True)
class TracInConfig:
    """projection: None (exact) or the projected dimension. projection_kind: ``"kronecker"`` (per layer),
    ``"gaussian"`` or ``"rademacher"``. weighting: ``"lr"`` (paper), ``"lr_sum"`` or ``"uniform"`` (module doc)."""

    projection: int | None = None
    projection_kind: str = "kronecker"
    seed: int = 0
    weighting: str = "lr"

    def __post_init__(self):
        if self.projection is not None and self.projection < 1:
            raise ValueError(f"projection must be None or a positive dimension, got {self.projection}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")


def checkpoint_weights(trajectory: Trajectory, weighting: str) -> np.ndarray:
    """``η_k`` of every checkpoint, ``(C,)`` float64, for a weighting in :data:`WEIGHTINGS`."""
    if weighting == "uniform":
        return np.ones(len(trajectory))
    field = "lr" if weighting == "lr" else "lr_sum"
    values = [getattr(c, field) for c in trajectory]
    missing = [c.step for c, v in zip(trajectory, values, strict=True) if v is None]
    if missing:
        raise DataError(f"checkpoints at steps {missing} have no recorded {field}; record the learning rate "
                        "(TrajectoryRecorder(optimizer=...) or lr=) or use weighting='uniform'")
    return np.asarray(values, dtype=np.float64)


# -- helpers shared with TRAK (candidates for methods/base.py) ---------------------------------------------------------
def storage_dtype(model: nn.Module) -> np.dtype:
    """float64 for a float64 model (exact tests), else float32: the dtype of cached features and stored scores."""
    return np.dtype(np.float64 if next(model.parameters()).dtype == torch.float64 else np.float32)


def tracked_shapes(model: nn.Module, modules: list[str] | None) -> dict[str, torch.Size]:
    """Shapes of the trainable parameters of the tracked modules, in ``named_parameters`` order."""
    owned = {id(p) for module, _ in resolve_modules(model, modules).values()
             for p in module.parameters(recurse=False) if p.requires_grad}
    return {name: p.shape for name, p in model.named_parameters() if id(p) in owned}


def ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def working_copy(model: nn.Module) -> nn.Module:
    """A private copy of ``model`` that checkpoints are loaded into (costs one more copy of the weights)."""
    return copy.deepcopy(model)


def as_trajectory(trajectory: Trajectory | str | os.PathLike[str]) -> Trajectory:
    return trajectory if isinstance(trajectory, Trajectory) else Trajectory.load(trajectory)


def open_cache(store: Store, name: str, shape: tuple[int, ...], dtype: np.dtype, n_chunks: int,
               meta: dict[str, Any]):
    """``store.chunked(...)`` that explains a stale cache instead of dumping both metadata dicts."""
    if store.has(name):
        have = store.info(name).get("meta")
        if have != json.loads(json.dumps(meta)):
            raise StoreError(f"{store.root}: cached {name!r} was computed for another model, data, batch size or "
                             "configuration; use a new store directory (or remove that artefact)")
    return store.chunked(name, shape, dtype, n_chunks, meta=meta)


def check_train_ids(store: Store, ids: np.ndarray) -> None:
    """Record the training ids in the store, or check they are the cached ones."""
    if not store.has("train_ids"):
        store.save_array("train_ids", ids)
    elif not np.array_equal(store.load_array("train_ids"), ids):
        raise DataError(f"{store.root}: the cached training features belong to other training ids; use a new store")


def iter_grads(method: GradientMethod, data: Data, *, measurement: bool, desc: str,
               skip: Callable[[int], bool] = lambda k: False
               ) -> tuple[np.ndarray, int, Iterator[tuple[int, Batch, ExampleGrads, torch.Tensor]]]:
    """Ids, number of batches and ``(k, batch, per-example gradients, per-example values (N,))`` of each batch whose
    index ``k`` is not skipped (skipped batches cost no forward or backward: what makes resuming cheap)."""
    loader, _ = as_loader(data, method.batch_size)
    n_batches = len(loader)
    ids, it = batches(data, method.batch_size, method.device, desc, method.progress)
    fn = method.task.measurement if measurement else method.task.loss

    def gen():
        with eval_mode(method.model), Capture(method.model, method.modules) as cap:
            for k, batch in enumerate(it):
                if skip(k):
                    continue
                values = fn(method.model, batch.data)
                yield k, batch, example_grads(cap, values, batch.ids), values.detach()

    return ids, n_batches, gen()


def cached_rows(method: GradientMethod, data: Data, *, measurement: bool, desc: str, store: Store | None,
                arrays: dict[str, tuple[int, np.dtype]], compute: Callable, meta: dict[str, Any]
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-example rows computed batch by batch: ``arrays`` maps a name to (width, dtype) and ``compute(batch, grads,
    values)`` returns ``{name: (B, width)}``. Returns the ids and the arrays ``(n, width)``.

    With a store every array is a chunked memmap; a chunk is the batches covering about :data:`CACHE_CHUNK_ROWS`
    rows (one flush and fsync per chunk, not per batch), and an interrupted run resumes at the first unfinished chunk.
    """
    loader, ids = as_loader(data, method.batch_size)
    if store is None:
        out = {name: np.zeros((len(ids), w), dtype=dt) for name, (w, dt) in arrays.items()}
        _, _, it = iter_grads(method, data, measurement=measurement, desc=desc)
        for _, batch, g, values in it:
            for name, rows in compute(batch, g, values).items():
                out[name][batch.rows] = rows
        return ids, out
    n_batches = len(loader)
    per_chunk = max(1, CACHE_CHUNK_ROWS // (loader.batch_size or 1))
    full_meta = {**meta, "n": len(ids), "batch_size": loader.batch_size, "chunk_batches": per_chunk,
                 "train_ids": ids_digest(ids)}
    chunked = {name: open_cache(store, name, (len(ids), w), dt, -(-n_batches // per_chunk), full_meta)
               for name, (w, dt) in arrays.items()}
    check_train_ids(store, ids)
    last = chunked[list(chunked)[-1]]  # marked done last: done there means done everywhere
    if not last.complete:
        _, _, it = iter_grads(method, data, measurement=measurement, desc=desc,
                              skip=lambda k: last.done(k // per_chunk))
        for k, batch, g, values in it:
            for name, rows in compute(batch, g, values).items():
                chunked[name].array[batch.rows] = rows
            if (k + 1) % per_chunk == 0 or k + 1 == n_batches:
                for array in chunked.values():
                    array.mark_done(k // per_chunk)
    return ids, {name: c.array for name, c in chunked.items()}


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
    n, nq = shape
    per_row = max(1, nq * 8)
    step = max(rows_multiple, (SCORE_CHUNK_BYTES // per_row) // rows_multiple * rows_multiple)
    starts = list(range(0, n, step))
    if store is None:
        out = np.empty(shape, dtype=np.float64)
        for s in starts:
            out[s : s + step] = block(slice(s, min(n, s + step)))
        return out
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    name = f"scores-{key}"
    chunked = store.chunked(name, shape, dtype, len(starts), meta=meta, overwrite=_stale(store, name, meta))
    for k, s in enumerate(starts):
        if not chunked.done(k):
            rows = slice(s, min(n, s + step))
            chunked.write(k, rows, block(rows).astype(dtype, copy=False))
    del chunked
    return store.load_array(name, mmap=True)


def _stale(store: Store, name: str, meta: dict[str, Any]) -> bool:
    return store.has(name) and store.info(name).get("meta") != json.loads(json.dumps(meta))


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


class TracIn(GradientMethod):
    """TracIn-CP over a trajectory. ``TracIn(model, task, trajectory).fit(train).score(queries) -> Scores``.

    model: the architecture (and device) the checkpoints are loaded into; a private copy is used.
    trajectory: a :class:`Trajectory` or the directory a :class:`TrajectoryRecorder` wrote.
    Cost: exact ``score`` = C backward passes over the queries and C over the training set (C = checkpoints);
    projected ``fit`` = C over the training set, ``score`` = C over the queries + C products
    ``(n_train × k) · (k × n_query)``. Stored: C · n_train · k floats (projected). Scores are float64 in memory; with
    a store, a memmap in the model's float dtype.
    """

    name = "tracin"

    def __init__(self, model: nn.Module, task: Task, trajectory: Trajectory | str | os.PathLike[str], *,
                 projection: int | None = None, projection_kind: str = "kronecker", seed: int = 0,
                 weighting: str = "lr", store: Store | str | None = None, batch_size: int = 64,
                 progress: bool = True):
        self.config = TracInConfig(projection, projection_kind, seed, weighting)
        super().__init__(working_copy(model), task, batch_size=batch_size, progress=progress)
        self.trajectory = as_trajectory(trajectory)
        self.weights = checkpoint_weights(self.trajectory, weighting)
        self.store = Store(store) if isinstance(store, (str, os.PathLike)) else store
        self.projector = None
        if projection is not None:
            shapes = tracked_shapes(self.model, self.modules)
            self.projector = Projector(shapes, projection, projection_kind, seed)
        self._train: Data | None = None
        self._digests: list[str] | None = None
        self.train_ids: np.ndarray | None = None
        self.train_features: list[np.ndarray] | None = None  # per checkpoint (n_train, k), projected route

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def _load(self, k: int) -> None:
        self.trajectory.load_into(self.model, k)

    def _digest(self, k: int) -> str:
        if self._digests is None:
            self._digests = [self.trajectory.digest(j) for j in range(len(self.trajectory))]
        return self._digests[k]

    def _meta(self) -> dict[str, Any]:
        """What the scores depend on (the cached features depend on less: see :meth:`fit`)."""
        return {"method": self.name, "config": asdict(self.config), "weights": self.weights.tolist(),
                "checkpoints": [self._digest(k) for k in range(len(self.trajectory))], "batch_size": self.batch_size}

    # -- fit -----------------------------------------------------------------------------------------------------
    def fit(self, train: Data) -> TracIn:
        """Cache what depends only on the training data (projected route: per-checkpoint features, resumable)."""
        self._train = train
        if self.projector is None:
            self.train_ids = as_loader(train, self.batch_size)[1]
            return self
        dtype, features = storage_dtype(self.model), []
        for k in range(len(self.trajectory)):
            self._load(k)
            meta = {"method": self.name, "projection": self.config.projection, "seed": self.config.seed,
                    "projection_kind": self.config.projection_kind, "checkpoint": self._digest(k)}
            ids, arrays = cached_rows(
                self, train, measurement=False, desc=f"{self.name} fit {k + 1}/{len(self.trajectory)}",
                store=self.store, arrays={f"tracin-features-{k:04d}": (self.projector.out_dim, dtype)},
                compute=lambda batch, g, values, k=k: {f"tracin-features-{k:04d}": self._project(g)}, meta=meta)
            features.append(arrays[f"tracin-features-{k:04d}"])
        self.train_ids, self.train_features = ids, features
        return self

    def _project(self, g: ExampleGrads) -> np.ndarray:
        return self.projector.project(g).detach().cpu().numpy()

    def _require_fit(self) -> None:
        if self.train_ids is None:
            raise RuntimeError(f"call {type(self).__name__}.fit(train) before scoring")

    # -- score ---------------------------------------------------------------------------------------------------
    def score(self, queries: Data) -> Scores:
        """Scores ``(n_train, n_query)``; positive = the training example helps the query (see module doc)."""
        self._require_fit()
        query_ids = as_loader(queries, self.batch_size)[1]
        n = len(self.train_ids)
        prepared: dict[str, Any] = {}

        def prepare() -> None:  # query side, once per checkpoint, only if some block is still to compute
            for k in range(len(self.trajectory)):
                self._load(k)
                _, it = self.grads(queries, measurement=True, desc=f"{self.name} queries {k + 1}")
                if self.projector is None:
                    prepared[k] = [(b.rows, g) for b, g in it]
                else:
                    prepared[k] = np.concatenate([to_np(self.projector.project(g)) for _, g in it])

        def block(rows: slice) -> np.ndarray:
            if not prepared:
                prepare()
            out = np.zeros((rows.stop - rows.start, len(query_ids)))
            for k, w in enumerate(self.weights):
                if self.projector is not None:
                    out += w * (np.asarray(self.train_features[k][rows], dtype=np.float64) @ prepared[k].T)
                    continue
                self._load(k)
                _, it = self.grads(row_subset(self._train, rows, n), desc=f"{self.name} score {k + 1}")
                for batch, g in it:
                    for q_rows, qg in prepared[k]:
                        out[batch.rows, q_rows] += w * to_np(g.gram(qg))
            return out

        meta = {**self._meta(), "train_ids": ids_digest(self.train_ids), "query_ids": ids_digest(query_ids)}
        values = fill_scores(self.store, (n, len(query_ids)), storage_dtype(self.model), self.batch_size, block, meta)
        return Scores(values, self.train_ids, query_ids, self.name, self._config())

    def self_scores(self, train: Data | None = None) -> Scores:
        """``Σ_k η_k ‖∇ℓ_i(θ_k)‖²`` (TracIn self-influence, used to find mislabelled examples), ``(n_train, 1)``."""
        if train is not None:
            self.fit(train)
        self._require_fit()
        values = np.zeros(len(self.train_ids))
        for k, w in enumerate(self.weights):
            if self.train_features is not None:
                values += w * (np.asarray(self.train_features[k], dtype=np.float64) ** 2).sum(1)
                continue
            self._load(k)
            _, it = self.grads(self._train, desc=f"{self.name} self {k + 1}")
            for batch, g in it:
                values[batch.rows] += w * to_np(g.sq_norms())
        return Scores(values[:, None], self.train_ids, np.array([-1]), f"{self.name}:self", self._config())

    def _config(self) -> dict[str, Any]:
        return {**asdict(self.config), "steps": self.trajectory.steps.tolist(), "weights": self.weights.tolist()}
