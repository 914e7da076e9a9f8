"""Preconditioned query weights held once per query round, and their products with every training batch.

Influence (KFAC, EK-FAC, diagonal, explicit, CG) prepares the round's queries once, ``W_q = (H + δI)⁻¹ ∇f_q`` per
parameter in its ``(m, n)`` view, then scores each training batch: ``score[i, q] = Σ_p ⟨G_{i,p}, W_{q,p}⟩``. Two things
here make that cheaper than :func:`~datacredit.methods.base.products` on the unrotated weights, both exact (the same
sums, other rounding):

* **Deferred right rotation.** For a Kronecker eigenbasis ``W_q = Q_u X_q Q_vᵀ`` (``X_q`` the damped-inverse-scaled
  query in the eigenbasis) the last factor ``Q_vᵀ`` costs ``Q·m·n²`` on the query side; moved to the training side,
  ``⟨u vᵀ, Q_u X_q Q_vᵀ⟩ = ⟨u (Q_vᵀ v)ᵀ, Q_u X_q⟩`` costs ``N_train·T·n²`` (rotating each training ``v`` once per
  round). :class:`QueryPreparer` takes whichever is cheaper (``n_train·T < Q·m``: here 5,000 < 500 × 64), decided
  once per round with the round's total query count ``Q`` after its sub-groups are in.
* **Zero-skipping products.** A ReLU network's output gradients ``u`` are mostly exact zeros (inactive units: 76 % in
  the fmnist-mlp case). ``⟨Σ_t u_t v_tᵀ, W_q⟩ = Σ_t Σ_{j: u_tj ≠ 0} u_tj (W_q[j] · v_t)``: for each row ``j`` of the
  weight, one GEMM of the positions where ``u_·j ≠ 0`` with ``W[j]`` ``(n, Q)``, ``nnz(u)·n·Q`` multiply-adds instead
  of ``N·T·m·n·Q`` (and the same by columns when ``v`` is the sparser side). Taken per piece where it costs
  :data:`ROW_SPARSE_ADVANTAGE` times fewer multiply-adds than the best route of
  :func:`~datacredit.methods.base.piece_products` (materialize + GEMM, or val-first), which is used otherwise.

Layout: each parameter's weights are one ``(m, n, Q)`` contiguous tensor; its ``(m·n, Q)`` view is the GEMM operand
and ``W[j]`` ``(n, Q)`` the zero-skipping one, so no route needs a second copy. :class:`QueryPreparer` allocates it
once per round and fills it sub-group by sub-group (``w[..., cols] = x``), so a round never holds all its query
gradients (with T positions they are ``T·(m + n)`` numbers per layer and query, near the ``m·n`` of the weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..capture import ExampleGrads
from ..capture.pieces import CHUNK_ELEMENTS, Dense, Outer, Piece
from ..curvature.base import Damping
from ..curvature.eigen import EigenBlock, block_view
from .base import VAL_FIRST_ADVANTAGE, gemm_cost, piece_products, val_first_cost

# The zero-skipping route does its multiply-adds in one GEMM per weight row, plus a gather of the rows and a scatter-add
# of the results; measured at the GEMM route's speed per multiply-add (a 256-example batch, 500 queries, 784→64 layer
# at 24 % nonzero u: 0.031 s against 0.105 s, one thread). Taken only when it needs this many times fewer.
ROW_SPARSE_ADVANTAGE = 1.5
LOOP_MULTIPLY_ADDS = 2**21  # a Python-level iteration (a few small ops, ~40 µs) counted as this many multiply-adds


@dataclass
class Prepared:
    """One parameter's query weights: ``w`` ``(m, n, Q)`` contiguous and an optional right rotation ``r`` ``(n, n)``;
    the query weight is ``W_q = w[..., q] rᵀ`` (``r`` None: ``W_q = w[..., q]``)."""

    w: Tensor
    r: Tensor | None = None

    @property
    def n_query(self) -> int:
        return self.w.shape[2]


class PreparedQueries:
    """Query weights ``{name: Prepared}`` for one round; :meth:`products` scores a training batch against them."""

    def __init__(self, weights: dict[str, Prepared]):
        self.weights = weights

    @classmethod
    def from_weights(cls, weights: dict[str, Tensor], views: dict[str, tuple[int, int]]) -> PreparedQueries:
        """From weights ``{name: (Q, *shape)}`` in the original basis, each viewed as ``views[name]`` ``(m, n)``."""
        out = {}
        for name, w in weights.items():
            m, n = views[name]
            out[name] = Prepared(w.reshape(-1, m, n).permute(1, 2, 0).contiguous())
        return cls(out)

    def products(self, grads: ExampleGrads) -> Tensor:
        """``Σ_p ⟨g_{i,p}, W_{q,p}⟩`` over the prepared parameters, ``(N, Q)`` in the gradients' dtype (the slow twin:
        ``ExampleGrads.dot`` with the unrotated weights, in the tests)."""
        out = None
        for name, pieces in grads.pieces.items():
            prep = self.weights.get(name)
            if prep is None:
                continue
            for piece in pieces:
                term = piece_scores(piece, prep)
                out = term if out is None else out + term
        if out is None:
            raise ValueError("the prepared queries share no parameter with these gradients")
        return out


def piece_scores(piece: Piece, prep: Prepared) -> Tensor:
    """``⟨G_i, W_q⟩`` ``(N, Q)`` for one piece: its right rotation applied, then the cheapest route by cost."""
    m, n, q = prep.w.shape
    dtype = piece.v.dtype if isinstance(piece, Outer) else piece.g.dtype
    w = prep.w.to(dtype)
    r = None if prep.r is None else prep.r.to(dtype)
    if isinstance(piece, Dense):
        g = piece.g
        if r is not None:
            g = (g.reshape(-1, m, n) @ r).reshape(len(g), -1)
        return g @ w.reshape(m * n, q)
    if (piece.m, piece.n) != (m, n):
        raise ValueError(f"a piece of view ({piece.m}, {piece.n}) against query weights of view ({m}, {n})")
    if r is not None:
        piece = Outer(piece.u, piece.v @ r, m, n)
    way = route(piece, q)
    if way == "rows":
        return row_sparse_scores(piece.u, piece.v, w, piece.length)
    if way == "cols":
        return row_sparse_scores(piece.v, piece.u, w.transpose(0, 1), piece.length)
    return piece_products(piece, w.reshape(m * n, q).T)


def route(piece: Outer, n_query: int) -> str:
    """How :func:`piece_scores` multiplies ``piece`` with ``n_query`` queries: ``"rows"`` / ``"cols"`` (zero-skipping
    over the rows of ``u`` / of ``v``) where that needs ``ROW_SPARSE_ADVANTAGE`` times fewer multiply-adds than the
    best of :func:`~datacredit.methods.base.piece_products`' routes, else ``"base"`` (that function's own choice).
    Zero-skipping is taken on the CPU only (measured there; elsewhere each of its ``m`` iterations launches kernels
    that cost more than one large GEMM)."""
    if piece.indexed or piece.v.device.type != "cpu":  # on an accelerator the loop's launches cost more than the GEMM
        return "base"
    by_rows = row_sparse_cost(piece.u, piece.n, n_query)
    by_cols = row_sparse_cost(piece.v, piece.m, n_query)
    best = min(gemm_cost(piece, n_query), VAL_FIRST_ADVANTAGE * val_first_cost(piece, n_query))
    if ROW_SPARSE_ADVANTAGE * min(by_rows, by_cols) >= best:
        return "base"
    return "rows" if by_rows <= by_cols else "cols"


def deferred(train_positions: int, query_rows: int) -> bool:
    """Whether to leave ``Q_v`` to the training side: rotating every training position's ``v`` (``n_train·T·n²``)
    costs less than rotating every query's rows (``Q·m·n²``)."""
    return train_positions < query_rows


def row_sparse_cost(u: Tensor, n: int, n_query: int) -> int:
    """Multiply-adds of :func:`row_sparse_scores` with ``u`` ``(N, T, m)`` as the skipped side: ``nnz(u)·(n·Q + n)``
    plus the loop over its ``m`` rows."""
    return int(torch.count_nonzero(u)) * (n * n_query + n) + u.shape[-1] * LOOP_MULTIPLY_ADDS


def row_sparse_scores(u: Tensor, v: Tensor, w: Tensor, length: int) -> Tensor:
    """``Σ_t Σ_{j: u_tj ≠ 0} u_tj (v_t · W[j])`` ``(N, Q)``; u ``(N, T, m)``, v ``(N, T, n)``, w ``(m, n, Q)``.

    One GEMM per ``j`` over the positions where ``u_·j ≠ 0`` (in chunks of at most ``CHUNK_ELEMENTS`` results), their
    results scaled by ``u_tj`` and added into their examples' rows.
    """
    m, n, q = w.shape
    u = u.reshape(-1, m)
    v = v.reshape(-1, n)
    cols, rows = torch.nonzero(u.T, as_tuple=True)  # sorted by j, then by position
    values = u[rows, cols]
    examples = rows // length
    out = torch.zeros(u.shape[0] // length, q, dtype=v.dtype, device=v.device)
    step = max(1, CHUNK_ELEMENTS // max(q, 1))
    start = 0
    for j, count in enumerate(torch.bincount(cols, minlength=m).tolist()):
        for s in range(start, start + count, step):
            e = min(start + count, s + step)
            part = v.index_select(0, rows[s:e]) @ w[j]
            out.index_add_(0, examples[s:e], part * values[s:e, None])
        start += count
    return out


def prepare(blocks: dict[str, EigenBlock], grads: list[ExampleGrads], damping: Damping, n_train: int,
            dtype_of: Callable[[ExampleGrads], torch.dtype]) -> PreparedQueries:
    """``(H_p + δI)⁻¹ ∇f_q`` per parameter for the queries of ``grads`` (in order), from each parameter's
    :class:`EigenBlock`, as one sub-group of a :class:`QueryPreparer` (see there for the steps and the cost)."""
    preparer = QueryPreparer(blocks, damping, n_train, sum(g.n for g in grads), dtype_of)
    preparer.add(grads)
    return preparer.finish()


class QueryPreparer:
    """Preconditioned query weights filled sub-group by sub-group into preallocated ``(m, n, n_query)`` tensors.

    Each :meth:`add` takes the next queries' factored gradients (a sub-group, in order), rotates them into the
    eigenbasis (:meth:`EigenBlock.rotate_pieces`), divides by ``Λ + δ``, rotates back by ``Q_u`` and writes the
    columns ``w[..., cols]`` in the gradients' dtype; the caller then drops the sub-group's gradients. Its temporaries
    are a few ``(sub-group, m, n)`` tensors of one parameter in the promoted dtype of the gradients and the block
    (as :meth:`EigenBlock.apply_inverse`). :meth:`finish` decides once, with the total query count ``Q``, whether
    ``Q_v`` is left to the training side (``n_train·T < Q·m``, module doc; the same decision for every sub-group) and
    otherwise applies ``Q_vᵀ`` in place, a slab of rows at a time (``Q·m·n²``). Memory: the output
    ``n_query × numel × itemsize`` plus one sub-group's gradients and temporaries. A query without a parameter's
    gradient contributes zeros."""

    ROTATE_ELEMENTS = 2**22  # elements of one right-rotation slab (rows × n × Q) in the promoted dtype

    def __init__(self, blocks: dict[str, EigenBlock], damping: Damping, n_train: int, n_query: int,
                 dtype_of: Callable[[ExampleGrads], torch.dtype]):
        self.blocks, self.damping, self.n_train, self.n_query = blocks, damping, n_train, n_query
        self.dtype_of = dtype_of
        self.w: dict[str, Tensor] = {}
        self.lengths: dict[str, int] = {}  # the most positions T of any Outer query piece per parameter
        self.filled = 0
        self.dtype: torch.dtype | None = None  # of the output: the first sub-group's gradients'

    def add(self, grads: list[ExampleGrads]) -> None:
        """Prepare the next ``sum(g.n)`` queries (columns ``filled:filled + sum(g.n)``)."""
        count = sum(g.n for g in grads)
        if self.filled + count > self.n_query:
            raise ValueError(f"{self.filled + count} queries given to a preparer of {self.n_query}")
        cols = slice(self.filled, self.filled + count)
        self.dtype = self.dtype_of(grads[0]) if self.dtype is None else self.dtype
        for name in query_names(self.blocks, grads):
            block = self.blocks[name]
            dtype = torch.promote_types(self.dtype, block.eigenvalues.dtype)
            x = to_columns(rotated_queries(block, grads, name, dtype))
            x = x / block.denominator(self.damping, dtype, x.device)[..., None]  # not in place: x may be a view of g
            x = block.unrotate_columns(x, right=False)
            if name not in self.w:
                self.w[name] = torch.zeros(block.m, block.n, self.n_query, dtype=self.dtype, device=x.device)
            self.w[name][..., cols] = x
            del x
            self.lengths[name] = max(self.lengths.get(name, 0), query_positions(grads, name))
        self.filled += count

    def finish(self) -> PreparedQueries:
        """The prepared queries (all ``n_query`` must have been added), right rotation applied or deferred."""
        if self.filled != self.n_query:
            raise ValueError(f"{self.filled} of {self.n_query} queries prepared")
        out = {}
        for name, w in self.w.items():
            block = self.blocks[name]
            length = self.lengths[name]
            if block.q_v is None:
                out[name] = Prepared(w)
            elif length > 0 and deferred(self.n_train * length, self.n_query * block.m):
                out[name] = Prepared(w, block.q_v.to(w.device, w.dtype))
            else:
                out[name] = Prepared(self.rotate_right(block, w))
        self.w = {}
        return PreparedQueries(out)

    def rotate_right(self, block: EigenBlock, w: Tensor) -> Tensor:
        """``w[j] ← Q_v w[j]`` (each query's ``x_q Q_vᵀ``) in place, in the promoted dtype, by slabs of rows."""
        m, n, q = w.shape
        dtype = torch.promote_types(w.dtype, block.eigenvalues.dtype)
        q_v = block.q_v.to(w.device, dtype)
        step = max(1, self.ROTATE_ELEMENTS // max(n * q, 1))
        for s in range(0, m, step):
            w[s:s + step] = torch.matmul(q_v, w[s:s + step].to(dtype))
        return w


def query_names(blocks: dict[str, EigenBlock], grads: list[ExampleGrads]) -> list[str]:
    """The parameters with a block that some query has a gradient for."""
    return [name for name in blocks if any(name in g.pieces for g in grads)]


def rotated_queries(block: EigenBlock, grads: list[ExampleGrads], name: str, dtype: torch.dtype) -> Tensor:
    """``Q_uᵀ G_q Q_v`` ``(Q, m, n)`` of parameter ``name`` for the queries of ``grads`` in order (zeros for a batch
    without that parameter), from the factored pieces (:meth:`EigenBlock.rotate_pieces`)."""
    parts = []
    for g in grads:
        if name in g.pieces:
            parts.append(block.rotate_pieces(g.pieces[name], g.n, dtype))
        else:
            parts.append(torch.zeros(g.n, block.m, block.n, dtype=dtype, device=block.eigenvalues.device))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def query_positions(grads: list[ExampleGrads], name: str) -> int:
    """The most positions ``T`` of any Outer query piece of ``name`` (0 if none is Outer)."""
    return max((p.length for g in grads for p in g.pieces.get(name, []) if isinstance(p, Outer)), default=0)


def from_eigenbasis(block: EigenBlock, x: Tensor, defer: bool, dtype: torch.dtype) -> Prepared:
    """Query weights ``W_q = Q_u x_q Q_vᵀ`` from ``x`` ``(m, n, Q)`` (queries last) in ``block``'s eigenbasis, as
    :class:`Prepared` in ``dtype``: ``Q_vᵀ`` applied here (``Q·m·n²``), or left to the training side (``defer``).
    The result may share memory with ``x``."""
    w = block.unrotate_columns(x, right=not defer)
    return Prepared(w.to(dtype), block.q_v.to(x.device, dtype) if defer else None)


def to_columns(x: Tensor) -> Tensor:
    """``(Q, m, n)`` → ``(m, n, Q)`` contiguous, queries last (the layout of :class:`Prepared` weights): a 2-D
    transpose, which copies twice as fast as a 3-D permute."""
    q, m, n = x.shape
    return x.reshape(q, m * n).T.contiguous().reshape(m, n, q)


def views(grads: list[ExampleGrads]) -> dict[str, tuple[int, int]]:
    """The ``(m, n)`` view of each parameter in ``grads`` (its Outer view, ``(numel, 1)`` with Dense pieces)."""
    out = {}
    for g in grads:
        for name, pieces in g.pieces.items():
            out.setdefault(name, block_view(pieces))
    return out
