"""``nn.LayerNorm``: ``y = x̂ ⊙ γ + β`` with ``x̂`` normalized over the last dimensions.

Per example ``G_γ = Σ_t b_t ⊙ x̂_t`` and ``G_β = Σ_t b_t``: elementwise, so they are cheap to materialize (Dense).
``x̂ = (x − mean)·rstd`` uses the mean and ``rstd = 1/√(var + ε)`` that autograd saved for its own backward
(``NativeLayerNormBackward0``): no second pass over ``x`` for the variance. Where they are not available (another
backend, a future torch) they are recomputed with one ``torch.var_mean``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .pieces import Dense, Piece
from .registry import LayerRule, register


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
        out: dict[str, Piece] = {}
        b = grad_output.reshape(n, -1, width)
        if module.weight is not None and module.weight.requires_grad:
            if saved is not None:
                mean, rstd = saved
            else:
                dims = tuple(range(-len(module.normalized_shape), 0))
                var, mean = torch.var_mean(x, dim=dims, keepdim=True, unbiased=False)
                rstd = torch.rsqrt(var + module.eps)
            # b ⊙ x̂ in one temporary (three passes over the activations, no others allocated): this runs per call
            bx = torch.sub(x, mean.to(x.dtype)).mul_(rstd.to(x.dtype)).reshape(n, -1, width).mul_(b)
            out["weight"] = Dense(bx.sum(1))
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = Dense(b.sum(1))
        return out
