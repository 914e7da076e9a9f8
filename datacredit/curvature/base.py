"""The curvature strategy interface, damping, the registry by name, storage and the distributed reduction.

A :class:`Curvature` estimates the curvature ``H`` of the *mean* training loss ``(1/N) Σ_i ℓ_i(θ)`` over the tracked
parameters and applies ``(H + δI)⁻¹`` to gradient-shaped weights ``{name: (Q, *shape)}``.

Loss scale: capture returns per-example gradients ``g_i = ∇ℓ_i`` (the losses are summed, never averaged, before the
backward), and every estimator divides its sums by the number of examples ``N`` it saw, so the factored estimates are
of ``(1/N) Σ_i g_i g_iᵀ`` (the empirical Fisher, the GGN of a log-likelihood loss evaluated at the observed labels)
and the explicit one is ``∇² (1/N) Σ_i ℓ_i``. A training objective with an L2 penalty ``(λ/2)‖θ‖²`` has curvature
``H + λI``: pass ``λ`` as absolute damping.

Fitting streams: :meth:`Curvature.fit` takes a callable returning a fresh iterator (or a re-iterable such as a list) of
:class:`~datacredit.capture.ExampleGrads` — or of raw data batches for ``source == "data"`` strategies — and makes
``n_passes`` passes, accumulating sums. After each pass the sums are all-reduced across ranks when
``torch.distributed`` is initialized (each rank streams its own shard), so every rank ends with the same estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from ..capture import ExampleGrads
from ..errors import StoreError
from ..store import Store

FORMAT_VERSION = 1
REPLAY_BYTES = 2**28  # per fit: the first pass's gradients kept for the later passes up to this many bytes


def _grads_bytes(item: Any) -> int:
    """Bytes of the tensors of one streamed item (an :class:`ExampleGrads`' pieces)."""
    total = 0
    for pieces in getattr(item, "pieces", {}).values():
        for p in pieces:
            for t in (getattr(p, "u", None), getattr(p, "v", None), getattr(p, "g", None)):
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
    return total


@dataclass(frozen=True)
class Damping:
    """``δ = absolute + relative · mean eigenvalue`` added to the curvature before inverting.

    The mean eigenvalue is taken per block: per parameter for the factored curvatures (as kronfluence's heuristic
    damping), over all tracked parameters for ``"explicit"``, estimated over all tracked parameters by Hutchinson's
    trace estimator for ``"cg"`` (seeded Rademacher probes); it is 1 for ``"identity"``.
    """

    absolute: float = 0.0
    relative: float = 0.0

    def __post_init__(self):
        for field, value in (("absolute", self.absolute), ("relative", self.relative)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"damping {field} must be a finite number >= 0, got {value!r}")

    def value(self, mean_eigenvalue: float | Tensor) -> float | Tensor:
        return self.absolute + self.relative * mean_eigenvalue


def as_damping(damping: float | Damping) -> Damping:
    """A float is absolute damping."""
    return damping if isinstance(damping, Damping) else Damping(absolute=float(damping))


_REGISTRY: dict[str, type[Curvature]] = {}


def register_curvature(cls: type[Curvature]) -> type[Curvature]:
    """Class decorator registering a strategy under ``cls.name``; a duplicate name raises."""
    if cls.name in _REGISTRY:
        raise ValueError(f"a curvature named {cls.name!r} is already registered ({_REGISTRY[cls.name].__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def curvature_names() -> list[str]:
    return list(_REGISTRY)


def curvature_class(name: str) -> type[Curvature]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown curvature {name!r}; choose one of {curvature_names()}")
    return _REGISTRY[name]


def all_reduce_sum(tensors: list[Tensor]) -> None:
    """Sum ``tensors`` in place across ranks when ``torch.distributed`` is initialized; otherwise do nothing."""
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


class Curvature:
    """A curvature strategy: ``fit`` (one or more streaming passes), ``apply_inverse``, ``save`` / ``load``.

    Subclasses set ``name`` and ``n_passes`` and implement :meth:`update`, :meth:`end_pass`, :meth:`apply_inverse`,
    :meth:`state_dict` and :meth:`load_state_dict`. ``source`` says what :meth:`fit` streams: ``"grads"``
    (:class:`ExampleGrads` of the training loss) or ``"data"`` (raw training batches; the strategy computes what it
    needs from the model itself, see :meth:`bind`).
    """

    name: ClassVar[str] = "curvature"
    n_passes: ClassVar[int] = 1
    source: ClassVar[str] = "grads"

    def __init__(self) -> None:
        self.passes_done = 0

    @property
    def fitted(self) -> bool:
        return self.passes_done >= self.n_passes

    def config(self) -> dict[str, Any]:
        """JSON-serialisable options written next to the stored state."""
        return {}

    # -- fitting -------------------------------------------------------------------------------------------------
    def fit(self, batches: Callable[[], Iterable] | Iterable, *, progress: bool = False,
            on_pass: Callable[[Curvature], None] | None = None) -> Curvature:
        """Make the remaining passes over ``batches`` (a callable giving a fresh iterator, or a re-iterable).

        ``on_pass`` is called after each finished pass (e.g. to save, so a crash resumes at the next pass).
        """
        remaining = self.n_passes - self.passes_done
        if remaining > 1 and not callable(batches) and iter(batches) is batches:
            raise ValueError(f"curvature {self.name!r} needs {remaining} passes over the data; pass a callable "
                             "returning a fresh iterator, or a list, not a one-shot iterator")
        # the first pass's per-example gradients, replayed by the later passes while they fit in REPLAY_BYTES: the
        # same objects (update never modifies them), so the same sums, without another forward and backward pass
        kept: list | None = [] if remaining > 1 and self.source == "grads" else None
        size, first = 0, self.passes_done
        for k in range(first, self.n_passes):
            replaying = kept is not None and k > first
            items = kept if replaying else batches() if callable(batches) else batches
            desc = f"{self.name} pass {k + 1}/{self.n_passes}"
            for item in tqdm(items, desc=desc, disable=not progress, leave=False):
                self.update(item, k)
                if kept is not None and not replaying:
                    size += _grads_bytes(item)
                    if size > REPLAY_BYTES:
                        kept = None  # too large: the later passes stream again
                    else:
                        kept.append(item)
            self.end_pass(k)
            self.passes_done = k + 1
            if on_pass is not None:
                on_pass(self)
        return self

    def update(self, item: Any, pass_index: int) -> None:
        """Accumulate one batch (an :class:`ExampleGrads`, or a raw batch for ``source == "data"``). Must not modify
        ``item``: :meth:`fit` may replay the first pass's items in the later passes."""
        raise NotImplementedError

    def end_pass(self, pass_index: int) -> None:
        """All-reduce the sums of the pass and turn them into the estimate."""
        raise NotImplementedError

    def bind(self, model: torch.nn.Module, loss: Callable, names: list[str]) -> Curvature:
        """Give a ``source == "data"`` strategy the model, the per-example loss ``loss(model, batch) -> (N,)`` and the
        tracked parameter names; a no-op for the others."""
        return self

    def nbytes(self) -> int:
        """Bytes of the fitted state held in memory (eigenvalues, eigenbases, factors); 0 for a strategy that keeps
        none (identity, CG)."""
        return 0

    def to(self, device: torch.device | str) -> Curvature:
        """Move the fitted state to ``device`` (e.g. after loading from a store onto a GPU run)."""
        return self

    # -- using ---------------------------------------------------------------------------------------------------
    def apply_inverse(self, weights: dict[str, Tensor], damping: float | Damping = 0.0) -> dict[str, Tensor]:
        """``(H + δI)⁻¹ w`` for ``weights[name]`` of shape ``(Q, *shape)``; returns the same keys and shapes."""
        raise NotImplementedError

    def apply_function(self, weights: dict[str, Tensor], fn: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        """``f(H) w`` for an elementwise function ``fn`` of the eigenvalues, ``weights[name]`` ``(Q, *shape)``.

        Defined for the eigen-based curvatures (identity, diagonal, KFAC, EK-FAC, explicit); CG has no eigenbasis.
        """
        raise NotImplementedError(f"curvature {self.name!r} has no eigendecomposition to apply a function through")

    def apply_functions(self, weights: dict[str, Tensor], fns: list[Callable[[Tensor], Tensor]]
                        ) -> list[dict[str, Tensor]]:
        """``[f(H) w for f in fns]``: the same as :meth:`apply_function` once per function; the eigen-based
        curvatures rotate ``w`` into their eigenbasis once for all of them (SOURCE needs two functions per
        segment)."""
        return [self.apply_function(weights, fn) for fn in fns]

    def self_products(self, grads: ExampleGrads, damping: float | Damping = 0.0) -> Tensor:
        """``g_iᵀ (H + δI)⁻¹ g_i`` per example, ``(N,)``. Materializes the batch's gradients (memory ``N × numel``)."""
        mats = grads.materialize()
        pre = self.apply_inverse(mats, damping)
        return sum((mats[k] * pre[k]).reshape(grads.n, -1).sum(1) for k in mats)

    def _require_fit(self) -> None:
        if not self.fitted:
            raise RuntimeError(f"curvature {self.name!r} is not fitted ({self.passes_done}/{self.n_passes} passes); "
                               "call fit first")

    # -- storage -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def save(self, store: Store, name: str = "curvature", meta: dict[str, Any] | None = None) -> None:
        """Write the state (after however many passes are done) as ``<name>.safetensors`` in ``store``."""
        info = {"format_version": FORMAT_VERSION, "kind": self.name, "passes_done": self.passes_done,
                "config": self.config(), "meta": meta or {}}
        state = self.state_dict() if self.passes_done else {}
        store.save_tensors(name, state, meta=info)

    @staticmethod
    def stored_meta(store: Store, name: str = "curvature") -> dict[str, Any] | None:
        """The ``meta`` given to :meth:`save`, with ``kind`` and ``passes_done``; None when nothing is stored."""
        if not store.has(name):
            return None
        info = store.info(name)["meta"]
        if info.get("format_version") != FORMAT_VERSION or "kind" not in info:
            raise StoreError(f"{store.root / name}: not a curvature of format {FORMAT_VERSION}")
        return info

    @staticmethod
    def load(store: Store, name: str = "curvature") -> Curvature:
        """The strategy saved under ``name``, of the registered class its ``kind`` names (possibly partly fitted)."""
        info = Curvature.stored_meta(store, name)
        if info is None:
            raise StoreError(f"{store.manifest_path}: no curvature named {name!r}")
        curvature = curvature_class(info["kind"])(**info.get("config", {}))
        if info["passes_done"]:
            curvature.load_state_dict(store.load_tensors(name))
        curvature.passes_done = int(info["passes_done"])
        return curvature
