"""Run retraining jobs — serially, in local processes, or as Ray tasks — and hand each result to the caller.

A job is ``(positions, seed)``: train the :class:`Retraining`'s recipe on its training examples at ``positions``
with training seed ``seed``, then evaluate every query. Its result is a float64 array ``(n_measures, n_query)`` in
the order of ``recipe.measures``. Every backend calls the same job function (``run_job``); results come back to the
calling process, which alone writes them anywhere (``on_result``), in completion order. How jobs run (workers,
backend, progress bars) is an :class:`~datacredit.evaluate.config.Execution`.

Backends:

* ``"serial"``: in this process, one job after another.
* ``"process"``: ``concurrent.futures.ProcessPoolExecutor`` with ``workers`` spawned processes, each limited to one
  torch thread. The Retraining (recipe and both datasets) is sent once per worker (pickled in memory for the
  hand-over only — nothing is pickled to disk), so the recipe must be a top-level, importable class.
  ``workers=1`` runs serially.
* ``"ray"``: one Ray task per job (``num_cpus=1``); connects to the cluster named by ``RAY_ADDRESS`` or starts a
  local one. Needs ``pip install ray``.

Ctrl-C, SIGTERM (as ``timeout``, a scheduler or systemd send) or any error cancels the jobs not yet started and
stops the worker processes; results already handed to ``on_result`` stay handed (a signal that arrives while
``on_result`` runs takes effect once it returns, so a result is never half written). SIGTERM then raises
``SystemExit(143)``. Worker processes die with their parent even when it is killed outright (SIGKILL): on Linux
the kernel kills them (``PR_SET_PDEATHSIG``), and everywhere a watchdog thread in each worker exits as soon as its
parent is gone, so no orphan keeps training for nothing.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import gc
import importlib.util
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from ..dataset import example_ids
from ..errors import DataError, NonFiniteError
from .config import BACKENDS, Execution

__all__ = ["BACKENDS", "Job", "JobList", "Retraining", "check_backend", "run_job", "run_jobs", "take"]

logger = logging.getLogger(__name__)

Job = tuple[np.ndarray, int]  # (positions of the training examples to train on, training seed)
OnResult = Callable[[int, np.ndarray, float], None]  # (job index, outputs (n_measures, n_query), seconds)

_IN_FLIGHT_PER_WORKER = 2
_WORKER: dict[str, Retraining] = {}  # per worker process: the Retraining, set once by _init_worker
_WATCH_PARENT_S = 0.25  # how often a worker checks that its parent is alive (where PR_SET_PDEATHSIG is missing)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_STOP_WORKERS_S = 5.0  # grace period for workers to exit on SIGTERM before they are killed
RAY_MISSING = ("backend='ray' needs Ray, which is not installed: pip install ray (or pip install 'datacredit[ray]'), "
               "or use backend='process'")


def check_backend(backend: str) -> None:
    """ValueError for an unknown backend, ImportError (saying what to install) for Ray when it is missing; cheap,
    so builds call it before any work."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ImportError(RAY_MISSING)


@dataclass(frozen=True)
class Retraining:
    """What every job of one build shares: the recipe (``train(dataset, seed)``, ``evaluate(model, queries)``,
    ``measures``), the training set that a job's positions index, and the queries every model is evaluated on."""

    recipe: Any
    train: Dataset
    queries: Dataset


class JobList(Sequence[Job]):
    """``n`` jobs built on access by ``make(j) -> (positions, seed)``, so a long job list (leave-one-out over a
    large training set) never holds every job's positions in memory at once."""

    def __init__(self, n: int, make: Callable[[int], Job]) -> None:
        self._n, self._make = int(n), make

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, j: int) -> Job:  # type: ignore[override]
        if not 0 <= j < self._n:
            raise IndexError(f"job {j} out of range [0, {self._n})")
        return self._make(j)


def take(dataset: Dataset, positions: np.ndarray) -> Dataset:
    """The examples of ``dataset`` at ``positions`` (not ids), keeping their ids: ``.subset`` or a ``Subset``."""
    if hasattr(dataset, "subset"):
        return dataset.subset(positions)
    return Subset(dataset, positions.tolist())


def run_job(work: Retraining, positions: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """Train ``work.recipe`` on ``work.train[positions]`` with ``seed``, evaluate ``work.queries``.

    Returns ``(outputs, seconds)``: outputs ``(n_measures, n_query)`` float64 in ``recipe.measures`` order, and
    the wall time of training plus evaluation. Raises DataError for missing or misshapen measures and
    NonFiniteError for NaN/inf outputs (naming the query ids).
    """
    recipe, queries = work.recipe, work.queries
    start = time.perf_counter()
    model = recipe.train(take(work.train, positions), int(seed))
    got = recipe.evaluate(model, queries)
    seconds = time.perf_counter() - start
    n_query = len(queries)
    missing = [m for m in recipe.measures if m not in got]
    if missing:
        raise DataError(f"{type(recipe).__name__}.evaluate returned {sorted(got)}, missing measures {missing}")
    rows = []
    for name in recipe.measures:
        row = np.asarray(got[name], dtype=np.float64)
        if row.shape != (n_query,):
            raise DataError(f"{type(recipe).__name__}.evaluate: measure {name!r} has shape {row.shape}, "
                            f"expected ({n_query},)")
        if not np.isfinite(row).all():
            bad = example_ids(queries)[~np.isfinite(row)][:5].tolist()
            raise NonFiniteError(f"measure {name!r} is not finite for query ids {bad} after training on "
                                 f"{len(positions)} examples with seed {seed} (did training diverge?)")
        rows.append(row)
    return np.stack(rows), seconds


def _die_with_parent(parent: int) -> None:
    """Make this worker process exit when process ``parent`` (the one that started it) dies, however it dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no libc prctl (unusual libc): the watchdog suffices
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:  # once the parent is gone the worker is re-parented (pid 1 or a subreaper)
            time.sleep(_WATCH_PARENT_S)
        os._exit(1)  # skip atexit and finalizers: nothing of the worker's is worth saving

    threading.Thread(target=watch, name="datacredit-parent-watchdog", daemon=True).start()


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread for the duration; one that arrives meanwhile is delivered right after.

    Ctrl-C in a terminal (or ``timeout -s INT``) signals the whole process group, workers included. The parent
    handles it (and stops the workers), so workers ignore it; but a worker spends seconds importing torch before its
    initializer can say so. A spawned worker inherits the signal mask of the thread that spawned it, so spawning
    under this block keeps its Ctrl-C pending until ``_init_worker`` ignores (hence discards) it, instead of a
    KeyboardInterrupt traceback from every starting worker.
    """
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _init_worker(payload: bytes, parent: int) -> None:
    _die_with_parent(parent)
    # Ctrl-C is the parent's to handle (see _sigint_blocked): ignore it, then unblock what spawning blocked
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    torch.set_num_threads(1)
    _WORKER["work"] = pickle.loads(payload)


def _worker_job(positions: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    return run_job(_WORKER["work"], positions, seed)


def _ray_job(work: Retraining, positions: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    torch.set_num_threads(1)
    return run_job(work, positions, seed)


def run_jobs(work: Retraining, jobs: Sequence[Job], on_result: OnResult, *, todo: Sequence[int] | None = None,
             execution: Execution | None = None, desc: str = "retrain") -> None:
    """Run ``jobs[j]`` for each ``j`` in ``todo`` (default: all) and call ``on_result(j, outputs, seconds)``
    in this process as each finishes, as ``execution`` says (default ``Execution()``: workers, backend, progress;
    its wait and overwrite concern stores and are not used here). The progress bar counts jobs not in ``todo`` as
    already done."""
    if not isinstance(work, Retraining):
        raise TypeError(f"run_jobs takes a Retraining(recipe, train, queries) first, got {type(work).__name__}: "
                        "run_jobs(Retraining(recipe, train, queries), jobs, on_result, todo=..., "
                        "execution=Execution(workers=..., progress=...))")
    execution = Execution() if execution is None else execution
    backend, workers = execution.backend, execution.workers
    check_backend(backend)
    todo = list(range(len(jobs))) if todo is None else [int(j) for j in todo]
    if not todo:
        return
    logger.info("%d of %d retraining jobs to run (backend=%s, workers=%d)", len(todo), len(jobs), backend, workers)
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="run", disable=not execution.progress,
               dynamic_ncols=True)
    signals = _Signals()

    def done(j: int, result: tuple[np.ndarray, float]) -> None:
        with signals.deferred():
            on_result(j, *result)
        bar.update(1)

    try:
        with signals.installed():
            if backend == "serial" or (backend == "process" and workers == 1):
                for j in todo:
                    done(j, _guard(j, jobs, lambda j=j: run_job(work, *jobs[j])))
            elif backend == "process":
                _run_processes(work, jobs, todo, done, workers)
            else:
                _run_ray(work, jobs, todo, done)
    finally:
        bar.close()


class _Signals:
    """SIGINT and SIGTERM as exceptions (KeyboardInterrupt, SystemExit(128 + 15)) raised in the main thread, but
    held back while a result is being written (``deferred``), so a signal never leaves half a result behind."""

    def __init__(self) -> None:
        self._critical = False
        self._pending: int | None = None

    def _raise(self, signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.warning("signal %d received: stopping; finished jobs are kept, rerun to resume", signum)
        raise SystemExit(128 + signum)

    def _handler(self, signum: int, frame: object) -> None:
        if self._critical:
            self._pending = signum
        else:
            self._raise(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Install the handlers for the duration (only from the main thread, the only one Python lets)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        # keep an ignored or custom SIGINT (e.g. a caller's own handler) as it is; replace only the defaults
        ours = [s for s, h in old.items() if h in (signal.SIG_DFL, signal.default_int_handler)]
        for s in ours:
            signal.signal(s, self._handler)
        try:
            yield
        finally:
            for s in ours:
                signal.signal(s, old[s])

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        if self._pending is not None:
            signum, self._pending = self._pending, None
            self._raise(signum)


def _guard(j: int, jobs: Sequence[Job], call: Callable[[], Any]) -> Any:
    """``call()``, logging which job failed before the error propagates."""
    try:
        return call()
    except Exception:
        logger.error("retraining job %d (%d examples, seed %d) failed", j, len(jobs[j][0]), jobs[j][1])
        raise


def _run_processes(work: Retraining, jobs: Sequence[Job], todo: list[int],
                   done: Callable[[int, tuple[np.ndarray, float]], None], workers: int) -> None:
    try:
        payload = pickle.dumps(work, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise DataError(f"backend='process' sends the recipe and datasets to worker processes, but they cannot "
                        f"be pickled ({exc}); define the recipe class at the top level of an importable module, "
                        "or use backend='serial'") from exc
    workers = min(workers, len(todo))
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_init_worker, initargs=(payload, os.getpid()))
    queue, running = iter(todo), {}
    try:
        while True:
            # keep 2 jobs per worker in flight, so job arguments are built as needed, not all up front
            with _sigint_blocked():  # a submit may spawn a worker
                for j in itertools.islice(queue, _IN_FLIGHT_PER_WORKER * workers - len(running)):
                    running[pool.submit(_worker_job, *jobs[j])] = j
            if not running:
                break
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                j = running.pop(future)
                done(j, _guard(j, jobs, future.result))
    except BaseException:
        # ProcessPoolExecutor has no public way to stop running work; _processes (pid -> Process, since 3.2) is
        # read before shutdown, which drops it
        procs = [p for p in (getattr(pool, "_processes", None) or {}).values() if p is not None]
        _stop_workers(procs)
        # with its workers gone the pool is broken and its manager thread ends at once; joining it frees the
        # pool's queues now (else their semaphores are reported as leaked at exit)
        pool.shutdown(wait=True, cancel_futures=True)
        gc.collect()  # the queues sit in reference cycles: collect them now, while the resource tracker listens
        raise
    pool.shutdown(wait=True)


def _stop_workers(procs: list[multiprocessing.process.BaseProcess]) -> None:
    """Terminate the pool's workers (their running jobs are abandoned: the build stops, or failed); without this
    an interrupted build would wait at exit for every running job to finish."""
    for proc in procs:
        with contextlib.suppress(OSError, ValueError):
            proc.terminate()
    deadline = time.monotonic() + _STOP_WORKERS_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            with contextlib.suppress(OSError, ValueError):
                proc.kill()
    logger.info("stopped %d worker processes", len(procs))


def _run_ray(work: Retraining, jobs: Sequence[Job], todo: list[int],
             done: Callable[[int, tuple[np.ndarray, float]], None]) -> None:
    try:
        import ray
    except ImportError:
        raise ImportError(RAY_MISSING) from None
    if not ray.is_initialized():
        ray.init()  # joins the cluster in RAY_ADDRESS if set, else starts a local one
    task = ray.remote(num_cpus=1)(_ray_job)
    shared = ray.put(work)
    window = _IN_FLIGHT_PER_WORKER * max(1, int(ray.cluster_resources().get("CPU", 1)))
    queue, running = iter(todo), {}
    try:
        while True:
            for j in itertools.islice(queue, window - len(running)):
                running[task.remote(shared, *jobs[j])] = j
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                j = running.pop(ref)
                done(j, _guard(j, jobs, lambda ref=ref: ray.get(ref)))
    except BaseException:
        for ref in running:
            ray.cancel(ref)
        raise
