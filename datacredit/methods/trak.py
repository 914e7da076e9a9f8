"""TRAK (Park, Georgiev, Ilyas, Leclerc, Madry 2023, Algorithm 1): attribution through a linearised, projected model.

For each of M models ``θ_m`` (checkpoints of one run, or independently trained models):

* ``φ_i = P_m ∇_θ f(z_i; θ_m)`` — the projected gradient of the **margin** ``f = log(p / (1 − p))`` (p = probability
  of the correct class), for training examples ``Φ_m = [φ_1 … φ_n]ᵀ`` ``(n_train, k)`` and for queries alike;
* ``Q_m = diag(1 − p_i)`` — the one-minus-probability reweighting of the training examples;
* ``τ(q, i) = [1/M Σ_m φ_{q,m}ᵀ (Φ_mᵀ Φ_m + λ_m I)⁻¹ φ_{i,m}] · [1/M Σ_m (1 − p_{i,m})]``.

The last line is the paper's estimator (and traker's): the kernel part and Q are averaged over models *separately*.
``average="per-model"`` averages the products ``φ_qᵀ K⁻¹ φ_i (1 − p_i)`` instead; both agree for M = 1. The paper's
optional soft-thresholding (sparsification) of τ is not applied.

Sign. :class:`~datacredit.task.ClassificationTask` ``(measurement="margin")`` returns ``−f`` (so that, as everywhere in
datacredit, a positive score credits lowering the measurement). TRAK uses ``∇f`` on both sides of
``φ_qᵀ K⁻¹ φ_i``; we use ``∇(−f)`` on both, and the two sign flips cancel: ``score[i, q] > 0`` means training on i
raises q's margin, i.e. **helps** q (it is TRAK's τ unchanged). ``p`` is read off the measurement itself:
``1 − p = sigmoid(−f) = sigmoid(measurement)``, so any task whose measurement is a negated margin (a log-odds of the
right answer) works; a ClassificationTask measuring the loss is refused.

Numerics (DESIGN "TRAK numerics"). Margin gradients of a linear softmax model are rank-deficient (they are orthogonal
to the all-classes direction), so ``ΦᵀΦ`` can be singular: it is accumulated and solved in float64 with a ridge
``λ_m = ρ_m · trace(Φ_mᵀΦ_m) / k`` (ρ relative to the mean eigenvalue). Each model's projection is built once from
seed ``seed + m`` (the Projector caches it) and never regenerated per batch.

Choosing the ridge (``ridge="gcv"``, the default). ``(ΦᵀΦ + λI)⁻¹Φᵀ`` is the ridge regression TRAK's linearised model
fits: the one-step Newton update of the linearised logistic regression regresses the training residuals
``r_i = 1 − p_i`` (the ``Q`` above) on the features ``φ_i``. ρ is chosen per model by generalized cross-validation
(Golub, Heath, Wahba 1979) of that regression, using no ground truth:

    ``GCV(λ) = n · ‖(I − S_λ) r‖² / (n − tr S_λ)²``,  ``S_λ = Φ(ΦᵀΦ + λI)⁻¹Φᵀ``

minimised over :data:`GCV_GRID` (relative ridges 1e-6 … 1e2, log-spaced). With the eigen-decomposition
``ΦᵀΦ = V diag(e) Vᵀ`` and ``c = VᵀΦᵀr`` both terms are sums over the k eigenvalues (the residual picks up
``c_j²/e_j · (λ/(e_j + λ))²``, ``tr S_λ = Σ e_j/(e_j + λ)``): one ``(k × k)`` eigendecomposition and one pass
``Φᵀr``, O(k) per grid point. A number fixes ρ instead: ``ridge=1e-6`` is the previous default (the paper's
unregularised estimator made safe). Measured (benchmarks/QUERIES.md, LDS against cached retraining ground truth):
digits logistic regression, k = 2048: 0.278 at ρ = 1e-6, 0.412 at the GCV choice (ρ = 0.032); k = 512: 0.296 →
0.379 (ρ = 0.0018); Fashion-MNIST MLP, k = 512, 500 queries: 0.084 → 0.099. On digits LDS keeps rising to ρ ≈ 1–3
(0.68–0.76 in a sweep): GCV is a data-driven improvement over the old default, not the LDS optimum.

Caching. Every member's training features live on a :class:`~datacredit.gradstore.GradientStore` of margin gradients
(``train_target="measurement"``): the method's own (:func:`~.base.own_store`, one per member, in ``store``'s directory
when one is given, else a private temporary one; all on the method's private model, which holds member m whenever
store m is built or read, so each store's header refuses another state), or the user's (``features=gs`` or one
store per member, each on its member's model, built on a margin task). ``fit`` builds the stores (reused when built,
resumed when killed, a store of another model, data or task refused by name), reads ``1 − p`` with one forward pass
(no backward) and accumulates each kernel ``ΦᵀΦ`` (and ``Φᵀr`` for GCV) from the store in row blocks of
``KERNEL_ROWS``; with a ``store`` the Cholesky factor of ``Φ_mᵀΦ_m + λ_m I`` (``(k, k)`` float64, safetensors) is
kept there, keyed by the store's model, data and configuration digests and the ridge rule, else in memory. ``score``
featurizes the queries once per member, applies ``(ΦᵀΦ + λI)⁻¹`` to them and reads the stores in row blocks
(products in float64); with a ``store`` the ``(n_train, n_query)`` scores go to a resumable memmap there. The
projection is the store's: ``projection=k`` with ``projection_kind`` gives :class:`~datacredit.gradstore.
DenseProjection` ``(k, kind, seed + m)`` (``"kronecker"``: ``SquareKronProjection``), ``projection=None``
:class:`~datacredit.gradstore.ExactFeatures`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..capture.projection import KINDS
from ..gradstore import GradientStore
from ..scores import Scores
from ..store import Store
from ..task import ClassificationTask, Task
from ..trajectory import Trajectory
from .base import (
    Data,
    GradientMethod,
    as_loader,
    batches,
    configure,
    data_digest,
    eval_mode,
    feature_stores,
    ids_digest,
    nbytes,
    own_store,
    projection_featurizer,
    store_meta,
    store_products,
    store_self_products,
    working_copy,
)

AVERAGES = ("separate", "per-model")
KERNEL_ROWS = 4096  # training rows per step when accumulating ΦᵀΦ
GCV_GRID = tuple(float(x) for x in np.logspace(-6, 2, 33))  # relative ridges ρ tried by ridge="gcv"


@dataclass(frozen=True)
class TRAKConfig:
    """projection: the projected dimension k, or None for the exact (unprojected, ``k = numel``) features.
    projection_kind: ``"gaussian"`` / ``"rademacher"`` (dense, as the paper) or ``"kronecker"`` (per layer; exact for
    parameters with at most ``projection`` entries). ridge: ``"gcv"`` (chosen per model by generalized
    cross-validation, module doc) or ρ = ``λ / mean eigenvalue of ΦᵀΦ`` (1e-6 was the default before GCV).
    average: see module doc."""

    projection: int | None = 2048
    projection_kind: str = "gaussian"
    seed: int = 0
    ridge: float | str = "gcv"
    average: str = "separate"

    def __post_init__(self) -> None:
        if self.projection is not None and self.projection < 1:
            raise ValueError(f"projection must be None or a positive dimension, got {self.projection}")
        if self.projection_kind not in KINDS:
            raise ValueError(f"projection_kind must be one of {KINDS}, got {self.projection_kind!r}")
        if self.ridge != "gcv" and not (isinstance(self.ridge, (int, float)) and self.ridge >= 0):
            raise ValueError(f"ridge must be 'gcv' or a number >= 0, got {self.ridge!r}")
        if self.average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {self.average!r}")


def _members(model: nn.Module, models: Any) -> Trajectory:
    if models is None:
        return Trajectory.from_states([model])
    if isinstance(models, Trajectory):
        return models
    if isinstance(models, (str, os.PathLike)):
        return Trajectory.load(models)
    if isinstance(models, (nn.Module, Mapping)):
        models = [models]
    return Trajectory.from_states(list(models))


def gcv_ridge(kernel: Tensor, phi_r: Tensor, r_sq: float, n: int,
              grid: Sequence[float] = GCV_GRID) -> tuple[float, list[float]]:
    """The relative ridge ρ in ``grid`` minimising the GCV score of the ridge regression of ``r`` on Φ, and the
    scores ``(len(grid),)``. kernel: ``ΦᵀΦ`` ``(k, k)`` float64; phi_r: ``Φᵀr`` ``(k,)``; r_sq: ``‖r‖²``; n: rows.

    ``GCV(λ) = n‖r − Φβ_λ‖² / (n − tr S_λ)²`` with ``β_λ = (ΦᵀΦ + λI)⁻¹Φᵀr``; in the eigenbasis of ``ΦᵀΦ`` (e, V),
    ``c = VᵀΦᵀr``: ``‖r − Φβ‖² = ‖r‖² − Σ c_j²/e_j + Σ (c_j²/e_j)(λ/(e_j+λ))²`` and ``tr S = Σ e_j/(e_j+λ)``
    (eigenvalues below ``k·eps·max`` are null directions of Φ and drop out). Cost: one ``k³`` eigendecomposition.
    """
    e, v = torch.linalg.eigh(kernel)
    keep = e > e.max() * kernel.shape[0] * torch.finfo(torch.float64).eps
    e, c = e[keep], (v.T @ phi_r)[keep]
    explained = c**2 / e  # (Uᵀr)_j² of the thin SVD Φ = U diag(√e) Vᵀ
    mean = kernel.diagonal().mean()
    scores = []
    for rho in grid:
        lam = rho * mean
        residual = r_sq - explained.sum() + (explained * (lam / (e + lam)) ** 2).sum()
        dof = (e / (e + lam)).sum()
        scores.append(float(n * residual / (n - dof).clamp(min=1e-12) ** 2))
    return float(grid[int(np.argmin(scores))]), scores


class KernelSolver:
    """``(ΦᵀΦ + λI)⁻¹`` applied without forming it: a Cholesky factor ``L`` (``K = LLᵀ``), or, where the kernel is not
    numerically positive definite (ridge 0 on a singular kernel), an eigen-basis with pseudo-inverted eigenvalues.

    Forming the inverse (``cholesky_inverse``) costs ~3× the factorisation and was the slowest step at ``k = 4096``.
    """

    def __init__(self, tensors: dict[str, Tensor], ridge: float, relative: float | None = None):
        self.tensors, self.ridge, self.relative = tensors, ridge, relative

    @classmethod
    def fit(cls, features: np.ndarray, ridge: float | str, residuals: np.ndarray | None = None) -> KernelSolver:
        """From ``features`` Φ ``(n, k)`` (may be a memmap, read in row blocks); λ = ρ · mean eigenvalue, with
        ρ = ``ridge`` or, for ``ridge="gcv"``, chosen by :func:`gcv_ridge` for the regression of ``residuals``
        ``(n,)`` on Φ. The chosen ρ is kept as ``relative``."""
        k = features.shape[1]
        kernel = torch.zeros(k, k, dtype=torch.float64)
        phi_r = torch.zeros(k, dtype=torch.float64)
        for start in range(0, features.shape[0], KERNEL_ROWS):
            block = torch.from_numpy(np.asarray(features[start : start + KERNEL_ROWS], dtype=np.float64))
            kernel.addmm_(block.T, block)
            if residuals is not None:
                phi_r += block.T @ torch.from_numpy(np.asarray(residuals[start : start + KERNEL_ROWS], np.float64))
        scale = kernel.diagonal().mean().item()
        if ridge == "gcv":
            if residuals is None:
                raise ValueError("ridge='gcv' needs the regression's residuals")
            r = np.asarray(residuals, dtype=np.float64)
            ridge = gcv_ridge(kernel, phi_r, float(r @ r), len(r))[0] if scale > 0 else 1e-6
        lam = ridge * scale if scale > 0 else max(ridge, 1e-30)
        kernel.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(kernel)
        if info.item() == 0:
            return cls({"cholesky": chol}, lam, ridge)
        vals, vecs = torch.linalg.eigh(kernel)
        keep = vals > vals.max() * k * torch.finfo(torch.float64).eps
        inv = torch.where(keep, 1.0 / vals.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(vals))
        return cls({"eigvecs": vecs, "inv_eigvals": inv}, lam, ridge)

    def solve(self, rhs: Tensor) -> Tensor:
        """``(ΦᵀΦ + λI)⁻¹ rhs`` for ``rhs`` ``(k, m)`` float64."""
        if "cholesky" in self.tensors:
            return torch.cholesky_solve(rhs, self.tensors["cholesky"])
        vecs = self.tensors["eigvecs"]
        return vecs @ (self.tensors["inv_eigvals"][:, None] * (vecs.T @ rhs))

    def quadratic(self, phi: Tensor) -> Tensor:
        """``φ_iᵀ (ΦᵀΦ + λI)⁻¹ φ_i`` for each row of ``phi`` ``(m, k)`` float64, ``(m,)``."""
        if "cholesky" in self.tensors:
            half = torch.linalg.solve_triangular(self.tensors["cholesky"], phi.T, upper=False)
            return (half * half).sum(0)
        proj = phi @ self.tensors["eigvecs"]
        return (proj * proj * self.tensors["inv_eigvals"]).sum(1)

    def matrix(self) -> Tensor:
        """The inverse itself, ``(k, k)`` (for tests and small k)."""
        k = next(iter(self.tensors.values())).shape[0]
        return self.solve(torch.eye(k, dtype=torch.float64))


class TRAK(GradientMethod):
    """TRAK. ``TRAK(model, task, models=[...]).fit(train).score(queries) -> Scores``.

    model: the architecture (and device); a private copy receives each member's weights.
    task: its measurement must be a negated margin, e.g. ``ClassificationTask(measurement="margin")``.
    models: the M members: None (``model`` itself), a list of state dicts or models of ``model``'s architecture,
        a :class:`Trajectory` (its checkpoints) or a trajectory directory.
    Cost: ``fit`` = M backward passes over the training set + M products ``ΦᵀΦ`` (``n·k²``) and Cholesky
    factorisations (``k³/3``); ``score`` = M backward passes over the queries + ``M·(k² + n_train·k)·n_query``.
    Stored: ``M·(n_train·k + k²)`` floats. Scores are float64 in memory; with a store, a memmap in the model's
    float dtype (float32 for a float32 model).
    config: a :class:`TRAKConfig`, or its fields as keywords (``projection=...``, ``ridge=...``; not both).
    features: a :class:`~datacredit.gradstore.GradientStore` (M = 1) or a list, one per member, each built with
        ``train_target="measurement"`` on its member's model (module doc); ``models`` must then be None and the
        projection arguments are unused (the stores' projection is used).
    """

    name = "trak"

    def __init__(self, model: nn.Module, task: Task,
                 models: Sequence[Mapping[str, Tensor] | nn.Module] | Trajectory | str | None = None, *,
                 config: TRAKConfig | None = None, store: Store | str | None = None,
                 features: GradientStore | Sequence[GradientStore] | None = None,
                 batch_size: int = 64, progress: bool = True, **settings: Any):
        self.config = config = configure(TRAKConfig, config, settings)
        _check_margin(task)
        self.features = None if features is None else feature_stores(features, many=True)
        if self.features is not None:
            if models is not None:
                raise ValueError("with features= the members are the stores' models: leave models=None")
            for gs in self.features:
                _check_margin(gs.task)
                if gs.train_target != "measurement":
                    raise ValueError("TRAK's training features are margin gradients: build the store with "
                                     "GradientStore(..., train_target='measurement') on a margin task")
            models = [gs.model for gs in self.features]
        self.members = _members(model, models)
        super().__init__(working_copy(model), task, batch_size=batch_size, progress=progress)
        self.store = Store(store) if isinstance(store, (str, os.PathLike)) else store
        self._own: list[GradientStore] | None = None  # the method's own stores, one per member
        self.train_ids: np.ndarray | None = None
        self.train_features: list[np.ndarray] | None = None  # Φ_m (n_train, k) per member: the own stores' memmaps
        self.one_minus_p: list[np.ndarray] | None = None  # (n_train,) per member
        self._kernels: list[KernelSolver | None] = []  # per member (None: read from the store on demand)
        self.ridges: list[float] = []  # λ_m
        self.relative_ridges: list[float] = []  # ρ_m (the GCV choice, or the given ridge)

    @property
    def n_models(self) -> int:
        return len(self.members)

    def _load(self, m: int) -> None:
        self.members.load_into(self.model, m)

    def _stores(self) -> list[GradientStore]:
        """Each member's store of training margin gradients: ``features=``, or the method's own."""
        if self.features is not None:
            return self.features
        if self._own is None:
            cfg = self.config
            self._own = [own_store(self, projection_featurizer(cfg.projection, cfg.projection_kind, cfg.seed + m),
                                   suffix=f"-member-{m:03d}", train_target="measurement")
                         for m in range(self.n_models)]
        return self._own

    def _ready(self, m: int, gs: GradientStore) -> None:
        """Member m into the private model when store m is on it (the own stores)."""
        if gs.model is self.model:
            self._load(m)

    # -- fit -----------------------------------------------------------------------------------------------------
    def cache_bytes(self) -> int:
        """Bytes of the training ids and, per member, Φ_m, 1 − p and the inverse kernel held in memory (a kernel read
        from the store on demand is not counted)."""
        kernels = [None if solver is None else solver.tensors for solver in self._kernels]
        return nbytes(self.train_ids, self.train_features, self.one_minus_p, kernels)

    def fit(self, train: Data) -> TRAK:
        """Per member: build (or reuse, or resume) the store of Φ_m, ``1 − p`` by a forward pass, the inverse kernel
        from the store (or from ``store``, cached)."""
        ids, features, weights, kernels, lams, rhos = None, [], [], [], [], []
        for m, gs in enumerate(self._stores()):
            self._ready(m, gs)
            gs.build(train)
            if self.features is None:
                features.append(gs.features())  # checked: complete, this model, this configuration
            else:
                gs.check()
            ids = gs.train_ids() if ids is None else ids
            if not np.array_equal(gs.train_ids(), ids):
                raise ValueError("the members' stores hold different training ids")
            q = _one_minus_p(gs, train, self.batch_size)
            solver, lam, rho = self._kernel(m, gs, q, ids)
            weights.append(q)
            kernels.append(solver)
            lams.append(lam)
            rhos.append(rho)
        self.train_ids, self.one_minus_p, self._kernels = ids, weights, kernels
        self.train_features = features or None
        self.ridges, self.relative_ridges = lams, rhos
        return self

    def _kernel(self, m: int, gs: GradientStore, residuals: np.ndarray, ids: np.ndarray
                ) -> tuple[KernelSolver | None, float, float]:
        """Member m's kernel solver (kept in memory without a store; with one, saved there and read back on demand,
        reused while the features' model, data and configuration and the ridge rule are the same), its absolute
        ridge λ_m and relative ridge ρ_m."""
        name = f"trak-kernel-{m:03d}"
        meta = json.loads(json.dumps({"features": store_meta([gs]), "ridge": self.config.ridge,
                                      "train_ids": ids_digest(ids), "n": len(ids)}))
        if self.store is not None and self.store.has(name):
            info = self.store.info(name)["meta"]
            if {k: v for k, v in info.items() if k not in ("lambda", "relative")} == meta and "relative" in info:
                return None, info["lambda"], info["relative"]
        solver = KernelSolver.fit(_StoreRows(gs), self.config.ridge, residuals)
        if self.store is None:
            return solver, solver.ridge, solver.relative
        self.store.save_tensors(name, solver.tensors, meta={**meta, "lambda": solver.ridge,
                                                            "relative": solver.relative})  # replaces a stale one
        return None, solver.ridge, solver.relative

    def kernel(self, m: int) -> KernelSolver:
        """Member m's ``(Φ_mᵀΦ_m + λ_m I)⁻¹`` as a :class:`KernelSolver`."""
        self._require_fit()
        solver = self._kernels[m]
        if solver is None:
            solver = KernelSolver(self.store.load_tensors(f"trak-kernel-{m:03d}"), self.ridges[m])
        return solver

    def _require_fit(self) -> None:
        if self.train_ids is None:
            raise RuntimeError(f"call {type(self).__name__}.fit(train) before scoring")

    # -- score ---------------------------------------------------------------------------------------------------
    def _train_weights(self) -> list[np.ndarray]:
        """Per member, the factor multiplying its kernel scores (``1/M`` and Q as the average requires)."""
        if self.config.average == "per-model":
            return [q / self.n_models for q in self.one_minus_p]
        mean_q = sum(self.one_minus_p) / self.n_models
        return [mean_q / self.n_models] * self.n_models

    def score(self, queries: Data) -> Scores:
        """Scores ``(n_train, n_query)``: TRAK's τ; positive = the training example helps the query."""
        values, query_ids = self._fill(queries)
        return Scores(values, self.train_ids, query_ids, self.name, self._config())

    def _blocks(self, queries: Data) -> tuple[np.ndarray, Callable[[slice], np.ndarray], dict[str, Any] | None]:
        """Query ids, ``block(rows) -> (len(rows), n_query)`` float64 scores of those training rows, and the metadata
        naming the stored scores. The query side is prepared once, on the first call: queries featurized and solved
        once per member; the stores read in row blocks; products in float64."""
        self._require_fit()
        stores = self._stores()
        for m, gs in enumerate(stores):
            self._ready(m, gs)
            gs.check()
        query_ids = as_loader(queries, self.batch_size)[1]
        prepared: list[Tensor] = []  # per member (k, n_query) float64: (ΦᵀΦ + λI)⁻¹ φ_q
        weights = self._train_weights()

        def block(rows: slice) -> np.ndarray:
            if not prepared:
                for m, gs in enumerate(stores):
                    self._ready(m, gs)
                    phi_q = gs.query_features(queries)[1].double().cpu()
                    prepared.append(self.kernel(m).solve(phi_q.T.contiguous()))
            terms = [(gs, prepared[m].to(gs.device), weights[m]) for m, gs in enumerate(stores)]
            return store_products(terms, rows)

        meta = None if self.store is None else {
            "method": self.name, "config": asdict(self.config), "features": store_meta(stores),
            "train_ids": ids_digest(self.train_ids), "query_ids": ids_digest(query_ids),
            "queries_sha256": data_digest(queries), "relative_ridges": list(self.relative_ridges),
            "batch_size": self.batch_size}
        return query_ids, block, meta

    def self_scores(self) -> Scores:
        """TRAK's τ of each training example for itself, ``φ_iᵀ (ΦᵀΦ + λI)⁻¹ φ_i · (1 − p_i)`` averaged as in
        :meth:`score`, ``(n_train, 1)``."""
        self._require_fit()
        terms = [(gs, lambda f, m=m: self.kernel(m).solve(f.T.contiguous()).T, w)
                 for m, (gs, w) in enumerate(zip(self._stores(), self._train_weights(), strict=True))]
        values = store_self_products(terms)
        return Scores(values[:, None], self.train_ids, np.array([-1]), f"{self.name}:self", self._config())

    def _config(self) -> dict[str, Any]:
        out = {**asdict(self.config), "n_models": self.n_models, "ridges": list(self.ridges),
               "relative_ridges": list(self.relative_ridges)}
        if self.features is not None:  # the own route's stores are an implementation detail (maybe temporary)
            out["features"] = [{"root": str(gs.root), "projection": gs.projection.describe(), "dtype": gs.dtype,
                                "dim": gs.dim} for gs in self.features]
        return out


def _check_margin(task: Task) -> None:
    if isinstance(task, ClassificationTask) and task.kind != "margin":
        raise ValueError("TRAK needs the margin measurement: pass ClassificationTask(measurement='margin')")


def _one_minus_p(gs: GradientStore, train: Data, batch_size: int) -> np.ndarray:
    """``1 − p_i = sigmoid(measurement_i)`` of every training example on the store's model, ``(n_train,)`` float64:
    one forward pass, no backward (the measurement is a negated margin)."""
    _, it = batches(train, batch_size, gs.device, progress=False)
    out = []
    with eval_mode(gs.model), torch.no_grad():
        for batch in it:
            out.append(torch.sigmoid(gs.task.measurement(gs.model, batch.data).double()).cpu().numpy())
    return np.concatenate(out)


class _StoreRows:
    """A store's features as the ``(n, k)`` array :meth:`KernelSolver.fit` reads in row blocks (decoded rows)."""

    def __init__(self, gs: GradientStore):
        self.gs = gs
        self.shape = (len(gs.train_ids()), gs.dim)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        return self.gs.read_rows(start, stop).double().cpu().numpy()
