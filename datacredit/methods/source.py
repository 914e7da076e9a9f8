"""SOURCE: approximate unrolled differentiation (Bae, Lin, Lorraine, Grosse 2024), segment-wise with EK-FAC.

The run is split into segments ℓ = 1..L (runs of consecutive checkpoints of a
:class:`~datacredit.trajectory.Trajectory`).
Segment ℓ takes ``K_ℓ`` steps at learning rates η (``η_ℓK_ℓ`` = the sum of its steps' learning rates, divided by
``1 − β`` under SGD momentum β), has an averaged curvature ``H̄_ℓ`` (fitted over its checkpoints, eigenvalues λ) and
averaged training gradients ``ḡ_ℓ(z)``. With the training loss a mean over the stage's N examples (paper, Eq. 13):

    τ(z, q) = (1/N) Σ_ℓ  ∇f_q(θ_T)ᵀ [ Π_{ℓ'>ℓ} exp(−η_ℓ'K_ℓ' H̄_ℓ') ] · (I − exp(−η_ℓK_ℓ H̄_ℓ)) H̄_ℓ⁻¹ · ḡ_ℓ(z)

Sign: τ = −d f_q(θ_T)/dε_z for the objective (1/N) Σ_i (1 + ε_i) ℓ_i, so a positive score means up-weighting z lowers
the query measurement (z helps q), as everywhere in datacredit.

Computed query side first: ``∇f_q`` (factored, as captured) is rotated into the last segment's eigenbasis and
propagated backwards through the segments there (``exp(−ηKλ)`` per eigenvalue, one change of basis between
segments), picking up ``(1 − e^{−ηKλ})/λ`` at each segment (:meth:`Source._weights_backwards`); each segment's
weights are multiplied with its training gradients summed over its checkpoints
(:class:`~datacredit.methods.piece_sums.PieceSum`: factored where one factor is the same at every checkpoint, as a
first layer's input, else materialized) by :class:`~datacredit.methods.prepared.PreparedQueries` (zero-skipping, GEMM
or val-first by cost). ``score`` holds one segment's weights at a time. Cost ≈ (number of checkpoints) × the training
passes of EK-FAC influence plus one product with the queries per segment.

``time="discrete"`` replaces the gradient-flow factors by the exact ones of the recorded gradient-descent steps,
``Π_c (1 − η_c λ)^{n_c}`` and ``Σ_c [(1 − (1 − η_c λ)^{n_c})/λ] Π_{c'>c} (1 − η_{c'} λ)^{n_{c'}}``; with stationary
gradients and exact curvature this equals unrolled differentiation exactly (the tests' twin).

Multi-stage pipelines (pretrain → fine-tune) are stages, each a trajectory with its own training data; scores are
given for the examples of every stage, and a query is propagated back through all later segments, of any stage.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..capture import Capture, ExampleGrads, example_grads
from ..curvature import Curvature, curvature_names, make_curvature
from ..curvature.factored import _BlockCurvature
from ..errors import DataError
from ..scores import Scores
from ..task import Task
from ..trajectory import Trajectory
from .base import (
    Data,
    GradientMethod,
    TopK,
    TopKAccumulator,
    as_loader,
    batches,
    configure,
    eval_mode,
    nbytes,
    row_subset,
)
from .piece_sums import PieceSum
from .prepared import (
    PreparedQueries,
    deferred,
    from_eigenbasis,
    query_names,
    query_positions,
    rotated_queries,
    to_columns,
    views,
)


@dataclass
class _Segment:
    stage: int
    trajectory: Trajectory  # its checkpoints
    intervals: list[tuple[float, int]]  # (effective lr η/(1−β), steps) per checkpoint interval
    curvature: Curvature | None = None

    @property
    def eta_k(self) -> float:
        return sum(lr * n for lr, n in self.intervals)


TIMES = ("continuous", "discrete")


@dataclass(frozen=True)
class SourceConfig:
    """segments: L, the segments of a single trajectory (default 3, the paper's; with ``stages=`` each stage gives its
    own). curvature: an eigen-based curvature name (``"ekfac"``, ``"kfac"``, ``"diagonal"``, ``"explicit"``,
    ``"identity"``). time: ``"continuous"`` (the paper) or ``"discrete"``."""

    segments: int = 3
    curvature: str = "ekfac"
    time: str = "continuous"

    def __post_init__(self) -> None:
        if self.segments < 1:
            raise ValueError(f"segments must be positive, got {self.segments}")
        if self.curvature not in curvature_names():
            raise ValueError(f"unknown curvature {self.curvature!r}; choose one of {curvature_names()}")
        if self.time not in TIMES:
            raise ValueError(f"time must be 'continuous' or 'discrete', got {self.time!r}")


def _intervals(traj: Trajectory) -> list[tuple[float, int]]:
    out = []
    for c in traj:
        if c.steps and (c.lr_sum is None and c.lr is None):
            raise DataError(f"checkpoint at step {c.step} has no learning rate; SOURCE needs η·K per segment")
        lr_sum = c.lr_sum if c.lr_sum is not None else (c.lr or 0.0) * c.steps
        beta = c.momentum or 0.0
        out.append(((lr_sum / c.steps if c.steps else 0.0) / (1.0 - beta), int(c.steps)))
    return out


def _propagator(seg: _Segment, time: str) -> Callable[[Tensor], Tensor]:
    """λ ↦ the factor that carries a perturbation through the whole segment."""
    if time == "continuous":
        return lambda lam: torch.exp(-seg.eta_k * lam)

    def fn(lam: Tensor) -> Tensor:
        out = torch.ones_like(lam)
        for lr, n in seg.intervals:
            out = out * (1 - lr * lam) ** n
        return out

    return fn


def _accumulator(seg: _Segment, time: str) -> Callable[[Tensor], Tensor]:
    """λ ↦ Σ_k η_k Π_{j>k} (propagation), the response of θ at the segment's end to a constant gradient in it;
    ``(1 − e^{−ηKλ})/λ`` in continuous time, → ηK as λ → 0."""
    small = 1e-12

    def safe_div(num: Tensor, lam: Tensor, limit: Tensor | float) -> Tensor:
        tiny = lam.abs() < small
        return torch.where(tiny, limit if isinstance(limit, Tensor) else torch.full_like(lam, limit),
                           num / torch.where(tiny, torch.ones_like(lam), lam))

    if time == "continuous":
        return lambda lam: safe_div(-torch.expm1(-seg.eta_k * lam), lam, seg.eta_k)

    def fn(lam: Tensor) -> Tensor:
        total = torch.zeros_like(lam)
        for lr, n in seg.intervals:  # each interval: total ← total·(1−ηλ)^n + (1 − (1−ηλ)^n)/λ
            decay = (1 - lr * lam) ** n
            total = total * decay + safe_div(1 - decay, lam, lr * n)
        return total

    return fn


# Entries of the per-block sums of training gradients over a segment's checkpoints (rows × tracked parameters):
# 2**25 is 128 MB in float32, the memory score adds on top of the queries' segment weights.
SUM_ELEMENTS = 2**25


class Source(GradientMethod):
    """SOURCE attribution. ``Source(model, task, trajectory, segments=3).fit(train).score(queries) -> Scores``.

    trajectory: the run's checkpoints (a :class:`Trajectory` or its directory); several stages: pass
    ``stages=[(traj_pretrain, L1), (traj_finetune, L2)]`` and ``fit([pretrain_data, finetune_data])``.
    segments: L (default 3, the paper's; 6 checkpoints give 2 per segment). curvature: any eigen-based curvature name
    (``"ekfac"`` default, ``"kfac"``, ``"diagonal"``, ``"explicit"``). time: ``"continuous"`` (the paper) or
    ``"discrete"``. config: a :class:`SourceConfig`, or its fields as keywords (not both). The ``model`` is the
    final model θ_T; it is never modified (a private copy loads checkpoints).
    """

    name = "source"

    def __init__(self, model: nn.Module, task: Task, trajectory: Trajectory | str | None = None, *,
                 config: SourceConfig | None = None, stages: Sequence[tuple[Trajectory | str, int]] | None = None,
                 batch_size: int = 64, progress: bool = True, **settings: Any):
        if (trajectory is None) == (stages is None):
            raise ValueError("give either a trajectory (with segments) or stages=[(trajectory, segments), ...]")
        self.config = config = configure(SourceConfig, config, settings)
        self.final = model
        super().__init__(copy.deepcopy(model), task, batch_size=batch_size, progress=progress)
        stages = [(trajectory, config.segments)] if stages is None else list(stages)
        self.segments: list[_Segment] = []
        for k, (traj, n) in enumerate(stages):
            traj = traj if isinstance(traj, Trajectory) else Trajectory.load(traj)
            for part in traj.segments(n):
                self.segments.append(_Segment(k, part, _intervals(part)))
        self.n_stages = len(stages)
        self.curvature_name, self.time = config.curvature, config.time
        self._train: list[Data] | None = None
        self.train_ids: np.ndarray | None = None

    # -- fit -----------------------------------------------------------------------------------------------------
    def _load(self, traj: Trajectory, k: int) -> None:
        traj.load_into(self.model, k)

    def _checkpoint_grads(self, seg: _Segment, data: Data, desc: str) -> Iterator:
        """Per-example training gradients at every checkpoint of ``seg`` in turn (what the curvature averages)."""
        for k in range(len(seg.trajectory)):
            self._load(seg.trajectory, k)
            _, it = self.grads(data, desc=desc)
            for _, g in it:
                yield g

    def _checkpoint_batches(self, seg: _Segment, data: Data) -> Iterator:
        """Raw batches at every checkpoint (for curvatures that compute from the model, e.g. the explicit Hessian)."""
        for k in range(len(seg.trajectory)):
            self._load(seg.trajectory, k)
            _, it = batches(data, self.batch_size, self.device, progress=False)
            for batch in it:
                yield batch.data

    def cache_bytes(self) -> int:
        """Bytes of the training ids (all stages, and per stage) and every segment's fitted curvature."""
        curvatures = sum(seg.curvature.nbytes() for seg in self.segments if seg.curvature is not None)
        return nbytes(self.train_ids, getattr(self, "_stage_ids", None)) + curvatures

    def fit(self, train: Data | Sequence[Data]) -> Source:
        """Fit each segment's curvature over its checkpoints (averaged) on its stage's training data."""
        data = list(train) if isinstance(train, (list, tuple)) else [train]
        if len(data) != self.n_stages:
            raise DataError(f"{self.n_stages} stage(s) but {len(data)} training set(s)")
        ids = [batches(d, self.batch_size, self.device, progress=False)[0] for d in data]
        all_ids = np.concatenate(ids)
        if len(np.unique(all_ids)) != len(all_ids):
            raise DataError("training ids must be unique across stages (give each stage's examples distinct ids)")
        self._train, self._stage_ids, self.train_ids = data, ids, all_ids
        names = [n for n, p in self.model.named_parameters() if p.requires_grad and n in self._tracked_names()]
        with eval_mode(self.model):
            for ell, seg in enumerate(self.segments):
                curv = make_curvature(self.curvature_name)
                if curv.source == "data":
                    curv.bind(self.model, self.task.loss, names)
                seg.curvature = curv.fit(self._stream(curv, seg, data[seg.stage], ell), progress=self.progress)
        return self

    def _stream(self, curv: Curvature, seg: _Segment, data: Data, ell: int) -> Callable[[], Iterator]:
        """A fresh iterator per curvature pass over all of the segment's checkpoints (the average)."""
        if curv.source == "data":
            return lambda: self._checkpoint_batches(seg, data)
        return lambda: self._checkpoint_grads(seg, data, f"source segment {ell + 1}")

    def _tracked_names(self) -> set[str]:
        cap = Capture(self.model, self.modules)
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)] for module, _ in cap.tracked.values() for p in module.parameters(recurse=False)
                if p.requires_grad}

    # -- score ---------------------------------------------------------------------------------------------------
    def _query_vectors(self, queries: Data) -> tuple[np.ndarray, dict[str, Tensor]]:
        """``∇f_q(θ_T)`` per tracked parameter, ``(Q, *shape)``, at the final model."""
        ids, grads = self._query_grads(queries)
        return ids, _materialized(grads)

    def _query_grads(self, queries: Data) -> tuple[np.ndarray, list[ExampleGrads]]:
        """The queries' factored measurement gradients at the final model, one :class:`ExampleGrads` per batch."""
        self.model.load_state_dict(self.final.state_dict())
        ids, it = self.grads(queries, measurement=True, desc="source queries")
        return ids, [g for _, g in it]

    def _weights_backwards(self, grads: list[ExampleGrads]) -> Iterator[tuple[int, PreparedQueries]]:
        """``(ℓ, u_ℓ)`` for every segment from the last to the first: the segment's query weights ``u_ℓ =
        A(ℓ) [Π_{ℓ'>ℓ} P(ℓ')] ∇f_q`` (:meth:`_segment_weights`) prepared for scoring, for the queries of ``grads``.

        With eigenbasis curvatures (diagonal, KFAC, EK-FAC) the chain runs in the eigenbases, queries last
        (``(m, n, Q)``, every rotation one GEMM): the factored query gradients rotated into the last segment's basis
        (:meth:`EigenBlock.rotate_pieces`), each segment's factors applied there, ``u_ℓ`` rotated back once (its
        ``Q_v`` left to the training side where cheaper), and the propagated part carried into the previous segment's
        basis by one change of basis (:meth:`EigenBlock.change_basis`, half the work of unrotating and rotating
        again) after the consumer is done with ``u_ℓ``: memory one ``u_ℓ`` and the carried queries. Other curvatures:
        :meth:`_segment_weights` on the materialized query gradients. Same numbers to rounding (the tests' twin)."""
        if not all(isinstance(seg.curvature, _BlockCurvature) for seg in self.segments):
            weights = self._segment_weights(_materialized(grads))
            for ell in range(len(self.segments) - 1, -1, -1):
                yield ell, PreparedQueries.from_weights(weights[ell], views(grads))
            return
        dtype = grads[0].flat_dtype
        n_query = sum(g.n for g in grads)
        names = query_names(self.segments[-1].curvature.blocks, grads)
        carried: dict[str, Tensor] = {}  # (m, n, Q) in the eigenbasis of the segment at hand
        for ell in range(len(self.segments) - 1, -1, -1):
            seg = self.segments[ell]
            n_train = len(self._stage_ids[seg.stage])
            weights = {}
            for name in names:
                block = seg.curvature.blocks[name]
                work = torch.promote_types(dtype, block.eigenvalues.dtype)
                if name not in carried:
                    carried[name] = to_columns(rotated_queries(block, grads, name, work))
                lam = block.eigenvalues.to(carried[name].device, work)[..., None]
                length = query_positions(grads, name)
                defer = block.q_v is not None and length > 0 and deferred(n_train * length, n_query * block.m)
                weights[name] = from_eigenbasis(block, _accumulator(seg, self.time)(lam) * carried[name], defer, dtype)
            yield ell, PreparedQueries(weights)
            del weights
            for name in names:
                if ell == 0:
                    del carried[name]
                    continue
                block = seg.curvature.blocks[name]
                lam = block.eigenvalues.to(carried[name].device, carried[name].dtype)[..., None]
                x = carried.pop(name).mul_(_propagator(seg, self.time)(lam))
                carried[name] = block.change_basis(x, self.segments[ell - 1].curvature.blocks[name])
                del x

    def _segment_weights(self, v: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """``u_ℓ = A(ℓ) [Π_{ℓ'>ℓ} P(ℓ')] v`` for every segment, latest first then reversed to segment order."""
        out: list[dict[str, Tensor]] = [{} for _ in self.segments]
        for ell in range(len(self.segments) - 1, -1, -1):
            seg = self.segments[ell]
            if ell == 0:  # nothing earlier to propagate to
                out[ell] = seg.curvature.apply_function(v, _accumulator(seg, self.time))
                break
            # one rotation into the segment's eigenbasis serves both functions
            out[ell], v = seg.curvature.apply_functions(v, [_accumulator(seg, self.time), _propagator(seg, self.time)])
        return out

    def _require_fit(self) -> None:
        if self.train_ids is None:
            raise RuntimeError("call Source.fit(train) before scoring")

    def score(self, queries: Data) -> Scores:
        """``(n_train, n_query)`` scores τ(z, q); rows are the stages' examples in order. Positive = helps.

        Segments outermost, from the last: one segment's query weights in memory at a time, each added into the
        matrix block by block (the same row blocks and summation order as :meth:`topk`, so the same numbers)."""
        self._require_fit()
        query_ids = as_loader(queries, self.batch_size)[1]
        values = np.zeros((len(self.train_ids), len(query_ids)))
        offsets = np.cumsum([0] + [len(i) for i in self._stage_ids])
        with eval_mode(self.model):
            _, grads = self._query_grads(queries)
            for ell, prep in self._weights_backwards(grads):
                seg = self.segments[ell]
                n_stage = len(self._stage_ids[seg.stage])
                for rows in self._row_blocks(n_stage, prep):
                    part = self._segment_block(seg, prep, row_subset(self._train[seg.stage], rows, n_stage))
                    values[offsets[seg.stage] + rows.start : offsets[seg.stage] + rows.stop] += (
                        part / (len(seg.trajectory) * n_stage))
                del prep
        return Scores(values, self.train_ids, query_ids, self.name, self._config())

    def topk(self, queries: Data, k: int, *, largest: bool = True) -> TopK:
        """The ``k`` strongest training examples per query without the ``(n_train, n_query)`` matrix: the same row
        blocks as :meth:`score`, merged as they come (memory: one block of scores plus ``(k, n_query)``)."""
        query_ids, blocks = self._score_blocks(queries)
        acc = TopKAccumulator(k, len(query_ids), largest)
        for rows, part in blocks:
            acc.add(rows, slice(None), part)
        return acc.result(self.train_ids, query_ids, self.name)

    def _config(self) -> dict:
        """The config, with what the trajectory fixed: checkpoints per segment, η·K per segment, stages."""
        return {**asdict(self.config), "segments": [len(s.trajectory) for s in self.segments],
                "curvature": self.curvature_name, "time": self.time, "eta_k": [s.eta_k for s in self.segments],
                "stages": self.n_stages}

    def _score_blocks(self, queries: Data) -> tuple[np.ndarray, Iterator[tuple[slice, np.ndarray]]]:
        """Query ids and an iterator of ``(rows, (len(rows), n_query) scores)`` over blocks of training rows (global
        rows: the stages' examples in order), each summed over all segments of its stage."""
        self._require_fit()
        query_ids = as_loader(queries, self.batch_size)[1]

        def gen() -> Iterator[tuple[slice, np.ndarray]]:
            with eval_mode(self.model):
                _, grads = self._query_grads(queries)
                prepared: list[PreparedQueries | None] = [None] * len(self.segments)
                for ell, prep in self._weights_backwards(grads):
                    prepared[ell] = prep
                del prep
                offsets = np.cumsum([0] + [len(i) for i in self._stage_ids])
                for stage, data in enumerate(self._train):
                    n_stage = len(self._stage_ids[stage])
                    segs = [(seg, p) for seg, p in zip(self.segments, prepared) if seg.stage == stage][::-1]
                    if not segs:
                        continue
                    for rows in self._row_blocks(n_stage, segs[0][1]):
                        subset = row_subset(data, rows, n_stage)
                        total = np.zeros((rows.stop - rows.start, len(query_ids)))
                        for seg, prep in segs:  # the last segment first, as score adds them
                            # checkpoint average, 1/N of the mean loss
                            total += self._segment_block(seg, prep, subset) / (len(seg.trajectory) * n_stage)
                        yield slice(offsets[stage] + rows.start, offsets[stage] + rows.stop), total

        return query_ids, gen()

    def _row_blocks(self, n: int, prep: PreparedQueries) -> list[slice]:
        """Training rows per block: were every sum over checkpoints materialized, a block's ``rows × D`` entries stay
        under SUM_ELEMENTS."""
        width = sum(p.w.shape[0] * p.w.shape[1] for p in prep.weights.values())
        step = max(self.batch_size, SUM_ELEMENTS // max(width, 1) // self.batch_size * self.batch_size)
        return [slice(s, min(n, s + step)) for s in range(0, n, step)]

    def _segment_block(self, seg: _Segment, prep: PreparedQueries, data: Data) -> np.ndarray:
        """``Σ_k ⟨g_i(θ_k), u_q⟩`` over the segment's checkpoints k for the examples of ``data``, ``(n, Q)``.

        The segment's query weights are the same at all its checkpoints, so each example's gradient is summed over
        the checkpoints first (:class:`~datacredit.methods.piece_sums.PieceSum`: factored while one factor is the same
        at every checkpoint, as a first layer's input; else materialized, ``G += Σ_t u_t v_tᵀ``) and multiplied with
        the queries once per segment, not once per checkpoint.
        """
        n = len(as_loader(data, self.batch_size)[1])
        sums: dict[tuple[int, str, int], tuple[slice, PieceSum]] = {}
        for k in range(len(seg.trajectory)):
            self._load(seg.trajectory, k)
            _, it = self.grads(data, desc="source score")
            for batch, g in it:
                for name, pieces in g.pieces.items():
                    if name not in prep.weights:
                        continue
                    for j, piece in enumerate(pieces):
                        key = (batch.rows.start, name, j)
                        if key not in sums:
                            sums[key] = (batch.rows, PieceSum(prep.weights[name].r))
                        sums[key][1].add(piece)
        out = np.zeros((n, prep.weights[next(iter(prep.weights))].n_query))
        for (_, name, _), (rows, total) in sums.items():
            out[rows] += total.scores(prep.weights[name]).detach().cpu().double().numpy()
        return out

    def self_scores(self) -> Scores:
        """τ(z, z) per training example, ``(n_train, 1)``: each example's own gradient at θ_T as the query."""
        self._require_fit()
        out = []
        with eval_mode(self.model):
            for stage, data in enumerate(self._train):
                n_stage = len(self._stage_ids[stage])
                self.model.load_state_dict(self.final.state_dict())
                _, it = self.grads(data, measurement=True, desc="source self")
                queries = [(b, g.materialize()) for b, g in it]
                for batch, v in queries:
                    total = torch.zeros(batch.rows.stop - batch.rows.start, dtype=torch.float64)
                    for seg, u in zip(self.segments, self._segment_weights(v)):
                        if seg.stage != stage:
                            continue
                        for k in range(len(seg.trajectory)):
                            self._load(seg.trajectory, k)
                            with Capture(self.model, self.modules) as cap:
                                g = example_grads(cap, self.task.loss(self.model, batch.data), batch.ids)
                            total += g.dot(u).diagonal().detach().cpu().double() / (len(seg.trajectory) * n_stage)
                    out.append(total.numpy())
        return Scores(np.concatenate(out)[:, None], self.train_ids, np.array([-1]), "source:self",
                      {"curvature": self.curvature_name, "time": self.time})


def _materialized(grads: list[ExampleGrads]) -> dict[str, Tensor]:
    """Per-parameter gradients ``(Q, *shape)`` of the batches of ``grads`` in order."""
    parts = [g.materialize() for g in grads]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def effective_horizon(trajectory: Trajectory) -> float:
    """Σ η/(1−β) over all recorded steps: SOURCE's ``ηK`` of a single segment spanning the run."""
    return math.fsum(lr * n for lr, n in _intervals(trajectory))
