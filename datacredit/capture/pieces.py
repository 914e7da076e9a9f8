"""Factored per-example gradients ("pieces") and the dot products between them.

Every rule turns one call of one module into pieces, one per trainable parameter it uses:

* :class:`Outer` — the per-example gradient of a parameter viewed as an ``(m, n)`` matrix (row-major view of the
  parameter) is a sum of outer products ``G_i = Σ_t u_{i,t} v_{i,t}ᵀ``. Linear (``u`` = output gradient, ``v`` = input),
  Conv2d (``v`` = unfolded input), Conv1D (``u`` = input, ``v`` = output gradient), Embedding (``u`` = one-hot of the
  token, stored as an index), and biases (``v`` = 1) all take this form.
* :class:`Dense` — the per-example gradient itself, flattened: ``(N, numel)`` (LayerNorm, small parameters).

Three ways to use an :class:`Outer` piece, chosen by cost (DESIGN.md, "Capture engine"):

* **materialize** ``G_i`` — ``O(N·T·m·n)`` time and ``O(N·m·n)`` memory;
* **ghost dot** ``⟨G_i, G'_j⟩ = Σ_{t,s} (u_t·u'_s)(v_t·v'_s)`` — ``O(N·N'·T·T'·(m+n))``, no ``m×n`` tensor per example;
* **val-first dot** ``⟨G_i, V⟩ = Σ_t u_tᵀ V v_t`` for a fixed ``V`` — ``O(N·T·m·n)`` per ``V``.

Pieces of the same parameter from different modules (tied weights) are summed, so their cross terms are included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Elements of the largest temporary a ghost/val-first product may create before it is split into chunks.
CHUNK_ELEMENTS = 2**22


@dataclass
class Outer:
    """``G_i = Σ_t u_{i,t} v_{i,t}ᵀ`` in a parameter's ``(m, n)`` view.

    u: ``(N, T, m)`` dense, or ``(N, T)`` int64 indices of one-hot rows of width ``m`` (Embedding).
    v: ``(N, T, n)``.
    unit: ``v`` is all ones (a bias, ``n = 1``): products with it are skipped where that saves a pass. Only a rule that
    builds ``v`` as ones sets it; anything that transforms ``v`` builds a new Outer, which has it False.
    """

    u: Tensor
    v: Tensor
    m: int
    n: int
    unit: bool = False

    @property
    def n_examples(self) -> int:
        return self.v.shape[0]

    @property
    def length(self) -> int:
        return self.v.shape[1]

    @property
    def indexed(self) -> bool:
        return self.u.dim() == 2

    @property
    def dtype(self) -> torch.dtype:
        return self.v.dtype

    def dense_u(self) -> Tensor:
        """``u`` as a dense ``(N, T, m)`` tensor (one-hot rows for an indexed piece)."""
        if not self.indexed:
            return self.u
        out = torch.zeros(*self.u.shape, self.m, dtype=self.v.dtype, device=self.v.device)
        return out.scatter_(-1, self.u.unsqueeze(-1), 1.0)

    def materialize(self, out: Tensor | None = None) -> Tensor:
        """Per-example gradients ``(N, m·n)`` (row-major view of the parameter); written into ``out`` (a contiguous
        ``(N, m·n)`` tensor of the pieces' dtype) when given and the piece is not indexed."""
        n_ex, t = self.u.shape[:2]
        if out is not None and not self.indexed:
            torch.bmm(self.u.transpose(1, 2), self.v, out=out.view(n_ex, self.m, self.n))
            return out
        if self.indexed:
            # Σ_t e_{idx_t} v_tᵀ: add each v_t into row idx_t.
            out = torch.zeros(n_ex, self.m, self.n, dtype=self.v.dtype, device=self.v.device)
            out.scatter_add_(1, self.u.unsqueeze(-1).expand(-1, -1, self.n), self.v)
            return out.reshape(n_ex, -1)
        return torch.bmm(self.u.transpose(1, 2), self.v).reshape(n_ex, -1)

    def select(self, index: Tensor | slice) -> Outer:
        return Outer(self.u[index], self.v[index], self.m, self.n, self.unit)

    def total(self, weights: Tensor | None = None, absolute: bool = False) -> Tensor:
        """``Σ_i r_i G_i`` flattened, ``(m·n,)``: one matmul over all examples and positions.

        weights: per-example ``r`` ``(N,)`` (default 1). absolute: ``Σ_i |r_i| |u_i|ᵀ|v_i|`` instead, the bound on the
        rounding error of the sum that a check of two summation orders measures against.
        """
        v = self.v if weights is None else self.v * weights.to(self.v.dtype).reshape(-1, 1, 1)
        u = self.u
        if absolute:
            v, u = v.abs(), u if self.indexed else u.abs()
        v = v.reshape(-1, self.n)
        if self.indexed:
            out = torch.zeros(self.m, self.n, dtype=v.dtype, device=v.device)
            return out.index_add_(0, u.reshape(-1), v).reshape(-1)
        return (u.reshape(-1, self.m).T @ v).reshape(-1)


@dataclass
class Dense:
    """Per-example gradients already materialized: ``g`` has shape ``(N, numel)``."""

    g: Tensor

    @property
    def n_examples(self) -> int:
        return self.g.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.g.dtype

    def materialize(self) -> Tensor:
        return self.g

    def dot(self, weights: Tensor) -> Tensor:
        """``⟨g_i, V_q⟩`` for ``weights`` ``(Q, numel)``; returns ``(N, Q)``."""
        return self.g @ weights.T

    def select(self, index: Tensor | slice) -> Dense:
        return Dense(self.g[index])

    def total(self, weights: Tensor | None = None, absolute: bool = False) -> Tensor:
        """``Σ_i r_i g_i`` (or ``Σ_i |r_i g_i|``), ``(numel,)``; see :meth:`Outer.total`."""
        g = self.g if weights is None else self.g * weights.to(self.g.dtype).reshape(-1, 1)
        return (g.abs() if absolute else g).sum(0)


Piece = Outer | Dense


def _u_gram(a: Outer, b: Outer) -> Tensor:
    """``(u_{i,t}·u'_{j,s})`` as ``(N, T, N', T')``."""
    if a.indexed and b.indexed:
        return (a.u[:, :, None, None] == b.u[None, None, :, :]).to(a.v.dtype)
    if a.indexed:  # one-hot · dense = the dense vector's entry at the index
        return _u_gram(b, a).permute(2, 3, 0, 1)
    if b.indexed:
        # a.u[i, t, b.u[j, s]] for every (i, t, j, s)
        nb, tb = b.u.shape
        picked = a.u[:, :, b.u.reshape(-1)]  # (N, T, N'·T')
        return picked.reshape(*a.u.shape[:2], nb, tb)
    return torch.einsum("itm,jsm->itjs", a.u, b.u)


def ghost_cost(a: Outer, b: Outer) -> int:
    """Multiply-adds of the ghost dot between all examples of ``a`` and ``b``."""
    return a.n_examples * b.n_examples * a.length * b.length * (a.m + a.n)


def materialize_cost(a: Outer, b: Outer) -> int:
    """Multiply-adds of materializing both sides and multiplying."""
    mn = a.m * a.n
    return (a.n_examples * a.length + b.n_examples * b.length) * mn + a.n_examples * b.n_examples * mn


def ghost_gram(a: Outer, b: Outer) -> Tensor:
    """``⟨G_i, G'_j⟩`` for all pairs, ``(N, N')``, without forming any ``m×n`` per-example tensor.

    Cost ``O(N·N'·T·T'·(m+n))``; split over ``b``'s examples so the ``(N, T, N', T')`` temporaries stay bounded.
    """
    per_example = a.n_examples * a.length * b.length
    step = max(1, CHUNK_ELEMENTS // max(per_example, 1))
    blocks = []
    for start in range(0, b.n_examples, step):
        bb = b.select(slice(start, start + step))
        uu = _u_gram(a, bb)
        vv = torch.einsum("itn,jsn->itjs", a.v, bb.v)
        blocks.append((uu * vv).sum(dim=(1, 3)))
    return torch.cat(blocks, dim=1)


def val_first_dot(a: Outer, weights: Tensor) -> Tensor:
    """``Σ_t u_{i,t}ᵀ V_q v_{i,t}`` for ``weights`` ``(Q, m, n)``; returns ``(N, Q)``.

    Cost ``O(N·T·m·n·Q)`` time, temporaries ``O(N·T·n)`` per query chunk.
    """
    n_ex, t = a.v.shape[:2]
    q_total = weights.shape[0]
    v_flat = a.v.reshape(n_ex * t, a.n)
    if q_total == 1:  # the In-Run case: one matmul and one row-wise dot, no einsum dispatch
        rows = weights[0][a.u.reshape(-1)] if a.indexed else a.u.reshape(n_ex * t, a.m) @ weights[0]  # (N·T, n)
        dots = rows.reshape(n_ex, t) if a.unit else (rows * v_flat).sum(-1).reshape(n_ex, t)  # unit: rows·1 = rows
        return dots if t == 1 else dots.sum(1, keepdim=True)  # one position: the sum is the value itself
    step = max(1, CHUNK_ELEMENTS // max(n_ex * t * a.n, 1))
    cols = []
    for start in range(0, q_total, step):
        w = weights[start : start + step]  # (q, m, n)
        if a.indexed:
            rows = w[:, a.u.reshape(-1), :]  # (q, N·T, n): V_q[idx_t]
        else:
            rows = torch.einsum("pm,qmn->qpn", a.u.reshape(n_ex * t, a.m), w)
        cols.append(torch.einsum("qpn,pn->qp", rows, v_flat).reshape(-1, n_ex, t).sum(-1).T)
    return torch.cat(cols, dim=1)


def ghost_factors(pieces: list[Outer]) -> list[tuple[Tensor, Tensor | None]]:
    """The rows of all ``pieces`` (one parameter's pieces from other examples) stacked for :func:`ghost_total`:
    ``[(u, v)]`` with ``u`` ``(P, m)`` dense or ``(P,)`` indices and ``v`` ``(P, n)``, one entry per kind of ``u``;
    ``v`` is None where every stacked piece has ``v = 1`` (biases: :attr:`Outer.unit`)."""
    def stack(parts: list[Tensor]) -> Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # one piece (the usual case): a view, no copy

    dense = [p for p in pieces if not p.indexed]
    indexed = [p for p in pieces if p.indexed]
    out = []
    for group, flat in ((dense, lambda p: p.u.reshape(-1, p.m)), (indexed, lambda p: p.u.reshape(-1))):
        if group:
            v = None if all(p.unit for p in group) else stack([p.v.reshape(-1, p.n) for p in group])
            out.append((stack([flat(p) for p in group]), v))
    return out


def ghost_total(a: Outer, factors: list[tuple[Tensor, Tensor | None]], memo: dict | None = None) -> Tensor:
    """``⟨G_i, Σ_j G'_j⟩`` for every example i of ``a``, ``(N,)``, from the stacked rows of the other side
    (:func:`ghost_factors`; ``v`` None = ones): ``Σ_{t,p} (u_{i,t}·u'_p)(v_{i,t}·v'_p)`` without forming any
    ``m×n`` tensor.

    Cost ``N·T·P·(m+n)`` for ``P`` rows on the other side (:func:`ghost_cost` summed over its pieces); temporaries
    ``(N·T, P)``, split over ``P`` to stay under :data:`CHUNK_ELEMENTS`.
    memo: a dict shared by the pieces of one module call (kept only while they are alive): ``u·u'`` is computed once
    for pieces with the same ``u`` against the same rows (a Linear's weight and bias), so a bias whose weight took
    this route costs one reduction.
    """
    n_ex, t = a.v.shape[:2]
    ua = a.u.reshape(-1) if a.indexed else a.u.reshape(n_ex * t, a.m)
    out = None
    step = max(1, CHUNK_ELEMENTS // max(n_ex * t, 1))
    for ub_all, vb_all in factors:
        for start in range(0, ub_all.shape[0], step):
            ub = ub_all[start : start + step]
            key = memo_key(a, ub) if memo is not None else None
            uu = memo.get(key) if key is not None else None
            if uu is None:
                uu = _uu(a, ua, ub)
                if key is not None:
                    memo[key] = uu
            if a.unit and vb_all is None:  # v·v' = 1: the u-products alone
                term = uu.reshape(n_ex, -1).sum(1)
            else:
                vb = (torch.ones(ub.shape[0], 1, dtype=a.v.dtype, device=a.v.device) if vb_all is None
                      else vb_all[start : start + step])
                vv = a.v.reshape(n_ex * t, a.n) @ vb.T  # (N·T, p)
                term = (uu.to(vv.dtype) * vv).reshape(n_ex, -1).sum(1)
            out = term if out is None else out + term
    return torch.zeros(n_ex, dtype=a.v.dtype, device=a.v.device) if out is None else out


def memo_key(a: Outer, ub: Tensor) -> tuple:
    """The :func:`ghost_total` memo key of ``a``'s ``u`` against the rows ``ub``: valid while both are alive."""
    return id(a.u), ub.data_ptr(), ub.shape, ub.stride(), ub.dtype


def _uu(a: Outer, ua: Tensor, ub: Tensor) -> Tensor:
    """``u_{i,t}·u'_p`` as ``(N·T, p)`` for ``a``'s rows ``ua`` (dense or indices) and the other side's ``ub``."""
    if a.indexed and ub.dim() == 1:
        return (ua[:, None] == ub[None, :]).to(a.v.dtype)
    if a.indexed:  # one-hot · dense = the dense row's entry at the index
        return ub[:, ua].T
    if ub.dim() == 1:
        return ua[:, ub]
    return ua @ ub.T


def low_rank(matrix: Tensor, rank: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """A rank-``rank`` sketch ``matrix ≈ Σ_k u_k v_kᵀ`` of an ``(m, n)`` matrix as ghost rows ``(u (r, m), v (r, n))``
    (:func:`ghost_total` takes them as one factor pair): a randomized range finder with 8 extra columns and one power
    iteration, then an exact SVD of the small projected matrix (Halko, Martinsson, Tropp 2011). An approximation:
    the error is the tail of the singular values (about ``σ_{r+1}`` in spectral norm). Cost ``O(m·n·(r + 8))``."""
    m, n = matrix.shape
    p = min(rank + 8, m, n)
    omega = torch.randn(n, p, generator=generator, dtype=matrix.dtype).to(matrix.device)
    q, _ = torch.linalg.qr(matrix @ omega)
    q, _ = torch.linalg.qr(matrix @ (matrix.T @ q))  # one power iteration: sharper where the spectrum decays slowly
    ub, sv, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)
    r = min(rank, sv.shape[0])
    return ((q @ ub[:, :r]) * sv[:r]).T.contiguous(), vh[:r].contiguous()


def materialized_gram(a: Piece, b: Piece) -> Tensor:
    """``G_a G_bᵀ`` with ``b``'s per-example gradients materialized once and ``a``'s in chunks of examples.

    Cost ``(N·T + N'·T')·m·n + N·N'·m·n``: what :func:`materialize_cost` prices. (A val-first dot of ``a`` with the
    materialized ``b`` would cost ``N·T·m·n·N'``, never less, so the gram does not use it.)
    """
    gb = b.materialize()
    width = gb.shape[1]
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    return torch.cat([a.select(slice(s, s + step)).materialize() @ gb.T for s in range(0, a.n_examples, step)])


def piece_gram(a: Piece, b: Piece) -> Tensor:
    """``⟨g_i, g'_j⟩`` between two pieces of the same parameter, ``(N, N')``, by the cheaper exact route."""
    if isinstance(a, Outer) and isinstance(b, Outer) and ghost_cost(a, b) <= materialize_cost(a, b):
        return ghost_gram(a, b)
    return materialized_gram(a, b)


def piece_dot(a: Piece, weights: Tensor) -> Tensor:
    """``⟨g_i, V_q⟩`` for ``weights`` ``(Q, numel)`` in the parameter's row-major layout; returns ``(N, Q)``."""
    if isinstance(a, Outer):
        return val_first_dot(a, weights.reshape(-1, a.m, a.n))
    return a.dot(weights)


def piece_sq_norms(a: Piece) -> Tensor:
    """``‖g_i‖²`` of each example's own piece, ``(N,)`` (diagonal of the self-Gram, computed per example)."""
    if isinstance(a, Dense):
        return (a.g * a.g).sum(-1)
    if a.length * a.length * (a.m + a.n) < a.length * a.m * a.n:
        if a.indexed:
            uu = (a.u[:, :, None] == a.u[:, None, :]).to(a.v.dtype)
        else:
            uu = a.u @ a.u.transpose(1, 2)
        return (uu * (a.v @ a.v.transpose(1, 2))).sum(dim=(1, 2))
    g = a.materialize()
    return (g * g).sum(-1)
