"""In-Run recording cost in the demo's own training run (digits MLP 64-64-10, batch 64, SGD + momentum, 30 epochs =
690 steps, 329 validation images), and what each validation choice costs in fidelity.

For every row: total CPU seconds of the 690 training steps with first-order In-Run recording against plain training,
interleaved (plain, then every row, three rounds; medians), one torch thread; then the mislabel-detection AUROC of
the recorded values (seed 0, the timed run, and seed 1, one more run) and their relative error and Spearman
correlation against the exact values of the same seed. Rows: the exact value against all 329 images by the per-step
route, the batched capture route (``defer_steps=64``) and the replay route (``defer_steps=64, replay="mean"``,
nothing captured during training); a per-step random validation subsample of k images (unbiased estimate of the
exact value, ``validation_subsample=k``) on the replay route; a fixed random subset of k images (the exact value
for a smaller validation set, not an estimate of the full one).

    .venv/bin/python benchmarks/inrun_demo_overhead.py            # -> results/inrun_demo_overhead.json (~2 min)
    .venv/bin/python benchmarks/inrun_demo_overhead.py --profile  # where the replay route's time goes (no JSON)
"""

from __future__ import annotations

import argparse
import collections
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from datacredit import ClassificationTask
from datacredit.data import flip_labels, load_digits
from datacredit.evaluate import ClassifierRecipe, mislabel_detection
from datacredit.methods import inrun, inrun_batched, inrun_replay
from datacredit.store import atomic_write_json
from datacredit.training import InRunCallback, train_classifier

OUT = Path(__file__).parent / "results" / "inrun_demo_overhead.json"
REPLAY = {"defer_steps": 64, "replay": "mean"}
ROWS = {  # label -> (validation images: None = all 329, or a fixed subset of k; InRunShapley options)
    "329 images, exact, per-step route": (None, {}),
    "329 images, exact, defer_steps=64 (capture)": (None, {"defer_steps": 64}),
    "329 images, exact, defer_steps=64, replay": (None, REPLAY),
    "subsample 64 per step (unbiased), replay": (None, {**REPLAY, "validation_subsample": 64}),
    "subsample 32 per step (unbiased), replay": (None, {**REPLAY, "validation_subsample": 32}),
    "subsample 16 per step (unbiased), replay": (None, {**REPLAY, "validation_subsample": 16}),
    "fixed subset of 64 (exact for it), replay": (64, REPLAY),
    "fixed subset of 32 (exact for it), replay": (32, REPLAY),
}


def setup(seed: int):
    """The demo's data for ``seed``: training set (10 % labels flipped), flipped ids, validation tensors."""
    clean, test = load_digits(seed=seed)
    train, flipped = flip_labels(clean, 0.1, seed, 10)
    order = np.random.default_rng(seed).permutation(len(test))
    validation = test.subset(np.sort(order[30:]))  # the demo's split: 30 queries, the rest validation
    return train, flipped, validation.tensors


def timed(spent: collections.defaultdict, where: object, name: str, active: list[str]) -> None:
    """Wrap ``where.name`` so that every call's CPU seconds are added to ``spent[name]`` and, for a call made while
    ``_on_step`` runs, to ``spent[name + " in _on_step"]``."""
    inner = getattr(where, name)

    def wrapper(*args, **kwargs):
        start = time.process_time()
        active.append(name)
        try:
            return inner(*args, **kwargs)
        finally:
            active.pop()
            seconds = time.process_time() - start
            spent[name] += seconds
            if "_on_step" in active:
                spent[name + " in _on_step"] += seconds

    setattr(where, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="CPU s per part of the replay route, then stop")
    profile = parser.parse_args().profile
    torch.set_num_threads(1)
    recipe, task = ClassifierRecipe(64, 10, hidden=(64,)), ClassificationTask()
    data = {seed: setup(seed) for seed in (0, 1)}

    def run(seed: int, row: str | None) -> tuple[float, object]:
        """CPU s of the 690 steps, and the recorded values (None for plain training)."""
        train, _, val = data[seed]
        size, options = ROWS[row] if row is not None else (None, {})
        if size is not None:  # a fixed random subset (seeded, the same in every run)
            pick = torch.randperm(len(val[0]), generator=torch.Generator().manual_seed(seed))[:size].sort().values
            val = tuple(t[pick] for t in val)
        if options.get("replay"):
            options = {**options, "data": train}
        recorder = InRunCallback(task, val, order=1, targeted=False, keep_history=True, **options)
        torch.manual_seed(seed)
        model = recipe.build()
        start = time.process_time()
        train_classifier(model, train, epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, seed=seed,
                         callbacks=[recorder] if row is not None else [])
        seconds = time.process_time() - start
        return seconds, recorder.values() if row is not None else None

    if profile:
        breakdown(run)
        return
    run(0, None)
    for row in ROWS:  # warm-up: first use of torch.func / forward-mode AD in the process costs a one-off
        run(0, row)
    plain, cpu, values = [], {row: [] for row in ROWS}, {}
    loads = [os.getloadavg()[0]]
    for _ in range(3):
        plain.append(run(0, None)[0])
        for row in ROWS:
            seconds, v = run(0, row)
            cpu[row].append(seconds)
            values.setdefault((0, row), v)
        loads.append(os.getloadavg()[0])
    for row in ROWS:
        values[(1, row)] = run(1, row)[1]
    exact = {seed: values[(seed, "329 images, exact, defer_steps=64 (capture)")] for seed in (0, 1)}
    p = float(np.median(plain))
    results = {"plain_cpu_s": plain, "load_average_1min": loads, "rows": []}
    print(f"plain training: median {p:.3f} CPU s of {plain} (load average {min(loads):.1f}-{max(loads):.1f})\n")
    print("| validation | recorded CPU s | recorded / plain | AUROC seed 0 | AUROC seed 1 | rel. error vs exact "
          "(seeds 0, 1) | Spearman vs exact |\n|---|---|---|---|---|---|---|")
    for row in ROWS:
        entry = {"row": row, "recorded_cpu_s": cpu[row], "ratio": float(np.median(cpu[row])) / p}
        for seed in (0, 1):
            v, ref = values[(seed, row)], exact[seed]
            if not np.array_equal(v.train_ids, ref.train_ids):
                raise RuntimeError(f"{row}: values for other training ids than the exact ones")
            a, b = v.values[:, 0], ref.values[:, 0]
            entry[f"auroc_seed{seed}"] = mislabel_detection(v, data[seed][1], higher_is_suspicious=False)["auroc"]
            entry[f"rel_error_seed{seed}"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
            entry[f"spearman_seed{seed}"] = float(spearmanr(a, b).statistic)
        results["rows"].append(entry)
        print(f"| {row} | {np.median(cpu[row]):.3f} | {entry['ratio']:.2f}× | {entry['auroc_seed0']:.3f} | "
              f"{entry['auroc_seed1']:.3f} | {entry['rel_error_seed0']:.2g}, {entry['rel_error_seed1']:.2g} | "
              f"{entry['spearman_seed0']:.3f}, {entry['spearman_seed1']:.3f} |")
    atomic_write_json(OUT, results)
    print(f"\n-> {OUT}")


def breakdown(run) -> None:
    """CPU s of the replay rows' parts (3 runs each after a warm-up, medians): the flushes (validation gradients,
    forward-mode dots, the gradient check) and the per-step hooks (``begin``: snapshot; ``_on_step`` outside the
    flushes: p.grad copy, s, bookkeeping), against plain training."""
    spent: collections.defaultdict = collections.defaultdict(float)
    active: list[str] = []
    for where, name in ((inrun.InRunShapley, "begin"), (inrun.InRunShapley, "_on_step"),
                        (inrun.InRunShapley, "_flush"), (inrun_batched.DeferredSteps, "_validation_grads"),
                        (inrun_replay.Replay, "_dots"), (inrun_replay.Replay, "_check")):
        timed(spent, where, name, active)
    rows = [row for row in ROWS if "replay" in row and "fixed" not in row]
    run(0, None)
    run(0, rows[0])
    plain = float(np.median([run(0, None)[0] for _ in range(3)]))
    print(f"plain training {plain:.3f} CPU s (load average {os.getloadavg()[0]:.1f})\n")
    print("| validation | recorded (ratio) | flushes | of which validation gradients, dots, check | begin + pre-hook "
          "outside flushes | rest |\n|---|---|---|---|---|---|")
    for row in rows:
        total, parts = [], collections.defaultdict(list)
        for _ in range(3):
            spent.clear()
            total.append(run(0, row)[0])
            for name, seconds in spent.items():
                parts[name].append(seconds)
        med = {name: float(np.median(v)) for name, v in parts.items()}
        rec, flush = float(np.median(total)), med["_flush"]
        hooks = med["begin"] + med["_on_step"] - med.get("_flush in _on_step", 0.0)
        print(f"| {row} | {rec:.3f} ({rec / plain:.2f}×) | {flush:.3f} | {med['_validation_grads']:.3f}, "
              f"{med['_dots']:.3f}, {med['_check']:.3f} | {hooks:.3f} | {rec - plain - flush - hooks:.3f} |")


if __name__ == "__main__":
    main()
