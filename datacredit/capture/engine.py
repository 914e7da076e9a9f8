"""Hooks on tracked modules that turn one backward pass into factored per-example gradients.

A forward hook stores each call's inputs and hooks the autograd node that produced its output; the node's pre-hook
receives the gradient of the *summed per-example losses* with respect to that output, which for independent examples
(batch dimension first) is each example's own output gradient. Hooks live only inside the ``with`` block; the user's
model is never modified, and ``.grad`` of the parameters is never touched by :func:`example_grads`.

Why the node and not the output tensor: an in-place op after the module (``nn.ReLU(inplace=True)``) replaces the
output's history, and a hook on the output tensor (or on a view's node, as the output of a Linear on ``(N, T, d)``
input is) is then never called. The node that computed the output's storage (the view's base) stays in the graph under
the in-place op's node, so its pre-hook still receives the gradient with respect to the module's output *value*. If a
hook still does not fire although the output was modified in place, :meth:`Capture.collect` raises naming the module:
a rule never silently loses a layer.

What hooks cannot see is checked once per :class:`Capture` (the first :func:`example_grads` call): the per-example
gradients, weighted by random per-example weights ``r`` and summed, must equal the true gradient of ``Σ r_i ℓ_i`` for
every tracked parameter. That catches a tracked parameter also used outside its module's call (``F.linear(x,
lin.weight)``, functional weight tying, ``nn.MultiheadAttention``'s ``out_proj``) and a model whose batch dimension is
not first; it costs one extra backward on the first batch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from ..errors import DataError, NonFiniteError, UnsupportedModuleError
from . import conv1d, conv2d, embedding, layernorm, linear  # noqa: F401  (registers the rules)
from .grads import ExampleGrads
from .pieces import Piece
from .registry import LayerRule, rule_for, rule_mismatch


def _direct_trainable(module: nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters(recurse=False) if p.requires_grad]


def _type_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _functional_parent(model: nn.Module, path: str) -> str | None:
    """Path of an ``nn.MultiheadAttention`` that owns ``path`` as its ``out_proj`` (used functionally, never called)."""
    parent, _, child = path.rpartition(".")
    owner = model.get_submodule(parent) if path else None
    if isinstance(owner, nn.MultiheadAttention) and child == "out_proj":
        return parent
    return None


def resolve_modules(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, tuple[nn.Module, LayerRule]]:
    """Tracked modules by path, each with its rule.

    ``names=None`` tracks every module that owns a trainable parameter. A name of a container tracks the modules below
    it that own trainable parameters. A module that owns trainable parameters but has no rule for its exact forward
    (see :mod:`.registry`) raises :class:`UnsupportedModuleError` naming its path and type: silently skipping it, or
    applying a rule written for another forward, would give wrong gradients.
    """
    all_modules = dict(model.named_modules())
    if names is None:
        roots = [""]
    else:
        roots = list(names)
        missing = [n for n in roots if n not in all_modules]
        if missing:
            raise UnsupportedModuleError(f"no module named {missing} in {type(model).__name__}")
    tracked: dict[str, tuple[nn.Module, LayerRule]] = {}
    for root in roots:
        for path, module in all_modules.items():
            if not (path == root or root == "" or path.startswith(root + ".")):
                continue
            if not _direct_trainable(module):
                continue
            owner = _functional_parent(model, path)
            if owner is not None:
                raise UnsupportedModuleError(
                    f"module {path!r} ({_type_name(module)}) is the out_proj of nn.MultiheadAttention {owner!r}, "
                    "which uses its weight through F.multi_head_attention_forward without calling it, so no hook "
                    "sees it; freeze the attention, leave it out of Task.tracked_modules, or write the attention with "
                    "nn.Linear layers (as datacredit.models.TinyGPT does)"
                )
            rule = rule_for(module)
            if rule is None:
                why = rule_mismatch(module)
                if isinstance(module, nn.MultiheadAttention):
                    why = "nn.MultiheadAttention computes its projections functionally (no rule sees them)"
                raise UnsupportedModuleError(
                    f"module {path!r} of type {_type_name(module)} has trainable parameters "
                    f"{_direct_trainable(module)} but no capture rule" + (f": {why}" if why else "") + "; register "
                    f"one for it with @datacredit.capture.register({type(module).__qualname__}) on a LayerRule "
                    "subclass, freeze it, or leave it out of Task.tracked_modules"
                )
            rule.check(module, path)
            tracked[path] = (module, rule)
    if not tracked:
        raise UnsupportedModuleError(f"{type(model).__name__} has no trainable parameters to track")
    return tracked


@dataclass
class _Call:
    """One call of a tracked module: its inputs, its output and the node whose pre-hook receives the gradient.

    ``target`` is the output itself or, for a view, its base (the tensor whose node an in-place op cannot bypass);
    versions are read at call time so that :meth:`Capture.collect` can tell an in-place op from an unused output.
    """

    path: str
    module: nn.Module
    rule: LayerRule
    inputs: tuple
    output: Tensor | None
    target: Tensor | None
    edge: object | None
    versions: tuple[int, ...]
    handle: object | None = None
    grad: Tensor | None = field(default=None)
    saved: object | None = None  # what the rule kept from the forward (LayerRule.saved)
    streamed: bool = False  # its pieces went to Capture.consumer (streaming mode) and its inputs were dropped

    def set_grad(self, grad: Tensor) -> None:
        self.grad = grad.detach() if self.grad is None else self.grad + grad.detach()

    def output_grad(self, grad_target: Tensor) -> Tensor:
        """The gradient w.r.t. the output, from the gradient w.r.t. ``target`` (the output or its base)."""
        out = self.output
        if self.target is out:
            return grad_target
        offset = out.storage_offset() - self.target.storage_offset()
        return grad_target.contiguous().as_strided(out.size(), out.stride(), offset)

    def changed(self) -> list[str]:
        """Which of (output, inputs) were modified in place since the call."""
        now = _versions(self.output, self.target, self.inputs)
        return [what for what, a, b in zip(("output", "output", *("input",) * len(self.inputs)), self.versions, now)
                if a != b]

    def drop(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.output = self.target = self.edge = self.handle = self.grad = self.saved = None
        self.inputs = ()

    def pieces(self, inputs: tuple, grad: Tensor) -> dict[str, Piece]:
        """The rule's pieces for this call (``saved=`` only for rules that keep something from the forward)."""
        if self.saved is None:
            return self.rule.pieces(self.module, inputs, grad)
        return self.rule.pieces(self.module, inputs, grad, saved=self.saved)


def _own_base(base: Tensor, inputs: tuple) -> bool:
    """Whether a view's ``base`` is a tensor the call computed (not an input's storage) and can be re-viewed."""
    if not (base.requires_grad and base.is_contiguous()):
        return False
    return not any(isinstance(x, Tensor) and (x._base if x._is_view() else x) is base for x in inputs)


def _versions(output: Tensor, target: Tensor, inputs: tuple) -> tuple[int, ...]:
    return (output._version, target._version, *(x._version if isinstance(x, Tensor) else 0 for x in inputs))


class Capture:
    """Context manager recording the calls of tracked modules; :meth:`collect` builds :class:`ExampleGrads`.

    ``with Capture(model) as cap: losses = ...; losses.sum().backward(); grads = cap.collect()``. Modules called
    several times per forward (shared layers) and parameters shared by modules (tied weights) are both handled.
    ``verified`` is set once :func:`example_grads` has checked this capture's per-example gradients against the true
    gradient (the first batch); a Capture can be entered again for later batches and keeps it.

    Streaming: with ``consumer`` set, each call's pieces are built inside the backward, in the node pre-hook that
    receives the call's output gradient, and handed to ``consumer(path, [(parameter name, piece), ...])`` at once;
    the call then drops its inputs, so nothing per-example outlives its layer's backward. :meth:`collect` is not used
    then; :meth:`finish_stream` checks that no call was lost to an in-place op and clears. A call whose node receives
    a gradient twice (a second backward through a retained graph) raises: its inputs are gone.
    """

    def __init__(self, model: nn.Module, modules: Iterable[str] | None = None):
        self.model = model
        self.tracked = resolve_modules(model, modules)
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._shapes = {name: p.shape for name, p in model.named_parameters()}
        self._order = {name: k for k, name in enumerate(self._shapes)}  # collect() lists pieces in this order
        params: dict[int, Tensor] = {}
        for module, _ in self.tracked.values():
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    params.setdefault(id(p), p)
        self.params = {self._names[i]: p for i, p in params.items()}  # tracked trainable parameters by name
        # the tracked trainable parameters each module owns, by path (a tied parameter appears under each module)
        self.names_of = {path: tuple(self._names[id(p)] for p in module.parameters(recurse=False) if p.requires_grad)
                         for path, (module, _) in self.tracked.items()}
        self._calls: list[_Call] = []
        self._handles: list = []
        self.enabled = True
        self.verified = False
        self.seen_dtypes: set[torch.dtype] = set()  # output-gradient dtypes before promotion: the precision to check at
        self.measure = False  # collect also fills `scales` (for the one-off check; reads every factor once more)
        self.scales: dict[str, float] = {}
        self._listening = True  # node pre-hooks record; off while example_grads reads gradients itself
        self.consumer: Callable[[str, list[tuple[str, Piece]]], None] | None = None
        # record_only: the forward hook records each call and its edge but hooks no node; for callers that take the
        # output gradients at the edges themselves (torch.autograd.grad(..., [call.edge ...])), saving a node
        # pre-hook per call and its removal
        self.record_only = False

    def __enter__(self) -> Capture:
        for path, (module, rule) in self.tracked.items():
            self._handles.append(module.register_forward_hook(self._hook(path, rule)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def _hook(self, path: str, rule: LayerRule):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            if not (self.enabled and torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
                return
            target = output._base if output._is_view() else output
            if target is not output and not _own_base(target, inputs):
                target = output  # an unusual view: hook the output's own node (in-place ops are then caught)
            detached = tuple(x.detach() if isinstance(x, Tensor) else x for x in inputs)
            edge = get_gradient_edge(target)
            call = _Call(path, module, rule, detached, output, target, edge, _versions(output, target, detached))
            call.saved = rule.saved(module, detached, output)
            self._calls.append(call)
            if self.record_only:
                return
            index = edge.output_nr

            def on_grad(grad_outputs: tuple) -> None:
                grad = grad_outputs[index]
                if not self._listening or grad is None:
                    return
                if self.consumer is not None:
                    self._stream(call, call.output_grad(grad))
                else:
                    call.set_grad(call.output_grad(grad))

            call.handle = edge.node.register_prehook(on_grad)

        return hook

    def _stream(self, call: _Call, grad: Tensor) -> None:
        """Build the call's pieces from its output gradient and hand them to the consumer (streaming mode)."""
        if call.streamed:
            raise RuntimeError(f"module {call.path!r} received a second output gradient in one streamed backward "
                               "(a backward through a retained graph?); its inputs were already released")
        changed = call.changed()
        if "input" in changed:
            raise _inplace_error(call, changed)
        grad = grad.detach()
        self.seen_dtypes.add(grad.dtype)
        inputs, grad = _common_dtype(call.module, call.inputs, grad)
        found = [(self._names[id(getattr(call.module, attr))], piece)
                 for attr, piece in call.pieces(inputs, grad).items()]
        # nothing per-example is kept past this layer: its inputs and output (activations) are released here
        call.streamed, call.inputs, call.saved, call.output, call.target = True, (), None, None, None
        self.consumer(call.path, found)

    def finish_stream(self) -> int:
        """End a streamed backward: raise for a call whose gradient an in-place op hid (as :meth:`collect` does),
        clear the calls, and return how many calls were streamed."""
        try:
            for call in self._calls:
                if not call.streamed:
                    changed = call.changed()
                    if changed:
                        raise _inplace_error(call, changed)
            return sum(call.streamed for call in self._calls)
        finally:
            self.clear()

    @property
    def outputs(self) -> list[Tensor]:
        return [c.output for c in self._calls]

    def clear(self) -> None:
        """Forget the recorded calls. Each call and its node's pre-hook hold each other through C++ (a cycle Python's
        collector cannot see), so the hook is removed and the references dropped by hand: otherwise every step's
        activations leak (measured: +318 MB per step on a d=256 GPT)."""
        for call in self._calls:
            call.drop()
        self._calls.clear()

    def collect(self, ids: Sequence[int] | None = None, check_finite: bool = True,
                expected: int | None = None) -> ExampleGrads:
        """Per-example gradients of the last backward; clears the recorded calls.

        check_finite: raise :class:`NonFiniteError` naming the examples whose output gradients are NaN/inf (one scan
        of every call's output gradient). Callers that check their own per-example results can skip it.
        expected: the batch size, when the caller knows it (the length of the per-example loss): every module's
        input must have it as its leading dimension.
        Raises :class:`UnsupportedModuleError` naming a module whose output or input was modified in place and whose
        gradient was therefore not seen.
        """
        try:
            found = self._pieces(ids, check_finite)
        finally:
            self.clear()
        if not found:
            raise ValueError("no tracked module took part in the loss; was the forward run inside the capture?")
        n = expected if expected is not None else max(piece.n_examples for _, _, piece in found)
        _check_batch_dims({path: piece.n_examples for path, _, piece in found}, n)
        pieces: dict[str, list[Piece]] = {}
        for _, name, piece in found:
            pieces.setdefault(name, []).append(piece)
        pieces = dict(sorted(pieces.items(), key=lambda kv: self._order[kv[0]]))
        return ExampleGrads(pieces, {k: self._shapes[k] for k in pieces}, n)

    def _pieces(self, ids: Sequence[int] | None, check_finite: bool) -> list[tuple[str, str, Piece]]:
        found: list[tuple[str, str, Piece]] = []
        self.scales = {}
        for call in self._calls:
            changed = call.changed()
            if "input" in changed or (call.grad is None and changed):
                raise _inplace_error(call, changed)
            if call.grad is None:  # output did not reach the loss
                continue
            if check_finite:
                _check_finite(call.grad, ids)
            self.seen_dtypes.add(call.grad.dtype)
            inputs, grad = _common_dtype(call.module, call.inputs, call.grad)
            for attr, piece in call.pieces(inputs, grad).items():
                name = self._names[id(getattr(call.module, attr))]
                found.append((call.path, name, piece))
                if self.measure:
                    self.scales[name] = self.scales.get(name, 0.0) + _call_scale(inputs, grad)
        return found


def _inplace_error(call: _Call, changed: list[str]) -> UnsupportedModuleError:
    what = " and ".join(dict.fromkeys(changed))
    return UnsupportedModuleError(
        f"the {what} of module {call.path!r} ({_type_name(call.module)}) was modified in place after "
        "the call, so its per-example gradient cannot be computed from what the hooks saw; make the "
        "in-place op out-of-place (e.g. nn.ReLU(inplace=False)) or leave the module out of "
        "Task.tracked_modules"
    )


def _call_scale(inputs: tuple, grad: Tensor) -> float:
    """``‖B‖·(‖A‖ + √rows)``: a bound on the size of any parameter gradient the call's output gradient ``B`` and input
    ``A`` make (products of the two, or of ``B`` with ones / one-hots). It floors the rounding scale of the one-off
    check where the pieces' own terms vanish (a LayerNorm of width 1 has x̂ = 0 but autograd's rounding does not)."""
    x = inputs[0] if inputs else None
    if not isinstance(x, Tensor):
        return float(grad.double().norm())
    rows = x.numel() / max(x.shape[-1], 1) if x.is_floating_point() else x.numel()
    x_norm = float(x.double().norm()) if x.is_floating_point() else 0.0
    return float(grad.double().norm()) * (x_norm + math.sqrt(rows))


def _common_dtype(module: nn.Module, inputs: tuple, grad: Tensor) -> tuple[tuple, Tensor]:
    """Under autocast a module's input and its output gradient can differ in dtype (float32 input, bfloat16
    gradient) and from the parameters' (float32); the rules multiply them, so all are promoted to the widest."""
    x = inputs[0] if inputs else None
    dtype = grad.dtype
    for p in module._parameters.values():  # the module's own parameters (a dict read: this runs once per call)
        if p is not None and p.dtype != dtype:
            dtype = torch.promote_types(dtype, p.dtype)
    if isinstance(x, Tensor) and x.is_floating_point():
        dtype = torch.promote_types(dtype, x.dtype)
        if x.dtype != dtype:
            inputs = (x.to(dtype), *inputs[1:])
    return inputs, grad if grad.dtype == dtype else grad.to(dtype)


def _check_batch_dims(leading: dict[str, int], n: int, source: str = "") -> None:
    """Every tracked module's input must lead with the batch dimension ``n``: name the modules that do not.

    source: where ``n`` comes from, for the message (e.g. the per-example loss's shape).
    """
    shared = sorted({path for path, k in leading.items() if k == 1 and n != 1})
    if shared:
        raise ValueError(
            f"modules {shared} saw fewer examples than the batch ({n}): their input is shared across the batch "
            "(e.g. position ids of shape (1, T)), so per-example gradients are lost; give them per-example "
            "input (expand to (N, T)) or leave them out of Task.tracked_modules"
        )
    other = {path: k for path, k in leading.items() if k != n}
    if other:
        raise DataError(
            f"the batch has {n} examples{source} but modules {sorted(other)} got inputs whose leading dimension is "
            f"{sorted(set(other.values()))}: Task.loss must return one value per example, shape (N,), and every "
            "tracked module's input must have the batch dimension first (a (T, N, d) layout mixes examples; "
            "transpose to (N, T, d), e.g. batch_first=True)"
        )


def _example_ids(ids: Sequence[int] | None, n: int) -> np.ndarray:
    return np.arange(n) if ids is None or len(ids) != n else np.asarray(ids)


def _check_finite(grad_output: Tensor, ids: Sequence[int] | None) -> None:
    """A module's output gradient ``(N, ...)``: the factor through which a NaN/inf derivative enters every
    parameter gradient (inputs are activations of a finite loss)."""
    if torch.isfinite(grad_output.sum()):  # one reduction: a NaN/inf anywhere makes the sum NaN/inf
        return
    # a non-finite entry, or a sum that overflowed (low precision): find the examples, if any
    bad = ~torch.isfinite(grad_output.reshape(grad_output.shape[0], -1)).all(1).cpu()
    if bad.any():
        raise NonFiniteError(f"NaN/inf gradients for example ids {_example_ids(ids, len(bad))[bad.numpy()].tolist()}")


def check_finite_losses(losses: Tensor, ids: Sequence[int] | None = None, what: str = "loss") -> None:
    """Raise :class:`NonFiniteError` naming the example ids whose per-example ``losses`` ``(N,)`` are NaN/inf."""
    bad = ~torch.isfinite(losses.detach()).cpu()
    if bad.any():
        raise NonFiniteError(f"NaN/inf {what} for example ids {_example_ids(ids, len(losses))[bad.numpy()].tolist()}")


def check_per_example(values: Tensor, n: int | None = None, what: str = "Task.loss") -> None:
    """Raise :class:`DataError` unless ``values`` has shape ``(n,)``: one value per example of a batch of ``n``.

    A loss returning N−1 values for N examples (an off-by-one slice) would give the last example a zero gradient.
    """
    if values.dim() != 1 or (n is not None and values.shape[0] != n):
        want = "(N,)" if n is None else f"({n},)"
        raise DataError(f"{what} must return one value per example, shape {want}; got {tuple(values.shape)}")


def tolerance(*dtypes: torch.dtype) -> float:
    """Relative tolerance for comparing two exact computations of one gradient done in another summation order, at
    the lowest precision among ``dtypes``: the difference is measured against the norm of the sum of absolute values
    (:meth:`ExampleGrads.total` with ``absolute=True``), which bounds rounding even where per-example terms cancel."""
    eps = max(torch.finfo(d).eps for d in dtypes)
    if eps <= torch.finfo(torch.float64).eps:
        return 1e-9
    if eps <= torch.finfo(torch.float32).eps:
        return 1e-4
    return 3e-2


def unexplained(sums: dict[str, tuple[Tensor, Tensor]], true: dict[str, Tensor | None], tol: float,
                floors: dict[str, float] | None = None) -> dict[str, float]:
    """Parameters whose true gradient differs from the per-example gradients' sum beyond rounding.

    sums: name -> (Σ_i r_i g_i, Σ_i |r_i||g_i| bound) in the parameter's shape; true: name -> its true gradient (None
    = no gradient, treated as 0). A parameter missing from ``sums`` had no piece (its module never took part).
    floors: name -> a scale added to ``‖bound‖`` (:attr:`Capture.scales`, times ``tol`` like the bound, so a missing
    contribution of the size of the layer's own gradient still fails by orders of magnitude).
    Returns name -> ``‖difference‖ / ‖true‖`` for every parameter that fails ``‖difference‖ ≤ tol·(‖bound‖ + floor)``.
    """
    floors = floors or {}
    bad: dict[str, float] = {}
    for name, g in true.items():
        total, bound = sums.get(name, (None, None))
        if total is None:
            if g is None or not bool(g.any()):
                continue
            bad[name] = 1.0
            continue
        g = torch.zeros_like(total) if g is None else g.detach().to(total.dtype).reshape(total.shape)
        diff = float((g - total).double().norm())
        if diff > tol * (float(bound.double().norm()) + floors.get(name, 0.0)) + 1e-300:
            bad[name] = diff / max(float(g.double().norm()), 1e-300)
    return bad


def example_grads(capture: Capture, per_example: Tensor, ids: Sequence[int] | None = None) -> ExampleGrads:
    """Per-example gradients of ``per_example`` ``(N,)`` (computed inside ``capture``) without touching ``.grad``.

    Cost: one backward pass of the batch, plus the rules' work; no per-example backward. On the capture's first
    batch, one more backward checks the result against the true gradient (see the module docstring) and raises
    :class:`UnsupportedModuleError` naming the parameters it does not explain.
    """
    check_per_example(per_example, None if ids is None else len(ids))
    calls = list(capture._calls)
    if not calls:
        raise ValueError("no tracked module was called; run the forward pass inside the capture")
    n = per_example.shape[0]
    _check_batch_dims({c.path: c.inputs[0].shape[0] for c in calls if c.inputs and isinstance(c.inputs[0], Tensor)},
                      n, f" (the per-example loss has shape {tuple(per_example.shape)})")
    check_finite_losses(per_example, ids)
    verify = not capture.verified
    capture._listening = False
    try:
        # the edges are the hooked nodes: an in-place op after a module cannot reroute them
        grads = torch.autograd.grad(per_example.sum(), [c.edge for c in calls], allow_unused=True,
                                    retain_graph=verify)
        if verify:
            r = _check_weights(n, per_example)
            names = list(capture.params)
            true = torch.autograd.grad((per_example * r).sum(), [capture.params[k] for k in names], allow_unused=True)
    finally:
        capture._listening = True
    for call, g in zip(calls, grads):
        if g is not None:
            call.grad = call.output_grad(g.detach())
    capture.measure = verify
    try:
        out = capture.collect(ids, expected=n)
    finally:
        capture.measure = False
    if verify:
        _verify(capture, out, r, dict(zip(names, true)))
        capture.verified = True
    return out


def _check_weights(n: int, like: Tensor) -> Tensor:
    """Per-example weights in [0.5, 1.5), fixed by a seed: reproducible, and generic enough that examples mixed by a
    batch-second layout (or a missing contribution) cannot sum to the same gradient."""
    gen = torch.Generator().manual_seed(12345)
    return (0.5 + torch.rand(n, generator=gen, dtype=torch.float64)).to(like.device, like.dtype)


def _verify(capture: Capture, grads: ExampleGrads, r: Tensor, true: dict[str, Tensor | None]) -> None:
    totals, bounds = grads.total(r), grads.total(r, absolute=True)
    sums = {name: (totals[name], bounds[name]) for name in grads.pieces}
    dtypes = [t.dtype for t, _ in sums.values()] + [p.dtype for p in capture.params.values()] + [*capture.seen_dtypes]
    bad = unexplained(sums, true, tolerance(*dtypes), capture.scales)
    if bad:
        listed = ", ".join(f"{name!r} (off by {100 * err:.3g} %)" for name, err in bad.items())
        raise UnsupportedModuleError(
            f"the per-example gradients of tracked parameters {listed} do not add up to their true gradient: the "
            "parameter is used outside its module's call (F.linear(x, layer.weight), a weight tied by hand as "
            "h @ emb.weight.T, nn.MultiheadAttention's out_proj), used by an untracked module, or the model does "
            "not keep the batch dimension first; route every use through the module (or through a module with a "
            "capture rule), track every module that uses it, or put the batch dimension first"
        )

