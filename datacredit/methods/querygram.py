"""Exact Gram products of training gradients against a fixed set of query gradients, the query side prepared once.

``⟨g_i, g'_q⟩`` for every training example i of a batch and every query q, summed over the parameters both share
(tied parameters: every pair of pieces, as :meth:`~datacredit.capture.grads.ExampleGrads.gram`). What Grad-Dot's exact
``score`` streams the training set through.

Per parameter, one of two exact routes, chosen once by multiply-adds (on its first query batch, which stands in for a
training batch: the same model, typically the same lengths):

* **prepared**: the queries' gradients of that parameter are materialized once, ``W`` ``(Q, numel)`` (the sum of its
  pieces), and each training batch costs :func:`~.base.piece_products` (materialize its own gradients in chunks, one
  ``(N × mn)·(mn × Q)`` GEMM): ``N·T·m·n + N·Q·m·n``. Each query batch is materialized as it arrives; its factored
  pieces of that parameter are not kept.
* **pairwise**: the factored query pieces are kept and each (training piece, query piece) pair takes
  :func:`~datacredit.capture.pieces.piece_gram` (ghost dot, or both sides materialized): where ghost dots are
  cheaper (long sequences, narrow layers: ``N·Q·T·T'·(m+n) < N·Q·m·n``), or where the materialized queries would
  pass the memory budget.

Without the prepared route, a training batch against ``Q/B`` query batches materialized each query batch again per
training batch and each training batch again per query batch: ``(N·Q/B)·T·m·n`` of repeated work, the ~0.38 CPU s per
added query of benchmarks/PEERS_LM.md.

Memory: the query side is held once, each parameter either factored (``Q·T'·(m+n)`` numbers per Outer piece, as
captured) or materialized (``Q·m·n``); the materialized ones together stay under ``budget`` bytes
(by default :func:`datacredit.memory.memory_budget`: a quarter of the device's memory; 6 GiB here, 500 queries
of a 3.15 M-number model); temporaries of one training batch are bounded by
:data:`TRAIN_CHUNK_ELEMENTS` materialized training numbers (prepared route) and
:data:`~datacredit.capture.pieces.CHUNK_ELEMENTS` (pairwise route).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from ..capture.grads import ExampleGrads
from ..capture.pieces import Dense, Outer, Piece, ghost_cost, materialize_cost, piece_gram
from ..memory import memory_budget
from .base import VAL_FIRST_ADVANTAGE, gemm_cost, piece_products, val_first_cost

TRAIN_CHUNK_ELEMENTS = 2**24  # training gradients materialized at once on the prepared route (64 MiB in float32)

Columns = slice | np.ndarray | Tensor


class QueryGram:
    """The query side of exact Grad-Dot, prepared once: ``QueryGram(batches, n_query).gram(g) -> (g.n, n_query)``.

    batches: an iterable of ``(columns, ExampleGrads)``, each query batch's gradients and its columns in
        ``0..n_query-1``; consumed one batch at a time (a generator keeps only one batch's factored gradients alive
        besides what is kept here). Each parameter's route is fixed on its first batch, that batch standing in for a
        training batch in the cost model (the same model, typically the same lengths).
    budget: bytes of materialized query gradients allowed (parameters past it stay pairwise); None:
        :func:`~datacredit.memory.memory_budget` of the first batch's device.
    """

    def __init__(self, batches: Iterable[tuple[Columns, ExampleGrads]], n_query: int, *,
                 budget: int | None = None):
        self.n_query = n_query
        self.budget = budget
        self.shapes: dict[str, torch.Size] = {}
        # name -> [(columns, pieces)]: the factored query side of the pairwise parameters, per query batch
        self.factored: dict[str, list[tuple[Columns, list[Piece]]]] = {}
        self.prepared: dict[str, Tensor] = {}  # name -> (Q, numel) materialized query gradients
        self.routes: dict[str, str] = {}  # name -> "prepared" | "pairwise", fixed on the parameter's first batch
        self.used = 0  # bytes held in self.prepared
        for cols, g in batches:
            self._add(cols, g)
        if not self.routes:
            raise ValueError("QueryGram needs at least one batch of query gradients")

    def _add(self, cols: Columns, g: ExampleGrads) -> None:
        for name, ps in g.pieces.items():
            if name not in self.routes:
                self.shapes[name] = g.shapes[name]
                self.routes[name] = self._choose(name, ps, g.n)
            if self.routes[name] == "prepared":
                rows = sum(b.materialize() for b in ps)  # tied pieces: their sum is the parameter's gradient
                if name not in self.prepared:
                    self.prepared[name] = torch.zeros(self.n_query, rows.shape[1], dtype=rows.dtype,
                                                      device=rows.device)
                self.prepared[name][cols] = rows
            else:
                self.factored.setdefault(name, []).append((cols, list(ps)))

    def _choose(self, name: str, pieces: list[Piece], n_batch: int) -> str:
        """``name``'s route, with this query batch's pieces standing in for a training batch: prepared where its
        multiply-adds are fewer than the pairwise route's and the materialized queries fit the budget."""
        nbytes = self.n_query * self.shapes[name].numel() * _dtype(pieces[0]).itemsize
        pairwise = sum(_pair_cost(a, b) for a in pieces for b in pieces) * self.n_query // max(n_batch, 1)
        prepared = sum(_prepared_cost(a, self.n_query) for a in pieces)
        if self.budget is None:  # the device is known from the first batch
            self.budget = memory_budget(_device(pieces[0]))
        if prepared <= pairwise and self.used + nbytes <= self.budget:
            self.used += nbytes
            return "prepared"
        return "pairwise"

    def gram(self, g: ExampleGrads) -> Tensor:
        """``⟨g_i, g'_q⟩`` summed over shared parameters, ``(g.n, n_query)`` in the gradients' dtype."""
        out = None
        for name, ps in g.pieces.items():
            if name in self.prepared:
                w = self.prepared[name]
                for a in ps:
                    term = _products(a, w)
                    out = term if out is None else out + term
                continue
            if name not in self.factored:
                continue
            if out is None:
                out = torch.zeros(g.n, self.n_query, dtype=_dtype(ps[0]), device=_device(ps[0]))
            for cols, qps in self.factored[name]:
                block = None
                for a in ps:
                    for b in qps:
                        term = piece_gram(a, b)
                        block = term if block is None else block + term
                out[:, cols] += block
        if out is None:
            raise ValueError("the training and query gradients share no parameter")
        return out


def _products(a: Piece, w: Tensor) -> Tensor:
    """``⟨g_i, W_q⟩`` ``(N, Q)``: :func:`~.base.piece_products`, but an Outer piece on the GEMM route is materialized
    in chunks of up to :data:`TRAIN_CHUNK_ELEMENTS` (a whole training batch of a GPT-2 layer at once): each chunk reads
    all of ``W`` (``Q·m·n``), so more rows per chunk means fewer passes over it (a ``(21 × mn)·(mn × 200)`` GEMM ran at
    28, a ``(64 × mn)`` one at 50 GMAC/s on one core)."""
    if isinstance(a, Dense) or VAL_FIRST_ADVANTAGE * val_first_cost(a, w.shape[0]) < gemm_cost(a, w.shape[0]):
        return piece_products(a, w)
    step = max(1, TRAIN_CHUNK_ELEMENTS // max(a.m * a.n, 1))
    wt = w.to(a.v.dtype).T
    return torch.cat([a.select(slice(s, s + step)).materialize() @ wt for s in range(0, a.n_examples, step)])


def _pair_cost(a: Piece, b: Piece) -> int:
    """Multiply-adds of :func:`~datacredit.capture.pieces.piece_gram` on one pair (its own choice of route)."""
    if isinstance(a, Outer) and isinstance(b, Outer):
        return min(ghost_cost(a, b), materialize_cost(a, b))
    return a.n_examples * b.n_examples * _numel(a)  # a Dense side: one GEMM of the flat gradients (and materializing)


def _prepared_cost(a: Piece, n_query: int) -> int:
    """Multiply-adds of :func:`~.base.piece_products` of one training piece against ``n_query`` prepared queries."""
    if isinstance(a, Dense):
        return a.n_examples * a.g.shape[1] * n_query
    return min(gemm_cost(a, n_query), VAL_FIRST_ADVANTAGE * val_first_cost(a, n_query))


def _numel(a: Piece) -> int:
    return a.g.shape[1] if isinstance(a, Dense) else a.m * a.n


def _dtype(a: Piece) -> torch.dtype:
    return a.g.dtype if isinstance(a, Dense) else a.v.dtype


def _device(a: Piece) -> torch.device:
    return a.g.device if isinstance(a, Dense) else a.v.device
