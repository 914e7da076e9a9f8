"""Why the planted random-label source gets positive credit on digits: path value against retraining, epoch by epoch.

The ``digits-classes`` case of ``source_credit.py`` (each class one source, plus 50 uniform-noise images with random
labels). After 30 epochs, retraining without the noise source changes the query losses by ~0 on average while most
methods credit it positively. This script separates *when* the credit is earned:

* In-Run Data Shapley (first order, targeted) on the full run with per-step history: the noise source's cumulative
  value after epoch e (summed over its 50 members, per query);
* retraining, with the same 10 seeds for both sets (common random numbers), for ``epochs = e``: the measured LOSO
  effect ``loss_without_noise(q) − loss_full(q)`` after e epochs (positive: the noise helped). The recipe has a
  constant learning rate, so an e-epoch run is the first e epochs of the 30-epoch run with the same seed.

If the noise helps early (a shared "grow the features" direction of every gradient) and the model later fits the
queries anyway, the path value stays positive while the endpoint effect goes to ~0. Usage::

    .venv/bin/python benchmarks/planted_noise.py [--seeds 10] [--out benchmarks/results/planted-noise-digits.json]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks.source_credit from this checkout when run as a script
    sys.path.append(str(ROOT))
from benchmarks.source_credit import make_digits  # noqa: E402
from datacredit.dataset import example_ids  # noqa: E402
from datacredit.evaluate import Execution  # noqa: E402
from datacredit.evaluate.runner import Retraining, run_jobs  # noqa: E402
from datacredit.store import atomic_write_json  # noqa: E402
from datacredit.training import InRunCallback  # noqa: E402

EPOCHS = (1, 2, 5, 10, 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/planted-noise-digits.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    case = make_digits()
    keys = case.sources.levels["source"]
    noise = keys == "random"
    steps_per_epoch = -(-len(keys) // case.recipe.batch_size)

    inrun = InRunCallback(case.task, case.queries, order=1, targeted=True, keep_history=True)
    case.recipe.train(case.train, 0, callbacks=[inrun])
    noise_ids = set(example_ids(case.train)[noise].tolist())
    per_epoch = np.zeros((case.recipe.epochs, len(case.queries)))
    for step, ids, part in inrun.shapley.history:
        rows = np.array([int(i) in noise_ids for i in ids])
        per_epoch[step // steps_per_epoch] += part[rows].sum(0)
    path = np.cumsum(per_epoch, axis=0)  # (epochs, Q): noise credit accumulated up to each epoch

    rows = []
    for epochs in EPOCHS:
        recipe = replace(case.recipe, epochs=epochs)
        jobs = [(np.flatnonzero(mask), s) for mask in (np.ones(len(keys), bool), ~noise) for s in range(args.seeds)]
        loss = np.zeros((len(jobs), len(case.queries)))

        def keep(j, out, sec, loss=loss):
            loss[j] = out[0]

        run_jobs(Retraining(recipe, case.train, case.queries), jobs, keep,
                 execution=Execution(workers=args.workers, progress=False))
        full, without = loss[: args.seeds], loss[args.seeds :]
        effect = without - full  # (seeds, Q), paired by seed
        measured = effect.mean(0)
        se = effect.mean(1).std(ddof=1) / np.sqrt(args.seeds)  # of the query-mean effect, across seeds
        credit = path[epochs - 1]
        rows.append({
            "epochs": epochs,
            "full_query_loss": float(full.mean()),
            "measured_mean": float(measured.mean()), "measured_mean_se": float(se),
            "measured_positive_queries": float((measured > 0).mean()),
            "inrun_path_mean": float(credit.mean()), "inrun_path_positive_queries": float((credit > 0).mean()),
            "spearman_over_queries": float(np.corrcoef(np.argsort(np.argsort(credit)),
                                                       np.argsort(np.argsort(measured)))[0, 1]),
        })
        print(rows[-1], file=sys.stderr)
    atomic_write_json(args.out, {"args": vars(args), "rows": rows,
                                 "inrun_path_by_epoch_mean": path.mean(1).tolist()})
    print("| epochs | full-model query loss | LOSO effect of the noise source (mean ± se over seeds) | queries helped "
          "| In-Run path value (mean) | queries credited > 0 | Spearman over queries |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['epochs']} | {r['full_query_loss']:.3f} | {r['measured_mean']:+.2e} ± {r['measured_mean_se']:.1e} "
              f"| {r['measured_positive_queries']:.2f} | {r['inrun_path_mean']:+.2e} | "
              f"{r['inrun_path_positive_queries']:.2f} | {r['spearman_over_queries']:.2f} |")


if __name__ == "__main__":
    main()
