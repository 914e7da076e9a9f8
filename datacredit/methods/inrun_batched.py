"""First-order In-Run values of K optimizer steps computed together (``InRunShapley(..., defer_steps=K)``).

On a small model a step's validation forward/backward and its per-layer dots are a few dozen tiny operations, each
costing more in Python and dispatch than in arithmetic (the digits MLP of ``datacredit demo``: a validation pass of
329 images costs about as much as a whole training step). This route keeps, for each of K steps, the parameters
``θ_t`` the training forward used (a snapshot taken when the step's first micro-batch begins), the examples' factored
gradients (the deferred capture) and ``s`` (learning rate times clipping, per parameter), and then:

* computes the K validation gradients ``g_val(θ_t)`` in one ``torch.func.vmap`` of ``torch.func.grad`` over the
  stacked snapshots (the same function of ``θ_t`` as the per-step validation backward; if the model cannot be
  vmapped, one ``torch.func.grad`` per snapshot);
* takes every step's val-first dots ``Σ_t u_tᵀ (s ⊙ g_val) v_t`` in one batched matmul per parameter.

Values are the exact first-order values of those steps (the same numbers as the per-step route, to float rounding);
only *when* they are computed changes: :meth:`InRunShapley.values` and :meth:`InRunShapley.close` flush what is
pending. Memory: K snapshots of the parameters and buffers, and K steps of per-example factors (layer inputs and
output gradients), so this is for small models. SGD (with or without momentum) only: Adam's ``s`` needs every step's
finished gradient and state, which this route does not keep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..capture.grads import ExampleGrads
from ..capture.pieces import Dense, Outer


@dataclass
class PendingStep:
    """One recorded optimizer step: its number, its micro-batches ``[(ids (N,), ExampleGrads)]``, the parameters
    and buffers it started from, and ``s`` per tracked parameter (learning rate × momentum factor × clipping)."""

    step: int
    micro: list[tuple[object, ExampleGrads]]
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    shares: dict[str, float]


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

    model: the (inner) model; task: its Task; batches: a function returning the validation batches (all of them: no
    budget on this route); names: the tracked parameters whose values are computed; eval_mode: a context manager
    factory that puts the model in eval mode for the validation side."""

    def __init__(self, model: nn.Module, task, batches: Callable[[], Iterator], names: list[str],
                 eval_mode: Callable):
        self.model, self.batches, self.names, self.eval_mode = model, batches, names, eval_mode
        self.wrapper = _Measured(task, model)
        self.pending: list[PendingStep] = []
        self._tensors: tuple[list, list] | None = None  # (named parameters, named buffers) of this window
        self.vmap_ok = True  # set False once the model fails under vmap: one grad per snapshot from then on

    def snapshot(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Copies of every parameter and buffer now (``θ_t``, and the buffers an eval-mode forward reads). The
        model's tensors are listed afresh at the start of each window of K steps (a walk over the modules)."""
        if not self.pending or self._tensors is None:
            self._tensors = (list(self.model.named_parameters()), list(self.model.named_buffers()))
        params, buffers = self._tensors
        with torch.no_grad():
            return {k: p.detach().clone() for k, p in params}, {k: b.detach().clone() for k, b in buffers}

    def values(self) -> list[tuple[int, list[tuple[object, Tensor]]]]:
        """Values of every pending step: ``[(step, [(ids, values (N,) float64), ...])]``; clears the pending steps."""
        steps, self.pending = self.pending, []
        if not steps:
            return []
        grads = self._validation_grads(steps)  # name -> (K, *shape)
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

    def _validation_grads(self, steps: list[PendingStep]) -> dict[str, Tensor]:
        """``Σ_val ∇θ measurement`` at every step's snapshot, ``{name: (K, *shape)}``."""
        batches = list(self.batches())
        names = self.names

        def loss(params: dict[str, Tensor], fixed: dict[str, Tensor]) -> Tensor:
            state = {f"inner.{k}": v for k, v in {**fixed, **params}.items()}
            return sum(torch.func.functional_call(self.wrapper, state, (b,)).sum() for b in batches)

        grad = torch.func.grad(loss)
        stacked = {k: torch.stack([st.params[k] for st in steps]) for k in names}
        rest_names = [k for k in steps[0].params if k not in stacked]
        fixed = {k: torch.stack([st.params[k] for st in steps]) for k in rest_names}
        fixed.update({k: torch.stack([st.buffers[k] for st in steps]) for k in steps[0].buffers})
        with torch.enable_grad(), self.eval_mode():
            if self.vmap_ok:
                try:
                    return torch.func.vmap(grad)(stacked, fixed)
                except Exception:  # noqa: BLE001  (an op without a batching rule, data-dependent control flow)
                    self.vmap_ok = False
            parts = [grad({k: v[i] for k, v in stacked.items()}, {k: v[i] for k, v in fixed.items()})
                     for i in range(len(steps))]
        return {k: torch.stack([p[k] for p in parts]) for k in names}


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

