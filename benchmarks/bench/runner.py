"""Run the selected methods on a case, time them, score them against the cached ground truth, write the results.

Per method (one row): attribution time (fit + score, everything the method's ``run`` does) as CPU time of its
process and as wall time — on a shared machine the CPU time is the stable one, and the ours / peer ratios use it —;
the peak resident memory above the level when it started (sampled every 10 ms; approximate); LDS on the loss with
its bootstrap 95 % interval; and, when asked, mislabel-detection AUROC (10 % of training labels flipped, a model
trained on them, training examples ranked by self-influence or In-Run value). A method that raises, runs out of
memory or time becomes a row ``error: ...``; one that does not apply, ``skipped: <why>``. For each peer with a
matched method of ours: ``ours / peer`` CPU time and the correlation of the two score matrices.

By default every method runs in its own process (:mod:`.isolate`) within ``Limits``; ``isolate=None`` runs them in
this process.
Writes ``<case dir>/results.json`` and ``results.md`` (``quick``: ``results-quick.*``), rewritten after every row.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datacredit.evaluate import GroundTruth, lds
from datacredit.scores import Scores

from . import peers as _peers  # noqa: F401  (registers the peers)
from .cases import MODEL_SEED, Case
from .isolate import DEFAULT_LIMITS, Limits, run_isolated
from .measure import context, error_text, measure_mislabel, measure_scores, timed, warm_up
from .methods import MethodSpec, numel, pearson_per_query, selection
from .report import markdown

__all__ = ["run_bench"]

logger = logging.getLogger(__name__)


def _lds_row(scores: Scores, gt: GroundTruth) -> dict[str, Any]:
    # LDS on the loss only: for cross-entropy the loss is −log σ(margin), a decreasing function of the margin, so
    # the LDS on the margin is the same with one seed and nearly the same averaged over seeds.
    res = lds(scores, gt, "loss")
    return {"lds_loss": {"mean": res.mean, "ci": [res.ci_low, res.ci_high]}}


class _Executor:
    """Measures a method's scores or mislabel result, in a child process or in this one."""

    def __init__(self, case: Case, limits: Limits | None):
        self.case, self.limits = case, limits

    def scores(self, spec: MethodSpec) -> tuple[dict[str, Any], Scores | None]:
        if self.limits is not None:
            return run_isolated(self.case, spec, threads=torch.get_num_threads(), limits=self.limits)
        try:
            stats, scores = measure_scores(spec, context(self.case)[0])
            return {"status": "ok", **stats}, scores
        except Exception as exc:  # a failing method (a peer above all) is a row of the table, not a crash
            logger.warning("%s failed:\n%s", spec.name, traceback.format_exc())
            return {"status": "error", "error": error_text(exc)}, None

    def mislabel(self, spec: MethodSpec) -> dict[str, Any]:
        if self.limits is not None:
            result, _ = run_isolated(self.case, spec, mislabel=True, threads=torch.get_num_threads(),
                                     limits=self.limits)
        else:
            try:
                ctx, flipped_ids = context(self.case, mislabel=True)
                result = {"status": "ok", **measure_mislabel(spec, ctx, flipped_ids)}
            except Exception as exc:
                logger.warning("%s mislabel detection failed:\n%s", spec.name, traceback.format_exc())
                result = {"status": "error", "error": error_text(exc)}
        return result


def _pairs(rows: list[dict[str, Any]], scores: dict[str, Scores]) -> None:
    """Add ``ours/peer`` time ratios and score correlations to the peer rows whose pair ran."""
    by_name = {r["method"]: r for r in rows}
    for row in rows:
        ours = by_name.get(row.get("pair") or "")
        if row["status"] != "ok" or ours is None or ours["status"] != "ok":
            continue
        # ours / peer in CPU time (robust to other jobs on a shared machine): < 1 = we are faster
        row["time_ratio"] = ours["cpu_seconds"] / row["cpu_seconds"]
        row["wall_ratio"] = ours["seconds"] / row["seconds"]
        row["r_vs_ours"] = pearson_per_query(scores[row["method"]], scores[row["pair"]])


def _machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "load_average": load, "platform": platform.platform()}


def run_bench(case: Case, methods: list[str] | None = None, *, peers: bool = False, quick: bool = False,
              mislabel: bool | None = None, out: str | Path | None = None, progress: bool = True,
              isolate: Limits | None = DEFAULT_LIMITS) -> dict[str, Any]:
    """Run the selected methods on ``case``; returns the results (also written as JSON + markdown).

    methods: registry names (default: ours, ``quick``: the quick subset); peers: add every peer.
    quick: the tiny ground truth (m=8, one seed) and no mislabel detection — a smoke run.
    mislabel: run mislabel detection (default: on for full runs of classification cases).
    isolate: each method in its own process, stopped beyond these :class:`Limits` (memory, time); None: every
    method in this process.
    """
    os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' own progress bars
    specs = selection(methods, peers=peers, quick=quick)
    gt = case.groundtruth(quick=quick, progress=progress)
    model = case.model()
    warm_up(case, [] if isolate is not None else specs)
    plain = timed(case.recipe.train, case.train, MODEL_SEED)  # one training run, measured in this run
    limits = {"threads": torch.get_num_threads(), "memory_limit_mb": None if isolate is None else isolate.memory_mb,
              "timeout_s": None if isolate is None else isolate.timeout_s}
    run = _Executor(case, isolate)
    results = {
        "case": case.name, "description": case.spec.description, "date": datetime.date.today().isoformat(),
        "quick": quick, "n_train": len(case.train), "n_query": len(case.queries), "parameters": numel(model),
        "train_seconds": plain.seconds, "train_cpu_seconds": plain.cpu_seconds,
        "train_seconds_cached_model": case.train_seconds(),
        "groundtruth": {"dir": str(case.gt_dir(quick)), "m": gt.m, "seeds": gt.seeds,
                        "alpha": gt.config.get("alpha"), "retrain_seconds_median": _median(gt.seconds),
                        "retrain_seconds_total": _total(gt.seconds), "noise_ceiling_loss": gt.seed_agreement("loss")},
        "isolated": isolate is not None, "limits": limits, "machine": _machine(), "rows": [],
    }
    out = case.dir if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "results-quick" if quick else "results"
    rows, scores = results["rows"], {}
    for spec in specs:
        row: dict[str, Any] = {"method": spec.name, "family": spec.family, "pair": spec.pair, "note": spec.note}
        reason = spec.skip(case)
        if reason:
            rows.append({**row, "status": "skipped", "reason": reason})
            continue
        logger.info("%s: running %s", case.name, spec.name)
        result, got = run.scores(spec)
        row.update(result)
        if got is not None:
            scores[spec.name] = got
            row.update(_lds_row(got, gt))
            logger.info("%s: %.2f s CPU, %.2f s wall, LDS %.3f", spec.name, row["cpu_seconds"], row["seconds"],
                        row["lds_loss"]["mean"])
        rows.append(row)
        _write(out, stem, results)
    _pairs(rows, scores)
    if mislabel is None:
        mislabel = case.spec.classification and not quick
    if mislabel and case.spec.classification:
        for row, spec in ((r, s) for r, s in zip(rows, specs) if r["status"] == "ok" and s.self_values):
            logger.info("%s: mislabel detection with %s", case.name, spec.name)
            row["mislabel"] = run.mislabel(spec)
            _write(out, stem, results)
    _write(out, stem, results)
    return results


def _write(out: Path, stem: str, results: dict[str, Any]) -> None:
    (out / f"{stem}.json").write_text(json.dumps(_finite(results), indent=1, default=_json_default) + "\n")
    (out / f"{stem}.md").write_text(markdown(results))


def _median(seconds: np.ndarray | None) -> float | None:
    if seconds is None or not np.isfinite(seconds).any():
        return None
    return float(np.nanmedian(seconds))


def _total(seconds: np.ndarray | None) -> float | None:
    if seconds is None or not np.isfinite(seconds).any():
        return None
    return float(np.nansum(seconds))


def _finite(obj: Any) -> Any:
    """NaN / inf floats as None, so the JSON is strict."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
