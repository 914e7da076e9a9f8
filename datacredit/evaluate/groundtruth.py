"""Ground truth by retraining: random-subset retraining (for LDS) and leave-one-out (for LOO correlation).

Subset ground truth (Ilyas et al.'s datamodels; Park et al.'s LDS): ``m`` random subsets of the training set, each
of exactly ``round(alpha · n_train)`` examples, drawn from ``np.random.default_rng(seed)``; every subset is
retrained ``seeds`` times with training seeds ``train_seed(seed, subset, replicate)``; every retrained model is
evaluated on every query. Store layout in ``out_dir``::

    train_ids (n_train,)  query_ids (n_query,)  masks (m, n_train) bool  train_seeds (m·seeds,)
    outputs  (m·seeds, n_measures, n_query), chunked, one job per row (job = subset · seeds + replicate);
             its manifest meta is the build's config: the SubsetConfig's fields (m, alpha, seeds, seed), the
             recipe's settings, the measures, sizes and sha256 digests of both datasets
    seconds  (m·seeds,) wall time of each job
    execution  JSON: the Execution of each call (workers, backend, ...) and how many jobs it found to run

Rerunning with the same config, recipe and data resumes (only unfinished jobs run), under any Execution; another
config, recipe or data raises StoreError naming each differing field. A build holds the store's build lock
throughout: a second build of the same directory raises LockedError naming the holder, or with
``Execution(wait=True)`` waits and then runs only the jobs left. A directory holding something else (a saved
Scores, another kind of build) is refused unless ``Execution(overwrite=True)``.

Leave-one-out: job rows ``0`` (the full training set) and ``1 + r`` (without the ``r``-th removed example), each
with ``seeds`` replicates; replicate ``s`` uses the same training seed ``train_seed(seed, s)`` in every row
(common random numbers, so seed noise does not swamp the removal of one example).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..dataset import example_ids
from ..errors import DataError, StoreError
from ..store import Store
from .align import positions
from .config import Execution, LOOConfig, SubsetConfig, configure_run, manifest_fields
from .jobstore import (
    EXECUTION,
    OUTPUTS,
    SECONDS,
    build_store,
    check_config,
    expect_equal,
    fingerprint,
    run_stored,
    train_seed,
)
from .recipes import check_recipe, measure_sign, recipe_config
from .runner import JobList, Retraining, check_backend
from .stats import spearman_columns

__all__ = ["GroundTruth", "LOOResult", "build_groundtruth", "build_loo", "load_groundtruth", "load_loo"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUBSET_ARTEFACTS = ("train_ids", "query_ids", "masks", "train_seeds", OUTPUTS, SECONDS, EXECUTION)
LOO_ARTEFACTS = ("train_ids", "query_ids", "removed_ids", "train_seeds", OUTPUTS, SECONDS, EXECUTION)


@dataclass(eq=False)
class GroundTruth:
    """Outputs of models retrained on random subsets.

    Attributes:
        masks: ``(m, n_train)`` bool, ``masks[k, i]`` = training example ``train_ids[i]`` is in subset ``k``.
        outputs: ``{measure: (m, seeds, n_query)}`` float64, e.g. ``"loss"`` (lower is better), ``"margin"``.
        train_ids: ``(n_train,)`` int64; query_ids: ``(n_query,)`` int64.
        config: the build settings (m, alpha, seeds, seed, recipe, ...), as in the manifest.
        seconds: ``(m, seeds)`` wall time of each retraining (train + evaluate), if recorded.
    """

    masks: np.ndarray
    outputs: dict[str, np.ndarray]
    train_ids: np.ndarray
    query_ids: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)
    seconds: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.masks = np.asarray(self.masks, dtype=bool)
        self.train_ids = np.asarray(self.train_ids, dtype=np.int64)
        self.query_ids = np.asarray(self.query_ids, dtype=np.int64)
        m, n = self.masks.shape if self.masks.ndim == 2 else (-1, -1)
        if n != len(self.train_ids):
            raise DataError(f"masks have shape {self.masks.shape}, expected (m, {len(self.train_ids)})")
        if not self.outputs:
            raise DataError("GroundTruth needs at least one measure in outputs")
        for name, out in self.outputs.items():
            if out.ndim != 3 or out.shape[0] != m or out.shape[2] != len(self.query_ids):
                raise DataError(f"outputs[{name!r}] has shape {out.shape}, expected ({m}, seeds, "
                                f"{len(self.query_ids)})")

    def __repr__(self) -> str:
        return (f"GroundTruth(m={self.m}, seeds={self.seeds}, n_train={len(self.train_ids)}, "
                f"n_query={len(self.query_ids)}, measures={list(self.outputs)})")

    @property
    def m(self) -> int:
        return self.masks.shape[0]

    @property
    def seeds(self) -> int:
        return next(iter(self.outputs.values())).shape[1]

    def output(self, measure: str = "loss") -> np.ndarray:
        """``(m, seeds, n_query)`` outputs of one measure; DataError names the available ones."""
        if measure not in self.outputs:
            raise DataError(f"ground truth has no measure {measure!r}; it has {sorted(self.outputs)}")
        return self.outputs[measure]

    def mean(self, measure: str = "loss") -> np.ndarray:
        """``(m, n_query)``: the measure averaged over training seeds."""
        return self.output(measure).mean(axis=1)

    def seed_agreement(self, measure: str = "loss", query_ids: np.ndarray | None = None) -> float | None:
        """The noise ceiling: mean over queries of the Spearman correlation, across the ``m`` subsets, between
        two training seeds' outputs (averaged over all pairs of seeds; with 2 seeds: seed 0 vs seed 1).

        None with one seed. Queries default to all; constant columns are skipped. This is the agreement of ONE
        retraining with another; an LDS against the seed-averaged outputs can exceed it slightly.
        """
        out = self.output(measure)
        if out.shape[1] < 2:
            return None
        if query_ids is not None:
            out = out[:, :, positions(np.asarray(query_ids), self.query_ids, "ground-truth queries")]
        per_pair = [spearman_columns(out[:, a], out[:, b])
                    for a in range(out.shape[1]) for b in range(a + 1, out.shape[1])]
        values = np.concatenate(per_pair)
        values = values[np.isfinite(values)]
        return float(values.mean()) if values.size else None


def _check_data(recipe: Any, train: Dataset, queries: Dataset, execution: Execution) -> tuple[str, ...]:
    """Every check that needs no training, so that a mistake fails before any work (and before the store)."""
    measures = check_recipe(recipe)
    check_backend(execution.backend)
    _ = example_ids(train), example_ids(queries)  # raises DataError on empty data or bad ids
    return measures


def subset_masks(n_train: int, m: int, alpha: float, seed: int) -> np.ndarray:
    """``(m, n_train)`` bool: ``m`` subsets of exactly ``round(alpha · n_train)`` examples, ``default_rng(seed)``."""
    size = int(round(alpha * n_train))
    if not 0 < alpha < 1 or not 1 <= size < n_train:
        raise ValueError(f"alpha={alpha} gives subsets of {size} of {n_train} examples; need 1 <= size < n_train")
    rng = np.random.default_rng(seed)
    masks = np.zeros((m, n_train), dtype=bool)
    for k in range(m):
        masks[k, rng.choice(n_train, size=size, replace=False)] = True
    return masks


def build_groundtruth(recipe: Any, train: Dataset, queries: Dataset, out_dir: str | os.PathLike[str],
                      config: SubsetConfig | None = None, *, execution: Execution | None = None,
                      **settings: Any) -> GroundTruth:
    """Retrain ``recipe`` on ``config.m`` random ``config.alpha``-subsets × ``config.seeds`` training seeds; see the
    module docstring.

    Args:
        recipe: a Recipe (``train``, ``evaluate``, ``measures``); picklable for ``backend="process"``/``"ray"``.
        train, queries: map-style datasets with stable ids (``ArrayDataset`` for the built-in recipes).
        out_dir: store directory; rerunning with the same config, recipe and data resumes there.
        config: a :class:`SubsetConfig` (m, alpha, seeds, seed), written into the manifest.
        execution: an :class:`Execution` (workers, backend, progress, wait, overwrite); see there.
        settings: the fields of either, as keywords instead (``m=8, workers=2``); not with the object itself.
    Returns the complete GroundTruth (as ``load_groundtruth(out_dir)`` would). Cost: ``m · seeds`` retrainings.
    """
    config, execution = configure_run(SubsetConfig, config, execution, settings)
    measures = _check_data(recipe, train, queries, execution)
    m, seeds, seed = config.m, config.seeds, config.seed
    n_train = len(train)
    masks = subset_masks(n_train, m, config.alpha, seed)
    manifest = {"format_version": FORMAT_VERSION, "kind": "subsets", **manifest_fields(config),
                "subset_size": int(masks[0].sum()), "measures": list(measures), "recipe": recipe_config(recipe),
                "n_train": n_train, "n_query": len(queries), "train_sha256": fingerprint(train),
                "query_sha256": fingerprint(queries)}
    seeds_ = np.array([train_seed(seed, k, r) for k in range(m) for r in range(seeds)], dtype=np.int64)
    jobs = JobList(m * seeds, lambda j: (np.flatnonzero(masks[j // seeds]), int(seeds_[j])))
    arrays = {"train_ids": example_ids(train), "query_ids": example_ids(queries), "masks": masks,
              "train_seeds": seeds_}
    with build_store(out_dir, "subsets", SUBSET_ARTEFACTS, wait=execution.wait,
                     overwrite=execution.overwrite) as store:
        resuming = _prepare(store, manifest, arrays)
        outputs, seconds = run_stored(store, manifest, Retraining(recipe, train, queries), jobs, resuming=resuming,
                                      execution=execution, desc="ground truth")
        logger.info("%s: ground truth complete, %d retrainings, median %.3g s each", store.root, len(jobs),
                    float(np.median(seconds)))
        return _groundtruth(store, manifest, outputs, seconds)


def _prepare(store: Store, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> bool:
    """Check a resumed store against ``arrays`` (or write them to a fresh one); True when resuming."""
    resuming = check_config(store, config)
    for name, arr in arrays.items():
        if resuming:
            expect_equal(store, name, arr)
        else:
            store.save_array(name, arr)
    return resuming


def _split(config: dict[str, Any], outputs: np.ndarray, rows: int) -> dict[str, np.ndarray]:
    seeds = config["seeds"]
    return {name: outputs[:, i, :].reshape(rows, seeds, -1) for i, name in enumerate(config["measures"])}


def _groundtruth(store: Store, config: dict[str, Any], outputs: np.ndarray, seconds: np.ndarray) -> GroundTruth:
    m, seeds = config["m"], config["seeds"]
    return GroundTruth(store.load_array("masks"), _split(config, outputs, m), store.load_array("train_ids"),
                       store.load_array("query_ids"), config, seconds.reshape(m, seeds))


def _load(out_dir: str | os.PathLike[str], kind: str, builder: str) -> tuple[Store, dict[str, Any], np.ndarray,
                                                                              np.ndarray | None]:
    store = Store(out_dir, create=False)
    if not store.has(OUTPUTS):
        raise StoreError(f"{store.root}: no ground truth here (no {OUTPUTS!r} artefact)")
    config = store.info(OUTPUTS)["meta"]
    if config.get("kind") != kind or config.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{store.root}: holds {config.get('kind')!r} ground truth of format "
                         f"{config.get('format_version')!r}, not {kind!r} of format {FORMAT_VERSION}")
    try:
        outputs = store.load_array(OUTPUTS)
    except StoreError as exc:
        raise StoreError(f"{exc}; rerun {builder} with the same arguments to finish it") from exc
    seconds = store.load_array(SECONDS) if store.has(SECONDS) else None
    return store, config, outputs, seconds


def load_groundtruth(out_dir: str | os.PathLike[str]) -> GroundTruth:
    """Read a complete subset ground truth written by ``build_groundtruth``; StoreError if incomplete/corrupt."""
    store, config, outputs, seconds = _load(out_dir, "subsets", "build_groundtruth")
    if seconds is None:
        seconds = np.full(config["m"] * config["seeds"], np.nan)
    return _groundtruth(store, config, outputs, seconds)


# -- leave-one-out ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class LOOResult:
    """Outputs of the model trained on all data and of one model per removed example.

    Attributes:
        full: ``{measure: (seeds, n_query)}`` outputs of the model trained on the full training set.
        without: ``{measure: (n_removed, seeds, n_query)}`` outputs without ``removed_ids[r]``.
        removed_ids: ``(n_removed,)`` ids of the removed training examples; query_ids ``(n_query,)``.
        config: the build settings.
    """

    full: dict[str, np.ndarray]
    without: dict[str, np.ndarray]
    removed_ids: np.ndarray
    query_ids: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)

    def change(self, measure: str = "loss") -> np.ndarray:
        """``(n_removed, n_query)`` raw change ``output_without_r − output_full`` (averaged over seeds)."""
        if measure not in self.full:
            raise DataError(f"LOO result has no measure {measure!r}; it has {sorted(self.full)}")
        return self.without[measure].mean(axis=1) - self.full[measure].mean(axis=0)[None, :]

    def effect(self, measure: str = "loss", higher_is_better: bool | None = None) -> np.ndarray:
        """``(n_removed, n_query)`` how much each removed example HELPED each query (the Scores sign).

        For the loss: ``loss_without_r − loss_full`` (positive = removing it raised the loss, so it helped);
        for a higher-is-better measure such as the margin: ``margin_full − margin_without_r``.
        """
        return -measure_sign(measure, higher_is_better) * self.change(measure)

    @property
    def values(self) -> np.ndarray:
        """``effect("loss")``: ``(n_removed, n_query)``, ``loss_without_i − loss_full``; positive = i helped."""
        return self.effect("loss")


def build_loo(recipe: Any, train: Dataset, queries: Dataset, out_dir: str | os.PathLike[str],
              config: LOOConfig | None = None, *, execution: Execution | None = None, **settings: Any) -> LOOResult:
    """Leave-one-out ground truth: retrain without each training example at positions ``config.indices``
    (default: all), plus once on the full data, ``config.seeds`` times each; resumable in ``out_dir`` (and locked)
    like ``build_groundtruth``. ``config``: a :class:`LOOConfig`; ``execution`` and keyword ``settings`` as there.

    ``LOOResult.values`` is ``(n_removed, n_query)`` = ``loss_without_i − loss_full`` (positive = i helped).
    """
    config, execution = configure_run(LOOConfig, config, execution, settings)
    measures = _check_data(recipe, train, queries, execution)
    seeds, seed, n_train = config.seeds, config.seed, len(train)
    idx = np.arange(n_train) if config.indices is None else np.asarray(config.indices, dtype=np.int64)
    if idx.max() >= n_train:
        raise DataError(f"indices must be positions in [0, {n_train}), got {idx[idx >= n_train][:10].tolist()}")
    train_ids = example_ids(train)
    manifest = {"format_version": FORMAT_VERSION, "kind": "loo", "n_removed": len(idx),
                **manifest_fields(config, leave_out=("indices",)), "measures": list(measures),
                "recipe": recipe_config(recipe), "n_train": n_train, "n_query": len(queries),
                "train_sha256": fingerprint(train), "query_sha256": fingerprint(queries)}
    everything = np.arange(n_train)
    seeds_ = np.array([train_seed(seed, r) for r in range(seeds)], dtype=np.int64)

    def job(j: int) -> tuple[np.ndarray, int]:
        row = j // seeds  # 0 = full data, 1 + r = without idx[r]
        return (everything if row == 0 else np.delete(everything, idx[row - 1])), int(seeds_[j % seeds])

    jobs = JobList((len(idx) + 1) * seeds, job)
    arrays = {"train_ids": train_ids, "query_ids": example_ids(queries), "removed_ids": train_ids[idx],
              "train_seeds": seeds_}
    with build_store(out_dir, "loo", LOO_ARTEFACTS, wait=execution.wait, overwrite=execution.overwrite) as store:
        resuming = _prepare(store, manifest, arrays)
        outputs, _ = run_stored(store, manifest, Retraining(recipe, train, queries), jobs, resuming=resuming,
                                execution=execution, desc="leave-one-out")
        return _loo(store, manifest, outputs)


def _loo(store: Store, config: dict[str, Any], outputs: np.ndarray) -> LOOResult:
    split = _split(config, outputs, config["n_removed"] + 1)
    return LOOResult({k: v[0] for k, v in split.items()}, {k: v[1:] for k, v in split.items()},
                     store.load_array("removed_ids"), store.load_array("query_ids"), config)


def load_loo(out_dir: str | os.PathLike[str]) -> LOOResult:
    """Read a complete leave-one-out ground truth written by ``build_loo``."""
    store, config, outputs, _ = _load(out_dir, "loo", "build_loo")
    return _loo(store, config, outputs)
