"""Many queries: fit + score time of every post-hoc method with 500 queries, two code trees side by side, and the peers.

    .venv/bin/python benchmarks/queries.py --trees old=/tmp/old,new=. --out benchmarks/results/queries.json

Each (method, tree) runs in its own fresh process (``python benchmarks/queries.py --child ...`` with ``PYTHONPATH`` set
to the tree), methods interleaved tree by tree so that both trees see the same machine load; the peers run once, with
the first tree listed last (they do not depend on our code). Reported per run: wall and CPU seconds of fit + score
(model construction, data loading and imports excluded), the peak RSS of the whole process (torch, the data set and the
method; ``ru_maxrss``), the machine's 1-minute load average when it finished, and, where a cached ground truth for
these queries exists (``--gt``), the LDS.
Agreement between two methods computing the same estimator is the mean per-query Pearson correlation.

The machine is shared: compare ratios within one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks.bench from this checkout; appended, so a tree on PYTHONPATH keeps datacredit
    sys.path.append(str(ROOT))
OURS = ["graddot", "influence-identity", "influence-kfac", "influence-ekfac", "tracin", "trak", "source"]
PEERS = ["kronfluence-kfac", "kronfluence-ekfac", "traker"]
PAIRS = {"kronfluence-kfac": "influence-kfac", "kronfluence-ekfac": "influence-ekfac", "traker": "trak",
         "influence-identity": "graddot"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """Run one method in this process and write its scores (.npy) and timing (.json) under ``args.scratch``."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import datacredit as dc
    from benchmarks.bench.cases import load_case
    from benchmarks.bench.methods import BATCH, Context
    from datacredit.data import load_digits, load_fashion_mnist

    case = load_case(args.case, args.root)
    if args.case == "fmnist-mlp":
        queries = load_fashion_mnist(split="test", limit=args.queries, seed=0)
    else:
        queries = load_digits(seed=0)[1].subset(np.arange(args.queries))
    train, task = case.train, case.task()
    model = case.model()
    traj = str(case.trajectory_dir)
    kw = {"batch_size": BATCH, "progress": False}
    name = args.child

    def run():
        if name == "graddot":
            return dc.GradDot(model, task, **kw).fit(train).score(queries)
        if name.startswith("influence-"):
            return dc.Influence(model, task, curvature=name.split("-", 1)[1], **kw).fit(train).score(queries)
        if name == "tracin":
            return dc.TracIn(model, task, traj, **kw).fit(train).score(queries)
        if name == "trak":
            margin = dc.ClassificationTask(measurement="margin")
            return dc.TRAK(model, margin, projection=args.trak_dim, **kw).fit(train).score(queries)
        if name == "source":
            return dc.Source(model, task, traj, segments=3, **kw).fit(train).score(queries)
        from benchmarks.bench import peers

        ctx = Context(case, case.model, train, queries, task, case.recipe, 0, case.trajectory_dir,
                      Path(tempfile.mkdtemp(dir=args.scratch)))
        if name == "traker":
            from benchmarks.bench.cases import CASES

            spec = CASES[args.case]
            object.__setattr__(spec, "trak_dim", args.trak_dim)  # the same projected dimension as ours
            return peers._traker(ctx)
        return peers._kronfluence(name.split("-", 1)[1])(ctx)

    if name in PEERS:  # imports outside the timed region, as datacredit's are
        __import__("kronfluence.analyzer" if name.startswith("kron") else "trak")
    wall, cpu = time.perf_counter(), time.process_time()
    scores = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    values = np.asarray(scores.values, dtype=np.float64)
    np.save(Path(args.scratch) / f"{args.tag}.npy", values)
    out = {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": _rss_mb(), "shape": list(values.shape),
           "finite": bool(np.isfinite(values).all()), "load_1min": os.getloadavg()[0]}
    (Path(args.scratch) / f"{args.tag}.json").write_text(json.dumps(out))


def _pearson(a, b) -> float:
    import numpy as np

    a = a - a.mean(0)
    b = b - b.mean(0)
    r = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return float(np.nanmean(r))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="fmnist-mlp", choices=["fmnist-mlp", "digits-lr"])
    parser.add_argument("--root", default="runs/bench", help="where the case's model and trajectory live")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--trees", default=f"new={ROOT}", help="label=path,... of source trees to compare")
    parser.add_argument("--methods", default=",".join(OURS + PEERS))
    parser.add_argument("--trak-dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per method before it is abandoned")
    parser.add_argument("--gt", default=None, help="a ground-truth store for these queries: report LDS")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import numpy as np

    trees = dict(item.split("=", 1) for item in args.trees.split(","))
    methods = args.methods.split(",")
    scratch = tempfile.mkdtemp(prefix="dc-queries-")
    # train the case's model and trajectory once, before anything is timed
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.append({str(ROOT)!r}); "
                    f"from benchmarks.bench.cases import load_case; "
                    f"load_case({args.case!r}, {args.root!r}).model()"], check=True)
    results: dict[str, dict] = {}
    for method in methods:
        labels = list(trees) if method not in PEERS else [list(trees)[-1]]
        for label in labels:
            tag = f"{method}@{label}"
            env = {**os.environ, "PYTHONPATH": str(Path(trees[label]).resolve())}
            cmd = [sys.executable, __file__, "--child", method, "--case", args.case, "--root", args.root,
                   "--queries", str(args.queries), "--trak-dim", str(args.trak_dim), "--threads", str(args.threads),
                   "--scratch", scratch, "--tag", tag]
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                ok = proc.returncode == 0
                err = proc.stderr.strip().splitlines()[-1:] if not ok else []
            except subprocess.TimeoutExpired:
                ok, err = False, [f"timed out after {args.timeout:.0f} s"]
            res = json.loads((Path(scratch) / f"{tag}.json").read_text()) if ok else {"error": " ".join(err)}
            results[tag] = res
            print(tag, json.dumps(res), flush=True)
    gt = None
    if args.gt:
        from datacredit.evaluate import lds, load_groundtruth

        gt = load_groundtruth(args.gt)
    rows = []
    for tag, res in results.items():
        if "error" in res:
            rows.append((tag, res))
            continue
        values = np.load(Path(scratch) / f"{tag}.npy")
        method, label = tag.split("@")
        pair = PAIRS.get(method)
        if pair is not None:
            other = f"{pair}@{list(trees)[-1]}"
            if other in results and "error" not in results[other]:
                res["agreement_with"] = other
                res["agreement"] = _pearson(values, np.load(Path(scratch) / f"{other}.npy"))
        first = f"{method}@{list(trees)[0]}"
        if label != list(trees)[0] and first in results and "error" not in results[first]:
            ref = np.load(Path(scratch) / f"{first}.npy")  # same estimator, other tree: the change in the numbers
            res["max_rel_diff"] = float(np.abs(values - ref).max() / max(np.abs(ref).max(), 1e-300))
        if gt is not None:
            from datacredit.scores import Scores

            scores = Scores(values, gt.train_ids, gt.query_ids, method)
            res["lds"] = float(lds(scores, gt).mean)
        rows.append((tag, res))
    print(f"\n| method | tree | wall s | CPU s | peak RSS MB | LDS | agreement | max abs diff / max abs, vs "
          f"{list(trees)[0]} | load (1 min) |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|")
    for tag, res in rows:
        method, label = tag.split("@")
        if "error" in res:
            print(f"| {method} | {label} | failed: {res['error'][:80]} | | | | | | |")
            continue
        lds_s = f"{res['lds']:.3f}" if "lds" in res else ""
        agree = f"{res['agreement']:.4f} with {res['agreement_with']}" if "agreement" in res else ""
        diff = f"{res['max_rel_diff']:.1e}" if "max_rel_diff" in res else ""
        print(f"| {method} | {label} | {res['wall_s']:.1f} | {res['cpu_s']:.1f} | "
              f"{res.get('peak_rss_mb', res.get('peak_rss_increase_mb', 0)):.0f} | {lds_s} | {agree} | {diff} | "
              f"{res.get('load_1min', float('nan')):.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
