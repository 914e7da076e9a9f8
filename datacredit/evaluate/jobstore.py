"""Retraining jobs whose results live in a Store, so a build resumes after a crash or Ctrl-C.

Artefacts written by ``run_stored`` (next to whatever the caller saves, e.g. masks and ids):

* ``outputs``: chunked float64 ``(n_jobs, n_measures, n_query)``, one chunk (and done flag) per job; its manifest
  meta is the build's config — the commit point: a store without ``outputs`` holds no results.
* ``seconds``: chunked float64 ``(n_jobs,)``, each job's training + evaluation wall time.
* ``execution``: JSON, one entry per call of the build — its :class:`~datacredit.evaluate.config.Execution` and
  how many jobs it found to run. How a build ran never changes its results, so a resume may use another one.

Order per finished job: its ``seconds`` then its ``outputs`` row are written and flagged done, so a job counts as
finished only when its outputs flag is set. Only the calling process writes. ``check_config`` refuses to resume a
store built with another config, recipe or data (StoreError naming each differing field).

One build per store: ``build_store`` holds the store's :class:`~datacredit.lock.BuildLock` for the whole build
(checking the config, writing ids and masks, every job), so two processes never train the same job or write the
manifest at once. A second build on the same directory fails at once naming the holder, or with ``wait=True``
waits for it and then runs only what is left. It also refuses a directory that holds another kind of artefact
(a saved Scores, another kind of build) unless ``overwrite=True``, which discards what is there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..dataset import example_ids
from ..errors import StoreError
from ..lock import BuildLock, LockedError
from ..store import Store
from .config import Execution
from .runner import Job, Retraining, run_jobs

__all__ = ["EXECUTION", "OUTPUTS", "SECONDS", "build_store", "check_config", "fingerprint", "run_in_memory",
           "run_stored", "train_seed"]

logger = logging.getLogger(__name__)

OUTPUTS, SECONDS, EXECUTION = "outputs", "seconds", "execution"
# what each kind of build (the "kind" of its config) is called in messages
KINDS = {"subsets": "subset ground truth (build_groundtruth)", "loo": "leave-one-out ground truth (build_loo)",
         "removal": "removal check (removal)", "selection": "selection check (selection)"}


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
    _check_kind(store, stored, config.get("kind"))
    if stored != config:
        keys = sorted(set(stored) | set(config))
        diff = [f"{k}: stored {stored.get(k)!r}, requested {config.get(k)!r}" for k in keys
                if stored.get(k) != config.get(k)]
        raise StoreError(f"{store.root} holds results built with other settings ({'; '.join(diff)}); "
                         "use another directory, or overwrite=True (--overwrite) to start afresh")
    return True


def _check_kind(store: Store, stored: Any, kind: str | None) -> None:
    """StoreError unless ``stored`` (the meta of a store's outputs) is the config of a build of this ``kind``."""
    have = stored.get("kind") if isinstance(stored, dict) else None
    if have != kind:
        raise StoreError(f"{store.root} holds a {KINDS.get(have, repr(have) + ' build')}, not a "
                         f"{KINDS.get(kind, repr(kind) + ' build')}; use another directory, or overwrite=True "
                         "(--overwrite) to replace it")


def _describe(store: Store, names: list[str]) -> str:
    """What the artefacts ``names`` of ``store`` are, for an error message: a Scores result, or their names."""
    if "values" in names:
        meta = store.info("values").get("meta")
        if isinstance(meta, dict) and "method" in meta:
            return f"a saved Scores result (method {meta['method']!r})"
    return f"artefacts of another kind ({', '.join(names)})"


@contextlib.contextmanager
def build_store(out_dir: str | os.PathLike[str], kind: str, own: Collection[str], *, wait: bool = False,
                overwrite: bool = False) -> Iterator[Store]:
    """Hold the build lock of ``out_dir`` and yield its Store, for a resumable build of ``kind`` (the "kind" of
    its config) that writes artefacts ``own``.

    Raises LockedError (a StoreError naming the holder's pid and host) if another process is building there,
    unless ``wait``: then it waits for that build to end, and the caller resumes whatever is left. Raises
    StoreError if ``out_dir`` is a file, holds another kind of build, or holds artefacts other than ``own`` (e.g.
    a saved Scores), unless ``overwrite``, which removes every artefact there first (the build starts afresh).
    """
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root} is a file, not a directory; the build needs a directory for its store")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{root}: cannot create the store directory ({exc.strerror or exc})") from exc
    lock = BuildLock(root)
    try:
        lock.acquire()
    except LockedError as exc:
        if not wait:
            raise
        logger.warning("waiting for the other build to finish, then resuming what it leaves: %s", exc)
        lock = BuildLock(root, wait=True).acquire()
    try:
        # everything below runs under the lock: the check of what is there, the config check, every write
        store = Store(root)
        names = store.names()
        if overwrite:
            for name in names:
                store.remove(name)
        else:
            if OUTPUTS in names:
                _check_kind(store, store.info(OUTPUTS)["meta"], kind)
            foreign = [n for n in names if n not in own]
            if foreign:
                raise StoreError(f"{root} holds {_describe(store, foreign)}, not a build's results; use another "
                                 "directory, or overwrite=True (--overwrite) to replace what is there")
        yield store
    finally:
        lock.release()


def expect_equal(store: Store, name: str, expected: np.ndarray) -> None:
    """StoreError unless artefact ``name`` equals ``expected`` (used on resume for ids, masks, removed ids)."""
    stored = store.load_array(name)
    if stored.shape != expected.shape or not np.array_equal(stored, expected):
        raise StoreError(f"{store.root}: stored {name!r} differs from this build's; use another directory")


def run_stored(store: Store, config: dict[str, Any], work: Retraining, jobs: Sequence[Job], *, resuming: bool,
               execution: Execution, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Run the jobs whose outputs are not yet flagged done and return ``(outputs, seconds)`` of all jobs:
    ``(n_jobs, n_measures, n_query)`` and ``(n_jobs,)``; ``config`` (the manifest's) is the outputs' meta, and
    ``execution`` is appended to the store's ``execution`` record. Call it inside ``build_store`` (which holds the
    build lock) after ``check_config`` (which gives ``resuming``)."""
    n_jobs, shape = len(jobs), (len(jobs), len(work.recipe.measures), len(work.queries))
    seconds = store.chunked(SECONDS, (n_jobs,), np.float64, n_jobs, overwrite=not resuming)
    outputs = store.chunked(OUTPUTS, shape, np.float64, n_jobs, meta=normalize(config))
    todo = outputs.pending()
    if resuming and len(todo) < n_jobs:
        logger.info("%s: resuming, %d of %d jobs already done", store.root, n_jobs - len(todo), n_jobs)
    calls = store.load_json(EXECUTION) if resuming and store.has(EXECUTION) else []
    store.save_json(EXECUTION, [*calls, {**asdict(execution), "jobs_to_run": len(todo)}])

    def on_result(j: int, out: np.ndarray, sec: float) -> None:
        seconds.write(j, j, sec)
        outputs.write(j, None, out[None])

    run_jobs(work, jobs, on_result, todo=todo, execution=execution, desc=desc)
    return store.load_array(OUTPUTS), store.load_array(SECONDS)


def run_in_memory(work: Retraining, jobs: Sequence[Job], *, execution: Execution, desc: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """As ``run_stored`` without a store (nothing resumes): ``(outputs, seconds)`` of all jobs."""
    outputs = np.empty((len(jobs), len(work.recipe.measures), len(work.queries)), dtype=np.float64)
    seconds = np.empty(len(jobs), dtype=np.float64)

    def on_result(j: int, out: np.ndarray, sec: float) -> None:
        outputs[j], seconds[j] = out, sec

    run_jobs(work, jobs, on_result, execution=execution, desc=desc)
    return outputs, seconds
