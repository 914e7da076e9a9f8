"""Influence functions with a pluggable curvature: identity, diagonal, KFAC, EK-FAC, and the exact explicit / CG twins.

``score(i, q) = ∇f_q(θ)ᵀ (H + δI)⁻¹ ∇ℓ_i(θ)``

Sign: Koh & Liang (2017) define ``I_up,loss(z_i, z_q) = −∇L_qᵀ H⁻¹ ∇ℓ_i``, the derivative of the query loss when
example i is upweighted; we return its negation, so a positive score means upweighting i *lowers* the query
measurement ``f_q`` (its loss by default): i helps q, the convention of every datacredit score.

Scale: ``H`` is the curvature of the *mean* training loss ``(1/N) Σ_j ℓ_j``, and the ``1/N`` of removing one example
is *not* included (as in kronfluence and dattri). Removing example i changes the parameters by about
``Δθ ≈ (1/N) (H + δI)⁻¹ ∇ℓ_i`` and the query loss by about ``score(i, q) / N``. An L2 penalty ``(λ/2)‖θ‖²`` in the
training objective belongs in the curvature: pass ``damping=λ``.

Work: query gradients are computed once per round of queries and the inverse curvature is applied to them
(:meth:`Influence.prepare`: factored curvatures rotate the factored query gradients straight into their eigenbasis
and may leave the last rotation ``Q_v`` to the training side, where it is cheaper); every training batch is
then scored against the whole round by :class:`~datacredit.methods.prepared.PreparedQueries`, which per layer skips
the exact zeros of the training gradients' factors (inactive ReLUs: one GEMM per weight row over the examples where
it is active, ``nnz(u)·n·Q``), or materializes the batch's training gradients (``N·T·m·n``) and multiplies them with all
the round's queries in one GEMM (``N·Q·m·n``), or takes val-first dots (``Σ_t u_tᵀ V v_t``, ``N·T·m·n·Q``), whichever
costs least (Embedding rows: val-first). ``curvature="identity"`` skips the
preconditioning and uses Grad-Dot's Gram products on the factored query gradients (ghost dots: ``N·Q·T²·(m+n)``).
Each round is one pass over the training data (a forward and backward per training batch), so rounds are made as
large as memory allows. Factored curvatures (diagonal, KFAC, EK-FAC) prepare a round in sub-groups of at most
``QUERY_ELEMENTS // numel`` queries, each written into the round's preallocated ``(m, n, Q)`` weights and released
before the next (:class:`~datacredit.methods.prepared.QueryPreparer`), so a round holds its prepared weights
(``Q × numel × itemsize`` bytes) plus one sub-group's gradients and temporaries (and the query stream's last batch),
and by default one round takes as many queries as fit :func:`prepared_budget`, a quarter of physical memory
(:mod:`datacredit.memory`; the device's memory on an accelerator). On a GPT-2 (3.15 M attributed weights, T = 128, 500
training windows, benchmarks/PEERS_LM.md) 200 queries are one pass: EK-FAC scoring 56.7 CPU s at 4.5 GiB peak RSS
(fit included), where before 7 rounds of 2²⁶ numbers took 195.2 s (3.0 GiB) and one round holding all its query
gradients 64.7 s (6.3 GiB). Explicit, CG and identity curvatures hold a whole round's query gradients and take
``QUERY_ELEMENTS // numel`` queries per round. ``query_batch=`` overrides the round size for all. With a store, the
curvature is cached (and a two-pass fit resumes at its second pass) and the ``(n_train, n_query)`` scores are filled
into a memmap chunk by chunk (one chunk per round and training batch), so an interrupted ``score`` resumes (rounds
already complete compute no query gradients) and a matrix larger than RAM lives on disk.

On a gradient store (``features=gs``, a :class:`~datacredit.gradstore.GradientStore` of training-loss gradients of
``model``), the curvature is fitted in the store's projected feature space: per layer (block ``b``) the projected
empirical Fisher ``F_b = Φ_bᵀΦ_b / n_train`` with damping ``δ_b = relative · trace(F_b)/size_b + absolute``
(:meth:`~datacredit.gradstore.GradientStore.fisher_inverse`, the LoGra-style projected influence,
``curvature="projected-fisher"``, the default with ``features=``), or ``curvature="identity"`` (``(1 + δ)⁻¹`` times
Grad-Dot of the features). ``fit`` builds the store (reused when built, resumed when killed, refused for another
model) and reads it once for the ``Σ_b size_b²`` Fisher; ``score`` featurizes the queries once, applies
``(F_b + δ_b I)⁻¹`` per block to them, and reads the store in row blocks: ``score[i, q] = Σ_b φ_{i,b}ᵀ
(F_b + δ_b I)⁻¹ φ_{q,b}``, cost ``n_train · D · Q``, however many queries. Sign and scale as above.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..capture import ExampleGrads
from ..curvature import Curvature, Damping, as_damping, curvature_class, curvature_names, tracked_parameters
from ..curvature.factored import IdentityCurvature, _BlockCurvature
from ..curvature.fisher import FISHER_KINDS, check_fisher, sampled_loss
from ..errors import DataError, StoreError
from ..gradstore import GradientStore
from ..memory import memory_budget as prepared_budget  # module-level name: the tests substitute it
from ..scores import Scores
from ..store import ChunkedArray, Store
from ..task import Task
from .base import (
    Batch,
    Data,
    GradientMethod,
    TopK,
    TopKAccumulator,
    as_loader,
    batches,
    configure,
    data_digest,
    eval_mode,
    feature_stores,
    fill_scores,
    ids_digest,
    model_digest,
    nbytes,
    store_meta,
    store_products,
    store_self_products,
)
from .prepared import PreparedQueries, QueryPreparer, prepare, views

logger = logging.getLogger(__name__)

QUERY_ELEMENTS = 2**26  # query gradients × numel preconditioned at once (sub-groups; non-factored: whole rounds)
DEFAULT_DAMPING = Damping(relative=0.1)  # kronfluence's heuristic: 0.1 × the mean eigenvalue of each block
PROJECTED_FISHER = "projected-fisher"  # the curvature of the features= route (module doc)


@dataclass(frozen=True)
class InfluenceConfig:
    """curvature: a registered name (see ``datacredit.curvature.curvature_names()``). damping: added to the curvature
    before inverting. query_batch: queries preconditioned per pass over the training data (None: for diagonal, KFAC
    and EK-FAC as many as :func:`prepared_budget` bytes of prepared weights hold, ``numel × itemsize`` per query, a
    quarter of physical memory by default; for the others ``QUERY_ELEMENTS // numel``). fisher: what the factored
    curvatures are fitted on, ``"empirical"`` (observed labels) or ``"true"`` (labels sampled from the model with
    ``seed``; see :mod:`datacredit.curvature.fisher`). A float damping is taken as :class:`Damping` (absolute)."""

    curvature: str = "ekfac"
    damping: Damping = DEFAULT_DAMPING
    query_batch: int | None = None
    fisher: str = "empirical"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "damping", as_damping(self.damping))
        if self.curvature not in (*curvature_names(), PROJECTED_FISHER):
            raise ValueError(f"unknown curvature {self.curvature!r}; choose one of {curvature_names()} "
                             f"(or {PROJECTED_FISHER!r} with features=)")
        if self.query_batch is not None and self.query_batch < 1:
            raise ValueError(f"query_batch must be None or positive, got {self.query_batch}")
        if self.fisher not in FISHER_KINDS:
            raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {self.fisher!r}")


class Influence(GradientMethod):
    """Influence functions: ``Influence(model, task, curvature="ekfac").fit(train).score(queries) -> Scores``.

    curvature: ``"ekfac"`` (default), ``"kfac"``, ``"diagonal"``, ``"identity"``, ``"explicit"`` (dense true Hessian,
    small models) or ``"cg"`` (true Hessian through conjugate gradients), or a :class:`Curvature` instance.
    damping: a float (absolute) or :class:`Damping` (absolute + relative × mean eigenvalue per block); the default is
    0.1 × the mean eigenvalue (for ``"cg"`` estimated by Hutchinson's trace estimator, so the default runs).
    store: a :class:`Store` (or its path) caching the curvature and the scores.
    fisher: ``"empirical"`` (default) or ``"true"`` (sampled labels, ``seed``) for the curvatures fitted from
    gradients; ``"explicit"`` and ``"cg"`` always use the true Hessian of the training loss.
    features: a :class:`~datacredit.gradstore.GradientStore` of this ``model`` (training-loss gradients): projected
    influence on the shared store (module doc); ``curvature`` is then ``"projected-fisher"`` (default) or
    ``"identity"``, ``fisher`` must be ``"empirical"``. Without it (default) nothing changes: ``curvature`` defaults
    to ``"ekfac"``.
    config: an :class:`InfluenceConfig`, or its fields as keywords (``curvature=``, ``damping=``, ``query_batch=``,
    ``fisher=``, ``seed=``; not both). A :class:`Curvature` instance is given as the ``curvature=`` keyword.
    Memory of :meth:`score` and :meth:`topk` (diagonal, KFAC, EK-FAC): one round's prepared queries, ``Q × numel ×
    itemsize`` bytes with ``Q`` all the queries when that fits :func:`prepared_budget` (a quarter of physical memory)
    or ``query_batch`` when given, plus one sub-group's query gradients (module doc); each further round is another
    pass over the training data. See the module docstring for the sign and the scale.
    """

    name = "influence"

    def __init__(self, model: nn.Module, task: Task, *, config: InfluenceConfig | None = None,
                 store: Store | str | None = None, batch_size: int = 64, features: GradientStore | None = None,
                 progress: bool = True, **settings: Any):
        super().__init__(model, task, batch_size=batch_size, progress=progress)
        self.features = None if features is None else feature_stores(features)[0]
        curvature = settings.get("curvature")
        if isinstance(curvature, Curvature):
            settings["curvature"] = curvature.name
        elif config is None and curvature is None:
            settings["curvature"] = "ekfac" if self.features is None else PROJECTED_FISHER
        config = configure(InfluenceConfig, config, settings)
        name, fisher = config.curvature, config.fisher
        if self.features is not None:
            if name not in (PROJECTED_FISHER, "identity") or isinstance(curvature, Curvature):
                raise ValueError(f"with features= the curvature is fitted on the store's features: curvature must "
                                 f"be {PROJECTED_FISHER!r} (default) or 'identity', got {name!r}")
            if fisher != "empirical":
                raise ValueError("with features= the Fisher is the stored training-loss gradients' (empirical)")
            if self.features.model is not model:
                raise ValueError("features= must be a GradientStore of the same model object as the method's")
            if self.features.train_target != "loss":
                raise ValueError("influence needs a store of training-loss gradients (train_target='loss')")
        elif name == PROJECTED_FISHER:
            raise ValueError(f"curvature={PROJECTED_FISHER!r} needs features=GradientStore(...)")
        self.config = config
        check_fisher(fisher, task)
        self._store_pre: dict[str, Tensor] | float | None = None  # features= route: per-block inverses or a scale
        self._given = curvature if isinstance(curvature, Curvature) else None
        self.store = Store(store) if isinstance(store, (str, os.PathLike)) else store
        self.params = tracked_parameters(model, self.modules)
        self.numel = sum(p.numel() for p in self.params.values())
        self.curvature: Curvature | None = None
        self.train_ids: np.ndarray | None = None
        self._train: Data | None = None
        self._fit_meta: dict = {}

    # -- data --------------------------------------------------------------------------------------------------
    def _grads(self, data: Data, *, measurement: bool = False, fisher: bool = False, desc: str = "",
               skip: frozenset[int] = frozenset()) -> Iterator[tuple[int, Batch, ExampleGrads]]:
        """(batch index, batch, per-example gradients) for every batch not in ``skip``: of the measurement, of the
        loss at sampled labels (``fisher``), or of the training loss (:meth:`GradientMethod.stream`)."""
        seed = self.config.seed
        losses = (lambda b: sampled_loss(self.task, self.model, b.data, b.ids, seed)) if fisher else None
        it = self.stream(data, measurement=measurement, losses=losses, skip=skip.__contains__,
                         desc=f"{self.name} {desc}".strip())
        return ((k, batch, g) for k, batch, g, _ in it)

    def _raw_batches(self, data: Data) -> Iterator:
        _, it = batches(data, self.batch_size, self.device, f"{self.name} hessian", self.progress)
        return (b.data for b in it)

    # -- fit ---------------------------------------------------------------------------------------------------
    def cache_bytes(self) -> int:
        """Bytes of the training ids and the fitted curvature (or, on the ``features=`` route, the per-block inverse
        Fisher); the model's parameters are not counted."""
        curvature = 0 if self.curvature is None else self.curvature.nbytes()
        return nbytes(self.train_ids, self._store_pre) + curvature

    def fit(self, train: Data) -> Influence:
        """Fit the curvature on ``train`` (its per-example training-loss gradients); cached in the store, where a
        partly fitted curvature (EK-FAC after its first pass) resumes."""
        if self.features is not None:
            return self._fit_store(train)
        _, ids = as_loader(train, self.batch_size)
        self._train, self.train_ids = train, ids
        # what a stored curvature is keyed by (hashed only when there is a store): the data's content, not only its
        # ids (the same ids with corrected labels must not reuse the old curvature), and the whole model
        meta = {} if self.store is None else {
            "n_train": len(ids), "train_ids_sha256": ids_digest(ids), "data_sha256": data_digest(train),
            "fisher": self.config.fisher, "seed": self.config.seed, "model_sha256": model_digest(self.model)}
        self._fit_meta = meta
        curvature = self._cached_curvature(meta) or self._new_curvature()
        if curvature.source == "data":
            curvature.bind(self.model, self.task.loss, list(self.params))
            feed = lambda: self._raw_batches(train)  # noqa: E731
        else:
            true_fisher = self.config.fisher == "true"
            feed = lambda: (g for _, _, g in self._grads(train, fisher=true_fisher, desc=f"{curvature.name} fit"))  # noqa: E731
        save = None if self.store is None else (lambda c: c.save(self.store, "curvature", meta))
        with eval_mode(self.model):
            curvature.fit(feed, on_pass=save)
        self.curvature = curvature.to(self.device)
        return self

    @property
    def _factored(self) -> bool:
        """Whether queries are prepared sub-group by sub-group into preallocated weights (diagonal, KFAC, EK-FAC)."""
        return isinstance(self.curvature, _BlockCurvature)

    def _fit_store(self, train: Data) -> Influence:
        """The ``features=`` route: build (or reuse) the store, then the per-block inverse Fisher from one read."""
        gs = self.features
        gs.build(train)
        self._train, self.train_ids = train, gs.train_ids()
        damping = self.config.damping
        if self.config.curvature == "identity":
            self._store_pre = IdentityCurvature().scale(damping)
        else:
            self._store_pre = gs.fisher_inverse(damping.relative, absolute=damping.absolute)
        self._fit_meta = {"features": store_meta([gs]), "train_ids_sha256": ids_digest(self.train_ids)}
        return self

    def _new_curvature(self) -> Curvature:
        if self._given is not None:  # a copy: fitting twice (other data) must not refit the user's object in place
            return copy.deepcopy(self._given)
        return curvature_class(self.config.curvature)()

    def _cached_curvature(self, meta: dict) -> Curvature | None:
        if self.store is None:
            return None
        try:
            info = Curvature.stored_meta(self.store, "curvature")
        except StoreError:
            info = None
        if info is None or info["kind"] != self.config.curvature or info.get("meta") != meta:
            return None
        if self._given is not None and info.get("config") != self._given.config():
            return None
        curvature = Curvature.load(self.store, "curvature")
        logger.info("curvature %r loaded from %s (%d/%d passes done)", curvature.name, self.store.root,
                    curvature.passes_done, curvature.n_passes)
        return curvature

    def _require_fit(self) -> None:
        if self.curvature is None and self._store_pre is None:
            raise RuntimeError(f"call {type(self).__name__}.fit(train) before scoring")

    # -- score -------------------------------------------------------------------------------------------------
    def _round_size(self) -> int:
        """Queries per pass over the training data (whole query batches): ``query_batch``, else for factored
        curvatures as many as fit :func:`prepared_budget` (``Q × numel × itemsize`` bytes of prepared weights), else
        (explicit, CG, identity: their whole round's gradients are held and preconditioned at once)
        ``QUERY_ELEMENTS // numel``."""
        if self.config.query_batch:
            want = self.config.query_batch
        elif self._factored:
            itemsize = max((p.element_size() for p in self.params.values()), default=4)
            want = prepared_budget(self.device) // max(self.numel * itemsize, 1)
        else:
            want = QUERY_ELEMENTS // max(self.numel, 1)
        return self._whole_batches(want)

    def _whole_batches(self, queries: int) -> int:
        return max(1, -(-queries // self.batch_size)) * self.batch_size

    def precondition(self, grads: list[ExampleGrads]) -> dict[str, Tensor]:
        """``(H + δI)⁻¹ ∇f_q`` per parameter, ``{name: (Q, *shape)}``, for the queries of ``grads`` (in order)."""
        mats = [g.materialize() for g in grads]
        names = [name for name in self.params if any(name in m for m in mats)]
        weights = {}
        for name in names:
            shape = self.params[name].shape
            parts = [m[name] if name in m else torch.zeros(g.n, *shape, dtype=g.flat_dtype, device=self.device)
                     for m, g in zip(mats, grads)]
            weights[name] = torch.cat(parts)
        with eval_mode(self.model):
            return self.curvature.apply_inverse(weights, self.config.damping)

    def prepare(self, grads: list[ExampleGrads]) -> PreparedQueries:
        """The queries of ``grads`` (in order) preconditioned, ``(H + δI)⁻¹ ∇f_q``, in the layout
        :class:`~datacredit.methods.prepared.PreparedQueries` scores training batches with. Factored curvatures
        (diagonal, KFAC, EK-FAC) go from the factored query gradients straight into their eigenbasis and may leave
        the last rotation to the training side (:func:`~datacredit.methods.prepared.prepare`); the others go through
        :meth:`precondition`. Same numbers as :meth:`precondition` to rounding (the tests' twin)."""
        if self._factored:
            self._check_blocks(grads)
            with eval_mode(self.model):
                return prepare(self.curvature.blocks, grads, self.config.damping, len(self.train_ids),
                               lambda g: g.flat_dtype)
        return PreparedQueries.from_weights(self.precondition(grads), views(grads))

    def _check_blocks(self, grads: list[ExampleGrads]) -> None:
        self.curvature._require_fit()
        missing = sorted({name for g in grads for name in g.pieces} - set(self.curvature.blocks))
        if missing:
            raise KeyError(f"curvature {self.curvature.name!r} has no block for parameter(s) {missing}; "
                           f"fitted: {sorted(self.curvature.blocks)}")

    def _query_side(self, groups: Iterator[list[ExampleGrads]], n_query: int) -> Callable[[ExampleGrads], Tensor]:
        """What one query round does to each training batch: ``g -> (N, Q)`` scores of the round's ``n_query``
        queries, given as sub-groups of query gradients (consumed here).

        Factored curvatures: each sub-group is preconditioned and written into the round's preallocated weights
        (:class:`~datacredit.methods.prepared.QueryPreparer`), then released, so the round's query gradients are
        never held at once. Identity curvature: ``(1 + δ)⁻¹ ⟨g_i, g_q⟩`` by the Gram products Grad-Dot uses (ghost
        dots where cheaper: for one position per example ``N·Q·(m + n)`` instead of ``N·Q·m·n``), on the factored
        query gradients. Otherwise the round's queries are preconditioned at once (:meth:`prepare`). Every training
        batch is then multiplied with the prepared queries by :meth:`PreparedQueries.products` (zero-skipping,
        materialize + GEMM or val-first, by cost).
        """
        if self._factored:
            preparer = QueryPreparer(self.curvature.blocks, self.config.damping, len(self.train_ids), n_query,
                                     lambda g: g.flat_dtype)
            with eval_mode(self.model):
                for group in groups:
                    self._check_blocks(group)
                    preparer.add(group)
                    del group
            return preparer.finish().products
        group = [g for sub in groups for g in sub]
        if isinstance(self.curvature, IdentityCurvature):
            scale = self.curvature.scale(self.config.damping)
            return lambda g: torch.cat([g.gram(q) for q in group], dim=1) * scale
        return self.prepare(group).products

    def score(self, queries: Data) -> Scores:
        """Scores ``(n_train, n_query)``; positive = upweighting the training example lowers the query's
        measurement (see the module doc for sign and scale)."""
        self._require_fit()
        if self.features is not None:
            query_ids, block, meta = self._blocks(queries)
            shape = (len(self.train_ids), len(query_ids))
            return self._scores(fill_scores(self.store, shape, np.float64, self.batch_size, block, meta), query_ids)
        _, query_ids = as_loader(queries, self.batch_size)
        n_train_batches = len(as_loader(self._train, self.batch_size)[0])
        round_size = self._round_size()
        n_query_batches = len(as_loader(queries, self.batch_size)[0])
        per_round = max(1, round_size // self.batch_size)
        n_rounds = -(-n_query_batches // per_round)
        out = self._output(query_ids, queries, n_rounds * n_train_batches, round_size)
        array = out.array if isinstance(out, ChunkedArray) else out
        if isinstance(out, ChunkedArray) and out.complete:
            return self._scores(np.asarray(array), query_ids)

        def done(r: int) -> frozenset[int]:  # training batches of round r already in the store
            if not isinstance(out, ChunkedArray):
                return frozenset()
            return frozenset(b for b in range(n_train_batches) if out.done(r * n_train_batches + b))

        finished = frozenset(r for r in range(n_rounds) if len(done(r)) == n_train_batches)
        for r, cols, groups in self._rounds(queries, per_round, n_rounds, skip=finished):
            combine = self._query_side(groups, cols.stop - cols.start)
            for b, batch, g in self._grads(self._train, desc="score", skip=done(r)):
                values = combine(g).detach().double().cpu().numpy()
                array[batch.rows, cols] = values
                if isinstance(out, ChunkedArray):
                    out.mark_done(r * n_train_batches + b)
            del combine  # this round's prepared queries freed before the next round's are built (one round's memory)
        return self._scores(np.asarray(array), query_ids)

    def _rounds(self, queries: Data, per_round: int, n_rounds: int, skip: frozenset[int] = frozenset()
                ) -> Iterator[tuple[int, slice, Iterator[list[ExampleGrads]]]]:
        """``(round index, query columns, sub-groups of query gradients)`` for each round of ``per_round`` query
        batches not in ``skip`` (their query gradients are not computed). A sub-group is at most
        ``QUERY_ELEMENTS // numel`` queries (whole batches); each round's sub-groups must be consumed before the next
        round is asked for."""
        n_query = len(as_loader(queries, self.batch_size)[1])
        n_batches = len(as_loader(queries, self.batch_size)[0])
        skipped = frozenset(k for r in skip for k in range(r * per_round, (r + 1) * per_round))
        stream = self._grads(queries, measurement=True, desc="queries", skip=skipped)
        sub = max(1, self._whole_batches(QUERY_ELEMENTS // max(self.numel, 1)) // self.batch_size)
        for r in range(n_rounds):
            if r in skip:
                continue
            first, stop = r * per_round, min(n_batches, (r + 1) * per_round)
            cols = slice(first * self.batch_size, min(n_query, stop * self.batch_size))
            yield r, cols, self._sub_groups(stream, first, stop, sub, cols)

    @staticmethod
    def _sub_groups(stream: Iterator[tuple[int, Batch, ExampleGrads]], first: int, stop: int, size: int,
                    cols: slice) -> Iterator[list[ExampleGrads]]:
        """Query batches ``first:stop`` of ``stream`` in lists of at most ``size``; checks that they fill ``cols``."""
        group: list[ExampleGrads] = []
        row = cols.start
        for _ in range(first, stop):
            k, batch, g = next(stream)
            if batch.rows.start != row:
                raise RuntimeError(f"query batch {k} starts at row {batch.rows.start}, expected {row}")
            row = batch.rows.stop
            group.append(g)
            del g  # the list holds it (and the stream, until its next batch): released with its sub-group
            if len(group) == size:
                yield group
                group = []
        if group:
            yield group
        if row != cols.stop:
            raise RuntimeError(f"query round ends at row {row}, expected {cols.stop}")

    def topk(self, queries: Data, k: int, *, largest: bool = True) -> TopK:
        """The ``k`` strongest training examples per query (:class:`~datacredit.methods.base.TopK`), merged training
        batch by training batch in each query round: memory ``(k + batch) × n_query`` scores, never the
        ``(n_train, n_query)`` matrix, nothing written to the store. Same numbers as ``score(queries).topk(k, j)``."""
        self._require_fit()
        if self.features is not None:
            return GradientMethod.topk(self, queries, k, largest=largest)
        query_ids = as_loader(queries, self.batch_size)[1]
        per_round = max(1, self._round_size() // self.batch_size)
        n_rounds = -(-len(as_loader(queries, self.batch_size)[0]) // per_round)
        acc = TopKAccumulator(k, len(query_ids), largest)
        for _, cols, groups in self._rounds(queries, per_round, n_rounds):
            combine = self._query_side(groups, cols.stop - cols.start)
            for _, batch, g in self._grads(self._train, desc="top-k"):
                acc.add(batch.rows, cols, combine(g).detach().double().cpu().numpy())
            del combine  # as in score: one round's prepared queries alive at a time
        return acc.result(self.train_ids, query_ids, self._method)

    def _blocks(self, queries: Data) -> tuple[np.ndarray, Callable[[slice], np.ndarray], dict[str, Any] | None]:
        """``features=`` route: query ids, ``block(rows)`` float64 scores (queries featurized and preconditioned once,
        on the first call) and the metadata naming stored scores."""
        gs = self.features
        gs.check()
        query_ids = as_loader(queries, self.batch_size)[1]
        prepared: list[Tensor] = []  # (D, n_query): (F_b + δ_b I)⁻¹ φ_q per block

        def block(rows: slice) -> np.ndarray:
            if not prepared:
                if isinstance(self._store_pre, dict):
                    _, q = gs.query_features(queries, self._store_pre)
                else:
                    _, q = gs.query_features(queries)
                    q = q * self._store_pre
                prepared.append(q.T.contiguous())
            return store_products([(gs, prepared[0], 1.0)], rows)

        meta = None
        if self.store is not None:
            meta = {"method": self._method, "config": asdict(self.config), "features": store_meta([gs]),
                    "query_ids": ids_digest(query_ids), "queries_sha256": data_digest(queries),
                    "batch_size": self.batch_size}
        return query_ids, block, meta

    def _output(self, query_ids: np.ndarray, queries: Data, n_chunks: int, round_size: int
                ) -> np.ndarray | ChunkedArray:
        shape = (len(self.train_ids), len(query_ids))
        if self.store is None:  # nothing to key: the queries' contents are hashed only for a store
            return np.zeros(shape)
        name = f"scores-{ids_digest(query_ids)[:16]}"
        meta = {"config": asdict(self.config), "curvature": self._fit_meta,
                "query_ids_sha256": ids_digest(query_ids), "queries_sha256": data_digest(queries),
                "batch_size": self.batch_size,
                "round_size": round_size}
        try:
            return self.store.chunked(name, shape, np.float64, n_chunks, meta=meta)
        except StoreError:  # the same queries scored under other settings: start afresh
            return self.store.chunked(name, shape, np.float64, n_chunks, meta=meta, overwrite=True)

    def self_scores(self) -> Scores:
        """``∇ℓ_iᵀ (H + δI)⁻¹ ∇ℓ_i`` per training example, ``(n_train, 1)`` (self-influence; ≥ 0 for a PSD
        curvature). Materializes one training batch's gradients at a time."""
        self._require_fit()
        if self.features is not None:
            values = store_self_products([(self.features, self._store_transform, 1.0)])
            return Scores(values[:, None], self.train_ids, np.array([-1]), f"{self._method}:self",
                          asdict(self.config))
        values = np.zeros(len(self.train_ids))
        with eval_mode(self.model):
            for _, batch, g in self._grads(self._train, desc="self"):
                values[batch.rows] = self.curvature.self_products(g, self.config.damping).detach().double().cpu()
        return Scores(values[:, None], self.train_ids, np.array([-1]), f"{self._method}:self", asdict(self.config))

    def _store_transform(self, rows: Tensor) -> Tensor:
        """The fitted ``(F + δI)⁻¹`` (block-diagonal) or ``(1 + δ)⁻¹`` applied to feature rows ``(r, D)`` float64."""
        if not isinstance(self._store_pre, dict):
            return rows * self._store_pre
        out = rows.clone()
        for b in self.features.blocks:
            out[:, b.columns] = rows[:, b.columns] @ self._store_pre[b.name].to(rows).T
        return out

    @property
    def _method(self) -> str:
        return f"{self.name}-{self.config.curvature}"

    def _scores(self, values: np.ndarray, query_ids: np.ndarray) -> Scores:
        if values.shape[0] != len(self.train_ids):
            raise DataError("the training data changed size since fit; call fit again")
        return Scores(values, self.train_ids, query_ids, self._method, asdict(self.config))
