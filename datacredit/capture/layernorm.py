"""``nn.LayerNorm``: ``y = x̂ ⊙ γ + β`` with ``x̂`` normalized over the last dimensions.

Per example ``G_γ = Σ_t b_t ⊙ x̂_t`` and ``G_β = Σ_t b_t``: elementwise, so they are cheap to materialize (Dense).
``x̂ = (x − mean)·rstd`` uses the mean and ``rstd = 1/√(var + ε)`` that autograd saved for its own backward
(``NativeLayerNormBackward0``): no second pass over ``x`` for the variance. Where they are not available (another
backend, a future torch) they are recomputed with one ``torch.var_mean``.

``G_γ`` is a :class:`NormWeight`: a streamed dot ``⟨G_γ,i, w⟩ = Σ_t rstd_t ((x_t − mean_t) ⊙ b_t)·w`` takes one
matrix-vector product over the positions instead of scaling every activation by ``rstd`` and summing over them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .pieces import Dense, LazyDense, Piece
from .registry import LayerRule, register


class NormWeight(LazyDense):
    """``G_γ,i = Σ_t b_{i,t} ⊙ x̂_{i,t}`` kept as ``x`` and ``b`` ``(N, T, w)`` and ``mean``, ``rstd`` ``(N, T, 1)``.

    :meth:`dot`: ``(x − mean) ⊙ b`` (one temporary, as forming ``g`` makes), then one product with the ``Q``
    vectors over all positions and ``rstd`` on the ``(N, T, Q)`` result: two passes over the activations fewer than
    ``g`` (no ``rstd`` pass, no sum over positions), the same terms in another order.
    """

    def __init__(self, x: Tensor, mean: Tensor, rstd: Tensor, b: Tensor):
        super().__init__(x.shape[0], b.dtype)
        self.x, self.mean, self.rstd, self.b = x, mean, rstd, b

    def _centered(self) -> Tensor:
        """``(x − mean) ⊙ b`` ``(N, T, w)``, in a new tensor."""
        return torch.sub(self.x, self.mean).mul_(self.b)

    def form(self) -> Tensor:
        return self._centered().mul_(self.rstd).sum(1)

    def dot(self, weights: Tensor) -> Tensor:
        if "g" in self.__dict__:  # formed already (a caller read g): the small product
            return self.g @ weights.T
        n, t, w = self.x.shape
        rows = self._centered().reshape(n * t, w) @ weights.T  # (N·T, Q)
        return rows.reshape(n, t, -1).mul_(self.rstd).sum(1)


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
            out["weight"] = NormWeight(x.reshape(n, -1, width), mean.to(x.dtype).reshape(n, -1, 1),
                                       rstd.to(x.dtype).reshape(n, -1, 1), b)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = Dense(b.sum(1))
        return out
