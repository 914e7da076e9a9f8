"""Small models in plain torch used by the demo, the benchmarks and the tests (no downloads, no torchvision)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(d_in: int, hidden: int | list[int], d_out: int, dropout: float = 0.0) -> nn.Sequential:
    """``Linear → ReLU (→ Dropout)`` blocks then a Linear head; ``hidden=[]`` gives logistic regression."""
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    layers: list[nn.Module] = []
    prev = d_in
    for width in widths:
        layers += [nn.Linear(prev, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        prev = width
    layers.append(nn.Linear(prev, d_out))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Two conv layers and a linear head for ``(N, 1, H, W)`` images."""

    def __init__(self, n_classes: int = 10, channels: int = 8, size: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.head = nn.Linear(channels * math.ceil(size / 2) ** 2, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(x.flatten(1))


class Block(nn.Module):
    """Pre-norm transformer block with causal self-attention built from Linear layers (so every weight is tracked)."""

    def __init__(self, d: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(n, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        # explicit attention, not F.scaled_dot_product_attention: its CPU kernel has no double backward (which
        # second-order In-Run Shapley needs for Hessian-vector products) and no vmap rule (torch.func twins)
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.n_heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = logits.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(n, t, d)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class TinyGPT(nn.Module):
    """Character-level GPT: token + position embeddings, ``n_layers`` blocks, final LayerNorm, output layer.

    ``tied=True`` shares the token embedding with the output layer (as GPT-2 does).
    """

    def __init__(self, vocab: int, d: int = 32, n_layers: int = 2, n_heads: int = 2, max_len: int = 64,
                 tied: bool = True, dropout: float = 0.0):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, n_heads, dropout) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        # positions get the batch dimension too, so every module call is per example (what capture needs)
        positions = torch.arange(idx.shape[1], device=idx.device).expand(idx.shape[0], -1)
        x = self.tok(idx) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))
