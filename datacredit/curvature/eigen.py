"""The eigen code every factored curvature shares (identity, diagonal, KFAC, EK-FAC and the explicit Hessian).

One parameter, viewed as an ``(m, n)`` matrix in row-major order (the capture pieces' view), gets one
:class:`EigenBlock`: ``H_p = (Q_u ⊗ Q_v) diag(vec Λ) (Q_u ⊗ Q_v)ᵀ``, so for a gradient-shaped ``W``

    ``(H_p + δI)⁻¹ W = Q_u [ (Q_uᵀ W Q_v) / (Λ + δ) ] Q_vᵀ``   (George et al. 2018, EK-FAC, eq. 13)

with ``Q = None`` meaning the identity. KFAC is ``Λ = λ_u λ_vᵀ`` (eigenvalues of its two factors), EK-FAC refits
``Λ`` in the same eigenbasis, the diagonal curvature has no rotation at all, and the explicit Hessian is one block of
shape ``(D, 1)`` with ``Q_u`` its eigenvectors.

Also here: the per-parameter sums both passes need, computed on the factored pieces —
``Σ_{i,t} u uᵀ`` (KFAC's factors) and ``Σ_i (Q_uᵀ G_i Q_v)²`` (EK-FAC's eigenvalues, and with no rotation the
diagonal empirical Fisher).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..capture.pieces import CHUNK_ELEMENTS, Dense, Outer, Piece
from .base import Damping


@dataclass
class EigenBlock:
    """``H_p`` of one parameter in its ``(m, n)`` view: eigenvalues ``(m, n)`` ≥ 0, eigenbases ``(m, m)``, ``(n, n)``
    with orthonormal columns (None = identity)."""

    eigenvalues: Tensor
    q_u: Tensor | None = None
    q_v: Tensor | None = None

    @property
    def m(self) -> int:
        return self.eigenvalues.shape[0]

    @property
    def n(self) -> int:
        return self.eigenvalues.shape[1]

    def rotate(self, w: Tensor) -> Tensor:
        """``Q_uᵀ W Q_v`` for ``w`` ``(Q, m, n)``."""
        if self.q_u is not None:
            w = self.q_u.T.to(w.dtype) @ w
        if self.q_v is not None:
            w = w @ self.q_v.to(w.dtype)
        return w

    def unrotate(self, w: Tensor) -> Tensor:
        """``Q_u W Q_vᵀ`` for ``w`` ``(Q, m, n)``."""
        if self.q_u is not None:
            w = self.q_u.to(w.dtype) @ w
        if self.q_v is not None:
            w = w @ self.q_v.T.to(w.dtype)
        return w

    def mean_eigenvalue(self) -> Tensor:
        return self.eigenvalues.mean()

    def denominator(self, damping: Damping, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        """``Λ + δ`` ``(m, n)`` in ``dtype`` (the inverse divides by it in the eigenbasis); raises if any entry is
        ``<= 0``."""
        lam = self.eigenvalues.to(device=device, dtype=dtype)
        out = lam + damping.value(lam.mean())
        if bool((out <= 0).any()):
            raise ValueError(f"curvature block of shape ({self.m}, {self.n}) has eigenvalues + damping <= 0 "
                             f"(smallest eigenvalue {lam.min().item():.3g}); increase the damping")
        return out

    def converted(self, dtype: torch.dtype, device: torch.device | str) -> EigenBlock:
        """The same block with its tensors in ``dtype`` on ``device``."""
        return EigenBlock(*(None if t is None else t.to(device, dtype) for t in (self.eigenvalues, self.q_u, self.q_v)))

    def apply_inverse(self, w: Tensor, damping: Damping) -> Tensor:
        """``(H_p + δI)⁻¹ W`` for ``w`` ``(Q, m, n)``, computed in at least the block's precision."""
        dtype = torch.promote_types(w.dtype, self.eigenvalues.dtype)
        denominator = self.denominator(damping, dtype, w.device)
        block = self.converted(dtype, w.device)
        return block.unrotate(block.rotate(w.to(dtype)) / denominator).to(w.dtype)

    def rotate_pieces(self, pieces: list[Piece], n_examples: int, dtype: torch.dtype) -> Tensor:
        """``Q_uᵀ G_i Q_v`` ``(N, m, n)`` in ``dtype`` for the examples' gradients ``G_i`` given as pieces (summed).

        An Outer piece is rotated factor by factor (``Σ_t (Q_uᵀ u_t)(Q_vᵀ v_t)ᵀ``: ``N·T·(m² + n² + m·n)``) where that
        is cheaper than materializing ``G_i`` and rotating it (``N·T·m·n + N·(m²n + mn²)``): for one position per
        example (MLP queries) a factor ``min(m, n)`` fewer multiply-adds. Same numbers to rounding either way.
        """
        q_u, q_v = (None if q is None else q.to(dtype) for q in (self.q_u, self.q_v))
        out = None
        for p in pieces:
            if isinstance(p, Outer) and (p.m, p.n) == (self.m, self.n):
                p = cast(p, dtype)
                t, m, n = p.length, self.m, self.n
                factored = t * ((m * m if q_u is not None else 0) + (n * n if q_v is not None else 0) + m * n)
                dense_first = t * m * n + (m * m * n if q_u is not None else 0) + (m * n * n if q_v is not None else 0)
                if factored < dense_first:
                    part = rotate_piece(p, None if q_u is None else q_u.to(p.v.device),
                                        None if q_v is None else q_v.to(p.v.device)).materialize()
                    part = part.reshape(n_examples, m, n)
                else:
                    part = self.converted(dtype, p.v.device).rotate(p.materialize().reshape(n_examples, m, n))
            else:
                g = p.materialize().to(dtype).reshape(n_examples, self.m, self.n)
                part = self.converted(dtype, g.device).rotate(g)
            out = part if out is None else out + part
        return out

    def change_basis(self, x: Tensor, other: EigenBlock) -> Tensor:
        """Matrices ``x`` ``(m, n, Q)`` (queries last) given in this block's eigenbasis, re-expressed in ``other``'s
        (same ``(m, n)`` view): ``(Q'_uᵀ Q_u) x_q (Q_vᵀ Q'_v)``, the same as unrotating then rotating at half the
        multiply-adds (``Q·(m²n + mn²)``). Each side one GEMM over all queries."""
        def product(a: Tensor | None, b: Tensor | None) -> Tensor | None:  # aᵀ b with None = identity
            if a is None:
                return b
            return a.T if b is None else a.T @ b

        m, n, q = x.shape
        left = product(*(None if t is None else t.to(x.device, x.dtype) for t in (other.q_u, self.q_u)))
        right = product(*(None if t is None else t.to(x.device, x.dtype) for t in (self.q_v, other.q_v)))
        if left is not None:
            x = (left @ x.reshape(m, n * q)).reshape(m, n, q)
        return x if right is None else torch.matmul(right.T, x)

    def unrotate_columns(self, x: Tensor, right: bool = True) -> Tensor:
        """``Q_u x_q Q_vᵀ`` for matrices ``x`` ``(m, n, Q)`` (queries last), or ``Q_u x_q`` without ``right``: one
        ``(m × m)·(m × n·Q)`` GEMM and one batched ``(n × n)·(n × Q)`` product, no transposed copy."""
        m, n, q = x.shape
        if right and self.q_v is not None:
            x = torch.matmul(self.q_v.to(x.device, x.dtype), x)
        if self.q_u is not None:
            x = (self.q_u.to(x.device, x.dtype) @ x.reshape(m, n * q)).reshape(m, n, q)
        return x

    def apply_function(self, w: Tensor, fn) -> Tensor:
        """``f(H_p) W = Q_u [ f(Λ) ⊙ (Q_uᵀ W Q_v) ] Q_vᵀ`` for ``w`` ``(Q, m, n)`` and an elementwise ``fn`` of the
        eigenvalues (SOURCE's ``exp(−ηKλ)`` and ``(1 − e^{−ηKλ})/λ``)."""
        dtype = torch.promote_types(w.dtype, self.eigenvalues.dtype)
        lam = self.eigenvalues.to(device=w.device, dtype=dtype)
        block = EigenBlock(lam, *(None if q is None else q.to(w.device, dtype) for q in (self.q_u, self.q_v)))
        return block.unrotate(block.rotate(w.to(dtype)) * fn(lam)).to(w.dtype)

    def apply_functions(self, w: Tensor, fns: list) -> list[Tensor]:
        """``[f(H_p) W for f in fns]`` with one rotation into the eigenbasis for all of them."""
        dtype = torch.promote_types(w.dtype, self.eigenvalues.dtype)
        lam = self.eigenvalues.to(device=w.device, dtype=dtype)
        block = EigenBlock(lam, *(None if q is None else q.to(w.device, dtype) for q in (self.q_u, self.q_v)))
        rotated = block.rotate(w.to(dtype))
        return [block.unrotate(rotated * fn(lam)).to(w.dtype) for fn in fns]

    def matrix(self) -> Tensor:
        """The dense ``(m·n, m·n)`` matrix ``H_p`` (row-major vec); for tests and small blocks only."""
        eye = torch.eye(self.m * self.n, dtype=self.eigenvalues.dtype, device=self.eigenvalues.device)
        basis = self.unrotate(eye.reshape(-1, self.m, self.n)).reshape(self.m * self.n, -1).T  # columns Q e_k
        return basis @ torch.diag(self.eigenvalues.reshape(-1)) @ basis.T

    def nbytes(self) -> int:
        """Bytes of the block's tensors (eigenvalues and eigenbases)."""
        return sum(t.numel() * t.element_size() for t in (self.eigenvalues, self.q_u, self.q_v) if t is not None)

    def to(self, device: torch.device | str) -> EigenBlock:
        return EigenBlock(*(None if t is None else t.to(device) for t in (self.eigenvalues, self.q_u, self.q_v)))

    def state(self, prefix: str) -> dict[str, Tensor]:
        out = {f"{prefix}:eigenvalues": self.eigenvalues}
        for key, q in (("q_u", self.q_u), ("q_v", self.q_v)):
            if q is not None:
                out[f"{prefix}:{key}"] = q
        return out

    @classmethod
    def from_state(cls, prefix: str, tensors: dict[str, Tensor]) -> EigenBlock:
        return cls(tensors[f"{prefix}:eigenvalues"], tensors.get(f"{prefix}:q_u"), tensors.get(f"{prefix}:q_v"))


def eigen(factor: Tensor) -> tuple[Tensor, Tensor | None]:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD factor, in float64; a 1-D factor is diagonal
    (its own eigenvalues, identity basis), and so is a ``1 × 1`` one."""
    if factor.dim() == 1 or factor.shape[0] == 1:
        return factor.reshape(-1).clamp(min=0), None
    lam, q = torch.linalg.eigh(factor.double())
    return lam.clamp(min=0).to(factor.dtype), q.to(factor.dtype)


def block_view(pieces: list[Piece]) -> tuple[int, int]:
    """The ``(m, n)`` view of a parameter from its pieces: the Outer view, or ``(numel, 1)`` if any piece is Dense."""
    first = pieces[0]
    if all(isinstance(p, Outer) for p in pieces):
        return first.m, first.n
    numel = first.m * first.n if isinstance(first, Outer) else first.g.shape[1]
    return numel, 1


def cast(piece: Piece, dtype: torch.dtype) -> Piece:
    if isinstance(piece, Dense):
        return Dense(piece.g.to(dtype))
    return Outer(piece.u if piece.indexed else piece.u.to(dtype), piece.v.to(dtype), piece.m, piece.n)


def rotate_piece(piece: Outer, q_u: Tensor | None, q_v: Tensor | None) -> Outer:
    """``Σ_t (Q_uᵀ u_t)(Q_vᵀ v_t)ᵀ`` as an Outer piece (an indexed ``u`` stays indexed when ``Q_u`` is None)."""
    if q_u is None:
        u = piece.u
    elif piece.indexed:
        u = q_u[piece.u]  # Q_uᵀ e_idx is row idx of Q_u
    else:
        u = piece.u @ q_u
    v = piece.v if q_v is None else piece.v @ q_v
    return Outer(u, v, piece.m, piece.n)


def sum_of_squares(pieces: list[Piece], m: int, n: int) -> Tensor:
    """``Σ_i G_i ⊙ G_i`` ``(m, n)`` where ``G_i`` is example i's gradient summed over ``pieces``.

    One piece with one position per example: ``Σ_i (u_i²)(v_i²)ᵀ``, a single ``(m × N)·(N × n)`` product. One indexed
    piece (Embedding): the rows each example touches, summed per (example, index), squared. Otherwise the gradients
    are materialized in chunks of examples bounded by ``CHUNK_ELEMENTS``.
    """
    first = pieces[0]
    if len(pieces) == 1 and isinstance(first, Outer) and (first.m, first.n) == (m, n):
        if first.indexed:  # rows of G_i = Σ of v_t over the positions with that index; never a (m, n) per example
            keys = first.u + m * torch.arange(first.n_examples, device=first.u.device)[:, None]
            uniq, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
            rows = torch.zeros(len(uniq), n, dtype=first.v.dtype, device=first.v.device)
            rows.index_add_(0, inverse, first.v.reshape(-1, n))
            out = torch.zeros(m, n, dtype=first.v.dtype, device=first.v.device)
            return out.index_add_(0, uniq % m, rows**2)
        if first.length == 1:
            return (first.u[:, 0] ** 2).T @ first.v[:, 0] ** 2
    n_ex = first.n_examples
    step = max(1, CHUNK_ELEMENTS // max(m * n, 1))
    total = None
    for start in range(0, n_ex, step):
        rows = slice(start, start + step)
        g = sum(p.select(rows).materialize() for p in pieces)
        part = (g * g).sum(0)
        total = part if total is None else total + part
    return total.reshape(m, n)


class FactorSums:
    """KFAC's running sums for one parameter over all its Outer pieces (tied weights pool their positions):
    ``Σ u uᵀ`` (``(m,)`` token counts when every ``u`` is an index: a diagonal factor), ``Σ v vᵀ`` and the number of
    positions summed."""

    def __init__(self, m: int, n: int, dtype: torch.dtype, device: torch.device):
        self.uu: Tensor = torch.zeros(m, dtype=dtype, device=device)  # diagonal until a dense u arrives
        self.vv = torch.zeros(n, n, dtype=dtype, device=device)
        self.positions = torch.zeros((), dtype=dtype, device=device)

    def add(self, piece: Outer) -> None:
        v = piece.v.reshape(-1, piece.n)
        self.vv += v.T @ v
        self.positions += v.shape[0]
        if piece.indexed:
            counts = torch.bincount(piece.u.reshape(-1), minlength=piece.m).to(self.uu.dtype)
            self.uu += counts if self.uu.dim() == 1 else torch.diag(counts)
        else:
            u = piece.u.reshape(-1, piece.m)
            if self.uu.dim() == 1:
                self.uu = torch.diag(self.uu)
            self.uu += u.T @ u

    def tensors(self) -> list[Tensor]:
        return [self.uu, self.vv, self.positions]
