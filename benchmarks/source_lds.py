"""SOURCE vs EK-FAC influence, TracIn, TRAK and Grad-Dot by LDS, on a converged and a non-converged digits MLP.

    .venv/bin/python benchmarks/source_lds.py [--m 50] [--out runs/bench/source]

The model under attribution is the recipe's seed-0 model, trained by the very loop the ground truth retrains with
(`datacredit.training.train_classifier`: SGD, momentum 0.9), recording 6 equally spaced checkpoints for SOURCE
and TracIn.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import datacredit as dc
from datacredit.evaluate import ClassifierRecipe, Execution, SubsetConfig, build_groundtruth, lds
from datacredit.training import TrajectoryCallback


def train_recorded(recipe: ClassifierRecipe, train, seed: int, out: Path) -> tuple[torch.nn.Module, dc.Trajectory]:
    """The recipe's seed-``seed`` model trained by its own loop, checkpointing 6 times (optimizer state kept)."""
    checkpoints = TrajectoryCallback(str(out), 6, keep_optimizer="last")
    model = recipe.train(train, seed, callbacks=[checkpoints])
    return model, checkpoints.recorder.trajectory()


def run(epochs: int, m: int, out: Path) -> list[dict]:
    train, test = dc.data.load_digits()
    queries = test.subset(np.arange(50))
    recipe = ClassifierRecipe(64, 10, hidden=(64,), epochs=epochs)
    start = time.perf_counter()
    gt = build_groundtruth(recipe, train, queries, out / f"gt-{epochs}ep", SubsetConfig(m=m, seeds=2),
                           execution=Execution(workers=2, progress=False))
    gt_seconds = time.perf_counter() - start
    model, traj = train_recorded(recipe, train, 0, out / f"traj-{epochs}ep")
    task = dc.ClassificationTask()
    methods = {
        "source (ekfac, L=3)": lambda: dc.Source(model, task, traj, segments=3, progress=False),
        "influence-ekfac": lambda: dc.Influence(model, task, curvature="ekfac", progress=False),
        "tracin (6 ckpts)": lambda: dc.TracIn(model, task, traj, progress=False),
        "trak (k=1024)": lambda: dc.TRAK(model, dc.ClassificationTask(measurement="margin"), projection=1024,
                                         progress=False),
        "grad-dot": lambda: dc.GradDot(model, task, progress=False),
    }
    rows = []
    for name, make in methods.items():
        start = time.perf_counter()
        scores = make().fit(train).score(queries)
        seconds = time.perf_counter() - start
        result = lds(scores, gt, bootstrap=500)
        rows.append({"epochs": epochs, "method": name, "lds": result.mean, "ci_low": result.ci_low,
                     "ci_high": result.ci_high, "noise_ceiling": result.noise_ceiling, "seconds": seconds,
                     "groundtruth_seconds": gt_seconds})
        print(f"{epochs:>2} epochs  {name:22s} LDS {result.mean:+.3f} [{result.ci_low:+.3f}, {result.ci_high:+.3f}]"
              f"  {seconds:6.2f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=50)
    parser.add_argument("--out", default="runs/bench/source")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = run(2, args.m, out) + run(30, args.m, out)
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/source_lds.json").write_text(json.dumps(rows, indent=1))
    print("\n| epochs | method | LDS [95 % CI] | noise ceiling | fit+score s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['epochs']} | {r['method']} | {r['lds']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | "
              f"{r['noise_ceiling']:.3f} | {r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
