"""Benchmark: train-batch × validation-set gradient dot products, datacredit's capture engine vs ``torch.func``.

For every case it computes the ``(B_train, B_val)`` matrix ``⟨∇ℓ_i, ∇ℓ_j⟩`` over all parameters two ways:

* ``datacredit``  — :func:`~datacredit.capture.example_grads` on both batches, then ``train.gram(val)``
  (ghost dots or val-first, chosen per layer by cost);
* ``torch.func``  — ``vmap(grad(per-example loss))`` on both batches, flatten, matmul (the baseline);

and the val-first column ``⟨∇ℓ_i, Σ_j ∇ℓ_j⟩`` ``(B_train, 1)`` (the In-Run Data Shapley use case) two ways:

* ``datacredit val-first`` — summed validation gradient ``V`` by ordinary autograd, then ``train.dot(V)``;
* ``torch.func val-first`` — ``vmap(grad)`` on the train batch only, flatten, times the flattened ``V``.

``plain fwd+bwd`` (one ordinary forward + backward per batch) is timed too, as the floor for anything that runs a
backward.

Each method runs in its own fresh process (forked from a server that has only imported torch, torch._dynamo and
datacredit), which first runs every method once on a tiny MLP (so one-time costs count for none), builds the model
and the data from fixed seeds, times one warm-up call and the median of ``--repeats`` calls (``time.perf_counter``,
the whole pipeline: forwards, backwards and products), and reports its peak RSS after that one call
(``resource.getrusage``). Peak memory is that peak minus the peak of a baseline process that does the same except the
method (torch's CPU allocator is invisible to ``tracemalloc``). The gram matrices are sent back and checked against
``torch.func`` in float32.

Usage: ``python benchmarks/capture.py [--quick] [--repeats N] [--out benchmarks/results/capture.json]``.
Exits 1 if a datacredit result differs from torch.func by more than ``--tol`` (max relative error).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from datacredit.capture import Capture, example_grads
from datacredit.models import Block, TinyGPT, mlp

METHODS = ("datacredit", "torch.func", "datacredit val-first", "torch.func val-first", "plain fwd+bwd")
BASELINE_OF = {"datacredit": "torch.func", "datacredit val-first": "torch.func val-first"}


@dataclass(frozen=True)
class Case:
    """One benchmark setting. ``kind``: ``"mlp"``, ``"block"`` (one transformer Block) or ``"gpt"`` (TinyGPT)."""

    name: str
    kind: str
    b_train: int
    b_val: int
    d_in: int = 0  # mlp
    hidden: tuple[int, ...] = ()  # mlp
    d_out: int = 0  # mlp
    d: int = 0  # block / gpt width
    n_layers: int = 0  # gpt
    n_heads: int = 0  # block / gpt
    seq_len: int = 0  # block / gpt
    vocab: int = 0  # gpt

    def describe(self) -> str:
        if self.kind == "mlp":
            widths = "→".join(str(w) for w in (self.d_in, *self.hidden, self.d_out))
            return f"MLP {widths}, {self.b_train}×{self.b_val}"
        if self.kind == "block":
            return f"1 Block d={self.d}, {self.n_heads} heads, T={self.seq_len}, {self.b_train}×{self.b_val}"
        return (f"TinyGPT d={self.d}, {self.n_layers} layers, {self.n_heads} heads, vocab {self.vocab}, "
                f"T={self.seq_len}, {self.b_train}×{self.b_val}")


FULL = [
    Case("mlp", "mlp", 64, 64, d_in=784, hidden=(512, 256), d_out=10),
    Case("block", "block", 16, 16, d=256, n_heads=4, seq_len=128),
    Case("gpt", "gpt", 16, 16, d=256, n_layers=2, n_heads=4, seq_len=128, vocab=96),
]
QUICK = [
    Case("mlp", "mlp", 8, 8, d_in=32, hidden=(16,), d_out=4),
    Case("block", "block", 4, 4, d=16, n_heads=2, seq_len=8),
    Case("gpt", "gpt", 4, 4, d=16, n_layers=1, n_heads=2, seq_len=8, vocab=11),
]


# -- models, data and per-example losses ---------------------------------------------------------------------------


def build(case: Case) -> tuple[nn.Module, Callable, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Model (float32, seeded), per-example loss ``loss(model, *batch) -> (N,)``, train batch, val batch."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if case.kind == "mlp":
        model = mlp(case.d_in, list(case.hidden), case.d_out)

        def batch(n: int) -> tuple[Tensor, ...]:
            return torch.randn(n, case.d_in, generator=gen), torch.randint(0, case.d_out, (n,), generator=gen)

        def loss(m: Callable, x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(m(x), y, reduction="none")

    elif case.kind == "block":
        model = Block(case.d, case.n_heads)

        def batch(n: int) -> tuple[Tensor, ...]:
            shape = (n, case.seq_len, case.d)
            return torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)

        def loss(m: Callable, x: Tensor, y: Tensor) -> Tensor:  # mean squared error to a random target
            return (m(x) - y).pow(2).mean(dim=(1, 2))

    else:
        model = TinyGPT(case.vocab, case.d, case.n_layers, case.n_heads, max_len=case.seq_len, tied=True)

        def batch(n: int) -> tuple[Tensor, ...]:
            return (torch.randint(0, case.vocab, (n, case.seq_len + 1), generator=gen),)

        def loss(m: Callable, idx: Tensor) -> Tensor:  # next-token cross-entropy, mean over each sequence
            logits = m(idx[:, :-1])
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1), reduction="none")
            return ce.reshape(idx.shape[0], -1).mean(1)

    return model, loss, batch(case.b_train), batch(case.b_val)


# -- the four methods ------------------------------------------------------------------------------------------------


def ours_gram(model: nn.Module, loss: Callable, train: tuple, val: tuple) -> Tensor:
    with Capture(model) as cap:
        g_train = example_grads(cap, loss(model, *train))
        g_val = example_grads(cap, loss(model, *val))
    return g_train.gram(g_val)


def summed_grad(model: nn.Module, loss: Callable, batch: tuple) -> dict[str, Tensor]:
    """``Σ_j ∇ℓ_j`` by one ordinary backward, ``{name: shape}``."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss(model, *batch).sum(), list(params.values()))
    return dict(zip(params, grads))


def ours_val_first(model: nn.Module, loss: Callable, train: tuple, val: tuple) -> Tensor:
    v = summed_grad(model, loss, val)
    with Capture(model) as cap:
        g_train = example_grads(cap, loss(model, *train))
    return g_train.dot(v)


def func_grads(model: nn.Module, loss: Callable, batch: tuple) -> Tensor:
    """Per-example gradients by ``vmap(grad(...))``, flattened in parameter order, ``(N, numel)``."""
    params = {k: p.detach() for k, p in model.named_parameters()}

    def single(p: dict[str, Tensor], *example: Tensor) -> Tensor:
        call = lambda *a: functional_call(model, p, a)  # noqa: E731
        return loss(call, *(e.unsqueeze(0) for e in example))[0]

    g = vmap(grad(single), in_dims=(None, *([0] * len(batch))))(params, *batch)
    return torch.cat([g[k].reshape(batch[0].shape[0], -1) for k in params], dim=1)


def func_gram(model: nn.Module, loss: Callable, train: tuple, val: tuple) -> Tensor:
    return func_grads(model, loss, train) @ func_grads(model, loss, val).T


def func_val_first(model: nn.Module, loss: Callable, train: tuple, val: tuple) -> Tensor:
    v = torch.cat([g.reshape(-1) for g in summed_grad(model, loss, val).values()])
    return func_grads(model, loss, train) @ v[:, None]


def plain_backward(model: nn.Module, loss: Callable, train: tuple, val: tuple) -> None:
    """Reference floor, not a method: one ordinary forward + backward of each batch (summed gradients only)."""
    summed_grad(model, loss, train)
    summed_grad(model, loss, val)


RUNNERS = {
    "datacredit": ours_gram,
    "torch.func": func_gram,
    "datacredit val-first": ours_val_first,
    "torch.func val-first": func_val_first,
    "plain fwd+bwd": plain_backward,
}


# -- one fresh process per method ----------------------------------------------------------------------------------


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(case: Case, method: str | None, repeats: int, threads: int) -> dict:
    """Run in a fresh process. ``method=None``: only build the model and the data (the memory baseline)."""
    if threads > 0:
        torch.set_num_threads(threads)
    # One-time costs (torch.func's lazy imports of torch._dynamo and sympy, thread pools, kernel setup) count for no
    # method: every process, the baseline included, first runs every method once on a tiny model.
    tiny = build(QUICK[0])
    for runner in RUNNERS.values():
        runner(*tiny)
    del tiny
    model, loss, train, val = build(case)
    if method is None:
        return {"peak_rss_mb": _max_rss_mb()}
    run = RUNNERS[method]
    start = time.perf_counter()
    result = run(model, loss, train, val)
    first = time.perf_counter() - start
    peak = _max_rss_mb()  # one run's peak, before repeats can add allocator fragmentation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(model, loss, train, val)
        times.append(time.perf_counter() - start)
    # plain lists: torch's tensor pickling shares memory through the sending process, which is about to exit
    return {"result": None if result is None else result.detach().tolist(), "first_s": first,
            "median_s": statistics.median(times), "times_s": times, "peak_rss_mb": peak}


def _context() -> mp.context.BaseContext:
    # A fork server that has imported torch once starts each measuring process in a fraction of a second; every
    # process still starts from the same clean state (nothing has run in the server), so RSS deltas are comparable.
    # torch._dynamo is what torch.func imports on first use (with sympy: ~800 modules, seconds).
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.func", "torch._dynamo", "datacredit.capture", "datacredit.models"])
        return ctx
    return mp.get_context("spawn")


def _child(conn, case: Case, method: str | None, repeats: int, threads: int) -> None:
    try:
        conn.send(("ok", measure(case, method, repeats, threads)))
    except BaseException as exc:  # report it in the parent rather than hang
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        conn.close()


def in_fresh_process(ctx: mp.context.BaseContext, case: Case, method: str | None, repeats: int, threads: int) -> dict:
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, case, method, repeats, threads))
    proc.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:  # died without a word (e.g. killed for memory)
        status, payload = "error", None
    proc.join()
    payload = f"process died with exit code {proc.exitcode}" if payload is None else payload
    if status != "ok":
        raise RuntimeError(f"{case.name} / {method or 'baseline'}: {payload}")
    return payload


def rel_err(ours: Tensor, ref: Tensor) -> float:
    """``max |ours − ref| / max |ref|``."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def run_case(ctx: mp.context.BaseContext, case: Case, repeats: int, threads: int) -> dict:
    base = in_fresh_process(ctx, case, None, repeats, threads)["peak_rss_mb"]
    out = {name: in_fresh_process(ctx, case, name, repeats, threads) for name in METHODS}
    for r in out.values():
        r["result"] = None if r["result"] is None else torch.tensor(r["result"])
    ref = out["torch.func"]["result"]
    errors = {
        "datacredit": rel_err(out["datacredit"]["result"], ref),
        "datacredit val-first": rel_err(out["datacredit val-first"]["result"], ref.sum(1, keepdim=True)),
        "torch.func val-first": rel_err(out["torch.func val-first"]["result"], ref.sum(1, keepdim=True)),
    }
    rows = {}
    for name in METHODS:
        r = out[name]
        rows[name] = {"median_s": r["median_s"], "first_s": r["first_s"], "times_s": r["times_s"],
                      "peak_mb": max(r["peak_rss_mb"] - base, 0.0), "max_rel_err": errors.get(name)}
    for ours, theirs in BASELINE_OF.items():
        rows[ours]["speedup"] = rows[theirs]["median_s"] / rows[ours]["median_s"]
        # below 1 MB the RSS delta is noise (page granularity, allocator caches): no ratio
        small = rows[ours]["peak_mb"] < 1.0
        rows[ours]["memory_ratio"] = None if small else rows[theirs]["peak_mb"] / rows[ours]["peak_mb"]
    model = build(case)[0]
    n_params = sum(p.numel() for p in model.parameters())
    return {"case": asdict(case), "description": case.describe(), "n_params": n_params,
            "baseline_rss_mb": base, "methods": rows}


# -- reporting -------------------------------------------------------------------------------------------------------


REF_NOTE = {"torch.func": "(reference)", "plain fwd+bwd": "(floor: no per-example work)"}


def table(results: list[dict]) -> str:
    lines = [
        "| case | method | median time (ms) | peak memory (MB) | torch.func time / ours | torch.func memory / ours "
        "| max rel. error vs torch.func |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for name in METHODS:
            r = res["methods"][name]
            speed = f"{r['speedup']:.2f}×" if "speedup" in r else ""
            mem = "" if "memory_ratio" not in r else "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.1f}×"
            err = f"{r['max_rel_err']:.1e}" if r["max_rel_err"] is not None else REF_NOTE.get(name, "")
            lines.append(f"| {res['description']} ({res['n_params']:,} params) | {name} | {1000 * r['median_s']:.1f} "
                         f"| {r['peak_mb']:.1f} | {speed} | {mem} | {err} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, one repeat: a smoke run of a few seconds")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats after a warm-up (default 5; quick 1)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "capture.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in each measuring process (default 1: stable on a shared machine, where "
                             "OpenMP barriers on busy cores dominate; 0 = torch's default)")
    parser.add_argument("--tol", type=float, default=1e-4, help="max relative error allowed vs torch.func (float32)")
    args = parser.parse_args(argv)
    cases = QUICK if args.quick else FULL
    repeats = args.repeats or (1 if args.quick else 5)
    ctx = _context()
    results = []
    for case in cases:
        print(f"[{case.name}] {case.describe()} ...", file=sys.stderr, flush=True)
        results.append(run_case(ctx, case, repeats, args.threads))
    print(table(results))
    report = {
        "benchmark": "train × validation gradient dot products",
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
        "repeats": repeats,
        "tolerance": args.tol,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "torch_threads": args.threads if args.threads > 0 else torch.get_num_threads(),
                    "cpu_count": mp.cpu_count(), "start_method": ctx.get_start_method()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    bad = [(res["case"]["name"], name, r["max_rel_err"]) for res in results for name, r in res["methods"].items()
           if r["max_rel_err"] is not None and not r["max_rel_err"] <= args.tol]
    if bad:
        for case_name, name, err in bad:
            print(f"FAIL: {case_name} / {name}: max relative error {err:.2e} > {args.tol:.0e} vs torch.func",
                  file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
