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
ScaleRule = Callable[[torch.optim.Optimizer, dict, Tensor], Tensor | float]
_RULES: dict[type, Rule] = {}
_SCALES: dict[type, ScaleRule] = {}  # s alone (first order needs no baseline); optional, else the full rule is used
_SCALAR = {torch.optim.SGD}  # optimizers whose s is one number per parameter group (never a tensor)


def register(cls: type) -> Callable[[Rule], Rule]:
    def wrap(fn: Rule) -> Rule:
        if cls in _RULES:
            raise ValueError(f"an optimizer rule for {cls.__name__} is already registered")
        _RULES[cls] = fn
        return fn

    return wrap


def _scale_of(cls: type) -> Callable[[ScaleRule], ScaleRule]:
    def wrap(fn: ScaleRule) -> ScaleRule:
        _SCALES[cls] = fn
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
    s = _sgd_scale(opt, group, p)
    lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
    decay = wd * p.detach() if wd else None
    buf = opt.state.get(p, {}).get("momentum_buffer") if mu else None
    if not mu:
        return lr, None if decay is None else lr * decay
    carried = None if buf is None else mu * buf
    if group["nesterov"]:
        c0 = None if carried is None else lr * mu * carried
    else:
        c0 = None if carried is None else lr * carried
    if decay is not None:
        c0 = s * decay if c0 is None else c0 + s * decay
    return s, c0


@_scale_of(torch.optim.SGD)
def _sgd_scale(opt: torch.optim.Optimizer, group: dict, p: Tensor) -> float:
    """``s`` of :func:`_sgd`: ``lr`` times how much of this step's gradient enters the update (a number)."""
    _check(group, "SGD", {"maximize": False})
    lr, mu, damp = group["lr"], group["momentum"], group["dampening"]
    if not mu:
        return lr
    first = opt.state.get(p, {}).get("momentum_buffer") is None
    coef = 1.0 if first else 1.0 - damp  # how much of d enters the buffer
    return lr * (1.0 + mu * coef) if group["nesterov"] else lr * coef


def _adam_parts(opt: torch.optim.Optimizer, group: dict, p: Tensor, decoupled: bool) -> tuple:
    """``(s, denom, lr, b1, bc1, m, theta, wd)`` of Adam's step about to be taken (see :func:`_adam`)."""
    _check(group, type(opt).__name__, {"amsgrad": False, "maximize": False})
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    lr = float(lr)
    state = opt.state.get(p, {})
    k = int(state["step"]) + 1 if "step" in state else 1
    v = state.get("exp_avg_sq")
    theta = p.detach()
    grad = p.grad.detach()
    if wd and not decoupled:
        grad = grad + wd * theta
    bc1, bc2 = 1 - b1**k, 1 - b2**k
    # v_new = β2·v + (1−β2)·g², in as few passes over the parameter as the arithmetic allows
    v_new = grad * grad * (1 - b2) if v is None else torch.addcmul(v * b2, grad, grad, value=1 - b2)
    denom = v_new.sqrt_().div_(bc2**0.5).add_(eps)
    s = torch.reciprocal(denom).mul_(lr * (1 - b1) / bc1)
    return s, denom, lr, b1, bc1, state.get("exp_avg"), theta, wd


def _adam(opt: torch.optim.Optimizer, group: dict, p: Tensor, decoupled: bool) -> tuple[Tensor, Tensor | None]:
    """``m = β1·m + (1−β1)·g``, ``v = β2·v + (1−β2)·g²``, ``θ −= lr·(m/bc1) / (√(v/bc2) + ε)``."""
    s, denom, lr, b1, bc1, m, theta, wd = _adam_parts(opt, group, p, decoupled)
    c0 = lr * b1 * (torch.zeros_like(p) if m is None else m) / bc1 / denom
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


@_scale_of(torch.optim.Adam)
def _adam_l2_scale(opt, group, p):
    return _adam_parts(opt, group, p, decoupled=bool(group.get("decoupled_weight_decay", False)))[0]


@_scale_of(torch.optim.AdamW)
def _adamw_scale(opt, group, p):
    return _adam_parts(opt, group, p, decoupled=True)[0]


def _rule(opt: torch.optim.Optimizer) -> Rule:
    for cls in type(opt).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    supported = ", ".join(c.__name__ for c in _RULES)
    raise DataCreditError(f"In-Run Shapley cannot model {type(opt).__name__}; supported optimizers: {supported}")


def step_scale(opt: torch.optim.Optimizer) -> dict[Tensor, Tensor | float]:
    """``{param: s}`` as in :func:`affine_step`, without the baseline ``c0`` (what first-order values need): for
    Adam about half the elementwise passes. Same values as ``affine_step(opt)[p][0]``."""
    rule = _rule(opt)
    scale = next((_SCALES[c] for c in type(opt).__mro__ if c in _SCALES and _RULES.get(c) is rule), None)
    out = {}
    if scale is _sgd_scale:  # one number per group: its settings are read once per group, not once per parameter
        for group in opt.param_groups:
            out.update(_sgd_group_scales(opt, group))
        return out
    with torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    out[p] = scale(opt, group, p) if scale is not None else rule(opt, group, p)[0]
    return out


def _sgd_group_scales(opt: torch.optim.Optimizer, group: dict) -> dict[Tensor, float]:
    """:func:`_sgd_scale` of every parameter of ``group`` that has a gradient (the same numbers)."""
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return {}
    _check(group, "SGD", {"maximize": False})
    lr, mu, damp = group["lr"], group["momentum"], group["dampening"]
    if not mu:
        return dict.fromkeys(params, lr)
    state, nesterov = opt.state, group["nesterov"]
    out = {}
    for p in params:
        first = state.get(p, {}).get("momentum_buffer") is None
        coef = 1.0 if first else 1.0 - damp  # how much of d enters the buffer
        out[p] = lr * (1.0 + mu * coef) if nesterov else lr * coef
    return out


def precondition(opt: torch.optim.Optimizer, vectors: dict[Tensor, Tensor],
                 factor: float = 1.0) -> dict[Tensor, Tensor]:
    """``factor · s ⊙ vectors[p]`` for every parameter in ``vectors`` that the next step moves (has a gradient).

    Same values as ``factor * step_scale(opt)[p] * vectors[p]``, in fewer passes over each parameter for Adam/AdamW:
    with ``κ = (1−β2)/β2``, ``√(v̂_t) = √(β2/bc2)·√(v + κ·g²)``, so ``s ⊙ d = c·d / (a·√(v + κ g²) + ε)`` is four
    elementwise passes (addcmul, sqrt, add with alpha, addcdiv) where ``s`` then ``s ⊙ d`` take nine. Other optimizers:
    ``s`` from :func:`step_scale` times ``d``."""
    rule = _rule(opt)
    adam = rule is _RULES[torch.optim.Adam] or rule is _RULES[torch.optim.AdamW]
    out = {}
    with torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is None or p not in vectors:
                    continue
                if not adam:
                    s = _SCALES.get(torch.optim.SGD) if rule is _RULES[torch.optim.SGD] else None
                    s = s(opt, group, p) if s is not None else rule(opt, group, p)[0]
                    out[p] = vectors[p] * (s * factor)
                    continue
                decoupled = rule is _RULES[torch.optim.AdamW] or bool(group.get("decoupled_weight_decay", False))
                out[p] = _adam_apply(opt, group, p, vectors[p], factor, decoupled)
    return out


def _adam_apply(opt: torch.optim.Optimizer, group: dict, p: Tensor, d: Tensor, factor: float,
                decoupled: bool) -> Tensor:
    """``factor · s ⊙ d`` for Adam's ``s`` (see :func:`precondition`)."""
    _check(group, type(opt).__name__, {"amsgrad": False, "maximize": False})
    lr, (b1, b2), eps, wd = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
    state = opt.state.get(p, {})
    k = int(state["step"]) + 1 if "step" in state else 1
    v = state.get("exp_avg_sq")
    grad = p.grad.detach()
    if wd and not decoupled:
        grad = grad + wd * p.detach()
    bc1, bc2 = 1 - b1**k, 1 - b2**k
    if v is None or b2 == 0:  # v̂ = g²/bc2 (first step), or β2 = 0
        denom = (grad * grad).mul_((1 - b2) / bc2).sqrt_().add_(eps)
    else:
        denom = torch.addcmul(v, grad, grad, value=(1 - b2) / b2).sqrt_()
        # ε + a·√(...) in one pass (0-dim ε broadcast; alpha scales the other operand), written over the temporary
        torch.add(denom.new_full((), eps), denom, alpha=(b2 / bc2) ** 0.5, out=denom)
    # c·d/denom in one pass (0 + value·d/denom: adding a 0-dim zero is exact), again over the temporary: with the
    # two above, four passes and one allocation where div, mul_, mul_, add_ made six and two (issue 16, MLP Adam)
    return torch.addcdiv(denom.new_zeros(()), d, denom, value=factor * lr * (1 - b1) / bc1, out=denom)


def scalar_preconditioner(opt: torch.optim.Optimizer) -> bool:
    """Whether ``s`` is one number per parameter group (SGD with or without momentum), known before the backward:
    then a per-example value can be reduced inside the backward and scaled by ``s`` afterwards."""
    rule = _rule(opt)  # unsupported optimizers raise here, naming the supported ones
    return any(rule is _RULES.get(c) for c in _SCALAR)


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
