"""What every ensemble shares: a method factory, one ``fit`` / ``score`` loop over the members, the documented average,
and the costs (training time, serving time, stored bytes) reported next to the scores.

Average: the ensemble's score matrix is the plain elementwise mean of its K members' ``(n_train, n_query)`` score
matrices (:meth:`Scores.average`): each member is a complete attribution, and the ensemble averages the attributions.
The sign is the members': positive = the training example helps the query. For TRAK members this is TRAK's own
multi-model estimator with ``average="per-model"`` (member m projected with seed m; a test checks it), not the
paper's ``"separate"`` one, which multiplies the averaged kernel scores by the members' mean ``1 − p``.

Costs (:class:`EnsembleCost`), in the units of the paper's three claims:

* training: seconds spent producing the weights the members attribute with (K models for the independent ensemble;
  one model for dropout; one base model plus K LoRA fine-tunes for LoRA);
* serving: seconds of the attribution itself, ``fit`` (train-side cache) plus the last ``score`` call;
* stored bytes: what the ensemble keeps — model or adapter weights (and masks), ``weight_bytes``, plus what each
  member's fitted method keeps, as the method itself reports it (its documented ``cache_bytes()``: training ids,
  projected features, curvature, kernels), ``cache_bytes``; each counted once when shared.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from ..methods.base import nbytes
from ..scores import Scores
from ..store import Store

# A member's method: fit(train) -> self, score(queries) -> Scores, self_scores() -> Scores and cache_bytes() -> int
# (bytes of what fit keeps; every post-hoc method in datacredit.methods has them).
Method = Any
# The one factory shape: ``factory(model, member) -> method``, called once per member with the member's model and its
# index 0..K-1 (for per-member stores or projection seeds; ignore it otherwise): ``lambda model, member:
# GradDot(model, task)``.
MethodFactory = Callable[[nn.Module, int], Method]
FACTORY_SHAPE = "a factory (model, member) -> method, e.g. lambda model, member: GradDot(model, task)"


def check_factory(factory: Any) -> MethodFactory:
    """``factory`` if it has the one documented shape, ``(model, member) -> method``; TypeError saying what to pass
    otherwise (a method class, which would take the member index for its task, or a callable taking one model).
    A callable whose signature Python cannot read (some builtins) is taken as it is."""
    if inspect.isclass(factory):
        raise TypeError(f"method must be {FACTORY_SHAPE}, not the class {factory.__name__} itself")
    if not callable(factory):
        raise TypeError(f"method must be {FACTORY_SHAPE}, got {type(factory).__name__}")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return factory
    try:
        signature.bind(None, 0)
    except TypeError:
        raise TypeError(f"method must be {FACTORY_SHAPE}; {getattr(factory, '__name__', factory)!s}"
                        f"{signature} cannot be called with (model, member)") from None
    return factory


def check_k(k: int | None) -> None:
    """The one check of an ensemble config's ``k`` (None: taken from what is given, e.g. the models)."""
    if k is not None and int(k) < 1:
        raise ValueError(f"k: an ensemble needs k >= 1 members, got {k}")


def config_settings(config: Any) -> dict[str, Any]:
    """An ensemble config as it goes into ``Scores.config`` (lists for tuples; ``k`` is the scored prefix's, added by
    the ensemble itself)."""
    return {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(config).items() if key != "k"}


def weight_bytes(model: nn.Module, trainable_only: bool = False) -> int:
    """Bytes of a model's distinct parameters and buffers (only the trainable parameters with ``trainable_only``)."""
    tensors = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    if not trainable_only:
        tensors += list(model.buffers())
    return nbytes(tensors)


@dataclass
class EnsembleCost:
    """Seconds and bytes of an ensemble, split into a shared part and one part per member, so that the cost of the
    first k members (:meth:`prefix`) is known without rerunning (members do not depend on K).

    shared_training: seconds to train what all members share (the one model of dropout, LoRA's base); None if unknown.
    member_training: per member, seconds to train its own weights (independent model, LoRA fine-tune; 0 for dropout);
        None entries where unknown (models given without their training time).
    shared_fit / member_fit: seconds of ``fit`` (a train-side cache shared by all members is fitted once).
    member_score: seconds of each member's last ``score`` call.
    shared_weight_bytes / member_weight_bytes: model weights stored once (dropout's model, LoRA's base) / per member
        (an independent model, a LoRA adapter, a dropout member's masks at a byte per feature).
    shared_cache_bytes / member_cache_bytes: the methods' cached features, once (a shared train-side cache) / per
        member.
    """

    shared_training: float | None = 0.0
    member_training: list[float | None] = field(default_factory=list)
    shared_fit: float = 0.0
    member_fit: list[float] = field(default_factory=list)
    member_score: list[float] = field(default_factory=list)
    shared_weight_bytes: int = 0
    member_weight_bytes: list[int] = field(default_factory=list)
    shared_cache_bytes: int = 0
    member_cache_bytes: list[int] = field(default_factory=list)

    def prefix(self, k: int) -> EnsembleCost:
        """The cost of an ensemble of the first ``k`` members."""
        if not 1 <= k <= len(self.member_fit):
            raise ValueError(f"k must be in 1..{len(self.member_fit)}, got {k}")
        return EnsembleCost(self.shared_training, self.member_training[:k], self.shared_fit, self.member_fit[:k],
                            self.member_score[:k], self.shared_weight_bytes, self.member_weight_bytes[:k],
                            self.shared_cache_bytes, self.member_cache_bytes[:k])

    @property
    def training_seconds(self) -> float | None:
        parts = [self.shared_training, *self.member_training]
        return None if any(t is None for t in parts) else float(sum(parts))

    @property
    def serving_seconds(self) -> float:
        return float(self.shared_fit + sum(self.member_fit) + sum(self.member_score))

    @property
    def weight_bytes(self) -> int:
        return int(self.shared_weight_bytes + sum(self.member_weight_bytes))

    @property
    def cache_bytes(self) -> int:
        return int(self.shared_cache_bytes + sum(self.member_cache_bytes))

    @property
    def stored_bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "training_seconds": self.training_seconds, "serving_seconds": self.serving_seconds,
                "weight_bytes": self.weight_bytes, "cache_bytes": self.cache_bytes, "stored_bytes": self.stored_bytes}


def timed(fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter) -> tuple[Any, float]:
    """``fn()`` and the seconds it took on ``clock``."""
    start = clock()
    out = fn()
    return out, clock() - start


class Ensemble:
    """Base: K members, each a method built by the factory on the member's model; ``fit`` / ``score`` /
    ``self_scores`` run every member (inside :meth:`_member`, where a subclass applies e.g. dropout masks) and return
    the mean of the members' scores. After ``score``: ``member_scores`` (K Scores) and ``cost``.

    ``clock`` (attribute) times the costs: ``time.perf_counter`` (wall time, the default) or e.g.
    ``time.process_time`` (this process's CPU time, steadier on a shared machine when torch uses one thread).
    """

    kind = "ensemble"
    clock: Callable[[], float] = staticmethod(time.perf_counter)

    def __init__(self, method: MethodFactory, k: int):
        if int(k) < 1:
            raise ValueError(f"an ensemble needs k >= 1 members, got {k}")
        self.k = int(k)
        self._factory = check_factory(method)
        self.methods: list[Method] = []
        self.member_scores: list[Scores] = []
        self.cost = EnsembleCost()

    # -- what subclasses provide ---------------------------------------------------------------------------------
    def _prepare(self, train: Dataset | DataLoader) -> None:
        """Produce (and time, into ``self.cost``) the members' weights if not done yet."""

    def _model(self, member: int) -> nn.Module:
        raise NotImplementedError

    def _settings(self) -> dict[str, Any]:
        return {}

    @contextlib.contextmanager
    def _member(self, member: int, method: Method) -> Iterator[None]:
        """The context a member's fit / score / self_scores runs in (dropout: its masks)."""
        yield

    def _method_of(self, member: int) -> Method:
        return self.methods[member]

    def _weight_bytes(self) -> tuple[int, list[int]]:
        """Bytes of the weights stored once, and per member."""
        raise NotImplementedError

    @property
    def _shares_method(self) -> bool:
        """True when one fitted method serves every member (its cache is counted once)."""
        return False

    def with_method(self, method: MethodFactory) -> Ensemble:
        """The same members (models, masks or trained adapters, and their training cost) attributed with another
        method (a factory ``(model, member) -> method``); nothing is retrained. Call ``fit`` on the result."""
        new = copy.copy(self)
        new.__dict__.pop("_keep", None)  # not fitted: fit(train) first
        new._factory = check_factory(method)
        new.methods, new.member_scores = [], []
        new.cost = EnsembleCost(self.cost.shared_training, list(self.cost.member_training))
        return new

    # -- the loop, written once ----------------------------------------------------------------------------------
    def _build(self, member: int) -> Method:
        method = self._factory(self._model(member), member)
        for verb in ("fit", "score", "self_scores", "cache_bytes"):
            if not callable(getattr(method, verb, None)):
                raise TypeError(f"the method factory returned a {type(method).__name__} without {verb}()")
        return method

    def fit(self, train: Dataset | DataLoader, *, keep: bool = True) -> Ensemble:
        """Train the members' weights if needed, then ``fit`` every member's method on ``train``.

        ``keep=False`` holds one fitted member at a time (peak memory of one member instead of K: K TRAK members
        with dense projections are K projection matrices): ``fit`` only trains the members' weights, and each
        ``score`` / ``self_scores`` call fits each member's method, uses it and drops it, paying the K fits again
        (their times go into ``cost.member_fit``). The scores are the same either way. A train-side cache shared
        by all members is one method and is always kept."""
        self._prepare(train)
        self._train, self._keep = train, keep or self._shares_method
        self.methods, self.member_scores = [], []
        self.cost.shared_fit, self.cost.member_fit, self.cost.member_score = 0.0, [0.0] * self.k, [0.0] * self.k
        self.cost.member_cache_bytes = [0] * self.k
        if self._keep:
            self.methods = [self._build(j) for j in range(self.k)]
            _check_stores([getattr(m, "store", None) for m in self.methods])
            for j, method in enumerate(self.methods):
                with self._member(j, method):
                    self.cost.member_fit[j] = timed(lambda m=method: m.fit(train), self.clock)[1]
        self._count_bytes()
        return self

    def _each_member(self, use: Callable[[Method], Any]) -> list[Any]:
        """``[use(method) for each member]``, each call inside its member's context, on the kept fitted methods or
        (``keep=False``) on each member's method built and fitted now and dropped before the next one is built (its
        fit time and cache bytes recorded)."""
        if not hasattr(self, "_keep"):
            raise RuntimeError(f"call {type(self).__name__}.fit(train) before scoring")
        results = []
        if self._keep:
            for j in range(self.k):
                method = self._method_of(j)
                with self._member(j, method):
                    results.append(use(method))
            return results
        stores: list[Store | None] = []
        for j in range(self.k):
            method = self._build(j)
            stores.append(getattr(method, "store", None))
            _check_stores(stores)
            with self._member(j, method):
                self.cost.member_fit[j] = timed(lambda m=method: m.fit(self._train), self.clock)[1]
                results.append(use(method))
            self.cost.member_cache_bytes[j] = method.cache_bytes()
            del method  # before the next member is built: one fitted member in memory at a time
        return results

    def score(self, queries: Dataset | DataLoader) -> Scores:
        """The mean of the K members' scores ``(n_train, n_query)`` (positive = the training example helps)."""
        timings = self._each_member(lambda method: timed(lambda: method.score(queries), self.clock))
        self.member_scores, self.cost.member_score = [s for s, _ in timings], [t for _, t in timings]
        self._count_bytes()
        return self.first(self.k)

    def first(self, k: int) -> Scores:
        """The scores of an ensemble of the first ``k`` members (from the last ``score``), with their cost."""
        if not self.member_scores:
            raise RuntimeError("call score(queries) first")
        return self._wrap(Scores.average(self.member_scores[:k]), k, self.cost.prefix(k))

    def self_scores(self) -> Scores:
        """The mean of the members' self-scores ``(n_train, 1)`` (each computed inside its member's context)."""
        parts = self._each_member(lambda method: method.self_scores())
        out = self._wrap(Scores.average(parts), self.k, self.cost)
        out.method += ":self"
        return out

    def _count_bytes(self) -> None:
        """Weights, and the kept methods' caches (without ``keep`` each member's is recorded as it is used)."""
        cost = self.cost
        cost.shared_weight_bytes, cost.member_weight_bytes = self._weight_bytes()
        if not self._keep:
            cost.shared_cache_bytes = 0
            if len(cost.member_cache_bytes) != self.k:
                cost.member_cache_bytes = [0] * self.k
        elif self._shares_method:
            cost.shared_cache_bytes, cost.member_cache_bytes = self.methods[0].cache_bytes(), [0] * self.k
        else:
            cost.shared_cache_bytes, cost.member_cache_bytes = 0, [m.cache_bytes() for m in self.methods]

    def _wrap(self, mean: Scores, k: int, cost: EnsembleCost) -> Scores:
        member = mean.config["members"][0]["method"]
        config = {"ensemble": self.kind, "k": k, "average": "mean of the members' score matrices",
                  **self._settings(), "cost": cost.as_dict(), "members": mean.config["members"]}
        return Scores(mean.values, mean.train_ids, mean.query_ids, f"{self.kind}-ensemble[{member}]", config)

    # -- costs as attributes -------------------------------------------------------------------------------------
    @property
    def training_seconds(self) -> float | None:
        return self.cost.training_seconds

    @property
    def serving_seconds(self) -> float:
        return self.cost.serving_seconds

    @property
    def stored_bytes(self) -> int:
        return self.cost.stored_bytes


def _check_stores(stores: Sequence[Store | None]) -> None:
    """Members writing into one store directory would read each other's caches (their metadata cannot tell members
    apart when they share weights): refuse."""
    roots: dict[str, int] = {}
    for j, store in enumerate(stores):
        if store is None:
            continue
        root = str(getattr(store, "root", store))
        if root in roots:
            raise DataError(f"ensemble members {roots[root]} and {j} use the same store {root}; give each member its "
                            "own store (the factory gets the member index) or none")
        roots[root] = j
