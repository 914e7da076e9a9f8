"""The replay route of the batched In-Run values (``InRunShapley(..., defer_steps=K, replay="mean")``).

During training nothing is captured: per step the route keeps ``θ_t`` (a slot of the snapshot buffers), the batch
(or only its ids, looked up in ``data`` at the flush), ``s`` and the step's real ``p.grad`` of every tracked
parameter (one ``torch._foreach_copy_``). At the flush, for the steps of a window stacked together,

    value_z = α · d/dε ℓ_z(θ_t + ε · s ⊙ g_val(θ_t)) |_{ε=0} = α · ⟨∇ℓ_z(θ_t), s ⊙ g_val⟩

one forward-mode derivative (``torch.func.jvp``) of the task's per-example training losses ``ℓ_z`` along
``s ⊙ g_val``, vmapped over the steps; ``α`` is ``1/N`` when the user's loss is ``task.loss(...).mean()``
(``replay="mean"``), ``1`` for ``.sum()``. No per-example gradient is formed; cost about two forwards of the batch
per step. Sign as everywhere: positive = the example lowered the validation loss.

This is exact only if the forward is a deterministic function of (parameters, buffers, batch) and the loss the user
backpropagated is ``α · Σ_z ℓ_z``. Both are checked, never assumed:

* up front, and at every step: no dropout with ``p > 0`` and no batch norm in training mode (they make ``ℓ_z``
  random or coupled to the rest of the batch); a ``ValueError`` names the module;
* at the flush, for every step: ``Σ_z value_z`` must equal ``⟨p.grad, s ⊙ g_val⟩ / clip`` summed over the tracked
  parameters, with ``p.grad`` the gradient the optimizer really received, up to float rounding (measured against
  the sum of absolute terms). A different loss scale or per-example weights, a regulariser on tracked parameters,
  randomness in the forward, a batch (or ``data``) changed in place after the step, ``p.grad`` modified by hand:
  any of these raises :class:`~datacredit.errors.DataCreditError` naming the step and both numbers. Never a warning.

One micro-batch per optimizer step (gradient accumulation takes the capture route), no GradScaler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.utils.data import default_collate

from ..dataset import example_ids
from ..errors import DataCreditError, DataError
from ..task import map_tensors, to_device
from .inrun_batched import PendingStep, Snapshots, _row

if TYPE_CHECKING:
    from .inrun_batched import DeferredSteps

# modules whose training-mode forward is random or couples the examples of a batch
_RANDOM = (nn.modules.dropout._DropoutNd, nn.RReLU)
_COUPLED = (nn.modules.batchnorm._BatchNorm,)
TOLERANCE_EPS = 4096  # the check's tolerance in units of the dtype's eps, relative to the sum of absolute terms


class _Losses(nn.Module):
    """``task.loss(model, batch)`` (per-example, ``(N,)``) as a module for ``torch.func.functional_call``."""

    def __init__(self, task, inner: nn.Module):
        super().__init__()
        self.task, self.inner = task, inner

    def forward(self, batch):
        return self.task.loss(self.inner, batch)


class Replay:
    """The replay route's state: the open step's batch, the recorded ``p.grad`` per slot, the module modes of the
    window, and the computation of the values (module docstring). reduction: ``"mean"`` or ``"sum"``."""

    def __init__(self, deferred: DeferredSteps, reduction: str, data: Any):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"replay must be 'mean' or 'sum' (how the training loss reduces task.loss over the "
                             f"batch), got {reduction!r}")
        self.deferred, self.reduction, self.data = deferred, reduction, data
        model = deferred.model
        self.losses = _Losses(deferred.task, model)
        self.grads = Snapshots(deferred.params.capacity)
        self.risky = [(name or type(model).__name__, m) for name, m in model.named_modules()
                      if isinstance(m, _RANDOM + _COUPLED)]
        self.check_modes()
        self._tracked: list[Tensor] = []
        self._modes: list[tuple[nn.Module, bool]] = []
        self._open: tuple[np.ndarray, Any] | None = None
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None  # (sorted ids, their rows) of data

    def bind(self) -> None:
        """At a window's start: the tracked parameters' gradient buffers and every module's training flag."""
        named = dict(self.deferred.model.named_parameters())
        tracked = [(k, named[k]) for k in self.deferred.names]
        self.grads.bind(tracked)
        self._tracked = [p for _, p in tracked]
        self._modes = [(m, m.training) for m in self.deferred.model.modules()]

    def check_modes(self) -> None:
        """Refuse a module whose training-mode forward is random (dropout, RReLU) or couples the batch (batch
        norm): the replayed losses would not be the ones the model was trained on."""
        for name, m in self.risky:
            if m.training and not (isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0):
                raise ValueError(f"replay: module {name!r} ({type(m).__name__}) is in training mode, so its forward "
                                 "is random or couples the examples of a batch and cannot be replayed; use "
                                 "defer_steps without replay (the capture route), or put it in eval mode")

    def open(self, ids: np.ndarray, batch: Any) -> None:
        """A micro-batch begins: keep its ids and batch (None: looked up by id in ``data`` at the flush)."""
        if self._open is not None:
            raise ValueError("replay takes one micro-batch per optimizer step; this step got a second one (gradient "
                             "accumulation): use defer_steps without replay")
        if batch is None and self.data is None:
            raise ValueError("replay needs each step's batch: call step(ids, batch), or give data= (the training "
                             "examples, looked up by id)")
        self._open = (ids, batch)

    def record(self, step: PendingStep) -> None:
        """The step's optimizer pre-hook: its ids and batch, and a copy of ``p.grad`` into the step's slot."""
        if self._open is None:
            raise RuntimeError(f"replay: step {step.step} reached optimizer.step() without a recorded micro-batch")
        (ids, batch), self._open = self._open, None
        step.micro, step.batch = [(ids, None)], batch
        grads = [p.grad for p in self._tracked]
        if any(g is None for g in grads):
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self._tracked, grads)]
        self.grads.take(step.slot, grads)

    def values(self, steps: list[PendingStep], grads: dict[str, Tensor]) -> list[Tensor]:
        """``values_z`` ``(N,)`` float64 of every step (module docstring), each step checked against its
        ``p.grad``; ``grads`` ``{name: (K, *shape)}`` the validation gradients of the steps. All K steps go through
        one vmapped call: a smaller batch (an epoch's last) is padded with copies of its last example, whose
        values are dropped (per-example losses do not see each other: the check fails where they do)."""
        sizes = [len(st.micro[0][0]) for st in steps]
        n = max(sizes)
        shape = (len(steps),)
        tangent = {}
        for name in self.deferred.names:
            s = torch.tensor([st.shares.get(name, 0.0) for st in steps], dtype=grads[name].dtype)
            g = grads[name]
            tangent[name] = g * s.to(g.device).reshape(*shape, *([1] * (g.dim() - 1)))  # s ⊙ g_val per step
        found = self._dots(steps, tangent, n)  # (K, N): ⟨∇ℓ_z, s ⊙ g_val⟩, padded rows included
        real = torch.arange(n, device=found.device) < torch.tensor(sizes, device=found.device)[:, None]
        per = torch.tensor(sizes, dtype=found.dtype, device=found.device)[:, None]
        found = torch.where(real, found / per if self.reduction == "mean" else found, 0)
        self._check(steps, tangent, found)
        return [found[k, : sizes[k]].to(torch.float64) for k in range(len(steps))]

    def _dots(self, steps: list[PendingStep], tangent: dict[str, Tensor], n: int) -> Tensor:
        """``⟨∇ℓ_z(θ_t), tangent_t⟩`` ``(K, n)`` for every step's batch padded to n examples: the per-example losses
        of the vmapped forward, with the stacked snapshots as forward-mode duals along the tangents."""
        tracked, fixed = self.deferred.stacked([st.slot for st in steps])
        batch = self._batch(steps, n)

        def losses(params, rest, data):
            state = {f"inner.{k}": v for k, v in {**rest, **params}.items()}
            return torch.func.functional_call(self.losses, state, (data,))

        with fwAD.dual_level(), self._recorded_modes():
            duals = {k: fwAD.make_dual(v, tangent[k]) for k, v in tracked.items()}
            if self.deferred.vmap_ok:
                try:
                    out = torch.func.vmap(losses)(duals, fixed, batch)
                except Exception:  # noqa: BLE001  (an op without a batching rule, data-dependent control flow)
                    self.deferred.vmap_ok = False
            if not self.deferred.vmap_ok:
                out = torch.stack([losses(*(_row(x, i) for x in (duals, fixed, batch))) for i in range(len(steps))])
            found = fwAD.unpack_dual(out).tangent
        if found is None or found.shape != (len(steps), n):
            shape = None if found is None else tuple(found.shape[1:])
            raise DataError(f"replay: task.loss gave per-example derivatives of shape {shape} for a batch of {n} "
                            "examples; it must return the per-example losses (N,) of the tracked parameters")
        return found

    def _check(self, steps: list[PendingStep], tangent: dict[str, Tensor], found: Tensor) -> None:
        """``Σ_z value_z`` against ``⟨p.grad, s ⊙ g_val⟩ / clip`` per step (module docstring); raises on mismatch.
        ``found`` ``(K, N)``: the values, zero in padded rows."""
        recorded = self.grads.rows([st.slot for st in steps])
        k = len(steps)
        dot = size = None
        for name, t in tangent.items():
            prod = recorded[name].reshape(k, -1) * t.reshape(k, -1).to(recorded[name].dtype)
            d, a = prod.sum(1), prod.abs_().sum(1)
            dot, size = (d, a) if dot is None else (dot + d, size + a)
        clip = torch.tensor([st.clip for st in steps], dtype=torch.float64)
        rhs = dot.to(torch.float64).cpu() / clip
        scale = size.to(torch.float64).cpu() / clip + found.abs().sum(1).to(torch.float64).cpu()
        lhs = found.sum(1).to(torch.float64).cpu()
        tol = TOLERANCE_EPS * torch.finfo(found.dtype).eps
        bad = ((lhs - rhs).abs() > tol * scale + torch.finfo(found.dtype).tiny).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise DataCreditError(
                f"replay: at step {steps[i].step} the replayed per-example losses do not explain the gradient the "
                f"optimizer received: Σ_z value_z = {float(lhs[i]):.6g} but ⟨p.grad, s ⊙ g_val⟩ = "
                f"{float(rhs[i]):.6g} (tolerance {float(tol * scale[i]):.3g}; {len(bad)} of {k} steps of this "
                f"window differ). The loss backpropagated must be task.loss(model, batch).{self.reduction}() of a "
                "deterministic forward, on the batch as it was (not changed in place afterwards), with p.grad "
                "untouched before optimizer.step() (clip with InRunShapley.clip_grad_norm_). Use defer_steps "
                "without replay (the capture route) otherwise.")

    def _batch(self, steps: list[PendingStep], n: int) -> Any:
        """The steps' batches padded to n examples and stacked, every tensor ``(K, n, ...)``."""
        if steps[0].batch is not None:
            return _stack([_pad(st.batch, n) for st in steps])
        ids = np.stack([_pad_ids(np.asarray(st.micro[0][0], dtype=np.int64), n) for st in steps])  # (K, n)
        rows = self._rows(ids)
        device = next(iter(self.deferred.params.data.values())).device  # the snapshots' (the model's)
        tensors = getattr(self.data, "tensors", None)
        if tensors is not None:
            index = torch.from_numpy(rows)
            return tuple(t[index.to(t.device)].to(device) for t in tensors)
        stacked = _stack([default_collate([self.data[int(r)] for r in step_rows]) for step_rows in rows])
        return to_device(stacked, device)

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``data`` holding ``ids`` (any shape); DataError naming an id ``data`` does not have."""
        if self._lookup is None:
            known = example_ids(self.data)
            order = np.argsort(known, kind="stable")
            self._lookup = (known[order], order)
        known, order = self._lookup
        pos = np.searchsorted(known, ids).clip(0, len(known) - 1)
        missing = known[pos] != ids
        if missing.any():
            raise DataError(f"replay: example id {int(ids[missing][0])} is not in data= ({len(known)} examples)")
        return order[pos]

    @contextlib.contextmanager
    def _recorded_modes(self) -> Iterator[None]:
        """Every module in the training flag it had when the window began (the flush may run after ``eval()``)."""
        now = [(m, m.training) for m, _ in self._modes]
        for m, flag in self._modes:
            object.__setattr__(m, "training", flag)
        try:
            yield
        finally:
            for m, flag in now:
                object.__setattr__(m, "training", flag)



def _pad_ids(ids: np.ndarray, n: int) -> np.ndarray:
    """``ids`` ``(N,)`` padded to n with copies of the last."""
    return ids if len(ids) == n else np.concatenate([ids, np.repeat(ids[-1:], n - len(ids))])


def _pad(batch: Any, n: int) -> Any:
    """Every tensor of a batch padded to n examples with copies of its last row."""
    return map_tensors(lambda t: t if len(t) == n else torch.cat([t, t[-1:].expand(n - len(t), *t.shape[1:])]),
                       batch, "replay can stack batches of tensors (a tensor, tuple/list or dict of them), not")


def _stack(batches: list[Any]) -> Any:
    """Batches of one structure (a tensor, or a tuple/list/dict of tensors) stacked over steps: ``(G, N, ...)``."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.stack(batches)
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([b[i] for b in batches]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _stack([b[k] for b in batches]) for k in first}
    raise ValueError(f"replay can stack batches of tensors (a tensor, tuple/list or dict of them), not "
                     f"{type(first).__name__}")
