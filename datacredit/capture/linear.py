"""``nn.Linear``: ``y = x Wᵀ + b`` on inputs ``(N, d_in)`` or ``(N, ..., d_in)``.

Per example, ``G_W = Σ_t b_t a_tᵀ`` (``b_t`` output gradient, ``a_t`` input at position t), ``G_b = Σ_t b_t``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .pieces import Outer, Piece
from .registry import LayerRule, register


def as_sequence(x: Tensor) -> Tensor:
    """``(N, d)`` -> ``(N, 1, d)``; ``(N, ..., d)`` -> ``(N, T, d)`` with all middle dimensions as positions."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def bias_piece(grad_out: Tensor) -> Outer:
    """``G_b = Σ_t b_t`` as an outer product with ``v = 1``; ``grad_out`` is ``(N, T, d_out)``."""
    return Outer(grad_out, grad_out.new_ones(*grad_out.shape[:2], 1), grad_out.shape[-1], 1, unit=True)


@register(nn.Linear)
class LinearRule(LayerRule):
    name = "linear"
    params = ("weight", "bias")

    def pieces(self, module: nn.Linear, inputs: tuple[Tensor, ...], grad_output: Tensor) -> dict[str, Piece]:
        a, b = as_sequence(inputs[0]), as_sequence(grad_output)
        out: dict[str, Piece] = {}
        if module.weight.requires_grad:
            out["weight"] = Outer(b, a, module.out_features, module.in_features)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = bias_piece(b)
        return out
