"""Independent ensemble: K models trained from K seeds by the user's recipe, one method per model, scores averaged.

The expensive reference the dropout and LoRA ensembles are measured against (TRAK's ensembles; Deng et al. 2024).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..methods.base import configure
from .base import Ensemble, MethodFactory, check_k, config_settings, timed, weight_bytes


@dataclass(frozen=True)
class IndependentConfig:
    """k: members (None: as many as the models or seeds given). seeds: the seeds ``train_fn`` is called with (a
    tuple; default ``seed, seed + 1, …``). seed: the first default seed."""

    k: int | None = None
    seeds: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_k(self.k)
        if self.seeds is not None:
            object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
            if self.k is not None and self.k != len(self.seeds):
                raise ValueError(f"k={self.k} but {len(self.seeds)} seeds were given")


class IndependentEnsemble(Ensemble):
    """Either ``models=[m_1, …, m_K]`` (already trained; pass their ``training_seconds`` for the cost report) or
    ``train_fn(seed) -> model`` with ``k`` and ``seeds`` (default ``seed, seed + 1, …``): the models are trained (and
    timed) at the first ``fit``.

    method: a factory ``(model, member) -> method`` (the member index e.g. gives each member its own projection
    seed; see :data:`~datacredit.ensembles.base.MethodFactory`). config: an :class:`IndependentConfig` (k, seeds,
    seed), or its fields as keywords (not both). The models are never modified.
    """

    kind = "independent"

    def __init__(self, method: MethodFactory, models: Sequence[nn.Module] | None = None, *,
                 train_fn: Callable[[int], nn.Module] | None = None, config: IndependentConfig | None = None,
                 training_seconds: Sequence[float] | None = None, **settings: Any):
        self.config = config = configure(IndependentConfig, config, settings)
        k, seeds, seed = config.k, config.seeds, config.seed
        if (models is None) == (train_fn is None):
            raise ValueError("pass either models=[...] or train_fn=(seed -> model) with k")
        if models is not None:
            models = list(models)
            k = len(models) if k is None else k
            if k != len(models):
                raise ValueError(f"k={k} but {len(models)} models were given")
            if training_seconds is not None and len(training_seconds) != len(models):
                raise ValueError(f"{len(training_seconds)} training times for {len(models)} models")
            seeds = None
        else:
            if seeds is not None:
                seeds = list(seeds)
                k = len(seeds)
            elif k is None:
                raise ValueError("pass k (or seeds) with train_fn")
            else:
                seeds = [int(seed) + j for j in range(int(k))]
        super().__init__(method, int(k))
        self.models: list[nn.Module] | None = models
        self.train_fn, self.seeds = train_fn, seeds
        self.cost.shared_training = 0.0
        self.cost.member_training = ([None] * self.k if training_seconds is None
                                     else [float(t) for t in training_seconds])

    def _prepare(self, train: Dataset | DataLoader) -> None:
        if self.models is not None:
            return
        models, seconds = [], []
        for s in self.seeds:
            model, sec = timed(lambda s=s: self.train_fn(s), self.clock)
            if not isinstance(model, nn.Module):
                raise TypeError(f"train_fn({s}) returned a {type(model).__name__}, not an nn.Module")
            models.append(model)
            seconds.append(sec)
        self.models, self.cost.member_training = models, seconds

    def _model(self, member: int) -> nn.Module:
        return self.models[member]

    def _settings(self) -> dict[str, Any]:
        return {**config_settings(self.config), "seeds": self.seeds}

    def _weight_bytes(self) -> tuple[int, list[int]]:
        return 0, [weight_bytes(m) for m in self.models]
