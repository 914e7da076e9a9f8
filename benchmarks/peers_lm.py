"""Language-model peers side by side (issue 17): our EK-FAC influence, exact Grad-Dot and projected Grad-Dot
(GradientStore) against EleutherAI bergson and dattri-llm on the same GPT-2, tokens and parameters.

Model: ``transformers.GPT2LMHeadModel`` built from a config (random init, nothing downloaded): width ``--d``,
``--layers`` blocks, ``--heads`` heads, character vocabulary of ``datacredit/data/sample.txt``; ``n_positions`` is
``--batch-size × (--seq + 1)`` because bergson refuses a token batch longer than the context (the extra position
rows are never used). Data: random windows of ``--seq + 1`` characters (training windows seed 1, queries seed 2).
Attributed parameters: the blocks' ``Conv1D`` weights (biases, embeddings, LayerNorms frozen: bergson's default
``include_bias=False``; dattri-llm is told to leave the frozen biases out). Loss: summed next-token cross-entropy of
the ``--seq`` predictions of a window. Influence: empirical Fisher, damping 0.1 × the mean eigenvalue (each library's
relative form of it).

Every (method, query count) runs in a fresh process with one torch thread, in interleaved order (the order reverses
for the next query count), and reports fit and score CPU and wall seconds and the process's peak RSS. Its scores go
to ``--workdir``; the parent then reports each method's mean per-query Pearson / Spearman correlation with exact
Grad-Dot and the EK-FACs' with each other.

Run (from the repository root)::

    .venv/bin/python benchmarks/peers_lm.py --n-train 500 --queries 20 200 --out benchmarks/results/peers_lm.json

``--methods A B --keep earlier.json --workdir SAME`` reruns some methods and keeps the earlier rows of the others.
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

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ours-graddot", "ours-ekfac", "ours-gradstore", "bergson-graddot", "bergson-ekfac", "dattri-llm-tracin",
           "dattri-llm-ekfac", "ours-ekfac-oneround")
EXACT = "ours-graddot"
EKFAC = ("ours-ekfac", "bergson-ekfac", "dattri-llm-ekfac", "ours-ekfac-oneround")


def _setup(args: argparse.Namespace):
    """The model (same weights in every process), training windows and query windows, ``(n, seq + 1)`` int64."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from datacredit.data.text import load_text_sample

    text = load_text_sample()
    vocab = sorted(set(text))
    tokens = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)

    def windows(n: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(tokens) - args.seq - 1, (n,), generator=gen)
        return tokens[starts[:, None] + torch.arange(args.seq + 1)]

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=args.batch_size * (args.seq + 1), n_embd=args.d,
                        n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("transformer.h.") and name.endswith(".weight") and ".ln_" not in name)
    return model, windows(args.n_train, 1), windows(args.worker_q, 2)


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from benchmarks.bench import peers_lm
    from datacredit.capture.kronecker import KronProjection
    from datacredit.dataset import ArrayDataset
    from datacredit.gradstore import GradientStore
    from datacredit.methods import GradDot, Influence
    from datacredit.task import LanguageModelingTask

    torch.set_num_threads(1)
    model, train, queries = _setup(args)
    method, work = args.worker, Path(args.workdir)
    out: dict = {"method": method, "n_train": len(train), "n_query": len(queries)}
    task = LanguageModelingTask(reduction="sum")
    times: dict[str, float] = {}
    if method.startswith("ours-"):
        if method == "ours-graddot":
            fitted = GradDot(model, task, batch_size=args.batch_size, progress=False)
        elif method.startswith("ours-ekfac"):
            # default: as many preconditioned queries per pass over the training set as fit 2**26 numbers (here 32:
            # 7 passes for 200 queries); "oneround": all of them in one pass, as bergson and dattri-llm hold them
            rounds = {"query_batch": len(queries)} if method == "ours-ekfac-oneround" else {}
            fitted = Influence(model, task, curvature="ekfac", batch_size=args.batch_size, progress=False, **rounds)
        else:
            fitted = GradientStore(work / f"store-{len(queries)}", model, task, projection=KronProjection(args.k),
                                   dtype="float32", batch_size=args.batch_size, on_mismatch="refit")
        t0, c0 = _clock()
        fitted = fitted.build(ArrayDataset(train)) if method == "ours-gradstore" else fitted.fit(ArrayDataset(train))
        t1, c1 = _clock()
        values = np.asarray(fitted.score(ArrayDataset(queries)).values, dtype=np.float64)
        t2, c2 = _clock()
        times = {"fit_wall_s": t1 - t0, "fit_cpu_s": c1 - c0, "score_wall_s": t2 - t1, "score_cpu_s": c2 - c1}
    elif method == "bergson-graddot":
        values, times = peers_lm.bergson_graddot(model, train, queries, work / method, k=args.k,
                                                 batch_size=args.batch_size)
    elif method == "bergson-ekfac":
        values, times = peers_lm.bergson_influence(model, train, queries, work / method, batch_size=args.batch_size)
    else:
        kind = method.removeprefix("dattri-llm-")
        t0, c0 = _clock()
        values = peers_lm.dattri_llm_scores(model, train, queries, kind, work / method, loss=peers_lm.lm_loss("sum"),
                                            batch_size=args.batch_size)
        t1, c1 = _clock()
        times = {"total_wall_s": t1 - t0, "total_cpu_s": c1 - c0}  # one live call: fit and score not separable
    np.save(work / f"{method}-q{len(queries)}.npy", values)
    out.update(times)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _run(method: str, q: int, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--worker-q", str(q), *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.strftime("%H:%M:%S")
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        row = {"method": method, "n_query": q, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    else:
        row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(started=start, load_before=load, load_after=os.getloadavg()[0])
    print(json.dumps(row), flush=True)
    return row


def agreement(workdir: Path, methods: list[str], q: int) -> dict:
    """Mean per-query Pearson and Spearman of each method with exact Grad-Dot, and of the EK-FACs with each other."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    scores = {m: np.load(workdir / f"{m}-q{q}.npy") for m in methods if (workdir / f"{m}-q{q}.npy").exists()}

    def corr(a: str, b: str) -> dict:
        x, y = scores[a], scores[b]
        return {"pearson": float(np.mean([pearsonr(x[:, j], y[:, j])[0] for j in range(x.shape[1])])),
                "spearman": float(np.mean([spearmanr(x[:, j], y[:, j])[0] for j in range(x.shape[1])]))}

    out = {}
    for m in scores:
        if EXACT in scores and m != EXACT:
            out[f"{m} vs {EXACT}"] = corr(m, EXACT)
    ekfacs = [m for m in EKFAC if m in scores]
    for i, a in enumerate(ekfacs):
        for b in ekfacs[i + 1:]:
            out[f"{a} vs {b}"] = corr(a, b)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--queries", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--k", type=int, default=16, help="projection per side for the projected Grad-Dots")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=list(METHODS[:-1]), choices=METHODS)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="JSON results (default: print only)")
    parser.add_argument("--keep", default=None, help="JSON of an earlier run in the same --workdir whose rows to keep")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-q", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="peers-lm-"))
    workdir.mkdir(parents=True, exist_ok=True)
    argv = ["--n-train", str(args.n_train), "--d", str(args.d), "--layers", str(args.layers), "--heads",
            str(args.heads), "--seq", str(args.seq), "--k", str(args.k), "--batch-size", str(args.batch_size),
            "--workdir", str(workdir)]
    rows: list[dict] = []
    agree: dict[str, dict] = {}
    if args.keep:  # an earlier run's rows, less its errors and the rows of the methods run again now
        kept = json.loads(Path(args.keep).read_text())
        rows = [r for r in kept["rows"]
                if "error" not in r and not (r["method"] in args.methods and r["n_query"] in args.queries)]
        agree = dict(kept["agreement"])
    config = {k: v for k, v in vars(args).items() if not k.startswith("worker")}
    for i, q in enumerate(args.queries):
        order = args.methods if i % 2 == 0 else args.methods[::-1]
        for method in order:
            rows.append(_run(method, q, argv))
            _write(args.out, {"config": config, "rows": rows, "agreement": agree, "cpus": os.cpu_count()})
        agree[str(q)] = agreement(workdir, list(METHODS), q)  # every method whose scores are in the workdir
        print(json.dumps({"n_query": q, "agreement": agree[str(q)]}, indent=1), flush=True)
        _write(args.out, {"config": config, "rows": rows, "agreement": agree, "cpus": os.cpu_count()})


def _write(out: str | None, result: dict) -> None:
    """The results so far, replaced atomically after every row (a stopped run keeps what it measured)."""
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
