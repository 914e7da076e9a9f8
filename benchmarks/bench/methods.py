"""The registry of benchmarked methods: a name -> how to get ``Scores`` for a case (and self-values for mislabel
detection). Ours are registered here, the peers' in :mod:`benchmarks.bench.peers`; a later method (SOURCE, an
ensemble) adds one :func:`register` call.

A method's ``run(ctx) -> Scores`` gets a :class:`Context`: a fresh copy of the model under attribution, the training
set, the queries, the case's Task, recipe and trajectory. Its CPU and wall time (fit + score) are the attribution
time the bench reports. ``self_values(ctx) -> (Scores (n_train, 1), higher_is_suspicious)`` ranks training examples for
mislabel detection (the context then holds the model trained on the flipped labels).

Settings shared by ours and the peers (so matched pairs compute the same thing):

* batch size :data:`BATCH` for every per-example gradient pass;
* influence: ``explicit`` and ``cg`` with absolute damping :data:`EXACT_DAMPING` (dattri takes the same number);
  ``cg`` at most :data:`CG_ITERS` iterations; the factored curvatures with our default damping, 0.1 × the mean
  eigenvalue of each block (kronfluence's ``damping_factor=None`` heuristic), empirical Fisher;
* TRAK: the final model only (M = 1), Gaussian projection to the case's ``trak_dim``, margin measurement;
* TracIn: the case's 10 checkpoints, learning-rate weights, exact (no projection).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from datacredit.curvature.hessian import HessianCG
from datacredit.methods import GradDot, Influence
from datacredit.scores import Scores
from datacredit.task import ClassificationTask, Task
from datacredit.training import InRunCallback

from .cases import Case

__all__ = ["BATCH", "CG_ITERS", "EXACT_DAMPING", "Context", "MethodSpec", "REGISTRY", "register", "selection"]

BATCH = 256
EXACT_DAMPING = 1e-3
CG_ITERS = 100
CG_TOL = 1e-7
EXPLICIT_MAX_PARAMS = 5000  # a dense D × D Hessian: 5000² float64 = 200 MB


@dataclass
class Context:
    """What a method needs: ``model()`` (a fresh copy each call), ``train``, ``queries``, ``task``, the ``recipe``
    and training ``seed`` of the model (In-Run retrains with them), its ``trajectory`` dir, a scratch ``workdir``."""

    case: Case
    model: Callable[[], nn.Module]
    train: Dataset
    queries: Dataset
    task: Task
    recipe: Any
    seed: int
    trajectory: Path
    workdir: Path


Run = Callable[[Context], Scores]
SelfValues = Callable[[Context], tuple[Scores, bool]]


def always(case: Case) -> str | None:
    return None


@dataclass(frozen=True)
class MethodSpec:
    """name: registry key (the row's label). family: ``"datacredit"`` or the peer's package. pair: for a peer, the
    name of our method computing the same thing (the bench prints our time / theirs and their correlation).
    skip(case): None if the method applies, else why not. quick: part of the ``--quick`` default selection.
    prepare(): one-time work done before any timing (a peer's imports), so no method is timed on import costs."""

    name: str
    run: Run
    family: str = "datacredit"
    pair: str | None = None
    skip: Callable[[Case], str | None] = always
    self_values: SelfValues | None = None
    quick: bool = False
    note: str = ""
    prepare: Callable[[], None] | None = None


REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry; a name already taken raises ValueError (no silent overwrite)."""
    if spec.name in REGISTRY:
        raise ValueError(f"a benchmark method named {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


def selection(names: list[str] | None, *, peers: bool, quick: bool) -> list[MethodSpec]:
    """The methods to run: ``names`` (unknown ones raise ValueError), else ours (``quick``: the quick subset),
    plus every peer when ``peers``."""
    if names:
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; registered: {sorted(REGISTRY)}")
        return [REGISTRY[n] for n in names]
    ours = [s for s in REGISTRY.values() if s.family == "datacredit" and (s.quick or not quick)]
    return ours + ([s for s in REGISTRY.values() if s.family != "datacredit"] if peers else [])


# -- conditions -----------------------------------------------------------------------------------------------------
def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def small_only(case: Case) -> str | None:
    d = numel(case.model())
    return None if d <= EXPLICIT_MAX_PARAMS else f"explicit Hessian of {d} parameters ({d}² entries): small cases only"


def classification_only(case: Case) -> str | None:
    return None if case.spec.classification else "needs a classification margin (TRAK); not defined for this LM case"


# -- ours -----------------------------------------------------------------------------------------------------------
def _verbs(make: Callable[[Context], Any]) -> tuple[Run, SelfValues]:
    """A post-hoc method's two benchmarked calls from its constructor: ``fit(train).score(queries)`` and
    ``fit(train).self_scores()`` (high = suspect)."""

    def run(ctx: Context) -> Scores:
        return make(ctx).fit(ctx.train).score(ctx.queries)

    def self_values(ctx: Context) -> tuple[Scores, bool]:
        return make(ctx).fit(ctx.train).self_scores(), True

    return run, self_values


def _graddot(normalize: bool) -> tuple[Run, SelfValues | None]:
    def make(ctx: Context) -> GradDot:
        return GradDot(ctx.model(), ctx.task, normalize=normalize, batch_size=BATCH, progress=False)

    run, self_values = _verbs(make)
    return run, (None if normalize else self_values)


def _influence(curvature: str) -> tuple[Run, SelfValues]:
    def make(ctx: Context) -> Influence:
        if curvature == "cg":
            return Influence(ctx.model(), ctx.task, curvature=HessianCG(max_iter=CG_ITERS, tol=CG_TOL),
                             damping=EXACT_DAMPING, batch_size=BATCH, progress=False)
        kwargs = {"damping": EXACT_DAMPING} if curvature == "explicit" else {}
        return Influence(ctx.model(), ctx.task, curvature=curvature, batch_size=BATCH, progress=False, **kwargs)

    return _verbs(make)


def _trak() -> tuple[Run, SelfValues]:
    from datacredit.methods.trak import TRAK

    def make(ctx: Context) -> TRAK:
        return TRAK(ctx.model(), ClassificationTask(measurement="margin"), projection=ctx.case.spec.trak_dim,
                    projection_kind="gaussian", batch_size=BATCH, progress=False)

    return _verbs(make)


def _tracin() -> tuple[Run, SelfValues]:
    from datacredit.methods.tracin import TracIn

    def make(ctx: Context) -> TracIn:
        return TracIn(ctx.model(), ctx.task, str(ctx.trajectory), batch_size=BATCH, progress=False)

    return _verbs(make)


def _inrun(order: int) -> tuple[Run, SelfValues]:
    """A training run of the same recipe and seed with In-Run Shapley recording (it does not change the updates, so
    it is the run of the model under attribution); its time is the whole instrumented training run."""

    def run(ctx: Context) -> Scores:
        cb = InRunCallback(ctx.task, ctx.queries, order=order, targeted=True)
        ctx.recipe.train(ctx.train, ctx.seed, callbacks=[cb])
        return cb.values()

    def self_values(ctx: Context) -> tuple[Scores, bool]:  # value for the (clean) queries' summed loss: low = suspect
        cb = InRunCallback(ctx.task, ctx.queries, order=order, targeted=False)
        ctx.recipe.train(ctx.train, ctx.seed, callbacks=[cb])
        return cb.values(), False

    return run, self_values


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _register_ours() -> None:
    for name, normalize in (("grad-dot", False), ("grad-cos", True)):
        run, self_values = _graddot(normalize)
        register(MethodSpec(name, run, self_values=self_values, quick=True))
    for curvature in ("explicit", "cg", "ekfac", "kfac", "diagonal", "identity"):
        run, self_values = _influence(curvature)
        # CG self-influence = one CG solve per training batch (each iteration a pass over the data): not benched
        register(MethodSpec(f"influence-{curvature}", run, self_values=None if curvature == "cg" else self_values,
                            quick=curvature == "identity", skip=small_only if curvature == "explicit" else always))
    if _has("datacredit.methods.trak"):
        run, self_values = _trak()
        register(MethodSpec("trak", run, self_values=self_values, skip=classification_only))
    if _has("datacredit.methods.tracin"):
        run, self_values = _tracin()
        register(MethodSpec("tracin", run, self_values=self_values))
    for order in (1, 2):
        run, self_values = _inrun(order)
        register(MethodSpec(f"inrun-{order}", run, self_values=self_values,
                            note="time = the whole training run with In-Run recording"))


_register_ours()


def pearson_per_query(a: Scores, b: Scores) -> float:
    """Mean over queries of the Pearson correlation of two score matrices' columns (rows matched by training id):
    ≈ +1 when two methods agree, ≈ −1 when one has the other's sign."""
    from datacredit.evaluate.align import same_ids
    from datacredit.evaluate.stats import pearson_columns

    rows = same_ids(a.train_ids, b.train_ids, "correlation", "the other scores")
    cols = same_ids(a.query_ids, b.query_ids, "correlation", "the other scores' queries")
    r = pearson_columns(np.asarray(a.values, dtype=np.float64), np.asarray(b.values, dtype=np.float64)[rows][:, cols])
    r = r[np.isfinite(r)]
    return float(r.mean()) if r.size else float("nan")
