"""Scale benchmark of the gradient store (issue 17): featurization throughput, peak memory, disk, query scoring.

Model: a GPT-2 built from a config (``transformers.GPT2LMHeadModel``, random init, no download): width ``--d``,
``--layers`` blocks, ``--heads`` heads, character vocabulary of the bundled text sample. Data: random windows of
``--seq + 1`` characters of ``datacredit/data/sample.txt`` (seeded; queries from another seed). Attributed parameters:
the ``Conv1D`` weights of the blocks (biases, embeddings and LayerNorms frozen), which is what bergson tracks by
default, so both featurize the same gradients. Loss: summed next-token cross-entropy per sequence (bergson's default).

For each ``n_train`` a fresh subprocess (so peak RSS is its own) builds a :class:`~datacredit.gradstore.GradientStore`
(Kronecker projection ``k × k`` per weight, ``--dtype`` storage), then scores ``--queries`` queries against it
(``score`` with ``--memory-gb``; ``topk``), and reports time, tokens/s, peak RSS after each phase and disk bytes per
example. With ``--bergson`` (and bergson importable), another subprocess runs EleutherAI bergson's
``collect_gradients`` on the same model weights, windows and batches with ``projection_dim = k`` (its per-module
two-sided projection, also ``k × k`` per weight) and reports the same numbers.

Run (from the repository root)::

    .venv/bin/python benchmarks/gradstore_scale.py --n-train 1000 10000 --bergson --threads 1

Results go to ``benchmarks/results/gradstore_scale.json`` and the plot to ``benchmarks/results/gradstore_scale.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    """User + system CPU seconds of this process: on a shared, loaded machine a steadier cost than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _setup(args: argparse.Namespace, n: int, seed: int):
    """The model (same weights in every process) and ``(n, seq + 1)`` int64 windows of the text sample."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from datacredit.data.text import load_text_sample

    text = load_text_sample()
    vocab = sorted(set(text))
    tokens = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - args.seq - 1, (n,), generator=gen)
    windows = tokens[starts[:, None] + torch.arange(args.seq + 1)]
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=2 * args.seq + 2, n_embd=args.d, n_layer=args.layers,
                        n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    for name, p in model.named_parameters():
        # the blocks' Conv1D weights only: what bergson collects by default (include_bias=False, no embeddings)
        p.requires_grad_(name.startswith("transformer.h.") and name.endswith(".weight") and ".ln_" not in name)
    return model, windows


def worker_datacredit(args: argparse.Namespace, n: int) -> dict:
    import numpy as np
    import torch

    from datacredit.capture.kronecker import KronProjection
    from datacredit.dataset import ArrayDataset
    from datacredit.gradstore import GradientStore
    from datacredit.task import LanguageModelingTask

    torch.set_num_threads(args.threads)
    model, windows = _setup(args, n, seed=1)
    _, qwin = _setup(args, args.queries, seed=2)
    train, queries = ArrayDataset(windows), ArrayDataset(qwin)
    task = LanguageModelingTask(reduction="sum", position_ids=True)
    rss0 = _rss_mb()
    path = Path(args.workdir) / f"datacredit-{n}"
    gs = GradientStore(path, model, task, projection=KronProjection(args.k), dtype=args.dtype,
                       batch_size=args.batch_size, chunk_size=1024)
    t0, c0 = time.perf_counter(), _cpu_s()
    gs.build(train)
    build_s, build_cpu_s = time.perf_counter() - t0, _cpu_s() - c0
    rss_build = _rss_mb()
    disk = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    features_bytes = np.asarray(gs.features()).nbytes
    if args.build_only:
        return {"library": "datacredit", "n_train": n, "build_s": build_s, "build_cpu_s": build_cpu_s,
                "tokens_per_s": n * args.seq / build_s, "tokens_per_cpu_s": n * args.seq / build_cpu_s,
                "peak_rss_build_mb": rss_build, "feature_bytes_per_example": features_bytes / n}
    t0 = time.perf_counter()
    gs.featurize(queries)
    query_featurize_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), _cpu_s()
    scores = gs.score(queries, memory_gb=args.memory_gb)
    score_s, score_cpu_s = time.perf_counter() - t0, _cpu_s() - c0
    rss_score = _rss_mb()
    t0 = time.perf_counter()
    top = gs.topk(queries, 10, memory_gb=args.memory_gb)
    topk_s = time.perf_counter() - t0
    rss_topk = _rss_mb()
    # cheap consistency check on a few columns: topk == the dense scores' top-k
    for j in range(3):
        assert top.for_query(j) == scores.topk(10, j), "topk differs from the dense scores"
    tokens = n * args.seq
    return {
        "library": "datacredit", "n_train": n, "dim": gs.dim, "dtype": args.dtype,
        "build_s": build_s, "build_cpu_s": build_cpu_s, "tokens_per_s": tokens / build_s,
        "tokens_per_cpu_s": tokens / build_cpu_s, "examples_per_s": n / build_s,
        "rss_start_mb": rss0, "peak_rss_build_mb": rss_build, "peak_rss_score_mb": rss_score,
        "peak_rss_topk_mb": rss_topk, "disk_bytes": disk, "disk_bytes_per_example": disk / n,
        "feature_bytes_per_example": features_bytes / n, "n_query": args.queries,
        "query_featurize_s": query_featurize_s, "score_s": score_s, "score_cpu_s": score_cpu_s, "topk_s": topk_s,
        "scores_on_disk": isinstance(scores.values, np.memmap),
    }


def worker_bergson(args: argparse.Namespace, n: int) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, windows = _setup(args, n, seed=1)
    run = Path(args.workdir) / f"bergson-{n}"
    ds = _bergson_dataset(args, windows)
    rss0 = _rss_mb()
    t0, c0 = time.perf_counter(), _cpu_s()
    features = _bergson_features(args, model, ds, run, load=False)
    build_s, build_cpu_s = time.perf_counter() - t0, _cpu_s() - c0
    part = Path(str(run) + ".part")
    disk = sum(f.stat().st_size for f in part.rglob("*") if f.is_file())
    return {
        "library": "bergson", "n_train": n, "dim": features.shape[1], "build_s": build_s, "build_cpu_s": build_cpu_s,
        "tokens_per_s": n * args.seq / build_s, "tokens_per_cpu_s": n * args.seq / build_cpu_s,
        "examples_per_s": n / build_s, "rss_start_mb": rss0,
        "peak_rss_build_mb": _rss_mb(), "disk_bytes": disk, "disk_bytes_per_example": disk / n,
        "feature_bytes_per_example": features.nbytes / n,
    }


def _bergson_dataset(args: argparse.Namespace, windows):
    """The windows as the Hugging Face dataset bergson reads (``input_ids`` and ``length`` columns)."""
    import datasets

    return datasets.Dataset.from_dict({"input_ids": windows.tolist(), "length": [args.seq + 1] * len(windows)})


def _bergson_features(args: argparse.Namespace, model, ds, run: Path, load: bool = True):
    """bergson's per-module projected gradients ``(n, D)`` of dataset ``ds`` (its ``collect_gradients``): in memory,
    or the memmap bergson wrote (``load=False``: nothing read back, so its time and RSS are bergson's own)."""
    import numpy as np
    from bergson import GradientProcessor, IndexConfig, collect_gradients

    n = len(ds)
    cfg = IndexConfig(run_path=str(run), projection_dim=args.k)
    cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
    processor = GradientProcessor({}, projection_dim=args.k, projection_type=cfg.projection_type, include_bias=False)
    batches = [list(range(i, min(n, i + args.batch_size))) for i in range(0, n, args.batch_size)]
    collect_gradients(model=model, data=ds, processor=processor, cfg=cfg, batches=batches)
    grads = np.memmap(cfg.partial_run_path / "gradients.bin", mode="r", dtype=np.float32)
    return np.array(grads).reshape(n, -1) if load else grads.reshape(n, -1)


def worker_agreement(args: argparse.Namespace, n: int) -> dict:
    """Per-query Pearson/Spearman of projected scores (ours, bergson's) with exact Grad-Dot on ``n`` examples."""
    import numpy as np
    import torch
    from scipy.stats import pearsonr, spearmanr

    from datacredit.capture import Capture, example_grads
    from datacredit.capture.kronecker import KronProjection
    from datacredit.dataset import ArrayDataset
    from datacredit.gradstore import GradientStore
    from datacredit.task import LanguageModelingTask

    torch.set_num_threads(args.threads)
    model, windows = _setup(args, n, seed=1)
    _, qwin = _setup(args, args.agreement_queries, seed=2)
    task = LanguageModelingTask(reduction="sum", position_ids=True)
    with Capture(model) as cap:
        q_grads = example_grads(cap, task.loss(model, qwin))
        exact = torch.cat([example_grads(cap, task.loss(model, windows[i: i + 16])).gram(q_grads)
                           for i in range(0, n, 16)]).double().numpy()
    gs = GradientStore(Path(args.workdir) / "agreement", model, task, projection=KronProjection(args.k),
                       dtype=args.dtype, batch_size=args.batch_size)
    approx = {"datacredit": gs.build(ArrayDataset(windows)).score(ArrayDataset(qwin)).values.astype(np.float64)}
    try:
        work = Path(args.workdir)
        train_b = _bergson_features(args, model, _bergson_dataset(args, windows), work / "bergson-agreement-train")
        query_b = _bergson_features(args, model, _bergson_dataset(args, qwin), work / "bergson-agreement-query")
        approx["bergson"] = train_b.astype(np.float64) @ query_b.T.astype(np.float64)
    except ImportError as exc:
        print(f"bergson not importable: {exc}", file=sys.stderr)
    out = {"library": "agreement", "n_train": n, "n_query": args.agreement_queries}
    for lib, values in approx.items():
        cols = range(values.shape[1])
        out[f"{lib}_pearson"] = float(np.mean([pearsonr(values[:, j], exact[:, j])[0] for j in cols]))
        out[f"{lib}_spearman"] = float(np.mean([spearmanr(values[:, j], exact[:, j])[0] for j in cols]))
    return out


def _run_worker(kind: str, n: int, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--worker-n", str(n), *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    print(f"[{time.strftime('%H:%M:%S')}] {kind} n_train={n} ...", flush=True)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        return {"library": kind, "n_train": n, "error": out.stderr.strip().splitlines()[-1][:300]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"    {json.dumps(result)}", flush=True)
    return result


def _clear(workdir: Path) -> None:
    for d in workdir.iterdir():
        shutil.rmtree(d, ignore_errors=True)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for lib, marker, color in (("datacredit", "o", "C0"), ("bergson", "s", "C2")):
        rows = sorted((r for r in results if r.get("library") == lib and "error" not in r), key=lambda r: r["n_train"])
        if not rows:
            continue
        n = [r["n_train"] for r in rows]
        cpu = all("build_cpu_s" in r for r in rows)  # CPU seconds: steadier than wall time on a shared machine
        axes[0].plot(n, [r["build_cpu_s" if cpu else "build_s"] for r in rows], marker=marker, color=color,
                     label=f"{lib} featurize ({'CPU' if cpu else 'wall'} s)")
        if lib == "datacredit":
            key = "score_cpu_s" if all("score_cpu_s" in r for r in rows) else "score_s"
            axes[0].plot(n, [r[key] for r in rows], marker=marker, color="C1", ls="--",
                         label=f"datacredit score {rows[0]['n_query']} queries ({'CPU' if 'cpu' in key else 'wall'} s)")
        axes[1].plot(n, [r["peak_rss_build_mb"] for r in rows], marker=marker, color=color, label=f"{lib} featurize")
        if lib == "datacredit":
            axes[1].plot(n, [r["peak_rss_score_mb"] for r in rows], marker=marker, color="C1", ls="--",
                         label="datacredit score")
            axes[1].plot(n, [r["peak_rss_topk_mb"] for r in rows], marker=marker, color="C3", ls=":",
                         label="datacredit score + top-k")
        axes[2].plot(n, [r["disk_bytes_per_example"] for r in rows], marker=marker, color=color, label=lib)
    for ax, title in zip(axes, ("cost (seconds)", "peak RSS (MB)", "disk bytes per example")):
        ax.set_xscale("log")
        ax.set_xlabel("n_train")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[2].set_ylim(bottom=0)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, nargs="*", default=[1000, 10000, 100000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--memory-gb", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bergson", action="store_true", help="also measure EleutherAI bergson (if importable)")
    parser.add_argument("--bergson-max-n", type=int, default=None, help="largest n_train bergson is run on")
    parser.add_argument("--workdir", default=None, help="where the stores are built (default: a temporary dir)")
    parser.add_argument("--out", default=str(RESULTS / "gradstore_scale.json"))
    parser.add_argument("--interleave", type=int, default=0,
                        help="also time datacredit and bergson builds alternately this many times each")
    parser.add_argument("--interleave-n", type=int, default=512)
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--agreement", type=int, default=0,
                        help="also compare both projections with exact Grad-Dot on this many training examples")
    parser.add_argument("--agreement-queries", type=int, default=20)
    parser.add_argument("--worker", choices=["datacredit", "bergson", "agreement"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        fn = {"datacredit": worker_datacredit, "bergson": worker_bergson, "agreement": worker_agreement}[args.worker]
        print(json.dumps(fn(args, args.worker_n)))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gradstore-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [a for a in sys.argv[1:]]
    if args.workdir is None:
        argv += ["--workdir", str(workdir)]
    results = []
    try:
        if args.agreement:
            results.append(_run_worker("agreement", args.agreement, argv))
        for rep in range(args.interleave):  # alternating, so both see the same machine load on average
            for kind in ("datacredit", "bergson"):
                row = _run_worker(kind, args.interleave_n, [*argv, "--build-only"])
                results.append({**row, "library": f"{kind} (interleaved)", "repeat": rep})
                _clear(workdir)  # a store left here would be resumed (nothing to do) by the next repeat
        for n in args.n_train:
            results.append(_run_worker("datacredit", n, argv))
            if args.bergson and (args.bergson_max_n is None or n <= args.bergson_max_n):
                results.append(_run_worker("bergson", n, argv))
            _clear(workdir)  # keep disk bounded: every n builds its own stores
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    import torch

    meta = {"command": "python benchmarks/gradstore_scale.py " + " ".join(sys.argv[1:]),
            "model": f"GPT2 from config: d={args.d}, layers={args.layers}, heads={args.heads}, T={args.seq}",
            "k": args.k, "dtype": args.dtype, "batch_size": args.batch_size, "threads": args.threads,
            "memory_gb": args.memory_gb, "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    if any(r.get("library") in ("datacredit", "bergson") for r in results):
        plot(results, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} (and the plot beside it, when there are n_train runs)")


if __name__ == "__main__":
    main()
