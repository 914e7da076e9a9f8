"""First-order In-Run values of K optimizer steps computed together (``InRunShapley(..., defer_steps=K)``).

On a small model a step's validation forward/backward and its per-layer dots are a few dozen tiny operations, each
costing more in Python and dispatch than in arithmetic (the digits MLP of ``datacredit demo``: a validation pass of
329 images costs about as much as a whole training step). This route keeps, for each of K steps, the parameters
``θ_t`` the training forward used (copied when the step's first micro-batch begins into preallocated ``(K, ...)``
buffers, one ``torch._foreach_copy_`` per step), ``s`` (learning rate times clipping, per parameter) and either

* the examples' factored gradients (the deferred capture; the default), or
* nothing about the examples but their batch (``replay="mean"`` / ``"sum"``, :mod:`.inrun_replay`): no hook runs
  during training, and the per-example dots are recomputed at the flush from ``θ_t`` and the batch, checked against
  the step's real ``p.grad``.

Then it computes the K validation gradients ``g_val(θ_t)`` in one ``torch.func.vmap`` of ``torch.func.grad`` over the
stacked snapshots (the same function of ``θ_t`` as the per-step validation backward; if the model cannot be vmapped,
one ``torch.func.grad`` per snapshot), and every step's dots ``⟨g_z, s ⊙ g_val⟩`` in one batched product per
parameter (capture) or one vmapped forward-mode derivative of the per-example losses along ``s ⊙ g_val`` (replay).

Validation budget: with ``validation_subsample=k`` every step gets its own uniform sample of k validation examples
without replacement (drawn for the K steps at once at the flush, by :func:`draw_samples` from the seeded generator:
not the per-step route's draws, the same distribution), the rows are gathered into ``(K, k, ...)`` and vmapped with
the snapshots, and the gradient is scaled by ``n_val/k``: an unbiased estimate of the full-validation value, at
``k/n_val`` of the validation cost.

Values are those of the per-step route to float rounding; only *when* they are computed changes:
:meth:`InRunShapley.values` and :meth:`InRunShapley.close` flush what is pending. Memory: K snapshots of the
parameters and buffers, and K steps of per-example factors (capture) or of ``p.grad`` (replay), so this is for small
models. SGD (with or without momentum) only: Adam's ``s`` needs every step's finished gradient and state, which this
route does not keep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..capture.grads import ExampleGrads
from ..capture.pieces import Dense, Outer
from ..task import batch_size, map_tensors


@dataclass
class PendingStep:
    """One recorded optimizer step: its number, its micro-batches ``[(ids (N,), ExampleGrads or None)]`` (None on
    the replay route), its slot in the snapshot buffers, ``s`` per tracked parameter (learning rate × momentum
    factor × clipping), the clipping factor and, on the replay route, the batch given to ``step(ids, batch)``
    (None: looked up by id in ``data``)."""

    step: int
    micro: list[tuple[Any, ExampleGrads | None]]
    slot: int
    shares: dict[str, float]
    clip: float = 1.0
    batch: Any = None


class Snapshots:
    """Preallocated ``(capacity, *shape)`` copies of a list of named tensors; :meth:`take` fills one slot with one
    ``torch._foreach_copy_`` (no dict of clones per step, no ``torch.stack`` at the flush)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.names: list[str] = []
        self.data: dict[str, Tensor] = {}
        self._views: list[list[Tensor]] = []
        self._key: tuple = ()

    def bind(self, named: list[tuple[str, Tensor]]) -> None:
        """(Re)allocate the buffers unless they already fit these names, shapes, dtypes and devices."""
        key = tuple((k, t.shape, t.dtype, t.device) for k, t in named)
        if key == self._key:
            return
        self._key, self.names = key, [k for k, _ in named]
        # zeros, not empty: the pages are touched here once, not faulted in by the copies inside the training loop
        self.data = {k: torch.zeros((self.capacity, *t.shape), dtype=t.dtype, device=t.device) for k, t in named}
        bufs = list(self.data.values())
        self._views = [[b[i] for b in bufs] for i in range(self.capacity)]

    def take(self, slot: int, tensors: list[Tensor]) -> None:
        """Copy ``tensors`` (in :attr:`names` order) into ``slot``."""
        if tensors:
            with torch.no_grad():
                torch._foreach_copy_(self._views[slot], tensors)

    def rows(self, slots: list[int]) -> dict[str, Tensor]:
        """``{name: (len(slots), *shape)}``: the buffers themselves when the slots are all of them (not a view:
        forward-mode AD copies a view's whole base), a view when they are 0..n-1, else a gathered copy."""
        if len(slots) == self.capacity and slots == list(range(self.capacity)):
            return dict(self.data)
        if slots == list(range(len(slots))):
            return {k: v[: len(slots)] for k, v in self.data.items()}
        index = torch.tensor(slots)
        return {k: v[index.to(v.device)] for k, v in self.data.items()}


class _Measured(nn.Module):
    """``task.measurement(model, batch)`` as a module, so that ``torch.func.functional_call`` can run it with other
    parameter values (``inner.<name>``)."""

    def __init__(self, task, inner: nn.Module):
        super().__init__()
        self.task, self.inner = task, inner

    def forward(self, batch):
        return self.task.measurement(self.inner, batch)


class DeferredSteps:
    """The pending steps of the batched route and the computation of their values (see the module docstring).

    model: the (inner) model; task: its Task; batches: a function returning all validation batches; names: the
    tracked parameters whose values are computed; eval_mode: a context manager factory that puts the model in eval
    mode for the validation side; capacity: K. validation, subsample, generator: under a per-step validation
    subsample, the validation batch of tensors, k and the sampler's generator. replay: None (capture) or the
    reduction of the user's loss over the batch (``"mean"`` or ``"sum"``); data: the training examples by id for
    replay."""

    def __init__(self, model: nn.Module, task, batches: Callable[[], Iterator], names: list[str],
                 eval_mode: Callable, capacity: int, *, validation: Any = None, subsample: int | None = None,
                 generator: torch.Generator | None = None, replay: str | None = None, data: Any = None):
        self.model, self.task, self.batches, self.names, self.eval_mode = model, task, batches, names, eval_mode
        if validation is not None and isinstance(validation, Dataset):
            raise ValueError("defer_steps with validation_subsample needs the validation as a batch of tensors (a "
                             "tensor, tuple/list or dict of tensors, examples first), not a Dataset")
        self.validation, self.subsample, self.generator = validation, subsample, generator
        self.n_val = None if validation is None else batch_size(validation)
        self.wrapper = _Measured(task, model)
        self.pending: list[PendingStep] = []
        self.params, self.buffers = Snapshots(capacity), Snapshots(capacity)
        self._tensors: tuple[list, list] | None = None  # (parameters, buffers) of this window, in buffer order
        self.vmap_ok = True  # set False once the model fails under vmap: one grad per snapshot from then on
        self.replay = None
        if replay is not None:
            from .inrun_replay import Replay  # the replay route's own file; it imports this one

            self.replay = Replay(self, replay, data)

    def snapshot(self) -> int:
        """Copy every parameter and buffer now (``θ_t``, and the buffers an eval-mode forward reads) into the next
        slot; returns the slot. The model's tensors are listed afresh at the start of each window of K steps."""
        if not self.pending or self._tensors is None:
            params, buffers = list(self.model.named_parameters()), list(self.model.named_buffers())
            self.params.bind(params)
            self.buffers.bind(buffers)
            self._tensors = ([p for _, p in params], [b for _, b in buffers])
            if self.replay is not None:
                self.replay.bind()
        if self.replay is not None:
            self.replay.check_modes()
        slot = len(self.pending)
        self.params.take(slot, self._tensors[0])
        self.buffers.take(slot, self._tensors[1])
        return slot

    def add(self, step: PendingStep) -> None:
        """Keep a finished step (its snapshot is in ``step.slot``; the replay route copies ``p.grad`` now)."""
        if step.slot != len(self.pending):
            raise RuntimeError(f"step {step.step}: snapshot slot {step.slot} but {len(self.pending)} steps pending")
        if self.replay is not None:
            self.replay.record(step)
        self.pending.append(step)

    def values(self) -> list[tuple[int, list[tuple[object, Tensor]]]]:
        """Values of every pending step: ``[(step, [(ids, values (N,) float64), ...])]``; clears the pending steps."""
        steps, self.pending = self.pending, []
        if not steps:
            return []
        grads = self._validation_grads(steps)  # name -> (K, *shape)
        if self.replay is not None:
            found = self.replay.values(steps, grads)
            return [(st.step, [(st.micro[0][0], found[k])]) for k, st in enumerate(steps)]
        # steps of one structure (micro-batch sizes, pieces) are stacked together: an epoch's last, smaller batch
        # forms its own group
        groups: dict[tuple, list[int]] = {}
        for k, st in enumerate(steps):
            groups.setdefault(_step_structure(st), []).append(k)
        dots: dict[int, list[Tensor]] = {}
        for key, members in groups.items():
            if key is None:
                continue
            index = torch.tensor(members, device=next(iter(grads.values())).device)
            found = _batched_dots([steps[k] for k in members], {n: g[index] for n, g in grads.items()}, self.names)
            for row, k in enumerate(members):
                dots[k] = [d[row] for d in found]
        out = []
        for k, st in enumerate(steps):
            per_micro = []
            for j, (ids, g) in enumerate(st.micro):
                if k in dots:
                    per_micro.append((ids, dots[k][j]))
                    continue
                w = {name: grads[name][k] * st.shares[name] for name in self.names
                     if name in g.pieces and name in st.shares}
                per_micro.append((ids, g.dot(w)[:, 0].to(torch.float64) if w else
                                  torch.zeros(g.n, dtype=torch.float64)))
            out.append((st.step, per_micro))
        return out

    def stacked(self, slots: list[int]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The snapshots of ``slots``: tracked parameters ``{name: (K, *shape)}`` and everything else (untracked
        parameters and buffers) the same way."""
        params = self.params.rows(slots)
        tracked = {k: params[k] for k in self.names}
        fixed = {k: v for k, v in params.items() if k not in tracked}
        fixed.update(self.buffers.rows(slots))
        return tracked, fixed

    def draw(self, steps: list[PendingStep]) -> Tensor:
        """The steps' validation samples under a budget, ``(K, k)`` (:func:`draw_samples`)."""
        return draw_samples(len(steps), self.n_val, int(self.subsample), self.generator)

    def _validation_grads(self, steps: list[PendingStep]) -> dict[str, Tensor]:
        """``Σ_val ∇θ measurement`` at every step's snapshot (times ``n/k`` on its sample under a validation
        budget), ``{name: (K, *shape)}``."""
        sampled = self.subsample is not None
        factor = 1.0
        if sampled:
            from .inrun import _take  # rows of a batch of tensors (inrun imports this module)

            index = self.draw(steps)  # (K, k)
            batches = [_take(self.validation, index)]  # every tensor (K, k, ...): vmapped with the snapshots
            factor = self.n_val / int(self.subsample)
        else:
            batches = list(self.batches())

        def loss(params: dict[str, Tensor], fixed: dict[str, Tensor], data: list) -> Tensor:
            state = {f"inner.{k}": v for k, v in {**fixed, **params}.items()}
            total = sum(torch.func.functional_call(self.wrapper, state, (b,)).sum() for b in data)
            return total * factor if factor != 1.0 else total

        grad = torch.func.grad(loss)
        stacked, fixed = self.stacked([st.slot for st in steps])
        data_dims = 0 if sampled else None
        with torch.enable_grad(), self.eval_mode():
            if self.vmap_ok:
                try:
                    return torch.func.vmap(grad, in_dims=(0, 0, data_dims))(stacked, fixed, batches)
                except Exception:  # noqa: BLE001  (an op without a batching rule, data-dependent control flow)
                    self.vmap_ok = False
            parts = [grad({k: v[i] for k, v in stacked.items()}, {k: v[i] for k, v in fixed.items()},
                          [_row(b, i) for b in batches] if sampled else batches)
                     for i in range(len(steps))]
        return {k: torch.stack([p[k] for p in parts]) for k in self.names}


def draw_samples(steps: int, n: int, k: int, generator: torch.Generator | None) -> Tensor:
    """``(steps, k)`` indices: for every step an independent uniform sample of k of ``0..n-1`` without replacement
    (the first k of a random permutation per row, from one ``torch.rand``), sorted."""
    return torch.rand((steps, n), generator=generator).argsort(1)[:, :k].sort(1).values


def _row(batch: Any, i: int) -> Any:
    """Row ``i`` of every tensor of a batch stacked over steps (a tensor, or a tuple/list/dict of tensors)."""
    return map_tensors(lambda t: t[i], batch, "cannot take a step's row of a")


def _step_structure(st: PendingStep) -> tuple | None:
    """What must match for steps to be stacked (:func:`_batched_dots`): the parameters with a share and every
    micro-batch's pieces; None when a piece cannot be stacked (several pieces of one parameter)."""
    parts = [_structure(g) for _, g in st.micro]
    return None if any(p is None for p in parts) else (tuple(st.shares), tuple(parts))


def _batched_dots(steps: list[PendingStep], grads: dict[str, Tensor], names: list[str]) -> list[Tensor]:
    """``Σ_name ⟨g_z, s ⊙ g_val⟩`` for every micro-batch j of every step k as ``dots[j]`` ``(K, N)`` float64, in one
    batched product per parameter, for steps of one :func:`_step_structure`; ``grads`` ``{name: (K, *shape)}``."""
    first = steps[0]
    out = []
    for j in range(len(first.micro)):
        parts = [st.micro[j][1] for st in steps]
        total = None
        for name in names:
            if name not in parts[0].pieces or name not in first.shares:
                continue
            s = torch.tensor([st.shares[name] for st in steps], dtype=grads[name].dtype, device=grads[name].device)
            w = grads[name] * s.reshape(-1, *([1] * (grads[name].dim() - 1)))  # (K, *shape): s ⊙ g_val per step
            term = _stacked_dot([p.pieces[name][0] for p in parts], w)
            total = term if total is None else total + term
        if total is None:
            total = torch.zeros(len(steps), parts[0].n, dtype=torch.float64)
        out.append(total.to(torch.float64))
    return out


def _structure(g: ExampleGrads) -> tuple | None:
    """What must match for the steps' pieces to be stacked: one piece per parameter, its kind and shapes."""
    out = []
    for name, ps in g.pieces.items():
        if len(ps) != 1:
            return None
        p = ps[0]
        if isinstance(p, Outer):
            out.append((name, "outer", tuple(p.u.shape), tuple(p.v.shape), p.m, p.n, p.unit, p.u.dtype, p.v.dtype))
        else:
            out.append((name, "dense", tuple(p.g.shape), p.g.dtype))
    return tuple(out)


def _stacked_dot(pieces: list, w: Tensor) -> Tensor:
    """``⟨g_i^(k), W_k⟩`` for K same-shaped pieces and ``w`` ``(K, *shape)``: ``(K, N)``."""
    k = len(pieces)
    a = pieces[0]
    if isinstance(a, Dense):
        g = torch.stack([p.g for p in pieces])  # (K, N, numel)
        return torch.bmm(g, w.reshape(k, -1, 1).to(g.dtype)).squeeze(-1)
    n_ex, t = a.v.shape[:2]
    wm = w.reshape(k, a.m, a.n).to(a.v.dtype)
    if a.indexed:
        idx = torch.stack([p.u.reshape(-1) for p in pieces])  # (K, N·T)
        rows = wm[torch.arange(k, device=idx.device)[:, None], idx]  # (K, N·T, n): W_k[idx]
    else:
        rows = torch.bmm(torch.stack([p.u.reshape(n_ex * t, a.m) for p in pieces]), wm)  # (K, N·T, n)
    if a.unit:
        dots = rows.reshape(k, n_ex, t)
    else:
        v = torch.stack([p.v.reshape(n_ex * t, a.n) for p in pieces])
        dots = (rows * v).sum(-1).reshape(k, n_ex, t)
    return dots.sum(-1)

