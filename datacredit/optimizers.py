"""What one optimizer step does, written as an affine function of the gradient it is about to use.

For every parameter, the step about to be taken is ``θ_{t+1} = θ_t − D`` with ``D = s ⊙ grad + c0``:

* ``s`` — the diagonal preconditioner times the learning rate (a scalar for SGD, a tensor for Adam);
* ``c0`` — the part of the step that does not depend on this step's gradient (momentum carried from earlier steps,
  weight decay).

In-Run Shapley uses it to split the real update into per-example shares ``s ⊙ g_z`` plus a baseline. Adam's second
moment ``v_t`` depends on the current gradient; it is fixed at the value the optimizer is about to use (DESIGN.md: the
preconditioner at step t). One function per optimizer class in a registry, keyed by type (subclasses match).
Call :func:`affine_step` *before* ``optimizer.step()`` (e.g. from a step pre-hook), with ``p.grad`` final.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .errors import DataCreditError

Rule = Callable[[torch.optim.Optimizer, dict, Tensor], tuple[Tensor | float, Tensor | None]]
_RULES: dict[type, Rule] = {}


def register(cls: type) -> Callable[[Rule], Rule]:
    def wrap(fn: Rule) -> Rule:
        if cls in _RULES:
            raise ValueError(f"an optimizer rule for {cls.__name__} is already registered")
        _RULES[cls] = fn
        return fn

    return wrap


def _check(group: dict, name: str, unsupported: dict) -> None:
    bad = {k: group.get(k) for k, off in unsupported.items() if group.get(k, off) != off}
    if bad:
        raise DataCreditError(f"In-Run Shapley does not model {name} with {bad}")


@register(torch.optim.SGD)
def _sgd(opt: torch.optim.Optimizer, group: dict, p: Tensor) -> tuple[Tensor | float, Tensor | None]:
    """``d = grad + λθ``; momentum ``buf = μ·buf + (1−δ)·d`` (first step ``buf = d``); Nesterov ``d + μ·buf``."""
    _check(group, "SGD", {"maximize": False})
    lr, mu, damp, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
    decay = wd * p.detach() if wd else None
    buf = opt.state.get(p, {}).get("momentum_buffer") if mu else None
    if not mu:
        return lr, None if decay is None else lr * decay
    first = buf is None
    coef = 1.0 if first else 1.0 - damp  # how much of d enters the buffer
    carried = None if first else mu * buf
    if group["nesterov"]:
        s = lr * (1.0 + mu * coef)
        c0 = None if carried is None else lr * mu * carried
    else:
        s = lr * coef
        c0 = None if carried is None else lr * carried
    if decay is not None:
        c0 = s * decay if c0 is None else c0 + s * decay
    return s, c0


def _adam(opt: torch.optim.Optimizer, group: dict, p: Tensor, decoupled: bool) -> tuple[Tensor, Tensor | None]:
    """``m = β1·m + (1−β1)·g``, ``v = β2·v + (1−β2)·g²``, ``θ −= lr·(m/bc1) / (√(v/bc2) + ε)``."""
    _check(group, type(opt).__name__, {"amsgrad": False, "maximize": False})
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    lr = float(lr)
    state = opt.state.get(p, {})
    k = int(state["step"]) + 1 if "step" in state else 1
    m = state.get("exp_avg", torch.zeros_like(p))
    v = state.get("exp_avg_sq", torch.zeros_like(p))
    theta = p.detach()
    grad = p.grad.detach()
    if wd and not decoupled:
        grad = grad + wd * theta
    bc1, bc2 = 1 - b1**k, 1 - b2**k
    v_new = b2 * v + (1 - b2) * grad * grad
    denom = (v_new.sqrt() / bc2**0.5) + eps
    s = lr * (1 - b1) / bc1 / denom
    c0 = lr * b1 * m / bc1 / denom
    if wd and not decoupled:
        c0 = c0 + s * wd * theta
    if wd and decoupled:
        # AdamW shrinks θ first, then steps: D = lr·λ·θ + step (the step does not depend on θ)
        c0 = c0 + lr * wd * theta
    return s, c0


@register(torch.optim.Adam)
def _adam_l2(opt, group, p):
    return _adam(opt, group, p, decoupled=bool(group.get("decoupled_weight_decay", False)))


@register(torch.optim.AdamW)
def _adamw(opt, group, p):
    return _adam(opt, group, p, decoupled=True)


def _rule(opt: torch.optim.Optimizer) -> Rule:
    for cls in type(opt).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    supported = ", ".join(c.__name__ for c in _RULES)
    raise DataCreditError(f"In-Run Shapley cannot model {type(opt).__name__}; supported optimizers: {supported}")


def affine_step(opt: torch.optim.Optimizer) -> dict[Tensor, tuple[Tensor | float, Tensor | None]]:
    """``{param: (s, c0)}`` for every parameter the next ``opt.step()`` will move (those with a gradient)."""
    rule = _rule(opt)
    out = {}
    with torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    out[p] = rule(opt, group, p)
    return out
