"""Per-layer Kronecker (LoGra-style) random projection of factored per-example gradients.

A parameter viewed as an ``(m, n)`` matrix (row-major; ``m = shape[0]``) has per-example gradient
``G_i = Σ_t u_{i,t} v_{i,t}ᵀ`` (see :mod:`datacredit.capture.pieces`). For ``nn.Linear``, ``u`` is the output
gradient ``B_i`` (``T × d_out``) and ``v`` the input ``A_i`` (``T × d_in``), so ``G_i = B_iᵀ A_i``. With two
fixed seeded Gaussian matrices ``P_u`` (``m × k_u``) and ``P_v`` (``n × k_v``), entries ``N(0, 1/k)``, the projected
gradient is

    φ(G_i) = P_uᵀ G_i P_v = (u_i P_u)ᵀ (v_i P_v)            # (k_u × k_v); for Linear (B_i P_out)ᵀ (A_i P_in)

computed from the two projected factors (``T × k_u`` and ``T × k_v``): the ``m × n`` gradient is never formed. In
flattened (row-major) form ``vec φ(G) = (P_u ⊗ P_v)ᵀ vec G``, a Kronecker-structured JL map with
``E[(P_u ⊗ P_v)(P_u ⊗ P_v)ᵀ] = I``, so ``E⟨φ(G), φ(H)⟩ = ⟨G, H⟩`` (its variance is larger than a dense Gaussian map
of the same output size; that is the price of never forming ``G``).

Rules:
* a side no wider than its ``k`` is kept exactly (identity, no projection): biases (``n = 1``) become ``k_u × 1``,
  a layer with ``d_in ≤ k`` keeps its input side;
* parameters with at most ``exact_numel`` entries are kept exactly (LayerNorm gains, small biases, when asked);
* tied parameters (several pieces) are summed after projection, which is exact by linearity;
* :class:`~datacredit.capture.pieces.Dense` pieces are projected as the ``(m, n)`` matrix they are.

The matrices are drawn once per (parameter, side) on the CPU from a seed derived from ``(seed, name, side, width,
k)`` (so CPU and GPU runs draw the same numbers), then cast to the gradients' device and dtype once and cached.

Cost per piece: ``N·T·(m·k_u + n·k_v)`` to project the factors plus ``N·T·k_u·k_v`` for the outer products;
memory per example ``k_u·k_v`` numbers. Output layout: parameters in the given order, each block row-major
``(k_u, k_v)``; :meth:`KronProjection.layout` lists the blocks.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

from .grads import ExampleGrads
from .pieces import Dense, Outer, Piece

__all__ = ["Block", "KronProjection"]


@dataclass(frozen=True)
class Block:
    """One parameter's slice of the feature vector: columns ``[offset, offset + rows·cols)``, row-major
    ``(rows, cols)``; ``rows``/``cols`` equal ``m``/``n`` on a side kept exactly. ``exact`` = the whole parameter is
    kept unprojected (then ``rows·cols = numel``)."""

    name: str
    shape: tuple[int, ...]
    m: int
    n: int
    rows: int
    cols: int
    offset: int
    exact: bool

    @property
    def size(self) -> int:
        return self.rows * self.cols

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.size)


def _matrix_view(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    shape = tuple(shape)
    m = shape[0] if shape else 1
    return m, math.prod(shape) // max(m, 1)


class KronProjection:
    """Seeded Kronecker projection ``φ(G) = P_uᵀ G P_v`` per parameter; see the module docstring.

    Args:
        k: projected width of each side (``k_u = min(m, k_rows)``, ``k_v = min(n, k_cols)``).
        k_rows, k_cols: override ``k`` for the row side (``d_out`` of ``nn.Linear``, ``d_in`` of transformers'
            ``Conv1D``) or the column side.
        seed: the projection seed; the same seed, names and shapes give the same matrices everywhere.
        exact_numel: parameters with at most this many entries are kept exactly (default 0: project all).
    """

    kind = "kronecker"

    def __init__(self, k: int = 16, *, k_rows: int | None = None, k_cols: int | None = None, seed: int = 0,
                 exact_numel: int = 0):
        for what, value in (("k", k), ("k_rows", k_rows), ("k_cols", k_cols)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{what} must be a positive int, got {value!r}")
        if exact_numel < 0:
            raise ValueError(f"exact_numel must be >= 0, got {exact_numel}")
        self.k, self.seed, self.exact_numel = k, int(seed), int(exact_numel)
        self.k_rows = k if k_rows is None else k_rows
        self.k_cols = k if k_cols is None else k_cols
        self._cpu: dict[tuple, Tensor] = {}
        self._cast: dict[tuple, Tensor] = {}

    def describe(self) -> dict:
        """JSON description: everything that determines the projection besides the parameter shapes."""
        return {"kind": self.kind, "k_rows": self.k_rows, "k_cols": self.k_cols, "seed": self.seed,
                "exact_numel": self.exact_numel, "distribution": "gaussian N(0, 1/k) per side"}

    # -- layout ------------------------------------------------------------------------------------------------
    def layout(self, shapes: dict[str, torch.Size]) -> list[Block]:
        """Feature blocks of the parameters ``shapes`` (name -> shape), in that order."""
        blocks, offset = [], 0
        for name, shape in shapes.items():
            m, n = _matrix_view(shape)
            if m * n <= self.exact_numel:
                rows, cols, exact = m * n, 1, True
            else:
                rows, cols, exact = min(m, self.k_rows), min(n, self.k_cols), False
            blocks.append(Block(name, tuple(int(s) for s in shape), m, n, rows, cols, offset, exact))
            offset += rows * cols
        return blocks

    def out_dim(self, shapes: dict[str, torch.Size]) -> int:
        return sum(b.size for b in self.layout(shapes))

    # -- matrices ----------------------------------------------------------------------------------------------
    def side(self, name: str, side: str, width: int, k: int, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float64) -> Tensor | None:
        """The ``(width, k)`` matrix of one side (``"u"`` rows, ``"v"`` columns) of parameter ``name``, or None when
        ``k >= width`` (the side is kept exactly). Drawn once on the CPU in float64, cached per device and dtype."""
        if k >= width:
            return None
        key = (name, side, width, k)
        if key not in self._cpu:
            # crc32 of the repr: a stable seed that does not depend on Python's hash randomisation
            gen = torch.Generator().manual_seed(zlib.crc32(repr((self.seed, *key)).encode()))
            self._cpu[key] = torch.randn(width, k, generator=gen, dtype=torch.float64) / math.sqrt(k)
        cast_key = (*key, str(device), dtype)
        if cast_key not in self._cast:
            self._cast[cast_key] = self._cpu[key].to(device=device, dtype=dtype)
        return self._cast[cast_key]

    def matrix(self, block: Block) -> Tensor:
        """The explicit ``(m·n, rows·cols)`` float64 map of one block: ``features = vec(G) @ matrix`` (row-major vec).

        ``P_u ⊗ P_v`` (identity on a side kept exactly). ``m·n × k_u·k_v`` numbers: for tests and small layers only.
        """
        if block.exact:
            return torch.eye(block.m * block.n, dtype=torch.float64)
        pu = self.side(block.name, "u", block.m, block.rows)
        pv = self.side(block.name, "v", block.n, block.cols)
        pu = torch.eye(block.m, dtype=torch.float64) if pu is None else pu
        pv = torch.eye(block.n, dtype=torch.float64) if pv is None else pv
        return torch.kron(pu, pv)

    # -- projection --------------------------------------------------------------------------------------------
    def project(self, grads: ExampleGrads, shapes: dict[str, torch.Size] | None = None) -> Tensor:
        """``(N, out_dim)`` projected per-example gradients in the gradients' dtype and device.

        shapes: the parameters to lay out (default ``grads.shapes``); a parameter absent from ``grads`` (it did not
        take part in this batch's loss) gives a zero block.
        """
        shapes = grads.shapes if shapes is None else shapes
        dtype = grads.flat_dtype
        device = _device(next(iter(grads.pieces.values()))[0])
        out = torch.zeros(grads.n, self.out_dim(shapes), dtype=dtype, device=device)
        for block in self.layout(shapes):
            for piece in grads.pieces.get(block.name, ()):
                out[:, block.columns] += self._project_piece(block, piece)
        return out

    def _project_piece(self, block: Block, piece: Piece) -> Tensor:
        if block.exact:
            return piece.materialize()
        if isinstance(piece, Dense):
            g = piece.g.reshape(piece.n_examples, block.m, block.n)
            pu = self.side(block.name, "u", block.m, block.rows, g.device, g.dtype)
            pv = self.side(block.name, "v", block.n, block.cols, g.device, g.dtype)
            g = g if pu is None else torch.einsum("mk,imn->ikn", pu, g)
            g = g if pv is None else g @ pv
            return g.reshape(piece.n_examples, -1)
        if (piece.m, piece.n) != (block.m, block.n):
            raise ValueError(f"parameter {block.name!r}: piece is {piece.m}×{piece.n}, its (m, n) view is "
                             f"{block.m}×{block.n}")
        v = piece.v
        pu = self.side(block.name, "u", block.m, block.rows, v.device, v.dtype)
        pv = self.side(block.name, "v", block.n, block.cols, v.device, v.dtype)
        if piece.indexed:  # u_t = e_{idx_t}: u_t P_u is row idx_t of P_u (an index, not a vocab-wide product)
            u = piece.dense_u() if pu is None else pu[piece.u]
        else:
            u = piece.u if pu is None else piece.u @ pu
        v = v if pv is None else v @ pv
        return torch.bmm(u.transpose(1, 2), v).reshape(piece.n_examples, -1)  # Σ_t (u_t P_u)ᵀ (v_t P_v)


def _device(piece: Piece) -> torch.device:
    return piece.v.device if isinstance(piece, Outer) else piece.g.device
