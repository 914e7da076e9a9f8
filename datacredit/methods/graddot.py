"""Grad-Dot and Grad-Cos: ``score(i, q) = ⟨∇ℓ_i(θ), ∇f_q(θ)⟩`` (or its cosine).

Sign: a positive score means one gradient step on training example i lowers the query measurement ``f_q`` (by default
its loss) to first order, i.e. i helps q. Routes:

* exact (``projection=None``): nothing is cached at ``fit`` but the training ids (and norms for Grad-Cos); ``score``
  computes query gradients once (:class:`~.querygram.QueryGram`: per parameter, materialized once where that is
  cheaper, up to a memory budget, else kept factored for ghost dots), then streams training batches and takes the
  products layer by layer — ``O(n_train)`` backward passes per ``score`` call, each training batch's gradients
  materialized once (not once per query batch), no per-example ``d_in × d_out`` tensors where ghost dots are cheaper.
  With a store the ``(n_train, n_query)`` scores are written to a chunked memmap there (rows in blocks of about
  ``SCORE_CHUNK_BYTES``), so they need not fit in RAM and an interrupted ``score`` resumes at the first unfinished
  block; without one they are float64 in memory.
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

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..capture.projection import KINDS
from ..gradstore import GradientStore
from ..scores import Scores
from ..store import Store
from ..task import Task
from .base import (
    Data,
    GradientMethod,
    as_loader,
    configure,
    data_digest,
    feature_stores,
    ids_digest,
    model_digest,
    nbytes,
    own_store,
    projection_featurizer,
    row_subset,
    store_meta,
    store_products,
)
from .querygram import QueryGram


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

    Cost: exact ``score`` = one backward over queries + one over the training set; projected ``fit`` = one backward
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
        values, query_ids = self._fill(queries)
        return self._scores(values, query_ids)

    def _blocks(self, queries: Data) -> tuple[np.ndarray, Callable[[slice], np.ndarray], dict[str, Any] | None]:
        """Query ids, ``block(rows) -> (len(rows), n_query)`` float64 scores of those training rows (the query side
        prepared once, on the first call), and the metadata naming the stored scores."""
        self._require_fit()
        if self._features_store() is not None:
            return self._store_blocks(queries)
        query_ids = as_loader(queries, self.batch_size)[1]
        n = len(self.train_ids)
        prepared: list = []  # [QueryGram, query norms]: computed once, only if some block is still to compute

        def block(rows: slice) -> np.ndarray:
            if not prepared:
                _, it = self.grads(queries, measurement=True, desc=f"{self.name} queries")
                norms: list[np.ndarray] = []

                def query_batches():  # one batch alive at a time: QueryGram keeps what it needs of each
                    for b, g in it:
                        if self.config.normalize:
                            norms.append(_np(g.sq_norms().sqrt()))
                        yield b.rows, g

                query_gram = QueryGram(query_batches(), len(query_ids))
                prepared.extend([query_gram, np.concatenate(norms) if norms else None])
            query_gram, q_norms = prepared
            out = np.zeros((rows.stop - rows.start, len(query_ids)))
            _, train_it = self.grads(row_subset(self._train, rows, n), desc=f"{self.name} score")
            for batch, g in train_it:
                out[batch.rows] = _np(query_gram.gram(g))
            if self.config.normalize:
                out /= _safe(self.train_norms[rows])[:, None] * _safe(q_norms)[None, :]
            return out

        meta = None
        if self.store is not None:
            meta = {"method": self.name, "config": asdict(self.config), "model_sha256": model_digest(self.model),
                    "data_sha256": data_digest(self._train), "train_ids": ids_digest(self.train_ids),
                    "queries_sha256": data_digest(queries), "query_ids": ids_digest(query_ids),
                    "batch_size": self.batch_size}
        return query_ids, block, meta

    def _store_blocks(self, queries: Data) -> tuple[np.ndarray, Callable[[slice], np.ndarray], dict[str, Any] | None]:
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


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _safe(norms: np.ndarray) -> np.ndarray:
    # A zero gradient has no direction: its cosine is defined as 0, not NaN.
    return np.where(norms > 0, norms, np.inf)

