"""Retraining jobs whose results live in a Store, so a build resumes after a crash or Ctrl-C.

Artefacts written by ``run_stored`` (next to whatever the caller saves, e.g. masks and ids):

* ``outputs``: chunked float64 ``(n_jobs, n_measures, n_query)``, one chunk (and done flag) per job; its manifest
  meta is the build's config — the commit point: a store without ``outputs`` holds no results.
* ``seconds``: chunked float64 ``(n_jobs,)``, each job's training + evaluation wall time.

Order per finished job: its ``seconds`` then its ``outputs`` row are written and flagged done, so a job counts as
finished only when its outputs flag is set. Only the calling process writes. ``check_config`` refuses to resume a
store built with other settings (StoreError naming the differences).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..data.dataset import example_ids
from ..errors import StoreError
from ..store import Store
from .runner import Job, run_jobs

__all__ = ["OUTPUTS", "SECONDS", "check_config", "fingerprint", "run_in_memory", "run_stored", "train_seed"]

logger = logging.getLogger(__name__)

OUTPUTS, SECONDS = "outputs", "seconds"


def train_seed(*keys: int) -> int:
    """A training seed in ``[0, 2**32)`` derived from integer ``keys`` (e.g. base seed, subset, replicate)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint32)[0])


def fingerprint(dataset: Dataset) -> str | None:
    """sha256 of a dataset's ids and tensors (ArrayDataset-like), or None when it has no ``.tensors``."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is None:
        return None
    sha = hashlib.sha256(example_ids(dataset).tobytes())
    for t in tensors:
        arr = t.detach().cpu().contiguous().numpy()
        sha.update(f"{arr.dtype.str}{arr.shape}".encode())
        sha.update(arr.tobytes())
    return sha.hexdigest()


def normalize(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as it reads back from a JSON manifest (tuples become lists)."""
    return json.loads(json.dumps(config))


def check_config(store: Store, config: dict[str, Any]) -> bool:
    """True if ``store`` already holds (some) results of this very config, False if it holds none.

    Raises StoreError if it holds results of a different config, listing each differing setting.
    """
    if not store.has(OUTPUTS):
        return False
    stored = store.info(OUTPUTS)["meta"]
    config = normalize(config)
    if stored != config:
        keys = sorted(set(stored) | set(config))
        diff = [f"{k}: stored {stored.get(k)!r}, requested {config.get(k)!r}" for k in keys
                if stored.get(k) != config.get(k)]
        raise StoreError(f"{store.root} holds results built with other settings ({'; '.join(diff)}); "
                         "use another directory or delete this one")
    return True


def expect_equal(store: Store, name: str, expected: np.ndarray) -> None:
    """StoreError unless artefact ``name`` equals ``expected`` (used on resume for ids, masks, removed ids)."""
    stored = store.load_array(name)
    if stored.shape != expected.shape or not np.array_equal(stored, expected):
        raise StoreError(f"{store.root}: stored {name!r} differs from this build's; use another directory")


def run_stored(store: Store, config: dict[str, Any], recipe: Any, train: Dataset, queries: Dataset,
               jobs: Sequence[Job], *, resuming: bool, workers: int, backend: str, progress: bool,
               desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Run the jobs whose outputs are not yet flagged done and return ``(outputs, seconds)`` of all jobs:
    ``(n_jobs, n_measures, n_query)`` and ``(n_jobs,)``. Call ``check_config`` first (it gives ``resuming``)."""
    n_jobs, shape = len(jobs), (len(jobs), len(recipe.measures), len(queries))
    seconds = store.chunked(SECONDS, (n_jobs,), np.float64, n_jobs, overwrite=not resuming)
    outputs = store.chunked(OUTPUTS, shape, np.float64, n_jobs, meta=normalize(config))
    todo = outputs.pending()
    if resuming and len(todo) < n_jobs:
        logger.info("%s: resuming, %d of %d jobs already done", store.root, n_jobs - len(todo), n_jobs)

    def on_result(j: int, out: np.ndarray, sec: float) -> None:
        seconds.write(j, j, sec)
        outputs.write(j, None, out[None])

    run_jobs(recipe, train, queries, jobs, on_result, todo=todo, workers=workers, backend=backend,
             progress=progress, desc=desc)
    return store.load_array(OUTPUTS), store.load_array(SECONDS)


def run_in_memory(recipe: Any, train: Dataset, queries: Dataset, jobs: Sequence[Job], *, workers: int,
                  backend: str, progress: bool, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """As ``run_stored`` without a store (nothing resumes): ``(outputs, seconds)`` of all jobs."""
    outputs = np.empty((len(jobs), len(recipe.measures), len(queries)), dtype=np.float64)
    seconds = np.empty(len(jobs), dtype=np.float64)

    def on_result(j: int, out: np.ndarray, sec: float) -> None:
        outputs[j], seconds[j] = out, sec

    run_jobs(recipe, train, queries, jobs, on_result, workers=workers, backend=backend, progress=progress,
             desc=desc)
    return outputs, seconds
