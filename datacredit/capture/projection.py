"""Seeded random projections of per-example gradients: ``φ(g) = P g``, ``E[PᵀP] = I``, so ``E⟨φ(g), φ(h)⟩ = ⟨g, h⟩``.

Kinds:

* ``"gaussian"`` / ``"rademacher"`` — one dense ``(k, D)`` matrix over the concatenated gradient, entries ``N(0, 1/k)``
  or ``±1/√k``. Generated per parameter in column chunks from their own seeds, so any chunk can be rebuilt alone and
  results do not depend on batch size. Kept in memory, in the gradients' dtype, while ``k × D × itemsize`` fits
  ``cache_bytes`` (default 1 GiB; traker regenerates it every batch; we don't), else rebuilt chunk by chunk.
  Cost ``O(N·D·k)``; needs each parameter's gradient materialized in turn.
* ``"kronecker"`` — per parameter (LoGra-style): an ``(m, n)`` gradient ``Σ_t u_t v_tᵀ`` becomes
  ``Σ_t (P_u u_t)(P_v v_t)ᵀ`` of size ``k_u × k_v`` with ``k_u = min(m, r)``, ``k_v = min(n, r)``, ``r = ⌈√dim⌉``
  (a side no wider than ``r`` is kept exactly). Never materializes ``m × n``. Parameters with at most ``dim`` entries
  are kept exactly. Output dimension = sum over parameters.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

from .grads import ExampleGrads
from .pieces import Outer


def _dtype(grads: ExampleGrads) -> torch.dtype:
    return grads.flat_dtype


KINDS = ("gaussian", "rademacher", "kronecker")
COLUMN_CHUNK = 8192


def _device(grads: ExampleGrads) -> torch.device:
    piece = next(p for ps in grads.pieces.values() for p in ps)
    return piece.v.device if isinstance(piece, Outer) else piece.g.device


def _like(mat: Tensor, ref: Tensor) -> Tensor:
    """A projection matrix (drawn on the CPU, so every device draws the same numbers) on ``ref``'s device and dtype."""
    return mat.to(device=ref.device, dtype=ref.dtype)


def _generator(seed: int, *parts: object) -> torch.Generator:
    # A stable seed per (projection seed, parameter, chunk) that does not depend on Python's hash randomisation.
    key = zlib.crc32(repr((seed, *parts)).encode())
    return torch.Generator().manual_seed(key)


def _random(rows: int, cols: int, kind: str, gen: torch.Generator) -> Tensor:
    if kind == "rademacher":
        return (torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(rows)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64) / math.sqrt(rows)


class Projector:
    """Projects :class:`ExampleGrads` to ``(N, out_dim)``; same seed and shapes give the same projection.

    shapes: parameter name -> shape (the order fixes the layout of the output).
    """

    def __init__(self, shapes: dict[str, torch.Size], dim: int, kind: str = "gaussian", seed: int = 0,
                 cache_bytes: int = 2**30):
        if kind not in KINDS:
            raise ValueError(f"projection kind must be one of {KINDS}, got {kind!r}")
        if dim < 1:
            raise ValueError(f"projection dimension must be positive, got {dim}")
        self.shapes, self.dim, self.kind, self.seed = dict(shapes), dim, kind, seed
        self._cache: dict[tuple, Tensor] = {}
        self._numel = sum(s.numel() for s in self.shapes.values())
        self._cache_bytes = cache_bytes
        if kind == "kronecker":
            self.out_dims = {name: self._kron_dims(name, s) for name, s in self.shapes.items()}
            self.out_dim = sum(a * b for a, b in self.out_dims.values())
        else:
            self.out_dim = dim

    # -- kronecker ---------------------------------------------------------------------------------------------
    def _kron_dims(self, name: str, shape: torch.Size) -> tuple[int, int]:
        if shape.numel() <= self.dim:
            return shape.numel(), 1
        r = math.ceil(math.sqrt(self.dim))
        m = shape[0]
        n = shape.numel() // m
        return min(m, r), min(n, r)

    def _side(self, name: str, side: str, width: int, k: int) -> Tensor | None:
        """``(k, width)`` matrix for one side of a parameter, or None when the side is kept exactly."""
        if k >= width:
            return None
        key = (name, side, width, k)
        if key not in self._cache:
            self._cache[key] = _random(k, width, "gaussian", _generator(self.seed, name, side))
        return self._cache[key]

    def _project_kron(self, grads: ExampleGrads) -> Tensor:
        blocks = []
        for name, shape in self.shapes.items():
            k_u, k_v = self.out_dims[name]
            if name not in grads.pieces:
                blocks.append(torch.zeros(grads.n, k_u * k_v, dtype=_dtype(grads), device=_device(grads)))
                continue
            total = None
            for p in grads.pieces[name]:
                if k_v == 1 and k_u == shape.numel():  # small parameter: exact
                    out = p.materialize()
                elif isinstance(p, Outer):
                    out = self._kron_outer(name, p, k_u, k_v)
                else:  # a dense piece of a large parameter: project it as the (m, n) matrix it is
                    g = p.materialize().reshape(grads.n, shape[0], -1)
                    pu, pv = self._side(name, "u", g.shape[1], k_u), self._side(name, "v", g.shape[2], k_v)
                    g = g if pu is None else torch.einsum("km,nmj->nkj", _like(pu, g), g)
                    g = g if pv is None else torch.einsum("nkj,lj->nkl", g, _like(pv, g))
                    out = g.reshape(grads.n, -1)
                total = out if total is None else total + out
            blocks.append(total)
        return torch.cat(blocks, dim=1)

    def _kron_outer(self, name: str, p: Outer, k_u: int, k_v: int) -> Tensor:
        pu, pv = self._side(name, "u", p.m, k_u), self._side(name, "v", p.n, k_v)
        if p.indexed:
            u = p.dense_u() if pu is None else _like(pu, p.v).T[p.u]  # column idx of P_u = P_u e_idx
        else:
            u = p.u if pu is None else p.u @ _like(pu, p.v).T
        v = p.v if pv is None else p.v @ _like(pv, p.v).T
        return torch.bmm(u.transpose(1, 2), v).reshape(p.n_examples, -1)

    # -- dense ---------------------------------------------------------------------------------------------
    def _chunk(self, name: str, start: int, width: int, ref: Tensor) -> Tensor:
        """Columns ``[start, start + width)`` of ``name``'s block of the matrix, ``(dim, width)`` in ``ref``'s dtype
        and device. Drawn in float64 on the CPU (the same numbers for every dtype and device), then converted; the
        converted chunk is kept when the whole matrix fits ``cache_bytes`` in that dtype (``dim × D × itemsize``),
        else drawn again for every batch (k = 512 over 407 k parameters: drawing took 22 of 29 CPU s of a
        1,000-example TRAK fit while the matrix was not kept; benchmarks/SCALING.md)."""
        key = (name, start, ref.dtype, ref.device)
        if key in self._cache:
            return self._cache[key]
        mat = _like(_random(self.dim, width, self.kind, _generator(self.seed, name, start)), ref)
        if self._numel * self.dim * ref.element_size() <= self._cache_bytes:
            self._cache[key] = mat
        return mat

    def _project_dense(self, grads: ExampleGrads) -> Tensor:
        out = None
        for name, shape in self.shapes.items():
            if name not in grads.pieces:
                continue
            g = sum(p.materialize() for p in grads.pieces[name])  # (N, numel)
            for start in range(0, shape.numel(), COLUMN_CHUNK):
                width = min(COLUMN_CHUNK, shape.numel() - start)
                term = g[:, start : start + width] @ self._chunk(name, start, width, g).T
                out = term if out is None else out + term
        if out is None:
            raise ValueError("no projected parameter among these gradients")
        return out

    def project(self, grads: ExampleGrads) -> Tensor:
        """``(N, out_dim)`` projected per-example gradients, in the gradients' dtype."""
        return self._project_kron(grads) if self.kind == "kronecker" else self._project_dense(grads)
