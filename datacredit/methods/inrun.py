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
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..capture import Capture, ExampleGrads, example_grads
from ..capture.engine import tolerance, unexplained
from ..capture.pieces import Outer, ghost_cost, piece_dot, piece_gram
from ..data.dataset import example_ids
from ..errors import DataCreditError, DataError, NonFiniteError
from ..optimizers import affine_step
from ..scores import Scores
from ..task import Task, batch_size
from .base import batches, eval_mode


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
    """

    def __init__(self, model: nn.Module, task: Task, validation: Any, optimizer: torch.optim.Optimizer, *,
                 order: int = 1, targeted: bool = False, keep_history: bool = False,
                 validation_batch_size: int = 256, scaler: torch.amp.GradScaler | None = None,
                 unexplained_gradient: str = "raise"):
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order}")
        if unexplained_gradient not in ("raise", "baseline"):
            raise ValueError(f"unexplained_gradient must be 'raise' or 'baseline', got {unexplained_gradient!r}")
        self.model, self.task, self.optimizer = model, task, optimizer
        self.order, self.targeted, self.keep_history = order, targeted, keep_history
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.inner = inner
        self.capture = Capture(inner, task.tracked_modules(inner))
        self._val_capture = Capture(inner, task.tracked_modules(inner))  # kept: its one-off check runs once
        self._names = {p: name for name, p in inner.named_parameters()}
        self.validation, self.validation_batch_size = validation, validation_batch_size
        self.query_ids = self._validation_ids(validation)
        self.world = torch.distributed.get_world_size() if _ddp(model) else 1
        self._pending: list[tuple[np.ndarray, ExampleGrads]] = []
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
        stable example ids, ``(B,)``; ``batch`` (optional) is only checked to hold ``B`` examples."""
        if batch is not None and batch_size(batch) != len(ids):
            raise DataError(f"step got {len(ids)} ids for a batch of {batch_size(batch)} examples")
        self.begin(ids)
        try:
            yield
        except BaseException:
            self.capture.__exit__(None, None, None)
            self._open = None
            raise
        self.finish()

    def begin(self, ids: Sequence[int] | Tensor | np.ndarray) -> None:
        """Start recording a micro-batch (the forward + backward that follow). :meth:`step` wraps begin/finish."""
        if self._open is not None:
            raise RuntimeError("a micro-batch is already being recorded; call finish() first")
        self._open = np.asarray(ids.cpu() if isinstance(ids, Tensor) else ids, dtype=np.int64).reshape(-1)
        self.capture.__enter__()

    def finish(self) -> None:
        """Stop recording and keep the micro-batch's per-example gradients for the next ``optimizer.step()``."""
        ids, self._open = self._open, None
        if ids is None:
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
        factor = 1.0 / self.world
        if self.scaler is not None and self.scaler.is_enabled():
            factor /= float(self.scaler.get_scale())  # the backward ran on scale × loss; a power of two: exact
        self._pending.append((ids, grads if factor == 1.0 else grads.scale(factor)))
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
        """Stop listening to the optimizer and the scaler (values stay available)."""
        self._hook.remove()
        if self.scaler is not None and "update" in vars(self.scaler):
            del self.scaler.update

    def _after_scaler_update(self) -> None:
        """Runs right before ``scaler.update()``: gradients still pending belong to a step the scaler skipped."""
        self.finish()
        if self._pending:
            self._pending, self._clip, self._scales = [], 1.0, {}
            self.skipped += 1

    # -- the value of one step ---------------------------------------------------------------------------------
    def _on_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.finish()  # a micro-batch still open (integrations that record without a with-block)
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        clip, self._clip = self._clip, 1.0
        with torch.enable_grad(), eval_mode(self.inner):
            values = self._step_values(pending, clip)
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            ids = np.concatenate([i for i, _ in pending])
            raise NonFiniteError(f"NaN/inf In-Run values at step {self.steps} for example ids {ids[bad].tolist()}")
        start = 0
        for ids, grads in pending:
            part = values[start : start + grads.n]
            self._add(ids, part)
            if self.keep_history:
                self.history.append((self.steps, ids, part))
            start += grads.n
        self.steps += 1

    def _step_values(self, pending: list[tuple[np.ndarray, ExampleGrads]], clip: float) -> np.ndarray:
        affine = {p: sc for p, sc in affine_step(self.optimizer).items() if p in self._names}
        if self.order == 1 and self.steps > 0:  # the batch total is only needed for w, and once for the check
            return self._first_order(pending, {self._names[p]: s * clip for p, (s, _) in affine.items()})
        if self.order == 2 and not self._val_capture.verified:  # first order checks it while capturing validation
            self._check_validation()
        total = bound = None
        if not self._explained:  # checked on the first step: p.grad is the (clipped) sum of the examples' gradients
            total = _sum_totals([g for _, g in pending])
            if not self._checked:
                bound = _sum_totals([g for _, g in pending], absolute=True)
            if self.world > 1:
                for t in [*total.values(), *(bound or {}).values()]:
                    torch.distributed.all_reduce(t)
        shares, w = {}, {}  # per parameter: s (scalar or tensor), and w = c + ½ Σ x
        residual, norm = 0.0, 0.0
        sums, true = {}, {}  # tracked parameters: (Σ g_z, Σ |g_z|) and p.grad, for the first step's check
        for p, (s, c0) in affine.items():
            name = self._names[p]
            c0 = 0 if c0 is None else c0
            shares[name] = s * clip
            if total is None:
                w[name] = c0 + 0.5 * s * p.grad.detach()
                continue
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
        return np.concatenate([_np(grads.dot(weights)) for _, grads in pending])

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

    def _first_order(self, pending: list[tuple[np.ndarray, ExampleGrads]], shares: dict) -> np.ndarray:
        """``⟨g_z, s ⊙ g_val⟩`` per layer by the cheaper exact route: ghost dots with the validation examples' pieces,
        or a val-first dot with their sum (the only route when ``s`` is a tensor, as for Adam)."""
        val = []
        for batch in self._val_batches():
            with self._val_capture as cap:
                grads = example_grads(cap, self.task.measurement(self.inner, batch))
            val.append(ExampleGrads({k: v for k, v in grads.pieces.items() if k in shares}, grads.shapes, grads.n))
        if self.targeted:
            val = [v.scale(shares) for v in val]
            return np.concatenate([_np(torch.cat([g.gram(v) for v in val], dim=1)) for _, g in pending])
        summed: dict[str, Tensor] = {}  # s ⊙ g_val, built only for the layers that take the val-first route
        out = []
        for _, grads in pending:
            phi = torch.zeros(grads.n, 1, dtype=grads.flat_dtype, device=next(self.inner.parameters()).device)
            for name, train_pieces in grads.pieces.items():
                if name not in shares:
                    continue
                s = shares[name]
                val_pieces = [b for v in val for b in v.pieces.get(name, ())]
                for a in train_pieces:
                    if not isinstance(s, Tensor) and _ghost_is_cheaper(a, val_pieces):
                        phi += s * sum(piece_gram(a, b).sum(1, keepdim=True) for b in val_pieces)
                        continue
                    if name not in summed:
                        summed[name] = s * sum(b.total() for b in val_pieces).reshape(grads.shapes[name])
                    phi += piece_dot(a, summed[name].reshape(1, -1))
            out.append(_np(phi))
        return np.concatenate(out)

    def _validation_weights(self, affine: dict, shares: dict, w: dict) -> dict[str, Tensor]:
        """``V = s ⊙ (g_val − H_val w)`` per parameter, ``(Q, *shape)``."""
        params = list(affine)
        names = [self._names[p] for p in params]
        if self.targeted:
            per_query = self._query_terms(params, w)
        else:
            per_query = [self._summed_terms(params, w)]
        return {name: torch.stack([q[k] for q in per_query]) * _expand(shares[name])
                for k, name in enumerate(names)}

    def _val_batches(self) -> Iterator[Any]:
        if isinstance(self.validation, Dataset):
            device = next(self.inner.parameters()).device
            _, it = batches(self.validation, self.validation_batch_size, device, progress=False)
            for batch in it:
                yield batch.data
        else:
            yield self.validation

    def _summed_terms(self, params: list[Tensor], w: dict) -> list[Tensor]:
        """``g_val − H_val w`` for the validation loss summed over the validation set."""
        out = [torch.zeros_like(p) for p in params]
        for batch in self._val_batches():
            loss = self.task.measurement(self.inner, batch).sum()
            self._accumulate(out, loss, params, w)
        return out

    def _query_terms(self, params: list[Tensor], w: dict) -> list[list[Tensor]]:
        """``g_q − H_q w`` for every validation example q: one gradient and one HVP each."""
        terms = []
        for batch in self._val_batches():
            losses = self.task.measurement(self.inner, batch)
            for q in range(len(losses)):
                out = [torch.zeros_like(p) for p in params]
                self._accumulate(out, losses[q], params, w, retain=True)
                terms.append(out)
        return terms

    def _accumulate(self, out: list[Tensor], loss: Tensor, params: list[Tensor], w: dict, retain: bool = False):
        second = self.order == 2
        grads = torch.autograd.grad(loss, params, create_graph=second, retain_graph=retain or second,
                                    allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        for o, g in zip(out, grads):
            o += g.detach()
        if second:
            direction = sum((g * w[self._names[p]]).sum() for p, g in zip(params, grads))
            hv = torch.autograd.grad(direction, params, retain_graph=retain, allow_unused=True)
            for o, h in zip(out, hv):
                if h is not None:
                    o -= h

    # -- results -----------------------------------------------------------------------------------------------
    def _add(self, ids: np.ndarray, values: np.ndarray) -> None:
        for i in dict.fromkeys(ids.tolist()):
            if int(i) not in self._rows:
                self._rows[int(i)] = len(self._rows)
        if len(self._rows) > len(self._sums):  # grow geometrically: amortised O(1) per new example
            grown = np.zeros((max(len(self._rows), 2 * len(self._sums)), self._sums.shape[1]))
            grown[: len(self._sums)] = self._sums
            self._sums = grown
        np.add.at(self._sums, [self._rows[int(i)] for i in ids], values)

    def values(self) -> Scores:
        """Accumulated values ``(n_seen, Q)`` (Q = 1 summed validation, query id −1; else the validation ids),
        sorted by training id; gathered over ranks under DDP. Positive = lowered the validation loss."""
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
        config = {"order": self.order, "targeted": self.targeted, "steps": self.steps,
                  "optimizer": type(self.optimizer).__name__}
        return Scores(merged, unique, self.query_ids, f"inrun-shapley-{self.order}", config)

    def _validation_ids(self, validation: Any) -> np.ndarray:
        if not self.targeted:
            return np.array([-1])
        if isinstance(validation, Dataset):
            return example_ids(validation)
        with torch.no_grad():
            n = len(self.task.measurement(self.inner, validation))
        return np.arange(n)


def _ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel) and torch.distributed.is_initialized()


def _sum_totals(all_grads: list[ExampleGrads], absolute: bool = False) -> dict[str, Tensor]:
    total: dict[str, Tensor] = {}
    for grads in all_grads:
        for name, t in grads.total(absolute=absolute).items():
            total[name] = total[name] + t if name in total else t.detach().clone()
    return total


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
