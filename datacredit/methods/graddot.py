"""Grad-Dot and Grad-Cos: ``score(i, q) = ⟨∇ℓ_i(θ), ∇f_q(θ)⟩`` (or its cosine).

Sign: a positive score means one gradient step on training example i lowers the query measurement ``f_q`` (by default
its loss) to first order, i.e. i helps q. Routes:

* exact (``projection=None``): nothing is cached at ``fit`` but the training ids (and norms for Grad-Cos); ``score``
  computes query gradients once (:class:`~.querygram.QueryGram`: per parameter, materialized once where that is
  cheaper, else kept factored for ghost dots), then streams training batches and takes the products layer by layer —
  each training batch's gradients materialized once per round (not once per query batch), no per-example
  ``d_in × d_out`` tensors where ghost dots are cheaper. Where the materialized queries would pass the memory budget
  (:func:`datacredit.memory.memory_budget`) the queries go in rounds, one pass over the training set each
  (``O(rounds · n_train)`` backward passes per ``score`` call), round count and routes chosen together by estimated
  multiply-adds (:func:`~.querygram.plan`). With a store the ``(n_train, n_query)`` scores are written to a chunked
  memmap there (one chunk per query batch and row block of about ``SCORE_CHUNK_BYTES``), so they need not fit in RAM
  and an interrupted ``score`` resumes: no gradients of a finished query batch, no training batch of a finished
  block are computed again; without one they are float64 in memory.
* projected (``projection=k``): the route below on the method's own gradient store (:func:`~.base.own_store`:
  in ``store``'s directory when one is given, else a private temporary one), with the projection ``projection_kind``
  of dimension k (:func:`~.base.projection_featurizer`; the numbers of :class:`~datacredit.capture.projection.
  Projector`): ``fit`` featurizes the training set once (resumable, reused by any later fit of the same model, data
  and projection in that directory), ``score`` is one projected backward over the queries and a product.
* on a gradient store (``features=gs``, a :class:`~datacredit.gradstore.GradientStore` of ``model`` and ``task``):
  ``fit`` builds the store (a built one is reused, a killed build resumes, another model is refused), ``score`` is
  one backward over the queries and the store read once in row blocks: ``score[i, q] = ⟨φ_i, φ_q⟩`` with the store's
  projection ``φ`` (Kronecker, dense or exact), products in float64. The same store serves ``Influence``,
  ``TracIn`` (one per checkpoint) and any number of query rounds without featurizing the training set again.

Every cached artefact's metadata holds the digests of the model (its whole ``state_dict``), of the data (ids and
contents) and of the configuration (:mod:`datacredit.digests`): features or scores written for another model, data
or configuration are refitted (the stale artefact replaced), never silently reused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..capture.grads import ExampleGrads
from ..capture.projection import KINDS
from ..digests import config_digest
from ..gradstore import GradientStore
from ..scores import Scores
from ..store import Store
from ..task import Task
from .base import (
    Batch,
    Data,
    GradientMethod,
    TopK,
    TopKAccumulator,
    as_loader,
    configure,
    data_digest,
    feature_stores,
    ids_digest,
    model_digest,
    nbytes,
    own_store,
    projection_featurizer,
    score_rows,
    storage_dtype,
    store_meta,
    store_products,
)
from .querygram import PREPARED, QueryGram, plan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GradDotConfig:
    """normalize: Grad-Cos instead of Grad-Dot. projection: None (exact) or the projected dimension k.
    projection_kind: ``"kronecker"`` (per layer, LoGra-style), ``"gaussian"`` or ``"rademacher"`` (dense)."""

    normalize: bool = False
    projection: int | None = None
    projection_kind: str = "kronecker"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.projection is not None and self.projection < 1:
            raise ValueError(f"projection must be None or a positive dimension, got {self.projection}")
        if self.projection_kind not in KINDS:
            raise ValueError(f"projection_kind must be one of {KINDS}, got {self.projection_kind!r}")


class GradDot(GradientMethod):
    """Grad-Dot / Grad-Cos attribution. ``GradDot(model, task).fit(train).score(queries) -> Scores``.

    Cost: exact ``score`` = one backward over queries + one over the training set per query round (one round unless
    the prepared queries pass the memory budget, module doc); projected ``fit`` = one backward
    over the training set, ``score`` = one over the queries + an ``(n_train × k) · (k × n_query)`` product.

    config: a :class:`GradDotConfig`, or its fields as keywords (``normalize=True``, ``projection=...``; not both).
    features: a :class:`~datacredit.gradstore.GradientStore` built (or to be built by ``fit``) on this ``model``:
        the projected route on the shared store (module doc); ``projection`` must then be None (the store's
        projection is used). ``GradDot.from_store(gs)`` is the same. store: where scores are cached, and, for
        ``projection=k``, the directory of the method's own feature store (module doc).
    """

    def __init__(self, model: nn.Module, task: Task, *, config: GradDotConfig | None = None,
                 store: Store | str | os.PathLike[str] | None = None, features: GradientStore | None = None,
                 batch_size: int = 64, progress: bool = True, **settings: Any):
        self.config = config = configure(GradDotConfig, config, settings)
        super().__init__(model, task, batch_size=batch_size, progress=progress)
        self.name = "grad-cos" if config.normalize else "grad-dot"
        self.store = Store(store) if isinstance(store, (str, os.PathLike)) else store
        self.features = None if features is None else feature_stores(features)[0]
        if self.features is not None:
            if config.projection is not None:
                raise ValueError("features= brings its own projection: leave projection=None")
            if self.features.model is not model:
                raise ValueError("features= must be a GradientStore of the same model object as the method's")
            if self.features.train_target != "loss":
                raise ValueError("Grad-Dot needs a store of training-loss gradients (train_target='loss')")
        self._own = None  # the projected route's own GradientStore (created on first use)
        self._train = None
        self.train_ids: np.ndarray | None = None
        self.train_features: np.ndarray | None = None  # (n_train, k), projected route: the own store's memmap
        self.train_norms: np.ndarray | None = None  # (n_train,), Grad-Cos

    @classmethod
    def from_store(cls, features: GradientStore, **kwargs: Any) -> GradDot:
        """Grad-Dot (or Grad-Cos, ``normalize=True``) on a gradient store, with its model and task."""
        return cls(features.model, features.task, features=features, **kwargs)

    # -- fit ---------------------------------------------------------------------------------------------------
    def cache_bytes(self) -> int:
        """Bytes of the training ids, the projected training features and Grad-Cos's norms (exact Grad-Dot: the ids
        only)."""
        return nbytes(self.train_ids, self.train_features, self.train_norms)

    def fit(self, train: Data) -> GradDot:
        """Cache what depends only on the training data; resumes from the store after an interruption."""
        self._train = train
        gs = self._features_store()
        if gs is not None:
            gs.build(train)
            self.train_ids = gs.train_ids()
            if self.features is None:
                self.train_features = gs.features()
            if self.config.normalize:
                self.train_norms = np.sqrt(gs.self_scores().values[:, 0])
            return self
        if self.config.normalize:
            norms = []
            ids, it = self.grads(train, desc=f"{self.name} fit")
            for _, g in it:
                norms.append(_np(g.sq_norms().sqrt()))
            self.train_ids, self.train_norms = ids, np.concatenate(norms)
        else:
            self.train_ids = as_loader(train, self.batch_size)[1]
        return self

    def _features_store(self) -> GradientStore | None:
        """The store the projected routes read: ``features=``, or the method's own (``projection=k``); None exact."""
        if self.features is not None:
            return self.features
        if self.config.projection is None:
            return None
        if self._own is None:
            featurizer = projection_featurizer(self.config.projection, self.config.projection_kind, self.config.seed)
            self._own = own_store(self, featurizer, on_mismatch="refit")
        return self._own

    def _features(self, data: Data) -> tuple[np.ndarray, np.ndarray]:
        """Ids and projected training-loss features ``(n, k)`` of ``data``, computed in memory (not stored)."""
        ids, feats = self._features_store().featurize(data, measurement=False)
        return ids, feats.cpu().numpy()

    # -- score -------------------------------------------------------------------------------------------------
    def _require_fit(self) -> None:
        if self.train_ids is None:
            raise RuntimeError(f"call {type(self).__name__}.fit(train) before scoring")

    def score(self, queries: Data) -> Scores:
        """Scores ``(n_train, n_query)``; positive = the training example helps the query (see module doc)."""
        if self._features_store() is not None:
            values, query_ids = self._fill(queries)
        else:
            values, query_ids = self._exact(queries)
        return self._scores(values, query_ids)

    def topk(self, queries: Data, k: int, *, largest: bool = True) -> TopK:
        """The ``k`` strongest training examples per query (:meth:`GradientMethod.topk`); exact route: merged training
        batch by training batch in each query round, nothing written to the store."""
        if self._features_store() is not None:
            return super().topk(queries, k, largest=largest)
        self._require_fit()
        query_ids = as_loader(queries, self.batch_size)[1]
        acc = TopKAccumulator(k, len(query_ids), largest)
        n_batches = -(-len(query_ids) // _batch_size(queries, self.batch_size))
        for _, cols, query_gram, q_norms in self._rounds(queries, list(range(n_batches))):
            for _, batch, g, _ in self.stream(self._train, desc=f"{self.name} top-k"):
                acc.add(batch.rows, cols, self._values(query_gram, g, batch, q_norms))
            del query_gram  # before the next round's is built: one round's query side alive at a time
        return acc.result(self.train_ids, query_ids, self.name)

    def _exact(self, queries: Data) -> tuple[np.ndarray, np.ndarray]:
        """Exact ``(values, query_ids)``: the queries in rounds (:func:`~.querygram.plan`), the training set streamed
        once per round, each round's columns written training batch by training batch. With a store the scores are a
        chunked memmap there of one chunk per (query batch, row block of about ``SCORE_CHUNK_BYTES``): an interrupted
        ``score`` resumes, computing no gradients of a query batch whose chunks are all done and no training batch
        whose row block is done for the whole round; the layout does not depend on the rounds (a run under another
        memory budget resumes as well)."""
        self._require_fit()
        query_ids = as_loader(queries, self.batch_size)[1]
        n, n_query = len(self.train_ids), len(query_ids)
        n_batches = -(-n_query // _batch_size(queries, self.batch_size))
        train_size = _batch_size(self._train, self.batch_size)
        blocks = score_rows(n, n_query, train_size)  # each a whole number of training batches
        step = blocks[0].stop - blocks[0].start if blocks else 1
        out, name = self._output(queries, query_ids, n_batches * len(blocks))
        array = out if name is None else out.array

        def done(k: int, b: int) -> bool:  # chunk of query batch k and row block b already in the store
            return name is not None and out.done(k * len(blocks) + b)

        pending = [k for k in range(n_batches) if not all(done(k, b) for b in range(len(blocks)))]
        for ks, cols, query_gram, q_norms in self._rounds(queries, pending):
            def finished(t: int, ks: list[int] = ks) -> bool:  # training batch t's row block, done for the round
                return all(done(k, t * train_size // step) for k in ks)

            for _, batch, g, _ in self.stream(self._train, skip=finished, desc=f"{self.name} score"):
                array[batch.rows, cols] = self._values(query_gram, g, batch, q_norms)
                b = batch.rows.start // step
                if name is not None and batch.rows.stop == blocks[b].stop:
                    for k in ks:
                        if not done(k, b):
                            out.mark_done(k * len(blocks) + b)
            del query_gram  # before the next round's is built: one round's query side alive at a time
        if name is None:
            return array, query_ids
        array.flush()
        return self.store.load_array(name, mmap=True), query_ids

    def _values(self, query_gram: QueryGram, g: ExampleGrads, batch: Batch, q_norms: np.ndarray | None
                ) -> np.ndarray:
        """One training batch's float64 scores against one round's queries (Grad-Cos: divided by both norms)."""
        values = _np(query_gram.gram(g))
        if self.config.normalize:
            values /= _safe(self.train_norms[batch.rows])[:, None] * _safe(q_norms)[None, :]
        return values

    def _rounds(self, queries: Data, pending: list[int]
                ) -> Iterator[tuple[list[int], slice | np.ndarray, QueryGram, np.ndarray | None]]:
        """The query batches ``pending`` (indices into the query loader, increasing) in rounds: per round its batch
        indices, its columns of the score matrix (a slice where contiguous), its query side (:class:`QueryGram`) and,
        for Grad-Cos, its queries' norms. Routes and round size are :func:`~.querygram.plan`'s, on the first pending
        batch. Every pending batch's gradients are computed once (one pass over them in all), the others skipped;
        each round must be used, and dropped by the caller, before the next is asked for (two rounds' query sides
        alive at once would pass the budget). Between rounds the suspended query stream holds its last batch."""
        if not pending:
            return
        size = _batch_size(queries, self.batch_size)
        n_query = len(as_loader(queries, self.batch_size)[1])
        wanted = frozenset(pending)
        stream = self.stream(queries, measurement=True, skip=lambda k: k not in wanted, desc=f"{self.name} queries")
        held = [next(stream)]  # the first pending batch: the plan's stand-in, then round 1's first batch
        count = sum(min(n_query, (k + 1) * size) - k * size for k in pending)
        p = plan(held[0][2], count, size)
        logger.info("%s: %d queries in %d round(s) of %d batches; prepared %s", self.name, count, p.n_rounds,
                    p.per_round, sorted(n for n, r in p.routes.items() if r == PREPARED))
        for r in range(0, len(pending), p.per_round):
            ks = pending[r:r + p.per_round]
            rows = [slice(k * size, min(n_query, (k + 1) * size)) for k in ks]
            width = sum(s.stop - s.start for s in rows)
            contiguous = all(a.stop == b.start for a, b in zip(rows, rows[1:]))
            cols = slice(rows[0].start, rows[-1].stop) if contiguous else np.concatenate(
                [np.arange(s.start, s.stop) for s in rows])
            norms: list[np.ndarray] = []

            def batches(ks: list[int] = ks, rows: list[slice] = rows, norms: list[np.ndarray] = norms):
                offset = 0
                for k, want in zip(ks, rows):
                    got, batch, g, _ = held.pop() if held else next(stream)
                    if got != k or batch.rows != want:
                        raise RuntimeError(f"query batch {got} (rows {batch.rows}) where batch {k} ({want}) was due")
                    if self.config.normalize:
                        norms.append(_np(g.sq_norms().sqrt()))
                    yield slice(offset, offset + g.n), g
                    offset += g.n
                    del g  # one batch alive at a time: the QueryGram keeps what it needs of it

            query_gram = QueryGram(batches(), width, routes=p.routes)
            if r + p.per_round >= len(pending):
                stream.close()  # the last round: release the stream's last batch and leave the query capture now
            yield ks, cols, query_gram, np.concatenate(norms) if norms else None
            del query_gram

    def _output(self, queries: Data, query_ids: np.ndarray, n_chunks: int) -> tuple[Any, str | None]:
        """Where the exact scores go: ``(float64 array, None)`` in memory, or ``(ChunkedArray, its name)`` in the
        store, named after the model, data, queries and configuration (a stale one is replaced)."""
        shape = (len(self.train_ids), len(query_ids))
        if self.store is None:
            return np.zeros(shape), None
        meta = {"method": self.name, "config": asdict(self.config), "model_sha256": model_digest(self.model),
                "data_sha256": data_digest(self._train), "train_ids": ids_digest(self.train_ids),
                "queries_sha256": data_digest(queries), "query_ids": ids_digest(query_ids),
                "batch_size": self.batch_size, "chunks": "query batch x row block"}
        meta = json.loads(json.dumps(meta))
        name = f"scores-{config_digest(meta)[:16]}"
        stale = self.store.has(name) and self.store.info(name).get("meta") != meta
        chunked = self.store.chunked(name, shape, storage_dtype(self.model), max(n_chunks, 1), meta=meta,
                                     overwrite=stale)
        return chunked, name

    def _blocks(self, queries: Data) -> tuple[np.ndarray, Callable[[slice], np.ndarray], dict[str, Any] | None]:
        """The projected routes on a gradient store: queries featurized once (lazily), rows read per block, products
        in float64 (the float32 features as the float64 numbers they are)."""
        gs = self._features_store()
        gs.check()
        query_ids = as_loader(queries, self.batch_size)[1]
        prepared: list[torch.Tensor] = []  # (D, n_query) query features (Grad-Cos: unit length)

        def block(rows: slice) -> np.ndarray:
            if not prepared:
                q = gs.query_features(queries)[1].double()
                if self.config.normalize:
                    norms = q.norm(dim=1)
                    q = q / torch.where(norms > 0, norms, torch.inf)[:, None]
                prepared.append(q.T.contiguous())
            scale = 1.0 / _safe(self.train_norms) if self.config.normalize else 1.0
            return store_products([(gs, prepared[0], scale)], rows)

        meta = None
        if self.store is not None:
            meta = {"method": self.name, "config": asdict(self.config), "features": store_meta([gs]),
                    "queries_sha256": data_digest(queries), "query_ids": ids_digest(query_ids),
                    "batch_size": self.batch_size}
        return query_ids, block, meta

    def self_scores(self) -> Scores:
        """``⟨∇ℓ_i, ∇ℓ_i⟩`` (self-influence), ``(n_train, 1)``; all ones for Grad-Cos."""
        self._require_fit()
        if self.config.normalize:
            values = np.ones(len(self.train_ids))
        elif self._features_store() is not None:
            values = self._features_store().self_scores().values[:, 0]
        else:
            _, it = self.grads(self._train, desc=f"{self.name} self")
            values = np.concatenate([_np(g.sq_norms()) for _, g in it])
        return Scores(values[:, None], self.train_ids, np.array([-1]), f"{self.name}:self", asdict(self.config))

    def _scores(self, values: np.ndarray, query_ids: np.ndarray) -> Scores:
        config = asdict(self.config)
        gs = self.features  # the own route's store is an implementation detail (its root may be a temporary one)
        if gs is not None:
            config["features"] = {"root": str(gs.root), "projection": gs.projection.describe(), "dtype": gs.dtype,
                                  "dim": gs.dim}
        return Scores(values, self.train_ids, query_ids, self.name, config)


def _batch_size(data: Data, default: int) -> int:
    """Examples per batch of ``data``'s loader (:func:`~.base.as_loader`): a DataLoader's own, else ``default``."""
    return data.batch_size if isinstance(data, DataLoader) else default


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _safe(norms: np.ndarray) -> np.ndarray:
    # A zero gradient has no direction: its cosine is defined as 0, not NaN.
    return np.where(norms > 0, norms, np.inf)

