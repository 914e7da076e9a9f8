"""The end-to-end demo on bundled data (sklearn digits, no download).

Trains a small MLP on digits with 10 % of the training labels flipped, recording In-Run Data Shapley values as it
trains; runs the post-hoc methods on test queries; checks them against a small cached ground truth (LDS); flags likely
mislabelled images; writes a self-contained HTML report and prints where it is.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from .data import flip_labels, load_digits
from .dataset import ArrayDataset
from .errors import DataError
from .scores import Scores
from .task import ClassificationTask
from .training import InRunCallback

SHADES = " .:-=+*#%@"
DEFER_STEPS = 64  # In-Run values of this many steps computed together (InRunShapley defer_steps): same values
# recorded / plain training CPU time of the demo's run and the nearest cheaper choice, from
# benchmarks/inrun_demo_overhead.py (benchmarks/INRUN.md, "Issue 16, third pass"): printed as context
RECORDING_COST = "about 2.7x"
SUBSAMPLE_NOTE = ("a per-step random subsample of 64 validation images would cost about 2.2x at a relative error of "
                  "0.3 (AUROC 0.696 instead of 0.711)")


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` measured. lds: method -> mean LDS on the demo's ground truth (higher is better);
    detection: detector -> ``mislabel_detection`` result (``auroc``, ``ap``, ...); accuracy: test accuracy."""

    report: Path
    lds: dict[str, float]
    detection: dict[str, dict[str, float]]
    accuracy: float


def ascii_digit(pixels: torch.Tensor) -> list[str]:
    """An 8×8 image in [0, 1] as 8 lines of characters, two per pixel so it keeps its shape."""
    img = pixels.reshape(8, 8).clamp(0, 1)
    return ["".join(SHADES[int(v * (len(SHADES) - 1))] * 2 for v in row) for row in img]


def show_query(scores: Scores, q: int, train: ArrayDataset, test: ArrayDataset, k: int = 3) -> str:
    """The query image beside its top-k proponents (helped most) and opponents (hurt most)."""
    by_id = {int(i): r for r, i in enumerate(train.ids)}
    qx, qy = test[q]
    panels = [(f"query {int(test.ids[q])} (y={int(qy)})", qx)]
    for label, items in (("+", scores.topk(k, q)), ("-", scores.bottomk(k, q))):
        for train_id, value in items:
            x, y = train[by_id[train_id]]
            panels.append((f"{label} id {train_id} y={int(y)} {value:+.2g}", x))
    width = max(len(t) for t, _ in panels) + 2
    grids = [ascii_digit(x) for _, x in panels]
    lines = ["".join(t.ljust(width) for t, _ in panels)]
    lines += ["".join(g[r].ljust(width) for g in grids) for r in range(8)]
    return "\n".join(lines)


def run_demo(out: str | Path = "runs/demo", n_queries: int = 30, m: int = 40, workers: int = 2, seed: int = 0,
             progress: bool = True) -> DemoResult:
    """Run the demo; returns the report's path and the metrics it shows (:class:`DemoResult`). Cached ground truth
    is reused from ``out/gt`` on a second run.

    Every argument is checked before any training (DataError naming it), not after minutes of work."""
    from . import evaluate
    from .evaluate import ClassifierRecipe, build_groundtruth
    from .methods import GradDot, Influence
    from .methods.trak import TRAK
    from .report import as_examples, render_report, save_run

    out = Path(out)
    if int(m) < 3 or int(workers) < 1 or int(n_queries) < 1:
        raise DataError(f"the demo needs m >= 3 retrainings (for rank correlations), workers >= 1 and at least one "
                        f"query; got m={m}, workers={workers}, n_queries={n_queries}")
    for path in (out, out / "gt"):
        if path.exists() and not path.is_dir():
            raise DataError(f"{path}: is a file; the demo writes a run directory there")
    torch.manual_seed(seed)
    clean, test = load_digits(seed=seed)
    if n_queries >= len(test):
        raise DataError(f"n_queries={n_queries}, but the digits test split has {len(test)} images and the demo keeps "
                        "at least one for validation; use fewer queries")
    train, flipped = flip_labels(clean, 0.1, seed, 10)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(test))
    queries, validation = test.subset(np.sort(order[:n_queries])), test.subset(np.sort(order[n_queries:]))
    print(f"digits: {len(train)} training images ({len(flipped)} with flipped labels), {len(queries)} test queries, "
          f"{len(validation)} validation images (bundled with scikit-learn, no download)")

    recipe = ClassifierRecipe(64, 10, hidden=(64,))
    task = ClassificationTask()
    # exact first-order values against the whole validation set. On a model this small a step's validation pass
    # and per-layer dots are mostly per-call overhead, so nothing is captured while training (replay): the values of
    # DEFER_STEPS steps are recomputed together from their parameters and batches (looked up by id in `train`),
    # every step checked against the gradient the optimizer received (the loss is task.loss(...).mean())
    recorder = InRunCallback(task, validation.tensors, order=1, targeted=False, keep_history=True,
                             defer_steps=DEFER_STEPS, replay="mean", data=train)
    start = time.perf_counter()
    # the recipe's seed-`seed` model (what the ground truth retrains), with In-Run values recorded as it trains
    model = recipe.train(train, seed, callbacks=[recorder], progress=progress)
    shapley = recorder.shapley
    inrun_values = shapley.values()
    accuracy = (model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
    print(f"MLP 64-64-10 trained with In-Run Shapley recording in {time.perf_counter() - start:.1f} s: "
          f"test accuracy {accuracy:.3f}")
    print(f"In-Run values: exact first order, each step's contribution to the loss on all {len(validation)} "
          f"validation images (batch {recipe.batch_size}), replayed {DEFER_STEPS} steps at a time from the saved "
          "parameters and batches, each step checked against the optimizer's gradient. Recording costs "
          f"{RECORDING_COST} plain training CPU time on this tiny model (the validation pass is 5x a training "
          f"batch); {SUBSAMPLE_NOTE} (benchmarks/INRUN.md)")

    methods = {
        "grad-dot": GradDot(model, task, progress=progress),
        "grad-cos": GradDot(model, task, normalize=True, progress=progress),
        "influence-ekfac": Influence(model, task, curvature="ekfac", progress=progress),
        "trak": TRAK(model, ClassificationTask(measurement="margin"), projection=1024, progress=progress),
    }
    scores, seconds = {}, {}
    for name, method in methods.items():
        start = time.perf_counter()
        scores[name] = method.fit(train).score(queries)
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {len(train)} × {len(queries)} scores in {seconds[name]:.2f} s")

    print(f"\nground truth: {m} retrainings on random halves (cached in {out / 'gt'}) ...")
    start = time.perf_counter()
    gt = build_groundtruth(recipe, train, queries, out / "gt", m=m, alpha=0.5, seeds=1, seed=seed, workers=workers,
                           progress=progress)
    print(f"ground truth ready in {time.perf_counter() - start:.1f} s")
    rows = []
    for name, s in scores.items():
        result = evaluate.lds(s, gt, bootstrap=200, seed=seed)
        rows.append({"method": name, "lds": result.mean, "lds_ci_low": result.ci_low, "lds_ci_high": result.ci_high,
                     "time_s": seconds[name]})
    self_influence = methods["grad-dot"].self_scores()
    detection = {
        "In-Run Shapley (low value)": evaluate.mislabel_detection(inrun_values, flipped, higher_is_suspicious=False),
        "Grad-Dot self-influence (high)": evaluate.mislabel_detection(self_influence, flipped,
                                                                      higher_is_suspicious=True),
    }
    print("\nLDS (Spearman with retrained models' negated loss; higher is better):")
    for row in rows:
        print(f"  {row['method']:16s} {row['lds']:+.3f}  [{row['lds_ci_low']:+.3f}, {row['lds_ci_high']:+.3f}]  "
              f"{row['time_s']:.2f} s")
    print("\nMislabel detection (10 % flipped labels):")
    for name, d in detection.items():
        print(f"  {name:32s} AUROC {d['auroc']:.3f}  AP {d['ap']:.3f}  precision@{d['k']} {d['precision_at_k']:.2f}")

    print("\nPositive score = the training image helps the query (lowers its loss). Influence (EK-FAC):")
    for q in range(min(2, len(queries))):
        print()
        print(show_query(scores["influence-ekfac"], q, train, queries))

    notes = "\n\n".join([
        f"Test accuracy {accuracy:.3f}. Ground truth: {m} retrainings on random halves of the training set, 1 seed.",
        *(f"Mislabel detection by {name}: AUROC {d['auroc']:.3f}, AP {d['ap']:.3f}." for name, d in detection.items()),
    ])
    save_run(out, scores=scores, values={"inrun": inrun_values, "self-influence": self_influence}, metrics=rows,
             history=shapley.history, train_items=as_examples(train), query_items=as_examples(queries),
             flipped_ids=flipped,
             run={"title": "datacredit demo: digits with 10 % flipped labels", "kind": "image", "image_shape": [8, 8],
                  "suspicious": {"inrun": "low", "self-influence": "high"}, "notes": notes})
    report = render_report(out)
    print(f"\nreport: {report.resolve()}")
    return DemoResult(report, {row["method"]: float(row["lds"]) for row in rows}, detection, accuracy)
