"""Per-example gradients of one batch over all tracked parameters, kept factored.

:class:`ExampleGrads` is what the capture engine returns and what every method consumes. A parameter used by several
modules (tied weights) has several pieces; every product below sums over all pairs of pieces, so cross terms count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .pieces import Dense, Outer, Piece, piece_dot, piece_gram, piece_sq_norms


@dataclass
class ExampleGrads:
    """Factored per-example gradients of ``n`` examples.

    pieces: parameter name -> its pieces (one per module call that used it).
    shapes: parameter name -> parameter shape. Parameter order is the model's ``named_parameters`` order.
    """

    pieces: dict[str, list[Piece]]
    shapes: dict[str, torch.Size]
    n: int

    @property
    def names(self) -> list[str]:
        return list(self.pieces)

    @property
    def flat_dtype(self) -> torch.dtype:
        return _dtype(next(iter(self.pieces.values()))[0])

    @property
    def numel(self) -> int:
        return sum(self.shapes[name].numel() for name in self.pieces)

    def materialize(self) -> dict[str, Tensor]:
        """Per-example gradients ``{name: (n, *shape)}``. Memory ``n × numel``: for small models and tests."""
        return {
            name: sum(p.materialize() for p in ps).reshape(self.n, *self.shapes[name])
            for name, ps in self.pieces.items()
        }

    def flat(self) -> Tensor:
        """Per-example gradients flattened and concatenated in parameter order, ``(n, numel)``."""
        return torch.cat([sum(p.materialize() for p in ps) for ps in self.pieces.values()], dim=1)

    def total(self, weights: Tensor | None = None, absolute: bool = False) -> dict[str, Tensor]:
        """``Σ_i g_i`` per parameter ``{name: shape}`` (the batch gradient), without per-example tensors.

        weights: ``Σ_i r_i g_i`` for per-example weights ``r`` ``(n,)``. absolute: the sum of absolute values of the
        terms instead (a bound for rounding checks; see :func:`datacredit.capture.engine.tolerance`).
        """
        return {name: sum(p.total(weights, absolute) for p in ps).reshape(self.shapes[name])
                for name, ps in self.pieces.items()}

    def gram(self, other: ExampleGrads) -> Tensor:
        """``⟨g_i, g'_j⟩`` summed over shared parameters, ``(n, other.n)``; ghost dots where cheaper."""
        out = None
        for name, ps in self.pieces.items():
            for a in ps:
                for b in other.pieces.get(name, ()):
                    term = piece_gram(a, b)
                    out = term if out is None else out + term
        if out is None:
            raise ValueError("the two gradient sets share no parameter")
        return out

    def dot(self, weights: dict[str, Tensor]) -> Tensor:
        """Val-gradient-first dots ``⟨g_i, V_q⟩``; ``weights[name]`` is ``(Q, *shape)`` (or ``shape`` for Q = 1).

        Returns ``(n, Q)``. Parameters missing from ``weights`` contribute nothing.
        """
        out = None
        for name, ps in self.pieces.items():
            if name not in weights:
                continue
            w = weights[name]
            w = w.reshape(-1, self.shapes[name].numel()) if w.shape != self.shapes[name] else w.reshape(1, -1)
            for a in ps:
                term = piece_dot(a, w.to(_dtype(a)))
                out = term if out is None else out + term
        if out is None:
            raise ValueError("weights share no parameter with these gradients")
        return out

    def sq_norms(self) -> Tensor:
        """``‖g_i‖²`` per example, ``(n,)``, including the cross terms of tied parameters."""
        total = None
        for ps in self.pieces.values():
            for k, a in enumerate(ps):
                term = piece_sq_norms(a)
                for b in ps[k + 1 :]:  # tied parameter: 2⟨a_i, b_i⟩, one example at a time
                    cross = [piece_gram(a.select([i]), b.select([i]))[0, 0] for i in range(self.n)]
                    term = term + 2 * torch.stack(cross)
                total = term if total is None else total + term
        return total

    def select(self, index: Tensor | slice | list[int]) -> ExampleGrads:
        pieces = {name: [p.select(index) for p in ps] for name, ps in self.pieces.items()}
        n = next(iter(pieces.values()))[0].n_examples if pieces else 0
        return ExampleGrads(pieces, self.shapes, n)

    def scale(self, factor: float | dict[str, float | Tensor]) -> ExampleGrads:
        """Gradients multiplied elementwise by ``factor``: one number for all, or per parameter a number or a tensor
        of the parameter's shape (a diagonal preconditioner). A number scales one factor of each piece; a tensor
        materializes the parameter's pieces into one Dense piece (``n × numel`` memory)."""
        pieces: dict[str, list[Piece]] = {}
        for name, ps in self.pieces.items():
            f = factor.get(name, 1.0) if isinstance(factor, dict) else factor
            if isinstance(f, Tensor):
                pieces[name] = [Dense(sum(p.materialize() for p in ps) * f.reshape(1, -1))]
            else:
                pieces[name] = [Outer(p.u, p.v * f, p.m, p.n) if isinstance(p, Outer) else Dense(p.g * f) for p in ps]
        return ExampleGrads(pieces, self.shapes, self.n)


def _dtype(p: Piece) -> torch.dtype:
    return p.dtype
