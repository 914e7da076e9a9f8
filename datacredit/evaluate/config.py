"""What an evaluation is, and how it runs: one frozen config per evaluation, one shared :class:`Execution`.

* The experiment config says what is retrained and measured — :class:`SubsetConfig` (``build_groundtruth``),
  :class:`LOOConfig` (``build_loo``), :class:`RemovalConfig` (``removal``), :class:`SelectionConfig`
  (``selection``). Its fields go into the manifest of what the build writes (next to the recipe's settings and
  the data's digests), and a resumed build with a different one is refused, naming each differing field.
* :class:`Execution` says how the retrainings run — workers, backend, progress bars, waiting for another build,
  overwriting a store. It never changes a result (backends agree up to float rounding from torch's thread count),
  so a build may resume under another one; each call's Execution is recorded in the store's ``execution``
  artefact, a list with one entry per call.

Every evaluation takes ``config=`` and ``execution=`` or their fields as keywords (the keyword form builds the same
objects: ``build_groundtruth(..., m=8, workers=2)`` is ``config=SubsetConfig(m=8), execution=Execution(workers=2)``);
a config and its own fields at once is a TypeError naming the fields, as for methods (``methods.base.configure``).
The recipe stays an argument: it is code (``train`` / ``evaluate``), described in the manifest by ``recipe_config``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from ..methods.base import configure
from .recipes import measure_sign

__all__ = ["BACKENDS", "Execution", "LOOConfig", "RemovalConfig", "SelectionConfig", "SubsetConfig", "configure_run",
           "manifest_fields"]

C = TypeVar("C")
BACKENDS = ("serial", "process", "ray")


def _at_least(name: str, value: Any, low: int) -> int:
    if int(value) != value or int(value) < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalize a frozen field in __post_init__ (int, float, tuple)


@dataclass(frozen=True)
class Execution:
    """How retrainings run; never what they compute.

    workers: parallel worker processes (``backend="process"``; 1 = in this process). backend: ``"process"``,
    ``"serial"`` (this process) or ``"ray"`` (one Ray task per job). progress: tqdm bars. wait: if another process
    is building in the same store, wait for it and run what it leaves (default: LockedError naming it at once).
    overwrite: replace whatever the store directory holds (default: refuse, naming it).
    """

    workers: int = 1
    backend: str = "process"
    progress: bool = True
    wait: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        _set(self, "workers", _at_least("workers", self.workers, 1))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("progress", "wait", "overwrite"):
            _set(self, name, bool(getattr(self, name)))


@dataclass(frozen=True)
class SubsetConfig:
    """Subset ground truth: ``m`` random subsets of ``round(alpha · n_train)`` examples (``default_rng(seed)``),
    each retrained ``seeds`` times. ``m >= 3`` (rank correlations need three points)."""

    m: int = 100
    alpha: float = 0.5
    seeds: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _set(self, "m", _at_least("m (random subsets, for rank correlations)", self.m, 3))
        _set(self, "seeds", _at_least("seeds", self.seeds, 1))
        _set(self, "seed", int(self.seed))
        _set(self, "alpha", float(self.alpha))
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be strictly between 0 and 1, got {self.alpha}")


@dataclass(frozen=True)
class LOOConfig:
    """Leave-one-out ground truth: retrain without each training example at positions ``indices`` (None: all),
    and once on the full data, ``seeds`` times each (training seeds from ``seed``). The manifest records
    ``n_removed``; the removed ids are stored as an array and compared on resume."""

    indices: tuple[int, ...] | None = None
    seeds: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _set(self, "seeds", _at_least("seeds", self.seeds, 1))
        _set(self, "seed", int(self.seed))
        if self.indices is not None:
            idx = tuple(int(i) for i in self.indices)
            if not idx or min(idx) < 0 or len(set(idx)) != len(idx):
                raise ValueError(f"indices must be unique non-negative positions, got {list(idx[:10])}...")
            _set(self, "indices", idx)


@dataclass(frozen=True)
class RemovalConfig:
    """Counterfactual removal: for ``n_queries`` queries (a seeded sample; None = all), retrain without their ``k``
    top-scored training examples and without ``k`` random ones, ``seeds`` times each; compare on ``measure``."""

    k: int = 10
    n_queries: int | None = 20
    seeds: int = 1
    seed: int = 0
    measure: str = "loss"

    def __post_init__(self) -> None:
        _set(self, "k", _at_least("k", self.k, 1))
        if self.n_queries is not None:
            _set(self, "n_queries", _at_least("n_queries", self.n_queries, 1))
        _set(self, "seeds", _at_least("seeds", self.seeds, 1))
        _set(self, "seed", int(self.seed))
        try:
            measure_sign(self.measure)
        except Exception as exc:
            raise ValueError(f"measure: {exc}") from None


@dataclass(frozen=True)
class SelectionConfig:
    """Data selection: train on the ``round(fraction · n)`` highest-valued examples vs as many random ones
    (``default_rng(seed)``), ``seeds`` times each."""

    fraction: float = 0.5
    seeds: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _set(self, "fraction", float(self.fraction))
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction must be strictly between 0 and 1, got {self.fraction}")
        _set(self, "seeds", _at_least("seeds", self.seeds, 1))
        _set(self, "seed", int(self.seed))


def configure_run(config_class: type[C], config: C | None, execution: Execution | None,
                  settings: dict[str, Any]) -> tuple[C, Execution]:
    """An evaluation's ``(config, execution)`` from the objects given or from keyword ``settings``, each keyword
    going to the dataclass that has it as a field. TypeError naming the keyword for an unknown one, for a
    config and its own fields at once, and for an object of the wrong class."""
    own = {f.name for f in fields(config_class)}
    run = {f.name for f in fields(Execution)}
    unknown = sorted(set(settings) - own - run)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}: {config_class.__name__} holds {sorted(own)}, "
                        f"Execution holds {sorted(run)}")
    return (configure(config_class, config, {k: v for k, v in settings.items() if k in own}),
            configure(Execution, execution, {k: v for k, v in settings.items() if k in run}))


def manifest_fields(config: Any, *, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config's fields as they go into a manifest (JSON: tuples become lists), without ``leave_out``."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items() if k not in leave_out}
