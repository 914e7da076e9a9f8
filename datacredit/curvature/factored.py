"""Curvatures fitted from per-example gradients, one :class:`~.eigen.EigenBlock` per parameter.

* ``"identity"`` — ``H = I``: influence becomes Grad-Dot (scaled by ``1/(1 + δ)``). No pass.
* ``"diagonal"`` — the diagonal of the empirical Fisher, ``(1/N) Σ_i g_i ⊙ g_i``. One pass.
* ``"kfac"`` — per parameter with Outer pieces ``G_i = Σ_t u_t v_tᵀ`` (the ``(m, n)`` view of capture): ``H ≈ U ⊗ V``
  with ``U = (1/N) Σ_{i,t} u uᵀ`` and ``V = Σ_{i,t} v vᵀ / P`` (P = number of positions summed). With one position
  per example (MLPs) this is the classic ``E[u uᵀ] ⊗ E[v vᵀ]`` (Martens & Grosse 2015): for ``nn.Linear`` the output-
  gradient covariance ``S`` times the input covariance ``A``. With T positions per example (sequences, conv patches)
  it is KFAC-expand (Eschenhagen et al. 2023; Grosse & Martens 2016 for convolutions):
  ``(1/N) Σ_i Σ_t u uᵀ ⊗ v vᵀ ≈ U ⊗ V`` — the normalisation puts ``1/N`` on one factor and ``1/P`` on the other,
  which is the same product whichever side gets which. Biases are separate blocks (not folded into the weight): a
  bias piece has ``v = 1``, so its block is ``U`` of the same output gradients, and weight–bias cross terms are
  dropped. Embedding pieces (indexed ``u``) get a diagonal ``U`` (token counts / N). Parameters with Dense pieces
  (LayerNorm) fall back to the diagonal. Tied weights pool the positions of all their pieces into one ``U ⊗ V``.
  One pass.
* ``"ekfac"`` — KFAC's eigenbases ``Q_u, Q_v``, then a second pass refits the eigenvalues as
  ``Λ = (1/N) Σ_i (Q_uᵀ G_i Q_v)²`` (George et al. 2018, eq. 13; as in Grosse et al. 2023, eq. 20). Two passes.

Sums are kept in at least float32 (float64 for float64 gradients); eigendecompositions run in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..capture import ExampleGrads
from ..capture.pieces import Outer, Piece
from .base import Curvature, Damping, all_reduce_sum, as_damping, register_curvature
from .eigen import EigenBlock, FactorSums, block_view, cast, eigen, rotate_piece, sum_of_squares


def _acc_dtype(pieces: list[Piece]) -> torch.dtype:
    p = pieces[0]
    dtype = p.v.dtype if isinstance(p, Outer) else p.g.dtype
    return torch.promote_types(dtype, torch.float32)


def _device(pieces: list[Piece]) -> torch.device:
    p = pieces[0]
    return p.v.device if isinstance(p, Outer) else p.g.device


class _Sums:
    """One pass's sums: squared (rotated) gradients per parameter, KFAC factors per parameter, examples seen."""

    def __init__(self) -> None:
        self.squares: dict[str, Tensor] = {}
        self.factors: dict[str, FactorSums] = {}
        self.count = 0

    def add_squares(self, name: str, pieces: list[Piece], m: int, n: int) -> None:
        part = sum_of_squares(pieces, m, n)
        self.squares[name] = part if name not in self.squares else self.squares[name] + part

    def add_factors(self, name: str, pieces: list[Outer]) -> None:
        if name not in self.factors:
            p = pieces[0]
            self.factors[name] = FactorSums(p.m, p.n, p.v.dtype, p.v.device)
        for p in pieces:
            self.factors[name].add(p)

    def reduce(self) -> int:
        """All-reduce across ranks (a no-op in one process); returns the total number of examples."""
        tensors = [self.squares[k] for k in sorted(self.squares)]
        tensors += [t for k in sorted(self.factors) for t in self.factors[k].tensors()]
        if not tensors:
            raise ValueError("the curvature saw no data: the training set gave no gradients")
        count = torch.tensor(float(self.count), dtype=torch.float64, device=tensors[0].device)
        all_reduce_sum([*tensors, count])
        return int(count.item())


class _BlockCurvature(Curvature):
    """A curvature made of one :class:`EigenBlock` per parameter (shared by diagonal, KFAC and EK-FAC)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks: dict[str, EigenBlock] = {}
        self.n_examples = 0
        self._sums = _Sums()

    def apply_inverse(self, weights: dict[str, Tensor], damping: float | Damping = 0.0) -> dict[str, Tensor]:
        damping = as_damping(damping)
        return self._per_block(weights, lambda block, w: block.apply_inverse(w, damping))

    def apply_function(self, weights: dict[str, Tensor], fn) -> dict[str, Tensor]:
        return self._per_block(weights, lambda block, w: block.apply_function(w, fn))

    def apply_functions(self, weights: dict[str, Tensor], fns: list) -> list[dict[str, Tensor]]:
        per_name = self._per_block(weights, lambda block, w: block.apply_functions(w, fns), stack=True)
        return [{name: outs[k] for name, outs in per_name.items()} for k in range(len(fns))]

    def _per_block(self, weights: dict[str, Tensor], op, stack: bool = False) -> dict[str, Tensor]:
        self._require_fit()
        out = {}
        for name, w in weights.items():
            block = self.blocks.get(name)
            if block is None:
                raise KeyError(f"curvature {self.name!r} has no block for parameter {name!r}; "
                               f"fitted: {sorted(self.blocks)}")
            if w.numel() % (block.m * block.n):
                raise ValueError(f"weights for {name!r} of shape {tuple(w.shape)} are not (Q, *shape) for a "
                                 f"parameter of {block.m * block.n} entries")
            result = op(block, w.reshape(-1, block.m, block.n))
            out[name] = [r.reshape(w.shape) for r in result] if stack else result.reshape(w.shape)
        return out

    def nbytes(self) -> int:
        return sum(block.nbytes() for block in self.blocks.values())

    def to(self, device: torch.device | str) -> _BlockCurvature:
        self.blocks = {name: block.to(device) for name, block in self.blocks.items()}
        return self

    def matrix(self, name: str) -> Tensor:
        """The dense curvature block of one parameter, ``(numel, numel)`` in row-major order (small blocks, tests)."""
        self._require_fit()
        return self.blocks[name].matrix()

    def state_dict(self) -> dict[str, Tensor]:
        out = {"n_examples": torch.tensor(self.n_examples)}
        for name, block in self.blocks.items():
            out.update(block.state(name))
        return out

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        names = {key.rsplit(":", 1)[0] for key in tensors if ":" in key}
        self.blocks = {name: EigenBlock.from_state(name, tensors) for name in names}
        self.n_examples = int(tensors["n_examples"])

    def _finish(self) -> tuple[_Sums, int]:
        sums, self._sums = self._sums, _Sums()
        return sums, sums.reduce()


@register_curvature
class DiagonalCurvature(_BlockCurvature):
    """Diagonal empirical Fisher ``(1/N) Σ_i g_i ⊙ g_i`` per parameter. One pass."""

    name = "diagonal"

    def update(self, grads: ExampleGrads, pass_index: int) -> None:
        for name, pieces in grads.pieces.items():
            m, n = block_view(pieces)
            self._sums.add_squares(name, [cast(p, _acc_dtype(pieces)) for p in pieces], m, n)
        self._sums.count += grads.n

    def end_pass(self, pass_index: int) -> None:
        sums, n = self._finish()
        self.n_examples = n
        self.blocks = {name: EigenBlock(s / n) for name, s in sums.squares.items()}


@register_curvature
class KFAC(_BlockCurvature):
    """Kronecker-factored empirical Fisher ``U ⊗ V`` per parameter (see the module doc for the factors). One pass."""

    name = "kfac"

    def update(self, grads: ExampleGrads, pass_index: int) -> None:
        for name, pieces in grads.pieces.items():
            pieces = [cast(p, _acc_dtype(pieces)) for p in pieces]
            if all(isinstance(p, Outer) for p in pieces):
                self._sums.add_factors(name, pieces)
            else:  # Dense pieces (LayerNorm): diagonal fallback
                self._sums.add_squares(name, pieces, *block_view(pieces))
        self._sums.count += grads.n

    def end_pass(self, pass_index: int) -> None:
        sums, n = self._finish()
        self.n_examples = n
        self.blocks = {name: EigenBlock(s / n) for name, s in sums.squares.items()}
        for name, f in sums.factors.items():
            lam_u, q_u = eigen(f.uu / n)
            lam_v, q_v = eigen(f.vv / f.positions)
            self.blocks[name] = EigenBlock(torch.outer(lam_u, lam_v), q_u, q_v)


@register_curvature
class EKFAC(KFAC):
    """Eigenvalue-corrected KFAC: KFAC's eigenbases (pass 1), eigenvalues refitted in them (pass 2)."""

    name = "ekfac"
    n_passes = 2

    def update(self, grads: ExampleGrads, pass_index: int) -> None:
        if pass_index == 0:
            return super().update(grads, pass_index)
        for name, pieces in grads.pieces.items():
            block = self.blocks[name]
            dtype, device = block.eigenvalues.dtype, _device(pieces)
            pieces = [cast(p, dtype) for p in pieces]
            if block.q_u is not None or block.q_v is not None:
                q_u, q_v = (None if q is None else q.to(device) for q in (block.q_u, block.q_v))
                pieces = [rotate_piece(p, q_u, q_v) for p in pieces]
            self._sums.add_squares(name, pieces, block.m, block.n)
        self._sums.count += grads.n

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            return super().end_pass(pass_index)
        sums, n = self._finish()
        for name, s in sums.squares.items():
            self.blocks[name].eigenvalues = s / n


@register_curvature
class IdentityCurvature(Curvature):
    """``H = I``; with damping δ the inverse is ``1/(1 + δ)`` (the mean eigenvalue is 1). No pass."""

    name = "identity"
    n_passes = 0

    def scale(self, damping: float | Damping) -> float:
        """``1 / (1 + δ)``: the whole inverse, one number (the mean eigenvalue of the identity is 1)."""
        return 1.0 / (1.0 + as_damping(damping).value(1.0))

    def apply_inverse(self, weights: dict[str, Tensor], damping: float | Damping = 0.0) -> dict[str, Tensor]:
        scale = self.scale(damping)
        return {name: w * scale for name, w in weights.items()}

    def apply_function(self, weights: dict[str, Tensor], fn) -> dict[str, Tensor]:
        value = fn(torch.ones((), dtype=torch.float64))
        return {name: w * value.to(w.dtype) for name, w in weights.items()}

    def self_products(self, grads: ExampleGrads, damping: float | Damping = 0.0) -> Tensor:
        return grads.sq_norms() * self.scale(damping)

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        pass
