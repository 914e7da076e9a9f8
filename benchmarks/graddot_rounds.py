"""Exact Grad-Dot past the memory budget: query rounds (one training pass each) against the old pairwise fallback.

    nice -n 10 .venv/bin/python benchmarks/graddot_rounds.py --trees old=/tmp/old,new=. \\
        --variants old:old,new:rounds,new:auto --budgets 120,80 --repeats 3 --out /tmp/graddot_rounds.json

A TinyGPT (d = 128, 2 layers, 4 heads, T = 64, vocabulary 64, float32, random weights and tokens: the cost does not
depend on the values), 400 training and ``--queries`` (200) query sequences, batches of 40 (5 query batches for 200).
The memory budget of ``datacredit.memory`` is replaced by ``B`` queries' worth of all parameters' gradients (``B ×
numel × 4`` bytes): with 200 queries, B = 120 gives 2 rounds of 3 query batches where every parameter is materialized,
B = 80 gives 3 rounds of 2. Variants (``tree:mode``): ``old`` (the code before rounds: parameters materialized in
order while they fit, the rest pairwise, one pass), ``rounds`` (``PASS_MULTIPLY_ADDS = 0``: the fewest rounds that
hold every parameter worth materializing), ``auto`` (the default plan, which weighs the passes).

Each run is a fresh process (``--child``) with one torch thread; the variants alternate within each repeat. Reported:
CPU seconds (``time.process_time``) and wall seconds of ``score`` alone (``fit`` of exact Grad-Dot is the ids only),
passes over the training set, peak RSS, the 1-minute load average, and the largest difference of each run's scores
from the first variant's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_TRAIN, BATCH, VOCAB, LENGTH = 400, 40, 64, 64


def child(tree: str, mode: str, budget_queries: int, n_query: int, out: str) -> dict:
    """One timed ``score`` in this process with ``tree``'s datacredit; writes the scores to ``out`` (.npy)."""
    sys.path.insert(0, tree)
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from datacredit import GradDot
    from datacredit.data import ArrayDataset
    from datacredit.methods import querygram
    from datacredit.models import TinyGPT
    from datacredit.task import LanguageModelingTask

    assert Path(querygram.__file__).resolve().is_relative_to(Path(tree).resolve()), querygram.__file__
    torch.manual_seed(0)
    model = TinyGPT(VOCAB, d=128, n_layers=2, n_heads=4, max_len=LENGTH)
    gen = torch.Generator().manual_seed(1)
    train = ArrayDataset(torch.randint(0, VOCAB, (N_TRAIN, LENGTH + 1), generator=gen))
    queries = ArrayDataset(torch.randint(0, VOCAB, (n_query, LENGTH + 1), generator=gen))
    budget = budget_queries * 4 * sum(p.numel() for p in model.parameters())
    querygram.memory_budget = lambda device: budget
    if mode == "rounds":
        querygram.PASS_MULTIPLY_ADDS = 0
    passes = {"train": 0}
    stream = GradDot.stream

    def counted(self, data, *, measurement=False, **kw):
        passes["train"] += not measurement
        return stream(self, data, measurement=measurement, **kw)

    GradDot.stream = counted
    method = GradDot(model, LanguageModelingTask(), batch_size=BATCH, progress=False).fit(train)
    cpu, wall = time.process_time(), time.perf_counter()
    values = method.score(queries).values
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    np.save(out, np.asarray(values))
    return {"cpu_s": cpu, "wall_s": wall, "passes": passes["train"], "budget_queries": budget_queries,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", default="new=.", help="name=path,... code trees")
    parser.add_argument("--variants", default="new:rounds,new:auto", help="tree:mode,... (mode: old, rounds, auto)")
    parser.add_argument("--budgets", default="120,80", help="memory budgets in queries' worth of gradients")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", help="write every run as JSON here")
    parser.add_argument("--child", nargs=5, metavar=("TREE", "MODE", "BUDGET", "QUERIES", "NPY"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tree, mode, budget, queries, npy = args.child
        print(json.dumps(child(tree, mode, int(budget), int(queries), npy)))
        return
    import numpy as np

    trees = dict(item.split("=", 1) for item in args.trees.split(","))
    variants = [tuple(v.split(":", 1)) for v in args.variants.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in [int(b) for b in args.budgets.split(",")]:
            reference = None
            for repeat in range(args.repeats):
                for tree, mode in variants:
                    npy = str(Path(tmp) / f"{tree}-{mode}-{budget}.npy")
                    done = subprocess.run([sys.executable, __file__, "--child", str(Path(trees[tree]).resolve()), mode,
                                           str(budget), str(args.queries), npy], check=True, capture_output=True,
                                          text=True)
                    run = {"tree": tree, "mode": mode, "repeat": repeat, **json.loads(done.stdout.splitlines()[-1])}
                    values = np.load(npy)
                    reference = values if reference is None else reference
                    run["max_abs_diff"] = float(np.abs(values - reference).max())
                    run["max_abs"] = float(np.abs(reference).max())
                    runs.append(run)
                    print(json.dumps(run), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=1))
    print("\n| queries | budget (queries) | variant | passes | CPU s (median; all) | wall s (median) | peak RSS MB "
          "| max abs diff |")
    print("|---:|---:|---|---:|---|---:|---:|---:|")
    for budget in sorted({r["budget_queries"] for r in runs}, reverse=True):
        for tree, mode in variants:
            rs = [r for r in runs if r["budget_queries"] == budget and (r["tree"], r["mode"]) == (tree, mode)]
            cpus = [r["cpu_s"] for r in rs]
            print(f"| {args.queries} | {budget} | {tree}:{mode} | {rs[0]['passes']} | {statistics.median(cpus):.2f}; "
                  f"{', '.join(f'{c:.2f}' for c in cpus)} | {statistics.median(r['wall_s'] for r in rs):.2f} | "
                  f"{max(r['rss_mb'] for r in rs):.0f} | {max(r['max_abs_diff'] for r in rs):.1e} |")


if __name__ == "__main__":
    main()
