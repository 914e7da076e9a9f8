"""``nn.Embedding``: row ``idx_t`` of the table is output t. Per example ``G_W = Σ_t e_{idx_t} b_tᵀ`` (index-add form).

The one-hot ``e_{idx_t}`` is kept as an index, so ghost dots compare indices instead of multiplying vocab-sized vectors.
Positions at ``padding_idx`` get no gradient (PyTorch's rule), so their ``b_t`` is zeroed.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from .pieces import Outer, Piece
from .registry import LayerRule, register


@register(nn.Embedding)
class EmbeddingRule(LayerRule):
    name = "embedding"
    params = ("weight",)

    def check(self, module: nn.Embedding, path: str) -> None:
        if module.max_norm is not None or module.scale_grad_by_freq:
            raise UnsupportedModuleError(
                f"module {path!r} (Embedding): max_norm and scale_grad_by_freq change the gradient per batch "
                "and are not supported"
            )

    def pieces(self, module: nn.Embedding, inputs: tuple[Tensor, ...], grad_output: Tensor) -> dict[str, Piece]:
        if not module.weight.requires_grad:
            return {}
        idx = inputs[0].reshape(inputs[0].shape[0], -1)
        b = grad_output.reshape(idx.shape[0], idx.shape[1], -1)
        if module.padding_idx is not None:
            b = b * (idx != module.padding_idx).unsqueeze(-1).to(b.dtype)
        return {"weight": Outer(idx, b, module.num_embeddings, module.embedding_dim)}
