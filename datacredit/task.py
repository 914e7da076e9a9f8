"""What the user tells datacredit about a model: the per-example training loss, the query measurement, the modules.

Subclass :class:`Task` (as in kronfluence) or use :class:`ClassificationTask` / :class:`LanguageModelingTask`.
Sign convention: scores credit *decreases* of the measurement. The default measurement is the loss, so a positive score
means the training example lowers the query's loss. To credit an increase of something (a margin), return its negation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DataError


class Task:
    """Subclass and implement :meth:`loss`; override :meth:`measurement` and :meth:`tracked_modules` as needed."""

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Per-example training loss, shape ``(N,)``, not reduced (the training objective is its mean or sum).

        The capture engine checks the shape against the batch its tracked modules saw (batch dimension first) and
        raises :class:`~datacredit.errors.DataError` naming both: one value too few would credit the last example
        with exactly zero."""
        raise NotImplementedError

    def measurement(self, model: nn.Module, batch: Any) -> Tensor:
        """Per-example query quantity ``(N,)`` whose decrease the scores credit; default: the loss."""
        return self.loss(model, batch)

    def tracked_modules(self, model: nn.Module) -> list[str] | None:
        """Paths of modules whose parameters are attributed; ``None`` = every module with trainable parameters."""
        return None


def _logits(output: Any) -> Tensor:
    # transformers models return an output object with .logits; plain torch models return the tensor.
    return output.logits if hasattr(output, "logits") else output


class ClassificationTask(Task):
    """Batches are ``(x, y)``; the loss is cross-entropy per example.

    measurement: ``"loss"`` (default) or ``"margin"`` — TRAK's ``log p_y − log(1 − p_y)``, returned negated so that
    a positive score still means the training example helps (raises the query's margin).
    """

    def __init__(self, measurement: str = "loss", modules: list[str] | None = None):
        if measurement not in ("loss", "margin"):
            raise ValueError(f"measurement must be 'loss' or 'margin', got {measurement!r}")
        self.kind = measurement
        self.modules = modules

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        x, y = batch[0], batch[1]
        logits = _logits(model(x))
        if y.dtype != torch.long or y.shape != logits.shape[:1]:
            raise DataError(f"ClassificationTask: labels must be int64 class indices of shape ({logits.shape[0]},), "
                            f"got {y.dtype} of shape {tuple(y.shape)}")
        # cross-entropy by hand: the same numbers as F.cross_entropy (nll_loss is this gather), but vmap and
        # forward-mode AD (In-Run's replay route) run it as two kernels instead of nll_loss's Python decomposition
        return -logits.log_softmax(-1).gather(1, y[:, None]).squeeze(1)

    def measurement(self, model: nn.Module, batch: Any) -> Tensor:
        if self.kind == "loss":
            return self.loss(model, batch)
        x, y = batch[0], batch[1]
        logits = _logits(model(x))
        correct = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf")).logsumexp(1)
        return -(correct - others)

    def tracked_modules(self, model: nn.Module) -> list[str] | None:
        return self.modules


class LanguageModelingTask(Task):
    """Batches are token ids ``(N, T+1)`` (or a 1-tuple of them); loss = next-token cross-entropy per sequence.

    reduction: ``"mean"`` over a sequence's predicted tokens (default) or ``"sum"``. Targets equal to ``ignore_index``
    are skipped. position_ids: pass ``position_ids`` of shape ``(N, T)`` to the model (transformers models), so the
    position embedding sees a batch dimension; their default ``(1, T)`` ids are shared by the batch and have no
    per-example gradient. A dict batch uses ``batch["input_ids"]``.
    """

    def __init__(self, reduction: str = "mean", ignore_index: int = -100, modules: list[str] | None = None,
                 position_ids: bool = False):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction, self.ignore_index, self.modules = reduction, ignore_index, modules
        self.position_ids = position_ids

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        if isinstance(batch, dict):
            tokens = batch["input_ids"]
        else:
            tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if self.position_ids:
            positions = torch.arange(inputs.shape[1], device=inputs.device).expand(inputs.shape[0], -1)
            logits = _logits(model(input_ids=inputs, position_ids=positions))
        else:
            logits = _logits(model(inputs))
        per_token = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none", ignore_index=self.ignore_index
        ).reshape(targets.shape)
        total = per_token.sum(1)
        if self.reduction == "sum":
            return total
        return total / (targets != self.ignore_index).sum(1).clamp(min=1).to(total.dtype)

    def tracked_modules(self, model: nn.Module) -> list[str] | None:
        return self.modules


def map_tensors(fn: Callable[[Tensor], Any], batch: Any, refuse: str | None = None) -> Any:
    """``fn`` applied to every tensor of a (nested: tuple, list, dict) batch, the structure kept. Anything else is
    kept as it is, or, with ``refuse`` (what the caller cannot do), a ValueError naming its type."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(fn, x, refuse) for x in batch)
    if isinstance(batch, dict):
        return {k: map_tensors(fn, v, refuse) for k, v in batch.items()}
    if refuse is not None:
        raise ValueError(f"{refuse} {type(batch).__name__}")
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of a (nested: tuple, list, dict) batch on ``device``; anything else as it is."""
    return map_tensors(lambda t: t.to(device), batch)


def batch_size(batch: Any) -> int:
    """Number of examples in a batch: the first dimension of its first tensor."""
    first = batch
    while isinstance(first, (tuple, list)):
        first = first[0]
    if isinstance(first, dict):
        first = next(iter(first.values()))
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"cannot find the batch size of a {type(batch).__name__}")
    return first.shape[0]
