"""A gradient store on disk: per-example training features computed once, scored against any number of queries.

``GradientStore(path, model, task, projection=KronProjection(k=16), dtype="float16").build(train)`` featurizes every
training example once (one backward pass per batch, through :class:`~datacredit.capture.Capture`) and streams the
features chunk by chunk into one memory-mapped array; ``score(queries)`` and ``topk(queries, k)`` featurize the queries
the same way and multiply them against the store in row blocks sized by a memory budget.

Features (``(n_train, D)``), by ``projection``:

* :class:`~datacredit.capture.kronecker.KronProjection` — per layer ``P_uᵀ G_i P_v`` (LoGra style), never forming
  ``d_out × d_in`` per example; ``D = Σ_layers k_u·k_v``.
* :class:`DenseProjection` — one dense seeded Gaussian/Rademacher ``(k, numel)`` map (the existing
  :class:`~datacredit.capture.projection.Projector`); needs each parameter's gradient materialized in turn.
* :class:`SquareKronProjection` — the methods' own per-parameter Kronecker projection (``projection_kind=
  "kronecker"`` of Grad-Dot, TracIn, TRAK): their projected routes are stores of it or of :class:`DenseProjection`.
* :class:`ExactFeatures` — the flat per-example gradient itself (tiny models and tests only: ``D = numel``).

Score (Grad-Dot of the features): ``score[i, j] = ⟨φ(∇ℓ_i), M φ(∇f_j)⟩`` with ``M = I`` unless a ``preconditioner`` is
given (a callable on the query features or per-layer matrices, see :meth:`GradientStore.score`). Sign convention
(DESIGN.md): ``score > 0`` means a gradient step on training example ``i`` lowers query ``j``'s measurement (its loss
by default) to first order, i.e. ``i`` helps ``j``.

Storage format (a :class:`~datacredit.store.Store` directory):

* ``features.npy`` — ``(n_train, D)`` ``.npy`` memmap, filled by ``Store.chunked`` in chunks of ``chunk_size`` rows
  (done flags in ``features.npy.done``; a killed build resumes from the finished chunks). dtype ``float32``,
  ``float64``, ``float16``, or ``bfloat16`` stored as its raw bits in ``uint16`` (numpy has no bfloat16 without
  ``ml_dtypes``; the header says how to decode).
* ``train_ids.npy`` — ``(n_train,)`` int64 ids, row order of ``features``.
* ``scores.npy`` — only when a ``score`` result exceeds the memory budget: ``(n_train, n_query)`` chunked array,
  replaced by the next such call.
* the manifest records the store's kind, ``"gradstore"``: a directory holding another kind is refused.
* the header, in ``features``' manifest entry ``meta`` (so data and header are committed together): format version,
  dtype and storage dtype, projection (kind, seed, widths), the layout (one block per parameter: name, shape, projected
  rows × cols, column offset), the tracked modules, the task (class and a digest of its attributes), the model
  (class and sha256 of its full ``state_dict``), the data (n, sha256 of the ids and of every tensor), ``chunk_size``.

Any difference between the stored header and the current model, data or configuration makes :meth:`build` refuse
(``on_mismatch="raise"``, the default, naming what differs) or start afresh (``"refit"``); scoring refuses a store built
for another model or configuration, or whose ids do not match the header. Batch size and chunk size change no
feature: an existing store is reused or resumed with its own chunking. The store checks the features' sha256 each
time they are opened for scoring (one streaming read, about 0.6 s per GB). Nothing is pickled.

Cost: ``build`` = one forward + backward per training batch plus the projection (Kronecker: ``N·T·(m·k_u + n·k_v +
k_u·k_v)`` per layer), written once; disk ``n_train · D · itemsize`` bytes. ``score``/``topk`` = one backward per query
batch, then ``n_train · D · Q`` multiply-adds, reading the store once in row blocks. Peak memory is bounded by
``memory_gb`` plus the model's own backward: rows are read and written with ``pread``/``pwrite`` into reused buffers,
not through the memory map, so the resident set does not grow with ``n_train`` (pages touched through a memory map
count in the resident set until the kernel reclaims them).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset

from .capture import Capture, ExampleGrads, example_grads, resolve_modules
from .capture.kronecker import Block, KronProjection
from .capture.projection import Projector
from .dataset import example_ids
from .digests import config_digest, data_digest, ids_digest, model_digest
from .errors import DataError, StoreError
from .lock import BuildLock
from .scores import Scores
from .store import Store
from .task import Task, to_device

__all__ = ["DenseProjection", "ExactFeatures", "GradientStore", "SquareKronProjection", "TopK"]

FORMAT = "datacredit.gradstore"
KIND = "gradstore"
VERSION = 1
FEATURES = "features"
IDS = "train_ids"
SCORES = "scores"
# Rows per scoring block at most: peak memory then stops growing with n_train (a 10,000-row block raised top-k's peak
# RSS by 200 MB at D = 4096, Q = 1000), and the GEMM is hardly slower (measured, 1 thread, D = 4096, Q = 1000: 0.063
# CPU s per 1,000 rows in blocks of 2,048 vs 0.055 in blocks of 8,192, 0.061 in blocks of 512).
MAX_BLOCK_ROWS = 2048
DTYPES = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "bfloat16": "<u2"}
TRAIN_TARGETS = ("loss", "measurement")

Data = Dataset | DataLoader
Preconditioner = Callable[[Tensor], Tensor] | dict[str, Tensor]


# -- featurizers ---------------------------------------------------------------------------------------------------
class ExactFeatures:
    """The flat per-example gradient (``D = numel`` of the tracked parameters): exact Grad-Dot, tiny models only."""

    kind = "exact"

    def describe(self) -> dict:
        return {"kind": self.kind}

    def layout(self, shapes: dict[str, torch.Size]) -> list[Block]:
        blocks, offset = [], 0
        for name, shape in shapes.items():
            numel = int(torch.Size(shape).numel())
            m = int(shape[0]) if len(shape) else 1
            blocks.append(Block(name, tuple(int(s) for s in shape), m, numel // max(m, 1), numel, 1, offset, True))
            offset += numel
        return blocks

    def project(self, grads: ExampleGrads, shapes: dict[str, torch.Size]) -> Tensor:
        out = []
        for block in self.layout(shapes):
            ps = grads.pieces.get(block.name)
            out.append(sum(p.materialize() for p in ps) if ps else
                       torch.zeros(grads.n, block.size, dtype=grads.flat_dtype))
        device = out[0].device if out else None
        return torch.cat([o.to(device) for o in out], dim=1)


class DenseProjection:
    """One dense seeded ``(dim, numel)`` Gaussian/Rademacher projection of the concatenated gradient (``D = dim``).

    Wraps :class:`~datacredit.capture.projection.Projector` (entries ``N(0, 1/dim)`` or ``±1/√dim``, generated per
    parameter in column chunks from their own seeds). Cost ``O(N·numel·dim)``; each parameter's per-example gradient is
    materialized in turn.
    """

    def __init__(self, dim: int = 1024, kind: str = "gaussian", seed: int = 0):
        if kind not in ("gaussian", "rademacher"):
            raise ValueError(f"DenseProjection kind must be 'gaussian' or 'rademacher', got {kind!r}")
        self.dim, self.kind, self.seed = int(dim), kind, int(seed)
        self._projector: Projector | None = None

    def describe(self) -> dict:
        return {"kind": "dense", "distribution": self.kind, "dim": self.dim, "seed": self.seed}

    def layout(self, shapes: dict[str, torch.Size]) -> list[Block]:
        numel = sum(int(torch.Size(s).numel()) for s in shapes.values())
        return [Block("*", (numel,), numel, 1, self.dim, 1, 0, False)]

    def project(self, grads: ExampleGrads, shapes: dict[str, torch.Size]) -> Tensor:
        if self._projector is None or self._projector.shapes != dict(shapes):
            self._projector = Projector(dict(shapes), self.dim, self.kind, self.seed)
        return self._projector.project(grads)


class SquareKronProjection:
    """The methods' per-parameter Kronecker projection (:class:`~datacredit.capture.projection.Projector` kind
    ``"kronecker"``, what ``projection_kind="kronecker"`` of Grad-Dot and TracIn uses): a parameter with at most
    ``dim`` entries is kept exactly, any other viewed as ``(m, n)`` becomes ``P_u G P_vᵀ`` of ``min(m, r) × min(n, r)``
    with ``r = ⌈√dim⌉``. Other seeds and shapes than :class:`KronProjection`; the same numbers as the methods' own
    projection, so a store of it reproduces their scores. Cost as :class:`KronProjection`."""

    def __init__(self, dim: int = 1024, seed: int = 0):
        if dim < 1:
            raise ValueError(f"SquareKronProjection dim must be positive, got {dim}")
        self.dim, self.seed = int(dim), int(seed)
        self._projector: Projector | None = None

    def describe(self) -> dict:
        return {"kind": "square-kronecker", "dim": self.dim, "seed": self.seed}

    def _for(self, shapes: dict[str, torch.Size]) -> Projector:
        if self._projector is None or self._projector.shapes != dict(shapes):
            self._projector = Projector(dict(shapes), self.dim, "kronecker", self.seed)
        return self._projector

    def layout(self, shapes: dict[str, torch.Size]) -> list[Block]:
        blocks, offset = [], 0
        for name, (rows, cols) in self._for(shapes).out_dims.items():
            shape = tuple(int(s) for s in shapes[name])
            numel = int(torch.Size(shape).numel())
            m = shape[0] if shape else 1
            exact = cols == 1 and rows == numel
            blocks.append(Block(name, shape, m, numel // max(m, 1), rows, cols, offset, exact))
            offset += rows * cols
        return blocks

    def project(self, grads: ExampleGrads, shapes: dict[str, torch.Size]) -> Tensor:
        return self._for(shapes).project(grads)


Featurizer = KronProjection | DenseProjection | SquareKronProjection | ExactFeatures


def _layout(featurizer: Featurizer, shapes: dict[str, torch.Size]) -> list[Block]:
    return featurizer.layout(shapes)


def _project(featurizer: Featurizer, grads: ExampleGrads, shapes: dict[str, torch.Size]) -> Tensor:
    return featurizer.project(grads, shapes)


# -- digests (datacredit.digests) -------------------------------------------------------------------------------
def _data_header(dataset: Dataset, ids: np.ndarray) -> dict[str, Any]:
    """``{"n", "ids_sha256", "data_sha256"}`` of a map-style dataset (:func:`~datacredit.digests.data_digest`: an
    array dataset is hashed directly, about 1 s per GB; any other is read once, item by item)."""
    return {"n": len(ids), "ids_sha256": ids_digest(ids), "data_sha256": data_digest(dataset)}


def _task_description(task: Task) -> dict[str, Any]:
    """The task's class and a digest of its attributes (tensors hashed by value), so another loss never matches."""
    return {"class": f"{type(task).__module__}.{type(task).__qualname__}",
            "attributes_sha256": config_digest(dict(vars(task)))}


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _diff(stored: Any, current: Any, path: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(stored) | set(current)):
            out += _diff(stored.get(key), current.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if stored == current else [f"{path}: stored {_short(stored)}, now {_short(current)}"]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- data ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    dataset: Dataset
    batch_size: int
    collate_fn: Callable | None
    num_workers: int

    def loader(self, start: int, stop: int) -> DataLoader:
        """A sequential loader over rows ``[start, stop)``: a finished chunk is skipped without loading it."""
        subset = self.dataset if (start, stop) == (0, len(self.dataset)) else Subset(self.dataset, range(start, stop))
        kwargs = {} if self.collate_fn is None else {"collate_fn": self.collate_fn}
        return DataLoader(subset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, **kwargs)


def _source(data: Data, batch_size: int) -> _Source:
    if isinstance(data, DataLoader):
        if not isinstance(data.sampler, SequentialSampler) or data.batch_size is None:
            raise DataError("a DataLoader given to GradientStore must be sequential (shuffle=False, no custom "
                            "sampler, a batch_size); pass the dataset instead")
        return _Source(data.dataset, data.batch_size, data.collate_fn, data.num_workers)
    if not isinstance(data, Dataset):
        raise DataError(f"expected a torch Dataset or DataLoader, got {type(data).__name__}")
    return _Source(data, batch_size, None, 0)



@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Features of the deterministic model (dropout off); the model's mode is restored on exit."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


# -- raw row I/O ---------------------------------------------------------------------------------------------------
class _Rows:
    """``pread``/``pwrite`` of whole rows of a store's ``.npy`` array file, bypassing the mapping (module doc).

    store, name: the artefact; its file is looked up in the manifest (a chunked array is created under a temporary
    name and renamed, so the memmap's own ``filename`` may be stale). array: its memmap (data offset, shape, dtype).
    """

    def __init__(self, store: Store, name: str, array: np.memmap, writable: bool = False):
        self.path, self.offset = store.root / store.info(name)["file"], int(array.offset)
        self.dtype, self.width = array.dtype, int(np.prod(array.shape[1:], dtype=np.int64))
        self.row_bytes = self.width * self.dtype.itemsize
        self.fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def write(self, start: int, values: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(values, dtype=self.dtype)).cast("B")
        pos, done = self.offset + start * self.row_bytes, 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], pos + done)

    def read(self, start: int, stop: int, buf: np.ndarray) -> np.ndarray:
        """Rows ``[start, stop)`` into the front of ``buf`` (a reused ``(rows, width)`` buffer); returns that view."""
        out = buf[: stop - start]
        view = memoryview(out.reshape(-1).view(np.uint8))
        pos, done = self.offset + start * self.row_bytes, 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], pos + done)
            if got == 0:
                raise StoreError(f"{self.path}: file ends before row {stop}")
            done += got
        return out

    def sync(self) -> None:
        os.fsync(self.fd)


def _encode(features: Tensor, dtype: str) -> np.ndarray:
    """Features ``(N, D)`` in the storage dtype (bfloat16 as its raw uint16 bits)."""
    if dtype == "bfloat16":
        return features.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return features.detach().to(getattr(torch, dtype)).cpu().numpy()


def _decode(raw: np.ndarray, dtype: str, compute: torch.dtype) -> Tensor:
    t = torch.from_numpy(raw)
    if dtype == "bfloat16":
        t = t.view(torch.int16).view(torch.bfloat16)
    return t.to(compute)


@dataclass(frozen=True)
class TopK:
    """The ``k`` best training examples per query, best first: ``train_ids``/``scores`` ``(n_query, k)``.

    Ties keep training order (as :meth:`Scores.topk`). Same sign convention as :class:`~datacredit.scores.Scores`.
    """

    query_ids: np.ndarray
    train_ids: np.ndarray
    scores: np.ndarray

    def for_query(self, j: int) -> list[tuple[int, float]]:
        """``[(train_id, score), ...]`` of query column ``j``, as ``Scores.topk(k, j)`` returns them."""
        return [(int(i), float(s)) for i, s in zip(self.train_ids[j], self.scores[j])]


# -- the store -----------------------------------------------------------------------------------------------------
class GradientStore:
    """Per-example training features on disk, built once and scored against many query rounds (module docstring).

    Args:
        path: the store directory (created if missing).
        model, task: what is attributed; the training loss is ``task.loss``, the query side ``task.measurement``.
        projection: :class:`KronProjection` (default ``KronProjection(k=16)``), :class:`DenseProjection`,
            or :class:`ExactFeatures` (exact flat gradients, tiny models; see :meth:`exact`).
        dtype: storage dtype, ``"float32"`` (default), ``"float16"``, ``"bfloat16"`` or ``"float64"``. Queries are
            featurized and products taken in float32 (float64 when stored in float64).
        batch_size: examples per backward pass (does not change the features: a store is reused or resumed with any
            batch size). chunk_size: rows per resumable chunk of a new store; an existing store keeps its own.
        on_mismatch: ``"raise"`` (default): :meth:`build` on a store built for another model, data or configuration
            raises :class:`StoreError` naming the differences; ``"refit"``: it starts afresh.
        lock_wait: a second process building the same store waits (True) or fails at once (False, default).
        train_target: what the training rows are gradients of: ``"loss"`` (default, ``task.loss``: Grad-Dot, TracIn,
            influence) or ``"measurement"`` (``task.measurement`` of the training examples: TRAK's margin features).

    The post-hoc methods score on a built store through one keyword, ``features=``: ``GradDot``, ``Influence``
    (projected Fisher), ``TRAK`` and ``TracIn`` (one store per checkpoint); see their docstrings.
    """

    method = "gradstore-graddot"

    def __init__(self, path: str | os.PathLike[str], model: nn.Module, task: Task, *,
                 projection: Featurizer | None = None, dtype: str = "float32", batch_size: int = 32,
                 chunk_size: int = 1024, on_mismatch: str = "raise", lock_wait: bool = False,
                 train_target: str = "loss"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if on_mismatch not in ("raise", "refit"):
            raise ValueError(f"on_mismatch must be 'raise' or 'refit', got {on_mismatch!r}")
        if train_target not in TRAIN_TARGETS:
            raise ValueError(f"train_target must be one of {TRAIN_TARGETS}, got {train_target!r}")
        if batch_size < 1 or chunk_size < 1:
            raise ValueError(f"batch_size and chunk_size must be positive, got {batch_size}, {chunk_size}")
        self.store = Store(path)
        self.model, self.task = model, task
        self.projection: Featurizer = KronProjection(16) if projection is None else projection
        self.dtype, self.batch_size = dtype, int(batch_size)
        self.chunk_size = int(chunk_size)
        self.on_mismatch, self.lock_wait = on_mismatch, lock_wait
        self.train_target = train_target
        self.compute_dtype = torch.float64 if dtype == "float64" else torch.float32
        self.modules = task.tracked_modules(model)
        self.shapes = _tracked_shapes(model, self.modules)
        self.blocks = _layout(self.projection, self.shapes)
        self.dim = sum(b.size for b in self.blocks)
        self.device = next(model.parameters()).device
        self.batches_featurized = 0  # backward passes run by this object (what a resumed build saves)

    @classmethod
    def exact(cls, path: str | os.PathLike[str], model: nn.Module, task: Task, **kwargs: Any) -> GradientStore:
        """A store of exact flat gradients (``D = numel``): for tiny models and tests."""
        return cls(path, model, task, projection=ExactFeatures(), **kwargs)

    @property
    def root(self) -> Path:
        return self.store.root

    # -- header ------------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """What determines the features besides model and data (JSON). ``train_target`` appears only when it is not
        the default ``"loss"`` (stores built before it existed keep their header)."""
        target = {} if self.train_target == "loss" else {"train_target": self.train_target}
        return _json({**target,
            "projection": self.projection.describe(), "dtype": self.dtype, "storage_dtype": DTYPES[self.dtype],
            "dim": self.dim, "modules": self.modules, "task": _task_description(self.task),
            "layout": [{"name": b.name, "shape": list(b.shape), "rows": b.rows, "cols": b.cols, "offset": b.offset,
                        "exact": b.exact} for b in self.blocks],
        })

    def _header(self, data: dict[str, Any] | None) -> dict[str, Any]:
        return _json({"format": FORMAT, "version": VERSION, "config": self.config(),
                      "model": {"class": type(self.model).__qualname__, "sha256": model_digest(self.model)},
                      "data": data, "chunk_size": self.chunk_size})

    def header(self) -> dict[str, Any] | None:
        """The stored header (``features``' manifest meta), or None if nothing was built here."""
        if not self.store.has(FEATURES):
            return None
        return self.store.info(FEATURES)["meta"]

    # -- featurize ---------------------------------------------------------------------------------------------
    def _featurize(self, loader: DataLoader, ids: np.ndarray, measurement: bool) -> Iterator[Tensor]:
        """Per batch, ``(B, D)`` features in the compute dtype (on the model's device); ``ids`` of the loader's rows
        name the examples in NaN/inf errors."""
        fn = self.task.measurement if measurement else self.task.loss
        row = 0
        with _eval(self.model), Capture(self.model, self.modules) as cap:
            for raw in loader:
                batch = to_device(raw, self.device)
                losses = fn(self.model, batch)
                grads = example_grads(cap, losses, ids[row: row + len(losses)])
                row += len(losses)
                self.batches_featurized += 1
                yield _project(self.projection, grads, self.shapes).to(self.compute_dtype)

    def featurize(self, data: Data, *, measurement: bool = True, batch_size: int | None = None
                  ) -> tuple[np.ndarray, Tensor]:
        """Ids ``(n,)`` and features ``(n, D)`` (compute dtype, model's device) of ``data``; queries by default
        (``task.measurement``), the training loss with ``measurement=False``."""
        src = _source(data, batch_size or self.batch_size)
        ids = example_ids(src.dataset)
        feats = list(self._featurize(src.loader(0, len(ids)), ids, measurement))
        return ids, torch.cat(feats)

    # -- build -------------------------------------------------------------------------------------------------
    def build(self, train: Data, *, on_chunk: Callable[[int, int], None] | None = None) -> GradientStore:
        """Featurize ``train`` into the store, resuming a killed build from its finished chunks.

        on_chunk(i, n_chunks): called after chunk ``i`` is durably written (progress; tests kill a build with it).
        Raises :class:`StoreError` if the store holds features of another model, data or configuration
        (``on_mismatch="raise"``), or :class:`~datacredit.lock.LockedError` if another process is building it.
        """
        src = _source(train, self.batch_size)
        ids = example_ids(src.dataset)
        header = self._header(_data_header(src.dataset, ids))
        n = len(ids)
        with BuildLock(self.root, wait=self.lock_wait):
            # a directory holding another kind of artefact (a Scores directory, a method's cache) is refused
            self.store.claim(KIND, adopt=(FEATURES, IDS, SCORES))
            stored = self.header()
            if stored is not None and _same_features(stored, header):
                # chunking is a storage detail: resume (or reuse) the stored chunks whatever chunk_size was asked
                self.chunk_size = int(stored["chunk_size"])
                header = {**header, "chunk_size": self.chunk_size}
            n_chunks = max(1, -(-n // self.chunk_size))
            overwrite = False
            if stored is not None and stored != header:
                diff = _diff(stored, header)
                if self.on_mismatch == "raise":
                    raise StoreError(f"{self.root}: the gradient store was built for another model, data or "
                                     f"configuration ({'; '.join(diff[:6])}); use a new directory or "
                                     "on_mismatch='refit'")
                overwrite = True
            if overwrite or not self.store.has(IDS) or not np.array_equal(self.store.load_array(IDS), ids):
                self.store.save_array(IDS, ids)
            chunked = self.store.chunked(FEATURES, (n, self.dim), DTYPES[self.dtype], n_chunks, meta=header,
                                         overwrite=overwrite)
            pending = chunked.pending()
            if not pending:
                return self
            rows = _Rows(self.store, FEATURES, chunked.array, writable=True)
            try:
                for i in pending:
                    start, stop = i * self.chunk_size, min(n, (i + 1) * self.chunk_size)
                    row = start
                    measure = self.train_target == "measurement"
                    for feats in self._featurize(src.loader(start, stop), ids[start:stop], measurement=measure):
                        rows.write(row, _encode(feats, self.dtype))
                        row += feats.shape[0]
                    if row != stop:
                        raise DataError(f"the loader yielded {row - start} examples for rows [{start}, {stop})")
                    rows.sync()  # data durable before the done flag
                    chunked.mark_done(i)
                    if on_chunk is not None:
                        on_chunk(i, n_chunks)
            finally:
                rows.close()
        return self

    # -- reading -----------------------------------------------------------------------------------------------
    def _check_usable(self) -> dict[str, Any]:
        stored = self.header()
        if stored is None:
            raise StoreError(f"{self.root}: no gradient store here; call build(train) first")
        current = self._header(stored.get("data"))
        if not _same_features(stored, current):
            raise StoreError(f"{self.root}: the gradient store was built for another model or configuration "
                             f"({'; '.join(_diff(stored, current)[:6])}); call build(train) to refit")
        return stored

    def train_ids(self) -> np.ndarray:
        """``(n_train,)`` int64 ids of the stored rows, checked against the header's ids digest (a refit killed
        between writing the ids and the features must not label old rows with new ids)."""
        ids = self.store.load_array(IDS)
        header = self.header() or {}
        want = (header.get("data") or {}).get("ids_sha256")
        if want != ids_digest(ids):
            raise StoreError(f"{self.root}: the stored training ids do not match the features' header (an interrupted "
                             "refit?); call build(train) again")
        return ids

    def check(self) -> dict[str, Any]:
        """The stored header, after checking the store is complete and was built for this model and configuration
        (raises :class:`StoreError` otherwise). Hashes the model's ``state_dict`` once."""
        stored = self._check_usable()
        self.store.load_array(FEATURES, mmap=True)  # complete, and the features' sha256 as recorded
        return stored

    def read_rows(self, start: int, stop: int) -> Tensor:
        """Training rows ``[start, stop)``, ``(stop - start, D)`` in the compute dtype on the model's device, read with
        ``pread`` (no header or hash check: call :meth:`check` once before a round of reads). Cost: the bytes read."""
        array = self.store.load_array(FEATURES, mmap=True, verify=False)
        stop = min(int(stop), array.shape[0])
        reader = _Rows(self.store, FEATURES, array)
        try:
            raw = reader.read(start, stop, np.empty((max(stop - start, 0), self.dim), dtype=array.dtype))
        finally:
            reader.close()
        return _decode(raw, self.dtype, self.compute_dtype).to(self.device)

    def query_features(self, queries: Data, preconditioner: Preconditioner | None = None
                       ) -> tuple[np.ndarray, Tensor]:
        """Query ids ``(Q,)`` and features ``(Q, D)`` of ``task.measurement`` (compute dtype), with the optional
        query-side ``preconditioner`` applied (as :meth:`score`); refuses a store built for another model."""
        return self._queries(queries, preconditioner)

    def features(self) -> np.ndarray:
        """The stored features as a read-only memmap ``(n_train, D)`` in the storage dtype (bfloat16: raw uint16)."""
        self._check_usable()
        return self.store.load_array(FEATURES, mmap=True)

    def _blocks(self, rows_per_block: int) -> Iterator[tuple[int, int, Tensor]]:
        """``(start, stop, features (rows, D) in the compute dtype on the model's device)`` over the whole store."""
        array = self.features()
        n = array.shape[0]
        reader = _Rows(self.store, FEATURES, array)
        buf = np.empty((min(rows_per_block, max(n, 1)), self.dim), dtype=array.dtype)
        try:
            for start in range(0, n, rows_per_block):
                stop = min(n, start + rows_per_block)
                raw = reader.read(start, stop, buf)
                yield start, stop, _decode(raw, self.dtype, self.compute_dtype).to(self.device)
        finally:
            reader.close()

    def _rows_per_block(self, n_query: int, memory_gb: float, resident: int) -> int:
        """Training rows per block so that raw + decoded rows + their scores fit beside ``resident`` bytes, and at
        most ``MAX_BLOCK_ROWS``: the budget is a ceiling, not a target (larger blocks are hardly faster)."""
        budget = int(memory_gb * 2**30)
        item = torch.empty((), dtype=self.compute_dtype).element_size()
        per_row = self.dim * (np.dtype(DTYPES[self.dtype]).itemsize + item) + 2 * n_query * item
        left = budget - resident
        if left < per_row:
            raise ValueError(f"memory_gb={memory_gb} leaves no room for one training row beside the query "
                             f"features and results ({resident / 2**30:.3f} GB); raise memory_gb")
        return int(max(1, min(MAX_BLOCK_ROWS, left // per_row)))

    def _queries(self, queries: Data, preconditioner: Preconditioner | None) -> tuple[np.ndarray, Tensor]:
        self._check_usable()
        qids, q = self.featurize(queries, measurement=True)
        if preconditioner is None:
            return qids, q
        if callable(preconditioner):
            out = preconditioner(q)
            if out.shape != q.shape:
                raise ValueError(f"the preconditioner must keep the query features' shape {tuple(q.shape)}, "
                                 f"returned {tuple(out.shape)}")
            return qids, out.to(self.compute_dtype)
        by_name = {b.name: b for b in self.blocks}
        unknown = sorted(set(preconditioner) - set(by_name))
        if unknown:
            raise ValueError(f"preconditioner names {unknown} are not blocks of this store ({sorted(by_name)})")
        q = q.clone()
        for name, mat in preconditioner.items():
            cols = by_name[name].columns
            size = by_name[name].size
            if tuple(mat.shape) != (size, size):
                raise ValueError(f"preconditioner[{name!r}] must be ({size}, {size}), got {tuple(mat.shape)}")
            q[:, cols] = q[:, cols] @ mat.to(q.dtype).to(q.device).T
        return qids, q

    # -- scoring -----------------------------------------------------------------------------------------------
    def score(self, queries: Data, *, memory_gb: float = 1.0, preconditioner: Preconditioner | None = None,
              out: str | os.PathLike[str] | None = None) -> Scores:
        """Scores ``(n_train, n_query)``: ``⟨φ_i, M φ_q⟩``; positive = training example ``i`` helps query ``q``.

        memory_gb: budget for the query features, one block of training rows and their scores, and the result when
            it is kept in memory. A result larger than half the budget, or any result when ``out`` (a store
            directory) is given, is written block by block to the chunked array ``scores`` of that store (default:
            this gradient store; replaced by the next such call) and returned as a read-only memmap.
        preconditioner: ``M``, applied to the query features only: a callable ``(Q, D) -> (Q, D)``, or per-layer
            matrices ``{parameter name: (size, size)}`` applied to that parameter's block (``size`` from the layout),
            e.g. :meth:`fisher_inverse`.
        Cost: one backward per query batch, ``n_train·D·Q`` multiply-adds, one read of the store.
        """
        train_ids = self.train_ids()  # checked before the queries' backward passes are spent
        qids, q = self._queries(queries, preconditioner)
        n, nq = len(train_ids), len(qids)
        item = q.element_size()
        resident = q.numel() * item
        result_bytes = n * nq * item
        npdtype = np.float64 if self.compute_dtype == torch.float64 else np.float32
        to_disk = out is not None or resident + result_bytes > memory_gb * 2**30 / 2
        if not to_disk:
            resident += result_bytes
        rows = self._rows_per_block(nq, memory_gb, resident)
        qt = q.T.contiguous()
        config = self._score_config(preconditioner)
        if not to_disk:
            values = np.empty((n, nq), dtype=npdtype)
            for start, stop, block in self._blocks(rows):
                values[start:stop] = (block @ qt).cpu().numpy()
            return Scores(values, train_ids, qids, self.method, config)
        target = self.store if out is None else Store(out)
        n_blocks = max(1, -(-n // rows))
        meta = {"method": self.method, "config": config, "train_ids_sha256": self.header()["data"]["ids_sha256"],
                "query_ids": [int(i) for i in qids[:16]], "n_query": nq}
        chunked = target.chunked(SCORES, (n, nq), npdtype, n_blocks, meta=meta, overwrite=True)
        writer = _Rows(target, SCORES, chunked.array, writable=True)
        try:
            for i, (start, _, block) in enumerate(self._blocks(rows)):
                writer.write(start, (block @ qt).cpu().numpy())
                writer.sync()
                chunked.mark_done(i)
        finally:
            writer.close()
        del chunked
        return Scores(target.load_array(SCORES, mmap=True), train_ids, qids, self.method, config)

    def topk(self, queries: Data, k: int, *, memory_gb: float = 1.0,
             preconditioner: Preconditioner | None = None) -> TopK:
        """The ``k`` best training examples per query (largest scores), without an ``n_train × n_query`` matrix.

        Memory: query features, one block of training rows and its ``(rows, Q)`` scores, and ``(k, Q)`` candidates.
        Equal to ``score(queries).topk(k, j)`` for every query ``j``, ties included (training order).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        train_ids = self.train_ids()  # checked before the queries' backward passes are spent
        qids, q = self._queries(queries, preconditioner)
        k = min(k, len(train_ids))
        nq = len(qids)
        resident = q.numel() * q.element_size() + 2 * k * nq * 16
        rows = self._rows_per_block(nq, memory_gb, resident)
        best_val = torch.empty(0, nq, dtype=self.compute_dtype)
        best_idx = torch.empty(0, nq, dtype=torch.int64)
        qt = q.T.contiguous()
        for start, _, block in self._blocks(rows):
            val, idx = _block_topk((block @ qt).cpu(), k)
            # candidates so far come first and have smaller training indices than this block's rows, and the
            # block's own candidates are in training order: a stable sort by value keeps training order among ties
            vals, inds = torch.cat([best_val, val]), torch.cat([best_idx, idx + start])
            order = torch.sort(vals, dim=0, descending=True, stable=True).indices[:k]
            best_val, best_idx = vals.gather(0, order), inds.gather(0, order)
        order_ids = train_ids[best_idx.T.numpy()]
        return TopK(qids, order_ids, best_val.T.double().numpy())

    def self_scores(self, memory_gb: float = 1.0) -> Scores:
        """``‖φ_i‖²`` per training example, ``(n_train, 1)`` (self-influence of the features)."""
        self._check_usable()
        rows = self._rows_per_block(1, memory_gb, 0)
        values = np.concatenate([(b.double() ** 2).sum(1).cpu().numpy() for _, _, b in self._blocks(rows)])
        return Scores(values[:, None], self.train_ids(), np.array([-1]), f"{self.method}:self",
                      self._score_config(None))

    def fisher_inverse(self, damping: float = 0.1, memory_gb: float = 1.0, *, absolute: float = 0.0
                       ) -> dict[str, Tensor]:
        """Per-layer ``(F_b + λ_b I)⁻¹`` in feature space, ``F_b = Φ_bᵀΦ_b / n_train`` from the stored training
        features, ``λ_b = damping · trace(F_b) / size_b + absolute``: the block-diagonal projected Gauss-Newton
        preconditioner LoGra applies (pass it as ``preconditioner=``). One read of the store; ``Σ_b size_b²``
        float64 numbers."""
        grams = {b.name: torch.zeros(b.size, b.size, dtype=torch.float64) for b in self.blocks}
        self._check_usable()
        n = 0
        for _, _, feats in self._blocks(self._rows_per_block(0, memory_gb, 0)):
            f = feats.double().cpu()
            n += f.shape[0]
            for b in self.blocks:
                x = f[:, b.columns]
                grams[b.name] += x.T @ x
        out = {}
        for b in self.blocks:
            fisher = grams[b.name] / max(n, 1)
            lam = damping * float(torch.trace(fisher)) / b.size + absolute
            out[b.name] = torch.linalg.inv(fisher + max(lam, 1e-12) * torch.eye(b.size, dtype=torch.float64))
        return out

    def _score_config(self, preconditioner: Preconditioner | None) -> dict[str, Any]:
        return {"store": str(self.root), "projection": self.projection.describe(), "dtype": self.dtype,
                "dim": self.dim, "preconditioner": None if preconditioner is None else
                ("callable" if callable(preconditioner) else "per-layer")}

    def __repr__(self) -> str:
        return (f"GradientStore({str(self.root)!r}, projection={self.projection.describe()}, dtype={self.dtype!r}, "
                f"dim={self.dim})")


def _same_features(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    """Headers equal but for ``chunk_size`` (how the rows were grouped for resuming, not what they hold)."""
    return {k: v for k, v in stored.items() if k != "chunk_size"} == \
        {k: v for k, v in current.items() if k != "chunk_size"}


def _block_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per column of ``scores`` ``(r, Q)``, the ``k`` largest values and their rows, listed in row order; among
    values tied at the k-th place, the first rows (as a stable sort would pick). Temporaries ``O(r·Q)`` bytes."""
    k = min(k, scores.shape[0])
    val, idx = torch.topk(scores, k, dim=0)
    kth = val[-1:]
    ties = ((scores >= kth).sum(0) > k).nonzero().flatten()
    for j in ties.tolist():  # rare: values tied across the k-th place; topk's pick among them is unspecified
        order = torch.sort(scores[:, j], descending=True, stable=True).indices[:k]
        idx[:, j], val[:, j] = order, scores[order, j]
    idx, perm = torch.sort(idx, dim=0)
    return val.gather(0, perm), idx


def _tracked_shapes(model: nn.Module, modules: list[str] | None) -> dict[str, torch.Size]:
    """Shapes of the trainable parameters owned by the tracked modules, in ``named_parameters`` order (a tied
    parameter appears once, under its first name, as the capture engine names it)."""
    owned = {id(p) for module, _ in resolve_modules(model, modules).values()
             for p in module.parameters(recurse=False) if p.requires_grad}
    return {name: p.shape for name, p in model.named_parameters() if id(p) in owned}
