"""Exact Gram products of training gradients against a fixed set of query gradients, the query side prepared once per
round of queries.

``⟨g_i, g'_q⟩`` for every training example i of a batch and every query q, summed over the parameters both share
(tied parameters: every pair of pieces, as :meth:`~datacredit.capture.grads.ExampleGrads.gram`). What Grad-Dot's exact
``score`` streams the training set through, once per round.

Per parameter, one of two exact routes (:func:`plan`, fixed once on a query batch that stands in for a training
batch: the same model, typically the same lengths):

* **prepared**: the round's query gradients of that parameter are materialized once, ``W`` ``(Q_r, numel)`` (the sum
  of its pieces), and each training batch costs :func:`~.base.piece_products` (materialize its own gradients in
  chunks, one ``(N × mn)·(mn × Q_r)`` GEMM): ``N·T·m·n + N·Q_r·m·n`` per round. Each query batch is materialized as it
  arrives; its factored pieces of that parameter are not kept.
* **pairwise**: the factored query pieces are kept and each (training piece, query piece) pair takes
  :func:`~datacredit.capture.pieces.piece_gram` (ghost dot, or both sides materialized), ``Q/B`` query batches per
  training batch: every training batch materialized again per query batch and every query again per training batch,
  ``(N·Q/B)·T·m·n`` of repeated work (the ~0.38 CPU s per added query of benchmarks/PEERS_LM.md), but no extra pass.

**Rounds.** The materialized queries of the prepared parameters must fit ``budget`` bytes (by default
:func:`datacredit.memory.memory_budget`: a quarter of the device's memory). Where all of them do not, the queries are
split into rounds of whole query batches, each a pass over the training set (Grad-Dot writes each round's columns of
the score matrix), as Influence does. :func:`plan` picks the round count and the routes together, by estimated
multiply-adds per training batch: for ``R`` rounds each prepared parameter costs ``R·N·T·m·n + N·Q·m·n``, each
pairwise one its pair costs, and every round after the first a forward and backward pass,
``PASS_MULTIPLY_ADDS × Σ N·T·m·n`` over all captured parameters; parameters are prepared (most multiply-adds saved
per byte first) while a round's materialized queries fit the budget. So past the budget a wide layer over many
positions is prepared in rounds where that saves more than the passes cost, and stays pairwise where ghost dots
(long sequences, narrow layers: ``N·Q·T·T'·(m+n) < N·Q·m·n``) or the extra passes make pairwise cheaper.

Memory: per round, the query side is held once, each parameter either factored (``Q_r·T'·(m+n)`` numbers per Outer
piece, as captured) or materialized (``Q_r·m·n``, within ``budget`` together); temporaries of one training batch are
bounded by :data:`TRAIN_CHUNK_ELEMENTS` materialized training numbers (prepared route) and
:data:`~datacredit.capture.pieces.CHUNK_ELEMENTS` (pairwise route).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..capture.grads import ExampleGrads
from ..capture.pieces import Dense, Outer, Piece, ghost_cost, materialize_cost, piece_gram
from ..memory import memory_budget
from .base import VAL_FIRST_ADVANTAGE, gemm_cost, piece_products, val_first_cost

TRAIN_CHUNK_ELEMENTS = 2**24  # training gradients materialized at once on the prepared route (64 MiB in float32)
# What one more round costs besides materializing the training gradients again (a forward and backward pass with
# capture), in multiply-adds per N·T·m·n of all captured parameters: 2 by count (the forward and the input-gradient
# products); 6 measured (benchmarks/QUERIES.md, "Grad-Dot past the budget": on a TinyGPT, d = 128, T = 64, each extra
# round cost ~2.5 CPU s over 10 training batches where the pairwise products ran ~28 G multiply-adds per CPU s, about
# 7.0 G per batch: 1.07 G materializing, 5.8 × 1.03 G of N·T·m·n).
PASS_MULTIPLY_ADDS = 6

Columns = slice | np.ndarray | Tensor
PREPARED, PAIRWISE = "prepared", "pairwise"


@dataclass(frozen=True)
class Plan:
    """How exact Grad-Dot scores ``n_query`` queries: ``routes`` per parameter (``"prepared"`` | ``"pairwise"``),
    ``per_round`` query batches per pass over the training set (``n_rounds`` passes), ``cost`` the estimated
    multiply-adds per training batch (all rounds), ``bytes_per_query`` of the prepared parameters."""

    routes: dict[str, str]
    per_round: int
    n_rounds: int
    cost: int
    bytes_per_query: int


def plan(g: ExampleGrads, n_query: int, batch_size: int, budget: int | None = None) -> Plan:
    """The cheapest :class:`Plan` by estimated multiply-adds (module doc) for ``n_query`` queries in batches of
    ``batch_size`` (the last may hold fewer), with the query batch ``g`` standing in for a training batch; a round's
    materialized queries stay under ``budget`` bytes (None: :func:`~datacredit.memory.memory_budget` of ``g``'s
    device). Cost: a loop over the candidate round counts (at most ``2·√n_batches``) and the parameters; nothing is
    computed on the tensors."""
    if not g.pieces:
        raise ValueError("plan needs a batch with gradients of at least one parameter")
    if n_query < 1 or batch_size < 1:
        raise ValueError(f"plan needs at least one query and a positive batch size, got {n_query}, {batch_size}")
    first = next(iter(g.pieces.values()))[0]
    if budget is None:
        budget = memory_budget(_device(first))
    size = batch_size
    n_batches = -(-n_query // size)
    nbytes = {name: g.shapes[name].numel() * _dtype(ps[0]).itemsize for name, ps in g.pieces.items()}
    pairwise = {name: sum(_pair_cost(a, b) for a in ps for b in ps) * n_query // max(g.n, 1)
                for name, ps in g.pieces.items()}
    passes = PASS_MULTIPLY_ADDS * sum(_forward_cost(a) for ps in g.pieces.values() for a in ps)
    best: Plan | None = None
    for per_round in sorted({-(-n_batches // r) for r in range(1, n_batches + 1)}, reverse=True):
        n_rounds = -(-n_batches // per_round)
        in_round = min(n_query, per_round * size)
        last = n_query - (n_rounds - 1) * in_round
        prepared = {name: sum((n_rounds - 1) * _prepared_cost(a, in_round) + _prepared_cost(a, max(last, 1))
                              for a in ps) for name, ps in g.pieces.items()}
        routes = {name: PAIRWISE for name in g.pieces}
        cost = (n_rounds - 1) * passes + sum(pairwise.values())
        held = 0
        gains = sorted((name for name in g.pieces if prepared[name] <= pairwise[name]),
                       key=lambda name: (pairwise[name] - prepared[name]) / max(nbytes[name], 1), reverse=True)
        for name in gains:
            if (held + nbytes[name]) * in_round <= budget:
                routes[name] = PREPARED
                held += nbytes[name]
                cost += prepared[name] - pairwise[name]
        if best is None or cost < best.cost:
            best = Plan(routes, per_round, n_rounds, cost, held)
        if held == sum(nbytes[name] for name in gains):
            break  # everything worth preparing fits: more rounds only add passes
    return best


class QueryGram:
    """The query side of exact Grad-Dot for one round, prepared once: ``QueryGram(batches, n_query).gram(g) ->
    (g.n, n_query)``.

    batches: an iterable of ``(columns, ExampleGrads)``, each query batch's gradients and its columns in
        ``0..n_query-1``; consumed one batch at a time (a generator keeps only one batch's factored gradients alive
        besides what is kept here).
    routes: each parameter's route, ``"prepared"`` or ``"pairwise"`` (:func:`plan`, which sizes the round to the
        memory budget); a parameter it does not name stays pairwise. None: every parameter by multiply-adds alone,
        on its first batch (no budget: the caller sized the round).
    """

    def __init__(self, batches: Iterable[tuple[Columns, ExampleGrads]], n_query: int, *,
                 routes: dict[str, str] | None = None):
        self.n_query = n_query
        self.shapes: dict[str, torch.Size] = {}
        # name -> [(columns, pieces)]: the factored query side of the pairwise parameters, per query batch
        self.factored: dict[str, list[tuple[Columns, list[Piece]]]] = {}
        self.prepared: dict[str, Tensor] = {}  # name -> (Q, numel) materialized query gradients
        self.routes: dict[str, str] = dict(routes or {})  # name -> "prepared" | "pairwise"
        self._given = routes is not None
        self.used = 0  # bytes held in self.prepared
        for cols, g in batches:
            self._add(cols, g)
        if not self.shapes:
            raise ValueError("QueryGram needs at least one batch of query gradients")

    def _add(self, cols: Columns, g: ExampleGrads) -> None:
        for name, ps in g.pieces.items():
            if name not in self.shapes:
                self.shapes[name] = g.shapes[name]
                if name not in self.routes:
                    self.routes[name] = PAIRWISE if self._given else self._choose(ps, g.n)
            if self.routes[name] == PREPARED:
                rows = sum(b.materialize() for b in ps)  # tied pieces: their sum is the parameter's gradient
                if name not in self.prepared:
                    self.prepared[name] = torch.zeros(self.n_query, rows.shape[1], dtype=rows.dtype,
                                                      device=rows.device)
                    self.used += self.prepared[name].numel() * self.prepared[name].element_size()
                self.prepared[name][cols] = rows
            else:
                self.factored.setdefault(name, []).append((cols, list(ps)))

    def _choose(self, pieces: list[Piece], n_batch: int) -> str:
        """The route of one parameter by multiply-adds alone, this query batch standing in for a training batch."""
        pairwise = sum(_pair_cost(a, b) for a in pieces for b in pieces) * self.n_query // max(n_batch, 1)
        return PREPARED if sum(_prepared_cost(a, self.n_query) for a in pieces) <= pairwise else PAIRWISE

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


def _forward_cost(a: Piece) -> int:
    """Multiply-adds of one piece's layer in a forward pass: ``N·T·m·n`` (an indexed, one-hot ``u``: ``N·T·n``, a
    gather; Dense: ``N·numel``)."""
    if isinstance(a, Dense):
        return a.g.numel()
    return a.n_examples * a.length * a.n * (1 if a.indexed else a.m)
