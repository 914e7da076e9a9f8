"""In-Run Data Shapley inside a ``transformers.Trainer``, as a callback.

Each training example must carry its id under ``id_key`` (default ``"example_id"``) in the batch dict the Trainer gives
the model; a forward pre-hook takes it out before the model sees it. With a ``datasets.Dataset`` set
``remove_unused_columns=False`` (the Trainer would drop the column). GPT-2's default position ids ``(1, T)`` are shared
by the batch: put per-example ``position_ids`` in the batch, or leave ``wpe`` out of ``Task.tracked_modules``.

The Trainer clips gradients before the optimizer step; the callback takes clipping over (``max_grad_norm`` is applied
through :meth:`InRunShapley.clip_grad_norm_`) so each example's share is clipped by the same factor as the update.

Mixed precision: under ``fp16=True`` accelerate scales the loss with a ``GradScaler`` (the wrapped optimizer's
``scaler``); the callback hands it to :class:`InRunShapley`, which divides the captured gradients by the scale and
adds nothing for steps the scaler skips, and unscales before clipping (as accelerate does). ``bf16`` needs no scaler.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from ..methods.inrun import InRunShapley
from ..task import Task


class InRunShapleyCallback(TrainerCallback):
    """``Trainer(..., callbacks=[cb := InRunShapleyCallback(task, validation)])``; after ``train()``, ``cb.values()``.

    task: per-example loss / validation measurement (e.g. ``LanguageModelingTask()``; the Trainer's own loss drives
    training, the task is used for the validation side). validation: a batch or Dataset, as for InRunShapley.
    options: further keywords of :class:`InRunShapley` (``validation_subsample``, ``seed``, ``streaming``, ...).
    """

    def __init__(self, task: Task, validation: Any, *, order: int = 1, targeted: bool = False,
                 keep_history: bool = False, id_key: str = "example_id", **options: Any):
        self.task, self.validation, self.id_key = task, validation, id_key
        self.options = {"order": order, "targeted": targeted, "keep_history": keep_history, **options}
        self.shapley: InRunShapley | None = None
        self._hook = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._max_norm = 0.0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("InRunShapleyCallback needs the Trainer's model and optimizer at on_train_begin")
        scaler = getattr(optimizer, "scaler", None)  # accelerate's GradScaler under fp16 (None otherwise)
        while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps the real one
        self._optimizer = optimizer
        self.shapley = InRunShapley(model, self.task, self.validation, optimizer, scaler=scaler, **self.options)
        self._max_norm, args.max_grad_norm = args.max_grad_norm, 0.0  # we clip, so the shares see the factor
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        ids = kwargs.pop(self.id_key, None)
        if ids is None or not (module.training and torch.is_grad_enabled()):
            return args, kwargs
        self.shapley.finish()  # the previous micro-batch's backward is done once the next forward starts
        self.shapley.begin(ids)
        return args, kwargs

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._max_norm and self._max_norm > 0:
            scaler = self.shapley.scaler
            if scaler is not None and scaler.is_enabled():
                scaler.unscale_(self._optimizer)  # clip the true gradients; scaler.step will not unscale twice
            self.shapley.clip_grad_norm_(self._max_norm)

    def on_train_end(self, args, state, control, **kwargs):
        args.max_grad_norm = self._max_norm
        if self._hook is not None:
            self._hook.remove()
        if self.shapley is not None:
            self.shapley.finish()
            self.shapley.close()

    def values(self):
        """The accumulated values as :class:`~datacredit.Scores` (see :meth:`InRunShapley.values`)."""
        if self.shapley is None:
            raise RuntimeError("no training has run with this callback yet")
        return self.shapley.values()
