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
* projected (``projection=k``): the route below on the method's own gradient stores, one per checkpoint
  (:func:`~.base.own_store`, in ``store``'s directory when one is given, else a private temporary one; all on the
  method's private model, which holds checkpoint k whenever store k is built or read: each store's header refuses
  another state). ``fit`` featurizes the training set once per checkpoint (resumable; a store of another
  trajectory, data or task is refused by name); ``score`` is one projected backward over the queries per checkpoint
  and a product.

* on gradient stores (``features=[gs_0, …, gs_{C−1}]``, one :class:`~datacredit.gradstore.GradientStore` per
  checkpoint, each on a model holding that checkpoint's weights; :meth:`TracIn.feature_stores` makes them): ``fit``
  builds them (reused when built, resumed when killed; a store whose model is not its checkpoint is refused),
  ``score`` featurizes the queries once per checkpoint and reads the stores in row blocks:
  ``score[i, q] = Σ_k η_k ⟨φ_k(∇ℓ_i), φ_k(∇f_q)⟩`` with the stores' projection, products in float64.

Checkpoints are loaded into a private copy of the model: the user's model is never modified. With a store, the
``(n_train, n_query)`` scores are written chunk by chunk into a memmap in the store (resumable) and returned mapped.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..capture.projection import KINDS
from ..digests import config_digest, model_digest
from ..errors import DataError
from ..gradstore import GradientStore
from ..scores import Scores
from ..store import Store
from ..task import Task
from ..trajectory import Trajectory
from .base import (
    Data,
    GradientMethod,
    as_loader,
    as_trajectory,
    configure,
    data_digest,
    feature_stores,
    ids_digest,
    nbytes,
    own_store,
    projection_featurizer,
    row_subset,
    store_meta,
    store_products,
    store_self_products,
    to_np,
    working_copy,
)

WEIGHTINGS = ("lr", "lr_sum", "uniform")


@dataclass(frozen=True)
class TracInConfig:
    """projection: None (exact) or the projected dimension. projection_kind: ``"kronecker"`` (per layer),
    ``"gaussian"`` or ``"rademacher"``. weighting: ``"lr"`` (paper), ``"lr_sum"`` or ``"uniform"`` (module doc)."""

    projection: int | None = None
    projection_kind: str = "kronecker"
    seed: int = 0
    weighting: str = "lr"

    def __post_init__(self) -> None:
        if self.projection is not None and self.projection < 1:
            raise ValueError(f"projection must be None or a positive dimension, got {self.projection}")
        if self.projection_kind not in KINDS:
            raise ValueError(f"projection_kind must be one of {KINDS}, got {self.projection_kind!r}")
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


class TracIn(GradientMethod):
    """TracIn-CP over a trajectory. ``TracIn(model, task, trajectory).fit(train).score(queries) -> Scores``.

    model: the architecture (and device) the checkpoints are loaded into; a private copy is used.
    trajectory: a :class:`Trajectory` or the directory a :class:`TrajectoryRecorder` wrote.
    Cost: exact ``score`` = C backward passes over the queries and C over the training set (C = checkpoints);
    projected ``fit`` = C over the training set, ``score`` = C over the queries + C products
    ``(n_train × k) · (k × n_query)``. Stored: C · n_train · k floats (projected). Scores are float64 in memory; with
    a store, a memmap in the model's float dtype.
    config: a :class:`TracInConfig`, or its fields as keywords (``projection=...``, ``weighting=...``; not both).
    features: one :class:`~datacredit.gradstore.GradientStore` per checkpoint (module doc; see
    :meth:`feature_stores`); ``projection`` must then be None (the stores' projection is used).
    """

    name = "tracin"

    def __init__(self, model: nn.Module, task: Task, trajectory: Trajectory | str | os.PathLike[str], *,
                 config: TracInConfig | None = None, store: Store | str | None = None,
                 features: Sequence[GradientStore] | None = None, batch_size: int = 64, progress: bool = True,
                 **settings: Any):
        self.config = config = configure(TracInConfig, config, settings)
        super().__init__(working_copy(model), task, batch_size=batch_size, progress=progress)
        self.trajectory = as_trajectory(trajectory)
        self.weights = checkpoint_weights(self.trajectory, config.weighting)
        self.features = None if features is None else feature_stores(features, many=True)
        if self.features is not None:
            if config.projection is not None:
                raise ValueError("features= brings its own projection: leave projection=None")
            if len(self.features) != len(self.trajectory):
                raise ValueError(f"features= needs one GradientStore per checkpoint: got {len(self.features)} for "
                                 f"{len(self.trajectory)} checkpoints")
            for k, gs in enumerate(self.features):
                if gs.train_target != "loss":
                    raise ValueError("TracIn needs stores of training-loss gradients (train_target='loss')")
                self._load(k)
                if model_digest(gs.model) != model_digest(self.model):
                    raise ValueError(f"features[{k}] is a store of another model than checkpoint {k} "
                                     "(make them with TracIn.feature_stores)")
        self.store = Store(store) if isinstance(store, (str, os.PathLike)) else store
        self._own: list[GradientStore] | None = None  # the projected route's stores, one per checkpoint
        self._train: Data | None = None
        self._digests: list[str] | None = None
        self.train_ids: np.ndarray | None = None
        self.train_features: list[np.ndarray] | None = None  # per checkpoint (n_train, k): the own stores' memmaps

    @staticmethod
    def feature_stores(root: str | Path, model: nn.Module, task: Task,
                       trajectory: Trajectory | str | Path, **kwargs: Any) -> list[GradientStore]:
        """One :class:`~datacredit.gradstore.GradientStore` per checkpoint, in ``root/checkpoint-0000`` …, each on a
        private copy of ``model`` holding that checkpoint's weights (C copies of the weights in memory); ``kwargs``
        go to every store (projection, dtype, ...). Pass the list as ``features=``."""
        trajectory = as_trajectory(trajectory)
        stores = []
        for k in range(len(trajectory)):
            member = trajectory.load_into(copy.deepcopy(model), k)
            stores.append(GradientStore(Path(root) / f"checkpoint-{k:04d}", member, task, **kwargs))
        return stores

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def _load(self, k: int) -> None:
        self.trajectory.load_into(self.model, k)

    def _digest(self, k: int) -> str:
        """Checkpoint k's weights by value: the saved file's sha256, or (in memory) the sha256 of every tensor's bytes
        (not :meth:`Trajectory.digest`'s cheap statistics, which a permutation of weights keeps)."""
        if self._digests is None:
            self._digests = [self.trajectory[j].digest or config_digest(self.trajectory.state_dict(j))
                             for j in range(len(self.trajectory))]
        return self._digests[k]

    def _meta(self) -> dict[str, Any]:
        """What the scores depend on (the cached features depend on less: see :meth:`fit`)."""
        return {"method": self.name, "config": asdict(self.config), "weights": self.weights.tolist(),
                "checkpoints": [self._digest(k) for k in range(len(self.trajectory))], "batch_size": self.batch_size}

    # -- fit -----------------------------------------------------------------------------------------------------
    def cache_bytes(self) -> int:
        """Bytes of the training ids and the per-checkpoint projected training features (projected route)."""
        return nbytes(self.train_ids, self.train_features)

    def fit(self, train: Data) -> TracIn:
        """Cache what depends only on the training data (projected routes: the per-checkpoint stores, resumable)."""
        self._train = train
        stores = self._stores()
        if stores is None:
            self.train_ids = as_loader(train, self.batch_size)[1]
            return self
        self.train_ids, features = None, []
        for k, gs in enumerate(stores):
            self._ready(k, gs)
            gs.build(train)
            ids = gs.train_ids()
            if self.train_ids is not None and not np.array_equal(ids, self.train_ids):
                raise ValueError("the checkpoints' stores hold different training ids")
            self.train_ids = ids
            if self.features is None:
                features.append(gs.features())
        self.train_features = features or None
        return self

    def _stores(self) -> list[GradientStore] | None:
        """The per-checkpoint stores the projected routes read (``features=``, or the method's own); None exact."""
        if self.features is not None:
            return self.features
        if self.config.projection is None:
            return None
        if self._own is None:
            self._own = [own_store(self, projection_featurizer(self.config.projection, self.config.projection_kind,
                                                               self.config.seed), suffix=f"-checkpoint-{k:04d}")
                         for k in range(len(self.trajectory))]
        return self._own

    def _ready(self, k: int, gs: GradientStore) -> None:
        """Checkpoint k into the private model when store k is on it (the own stores; ``features=`` stores have
        their own models)."""
        if gs.model is self.model:
            self._load(k)

    def _require_fit(self) -> None:
        if self.train_ids is None:
            raise RuntimeError(f"call {type(self).__name__}.fit(train) before scoring")

    # -- score ---------------------------------------------------------------------------------------------------
    def score(self, queries: Data) -> Scores:
        """Scores ``(n_train, n_query)``; positive = the training example helps the query (see module doc)."""
        values, query_ids = self._fill(queries)
        return Scores(values, self.train_ids, query_ids, self.name, self._config())

    def _blocks(self, queries: Data) -> tuple[np.ndarray, Callable[[slice], np.ndarray], dict[str, Any]]:
        """Query ids, ``block(rows) -> (len(rows), n_query)`` float64 scores of those training rows (the query side
        prepared once, on the first call), and the metadata naming the stored scores."""
        self._require_fit()
        if self._stores() is not None:
            return self._store_blocks(queries)
        query_ids = as_loader(queries, self.batch_size)[1]
        n = len(self.train_ids)
        prepared: dict[str, Any] = {}

        def prepare() -> None:  # query side, once per checkpoint, only if some block is still to compute
            for k in range(len(self.trajectory)):
                self._load(k)
                _, it = self.grads(queries, measurement=True, desc=f"{self.name} queries {k + 1}")
                prepared[k] = [(b.rows, g) for b, g in it]

        def block(rows: slice) -> np.ndarray:
            if not prepared:
                prepare()
            out = np.zeros((rows.stop - rows.start, len(query_ids)))
            for k, w in enumerate(self.weights):
                self._load(k)
                _, it = self.grads(row_subset(self._train, rows, n), desc=f"{self.name} score {k + 1}")
                for batch, g in it:
                    for q_rows, qg in prepared[k]:
                        out[batch.rows, q_rows] += w * to_np(g.gram(qg))
            return out

        meta = None if self.store is None else {
            **self._meta(), "train_ids": ids_digest(self.train_ids), "query_ids": ids_digest(query_ids),
            "train_sha256": data_digest(self._train), "queries_sha256": data_digest(queries)}
        return query_ids, block, meta


    def _store_blocks(self, queries: Data) -> tuple[np.ndarray, Callable[[slice], np.ndarray], dict[str, Any]]:
        """The projected routes: each checkpoint's query features once (lazily), the stores read in row blocks,
        products in float64."""
        stores = self._stores()
        for k, gs in enumerate(stores):
            self._ready(k, gs)
            gs.check()
        query_ids = as_loader(queries, self.batch_size)[1]
        prepared: list[torch.Tensor] = []  # per checkpoint (D_k, n_query) float64

        def block(rows: slice) -> np.ndarray:
            if not prepared:
                for k, gs in enumerate(stores):
                    self._ready(k, gs)
                    prepared.append(gs.query_features(queries)[1].double().T.contiguous())
            terms = [(gs, q, float(w)) for gs, q, w in zip(stores, prepared, self.weights, strict=True)]
            return store_products(terms, rows)

        meta = None if self.store is None else {
            **self._meta(), "features": store_meta(stores), "train_ids": ids_digest(self.train_ids),
            "query_ids": ids_digest(query_ids), "queries_sha256": data_digest(queries)}
        return query_ids, block, meta

    def self_scores(self) -> Scores:
        """``Σ_k η_k ‖∇ℓ_i(θ_k)‖²`` (TracIn self-influence, used to find mislabelled examples), ``(n_train, 1)``."""
        self._require_fit()
        if self._stores() is not None:
            values = store_self_products([(gs, lambda f: f, float(w)) for gs, w in zip(self._stores(), self.weights,
                                                                                        strict=True)])
            return Scores(values[:, None], self.train_ids, np.array([-1]), f"{self.name}:self", self._config())
        values = np.zeros(len(self.train_ids))
        for k, w in enumerate(self.weights):
            self._load(k)
            _, it = self.grads(self._train, desc=f"{self.name} self {k + 1}")
            for batch, g in it:
                values[batch.rows] += w * to_np(g.sq_norms())
        return Scores(values[:, None], self.train_ids, np.array([-1]), f"{self.name}:self", self._config())

    def _config(self) -> dict[str, Any]:
        out = {**asdict(self.config), "steps": self.trajectory.steps.tolist(), "weights": self.weights.tolist()}
        stores = self.features  # the own route's stores are an implementation detail (maybe temporary ones)
        if stores is not None:
            gs = stores[0]
            out["features"] = {"roots": [str(s.root) for s in stores], "dtype": gs.dtype, "dim": gs.dim,
                               "projection": gs.projection.describe()}
        return out
