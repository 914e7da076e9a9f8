"""Dropout ensemble (Deng et al. 2024): one trained model, K members that are K fixed, seeded dropout masks applied
while the members' gradients are computed.

Masks. Member ``j`` multiplies the input of each of the model's ``nn.Dropout`` layers (or, with ``modules=``, the
output of each chosen module) by a fixed mask over the **last (feature) dimension**: ``m = keep / (1 − p)`` with
``keep ~ Bernoulli(1 − p)`` per feature, the same for every example, every position of a sequence and every call of
the layer. Each member is therefore one fixed subnetwork (some hidden units removed, the rest rescaled as in training)
whose gradients are exact gradients of that subnetwork — not a fresh random mask per example, which would make a
training example's gradient and a query's gradient come from different networks. Masks are a pure function of
``(seed, member, module path, width)`` (:func:`dropout_mask`), so they are reproducible and differ across members.

The masks live in forward hooks on the method's model (its private copy for TracIn / TRAK), installed for one member's
``fit`` / ``score`` / ``self_scores`` and removed right after; the user's model is never changed.

Sharing the train-side cache (``share_train_cache=True``). Nothing a method caches can be shared exactly: every
train-side quantity (projected gradients, TRAK's features and kernel, a curvature) is a function of the masked network.
The option is the approximation that makes serving cheaper: the method is fitted ONCE on the unmasked model and the
members differ only in what their ``score`` recomputes under their mask. What that is depends on the method:

* projected Grad-Dot / TracIn, TRAK: ``score`` reads the cached train features and only featurizes the queries, so
  each member masks the query side only (train side: the full network);
* influence: the curvature is shared; the training and query gradients of ``score`` are masked;
* exact Grad-Dot / TracIn cache nothing: sharing changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError, UnsupportedModuleError
from ..methods.base import configure
from .base import Ensemble, Method, MethodFactory, check_k, config_settings, timed, weight_bytes


def dropout_mask(width: int, p: float, seed: int, member: int, path: str) -> Tensor:
    """Member ``member``'s mask for the module at ``path``: ``(width,)`` float64, entries 0 or ``1 / (1 − p)``.

    A pure function of its arguments (a sha256 of ``(seed, member, path)`` seeds a private generator)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    key = hashlib.sha256(repr((int(seed), int(member), str(path))).encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    keep = torch.rand(int(width), generator=gen, dtype=torch.float64) >= p
    return keep.double() / (1.0 - p)


class MaskSites:
    """Where masks go: module path -> (p, whether it is an ``nn.Dropout`` (mask its input) or injected (its output))."""

    def __init__(self, model: nn.Module, p: float | None, modules: list[str] | None):
        named = dict(model.named_modules())
        if modules is None:
            sites = {path: (m.p if p is None else p, True) for path, m in named.items() if isinstance(m, nn.Dropout)}
            if not sites:
                raise UnsupportedModuleError(
                    f"{type(model).__name__} has no nn.Dropout layers; pass modules=[...] (paths of modules whose "
                    "outputs get a mask, e.g. activations) and p=")
        else:
            if p is None:
                raise ValueError("pass p= (the dropout probability) when injecting masks with modules=")
            missing = [path for path in modules if path not in named]
            if missing:
                raise UnsupportedModuleError(f"no module named {missing} in {type(model).__name__}")
            owning = [path for path in modules if any(q.requires_grad for q in named[path].parameters(recurse=False))]
            if owning:
                raise UnsupportedModuleError(
                    f"modules {owning} own trainable parameters: masking their output would hide it from the capture "
                    "engine (their gradients need the unmasked output); mask the module after them (an activation)")
            sites = {path: (p, isinstance(named[path], nn.Dropout)) for path in modules}
        for path, (rate, _) in sites.items():
            if not 0 <= rate < 1:
                raise ValueError(f"dropout probability of {path!r} must be in [0, 1), got {rate}")
        self.sites = sites

    @contextlib.contextmanager
    def applied(self, model: nn.Module, seed: int, member: int, record: dict[str, Tensor]) -> Iterator[None]:
        """Member ``member``'s masks installed as forward hooks on ``model`` (removed on exit). Masks used are put
        into ``record`` (path -> ``(width,)``)."""
        named = dict(model.named_modules())
        missing = [path for path in self.sites if path not in named]
        if missing:
            raise UnsupportedModuleError(f"the method's model has no modules {missing} (did the factory wrap it?)")
        handles = []
        try:
            for path, (p, on_input) in self.sites.items():
                handles.append(named[path].register_forward_hook(self._hook(path, p, on_input, seed, member, record)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _hook(path: str, p: float, on_input: bool, seed: int, member: int, record: dict[str, Tensor]):
        converted: dict[tuple, Tensor] = {}  # the mask in the activations' dtype and device, made once

        def hook(module: nn.Module, inputs: tuple, output: Any) -> Tensor:
            x = inputs[0] if on_input else output
            if not isinstance(x, Tensor):
                raise UnsupportedModuleError(f"cannot mask {path!r}: its {'input' if on_input else 'output'} is a "
                                             f"{type(x).__name__}, not a tensor")
            mask = record.get(path)
            if mask is None or mask.shape[0] != x.shape[-1]:
                mask = record[path] = dropout_mask(x.shape[-1], p, seed, member, path)
            key = (path, x.dtype, x.device)
            if key not in converted or converted[key].shape != mask.shape:
                converted[key] = mask.to(dtype=x.dtype, device=x.device)
            return x * converted[key]

        return hook


@dataclass(frozen=True)
class DropoutConfig:
    """k: members. p: dropout probability, None = each ``nn.Dropout`` layer's own (required with ``modules``). seed:
    masks are a function of (seed, member, module path). modules: paths of modules whose outputs get masks instead of
    the ``nn.Dropout`` layers (a tuple). share_train_cache: fit once on the unmasked model (module docstring)."""

    k: int
    p: float | None = None
    seed: int = 0
    modules: tuple[str, ...] | None = None
    share_train_cache: bool = False

    def __post_init__(self) -> None:
        check_k(self.k)
        if self.p is not None and not 0 <= self.p < 1:
            raise ValueError(f"p: the dropout probability must be in [0, 1), got {self.p}")
        if self.modules is not None:
            object.__setattr__(self, "modules", tuple(str(m) for m in self.modules))


class DropoutEnsemble(Ensemble):
    """K members = K fixed dropout masks on one trained model (see the module docstring).

    model: the trained model (never modified). method: a factory ``(model, member) -> method`` (see
    :data:`~datacredit.ensembles.base.MethodFactory`). config: a :class:`DropoutConfig` (k, p, seed, modules,
    share_train_cache), or its fields as keywords (``k`` also positionally; not both). A module in ``modules`` owning
    trainable parameters is refused. training_seconds: how long the model took to train (for the cost report;
    None = unknown).
    """

    kind = "dropout"

    def __init__(self, model: nn.Module, method: MethodFactory, k: int | None = None, *,
                 config: DropoutConfig | None = None, training_seconds: float | None = None, **settings: Any):
        if k is not None:
            settings["k"] = k
        self.config = config = configure(DropoutConfig, config, settings)
        super().__init__(method, config.k)
        self.model, self.seed, self.share_train_cache = model, int(config.seed), bool(config.share_train_cache)
        modules: Sequence[str] | None = None if config.modules is None else list(config.modules)
        self.sites = MaskSites(model, config.p, modules)
        self.p, self.modules = config.p, modules
        self._masks: list[dict[str, Tensor]] = [{} for _ in range(self.k)]
        self.cost.shared_training = training_seconds
        self.cost.member_training = [0.0] * self.k

    def masks(self, member: int) -> dict[str, Tensor]:
        """Member ``member``'s masks ``{path: (width,)}`` as used so far (a mask is drawn at its layer's first call)."""
        return dict(self._masks[member])

    def _model(self, member: int) -> nn.Module:
        return self.model

    def _settings(self) -> dict[str, Any]:
        return {**config_settings(self.config), "sites": {path: rate for path, (rate, _) in self.sites.sites.items()}}

    @contextlib.contextmanager
    def _member(self, member: int, method: Method) -> Iterator[None]:
        with self.sites.applied(getattr(method, "model", self.model), self.seed, member, self._masks[member]):
            yield

    def _method_of(self, member: int) -> Method:
        return self.methods[0 if self.share_train_cache else member]

    def fit(self, train: Dataset | DataLoader, *, keep: bool = True) -> DropoutEnsemble:
        """Fit every member under its masks (``keep`` as in :meth:`Ensemble.fit`), or (``share_train_cache``) one
        method on the unmasked model."""
        if not self.share_train_cache:
            super().fit(train, keep=keep)
            return self
        method = self._build(0)
        if getattr(method, "store", None) is not None:
            raise DataError("share_train_cache scores one fitted method under K masks; its store would return the "
                            "first member's cached scores for every member: build the method without store=")
        _, self.cost.shared_fit = timed(lambda: method.fit(train), self.clock)
        self.methods, self._train, self._keep = [method], train, True
        self.cost.member_fit, self.cost.member_score = [0.0] * self.k, [0.0] * self.k
        self._count_bytes()
        return self

    @property
    def _shares_method(self) -> bool:
        return self.share_train_cache

    def _weight_bytes(self) -> tuple[int, list[int]]:
        # the one model, and per member its masks at one byte per kept / dropped feature
        return weight_bytes(self.model), [sum(m.numel() for m in masks.values()) for masks in self._masks]
