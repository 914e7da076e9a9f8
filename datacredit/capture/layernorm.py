"""``nn.LayerNorm``: ``y = x̂ ⊙ γ + β`` with ``x̂`` normalized over the last dimensions.

Per example ``G_γ = Σ_t b_t ⊙ x̂_t`` and ``G_β = Σ_t b_t``: elementwise, so they are cheap to materialize (Dense).
``x̂ = (x − mean)·rstd`` uses the mean and ``rstd = 1/√(var + ε)`` that autograd saved for its own backward
(``NativeLayerNormBackward0``): no second pass over ``x`` for the variance. Where they are not available (another
backend, a future torch) they are recomputed with one ``torch.var_mean``.

With many activations per example (a sequence), each example's ``G_γ`` and ``G_β`` come from autograd's own fused
kernel, ``native_layer_norm_backward`` asked for the parameter gradients only: one read of ``x`` and ``b`` per
example, where forming ``b ⊙ x̂`` takes four passes over the activations (measured on the benchmark GPT's
``(16, 128, 256)`` calls: 0.90 → 0.65 ms). With few (an MLP's one row per example, a short sequence) the ``N``
kernel calls (about 7 µs each) would cost more than the passes, so the elementwise form is used.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .pieces import Dense, Piece
from .registry import LayerRule, register

# Activations per example (positions × normalized width) from which the per-example fused kernel is used
KERNEL_ELEMENTS = 2**14


@register(nn.LayerNorm)
class LayerNormRule(LayerRule):
    name = "layernorm"
    params = ("weight", "bias")

    def saved(self, module: nn.LayerNorm, inputs: tuple[Tensor, ...], output: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(mean, rstd)`` of the call, shaped like ``x`` with the normalized dimensions reduced to 1, or None."""
        if module.weight is None or not module.weight.requires_grad:
            return None
        node = output.grad_fn
        if type(node).__name__ != "NativeLayerNormBackward0":
            return None
        try:
            mean, rstd = node._saved_result1, node._saved_result2
        except (AttributeError, RuntimeError):  # attribute names are torch internals: fall back to recomputing
            return None
        x = inputs[0]
        lead = x.dim() - len(module.normalized_shape)
        if mean.shape != (*x.shape[:lead], *([1] * len(module.normalized_shape))) or rstd.shape != mean.shape:
            return None
        return mean.detach(), rstd.detach()

    def pieces(self, module: nn.LayerNorm, inputs: tuple[Tensor, ...], grad_output: Tensor,
               saved: tuple[Tensor, Tensor] | None = None) -> dict[str, Piece]:
        x = inputs[0]
        n, width = x.shape[0], math.prod(module.normalized_shape)
        weight = module.weight is not None and module.weight.requires_grad
        bias = module.bias is not None and module.bias.requires_grad
        out: dict[str, Piece] = {}
        b = grad_output.reshape(n, -1, width)
        if weight:
            if saved is not None:
                mean, rstd = saved
            else:
                dims = tuple(range(-len(module.normalized_shape), 0))
                var, mean = torch.var_mean(x, dim=dims, keepdim=True, unbiased=False)
                rstd = torch.rsqrt(var + module.eps)
            mean, rstd = mean.to(x.dtype), rstd.to(x.dtype)
            if b.shape[1] * width >= KERNEL_ELEMENTS:
                out["weight"], g_bias = per_example_kernel(module, x, grad_output, mean, rstd, bias)
                if g_bias is not None:
                    out["bias"] = g_bias
                return out
            # b ⊙ x̂ in one temporary (three passes over the activations, no others allocated): this runs per call
            bx = torch.sub(x, mean).mul_(rstd).reshape(n, -1, width).mul_(b)
            out["weight"] = Dense(bx.sum(1))
        if bias:
            out["bias"] = Dense(b.sum(1))
        return out


def per_example_kernel(module: nn.LayerNorm, x: Tensor, grad_output: Tensor, mean: Tensor, rstd: Tensor,
                       bias: bool) -> tuple[Dense, Dense | None]:
    """``G_γ`` (and ``G_β`` when ``bias``) of each example, ``(N, numel)``, from ``native_layer_norm_backward`` on
    that example's rows with only the parameter gradients asked for (``x``, ``grad_output`` ``(N, ..., *shape)``,
    ``mean``/``rstd`` as autograd saved them). One kernel call per example."""
    shape = list(module.normalized_shape)
    w = module.weight.detach().to(x.dtype)
    beta = module.bias.detach().to(x.dtype) if module.bias is not None else None
    mask = [False, True, bias]
    gw, gb = [], []
    for i in range(x.shape[0]):
        _, g_w, g_b = torch.ops.aten.native_layer_norm_backward(grad_output[i], x[i], shape, mean[i], rstd[i], w,
                                                                beta, mask)
        gw.append(g_w)
        gb.append(g_b)
    n = x.shape[0]
    return Dense(torch.stack(gw).reshape(n, -1)), Dense(torch.stack(gb).reshape(n, -1)) if bias else None
