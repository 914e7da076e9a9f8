"""One example's gradient summed over a segment's checkpoints, ``Σ_k G_i(θ_k)``, kept factored where it can be.

SOURCE multiplies each segment's query weights with the training gradients summed over the segment's checkpoints.
Summed as materialized ``(m, n)`` matrices that costs ``C·N·T·m·n`` to add and ``N·Q·m·n`` to multiply. But one factor
of a piece is often the same at every checkpoint: the input ``v`` of a network's first layer (the data), the token
index ``u`` of an Embedding. Then ``Σ_k u_k vᵀ = (Σ_k u_k) vᵀ`` exactly, and the sum stays one Outer piece with the
same number of positions, multiplied by :func:`~datacredit.methods.prepared.piece_scores` (zero-skipping where the
summed ``u`` still has exact zeros). Equality is checked exactly (``torch.equal``) at every checkpoint; on the first
mismatch the sum is materialized and continues as a dense buffer (the old route). With a deferred right rotation
``r`` (query weights ``W = w rᵀ``) the factored sum is rotated once when scored; a dense buffer holds ``Σ_k u_k
(rᵀ v_k)ᵀ`` (each piece's ``v`` rotated before it is added), never rotating an ``(m, n)`` matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..capture.pieces import Dense, Outer, Piece
from .prepared import Prepared, piece_scores


class PieceSum:
    """``Σ_k`` of one piece slot (one parameter's j-th piece of one batch) over checkpoints; ``r`` the right rotation
    of the query weights it will be scored against (None: none)."""

    def __init__(self, r: Tensor | None = None):
        self.r = r
        self.outer: Outer | None = None  # the factored sum while it lasts
        self.fixed: str | None = None  # which factor is shared: "u", "v" (None after one piece)
        self.dense: Tensor | None = None  # (N, m·n) once materialized, v rotated by r

    def add(self, piece: Piece) -> None:
        if self.dense is None and isinstance(piece, Outer):
            if self.outer is None:
                self.outer = piece
                return
            if self._merge(piece):
                return
            self.dense = self._materialize(self.outer)
            self.outer = None
        if self.dense is None:
            self.dense = self._materialize(piece)
        elif isinstance(piece, Outer) and not piece.indexed:
            p = self._rotated(piece)
            self.dense.view(p.n_examples, p.m, p.n).baddbmm_(p.u.transpose(1, 2).to(self.dense.dtype),
                                                             p.v.to(self.dense.dtype))
        else:
            self.dense += self._materialize(piece).to(self.dense.dtype)

    def _merge(self, piece: Outer) -> bool:
        cur = self.outer
        if piece.u.shape != cur.u.shape or piece.v.shape != cur.v.shape or piece.indexed != cur.indexed:
            return False
        if self.fixed in (None, "v") and not piece.indexed and torch.equal(piece.v, cur.v):
            self.outer, self.fixed = Outer(cur.u + piece.u, cur.v, cur.m, cur.n), "v"
            return True
        if self.fixed in (None, "u") and torch.equal(piece.u, cur.u):
            self.outer, self.fixed = Outer(cur.u, cur.v + piece.v, cur.m, cur.n), "u"
            return True
        return False

    def _rotated(self, piece: Outer) -> Outer:
        return piece if self.r is None else Outer(piece.u, piece.v @ self.r.to(piece.v.dtype), piece.m, piece.n)

    def _materialize(self, piece: Piece) -> Tensor:
        if isinstance(piece, Outer):
            return self._rotated(piece).materialize()
        g = piece.g
        if self.r is not None:
            n = self.r.shape[0]
            g = (g.reshape(len(g), -1, n) @ self.r.to(g.dtype)).reshape(len(g), -1)
        return g.clone()

    def scores(self, prep: Prepared) -> Tensor:
        """``⟨Σ_k G_i(θ_k), W_q⟩`` ``(N, Q)`` against ``prep`` (whose right rotation this sum was made for)."""
        if self.outer is not None:
            return piece_scores(self.outer, prep)
        if self.dense is None:
            raise ValueError("an empty PieceSum has no scores")
        return piece_scores(Dense(self.dense), Prepared(prep.w))  # already rotated
