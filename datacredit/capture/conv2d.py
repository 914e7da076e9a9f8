"""``nn.Conv2d`` (groups = 1, zero padding): unfold the input into patches, then it is a Linear layer over positions.

Per example ``G_W = Σ_p b_p a_pᵀ`` with ``a_p`` the ``C_in·kh·kw`` patch at output position p (the same order as
``weight.view(C_out, -1)``) and ``b_p`` the output gradient there.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from .linear import bias_piece
from .pieces import Outer, Piece
from .registry import LayerRule, register


@register(nn.Conv2d)
class Conv2dRule(LayerRule):
    name = "conv2d"
    params = ("weight", "bias")

    def check(self, module: nn.Conv2d, path: str) -> None:
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise UnsupportedModuleError(
                f"module {path!r} ({type(module).__name__}): only groups=1 with numeric zero padding is supported "
                f"(got groups={module.groups}, padding={module.padding!r}, padding_mode={module.padding_mode!r})"
            )

    def pieces(self, module: nn.Conv2d, inputs: tuple[Tensor, ...], grad_output: Tensor) -> dict[str, Piece]:
        x = inputs[0]
        if x.dim() != 4:
            raise UnsupportedModuleError(f"Conv2d capture needs batched (N, C, H, W) input, got {tuple(x.shape)}")
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (N, C·k·k, P)
        a = patches.transpose(1, 2)
        b = grad_output.flatten(2).transpose(1, 2)  # (N, P, C_out)
        out: dict[str, Piece] = {}
        if module.weight.requires_grad:
            out["weight"] = Outer(b, a, module.out_channels, a.shape[-1])
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = bias_piece(b)
        return out
