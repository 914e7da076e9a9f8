"""Language-model peers: dattri-llm (TRAIS Lab, 0.1.0) and EleutherAI bergson (2.5.1), on the same model, tokens
and parameters as ours. ``make peers`` installs both; a peer that is not installed is skipped with the reason.

Both take token windows ``(n, T + 1)`` and the summed next-token cross-entropy of the first ``T`` predictions of a
window, as our :class:`~datacredit.task.LanguageModelingTask` does. Every matrix is returned as ``(n_train, n_query)``
float64 with our sign (positive = the training example helps the query). How each sign and scale was established
(derived from the peer's code, then checked by the per-query Pearson correlation with our method of the same
definition, in ``tests/test_bench_peers_lm.py`` and every bench run):

* dattri-llm ``TracInAttributor`` at one checkpoint returns ``g_trainᵀ g_test`` (Grad-Dot): used as is; equal to our
  exact Grad-Dot to float32 rounding (relative error 6e-7 on a GPT-2 from a config). ``KFACAttributor`` /
  ``EKFACAttributor`` return ``g_trainᵀ F⁻¹ g_test`` with the empirical Fisher of the training gradients, i.e.
  ``positive = helps``; used as is, with ``damping=0.1, relative_damping=True`` (0.1 × the mean eigenvalue of each
  factor / corrected spectrum: our default heuristic).
  **Trap:** a hooked layer's per-example gradient includes its bias whether or not the bias requires grad (a GPT-2
  with frozen biases gave r = 0.54–0.99 per layer against the weight-only gradient). The adapter passes
  ``module_kwargs={layer: {"has_bias": False}}`` for every layer whose bias we do not attribute, after which the
  scores are exact.
  Rows and columns come back keyed by a content hash of the model's inputs; the adapter maps them back to dataset
  order through ``hash_sample``, reading the per-row matrix: ``agnostic_matrix()`` (its documented way to the
  ``(n_train, n_test)`` matrix) sums the rows of identical training windows, doubling the score of each copy.
* bergson ``collect_gradients`` (per-module two-sided random projection, ``projection_dim = k``): the dot of the
  training and query features is projected Grad-Dot, positive = helps. Its EK-FAC / K-FAC pipeline
  (``hessian_pipeline``: query gradients, factors fitted on the training set with the dataset labels = empirical
  Fisher, ``damped_inverse`` = 1 / (λ + 0.1 · mean λ), applied to each query, then each training gradient scored
  against them) writes scores with ``higher_is_better = True``: positive = helps, used as is. It needs a Hugging Face
  causal LM (it calls ``model(x).logits`` and reloads the model with ``from_pretrained``) and a tokenizer next to it
  (read only for ``model_max_length``): the adapter saves both, and the datasets, under its scratch directory. Its
  forward sees all ``T + 1`` tokens and drops the last logit; the per-example gradients are identical (the last
  position gets no output gradient), but its activation covariance also counts the last position.

No bench case has a Hugging Face model (text-gpt is a TinyGPT), so in ``datacredit bench`` bergson is registered and
skipped with that reason; ``benchmarks/peers_lm.py`` runs it side by side on a GPT-2 built from a config.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datacredit.scores import Scores

__all__ = ["BERGSON", "DATTRI_LLM", "bergson_graddot", "bergson_influence", "dattri_llm_scores", "hf_model", "lm_loss"]

DATTRI_LLM = "pip install --no-deps -c .venv/constraints.txt dattri-llm (see `make peers`)"
BERGSON = ("pip install -c .venv/constraints.txt bergson && pip uninstall -y torchvision torchaudio "
           "(see `make peers`)")
RELATIVE_DAMPING = 0.1


def lm_loss(reduction: str = "mean", position_ids: bool = False) -> Callable[[nn.Module, dict], torch.Tensor]:
    """``(model, {"input_ids": (B, T + 1)}) -> Σ_batch loss_i``: next-token cross-entropy of the first ``T``
    predictions, per sequence ``"mean"`` over tokens or ``"sum"`` (our LanguageModelingTask's two reductions); the
    model is called with ``input_ids=`` (and ``position_ids``) for a transformers model, positionally otherwise."""

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        tokens = batch["input_ids"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if hf_model(model):
            kwargs = {"input_ids": inputs}
            if position_ids:
                kwargs["position_ids"] = torch.arange(inputs.shape[1]).expand(inputs.shape[0], -1)
            logits = model(**kwargs).logits
        else:
            logits = model(inputs)
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        per_seq = per_token.reshape(targets.shape).sum(1)
        return (per_seq if reduction == "sum" else per_seq / targets.shape[1]).sum()

    return loss


def hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


class _Windows(torch.utils.data.Dataset):
    """Token windows as the dict samples dattri-llm's loaders collate: ``{"input_ids": (T + 1,)}``."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i]}


KFAC_LAYERS = ("Linear", "Conv1D")
ALL_LAYERS = (*KFAC_LAYERS, "Embedding", "LayerNorm")  # what dattri-llm captures per example besides them


def _tracked_layers(model: nn.Module, kinds: tuple[str, ...]) -> tuple[dict[str, str], dict[str, dict]]:
    """``({layer: "linear_io"}, {layer: kwargs})`` for the layers of a class named in ``kinds`` whose weight requires
    grad; ``kwargs`` (``has_bias=False`` and, for a LayerNorm, its shape and eps) only for those whose bias we do not
    attribute (dattri-llm would add it; see the module doc)."""
    hooks, kwargs = {}, {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if type(module).__name__ not in kinds or weight is None or not weight.requires_grad:
            continue
        hooks[name] = "linear_io"
        bias = getattr(module, "bias", None)
        if bias is not None and not bias.requires_grad:
            kwargs[name] = {"has_bias": False}
            if isinstance(module, nn.LayerNorm):
                kwargs[name].update(normalized_shape=tuple(module.normalized_shape), eps=module.eps)
    return hooks, kwargs


def dattri_llm_scores(model: nn.Module, train: torch.Tensor, queries: torch.Tensor, kind: str, workdir: Path, *,
                      loss: Callable[[nn.Module, dict], torch.Tensor], batch_size: int = 32,
                      damping: float = RELATIVE_DAMPING) -> np.ndarray:
    """dattri-llm's live ``attribute`` at the model's current weights: ``kind`` ``"tracin"`` (one checkpoint =
    Grad-Dot), ``"kfac"`` or ``"ekfac"`` (relative damping ``damping``), over the Linear / Conv1D layers whose weight
    requires grad (weights and the biases that require grad; TracIn also Embedding and LayerNorm layers, which
    dattri-llm's K-FACs skip). ``(n_train, n_query)`` float64, positive = helps.
    Cost: TracIn one backward per example and ``n_train · n_query`` layer dots; K-FAC two and EK-FAC three passes over
    the training set."""
    from dattri_llm import (
        AttributionArguments,
        AttributionTask,
        EKFACAttributor,
        HookManagerConfig,
        KFACAttributor,
        TracInAttributor,
        hash_sample,
    )

    cls = {"tracin": TracInAttributor, "kfac": KFACAttributor, "ekfac": EKFACAttributor}[kind]
    kinds = ALL_LAYERS if kind == "tracin" else KFAC_LAYERS  # its K-FACs skip embeddings and norms
    hooks, kwargs = _tracked_layers(model, kinds)
    if not hooks:
        raise ValueError(f"dattri-llm: no layer of {kinds} with a trainable weight to attribute")
    shutil.rmtree(workdir, ignore_errors=True)
    args = AttributionArguments(output_dir=str(workdir), per_device_train_batch_size=batch_size,
                                per_device_eval_batch_size=batch_size, use_cpu=True)
    attributor = cls(args, task=AttributionTask(loss, model))
    options = {} if kind == "tracin" else {"damping": damping, "relative_damping": True}
    score = attributor.attribute(_Windows(train), _Windows(queries),
                                 hook_config=HookManagerConfig(hook_types=hooks, module_kwargs=kwargs), **options)
    # One row per training window, in loader order (duplicates included); ``agnostic_matrix`` would sum the rows of
    # duplicate windows (same hash), doubling their scores. Duplicate queries share one column (same values).
    if len(score.row_train_ids) != len(train) or len(set(score.row_steps)) != 1:
        raise RuntimeError(f"dattri-llm returned {len(score.row_train_ids)} rows over steps "
                           f"{sorted(set(score.row_steps))} for {len(train)} windows at one checkpoint")

    def key(row: torch.Tensor) -> str:  # the hash of what the model was called with (see lm_loss)
        return hash_sample({"input_ids": row[:-1]} if hf_model(model) else {"_arg0": row[:-1]})

    positions: dict[str, list[int]] = {}
    for r, h in enumerate(score.row_train_ids):
        positions.setdefault(h, []).append(r)
    seen: dict[str, int] = {}
    try:
        rows = []
        for window in train:
            h = key(window)
            rows.append(positions[h][seen.get(h, 0)])
            seen[h] = seen.get(h, 0) + 1
        cols = [score.test_index[key(window)] for window in queries]
    except (KeyError, IndexError) as exc:
        raise RuntimeError("dattri-llm: a window's content hash is not among the scores' ids (did the model get "
                           "other inputs than lm_loss passes?)") from exc
    return score.scores[rows][:, cols].double().numpy()


# -- bergson --------------------------------------------------------------------------------------------------------
def _hf_dataset(tokens: torch.Tensor, path: Path | None = None) -> Any:
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": tokens.tolist(), "length": [tokens.shape[1]] * len(tokens)})
    if path is not None:
        ds.save_to_disk(str(path))
    return ds


def _bergson_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]


def _require_hf(model: nn.Module) -> None:
    if not hf_model(model):
        raise TypeError(f"bergson needs a Hugging Face causal LM (it calls model(x).logits and reloads the model "
                        f"with from_pretrained), got {type(model).__name__}")


def bergson_features(model: nn.Module, tokens: torch.Tensor, workdir: Path, *, k: int,
                     batch_size: int = 32) -> np.ndarray:
    """bergson's ``collect_gradients`` with ``projection_dim = k`` (its per-module two-sided Rademacher projection,
    ``k × k`` per module) of the summed-token loss of each window: ``(n, k² · modules)`` float32. Tracks the modules
    bergson finds (Linear / Conv1D under ``model.base_model``), weights only (``include_bias=False``)."""
    from bergson import GradientProcessor, IndexConfig, collect_gradients

    _require_hf(model)
    shutil.rmtree(workdir, ignore_errors=True)
    cfg = IndexConfig(run_path=str(workdir), projection_dim=k)
    cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
    processor = GradientProcessor({}, projection_dim=k, projection_type=cfg.projection_type, include_bias=False)
    collect_gradients(model=model, data=_hf_dataset(tokens), processor=processor, cfg=cfg,
                      batches=_bergson_batches(len(tokens), batch_size))
    grads = np.memmap(cfg.partial_run_path / "gradients.bin", mode="r", dtype=np.float32)
    return np.array(grads).reshape(len(tokens), -1)


def bergson_graddot(model: nn.Module, train: torch.Tensor, queries: torch.Tensor, workdir: Path, *, k: int = 16,
                    batch_size: int = 32) -> tuple[np.ndarray, dict[str, float]]:
    """Projected Grad-Dot with bergson's features: ``(n_train, n_query)`` float64 and the CPU / wall seconds of the
    training featurization (``fit``) and of the query featurization + product (``score``)."""
    times: dict[str, float] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    train_f = bergson_features(model, train, workdir / "train", k=k, batch_size=batch_size)
    t1, c1 = time.perf_counter(), time.process_time()
    query_f = bergson_features(model, queries, workdir / "query", k=k, batch_size=batch_size)
    values = train_f.astype(np.float64) @ query_f.T.astype(np.float64)
    t2, c2 = time.perf_counter(), time.process_time()
    times.update(fit_wall_s=t1 - t0, fit_cpu_s=c1 - c0, score_wall_s=t2 - t1, score_cpu_s=c2 - c1)
    return values, times


def _save_hf(model: nn.Module, tokens_per_batch: int, path: Path) -> None:
    """The model and a word-level tokenizer over its vocabulary (bergson reads only its ``model_max_length``)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(str(path))
    vocab = {str(i): i for i in range(model.config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="0")),
                                        model_max_length=tokens_per_batch)
    tokenizer.save_pretrained(str(path))


def bergson_influence(model: nn.Module, train: torch.Tensor, queries: torch.Tensor, workdir: Path, *,
                      ekfac: bool = True, batch_size: int = 32,
                      damping: float = RELATIVE_DAMPING) -> tuple[np.ndarray, dict[str, float]]:
    """bergson's K-FAC (``ekfac=False``) or EK-FAC influence through its ``hessian_pipeline``, no projection, one
    score column per query (``aggregation="none"``), empirical Fisher (``use_dataset_labels``), summed-token loss,
    weights only: ``(n_train, n_query)`` float64, positive = helps, and the seconds of ``setup`` (saving the model,
    tokenizer and datasets it reloads from disk), ``fit`` (its ``approximate_hessians``) and ``score`` (everything
    else: query gradients, inverse applied to each, training gradients scored)."""
    from bergson.config.config import (
        DataConfig,
        HessianConfig,
        HessianPipelineConfig,
        IndexConfig,
        InversionConfig,
        PreprocessConfig,
        QuerySetConfig,
        ScoreConfig,
    )
    from bergson.data import load_scores
    from bergson.hessians import pipeline

    _require_hf(model)
    if model.config.n_positions < batch_size * train.shape[1]:
        # bergson refuses a token batch longer than the model's context (its tokenizer check)
        raise ValueError(f"bergson: batch of {batch_size} windows of {train.shape[1]} tokens exceeds the model's "
                         f"n_positions = {model.config.n_positions}; build the model with n_positions >= "
                         f"{batch_size * train.shape[1]}")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    t0, c0 = time.perf_counter(), time.process_time()
    _save_hf(model, batch_size * train.shape[1], workdir / "model")
    _hf_dataset(train, workdir / "train")
    _hf_dataset(queries, workdir / "query")
    setup = (time.perf_counter() - t0, time.process_time() - c0)
    index = IndexConfig(run_path=str(workdir / "run"), model=str(workdir / "model"), precision="fp32",
                        data=DataConfig(dataset=str(workdir / "train")), projection_dim=0, include_bias=False,
                        loss_reduction="sum", token_batch_size=batch_size * train.shape[1])
    hessian = HessianConfig(method="kfac", ev_correction=ekfac, use_dataset_labels=True)
    config = HessianPipelineConfig(query=QuerySetConfig(dataset=str(workdir / "query"), aggregation="none"),
                                   inversion_cfg=InversionConfig(inversion="damped_inverse", damping_factor=damping))
    fit = [0.0, 0.0]
    original = pipeline.approximate_hessians

    def timed(*args: Any, **kwargs: Any) -> Any:
        a, b = time.perf_counter(), time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            fit[0] += time.perf_counter() - a
            fit[1] += time.process_time() - b

    pipeline.approximate_hessians = timed  # only to time the fit step apart from the scoring steps
    try:
        t1, c1 = time.perf_counter(), time.process_time()
        pipeline.hessian_pipeline(index, hessian, ScoreConfig(), PreprocessConfig(), config)
        total = (time.perf_counter() - t1, time.process_time() - c1)
    finally:
        pipeline.approximate_hessians = original
    scores = load_scores(workdir / "run" / "scores")
    values = np.asarray(scores[:], dtype=np.float64).reshape(len(train), len(queries))
    info = json.loads((workdir / "run" / "scores" / "info.json").read_text())
    if info.get("num_rows", len(train)) != len(train):
        raise RuntimeError(f"bergson scored {info.get('num_rows')} rows for {len(train)} training windows")
    return values, {"setup_wall_s": setup[0], "setup_cpu_s": setup[1], "fit_wall_s": fit[0], "fit_cpu_s": fit[1],
                    "score_wall_s": total[0] - fit[0], "score_cpu_s": total[1] - fit[1]}


# -- bench registration ---------------------------------------------------------------------------------------------
def _register() -> None:
    import importlib.util

    from .cases import Case
    from .methods import BATCH, Context, MethodSpec, register

    def needs(package: str, install: str, hf: bool = False) -> Callable[[Case], str | None]:
        def skip(case: Case) -> str | None:
            if importlib.util.find_spec(package) is None:
                return f"{package} is not installed ({install})"
            if case.spec.classification:
                return "a language-model peer: runs on the LM cases only"
            if hf and not hf_model(case.model()):
                return ("bergson needs a Hugging Face causal LM (model(x).logits, from_pretrained); this case's model "
                        f"is a {type(case.model()).__name__}: see benchmarks/peers_lm.py for bergson on a GPT-2")
            return None

        return skip

    def tokens(dataset: Any) -> torch.Tensor:
        return dataset.tensors[0]

    def dattri_llm(kind: str) -> Callable[[Context], Scores]:
        def run(ctx: Context) -> Scores:
            model = ctx.model()
            reduction = getattr(ctx.task, "reduction", "mean")
            values = dattri_llm_scores(model, tokens(ctx.train), tokens(ctx.queries), kind,
                                       ctx.workdir / f"dattri-llm-{kind}", loss=lm_loss(reduction), batch_size=BATCH)
            return Scores(values, ctx.train.ids, ctx.queries.ids, f"dattri-llm-{kind}")

        return run

    def bergson_ekfac(ctx: Context) -> Scores:  # reached only for a Hugging Face model (see the skip)
        values, _ = bergson_influence(ctx.model(), tokens(ctx.train), tokens(ctx.queries), ctx.workdir / "bergson")
        return Scores(values, ctx.train.ids, ctx.queries.ids, "bergson-ekfac")

    def prepare_dattri_llm() -> None:
        import dattri_llm  # noqa: F401

    def prepare_bergson() -> None:
        import bergson.hessians.pipeline  # noqa: F401

    for kind, pair in (("tracin", "grad-dot"), ("kfac", "influence-kfac"), ("ekfac", "influence-ekfac")):
        register(MethodSpec(f"dattri-llm-{kind}", dattri_llm(kind), "dattri-llm", pair,
                            needs("dattri_llm", DATTRI_LLM), prepare=prepare_dattri_llm,
                            note="" if kind == "tracin" else "Linear layers only (dattri-llm's K-FACs skip the rest)"))
    register(MethodSpec("bergson-ekfac", bergson_ekfac, "bergson", "influence-ekfac",
                        needs("bergson", BERGSON, hf=True), prepare=prepare_bergson))


_register()
