"""How attribution cost grows with n_train, the number of queries and the number of parameters: ours against peers.

    .venv/bin/python benchmarks/scaling.py                    # the sweep below, resumes from results/scaling.json
    .venv/bin/python benchmarks/scaling.py --plot-only        # redraw results/scaling.png and the table
    .venv/bin/python benchmarks/scaling.py --methods trak --rerun trak   # run one method's points again

Data: Fashion-MNIST (Debian's files, ``load_fashion_mnist``); the training set of a point is the seeded subset of
``n_train`` images, the queries the seeded subset of ``n_query`` test images. Model: an MLP 784-``width``-10 trained by
our training loop (``ClassifierRecipe``, 2 epochs on all 60,000 images, SGD, seed 0) with a 3-checkpoint trajectory
(the last is the model under attribution; TracIn uses all 3). One model per width, trained once before anything is
timed; the cost of attribution does not depend on how well the model fits.

Three panels around one base point (n_train 5,000, 100 queries, width 128 = 101,770 parameters):
n_train in {1k, 5k, 20k, 60k}; queries in {10, 100, 1,000}; width in {32, 128, 512} (25,450 / 101,770 / 407,050
parameters). Each (method, point) runs in a fresh process (``--child``) with 1 torch thread; reported: CPU seconds and
wall seconds of fit + score (imports, data and model loading excluded), the process's peak RSS (``ru_maxrss``, torch and
the data included) and the 1-minute load average. A point is capped at ``--cap-cpu`` CPU seconds (``RLIMIT_CPU``:
load-independent) and ``--cap-wall`` wall seconds; a capped point is recorded as "> cap" and the larger sizes of that
method in that panel are not run (cost only grows along a panel). Methods (matched settings, batch 256, empirical
Fisher, damping 0.1 × mean eigenvalue as in :mod:`benchmarks.bench.methods`):

=====================  =================================================================================
graddot                ``GradDot(projection=512)`` (Kronecker projection, own GradientStore)
influence-kfac/-ekfac  ``Influence(curvature="kfac"/"ekfac")``
trak                   ``TRAK(measurement="margin", projection=512)``, 1 model (Gaussian projection)
tracin                 ``TracIn`` on the 3 checkpoints, exact (no projection)
kronfluence-kfac/ekfac kronfluence's ``fit_all_factors`` + ``compute_pairwise_scores`` (peers.py)
traker                 traker, 1 model, ``proj_dim=512`` (peers.py)
dattri-tracin          dattri's TracInAttributor on the 3 checkpoints, identity projection (peers.py)
=====================  =================================================================================

Results (appended point by point, atomically): ``benchmarks/results/scaling.json``; figure ``scaling.png`` (log-log,
ours solid, peers dashed, capped points as open triangles at the cap); the table and per-panel slopes
(least squares of log CPU s on log size over the points that finished) are printed as markdown.
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
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
from benchmarks.queries import _rss_mb  # noqa: E402  (one definition of peak RSS for both pages)

RESULTS = ROOT / "benchmarks" / "results"
OURS = ["graddot", "influence-kfac", "influence-ekfac", "trak", "tracin"]
PEERS = ["kronfluence-kfac", "kronfluence-ekfac", "traker", "dattri-tracin"]
BASE = {"n_train": 5000, "n_query": 100, "width": 128}
PANELS = {"n_train": [1000, 5000, 20000, 60000], "n_query": [10, 100, 1000], "width": [32, 128, 512]}
PROJECTION = 512
BATCH = 256
EPOCHS = 2
CHECKPOINTS = 3
COLORS = {"graddot": "tab:gray", "influence-kfac": "tab:blue", "kronfluence-kfac": "tab:blue",
          "influence-ekfac": "tab:orange", "kronfluence-ekfac": "tab:orange", "trak": "tab:green",
          "traker": "tab:green", "tracin": "tab:red", "dattri-tracin": "tab:red"}


def n_params(width: int) -> int:
    return 784 * width + width + width * 10 + 10


def points() -> list[dict]:
    """Every distinct (n_train, n_query, width), cheapest panels first, the base point first of all."""
    seen, out = set(), []
    order = [BASE] + [{**BASE, axis: v} for axis in ("n_query", "width", "n_train") for v in PANELS[axis]]
    for p in sorted(order, key=lambda p: (p != BASE, p["n_train"] * n_params(p["width"]) * (1 + p["n_query"] / 100))):
        key = (p["n_train"], p["n_query"], p["width"])
        if key not in seen:
            seen.add(key)
            out.append(dict(p))
    return out


def tag(method: str, p: dict) -> str:
    return f"{method}@n{p['n_train']}-q{p['n_query']}-w{p['width']}"


def trajectory_dir(root: Path, width: int) -> Path:
    return root / f"fmnist-mlp{width}" / "trajectory"


def recipe(width: int):
    from datacredit.evaluate import ClassifierRecipe

    return ClassifierRecipe(784, 10, (width,), epochs=EPOCHS)


def train_model(root: Path, width: int) -> None:
    """Train the width's MLP on all 60,000 images with a 3-checkpoint trajectory, unless it is already there."""
    from datacredit.data import load_fashion_mnist
    from datacredit.training import TrajectoryCallback
    from datacredit.trajectory import Trajectory

    traj = trajectory_dir(root, width)
    try:
        if len(Trajectory.load(traj)) == CHECKPOINTS:
            return
    except Exception:  # missing or partial: train (again) from scratch
        pass
    import shutil

    shutil.rmtree(traj, ignore_errors=True)
    train = load_fashion_mnist(split="train")
    start = time.perf_counter()
    recipe(width).train(train, 0, callbacks=[TrajectoryCallback(str(traj), CHECKPOINTS)])
    print(f"trained width {width} in {time.perf_counter() - start:.0f} s -> {traj}", flush=True)


def child(args: argparse.Namespace) -> None:
    """Run one method at one point in this process; write its timing to ``args.result`` (JSON)."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datacredit as dc
    from benchmarks.bench.cases import Case, CaseSpec
    from benchmarks.bench.methods import Context
    from datacredit.data import load_fashion_mnist
    from datacredit.task import ClassificationTask
    from datacredit.trajectory import Trajectory

    train = load_fashion_mnist(split="train", limit=args.n_train, seed=0)
    queries = load_fashion_mnist(split="test", limit=args.n_query, seed=0)
    traj_dir = trajectory_dir(Path(args.root), args.width)
    traj = Trajectory.load(traj_dir)
    rec = recipe(args.width)

    def model():
        return traj.load_into(rec.build(), -1).eval()

    task = ClassificationTask()
    kw = {"batch_size": BATCH, "progress": False}
    name = args.child
    if name in PEERS:  # imports outside the timed region, as ours are
        __import__({"kro": "kronfluence.analyzer", "tra": "trak", "dat": "dattri.algorithm.tracin"}[name[:3]])
        from benchmarks.bench import peers

        spec = CaseSpec(f"scaling-w{args.width}", "scaling sweep", lambda: (train, queries, rec), ClassificationTask,
                        10, trak_dim=PROJECTION)
        ctx = Context(Case(spec, args.scratch), model, train, queries, task, rec, 0, traj_dir,
                      Path(tempfile.mkdtemp(dir=args.scratch)))

    def run():
        if name == "graddot":
            return dc.GradDot(model(), task, projection=PROJECTION, **kw).fit(train).score(queries)
        if name.startswith("influence-"):
            return dc.Influence(model(), task, curvature=name.split("-", 1)[1], **kw).fit(train).score(queries)
        if name == "trak":
            margin = ClassificationTask(measurement="margin")
            return dc.TRAK(model(), margin, projection=PROJECTION, **kw).fit(train).score(queries)
        if name == "tracin":
            return dc.TracIn(model(), task, traj_dir, **kw).fit(train).score(queries)
        if name == "traker":
            return peers._traker(ctx)
        if name == "dattri-tracin":
            return peers._dattri_tracin(ctx)
        return peers._kronfluence(name.split("-", 1)[1])(ctx)

    wall, cpu = time.perf_counter(), time.process_time()
    scores = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    values = np.asarray(scores.values)
    out = {"status": "ok", "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": _rss_mb(), "shape": list(values.shape),
           "finite": bool(np.isfinite(values).all()), "load_1min": os.getloadavg()[0]}
    Path(args.result).write_text(json.dumps(out))


def _limit_cpu(seconds: float):
    def apply() -> None:  # in the child, before exec: SIGXCPU at the soft limit, SIGKILL 5 s later
        resource.setrlimit(resource.RLIMIT_CPU, (int(seconds), int(seconds) + 5))

    return apply


def run_point(args: argparse.Namespace, method: str, p: dict, scratch: str) -> dict:
    result = Path(scratch) / f"{tag(method, p)}.json"
    cmd = [sys.executable, __file__, "--child", method, "--root", args.root, "--scratch", scratch,
           "--result", str(result), "--n-train", str(p["n_train"]), "--n-query", str(p["n_query"]),
           "--width", str(p["width"])]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cap_wall,
                              preexec_fn=_limit_cpu(args.cap_cpu))
    except subprocess.TimeoutExpired:
        return {"status": "capped", "why": f"wall > {args.cap_wall:.0f} s", "load_1min": os.getloadavg()[0]}
    if result.exists():
        return json.loads(result.read_text())
    if proc.returncode in (-24, -9) and time.perf_counter() - start > 0.5 * args.cap_cpu:  # SIGXCPU / SIGKILL
        return {"status": "capped", "why": f"CPU > {args.cap_cpu:.0f} s", "load_1min": os.getloadavg()[0]}
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return {"status": "error", "error": tail[:300], "returncode": proc.returncode, "load_1min": os.getloadavg()[0]}


def panel_of(p: dict) -> list[str]:
    """The panels a point belongs to (the base point is in all three)."""
    return [axis for axis in PANELS if all(p[k] == BASE[k] for k in BASE if k != axis) and p[axis] in PANELS[axis]]


def capped_below(results: dict, method: str, p: dict) -> str | None:
    """A smaller point of one of p's panels where ``method`` was capped (so p, larger, would be too)."""
    for axis in panel_of(p):
        for v in PANELS[axis]:
            q = {**BASE, axis: v}
            if v < p[axis] and results.get(tag(method, q), {}).get("status") == "capped":
                return tag(method, q)
    return None


def sweep(args: argparse.Namespace) -> dict:
    from datacredit.store import atomic_write_json

    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    results: dict = doc.get("results", {})
    doc.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    doc["settings"] = {"base": BASE, "panels": PANELS, "projection": PROJECTION, "batch": BATCH, "epochs": EPOCHS,
                       "checkpoints": CHECKPOINTS, "cap_cpu_s": args.cap_cpu, "cap_wall_s": args.cap_wall,
                       "threads": 1, "cpus": os.cpu_count()}
    for width in PANELS["width"]:
        train_model(Path(args.root), width)
    methods = args.methods.split(",")
    if args.rerun:  # drop the cached points named (a method: all its points; a tag: that point) so they run again
        drop = set(args.rerun.split(","))
        known = set(OURS + PEERS)
        bad = [d for d in drop if d not in known and d not in results and "@" not in d]
        if bad:
            raise SystemExit(f"--rerun: {bad} are neither methods ({sorted(known)}) nor point tags (method@n…-q…-w…)")
        for t in [t for t in results if t in drop or t.split("@")[0] in drop]:
            del results[t]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    scratch = tempfile.mkdtemp(prefix="dc-scaling-")
    for p in points():
        for method in methods:
            t = tag(method, p)
            if t in results and (results[t]["status"] != "error" or not args.retry_errors):
                continue
            below = capped_below(results, method, p)
            if below:
                res = {"status": "capped", "why": f"not run: {below} was capped", "load_1min": os.getloadavg()[0]}
            else:
                res = run_point(args, method, p, scratch)
            results[t] = {**p, "method": method, **res, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "commit": commit.stdout.strip() or None}
            print(t, json.dumps(res), flush=True)
            doc["results"] = results
            doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            atomic_write_json(out, doc)
    return doc


def series(results: dict, method: str, axis: str) -> list[tuple[int, dict]]:
    rows = []
    for v in PANELS[axis]:
        res = results.get(tag(method, {**BASE, axis: v}))
        if res is not None:
            rows.append((v, res))
    return rows


def xvalue(axis: str, v: int) -> int:
    return n_params(v) if axis == "width" else v


def slope(rows: list[tuple[int, dict]], axis: str) -> float | None:
    import numpy as np

    ok = [(xvalue(axis, v), r["cpu_s"]) for v, r in rows if r["status"] == "ok"]
    if len(ok) < 2:
        return None
    x, y = np.log([o[0] for o in ok]), np.log([o[1] for o in ok])
    return float(np.polyfit(x, y, 1)[0])


def end_slope(rows: list[tuple[int, dict]], axis: str) -> float | None:
    """The slope between the two largest sizes that finished: the growth rate once fixed costs are amortised."""
    ok = [(v, r) for v, r in rows if r["status"] == "ok"]
    return slope(ok[-2:], axis) if len(ok) >= 2 else None


def table(doc: dict) -> str:
    results, cap = doc["results"], doc["settings"]["cap_cpu_s"]
    lines = []
    labels = {"n_train": "n_train", "n_query": "queries", "width": "parameters (width)"}
    for axis in PANELS:
        head = " | ".join(f"{xvalue(axis, v):,}" + (f" (w{v})" if axis == "width" else "") for v in PANELS[axis])
        lines += [f"\n**{labels[axis]}** (others at the base point). CPU s (wall s, peak RSS MB); slope = "
                  f"d log CPU / d log {'parameters' if axis == 'width' else axis}\n",
                  f"| method | {head} | slope (all) | slope (last two) |", "|---|" + "---:|" * (len(PANELS[axis]) + 2)]
        for method in OURS + PEERS:
            rows = dict(series(results, method, axis))
            cells = []
            for v in PANELS[axis]:
                r = rows.get(v)
                if r is None:
                    cells.append("")
                elif r["status"] == "ok":
                    cells.append(f"{r['cpu_s']:.1f} ({r['wall_s']:.0f}, {r['peak_rss_mb']:.0f})")
                elif r["status"] == "capped":
                    cells.append(f"> {cap:.0f} (cap)")
                else:
                    cells.append(f"error: {r['error'][:60]}")
            s, e = slope(list(rows.items()), axis), end_slope(list(rows.items()), axis)
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {'' if s is None else f'{s:.2f}'} | "
                         f"{'' if e is None else f'{e:.2f}'} |")
    loads = [r["load_1min"] for r in results.values() if "load_1min" in r]
    if loads:
        lines.append(f"\nLoad average (1 min) at the end of each point: {min(loads):.1f}–{max(loads):.1f}, "
                     f"median {sorted(loads)[len(loads) // 2]:.1f} ({os.cpu_count()} CPUs).")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    results, cap = doc["results"], doc["settings"]["cap_cpu_s"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), sharey=True)
    titles = {"n_train": "training examples (100 queries, 101,770 params)",
              "n_query": "queries (5,000 train, 101,770 params)",
              "width": "parameters, MLP 784-w-10 (5,000 train, 100 queries)"}
    for ax, axis in zip(axes, PANELS):
        for method in OURS + PEERS:
            rows = series(results, method, axis)
            ok = [(xvalue(axis, v), r["cpu_s"]) for v, r in rows if r["status"] == "ok"]
            capped = [xvalue(axis, v) for v, r in rows if r["status"] == "capped"]
            style = "-" if method in OURS else "--"
            marker = "o" if method in OURS else "s"
            s = slope(rows, axis)
            label = f"{method} ({'—' if s is None else f'{s:.2f}'})"
            if ok:
                ax.plot(*zip(*ok), style, marker=marker, color=COLORS[method], label=label, ms=5)
            if capped:
                ax.plot(capped, [cap] * len(capped), "^", mfc="none", color=COLORS[method], ms=9,
                        label=None if ok else label)
        ax.axhline(cap, color="k", lw=0.5, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the minor labels overlap on panel 3
        ax.set_xlabel(titles[axis])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, title="method (slope)", title_fontsize=7)
    axes[0].set_ylabel("fit + score, CPU seconds (1 thread)")
    fig.suptitle(f"Fashion-MNIST MLP: attribution cost, ours solid, peers dashed; open triangles = capped at "
                 f"{cap:.0f} CPU s", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/scaling", help="where the trained MLPs' trajectories live")
    parser.add_argument("--methods", default=",".join(OURS + PEERS))
    parser.add_argument("--cap-cpu", type=float, default=100.0, help="CPU seconds per point before it is stopped")
    parser.add_argument("--cap-wall", type=float, default=450.0, help="wall seconds per point before it is stopped")
    parser.add_argument("--retry-errors", action="store_true", help="run again the points that failed")
    parser.add_argument("--rerun", default="", metavar="METHOD[,METHOD|TAG]",
                        help="forget these methods' cached points (or single points, by tag) and run them again")
    parser.add_argument("--out", default=str(RESULTS / "scaling.json"))
    parser.add_argument("--png", default=str(RESULTS / "scaling.png"))
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n-train", type=int, default=BASE["n_train"], help=argparse.SUPPRESS)
    parser.add_argument("--n-query", type=int, default=BASE["n_query"], help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=BASE["width"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    doc = json.loads(Path(args.out).read_text()) if args.plot_only else sweep(args)
    plot(doc, Path(args.png))
    print(table(doc))


if __name__ == "__main__":
    main()
