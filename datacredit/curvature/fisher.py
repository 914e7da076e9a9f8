"""What the factored curvatures are fitted on: the observed labels (empirical Fisher) or sampled ones (true Fisher).

``"empirical"`` — the task's training loss: ``(1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ`` at the observed labels. Simple, but near a
minimum the well-fit examples contribute almost nothing, so it can be far from the Hessian.

``"true"`` — labels drawn from the model's own predictive distribution, ``ŷ_i ~ p_θ(· | x_i)``, one draw per example
(as kronfluence does by default): ``(1/N) Σ_i ∇ℓ(x_i, ŷ_i) ∇ℓ(x_i, ŷ_i)ᵀ`` is an unbiased estimate of the Fisher,
which for cross-entropy equals the Gauss–Newton matrix (for a linear model: the Hessian itself). Each draw is a pure
function of ``(seed, example id)``, so both EK-FAC passes, every batch size and every rank see the same labels.

A task supports ``"true"`` by being a :class:`~datacredit.task.ClassificationTask` or by defining
``sampled_loss(model, batch, uniforms) -> (N,)``, where ``uniforms`` ``(N,)`` in ``[0, 1)`` are the example's draws
(use them by inverse CDF).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..task import ClassificationTask, Task

FISHER_KINDS = ("empirical", "true")
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def uniforms(ids: np.ndarray, seed: int) -> np.ndarray:
    """One ``[0, 1)`` float64 per example id, a fixed function of ``(seed, id)`` (SplitMix64 of the pair)."""
    with np.errstate(over="ignore"):
        z = np.asarray(ids, dtype=np.int64).astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def sample_classes(logits: Tensor, u: Tensor) -> Tensor:
    """Classes ``(N,)`` drawn from ``softmax(logits)`` ``(N, C)`` by inverse CDF of the uniforms ``u`` ``(N,)``."""
    cdf = logits.detach().double().softmax(-1).cumsum(-1)
    return (cdf < u.to(cdf.device, cdf.dtype)[:, None]).sum(-1).clamp(max=logits.shape[-1] - 1)


def check_fisher(kind: str, task: Task) -> None:
    if kind not in FISHER_KINDS:
        raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {kind!r}")
    if kind == "true" and not (isinstance(task, ClassificationTask) or hasattr(task, "sampled_loss")):
        raise ValueError(f"fisher='true' needs a ClassificationTask or a task with sampled_loss(model, batch, "
                         f"uniforms); {type(task).__name__} has neither")


def sampled_loss(task: Task, model: nn.Module, batch: Any, ids: np.ndarray, seed: int) -> Tensor:
    """Per-example loss ``(N,)`` at labels sampled from the model (see the module doc)."""
    u = torch.as_tensor(uniforms(ids, seed))
    if hasattr(task, "sampled_loss"):
        return task.sampled_loss(model, batch, u)
    out = model(batch[0])
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits, sample_classes(logits, u), reduction="none")
