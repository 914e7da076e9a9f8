"""Run one method in its own (spawned) process, so that one that exhausts memory, hangs or crashes the interpreter
becomes an error row instead of taking the bench down, and no method inherits another's state (traker's logging
setup, dattri's shared projector defaults, kronfluence's process singleton, allocator caches).

The child loads the case from disk (model and trajectory are cached there), warms up, runs the method under the
timers of :mod:`.measure` and writes ``result.json`` (and the score matrix as ``.npy``) to a scratch directory. The
parent polls the child's resident memory every 0.2 s and stops it above ``Limits.memory_mb`` or after
``Limits.timeout_s``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datacredit.scores import Scores

from .cases import Case
from .measure import context, error_text, measure_mislabel, measure_scores, rss_bytes, warm_up
from .methods import MethodSpec

__all__ = ["DEFAULT_LIMITS", "Limits", "run_isolated"]

logger = logging.getLogger(__name__)

_POLL = 0.2


@dataclass(frozen=True)
class Limits:
    """What an isolated method may use before it is stopped: resident memory (MB) and wall time (s); None = no
    limit."""

    memory_mb: float | None = 8192
    timeout_s: float | None = 3600


DEFAULT_LIMITS = Limits()


def _child(case_name: str, root: str, method: str, mislabel: bool, out: str, threads: int) -> None:
    import torch

    from . import peers  # noqa: F401  (registers the peers in this process)
    from .cases import load_case
    from .methods import REGISTRY

    torch.set_num_threads(threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    out_dir = Path(out)
    try:
        case = load_case(case_name, root)
        spec = REGISTRY[method]
        warm_up(case, [spec])
        ctx, flipped_ids = context(case, mislabel)
        if mislabel:
            result = measure_mislabel(spec, ctx, flipped_ids)
        else:
            result, scores = measure_scores(spec, ctx)
            for name in ("values", "train_ids", "query_ids"):
                np.save(out_dir / f"{name}.npy", np.asarray(getattr(scores, name)), allow_pickle=False)
        result = {"status": "ok", **result}
    except Exception as exc:
        result = {"status": "error", "error": error_text(exc), "traceback": traceback.format_exc()}
    (out_dir / "result.json").write_text(json.dumps(result, default=float))


def _died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.Signals._value2member_map_ else -exitcode
        hint = " (the kernel's out-of-memory killer?)" if -exitcode == signal.SIGKILL else ""
        return f"the process was killed by {name}{hint}"
    return f"the process exited with code {exitcode} without a result"


def run_isolated(case: Case, spec: MethodSpec, *, mislabel: bool = False, threads: int = 1,
                 limits: Limits = DEFAULT_LIMITS) -> tuple[dict[str, Any], Scores | None]:
    """Measure ``spec`` on ``case`` in a child process with ``threads`` torch threads, stopped beyond ``limits``.

    Returns ``(result, scores)``: result ``{"status": "ok", "seconds", "cpu_seconds", "peak_mb"}`` (mislabel:
    plus ``auroc``, ``ap``; scores None) or ``{"status": "error", "error": ...}`` with scores None.
    """
    out = case.dir / "work" / f"{spec.name}{'-mislabel' if mislabel else ''}-result"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    proc = multiprocessing.get_context("spawn").Process(
        target=_child, args=(case.name, str(case.root), spec.name, mislabel, str(out), threads))
    start, stopped, peak = time.perf_counter(), None, 0
    proc.start()
    while proc.is_alive():
        proc.join(_POLL)
        rss = rss_bytes(proc.pid) or 0
        peak = max(peak, rss)
        if limits.memory_mb is not None and rss > limits.memory_mb * 2**20:
            stopped = f"stopped: resident memory above the {limits.memory_mb:.0f} MB limit"
        elif limits.timeout_s is not None and time.perf_counter() - start > limits.timeout_s:
            stopped = f"stopped: still running after the {limits.timeout_s:.0f} s limit"
        if stopped:
            proc.kill()
            proc.join()
            break
    result_file = out / "result.json"
    if stopped or not result_file.exists():
        return {"status": "error", "error": stopped or _died(proc.exitcode)}, None
    result = json.loads(result_file.read_text())
    result["process_peak_mb"] = peak / 2**20
    if result["status"] != "ok":
        logger.warning("%s failed in its process:\n%s", spec.name, result.pop("traceback", ""))
        return result, None
    if mislabel:
        return result, None
    arrays = {name: np.load(out / f"{name}.npy", allow_pickle=False) for name in ("values", "train_ids", "query_ids")}
    return result, Scores(arrays["values"], arrays["train_ids"], arrays["query_ids"], spec.name)
