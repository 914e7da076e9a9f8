"""``nn.LayerNorm``: ``y = x̂ ⊙ γ + β`` with ``x̂`` normalized over the last dimensions.

Per example ``G_γ = Σ_t b_t ⊙ x̂_t`` and ``G_β = Σ_t b_t``: elementwise, so they are cheap to materialize (Dense).
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

    def pieces(self, module: nn.LayerNorm, inputs: tuple[Tensor, ...], grad_output: Tensor) -> dict[str, Piece]:
        x = inputs[0]
        n, width = x.shape[0], math.prod(module.normalized_shape)
        dims = tuple(range(-len(module.normalized_shape), 0))
        out: dict[str, Piece] = {}
        b = grad_output.reshape(n, -1, width)
        if module.weight is not None and module.weight.requires_grad:
            mean = x.mean(dim=dims, keepdim=True)
            var = x.var(dim=dims, keepdim=True, unbiased=False)
            x_hat = ((x - mean) * torch.rsqrt(var + module.eps)).reshape(n, -1, width)
            out["weight"] = Dense((b * x_hat).sum(1))
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = Dense(b.sum(1))
        return out
