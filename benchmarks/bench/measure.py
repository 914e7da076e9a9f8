"""Measuring one method: its context, one-time warm-up, time (CPU and wall), peak memory, and its scores or
mislabel-detection result. Used in-process and inside the isolated child processes of :mod:`.isolate`."""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from datacredit.evaluate import mislabel_detection
from datacredit.scores import Scores

from .cases import MODEL_SEED, Case
from .methods import Context, MethodSpec

__all__ = ["PeakRSS", "context", "error_text", "measure_mislabel", "measure_scores", "rss_bytes", "warm_up"]

logger = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident set size of a process (Linux ``/proc/<pid>/statm``), None where unavailable."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class PeakRSS:
    """Context manager: ``peak_mb`` = highest resident set size seen while inside, minus the size at entry (MiB).

    A background thread samples :func:`rss_bytes` every ``interval`` seconds (Linux; elsewhere ``peak_mb`` is NaN).
    Spikes shorter than the interval are missed, so it is a lower bound.
    """

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak_mb = interval, float("nan")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = self._max = 0

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            rss = rss_bytes()
            if rss is not None and rss > self._max:
                self._max = rss

    def __enter__(self) -> PeakRSS:
        start = rss_bytes()
        if start is not None:
            self._start = self._max = start
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak_mb = (max(self._max, rss_bytes() or 0) - self._start) / 2**20


@dataclass
class Timed:
    result: Any
    seconds: float  # wall
    cpu_seconds: float  # CPU time of this process, all threads: what a shared machine does not distort
    peak_mb: float

    def stats(self) -> dict[str, float]:
        return {"seconds": self.seconds, "cpu_seconds": self.cpu_seconds, "peak_mb": self.peak_mb}


def timed(fn, *args) -> Timed:
    with PeakRSS() as mem:
        start, cpu = time.perf_counter(), time.process_time()
        result = fn(*args)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return Timed(result, seconds, cpu, mem.peak_mb)


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return " ".join(text.split())[:300]


def context(case: Case, mislabel: bool = False) -> tuple[Context, np.ndarray | None]:
    """The method context on the case's model, or (``mislabel``) on the model trained with 10 % labels flipped;
    with the flipped ids in that case."""
    if not mislabel:
        ctx = Context(case=case, model=case.model, train=case.train, queries=case.queries, task=case.task(),
                      recipe=case.recipe, seed=MODEL_SEED, trajectory=case.trajectory_dir, workdir=case.dir / "work")
        return ctx, None
    flipped, flipped_ids, _, traj = case.mislabelled()
    ctx = Context(case=case, model=lambda: case.mislabelled()[2], train=flipped, queries=case.queries,
                  task=case.task(), recipe=case.recipe, seed=MODEL_SEED, trajectory=traj,
                  workdir=case.dir / "work" / "mislabel")
    return ctx, flipped_ids


def warm_up(case: Case, specs: list[MethodSpec]) -> None:
    """One-time costs out of every timing: the first optimizer step imports torch._dynamo (seconds on a loaded
    machine), the peers' imports. A method that cannot prepare fails later, in its own row."""
    case.recipe.train(case.train.subset(np.arange(min(8, len(case.train)))), MODEL_SEED)
    for spec in specs:
        if spec.prepare is not None and not spec.skip(case):
            try:
                spec.prepare()
            except Exception:
                logger.warning("%s: prepare failed:\n%s", spec.name, traceback.format_exc())


def measure_scores(spec: MethodSpec, ctx: Context) -> tuple[dict[str, float], Scores]:
    """Run ``spec`` (fit + score) under the timers: ``({"seconds", "cpu_seconds", "peak_mb"}, Scores)``."""
    got = timed(spec.run, ctx)
    return got.stats(), got.result


def measure_mislabel(spec: MethodSpec, ctx: Context, flipped_ids: np.ndarray) -> dict[str, Any]:
    """Mislabel-detection AUROC / AP of ``spec``'s self-values on the flipped-label model, with its timing."""
    got = timed(spec.self_values, ctx)
    values, higher = got.result
    result = mislabel_detection(values, flipped_ids, higher_is_suspicious=higher)
    return {"auroc": result["auroc"], "ap": result["ap"], **got.stats()}
