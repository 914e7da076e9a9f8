"""In-Run Data Shapley (Wang, Mittal, Song, Jia; ICLR 2025), computed while the model trains.

At step t the optimizer moves ``θ_{t+1} = θ_t − D`` with ``D = c + Σ_{z∈B_t} x_z``: ``x_z = s ⊙ g_z`` is example z's
share (``g_z`` its gradient contribution to the batch loss, ``s`` the learning rate times the optimizer's diagonal
preconditioner) and ``c`` the part no example of the batch caused (momentum, weight decay, untracked terms). The
utility of a subset S of the batch is the drop of the validation loss ``L`` when only S's shares are applied, relative
to applying none. Its second-order Taylor expansion is a quadratic game whose Shapley values are (Eq. 4–5 of the paper,
extended to a baseline ``c`` and a preconditioner):

    φ_z = ⟨g_val, x_z⟩ − x_zᵀ H_val (c + ½ Σ_{j∈B_t} x_j)  =  ⟨g_z, s ⊙ (g_val − H_val w)⟩,  w = c + ½ Σ_j x_j

The first term alone is first-order In-Run Shapley. Per step this costs one validation forward/backward (first order),
one Hessian-vector product (second order), and one val-gradient-first dot per tracked layer; the training backward is
the user's own (hooks read it, no extra backward). Values add over the steps in which z appears. Positive = z lowered
the validation loss. ``Σ_z φ_z`` over a step equals the Taylor utility of the whole batch (efficiency).

Momentum: z's share is what z put into *this* step's update; what the momentum buffer carries into later steps is part
of those steps' baseline ``c``, so it is not credited to z. Gradient clipping between ``backward`` and ``step`` would
rescale shares we cannot see: clip with :meth:`InRunShapley.clip_grad_norm_` so the factor is applied to the shares.

How a step is computed (exact unless a validation budget is asked for):

* **Streaming** (first order, SGD with or without momentum, every step after the first): ``s`` is one number per
  parameter group, so ``⟨g_z, s ⊙ g_val⟩ = s·⟨g_z, g_val⟩``. When the step's first micro-batch begins, the validation
  forward/backward runs at ``θ_t`` (the parameters the training forward is about to use); then each tracked layer's
  per-example dot ``⟨g_val, g_z⟩`` is taken inside that layer's backward hook, by ghost dots with the validation
  examples' factors or a val-first dot with the summed validation gradient (whichever the cost model prices lower),
  and reduced to ``(N,)`` at once: nothing per-example outlives its layer. ``s`` and clipping multiply the reduced
  dots at ``optimizer.step()``. The validation backward forms weight gradients only for the layers that took the
  val-first route on the previous step (ghost layers need only their output gradients); a layer that changes route
  gets its validation gradient summed from its pieces.
* **Deferred** (Adam/AdamW, second order, targeted, the first step): ``s`` is a tensor that depends on the finished
  batch gradient (Adam's ``v̂_t`` includes ``g_t²``; clipping and the loss scale change ``p.grad`` after the
  backward), or the weights need ``p.grad`` (second order). Each layer's factors are kept until the optimizer's
  pre-hook, where one val-first dot per layer with ``s ⊙ g_val`` (second order: ``s ⊙ (g_val − H_val w)``) gives
  the values. The summed validation gradient comes from one ordinary backward (no validation pieces).

Validation budget (``validation_subsample=k``): each step draws k of the n validation examples uniformly without
replacement (seeded by ``seed``) and scales their summed gradient (and, second order, their HVP) by ``n/k``. Both
terms are linear in the validation set, so the step's value is an unbiased estimate of the full-validation value;
for example z with per-validation-example values ``y_q`` (``φ_z = Σ_q y_q``) its variance is
``n²·(1 − k/n)·σ²/k`` with ``σ² = Σ_q (y_q − ȳ)²/(n − 1)``, and independent draws make the variances of the steps add.
Cost: the validation pass shrinks by ``k/n``, and ghost dots become the cheaper route for more layers. Low-rank
sketch (``validation_rank=r``, first order): a layer that would take the val-first route uses a rank-r randomized
sketch of ``s ⊙ g_val`` (``N·T·r·(m+n)`` instead of ``N·T·m·n``); biased, good where the validation gradient is close
to low rank (SGD on the benchmark GPT: 0.8 % relative error at r = 16) and poor for Adam, whose ``s`` destroys the low
rank (benchmarks/INRUN.md). Exact values need the defaults (``None``: the whole validation set every step).

Never silently wrong. On the first step the batch gradient ``p.grad`` of every tracked parameter must equal the sum of
the examples' captured gradients up to float rounding (measured against the sum of absolute terms); otherwise the step
raises naming the parameters (a weight used outside its module, a loss scaled by hand, a regularizer: pass
``unexplained_gradient="baseline"`` to treat the latter as part of the baseline ``c``). Parameters of untracked modules
are always baseline. The validation measurement goes through the same capture check once (it also catches a model
whose batch dimension is not first). Mixed precision: pass the ``torch.amp.GradScaler`` as ``scaler=``; captured
gradients are divided by its scale (a power of two: exact), and a step the scaler skips (inf/nan gradients) adds no
value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ..capture import Capture, ExampleGrads, example_grads
from ..capture.engine import _check_batch_dims, check_per_example, tolerance, unexplained
from ..capture.pieces import (
    CHUNK_ELEMENTS,
    Dense,
    Outer,
    Piece,
    ghost_cost,
    ghost_factors,
    ghost_total,
    low_rank,
    memo_key,
    piece_dot,
    piece_gram,
)
from ..capture.subnormals import Flushed, flushing
from ..dataset import example_ids
from ..errors import DataCreditError, DataError, NonFiniteError
from ..optimizers import affine_step, precondition, scalar_preconditioner, step_scale
from ..scores import Scores
from ..task import Task, batch_size, map_tensors
from .base import batches, configure
from .inrun_batched import DeferredSteps, PendingStep


@dataclass(frozen=True)
class InRunConfig:
    """The settings of :class:`InRunShapley` (each described there): order (1 or 2), targeted, keep_history,
    validation_batch_size, unexplained_gradient (``"raise"`` or ``"baseline"``), validation_subsample (None or k ≥ 1),
    seed, validation_rank (None or r ≥ 1; first order, untargeted), streaming, defer_steps (None or K ≥ 1), replay
    (None, ``"mean"`` or ``"sum"``; with defer_steps)."""

    order: int = 1
    targeted: bool = False
    keep_history: bool = False
    validation_batch_size: int = 256
    unexplained_gradient: str = "raise"
    validation_subsample: int | None = None
    seed: int = 0
    validation_rank: int | None = None
    streaming: bool = True
    defer_steps: int | None = None
    replay: str | None = None

    def __post_init__(self) -> None:
        if self.order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {self.order}")
        if self.unexplained_gradient not in ("raise", "baseline"):
            raise ValueError(f"unexplained_gradient must be 'raise' or 'baseline', got {self.unexplained_gradient!r}")
        if self.validation_batch_size < 1:
            raise ValueError(f"validation_batch_size must be positive, got {self.validation_batch_size}")
        if self.validation_rank is not None and (self.order != 1 or self.targeted or int(self.validation_rank) < 1):
            raise ValueError("validation_rank (a low-rank sketch of the validation gradient) is for first-order, "
                             f"untargeted values and must be ≥ 1; got {self.validation_rank} with order={self.order}, "
                             f"targeted={self.targeted}")
        if self.defer_steps is not None and (int(self.defer_steps) < 1 or self.order != 1 or self.targeted
                                             or self.validation_rank is not None):
            raise ValueError("defer_steps (values of K steps computed together) is for first-order, untargeted "
                             f"values and must be ≥ 1; got {self.defer_steps} with order={self.order}, targeted="
                             f"{self.targeted}, validation_rank={self.validation_rank}")
        if self.replay is not None and (self.defer_steps is None or self.replay not in ("mean", "sum")
                                        or self.unexplained_gradient != "raise"):
            raise ValueError("replay (recompute the dots of deferred steps from θ_t and the batch) needs defer_steps, "
                             "unexplained_gradient='raise', and 'mean' or 'sum' (how the training loss reduces "
                             f"task.loss over the batch); got replay={self.replay!r}, defer_steps={self.defer_steps}, "
                             f"unexplained_gradient={self.unexplained_gradient!r}")
        if self.validation_subsample is not None and self.targeted:
            raise ValueError("validation_subsample estimates the summed validation value; not with targeted=True")


class InRunShapley:
    """Per-example In-Run Data Shapley values, accumulated while training.

    ::

        shapley = InRunShapley(model, task, validation=val_batch, optimizer=opt, order=2)
        for ids, batch in loader:
            with shapley.step(ids):
                task.loss(model, batch).mean().backward()
            opt.step(); opt.zero_grad()          # values of this step are computed right before the update
        scores = shapley.values()               # Scores (n_seen, 1), or (n_seen, n_val) when targeted

    validation: a batch (anything ``task.measurement`` accepts) or a Dataset (iterated in ``validation_batch_size``).
    order: 1 or 2. targeted: one value per (training example, validation example) instead of the summed validation
    loss; costs one HVP per validation example per step when ``order=2``. keep_history: keep per-step values.
    Several ``step`` blocks before one ``optimizer.step()`` are micro-batches of one step (gradient accumulation).
    Under DistributedDataParallel each rank values its own examples; :meth:`values` gathers them.
    scaler: the ``torch.amp.GradScaler`` of the loop (``scaler.scale(loss).backward(); scaler.step(opt);
    scaler.update()``): values are those of unscaled training, skipped steps add nothing (``skipped`` counts them).
    unexplained_gradient: ``"raise"`` (default) if ``p.grad`` of a tracked parameter is not the examples' summed
    gradient on the first step, or ``"baseline"`` to count the difference (e.g. a regularizer added to the loss) as
    the step's baseline.
    validation_rank: ``None`` (default, exact). ``r``: first order only; every layer whose per-example dot would take
    the val-first route (``N·T·m·n``) uses a rank-r randomized sketch of ``s ⊙ g_val`` instead (``N·T·r·(m+n)``): an
    approximation, biased, its error the tail of the layer's singular values; the benchmark measures its fidelity.
    validation_subsample: ``None`` (default, exact): the whole validation set every step. ``k``: a fresh uniform
    sample of k validation examples per step, scaled by ``n_val/k``: an unbiased estimate of the exact value with
    variance ``n_val²(1 − k/n_val)σ²/k`` per step (module docstring), about ``k/n_val`` of the validation cost. Not
    with ``targeted``. seed: the sampler's seed.
    streaming: ``True`` (default) reduces first-order SGD values inside the backward (module docstring); ``False``
    keeps every layer's factors until ``optimizer.step()`` (the reference route: same values, more memory, slower).
    defer_steps: ``None`` (default): each step's values are computed at its ``optimizer.step()``. ``K``: for small
    models with SGD, the values of K steps are computed together (:mod:`.inrun_batched`: one vmapped validation
    gradient over K parameter snapshots, one batched dot per parameter), exact, with the per-step Python and
    dispatch cost shared by K steps; memory K snapshots of the model and K steps of layer inputs and output
    gradients. :meth:`values` and :meth:`close` compute what is pending. Other optimizers take the per-step route.
    With ``validation_subsample`` every deferred step gets its own uniform sample (drawn K at a time: unbiased, as
    on the per-step route, but other draws). replay: ``None``
    (default: the deferred steps keep captured factors) or ``"mean"`` / ``"sum"``, how the training loss reduces
    ``task.loss`` over the batch: nothing is captured during training, and the dots are recomputed at the flush
    from ``θ_t`` and the batch (:mod:`.inrun_replay`), each step checked against its real ``p.grad`` (a mismatch
    raises); one micro-batch per step, deterministic forward, no GradScaler. data: the training examples by id
    (an ArrayDataset or any dataset with ids), for replay when ``step`` gets no batch.
    config: an :class:`InRunConfig`, or its fields as keywords (not both); ``validation``, ``optimizer``,
    ``scaler`` and ``data`` are the run's objects, not settings.

    Cost per step (first order, SGD, streaming): one validation forward/backward (``k/n_val`` of it with a budget),
    and per tracked layer ``min(N·T·P·(m+n), N·T·m·n)`` multiply-adds (ghost dots with the ``P`` validation tokens, or
    one val-first dot), done inside the training backward. Adam adds ``s`` (about half an Adam update) and always
    takes the val-first dot; second order adds one HVP of the validation loss.
    """

    def __init__(self, model: nn.Module, task: Task, validation: Any, optimizer: torch.optim.Optimizer, *,
                 config: InRunConfig | None = None, scaler: torch.amp.GradScaler | None = None, data: Any = None,
                 **settings: Any):
        self.config = config = configure(InRunConfig, config, settings)
        order, targeted, keep_history = config.order, config.targeted, config.keep_history
        validation_batch_size, unexplained_gradient = config.validation_batch_size, config.unexplained_gradient
        validation_subsample, seed = config.validation_subsample, config.seed
        validation_rank, streaming = config.validation_rank, config.streaming
        self.model, self.task, self.optimizer = model, task, optimizer
        self.order, self.targeted, self.keep_history = order, targeted, keep_history
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.inner = inner
        self.capture = Capture(inner, task.tracked_modules(inner))
        self._val_capture = Capture(inner, task.tracked_modules(inner))  # kept: its one-off check runs once
        self._val_capture.record_only = True  # its output gradients are taken at the edges, never by node hooks
        self._eval = _EvalMode(inner)
        self._names = {p: name for name, p in inner.named_parameters()}
        self.validation, self.validation_batch_size = validation, validation_batch_size
        self.query_ids = self._validation_ids(validation)
        self.streaming = streaming
        self.validation_subsample = validation_subsample
        self.validation_rank = validation_rank
        self.n_val = self._validation_size(validation) if validation_subsample is not None else None
        if validation_subsample is not None:
            if not 1 <= int(validation_subsample) <= self.n_val:
                raise ValueError(f"validation_subsample must be in 1..{self.n_val} (the validation size), got "
                                 f"{validation_subsample}")
        self._generator = torch.Generator().manual_seed(seed)
        self._choice: Tensor | None = None  # this step's validation sample (validation_subsample)
        self._val_state: _Validation | None = None  # this step's validation side at θ_t (streaming)
        self._ftz = False  # this step flushes subnormals in our own products (capture/subnormals.py)
        self._acc: dict[str, Tensor] | None = None  # streamed per-parameter dots of the open micro-batch
        # the route each parameter's dots took in the last streamed micro-batch ("ghost" / "val-first"): the next
        # validation pass skips what no route needs (validation pieces, or weight gradients of ghost layers)
        self._routes: dict[str, str] | None = None
        self.world = torch.distributed.get_world_size() if _ddp(model) else 1
        self._pending: list[_Micro] = []
        self._open: np.ndarray | None = None  # ids of the micro-batch being recorded
        self._clip = 1.0
        self._rows: dict[int, int] = {}
        self._sums = np.zeros((0, len(self.query_ids)))
        self.history: list[tuple[int, np.ndarray, np.ndarray]] = []  # (step, ids, values (B, Q))
        self.steps = 0
        self.skipped = 0  # optimizer steps the GradScaler skipped (inf/nan gradients): no value added
        self.unexplained_gradient = unexplained_gradient
        self._checked = False  # set once a step has compared p.grad with the examples' summed gradients
        self._scales: dict[str, float] = {}  # rounding floors of that check, summed over the step's micro-batches
        self._explained = False  # set once a step shows that p.grad is exactly the examples' summed gradients
        if config.replay is not None and scaler is not None:
            raise ValueError("replay cannot check steps under a GradScaler; use defer_steps without replay")
        self._deferred = (DeferredSteps(inner, task, self._val_batches, list(self.capture.params), self._eval,
                                        int(config.defer_steps),
                                        validation=validation if validation_subsample is not None else None,
                                        subsample=validation_subsample, generator=self._generator,
                                        replay=config.replay, data=data)
                          if config.defer_steps is not None else None)
        self._snap: int | None = None  # snapshot slot of θ_t of the open step (defer_steps)
        self._scalar_s: bool | None = None  # s is one number per group (SGD): see _scalar (asked once, at a step)
        self._hook = optimizer.register_step_pre_hook(self._on_step)
        self.scaler = scaler
        if scaler is not None:
            # the optimizer's pre-hook never runs on a skipped step, so the step's pending gradients are dropped when
            # the scaler updates (once per step, after scaler.step): an instance attribute, removed by close()
            original = scaler.update

            def update(*args, **kwargs):
                self._after_scaler_update()
                return original(*args, **kwargs)

            scaler.update = update

    # -- recording ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, ids: Sequence[int] | Tensor | np.ndarray, batch: Any = None) -> Iterator[None]:
        """Record the per-example gradients of the forward + backward run inside the block. ``ids`` are the batch's
        stable example ids, ``(B,)``; ``batch`` (optional) is checked to hold ``B`` examples (``replay`` keeps it)."""
        if batch is not None and batch_size(batch) != len(ids):
            raise DataError(f"step got {len(ids)} ids for a batch of {batch_size(batch)} examples")
        self.begin(ids, batch)
        try:
            yield
        except BaseException:
            self.capture.consumer = self._acc = None
            self.capture.__exit__(None, None, None)
            self._open = None
            raise
        self.finish()

    def begin(self, ids: Sequence[int] | Tensor | np.ndarray, batch: Any = None) -> None:
        """Start recording a micro-batch (the forward + backward that follow). :meth:`step` wraps begin/finish.

        On the streaming route the step's validation forward/backward runs here (once per optimizer step), at the
        parameters the training forward is about to use."""
        if self._open is not None:
            raise RuntimeError("a micro-batch is already being recorded; call finish() first")
        ids = np.asarray(ids.cpu() if isinstance(ids, Tensor) else ids, dtype=np.int64).reshape(-1)
        if self._defers():
            if self._snap is None:  # θ_t: what this step's training forward uses
                self._snap = self._deferred.snapshot()
            if self._deferred.replay is not None:  # nothing captured: the step is recomputed at the flush
                self._deferred.replay.open(ids, batch)
                return
        elif self._streams():
            if self._val_state is None:
                routes = self._routes or {}
                ghost = {name for name, r in routes.items() if r == "ghost"}
                self._ftz = not flushing()  # subnormals flushed in our own work only (capture/subnormals.py)
                with torch.enable_grad(), self._eval(), Flushed(self._ftz):
                    self._val_state = self._validation(with_pieces=self._routes is None or bool(ghost), skip=ghost,
                                                       only=None if self._routes is None else ghost)
            self._acc = {}
            self.capture.consumer = self._consume
        self._open = ids
        self.capture.__enter__()

    def _sketches(self, a: Piece) -> bool:
        """Whether a val-first dot of ``a`` is replaced by the rank-r sketch (cheaper: ``r·(m+n) < m·n``)."""
        r = self.validation_rank
        return r is not None and isinstance(a, Outer) and r * (a.m + a.n) < a.m * a.n

    def _scalar(self) -> bool:
        """:func:`scalar_preconditioner` of the optimizer, asked once (its class does not change); an unsupported
        optimizer raises here, at its first step."""
        if self._scalar_s is None:
            self._scalar_s = scalar_preconditioner(self.optimizer)
        return self._scalar_s

    def _defers(self) -> bool:
        """Whether this step is recorded for the batched route (``defer_steps``; see :mod:`.inrun_batched`)."""
        return (self._deferred is not None and self._checked and self.steps > 0 and self.world == 1
                and self._scalar())

    def _streams(self) -> bool:
        """Whether the next micro-batch is reduced inside its backward (see the module docstring)."""
        return (self.streaming and self.order == 1 and not self.targeted and self._checked and self.steps > 0
                and self._scalar())

    def _consume(self, path: str, found: list[tuple[str, Piece]]) -> None:
        """Backward hook of one tracked call (streaming): ``⟨g_val, g_z⟩`` per example for each of its parameters,
        added to the micro-batch's per-parameter sums ``(N,)``; the pieces are dropped when this returns.

        A bias whose weight (same output gradient) just took the ghost route takes it too: its dot is then the
        row sums of the weight's ``u·u'`` products (one reduction), and its validation gradient is not needed."""
        val, acc, n = self._val_state, self._acc, len(self._open)
        routes = self._routes = self._routes if self._routes is not None else {}
        memo: dict = {}  # u·u' products of this call's pieces (ghost_total), shared by a weight and its bias
        with Flushed(self._ftz):  # a language model's output gradients are full of subnormals
            for name, a in found:
                if a.n_examples != n:
                    _check_batch_dims({path: a.n_examples}, n, f" (step got {n} ids)")
                if not val.has(name):  # the validation loss does not depend on it
                    continue
                val_pieces = val.pieces.get(name)
                factors = None  # stacked only for layers that take the ghost route
                if val_pieces and isinstance(a, Outer) and (
                        _ghost_is_cheaper(a, val_pieces) or (a.unit and memo and _memoized(a, val.ghost(name), memo))):
                    factors = val.ghost(name)
                if factors is not None:
                    d = ghost_total(a, factors, memo)
                    routes.setdefault(name, "ghost")
                elif self._sketches(a):
                    d = ghost_total(a, val.sketch(name, a, self.validation_rank, self._generator))
                    routes[name] = "val-first"
                else:
                    d = piece_dot(a, val.flat(name, a)).reshape(-1)
                    routes[name] = "val-first"  # one val-first piece is enough to need the weight gradient
                acc[name] = d if name not in acc else acc[name] + d

    def finish(self) -> None:
        """Stop recording and keep the micro-batch's per-example gradients for the next ``optimizer.step()``."""
        ids, self._open = self._open, None
        if ids is None:
            return
        factor = 1.0 / self.world
        if self.scaler is not None and self.scaler.is_enabled():
            factor /= float(self.scaler.get_scale())  # the backward ran on scale × loss; a power of two: exact
        if self.capture.consumer is not None:
            acc, self._acc = self._acc, None
            try:
                streamed = self.capture.finish_stream()
            finally:
                self.capture.consumer = None
                self.capture.__exit__(None, None, None)
            if not streamed:
                raise ValueError("no tracked module took part in the loss; was the forward run inside the step?")
            self._pending.append(_Micro(ids, dots={k: d * factor if factor != 1.0 else d for k, d in acc.items()}))
            return
        self.capture.measure = not self._checked  # rounding scales for the first step's check
        try:
            grads = self.capture.collect(ids, check_finite=False)  # the step's values are checked instead
        finally:
            self.capture.measure = False
            self.capture.__exit__(None, None, None)
        if grads.n != len(ids):
            raise DataError(f"step got {len(ids)} ids for a batch of {grads.n} examples (the leading dimension of "
                            "the tracked modules' inputs: the batch dimension must come first)")
        self._pending.append(_Micro(ids, grads=grads if factor == 1.0 else grads.scale(factor)))
        for name, size in self.capture.scales.items():
            self._scales[name] = self._scales.get(name, 0.0) + size * factor

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` on the model's parameters that also scales this step's shares.

        With a GradScaler call ``scaler.unscale_(optimizer)`` first, as PyTorch's AMP recipe does."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
        self._clip = float(min(1.0, max_norm / (float(total) + 1e-6)))
        return total

    def close(self) -> None:
        """Stop listening to the optimizer and the scaler (values stay available; steps still pending under
        ``defer_steps`` are computed now)."""
        self._flush()
        self._hook.remove()
        if self.scaler is not None and "update" in vars(self.scaler):
            del self.scaler.update

    def _after_scaler_update(self) -> None:
        """Runs right before ``scaler.update()``: gradients still pending belong to a step the scaler skipped."""
        self.finish()
        if self._pending:
            self._pending, self._clip, self._scales = [], 1.0, {}
            self.skipped += 1
        self._snap = None
        self._val_state = self._choice = None  # the next step draws (and computes at its θ) afresh

    # -- the value of one step ---------------------------------------------------------------------------------
    def _on_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.finish()  # a micro-batch still open (integrations that record without a with-block)
        if self._snap is not None and self._deferred.replay is not None:
            clip, self._clip = self._clip, 1.0
            self._defer([], clip)
            return
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        clip, self._clip = self._clip, 1.0
        if self._snap is not None and all(m.grads is not None for m in pending):
            self._defer(pending, clip)
            return
        # a streamed first-order step has its validation side already: no forward here, so no mode switch (a walk
        # over every module, twice)
        streamed = self.order == 1 and not self.targeted and all(m.dots is not None for m in pending)
        try:
            if streamed and self.steps > 0 and self._scalar():
                # s times the dots reduced in the backward, in float64: no autograd, no product worth flushing
                values = self._step_values(pending, clip)
            else:
                with (torch.enable_grad(), contextlib.nullcontext() if streamed else self._eval(),
                      Flushed(not flushing())):
                    values = self._step_values(pending, clip)
        finally:
            self._val_state = self._choice = None  # the next step draws (and computes at its θ) afresh
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            ids = np.concatenate([m.ids for m in pending])
            raise NonFiniteError(f"NaN/inf In-Run values at step {self.steps} for example ids {ids[bad].tolist()}")
        start = 0
        for micro in pending:
            part = values[start : start + micro.n]
            self._add(micro.ids, part)
            if self.keep_history:
                self.history.append((self.steps, micro.ids, part))
            start += micro.n
        self.steps += 1

    def _defer(self, pending: list[_Micro], clip: float) -> None:
        """Keep this step for the batched route; compute the pending steps' values once there are K of them."""
        slot, self._snap = self._snap, None
        shares = {self._names[p]: s * clip for p, s in step_scale(self.optimizer).items() if p in self._names}
        self._deferred.add(PendingStep(self.steps, [(m.ids, m.grads) for m in pending], slot, shares, clip))
        self.steps += 1
        if len(self._deferred.pending) >= int(self.config.defer_steps):
            self._flush()

    def _flush(self) -> None:
        """Values of the steps the batched route holds (``defer_steps``), added as a per-step route adds them."""
        if self._deferred is None or not self._deferred.pending:
            return
        with torch.enable_grad():
            done = self._deferred.values()
        for step, micro in done:
            for ids, values in micro:
                part = _np(values).reshape(-1, 1)
                bad = ~np.isfinite(part).all(axis=1)
                if bad.any():
                    raise NonFiniteError(f"NaN/inf In-Run values at step {step} for example ids {ids[bad].tolist()}")
                self._add(ids, part)
                if self.keep_history:
                    self.history.append((step, ids, part))

    def _step_values(self, pending: list[_Micro], clip: float) -> np.ndarray:
        if self.order == 1 and self.steps > 0:  # the batch total is only needed for w, and once for the check
            if self._scalar():
                shares = {self._names[p]: s * clip for p, s in step_scale(self.optimizer).items() if p in self._names}
                return self._first_order(pending, shares)
            if not self.targeted:  # targeted values need s itself, one product per validation example (below)
                # s is a tensor (Adam): only s ⊙ g_val is needed, formed in one sweep per parameter
                val = self._val_state = self._val_state or self._validation(with_pieces=False)
                vectors = {p: val.grad(name) for name, p in self.capture.params.items() if val.has(name)}
                scaled = {self._names[p]: v for p, v in precondition(self.optimizer, vectors, clip).items()}
                return self._first_order(pending, scaled, prescaled=True)
        affine = {p: sc for p, sc in affine_step(self.optimizer).items() if p in self._names}
        if self.order == 2 and not self._val_capture.verified:  # first order checks it while capturing validation
            self._check_validation()
        total = bound = None
        if not self._explained:  # checked on the first step: p.grad is the (clipped) sum of the examples' gradients
            total = _sum_totals([m.grads for m in pending])
            if not self._checked:
                bound = _sum_totals([m.grads for m in pending], absolute=True)
            if self.world > 1:
                for t in [*total.values(), *(bound or {}).values()]:
                    torch.distributed.all_reduce(t)
        shares, w = {}, {}  # per parameter: s (scalar or tensor), and w = c + ½ Σ x
        residual, norm = 0.0, 0.0
        sums, true = {}, {}  # tracked parameters: (Σ g_z, Σ |g_z|) and p.grad, for the first step's check
        for p, (s, c0) in affine.items():
            name = self._names[p]
            shares[name] = s * clip
            if total is None:
                half = 0.5 * s * p.grad.detach()
                w[name] = half if c0 is None else c0 + half  # no pass adding a zero baseline (plain SGD)
                continue
            c0 = 0 if c0 is None else c0
            g_batch = total.get(name, torch.zeros_like(p)) * clip
            rest = p.grad.detach() - g_batch  # gradient no tracked example explains: part of the baseline
            residual += float(rest.square().sum())
            norm += float(p.grad.square().sum())
            w[name] = s * rest + c0 + 0.5 * s * g_batch
            if bound is not None and name in self.capture.params:
                true[name] = p.grad.detach()
                if name in total:
                    sums[name] = (g_batch, bound[name] * clip)
                    self._scales[name] = self._scales.get(name, 0.0) * clip
        if total is not None:
            self._explained = residual <= 1e-10 * max(norm, 1e-30)
        if bound is not None:
            self._checked = True
            if self.unexplained_gradient == "raise":
                self._check_explained(sums, true)
        if self.order == 1:
            return self._first_order(pending, shares)
        weights = self._validation_weights(affine, shares, w)
        return np.concatenate([_np(m.grads.dot(weights)) for m in pending])

    def _check_explained(self, sums: dict[str, tuple[Tensor, Tensor]], true: dict[str, Tensor]) -> None:
        """Raise naming the tracked parameters whose ``p.grad`` is not the examples' summed gradient (first step)."""
        dtypes = [p.dtype for p in self.capture.params.values()] + [*self.capture.seen_dtypes]
        bad = unexplained(sums, true, tolerance(*dtypes), self._scales)
        if not bad:
            return
        listed = ", ".join(f"{name!r} (off by {100 * err:.3g} %)" for name, err in bad.items())
        # a loss scale multiplies every tracked parameter's gradient by one factor; anything else is another cause
        ratios = [_ratio(sums[name][0], true[name]) for name in sums] if set(bad) == set(sums) else []
        if ratios and all(r is not None for r in ratios) and max(ratios) <= min(ratios) * (1 + 1e-3):
            cause = (f"the examples' summed gradient is {ratios[0]:.6g} × p.grad, so the backward ran on a scaled "
                     "loss that was unscaled afterwards: pass the torch.amp.GradScaler as InRunShapley(..., "
                     "scaler=scaler), or do not scale the loss by hand")
        else:
            cause = ("the parameter is used outside its module's call (F.linear(x, layer.weight), a weight tied by "
                     "hand as h @ emb.weight.T), by an untracked module, or a term other than the per-example losses "
                     "(a regularizer) reached it; route every use through a tracked module, or pass "
                     "unexplained_gradient='baseline' to count that part as the step's baseline")
        raise DataCreditError(f"In-Run Shapley at step {self.steps}: the batch gradient of tracked parameters "
                              f"{listed} is not the sum of the examples' gradients: {cause}")

    def _check_validation(self) -> None:
        """The capture engine's one-off check (see :func:`datacredit.capture.example_grads`) on the first validation
        batch, for the routes that do not capture the validation side (second order, targeted)."""
        batch = next(iter(self._val_batches()))
        with self._val_capture as cap:
            example_grads(cap, self.task.measurement(self.inner, batch))

    def _first_order(self, pending: list[_Micro], shares: dict, prescaled: bool = False) -> np.ndarray:
        """``⟨g_z, s ⊙ g_val⟩`` per example ``(B, Q)``. Streamed micro-batches bring their per-parameter dots; the
        others are reduced here per layer by the cheaper exact route: ghost dots with the validation examples' pieces,
        or a val-first dot with ``s ⊙ g_val`` (the only route when ``s`` is a tensor, as for Adam).

        shares: ``s`` (times clipping) per parameter name; with ``prescaled``, ``s ⊙ g_val`` itself instead."""
        if self.targeted:
            if prescaled:  # s ⊙ g_val would be taken for s: wrong values, never silently
                raise AssertionError("internal: targeted In-Run values need the preconditioner s, not s ⊙ g_val")
            return self._first_order_targeted(pending, shares)
        if all(m.dots is not None for m in pending):
            return np.concatenate([_streamed_values(m.dots, shares) for m in pending])
        device = next(self.inner.parameters()).device
        val = self._val_state
        if val is None and any(m.grads is not None for m in pending):
            # validation pieces only where a ghost dot may be cheaper (s a number); Adam needs only Σ g_val
            val = self._validation(with_pieces=any(not isinstance(s, Tensor) for s in shares.values()))
        # s ⊙ g_val, flattened (1, numel), for the layers that take the val-first route
        scaled: dict[str, Tensor] = {k: v.reshape(1, -1) for k, v in shares.items()} if prescaled else {}
        sketched: dict[tuple, list] = {}  # validation_rank: low-rank ghost rows of s ⊙ g_val per (name, m, n)
        out = []
        for micro in pending:
            if micro.dots is not None:
                phi = torch.zeros(micro.n, dtype=torch.float64, device=device)
                for name, d in micro.dots.items():
                    if name in shares:
                        phi += shares[name] * d.to(torch.float64)
                out.append(_np(phi).reshape(-1, 1))
                continue
            grads = micro.grads
            phi = torch.zeros(grads.n, 1, dtype=grads.flat_dtype, device=device)
            for name, train_pieces in grads.pieces.items():
                if name not in shares or not val.has(name):
                    continue
                s = shares[name]
                val_pieces = val.pieces.get(name, [])
                for a in train_pieces:
                    if not isinstance(s, Tensor) and _ghost_is_cheaper(a, val_pieces):
                        phi += s * sum(piece_gram(a, b).sum(1, keepdim=True) for b in val_pieces)
                        continue
                    if name not in scaled:
                        scaled[name] = (s * val.grad(name)).reshape(1, -1)
                    if self._sketches(a):
                        key = (name, a.m, a.n)
                        if key not in sketched:
                            sketched[key] = [low_rank(scaled[name].reshape(a.m, a.n), self.validation_rank,
                                                      self._generator)]
                        phi += ghost_total(a, sketched[key]).reshape(-1, 1).to(phi.dtype)
                        continue
                    phi += piece_dot(a, scaled[name].to(phi.dtype))
            out.append(_np(phi))
        return np.concatenate(out)

    def _first_order_targeted(self, pending: list[_Micro], shares: dict) -> np.ndarray:
        """Targeted first order: ``⟨g_z, s ⊙ g_q⟩`` for every validation example q, ``(B, Q)`` (Gram products)."""
        val = []
        for batch in self._val_batches():
            with self._val_capture as cap:
                grads = example_grads(cap, self.task.measurement(self.inner, batch))
            val.append(ExampleGrads({k: v for k, v in grads.pieces.items() if k in shares}, grads.shapes, grads.n))
        val = [v.scale(shares) for v in val]
        return np.concatenate([_np(torch.cat([m.grads.gram(v) for v in val], dim=1)) for m in pending])

    def _validation(self, with_pieces: bool, skip: set[str] = frozenset(),
                    only: set[str] | None = None) -> _Validation:
        """The validation side of this step at the current parameters: the summed validation gradient of every
        tracked parameter and, with ``with_pieces``, the validation examples' pieces (for ghost dots); both times
        ``n_val/k`` under a validation budget. One forward and one backward per validation batch (the first batch
        of the first call also runs the capture's one-off check). Autocast is off: values are those of the model's
        own precision.

        skip: parameters whose weight gradient the backward need not form (ghost-route layers: their pieces are
        enough; should one be needed after all, :meth:`_Validation.grad` sums it from the pieces).
        only: pieces only of the calls that use one of these parameters (the ghost-route ones; every parameter not
        in it must then be outside ``skip``, so its validation gradient is autograd's); None: of every call."""
        names = [k for k in self.capture.params if not (with_pieces and k in skip)]
        params = [self.capture.params[k] for k in names]
        grads: dict[str, Tensor] = {}
        pieces: dict[str, list[Piece]] = {}
        cap = self._val_capture
        with _no_autocast(params[0].device if params else next(self.inner.parameters()).device):
            for batch in self._val_batches():
                if not (with_pieces or not cap.verified):  # only Σ g_val: no capture, no hooks
                    losses = self.task.measurement(self.inner, batch)
                    part, part_pieces = self._validation_backward(None, losses, names, params, False)
                else:
                    with cap:
                        losses = self.task.measurement(self.inner, batch)
                        if not cap.verified:
                            found = example_grads(cap, losses)
                            part, part_pieces = found.total(), found.pieces
                        else:
                            part, part_pieces = self._validation_backward(cap, losses, names, params, with_pieces,
                                                                          only)
                for k, g in part.items():
                    grads[k] = grads[k] + g if k in grads else g
                if with_pieces:
                    for k, ps in part_pieces.items():
                        pieces.setdefault(k, []).extend(ps)
        factor = self._val_factor()
        if factor != 1.0:
            grads = {k: g * factor for k, g in grads.items()}
            pieces = {k: [_scaled(p, factor) for p in ps] for k, ps in pieces.items()}
        return _Validation(grads, pieces, {k: p.shape for k, p in self.capture.params.items()})

    @staticmethod
    def _validation_backward(cap: Capture | None, losses: Tensor, names: list[str], params: list[Tensor],
                             with_pieces: bool, only: set[str] | None = None
                             ) -> tuple[dict[str, Tensor], dict[str, list[Piece]]]:
        """One backward of ``Σ losses`` for the parameters' gradients and, in the same pass, the tracked calls'
        output gradients (the validation pieces): nothing is summed from pieces, autograd's own weight gradient is
        ``Σ g_val``. ``cap`` None: no capture ran (gradients only). only: see :meth:`_validation` (the calls of
        val-first layers, LayerNorms on the GPT, then form no pieces)."""
        check_per_example(losses)
        calls = [c for c in cap._calls if only is None or not only.isdisjoint(cap.names_of[c.path])] if with_pieces \
            else []
        out = torch.autograd.grad(losses.sum(), [c.edge for c in calls] + params, allow_unused=True)
        for call, g in zip(calls, out):
            if g is not None:
                call.grad = call.output_grad(g.detach())
        grads = {k: g.detach() for k, g in zip(names, out[len(calls):]) if g is not None}
        found = cap.collect(check_finite=False).pieces if calls and any(c.grad is not None for c in calls) else {}
        return grads, found

    def _validation_weights(self, affine: dict, shares: dict, w: dict) -> dict[str, Tensor]:
        """``V = s ⊙ (g_val − H_val w)`` per parameter, ``(Q, *shape)``."""
        params = list(affine)
        names = [self._names[p] for p in params]
        if self.targeted:
            per_query = self._query_terms(params, w)
        else:
            per_query = [self._summed_terms(params, w)]
        if len(per_query) == 1:  # summed validation: a view, not a stacked copy
            return {name: per_query[0][k].unsqueeze(0) * _expand(shares[name]) for k, name in enumerate(names)}
        return {name: torch.stack([q[k] for q in per_query]) * _expand(shares[name])
                for k, name in enumerate(names)}

    def _val_batches(self) -> Iterator[Any]:
        """The validation batches of this step: all of them, or this step's sample under a validation budget."""
        choice = self._step_choice()
        if isinstance(self.validation, Dataset):
            device = next(self.inner.parameters()).device
            data = self.validation if choice is None else Subset(self.validation, choice.tolist())
            _, it = batches(data, self.validation_batch_size, device, progress=False)
            for batch in it:
                yield batch.data
        else:
            yield self.validation if choice is None else _take(self.validation, choice)

    def _step_choice(self) -> Tensor | None:
        """This step's validation sample (sorted indices, ``(k,)``), drawn once per optimizer step; None = all."""
        if self.validation_subsample is None:
            return None
        if self._choice is None:
            perm = torch.randperm(self.n_val, generator=self._generator)
            self._choice = perm[: int(self.validation_subsample)].sort().values
        return self._choice

    def _val_factor(self) -> float:
        """``n_val / k`` under a validation budget (what makes the sampled sum unbiased), else 1."""
        return 1.0 if self.validation_subsample is None else self.n_val / int(self.validation_subsample)

    def _validation_size(self, validation: Any) -> int:
        if isinstance(validation, Dataset):
            return len(validation)
        try:
            return batch_size(validation)
        except TypeError as e:
            raise ValueError("validation_subsample needs the validation as a Dataset or a batch of tensors "
                             "(a tensor, tuple/list or dict of tensors with the examples first)") from e

    def _summed_terms(self, params: list[Tensor], w: dict) -> list[Tensor]:
        """``g_val − H_val w`` for the validation loss summed over the validation set."""
        out = None
        factor = self._val_factor()  # n_val/k under a validation budget: g_val and H_val w are both sums over it
        for batch in self._val_batches():
            loss = self.task.measurement(self.inner, batch).sum()
            terms = self._accumulate(loss * factor if factor != 1.0 else loss, params, w)
            out = terms if out is None else [o + t for o, t in zip(out, terms)]
        return out if out is not None else [torch.zeros_like(p) for p in params]

    def _query_terms(self, params: list[Tensor], w: dict) -> list[list[Tensor]]:
        """``g_q − H_q w`` for every validation example q: one gradient and one HVP each."""
        terms = []
        for batch in self._val_batches():
            losses = self.task.measurement(self.inner, batch)
            for q in range(len(losses)):
                terms.append(self._accumulate(losses[q], params, w, retain=True))
        return terms

    def _accumulate(self, loss: Tensor, params: list[Tensor], w: dict, retain: bool = False) -> list[Tensor]:
        """``g − H w`` of ``loss`` per parameter (``g`` alone for first order): one gradient and, second order,
        one Hessian-vector product (double backward; forward-over-reverse measured slower on CPU)."""
        second = self.order == 2
        grads = torch.autograd.grad(loss, params, create_graph=second, retain_graph=retain or second,
                                    allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if not second:
            return [g.detach() for g in grads]
        direction = sum((g * w[self._names[p]]).sum() for p, g in zip(params, grads))
        hv = torch.autograd.grad(direction, params, retain_graph=retain, allow_unused=True)
        return [g.detach() if h is None else g.detach() - h for g, h in zip(grads, hv)]

    # -- results -----------------------------------------------------------------------------------------------
    def _add(self, ids: np.ndarray, values: np.ndarray) -> None:
        rows_of = self._rows
        keys = ids.tolist()
        rows = list(map(rows_of.get, keys))  # one C-level pass when every id has a row already (after epoch 1)
        if None in rows:
            rows = [rows_of.setdefault(i, len(rows_of)) for i in keys]  # a new id gets the next row
        if len(rows_of) > len(self._sums):  # grow geometrically: amortised O(1) per new example
            grown = np.zeros((max(len(rows_of), 2 * len(self._sums)), self._sums.shape[1]))
            grown[: len(self._sums)] = self._sums
            self._sums = grown
        if len(set(rows)) == len(rows):  # the usual case: fancy-index add (np.add.at is several times slower)
            self._sums[rows] += values
        else:  # an id twice in one micro-batch: both values count
            np.add.at(self._sums, rows, values)

    def values(self) -> Scores:
        """Accumulated values ``(n_seen, Q)`` (Q = 1 summed validation, query id −1; else the validation ids),
        sorted by training id; gathered over ranks under DDP. Positive = lowered the validation loss."""
        self._flush()
        ids = np.fromiter(self._rows, dtype=np.int64, count=len(self._rows))
        sums = self._sums[: len(ids)]
        if self.world > 1:
            gathered = [None] * self.world
            torch.distributed.all_gather_object(gathered, (ids, sums))
            ids = np.concatenate([g[0] for g in gathered])
            sums = np.concatenate([g[1] for g in gathered])
        unique, inverse = np.unique(ids, return_inverse=True)
        merged = np.zeros((len(unique), sums.shape[1]))
        np.add.at(merged, inverse, sums)
        config = {**asdict(self.config), "steps": self.steps, "optimizer": type(self.optimizer).__name__}
        return Scores(merged, unique, self.query_ids, f"inrun-shapley-{self.order}", config)

    def _validation_ids(self, validation: Any) -> np.ndarray:
        if not self.targeted:
            return np.array([-1])
        if isinstance(validation, Dataset):
            return example_ids(validation)
        with torch.no_grad():
            n = len(self.task.measurement(self.inner, validation))
        return np.arange(n)


@dataclass
class _Micro:
    """One recorded micro-batch: its ids ``(N,)`` and either its factored per-example gradients (deferred route)
    or, streamed, ``⟨g_val, g_z⟩`` per tracked parameter ``{name: (N,)}`` before ``s`` and clipping."""

    ids: np.ndarray
    grads: ExampleGrads | None = None
    dots: dict[str, Tensor] | None = None

    @property
    def n(self) -> int:
        return len(self.ids)


class _Validation:
    """The validation side of one step: ``grads`` the summed validation gradient per tracked parameter (its shape),
    ``pieces`` the validation examples' pieces per parameter (empty unless asked for); the stacked ghost factors and
    the flattened gradients are built once per step, on first use."""

    def __init__(self, grads: dict[str, Tensor], pieces: dict[str, list[Piece]], shapes: dict[str, torch.Size]):
        self.grads, self.pieces, self.shapes = grads, pieces, shapes
        self._flat: dict[tuple, Any] = {}  # flattened gradients per (name, dtype); sketches per (name, m, n)
        self._ghost: dict[str, list | None] = {}

    def sketch(self, name: str, like: Outer, rank: int, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        """Rank-``rank`` ghost rows of ``g_val`` of ``name`` in the ``(m, n)`` view of ``like`` (one per step)."""
        key = ("sketch", name, like.m, like.n)
        if key not in self._flat:
            self._flat[key] = low_rank(self.grad(name).reshape(like.m, like.n).to(like.v.dtype), rank, generator)
        return [self._flat[key]]

    def has(self, name: str) -> bool:
        """Whether the validation loss depends on ``name`` (through a tracked call)."""
        return name in self.grads or name in self.pieces

    def grad(self, name: str) -> Tensor:
        """``Σ g_val`` of ``name`` (its shape): autograd's, or summed from the validation pieces where the backward
        skipped it (a layer that left the ghost route)."""
        if name not in self.grads:
            self.grads[name] = sum(p.total() for p in self.pieces[name]).reshape(self.shapes[name])
        return self.grads[name]

    def flat(self, name: str, like: Outer | Dense) -> Tensor:
        """``g_val`` of ``name`` as ``(1, numel)`` in the dtype of the training piece ``like``."""
        dtype = like.dtype
        key = (name, dtype)
        if key not in self._flat:
            self._flat[key] = self.grad(name).reshape(1, -1).to(dtype)
        return self._flat[key]

    def ghost(self, name: str) -> list | None:
        """Stacked rows of the validation pieces of ``name`` (:func:`ghost_factors`), None if one is Dense."""
        if name not in self._ghost:
            ps = self.pieces.get(name)  # none when the pass skipped them: then the val-first route is the only one
            self._ghost[name] = ghost_factors(ps) if ps and all(isinstance(p, Outer) for p in ps) else None
        return self._ghost[name]


class _EvalMode:
    """``model.eval()`` for the validation side, then every module's own ``training`` flag back (as
    :func:`datacredit.methods.base.eval_mode`, which restores the root's flag on every module). When no module
    overrides ``train()``, the flags are set directly on the modules (listed once per call): two Python calls per
    module less than the recursive ``model.train(mode)``, which matters on small models where a step is a few ms."""

    def __init__(self, model: nn.Module):
        self.model = model

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        modules = list(self.model.modules())
        flags = [m.training for m in modules]
        if not all(type(m).train is nn.Module.train for m in modules):
            self.model.eval()
            try:
                yield
            finally:
                for m, flag in zip(modules, flags):
                    if m.training != flag:
                        m.train(flag)
            return
        for m in modules:
            object.__setattr__(m, "training", False)
        try:
            yield
        finally:
            for m, flag in zip(modules, flags):
                object.__setattr__(m, "training", flag)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for the validation side (values in the model's own precision); nothing to enter when it is off
    already (the usual case: entering and leaving an autocast context costs more than a small layer's dot)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _scaled(piece: Piece, factor: float) -> Piece:
    return Outer(piece.u, piece.v * factor, piece.m, piece.n) if isinstance(piece, Outer) else Dense(piece.g * factor)


def _take(batch: Any, index: Tensor) -> Any:
    """Rows ``index`` of every tensor in a batch (a tensor, or a tuple/list/dict of tensors with examples first)."""
    return map_tensors(lambda t: t[index.to(t.device)], batch, "validation_subsample cannot take rows of a")


def _streamed_values(dots: dict[str, Tensor], shares: dict) -> np.ndarray:
    """``Σ_name s_name · ⟨g_val, g_z⟩_name`` in float64 for a streamed micro-batch, ``(N, 1)``: one stacked product
    instead of two small ops per parameter."""
    names = [k for k in dots if k in shares]
    if not names:
        n = len(next(iter(dots.values()))) if dots else 0
        return np.zeros((n, 1))
    stacked = torch.stack([dots[k] for k in names]).to(torch.float64).cpu().numpy()  # (P, N)
    s = np.fromiter((float(shares[k]) for k in names), dtype=np.float64, count=len(names))
    return (s @ stacked).reshape(-1, 1)  # numpy: no tensor built for P numbers (issue 16, per-step overhead)


def _ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel) and torch.distributed.is_initialized()


def _sum_totals(all_grads: list[ExampleGrads | None], absolute: bool = False) -> dict[str, Tensor]:
    total: dict[str, Tensor] = {}
    for grads in all_grads:
        if grads is None:
            raise RuntimeError("a streamed micro-batch reached the batch-total check; record it with streaming=False")
        for name, t in grads.total(absolute=absolute).items():
            total[name] = total[name] + t if name in total else t.detach().clone()
    return total


def _memoized(a: Outer, factors: list | None, memo: dict) -> bool:
    """Whether ``u·u'`` of ``a`` against every row block of ``factors`` is already in ``memo`` (see
    :func:`ghost_total`): then a ghost dot of a bias costs one reduction (the chunking there is the same)."""
    if not factors or len(factors) != 1:
        return False
    ub = factors[0][0]
    step = max(1, CHUNK_ELEMENTS // max(a.n_examples * a.length, 1))
    if ub.shape[0] > step:
        return False
    return memo_key(a, ub) in memo


def _ghost_is_cheaper(a, val_pieces: list) -> bool:
    """Ghost dots with every validation piece vs one val-first dot with their sum (``N·T·m·n``)."""
    if not isinstance(a, Outer) or not all(isinstance(b, Outer) for b in val_pieces):
        return False
    return sum(ghost_cost(a, b) for b in val_pieces) < a.n_examples * a.length * a.m * a.n


def _ratio(a: Tensor, b: Tensor) -> float | None:
    """``k`` with ``a = k·b`` to 1e-6 (relative), else None."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    nb = float(b @ b)
    if nb == 0:
        return None
    k = float(a @ b) / nb
    return k if float((a - k * b).norm()) <= 1e-6 * float(a.norm()) else None


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _expand(s: Tensor | float) -> Tensor | float:
    return s.unsqueeze(0) if isinstance(s, Tensor) else s
