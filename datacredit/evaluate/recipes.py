"""Recipes: how to retrain a model from scratch on a subset of the training data, and what to measure on queries.

A recipe is any picklable object (a top-level class, so worker processes can import it) with

* ``measures``: the names of the per-query quantities ``evaluate`` returns, e.g. ``("loss", "margin")``;
* ``train(dataset, seed) -> nn.Module``: train a fresh model on ``dataset``; the same ``(dataset, seed)`` must give
  the same model (all randomness drawn from ``seed``, never from global state left behind);
* ``evaluate(model, queries) -> dict[str, np.ndarray]``: for every name in ``measures`` a ``(n_query,)`` array.

Its settings are written into the ground truth's manifest (``recipe_config``) so a resumed build with a changed
recipe is refused: a dataclass is described by its fields, any other recipe by its ``config()`` method.

Sign of a measure (``measure_sign``): ``-1`` when lower is better (``"loss"``), ``+1`` when higher is better
(``"margin"``, ``"accuracy"``); metrics multiply outputs by it so that "larger = the query is served better".
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..dataset import ArrayDataset
from ..errors import DataError
from ..models import TinyGPT, mlp
from ..task import LanguageModelingTask
from ..training import Callback, train, train_classifier

__all__ = ["ClassifierRecipe", "LMRecipe", "LeastSquaresRecipe", "Recipe", "measure_sign", "recipe_config"]

_SIGNS = {"loss": -1, "margin": 1, "accuracy": 1}
_EVAL_BATCH = 4096
_LM_EVAL_BATCH = 1024  # the batches LMRecipe has always evaluated in (results equal to earlier runs, bit for bit)


@runtime_checkable
class Recipe(Protocol):
    """What the ground-truth builders call; see the module docstring."""

    measures: tuple[str, ...]

    def train(self, dataset: Dataset, seed: int) -> nn.Module: ...

    def evaluate(self, model: nn.Module, queries: Dataset) -> dict[str, np.ndarray]: ...


def measure_sign(measure: str, higher_is_better: bool | None = None) -> int:
    """``+1`` if larger values of ``measure`` are better for the query, ``-1`` if smaller are (a loss).

    Known: ``loss`` (-1), ``margin`` and ``accuracy`` (+1); any other measure needs ``higher_is_better``.
    """
    if higher_is_better is not None:
        return 1 if higher_is_better else -1
    if measure not in _SIGNS:
        raise DataError(f"unknown direction of measure {measure!r}; pass higher_is_better=True/False "
                        f"(known: {sorted(_SIGNS)})")
    return _SIGNS[measure]


def recipe_config(recipe: Any) -> dict[str, Any]:
    """JSON description of a recipe: its class path and settings (dataclass fields, or ``recipe.config()``)."""
    cls = type(recipe)
    if hasattr(recipe, "config") and callable(recipe.config):
        params = recipe.config()
    elif dataclasses.is_dataclass(recipe):
        params = dataclasses.asdict(recipe)
    else:
        raise DataError(f"recipe {cls.__qualname__} must be a dataclass or define config() -> dict (JSON), so a "
                        "resumed build can detect changed settings")
    try:
        params = json.loads(json.dumps(params))
    except (TypeError, ValueError) as exc:
        raise DataError(f"recipe {cls.__qualname__}: settings are not JSON-serialisable ({exc})") from exc
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "params": params}


def check_recipe(recipe: Any) -> tuple[str, ...]:
    """The recipe's measures as a tuple of unique names; DataError if it lacks part of the Recipe protocol."""
    missing = [a for a in ("measures", "train", "evaluate") if not hasattr(recipe, a)]
    if missing:
        raise DataError(f"{type(recipe).__name__} is not a recipe: it lacks {', '.join(missing)}")
    measures = tuple(recipe.measures)
    if not measures or len(set(measures)) != len(measures) or not all(isinstance(m, str) for m in measures):
        raise DataError(f"recipe measures must be unique non-empty names, got {recipe.measures!r}")
    return measures


def _tensors(dataset: Dataset, what: str) -> tuple[torch.Tensor, ...]:
    tensors = getattr(dataset, "tensors", None)
    if tensors is None:
        raise DataError(f"{what} must be an ArrayDataset (tensors (x, y)); got {type(dataset).__name__}")
    if len(tensors) != 2:
        raise DataError(f"{what} must hold exactly (x, y), got {len(tensors)} tensors")
    return tensors


def _batches(dataset: Dataset) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` batches in order: slices of an ArrayDataset's tensors, else a sequential DataLoader."""
    if isinstance(dataset, ArrayDataset):
        x, y = _tensors(dataset, "queries")
        for start in range(0, len(x), _EVAL_BATCH):
            yield x[start : start + _EVAL_BATCH], y[start : start + _EVAL_BATCH]
    else:
        for batch in DataLoader(dataset, batch_size=_EVAL_BATCH, shuffle=False):
            yield batch[0], batch[1]


@dataclasses.dataclass(frozen=True)
class ClassifierRecipe:
    """An MLP (``datacredit.models.mlp(d_in, hidden, d_out)``; ``hidden=()`` is logistic regression) trained by
    :func:`datacredit.training.train_classifier`: mini-batch SGD, momentum 0.9, cross-entropy, ``epochs`` passes.

    Data: an ``ArrayDataset(x (n, d_in) float, y (n,) int64)``; the model takes ``x``'s dtype.
    Seed: drives the initialisation (in a forked torch RNG, so the caller's global RNG is untouched), dropout and
    the batch order.
    Measures per query, shape ``(n_query,)``: ``"loss"`` = cross-entropy (lower is better) and ``"margin"`` =
    ``logit_y − logsumexp(other logits)`` (higher is better; > 0 iff the query is classified correctly).
    """

    d_in: int
    d_out: int
    hidden: tuple[int, ...] = ()
    epochs: int = 30
    lr: float = 0.05
    batch_size: int = 64
    dropout: float = 0.0

    measures: ClassVar[tuple[str, ...]] = ("loss", "margin")

    def __post_init__(self) -> None:
        hidden = (self.hidden,) if isinstance(self.hidden, int) else tuple(int(h) for h in self.hidden)
        object.__setattr__(self, "hidden", hidden)
        if min(self.d_in, self.d_out, self.epochs, self.batch_size, *hidden, 1) < 1:
            raise ValueError(f"ClassifierRecipe: sizes and epochs must be positive, got {self}")
        if not self.lr > 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"ClassifierRecipe: need lr > 0 and 0 <= dropout < 1, got {self}")

    def build(self) -> nn.Module:
        """A freshly initialised model (from the global torch RNG: seed it or fork it first)."""
        return mlp(self.d_in, list(self.hidden), self.d_out, self.dropout)

    def train(self, dataset: Dataset, seed: int, callbacks: Sequence[Callback] = (),
              progress: bool = False) -> nn.Module:
        """Train a fresh model on ``dataset`` (an ArrayDataset ``(x, y)``); deterministic given ``seed``.

        callbacks: :mod:`datacredit.training` callbacks (In-Run values, checkpoints); they do not change the model."""
        x, _ = _tensors(dataset, "training data")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.build().to(x.dtype)
            return train_classifier(model, dataset, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                                    seed=seed, callbacks=callbacks, progress=progress)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, queries: Dataset) -> dict[str, np.ndarray]:
        """``{"loss": (Q,), "margin": (Q,)}`` in float64 for the model in eval mode."""
        model.eval()
        losses, margins = [], []
        for x, y in _batches(queries):
            logits = model(x).double()
            losses.append(F.cross_entropy(logits, y, reduction="none"))
            correct = logits.gather(1, y[:, None]).squeeze(1)
            others = logits.scatter(1, y[:, None], float("-inf")).logsumexp(1)
            margins.append(correct - others)
        return {"loss": torch.cat(losses).numpy(), "margin": torch.cat(margins).numpy()}


@dataclasses.dataclass(frozen=True)
class LMRecipe:
    """A character-level :class:`~datacredit.models.TinyGPT` trained with Adam on next-character prediction.

    Data: a :class:`~datacredit.data.CharDataset` (or an ArrayDataset of ``(n, seq_len + 1)`` token ids).
    Loss per example: the mean next-character cross-entropy of the sequence (``LanguageModelingTask()``); a
    mini-batch's loss is the mean over its sequences. Seed: initialisation and batch order, as ClassifierRecipe.
    Measure per query, shape ``(n_query,)``: ``"loss"`` (lower is better). Picklable (a frozen dataclass of numbers).
    """

    vocab_size: int
    seq_len: int
    d: int = 32
    n_layers: int = 2
    n_heads: int = 2
    tied: bool = False
    epochs: int = 8
    lr: float = 1e-2
    batch_size: int = 32

    measures: ClassVar[tuple[str, ...]] = ("loss",)

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.seq_len, self.d, self.n_layers, self.n_heads, self.epochs, self.batch_size) < 1:
            raise ValueError(f"LMRecipe: sizes and epochs must be positive, got {self}")
        if self.d % self.n_heads or not self.lr > 0:
            raise ValueError(f"LMRecipe: need d divisible by n_heads and lr > 0, got {self}")

    def build(self) -> nn.Module:
        """A freshly initialised TinyGPT (from the global torch RNG: seed or fork it first)."""
        return TinyGPT(self.vocab_size, d=self.d, n_layers=self.n_layers, n_heads=self.n_heads,
                       max_len=self.seq_len, tied=self.tied)

    def train(self, dataset: Dataset, seed: int, callbacks: Sequence[Callback] = (),
              progress: bool = False) -> nn.Module:
        """Train a fresh TinyGPT on ``dataset``; deterministic given ``seed`` (the caller's RNG is untouched)."""
        _lm_tokens(dataset)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.build()
            opt = torch.optim.Adam(model.parameters(), lr=self.lr)
            return train(model, dataset, optimizer=opt, loss=_lm_loss, epochs=self.epochs,
                         batch_size=self.batch_size, seed=seed, callbacks=callbacks, progress=progress)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, queries: Dataset) -> dict[str, np.ndarray]:
        """``{"loss": (Q,)}``: each query sequence's mean next-character cross-entropy, float64, eval mode."""
        model.eval()
        tokens = _lm_tokens(queries)
        task = LanguageModelingTask()
        losses = [task.loss(model, (tokens[s : s + _LM_EVAL_BATCH],)).double()
                  for s in range(0, len(tokens), _LM_EVAL_BATCH)]
        return {"loss": torch.cat(losses).numpy()}


def _lm_tokens(dataset: Dataset) -> torch.Tensor:
    tensors = getattr(dataset, "tensors", None)
    if tensors is None:
        raise DataError(f"LMRecipe needs an ArrayDataset of token ids, got {type(dataset).__name__}")
    return tensors[0]


def _lm_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return LanguageModelingTask().loss(model, (batch[0],)).mean()


@dataclasses.dataclass(frozen=True)
class LeastSquaresRecipe:
    """Linear regression solved exactly in float64: ``θ = argmin ‖Xθ − y‖² + ridge ‖θ‖²`` (no intercept; add a
    column of ones to ``x`` for one). Deterministic: ``seed`` is ignored. The exact reference for leave-one-out.

    Data: an ``ArrayDataset(x (n, d) float, y (n,) float)``. Returns a bias-free float64 ``nn.Linear(d, 1)``.
    Measures per query, shape ``(n_query,)``: ``"loss"`` = ``(x_qᵀθ − y_q)²`` (lower is better) and
    ``"prediction"`` = ``x_qᵀθ`` (no direction).
    """

    ridge: float = 0.0

    measures: ClassVar[tuple[str, ...]] = ("loss", "prediction")

    def __post_init__(self) -> None:
        if not self.ridge >= 0:
            raise ValueError(f"LeastSquaresRecipe: ridge must be >= 0, got {self.ridge}")

    def train(self, dataset: Dataset, seed: int) -> nn.Module:
        x, y = (t.double() for t in _tensors(dataset, "training data"))
        if self.ridge > 0:
            gram = x.T @ x + self.ridge * torch.eye(x.shape[1], dtype=x.dtype)
            theta = torch.linalg.solve(gram, x.T @ y)
        else:
            theta = torch.linalg.lstsq(x, y[:, None], driver="gelsd").solution.squeeze(1)
        model = nn.Linear(x.shape[1], 1, bias=False, dtype=torch.float64)
        with torch.no_grad():
            model.weight.copy_(theta[None, :])
        return model.eval()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, queries: Dataset) -> dict[str, np.ndarray]:
        preds, losses = [], []
        for x, y in _batches(queries):
            pred = model(x.double()).squeeze(-1)
            preds.append(pred)
            losses.append((pred - y.double()) ** 2)
        return {"loss": torch.cat(losses).numpy(), "prediction": torch.cat(preds).numpy()}
