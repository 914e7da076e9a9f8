"""The peers' equivalents of our methods on the same model, data and queries: dattri (TRAK, TracIn, explicit and CG
influence), kronfluence (EK-FAC and KFAC influence) and traker (TRAK). Optional: ``make peers`` installs them; a
peer that is not installed is skipped with the reason, and one that fails is reported with its error by the runner.

Every peer's matrix is turned into our ``Scores`` ``(n_train, n_query)`` with our sign (positive = the training
example helps the query). How each sign was established — derived from the peer's code, then checked on digits-lr
by the mean per-query Pearson correlation with our method of the same definition (the bench prints it as "r vs ours"
in every run, so a flipped sign would show as r ≈ −1):

* dattri IF (explicit, CG) returns ``g_trainᵀ (H + λI)⁻¹ g_test`` — the negation of Koh & Liang's ``I_up,loss``,
  i.e. already "positive = helps", with ``H`` the Hessian of the mean training loss, as ours. Used as is;
  r = +1.0000 with influence-explicit / influence-cg at the same damping.
* dattri TracIn returns ``Σ_k η_k g_train(θ_k)ᵀ g_test(θ_k)`` (positive = a step on the training example lowers the
  test loss): used as is; r = +1.0000 with our exact TracIn (dattri with its ``"identity"`` projection).
* dattri TRAK and traker return TRAK's τ (gradients of the margin on both sides, times 1 − p): positive = raises the
  query's margin = helps; used as is. r = +0.92 (dattri) and +0.27 (traker) with our TRAK: both positive, the gaps
  come from other projections and, for traker, its float32 inverse of a nearly singular kernel with no ridge.
* kronfluence returns ``∇f_qᵀ (H + λI)⁻¹ ∇ℓ_i`` with no minus sign (upweighting i moves θ by ``−H⁻¹∇ℓ_i``, so a
  positive score lowers the query loss = helps), shaped ``(n_query, n_train)``: transposed, sign kept;
  r = +0.99 with our EK-FAC / KFAC at the same damping heuristic.
* dattri-llm (TracIn = Grad-Dot at one checkpoint, K-FAC, EK-FAC) and EleutherAI bergson (EK-FAC pipeline; projected
  Grad-Dot) are language-model peers, in :mod:`benchmarks.bench.peers_lm` with their signs: used as is (positive =
  helps). On text-gpt (quick): r = 1.000 dattri-llm TracIn vs grad-dot, 0.98 K-FAC and EK-FAC; bergson needs a
  Hugging Face model and is skipped there (``benchmarks/peers_lm.py`` runs it on a GPT-2).

Peers write their caches under the method's scratch directory, emptied before each run, so no peer is timed on a
warm cache. dattri's IF attributors sum ``(H_b + λI)⁻¹ v`` over the batches of the loader given to ``cache``, so it
gets the whole training set as one batch (the correct inverse of the full Hessian); ``attribute`` gets batches as
large as memory allows, since dattri solves again for every training batch.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from datacredit.scores import Scores

from .cases import Case
from .methods import (
    BATCH,
    CG_ITERS,
    CG_TOL,
    EXACT_DAMPING,
    Context,
    MethodSpec,
    classification_only,
    register,
    small_only,
)

__all__ = ["INSTALL", "installed"]

DATTRI_BUDGET = 4 * 2**30
INSTALL = ("pip install --no-deps dattri kronfluence && "
           "pip install traker einops einconv opt-einsum pyyaml accelerate (see `make peers`)")


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _needs(package: str, also: Callable[[Case], str | None] | None = None) -> Callable[[Case], str | None]:
    def skip(case: Case) -> str | None:
        if not installed(package):
            return f"{package} is not installed ({INSTALL})"
        return also(case) if also is not None else None

    return skip


def _scores(values: Any, ctx: Context, name: str, transpose: bool = False) -> Scores:
    arr = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    arr = np.array(arr.T if transpose else arr, dtype=np.float64)
    return Scores(arr, ctx.train.ids, ctx.queries.ids, name)


def _scratch(ctx: Context, name: str) -> str:
    path = ctx.workdir / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return str(path)


def _lm(ctx: Context) -> bool:
    return not ctx.case.spec.classification


# -- dattri ---------------------------------------------------------------------------------------------------------
def _batched_loss(model: nn.Module, lm: bool) -> Callable:
    """dattri loss ``f(params, data)`` on a batch: mean cross-entropy (per token for the LM, equal lengths)."""

    def loss(params, data):
        if lm:
            tokens = data[0]
            logits = torch.func.functional_call(model, params, (tokens[:, :-1],))
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        x, y = data
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return loss


def _single(fn: Callable) -> Callable:
    """The same function on ONE example without its batch dimension (dattri's TracIn / TRAK vmap over dim 0)."""
    return lambda params, data: fn(params, tuple(t.unsqueeze(0) for t in data))


def _dattri_task(model: nn.Module, loss: Callable, checkpoints: Any) -> Any:
    from dattri.task import AttributionTask

    return AttributionTask(loss_func=loss, model=model, checkpoints=checkpoints)


def _dattri_if(kind: str) -> Callable[[Context], Scores]:
    def run(ctx: Context) -> Scores:
        from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorExplicit

        model = ctx.model()
        task = _dattri_task(model, _batched_loss(model, _lm(ctx)), model.state_dict())
        if kind == "explicit":
            attributor = IFAttributorExplicit(task, regularization=EXACT_DAMPING)
        else:
            attributor = IFAttributorCG(task, regularization=EXACT_DAMPING, max_iter=CG_ITERS, tol=CG_TOL)
        whole = DataLoader(ctx.train, batch_size=len(ctx.train))
        attributor.cache(whole)  # the Hessian: the whole training set as one batch
        train = DataLoader(ctx.train, batch_size=_dattri_train_batch(model, len(ctx.train)))
        values = attributor.attribute(train, DataLoader(ctx.queries, batch_size=len(ctx.queries)))
        return _scores(values, ctx, f"dattri-if-{kind}")

    return run


def _dattri_train_batch(model: nn.Module, n_train: int) -> int:
    """Training examples per ``attribute`` batch: as many as fit :data:`DATTRI_BUDGET` bytes at the ~64 bytes per
    example and parameter that one batch took here (fmnist-mlp, 5,000 × 50,890 in one batch: killed at 16.6 GB).
    dattri re-solves the inverse-Hessian products of the queries for every such batch, so fewer is faster."""
    per_example = 64 * sum(p.numel() for p in model.parameters())
    return max(1, min(n_train, DATTRI_BUDGET // per_example))


def _dattri_tracin(ctx: Context) -> Scores:
    from dattri.algorithm.tracin import TracInAttributor

    from datacredit.trajectory import Trajectory

    traj = Trajectory.load(ctx.trajectory)
    model = ctx.model()
    task = _dattri_task(model, _single(_batched_loss(model, _lm(ctx))),
                        [traj.state_dict(k) for k in range(len(traj))])
    attributor = TracInAttributor(task, weight_list=torch.tensor(traj.lrs), normalized_grad=False,
                                  projector_kwargs={"proj_type": "identity", "proj_dim": 512,  # dim unused by identity
                                                    "proj_seed": 0, "proj_max_batch_size": 32, "device": "cpu"})
    values = attributor.attribute(DataLoader(ctx.train, batch_size=BATCH), DataLoader(ctx.queries, batch_size=BATCH))
    return _scores(values, ctx, "dattri-tracin")


def _margin_and_probability(model: nn.Module) -> tuple[Callable, Callable]:
    def margin(params, data):  # TRAK's f = log(p / (1 - p)) of the correct class, one example
        x, y = data
        logp = -F.cross_entropy(torch.func.functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))
        return logp - torch.log1p(-torch.exp(logp))

    def probability(params, data):
        x, y = data
        return torch.exp(-F.cross_entropy(torch.func.functional_call(model, params, (x.unsqueeze(0),)),
                                          y.unsqueeze(0)))

    return margin, probability


def _dattri_trak(ctx: Context) -> Scores:
    from dattri.algorithm.trak import TRAKAttributor

    model = ctx.model()
    margin, probability = _margin_and_probability(model)
    task = _dattri_task(model, margin, model.state_dict())
    attributor = TRAKAttributor(task, correct_probability_func=probability, device="cpu",
                                projector_kwargs={"proj_dim": ctx.case.spec.trak_dim, "proj_type": "normal",
                                                  "proj_seed": 0, "proj_max_batch_size": 32, "device": "cpu"})
    attributor.cache(DataLoader(ctx.train, batch_size=BATCH))
    return _scores(attributor.attribute(DataLoader(ctx.queries, batch_size=BATCH)), ctx, "dattri-trak")


# -- kronfluence ----------------------------------------------------------------------------------------------------
def _kronfluence_task(lm: bool) -> Any:
    from kronfluence.task import Task as KTask

    class BenchTask(KTask):
        """Sums over the batch of our per-example losses (kronfluence's convention); ``sample`` draws labels from
        the model for the true Fisher (unused here: the bench fits the empirical Fisher, as our default)."""

        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            logits, targets = _logits_targets(batch, model, lm)
            if sample:
                with torch.no_grad():
                    probs = F.softmax(logits.detach().reshape(-1, logits.shape[-1]), -1)
                    targets = torch.multinomial(probs, 1).reshape(targets.shape)
            return _per_example(logits, targets, lm).sum()

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            logits, targets = _logits_targets(batch, model, lm)
            return _per_example(logits, targets, lm).sum()

    return BenchTask()


def _logits_targets(batch: Any, model: nn.Module, lm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if lm:
        tokens = batch[0]
        return model(tokens[:, :-1]), tokens[:, 1:]
    return model(batch[0]), batch[1]


def _per_example(logits: torch.Tensor, targets: torch.Tensor, lm: bool) -> torch.Tensor:
    if not lm:
        return F.cross_entropy(logits, targets, reduction="none")
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return per_token.reshape(targets.shape).mean(1)


def _kronfluence(strategy: str) -> Callable[[Context], Scores]:
    def run(ctx: Context) -> Scores:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments

        task = _kronfluence_task(_lm(ctx))
        model = prepare_model(ctx.model(), task)  # wraps modules in place: a private copy
        analyzer = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, log_level=logging.WARNING,
                            output_dir=_scratch(ctx, f"kronfluence-{strategy}"))
        analyzer.fit_all_factors("factors", ctx.train, per_device_batch_size=BATCH, overwrite_output_dir=True,
                                 factor_args=FactorArguments(strategy=strategy, use_empirical_fisher=True))
        analyzer.compute_pairwise_scores("scores", "factors", ctx.queries, ctx.train,
                                         per_device_query_batch_size=len(ctx.queries),
                                         per_device_train_batch_size=BATCH, overwrite_output_dir=True,
                                         score_args=ScoreArguments(damping_factor=None))
        values = analyzer.load_pairwise_scores("scores")["all_modules"]  # (n_query, n_train)
        return _scores(values, ctx, f"kronfluence-{strategy}", transpose=True)

    return run


# -- traker ---------------------------------------------------------------------------------------------------------
def _traker(ctx: Context) -> Scores:
    from trak import TRAKer

    model = ctx.model()
    traker = TRAKer(model=model, task="image_classification", train_set_size=len(ctx.train),
                    save_dir=_scratch(ctx, "traker"), device="cpu", proj_dim=ctx.case.spec.trak_dim,
                    use_half_precision=False, logging_level=logging.WARNING)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    traker.load_checkpoint(state, model_id=0)
    x, y = ctx.train.tensors
    for start in range(0, len(x), BATCH):
        traker.featurize(batch=[x[start : start + BATCH], y[start : start + BATCH]],
                         num_samples=len(x[start : start + BATCH]))
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="queries", checkpoint=state, model_id=0, num_targets=len(ctx.queries))
    qx, qy = ctx.queries.tensors
    traker.score(batch=[qx, qy], num_samples=len(qx))
    return _scores(traker.finalize_scores(exp_name="queries"), ctx, "traker")


def _importer(*modules: str) -> Callable[[], None]:
    def prepare() -> None:
        for module in modules:
            importlib.import_module(module)

    return prepare


def _register_peers() -> None:
    dattri = _importer("dattri.task", "dattri.algorithm.influence_function", "dattri.algorithm.tracin",
                       "dattri.algorithm.trak", "torch.func")
    kronfluence = _importer("kronfluence.analyzer", "kronfluence.arguments", "kronfluence.task")
    traker = _importer("trak")
    specs = [
        MethodSpec("dattri-if-explicit", _dattri_if("explicit"), "dattri", "influence-explicit",
                   _needs("dattri", small_only), prepare=dattri),
        MethodSpec("dattri-if-cg", _dattri_if("cg"), "dattri", "influence-cg", _needs("dattri"), prepare=dattri),
        MethodSpec("dattri-tracin", _dattri_tracin, "dattri", "tracin", _needs("dattri"), prepare=dattri),
        MethodSpec("dattri-trak", _dattri_trak, "dattri", "trak", _needs("dattri", classification_only),
                   prepare=dattri),
        MethodSpec("kronfluence-ekfac", _kronfluence("ekfac"), "kronfluence", "influence-ekfac",
                   _needs("kronfluence"), prepare=kronfluence),
        MethodSpec("kronfluence-kfac", _kronfluence("kfac"), "kronfluence", "influence-kfac", _needs("kronfluence"),
                   prepare=kronfluence),
        MethodSpec("traker", _traker, "traker", "trak", _needs("trak", classification_only), prepare=traker),
    ]
    for spec in specs:
        register(spec)


_register_peers()

from . import peers_lm  # noqa: E402,F401  (registers the language-model peers: dattri-llm, bergson)
