"""Counterfactual checks by retraining: remove a query's top proponents (vs random examples), and train on the
top-valued part of the data (vs a random part).

Each takes one frozen config (:class:`RemovalConfig`, :class:`SelectionConfig`) and an
:class:`~datacredit.evaluate.config.Execution`, or their fields as keywords. Every retraining goes through the same
job machinery as the ground truth (``runner.run_jobs``); with ``out_dir`` the results are stored (the config's fields
in the manifest) and a rerun with the same config resumes (under the store's build lock, as ``build_groundtruth``),
without it they stay in memory; the config is in the result either way. Replicate ``s`` uses the same
training seed in every condition (common random numbers), so conditions differ only by their data.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..dataset import example_ids
from ..errors import DataError
from ..scores import Scores
from .align import positions, same_ids
from .config import Execution, RemovalConfig, SelectionConfig, configure_run, manifest_fields
from .jobstore import (
    EXECUTION,
    OUTPUTS,
    SECONDS,
    build_store,
    check_config,
    fingerprint,
    run_in_memory,
    run_stored,
    train_seed,
)
from .recipes import check_recipe, measure_sign, recipe_config
from .runner import Job, JobList, Retraining, check_backend, take

__all__ = ["RemovalResult", "SelectionResult", "removal", "selection"]


@dataclass(frozen=True)
class RemovalResult:
    """Per query, the retrained outcome after removing its ``k`` top proponents vs ``k`` random examples.

    Attributes (all ``(n_query,)``, averaged over seeds, in the order of ``query_ids``):
        full: the measure of the model trained on all data.
        top: after removing the query's top-``k`` scored training examples; random: after removing ``k`` random ones.
        top_effect, random_effect: how much the removed examples had helped, signed like scores: for the loss
            ``loss_after − loss_full`` (positive = removing them hurt the query, so they had helped).
        config: the RemovalConfig it ran with (``k`` and ``measure`` are its fields).
    """

    query_ids: np.ndarray
    full: np.ndarray
    top: np.ndarray
    random: np.ndarray
    top_effect: np.ndarray
    random_effect: np.ndarray
    config: RemovalConfig = field(default_factory=RemovalConfig)

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def measure(self) -> str:
        return self.config.measure

    def summary(self) -> dict[str, float]:
        """Means of both effects and the fraction of queries where the top-``k`` removal hurt more."""
        return {"top_effect": float(self.top_effect.mean()), "random_effect": float(self.random_effect.mean()),
                "fraction_top_greater": float((self.top_effect > self.random_effect).mean()),
                "k": self.k, "n_query": len(self.query_ids)}


def _execute(work: Retraining, jobs: Sequence[Job], manifest: dict[str, Any],
             out_dir: str | os.PathLike[str] | None, execution: Execution) -> np.ndarray:
    """``(n_jobs, n_measures, n_query)`` outputs: in memory, or stored in ``out_dir`` (resuming what is there)."""
    desc = manifest["kind"]
    if out_dir is None:
        return run_in_memory(work, jobs, execution=execution, desc=desc)[0]
    with build_store(out_dir, manifest["kind"], (OUTPUTS, SECONDS, EXECUTION), wait=execution.wait,
                     overwrite=execution.overwrite) as store:
        resuming = check_config(store, manifest)
        return run_stored(store, manifest, work, jobs, resuming=resuming, execution=execution, desc=desc)[0]


def removal(scores: Scores, recipe: Any, train: Dataset, queries: Dataset, config: RemovalConfig | None = None, *,
            out_dir: str | os.PathLike[str] | None = None, execution: Execution | None = None,
            **settings: Any) -> RemovalResult:
    """Remove each query's ``k`` highest-scored training examples and retrain; compare with removing ``k``
    random ones (drawn per query from ``default_rng(seed)``).

    ``scores``: ``(n_train, ·)`` with positive = helps, covering every training id and every query used.
    ``config``: a :class:`RemovalConfig` (k, n_queries, seeds, seed, measure); ``n_queries`` of ``queries`` are
    tested (a seeded random sample, kept in dataset order; None = all). ``execution``: an Execution; either may be
    given as keyword ``settings`` instead. Cost: ``seeds × (1 + 2 · n_queries)`` retrainings.
    """
    config, execution = configure_run(RemovalConfig, config, execution, settings)
    measures = check_recipe(recipe)
    check_backend(execution.backend)
    k, seeds, seed, measure = config.k, config.seeds, config.seed, config.measure
    sign = measure_sign(measure)
    if measure not in measures:
        raise DataError(f"recipe measures {list(measures)} do not include {measure!r}")
    train_ids, n_train = example_ids(train), len(train)
    rows = same_ids(train_ids, scores.train_ids, "removal training examples", "the scores")
    if not k < n_train:
        raise ValueError(f"k must be in [1, {n_train}), got {k}")
    rng = np.random.default_rng(seed)
    n_all, n_queries = len(queries), config.n_queries
    chosen = np.arange(n_all) if n_queries is None or n_queries >= n_all else np.sort(
        rng.choice(n_all, n_queries, replace=False))
    subset = take(queries, chosen)
    query_ids = example_ids(subset)
    cols = positions(query_ids, scores.query_ids, "removal: query ids not among the scores' queries")
    removed = []  # per condition: positions left out; condition 0 = full data, then (top, random) per query
    for c in cols:
        column = np.asarray(scores.values[:, c], dtype=np.float64)[rows]  # in train order
        removed += [np.argsort(-column, kind="stable")[:k], rng.choice(n_train, k, replace=False)]
    removed.insert(0, np.array([], dtype=np.int64))
    everything = np.arange(n_train)
    seeds_ = [train_seed(seed, s) for s in range(seeds)]
    jobs = JobList(len(removed) * seeds, lambda j: (np.delete(everything, removed[j // seeds]), seeds_[j % seeds]))
    manifest = {"kind": "removal", **manifest_fields(config), "scores_method": scores.method,
                "scores_sha256": digest(scores.values, scores.train_ids, scores.query_ids),
                "recipe": recipe_config(recipe), "train_sha256": fingerprint(train),
                "query_sha256": fingerprint(subset)}
    outputs = _execute(Retraining(recipe, train, subset), jobs, manifest, out_dir, execution)
    out = outputs[:, measures.index(measure), :].reshape(len(removed), seeds, -1).mean(axis=1)
    q = np.arange(len(cols))
    full, top, rand = out[0], out[1::2][q, q], out[2::2][q, q]
    return RemovalResult(query_ids, full, top, rand, sign * (full - top), sign * (full - rand), config)


def digest(*arrays: np.ndarray) -> str:
    """sha256 of arrays' bytes (so a resumed run refuses changed scores or values)."""
    sha = hashlib.sha256()
    for arr in arrays:
        sha.update(np.ascontiguousarray(arr).tobytes())
    return sha.hexdigest()


@dataclass(frozen=True)
class SelectionResult:
    """Validation outcome of training on the top-valued fraction vs a random fraction of the training data.

    Attributes: n_selected; ``*_loss`` = mean validation loss; ``*_accuracy`` = fraction of validation examples
    with margin > 0 (None when the recipe has no ``"margin"``); all averaged over seeds. config: the
    SelectionConfig it ran with.
    """

    n_selected: int
    top_loss: float
    random_loss: float
    top_accuracy: float | None
    random_accuracy: float | None
    config: SelectionConfig = field(default_factory=SelectionConfig)


def selection(values: np.ndarray | Scores, recipe: Any, train: Dataset, val: Dataset,
              config: SelectionConfig | None = None, *, ids: np.ndarray | None = None,
              out_dir: str | os.PathLike[str] | None = None, execution: Execution | None = None,
              **settings: Any) -> SelectionResult:
    """Train on the ``round(fraction · n)`` highest-valued examples vs as many random ones; evaluate on ``val``.

    ``values``: ``(n_train,)`` per-example values, higher = more useful (e.g. In-Run Shapley values), with their
    ``ids`` (default: the training set's order), or a one-column Scores. ``config``: a :class:`SelectionConfig`
    (fraction, seeds, seed); ``execution`` and keyword ``settings`` as for ``removal``. Cost: ``2 · seeds``
    retrainings.
    """
    config, execution = configure_run(SelectionConfig, config, execution, settings)
    measures, seeds, seed = check_recipe(recipe), config.seeds, config.seed
    check_backend(execution.backend)
    if "loss" not in measures:
        raise DataError(f"selection needs a recipe with a 'loss' measure, got {list(measures)}")
    train_ids, n_train = example_ids(train), len(train)
    if isinstance(values, Scores):
        if values.n_query != 1:
            raise DataError(f"selection needs one value per example; the Scores have {values.n_query} columns")
        ids, values = values.train_ids, values.column(0)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    ids = train_ids if ids is None else np.asarray(ids, dtype=np.int64).reshape(-1)
    if values.shape != ids.shape:
        raise DataError(f"values {values.shape} and ids {ids.shape} differ in length")
    if not np.isfinite(values).all():
        raise DataError(f"values are not finite for ids {ids[~np.isfinite(values)][:10].tolist()}")
    values = values[same_ids(train_ids, ids, "selection training examples", "the values")]
    size = int(round(config.fraction * n_train))
    if not 1 <= size < n_train:
        raise ValueError(f"fraction={config.fraction} selects {size} of {n_train} examples; need 1 <= size < n_train")
    top = np.sort(np.argsort(-values, kind="stable")[:size])
    rand = np.sort(np.random.default_rng(seed).choice(n_train, size, replace=False))
    seeds_ = [train_seed(seed, s) for s in range(seeds)]
    jobs = [(subset, s) for subset in (top, rand) for s in seeds_]
    manifest = {"kind": "selection", **manifest_fields(config), "values_sha256": digest(values, train_ids),
                "recipe": recipe_config(recipe), "train_sha256": fingerprint(train), "query_sha256": fingerprint(val)}
    outputs = _execute(Retraining(recipe, train, val), jobs, manifest, out_dir, execution)
    per = outputs.reshape(2, seeds, len(measures), -1)
    loss = per[:, :, measures.index("loss")].mean(axis=(1, 2))
    acc = (per[:, :, measures.index("margin")] > 0).mean(axis=(1, 2)) if "margin" in measures else None
    return SelectionResult(size, float(loss[0]), float(loss[1]), None if acc is None else float(acc[0]),
                           None if acc is None else float(acc[1]), config)
