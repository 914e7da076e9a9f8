"""The exact twins for small models: the true Hessian of the mean training loss, explicit or through CG.

Both see the tracked parameters as one flat vector ``θ`` of ``D`` entries (model parameter order, row-major) and the
training objective ``L(θ) = (1/N) Σ_i ℓ_i(θ)`` (no regularizer: an L2 penalty ``(λ/2)‖θ‖²`` is absolute damping λ).

* ``"explicit"`` — ``H = ∇²L`` as a ``(D, D)`` matrix, built from batched Hessian-vector products (double backward
  with ``is_grads_batched``, ``chunk`` rows at a time), then eigendecomposed once in float64 so any damping is cheap:
  one :class:`~.eigen.EigenBlock` of shape ``(D, 1)``. Memory ``D²``; time ``D / chunk`` batched double backwards per
  training batch. ``H`` may be indefinite away from a minimum: applying the inverse then raises unless the damping
  makes every eigenvalue positive.
* ``"cg"`` — no matrix: solves ``(H + δI) x = w`` for all queries at once by conjugate gradients (one column per
  query, each with its own step sizes), every iteration one pass of Hessian-vector products over the training data.
  Needs ``H + δI`` positive definite. Relative damping uses the mean eigenvalue ``tr(H)/D`` estimated by
  Hutchinson's estimator, ``(1/D) · mean_z zᵀHz`` over ``probes`` Rademacher vectors drawn with a fixed seed (one extra
  pass of batched Hessian-vector products, made once per fit; an exact trace would need ``D`` products). So the
  default ``Damping(relative=0.1)`` of :class:`~datacredit.methods.Influence` runs for CG too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import resolve_modules
from ..task import batch_size
from .base import Curvature, Damping, all_reduce_sum, as_damping, register_curvature
from .eigen import EigenBlock

logger = logging.getLogger(__name__)

Loss = Callable[[nn.Module, Any], Tensor]


def tracked_parameters(model: nn.Module, modules: list[str] | None = None) -> dict[str, nn.Parameter]:
    """The trainable parameters of the tracked modules (as capture names them), in ``named_parameters`` order."""
    wanted = {id(p) for module, _ in resolve_modules(model, modules).values()
              for p in module.parameters(recurse=False) if p.requires_grad}
    return {name: p for name, p in model.named_parameters() if id(p) in wanted}


def flatten(weights: dict[str, Tensor], layout: list[tuple[str, list[int]]]) -> Tensor:
    """``{name: (Q, *shape)}`` -> ``(Q, D)`` in ``layout`` order; a missing parameter is zeros."""
    q = next(iter(weights.values())).shape[0]
    like = next(iter(weights.values()))
    cols = []
    for name, shape in layout:
        numel = int(torch.Size(shape).numel())
        w = weights.get(name)
        cols.append(like.new_zeros(q, numel) if w is None else w.reshape(q, numel))
    return torch.cat(cols, dim=1)


def unflatten(flat: Tensor, layout: list[tuple[str, list[int]]]) -> dict[str, Tensor]:
    """``(Q, D)`` -> ``{name: (Q, *shape)}``."""
    out, start = {}, 0
    for name, shape in layout:
        numel = int(torch.Size(shape).numel())
        out[name] = flat[:, start : start + numel].reshape(flat.shape[0], *shape)
        start += numel
    return out


class _HessianCurvature(Curvature):
    """Shared by the explicit and CG twins: the bound model, its flat layout, gradients and batched HVPs."""

    source = "data"

    def __init__(self, layout: list[tuple[str, list[int]]] | None = None) -> None:
        super().__init__()
        self.layout = [(name, list(shape)) for name, shape in layout] if layout else None
        self.model: nn.Module | None = None
        self.loss: Loss | None = None
        self.params: list[nn.Parameter] = []

    def bind(self, model: nn.Module, loss: Loss, names: list[str]) -> _HessianCurvature:
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"{type(model).__name__} has no parameters {missing}")
        self.model, self.loss = model, loss
        self.params = [params[n] for n in names]
        self.layout = [(n, list(params[n].shape)) for n in names]
        return self

    @property
    def dim(self) -> int:
        return sum(int(torch.Size(s).numel()) for _, s in self.layout)

    def _gradient(self, batch: Any) -> tuple[Tensor, int]:
        """``∇ Σ_{i ∈ batch} ℓ_i`` flat ``(D,)`` with its graph kept (for HVPs), and the batch size."""
        if self.model is None:
            raise RuntimeError(f"curvature {self.name!r} needs the model: call bind(model, loss, names) first")
        losses = self.loss(self.model, batch)
        grads = torch.autograd.grad(losses.sum(), self.params, create_graph=True, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, self.params)])
        return flat, batch_size(batch)

    def _hvp(self, flat_grad: Tensor, vectors: Tensor) -> Tensor:
        """``H_batch v`` for every row of ``vectors`` ``(c, D)``, by one batched double backward; ``(c, D)``."""
        if not flat_grad.requires_grad:  # the loss is linear in θ: zero Hessian
            return torch.zeros_like(vectors)
        rows = torch.autograd.grad(flat_grad, self.params, grad_outputs=vectors.to(flat_grad.dtype),
                                   retain_graph=True, is_grads_batched=True, allow_unused=True)
        return torch.cat([(vectors.new_zeros(len(vectors), p.numel()) if r is None else r.reshape(len(vectors), -1))
                          for r, p in zip(rows, self.params)], dim=1)

    def config(self) -> dict[str, Any]:
        return {"layout": self.layout}


@register_curvature
class ExplicitHessian(_HessianCurvature):
    """``H = ∇² (1/N) Σ_i ℓ_i`` as a dense ``(D, D)`` matrix, eigendecomposed once. One pass."""

    name = "explicit"

    def __init__(self, layout: list[tuple[str, list[int]]] | None = None, chunk: int = 256) -> None:
        super().__init__(layout)
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        self.chunk = chunk
        self.block: EigenBlock | None = None
        self._sum: Tensor | None = None
        self._count = 0

    def update(self, batch: Any, pass_index: int) -> None:
        flat, n = self._gradient(batch)
        dim = flat.shape[0]
        if self._sum is None:
            self._sum = flat.new_zeros(dim, dim, dtype=torch.promote_types(flat.dtype, torch.float32))
        eye = torch.eye(dim, dtype=flat.dtype, device=flat.device)
        for start in range(0, dim, self.chunk):
            self._sum[start : start + self.chunk] += self._hvp(flat, eye[start : start + self.chunk]).detach()
        self._count += n

    def end_pass(self, pass_index: int) -> None:
        if self._sum is None:
            raise ValueError("the curvature saw no data: the training set is empty")
        count = torch.tensor(float(self._count), dtype=torch.float64, device=self._sum.device)
        all_reduce_sum([self._sum, count])
        h = (self._sum / count.item()).double()
        lam, q = torch.linalg.eigh((h + h.T) / 2)
        self.block = EigenBlock(lam.to(self._sum.dtype)[:, None], q.to(self._sum.dtype))
        self.n_examples = int(count.item())
        self._sum, self._count = None, 0

    def nbytes(self) -> int:
        return 0 if self.block is None else self.block.nbytes()

    def to(self, device: torch.device | str) -> ExplicitHessian:
        if self.block is not None:
            self.block = self.block.to(device)
        return self

    def matrix(self) -> Tensor:
        """``H`` as ``(D, D)``."""
        self._require_fit()
        return self.block.matrix()

    def apply_inverse(self, weights: dict[str, Tensor], damping: float | Damping = 0.0) -> dict[str, Tensor]:
        self._require_fit()
        flat = flatten(weights, self.layout)
        return unflatten(self.block.apply_inverse(flat[:, :, None], as_damping(damping))[:, :, 0], self.layout)

    def apply_function(self, weights: dict[str, Tensor], fn) -> dict[str, Tensor]:
        self._require_fit()
        flat = flatten(weights, self.layout)
        return unflatten(self.block.apply_function(flat[:, :, None], fn)[:, :, 0], self.layout)

    def config(self) -> dict[str, Any]:
        return {"layout": self.layout, "chunk": self.chunk}

    def state_dict(self) -> dict[str, Tensor]:
        return {**self.block.state("hessian"), "n_examples": torch.tensor(self.n_examples)}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        self.block = EigenBlock.from_state("hessian", tensors)
        self.n_examples = int(tensors["n_examples"])


@register_curvature
class HessianCG(_HessianCurvature):
    """``(H + δI)⁻¹ w`` by batched conjugate gradients on Hessian-vector products; nothing is fitted or stored.

    max_iter: iterations (each one pass over the training data). tol: stop when every column's residual norm is
    at most ``tol`` times its right-hand side's.
    """

    name = "cg"
    n_passes = 0

    def __init__(self, layout: list[tuple[str, list[int]]] | None = None, max_iter: int = 500,
                 tol: float = 1e-10, probes: int = 64, seed: int = 0) -> None:
        super().__init__(layout)
        if max_iter < 1 or not tol > 0 or probes < 1:
            raise ValueError(f"cg needs max_iter >= 1, tol > 0 and probes >= 1, got {max_iter}, {tol}, {probes}")
        self.max_iter, self.tol, self.probes, self.seed = max_iter, tol, probes, seed
        self.batches: Callable[[], Iterable] | Iterable | None = None
        self.iterations = 0
        self._mean_eigenvalue: float | None = None

    def fit(self, batches: Callable[[], Iterable] | Iterable, *, progress: bool = False,
            on_pass: Callable[[Curvature], None] | None = None) -> HessianCG:
        """Remember the training batches (a callable giving a fresh iterator, or a re-iterable)."""
        if not callable(batches) and iter(batches) is batches:
            raise ValueError("cg passes over the data once per iteration: give a callable or a list of batches")
        self.batches = batches
        self._mean_eigenvalue = None  # new data: estimate again when relative damping asks for it
        return self

    def mean_eigenvalue(self) -> float:
        """Hutchinson's estimate of ``tr(H)/D``: ``(1/D) · mean_z zᵀHz`` over ``probes`` Rademacher vectors ``z``
        (seeded), by one pass of batched Hessian-vector products; computed once per :meth:`fit`."""
        if self._mean_eigenvalue is None:
            gen = torch.Generator().manual_seed(self.seed)
            z = torch.randint(0, 2, (self.probes, self.dim), generator=gen).to(self.params[0].dtype) * 2 - 1
            z = z.to(self.params[0].device)
            self._mean_eigenvalue = float((z * self.hvp(z)).sum(1).mean()) / self.dim
        return self._mean_eigenvalue

    def hvp(self, vectors: Tensor) -> Tensor:
        """``H v`` of the mean training loss for every row of ``vectors`` ``(Q, D)``: one pass over the data."""
        if self.batches is None:
            raise RuntimeError("call fit(batches) before using cg")
        total, count = torch.zeros_like(vectors), 0
        for batch in self.batches() if callable(self.batches) else self.batches:
            flat, n = self._gradient(batch)
            total += self._hvp(flat, vectors).detach()
            count += n
        if count == 0:
            raise ValueError("the curvature saw no data: the training set is empty")
        return total / count

    def apply_inverse(self, weights: dict[str, Tensor], damping: float | Damping = 0.0) -> dict[str, Tensor]:
        damping = as_damping(damping)
        delta = damping.absolute + (damping.relative * self.mean_eigenvalue() if damping.relative else 0.0)
        if not delta >= 0:
            raise ValueError(f"cg: the damping {damping} gives δ = {delta:.3g} < 0 (the estimated mean eigenvalue of "
                             "H is negative); pass an absolute damping, e.g. damping=1e-3")
        b = flatten(weights, self.layout)
        dtype = torch.promote_types(b.dtype, torch.float32)
        b = b.to(dtype)
        x, r = torch.zeros_like(b), b.clone()
        p, rs = r.clone(), (r * r).sum(1)
        target = (self.tol * b.norm(dim=1)) ** 2
        self.iterations = 0
        while bool((rs > target).any()) and self.iterations < self.max_iter:
            active = rs > target
            ap = self.hvp(p) + delta * p
            curvature = (p * ap).sum(1)
            if bool((curvature[active] <= 0).any()):
                raise ValueError("cg met a direction of non-positive curvature: H + δI is not positive definite; "
                                 "increase the damping")
            alpha = torch.where(active, rs / torch.where(active, curvature, 1.0), 0.0)
            x += alpha[:, None] * p
            r -= alpha[:, None] * ap
            rs_new = (r * r).sum(1)
            beta = torch.where(active, rs_new / torch.where(active, rs, 1.0), 0.0)
            p = r + beta[:, None] * p
            rs = rs_new
            self.iterations += 1
        if bool((rs > target).any()):
            logger.warning("cg stopped after %d iterations; largest relative residual %.3g",
                           self.iterations, float((rs / target.clamp(min=1e-300)).max().sqrt() * self.tol))
        return unflatten(x.to(weights[next(iter(weights))].dtype), self.layout)

    def config(self) -> dict[str, Any]:
        return {"layout": self.layout, "max_iter": self.max_iter, "tol": self.tol, "probes": self.probes,
                "seed": self.seed}

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        pass
