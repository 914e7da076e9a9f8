"""transformers' ``Conv1D`` (GPT-2's linear layer): ``y = x W + b`` with ``W`` of shape ``(d_in, d_out)``.

Per example ``G_W = Σ_t a_t b_tᵀ`` — the transpose of Linear's layout. Registered by dotted class path, so
transformers is never imported by us.
"""

from __future__ import annotations

from torch import Tensor, nn

from .linear import as_sequence, bias_piece
from .pieces import Outer, Piece
from .registry import LayerRule, register


@register("transformers.pytorch_utils.Conv1D")
class Conv1DRule(LayerRule):
    name = "conv1d"
    params = ("weight", "bias")

    def pieces(self, module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor) -> dict[str, Piece]:
        a, b = as_sequence(inputs[0]), as_sequence(grad_output)
        d_in, d_out = module.weight.shape
        out: dict[str, Piece] = {}
        if module.weight.requires_grad:
            out["weight"] = Outer(a, b, d_in, d_out)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = bias_piece(b)
        return out
