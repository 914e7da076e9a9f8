"""Benchmark: the cost of In-Run Data Shapley per training step, against plain training and a torch.func baseline.

One training loop, four variants run side by side on identical copies of the model (same seed), the same batches and
the same optimizer settings:

* ``plain``  — ``task.loss(model, batch).mean().backward(); opt.step(); opt.zero_grad()``;
* ``inrun1`` — the same loop with ``with shapley.step(ids):`` around the backward (first-order ``InRunShapley``);
* ``inrun2`` — the same with ``order=2`` (one Hessian-vector product per step);
* ``func``   — the torch.func baseline of first-order In-Run Shapley: per-example gradients of the training batch by
  ``vmap(grad(...))``, the summed validation gradient by one ordinary backward, the optimizer's preconditioner
  (:func:`datacredit.optimizers.affine_step`) and one dot product per example; the update uses the mean of the
  per-example gradients as ``.grad`` (so there is no second training backward).

Extra variants (MLP), for evidence about where the time goes (not part of the library):

* ``fused-bound`` — plain training with the validation rows appended to the batch with zero loss weight: the
  least a validation gradient computed inside the training pass would cost;
* ``inrun1 val=N`` — first order with another validation size (overhead vs validation size).

Every step of every variant is timed with ``time.perf_counter`` (forward, backward, values, update). The variants are
interleaved step by step in a rotating order (ABCD, BCDA, ...) so that load from other processes on a shared machine
hits them alike; the reported time is the median over the steps after the warm-up, and the ratios are ratios of those
medians. The first-order values of ``inrun1`` and ``func`` are compared at the end (they follow the same trajectory).

A second phase instruments a few more steps of ``inrun1`` / ``inrun2`` (wrapping functions of ``datacredit`` in this
process only) and reports exclusive time per part: the user's forward/backward, the capture hooks, collecting the
per-example pieces, the validation forward / backward, the Hessian-vector product, the dot products, the optimizer
update and the rest.

Regression check for the capture leak fixed in d14990e: the number of live tensors must not grow across the timed
steps (by less than one per step; before the fix it grew by ~170 tensors, +318 MB, per GPT step).

Usage: ``python benchmarks/inrun_overhead.py [--quick] [--threads N] [--out benchmarks/results/inrun_overhead.json]``
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import datacredit.methods.inrun as inrun_mod
from datacredit import ClassificationTask, LanguageModelingTask
from datacredit.capture import Capture, ExampleGrads, engine
from datacredit.data import CharDataset, load_fashion_mnist, load_text_sample
from datacredit.methods.inrun import InRunShapley
from datacredit.models import TinyGPT, mlp
from datacredit.optimizers import affine_step
from datacredit.task import Task


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- cases -----------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    describe: str
    make_model: Callable[[], nn.Module]
    task: Task
    batches: list[tuple[np.ndarray, tuple]]  # (ids, batch)
    validation: tuple
    opts: dict[str, Callable]  # optimizer name -> factory(params)
    warmup: int
    steps: int
    variants: list[str] = field(default_factory=lambda: ["plain", "inrun1", "inrun2", "func"])
    val_sweep: dict[str, list[int]] = field(default_factory=dict)  # optimizer -> extra inrun1 validation sizes
    val_pool: tuple | None = None  # where the sweep's validation batches are taken from
    profile_steps: int = 2


def _slice(batch: tuple, n: int) -> tuple:
    return tuple(t[:n] for t in batch)


def mlp_case(quick: bool) -> Case:
    b, b_val = 64, 32
    warmup, steps = (2, 5) if quick else (4, 20)
    train = load_fashion_mnist(split="train", limit=b * 20, seed=0)
    test = load_fashion_mnist(split="test", limit=256, seed=0)
    x, y = train.tensors
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    batches = [(train.ids[idx.numpy()], (x[idx], y[idx])) for idx in perm.split(b)]
    pool = test.tensors

    def make() -> nn.Module:
        torch.manual_seed(0)
        return mlp(784, [512, 256], 10)

    return Case("mlp", f"MLP 784-512-256-10 on Fashion-MNIST, batch {b}, validation {b_val} test images",
                make, ClassificationTask(), batches, _slice(pool, b_val),
                {"SGD": lambda p: torch.optim.SGD(p, lr=0.05), "Adam": lambda p: torch.optim.Adam(p, lr=1e-3)},
                warmup, steps, ["plain", "inrun1", "inrun2", "func", "fused-bound"],
                val_sweep={} if quick else {"SGD": [8, 128], "Adam": [8]}, val_pool=pool,
                profile_steps=2 if quick else 10)


def gpt_case(quick: bool) -> Case:
    if quick:
        d, layers, heads, t, b, b_val, warmup, steps = 64, 2, 4, 32, 8, 2, 1, 3
    else:
        d, layers, heads, t, b, b_val, warmup, steps = 256, 4, 4, 128, 16, 4, 1, 6
    data = CharDataset(load_text_sample(), t)
    tokens = data.tensors[0]
    n_val = 16
    pool = (tokens[-n_val:],)
    train_rows = torch.randperm(len(tokens) - n_val, generator=torch.Generator().manual_seed(0))
    batches = [(data.ids[idx.numpy()], (tokens[idx],)) for idx in train_rows.split(b) if len(idx) == b]

    def make() -> nn.Module:
        torch.manual_seed(0)
        return TinyGPT(data.vocab_size, d=d, n_layers=layers, n_heads=heads, max_len=t)

    n_params = sum(p.numel() for p in make().parameters())
    return Case("gpt", f"TinyGPT d={d}, {layers} layers, {heads} heads, T={t}, vocab {data.vocab_size} "
                f"({n_params / 1e6:.2f} M params, tied), batch {b}, validation {b_val} held-out chunks",
                make, LanguageModelingTask(), batches, _slice(pool, b_val),
                {"SGD": lambda p: torch.optim.SGD(p, lr=0.1), "Adam": lambda p: torch.optim.Adam(p, lr=3e-4)},
                warmup, steps, val_pool=pool, profile_steps=1)


# -- the variants ----------------------------------------------------------------------------------------------------


class Plain:
    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, task: Task, validation: tuple):
        self.model, self.opt, self.task = model, opt, task

    def step(self, ids: np.ndarray, batch: tuple, region: Callable = None) -> None:
        with _region(region, "train forward+backward (user)"):
            self.task.loss(self.model, batch).mean().backward()
        with _region(region, "optimizer update"):
            self.opt.step()
        self.opt.zero_grad()


class InRun(Plain):
    def __init__(self, model, opt, task, validation, order: int):
        super().__init__(model, opt, task, validation)
        self.shapley = InRunShapley(model, task, validation=validation, optimizer=opt, order=order)

    def step(self, ids, batch, region=None) -> None:
        with _region(region, "train forward+backward (user)"):
            with self.shapley.step(ids):
                self.task.loss(self.model, batch).mean().backward()
        with _region(region, "optimizer update"):
            self.opt.step()  # In-Run's pre-hook runs here (its parts are timed under their own labels)
        self.opt.zero_grad()

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        s = self.shapley.values()
        return s.train_ids, s.values[:, 0]


class FusedBound(Plain):
    """Plain training with the validation rows appended to the batch (their loss weighted 0, so the update is the
    same): what computing the validation gradient inside the training forward/backward would cost at least."""

    def __init__(self, model, opt, task, validation):
        super().__init__(model, opt, task, validation)
        self.validation = validation

    def step(self, ids, batch, region=None) -> None:
        both = tuple(torch.cat([t, v]) for t, v in zip(batch, self.validation))
        self.task.loss(self.model, both)[: len(ids)].mean().backward()
        self.opt.step()
        self.opt.zero_grad()


class FuncBaseline(Plain):
    """First-order In-Run values from torch.func per-example gradients (the slow, obviously-correct route)."""

    def __init__(self, model, opt, task, validation):
        super().__init__(model, opt, task, validation)
        self.validation = validation
        self.sums: dict[int, float] = defaultdict(float)

        def single(params: dict, *example):
            call = lambda x: functional_call(model, params, (x,))  # noqa: E731
            return task.loss(call, tuple(e.unsqueeze(0) for e in example))[0]

        self.single = single

    def step(self, ids, batch, region=None) -> None:
        named = dict(self.model.named_parameters())
        params = {k: p.detach() for k, p in named.items()}
        n = len(ids)
        per_example = vmap(grad(self.single), in_dims=(None, *([0] * len(batch))))(params, *batch)
        for k, p in named.items():
            p.grad = per_example[k].mean(0)  # the ordinary update's gradient, no second backward
        g_val = torch.autograd.grad(self.task.measurement(self.model, self.validation).sum(), list(named.values()))
        affine = affine_step(self.opt)
        phi = torch.zeros(n)
        for (k, p), gv in zip(named.items(), g_val):
            s = affine[p][0]
            phi += per_example[k].reshape(n, -1) @ (s * gv).reshape(-1) / n
        for i, v in zip(ids.tolist(), phi.tolist()):
            self.sums[i] += v
        self.opt.step()
        self.opt.zero_grad()

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.array(sorted(self.sums))
        return ids, np.array([self.sums[i] for i in ids])


def _region(region: Callable | None, label: str):
    return region(label) if region is not None else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def build_variants(case: Case, opt_name: str) -> dict[str, Plain]:
    def make(kind: str, validation: tuple) -> Plain:
        model = case.make_model()
        opt = case.opts[opt_name](model.parameters())
        if kind == "plain":
            return Plain(model, opt, case.task, validation)
        if kind == "func":
            return FuncBaseline(model, opt, case.task, validation)
        if kind == "fused-bound":
            return FusedBound(model, opt, case.task, validation)
        return InRun(model, opt, case.task, validation, order=int(kind[len("inrun")]))

    variants = {k: make(k, case.validation) for k in case.variants}
    for n_val in case.val_sweep.get(opt_name, []):
        variants[f"inrun1 val={n_val}"] = make("inrun1", _slice(case.val_pool, n_val))
    return variants


def time_interleaved(case: Case, opt_name: str) -> tuple[dict, dict[str, Plain]]:
    variants = build_variants(case, opt_name)
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    tensors_after_warmup = rss_after_warmup = None
    for k in range(case.warmup + case.steps):
        if k == case.warmup:
            tensors_after_warmup, rss_after_warmup = live_tensors(), rss_mb()
        ids, batch = case.batches[k % len(case.batches)]
        shift = k % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name].step(ids, batch)
            elapsed = time.perf_counter() - start
            if k >= case.warmup:
                times[name].append(elapsed)
        print(f"  {case.name}/{opt_name} step {k + 1}/{case.warmup + case.steps}", file=sys.stderr, flush=True)
    tensors_after, rss_after = live_tensors(), rss_mb()
    # regression check for the capture leak (each step used to keep its activations alive)
    grew = tensors_after - tensors_after_warmup
    assert grew < case.steps, f"live tensors grew by {grew} over {case.steps} steps (capture leak?)"
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {"inrun1/plain": med["inrun1"] / med["plain"], "inrun2/plain": med["inrun2"] / med["plain"],
              "func/inrun1": med["func"] / med["inrun1"], "func/plain": med["func"] / med["plain"]}
    for name in names:
        if name not in ("plain", "inrun1", "inrun2", "func"):
            ratios[f"{name}/plain"] = med[name] / med["plain"]
    ids_a, a = variants["func"].values()  # the same first-order values by the torch.func route
    ids_b, b = variants["inrun1"].values()
    assert np.array_equal(ids_a, ids_b)
    agreement = {"func vs inrun1": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))}
    memory = {"live_tensors_after_warmup": tensors_after_warmup, "live_tensors_after": tensors_after,
              "rss_mb_after_warmup": round(rss_after_warmup, 1), "rss_mb_after": round(rss_after, 1)}
    return {"median_step_s": med, "ratios": ratios, "steps": case.steps, "warmup": case.warmup,
            "all_step_s": times, "values_rel_diff": agreement, "memory": memory}, variants


# -- where the time goes ---------------------------------------------------------------------------------------------


class Breakdown:
    """Exclusive wall time per label; nested labelled calls are subtracted from their parent."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []
        self._restore: list[tuple[Any, str, Any]] = []

    def enter(self, label: str) -> None:
        self.stack.append([label, time.perf_counter(), 0.0])

    def exit(self) -> None:
        label, start, child = self.stack.pop()
        dt = time.perf_counter() - start
        self.totals[label] += dt - child
        if self.stack:
            self.stack[-1][2] += dt

    def region(self, label: str):
        bd = self

        class _R:
            def __enter__(self):
                bd.enter(label)

            def __exit__(self, *exc):
                bd.exit()
                return False

        return _R()

    def top(self) -> str | None:
        return self.stack[-1][0] if self.stack else None

    def wrap(self, owner: Any, attr: str, label: str | Callable[..., str]) -> None:
        orig = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        bd = self

        @functools.wraps(orig)
        def wrapper(*a, **k):
            bd.enter(label(*a, **k) if callable(label) else label)
            try:
                return orig(*a, **k)
            finally:
                bd.exit()

        setattr(owner, attr, wrapper)
        self._restore.append((owner, attr, orig))

    def install(self, task: Task) -> None:
        bd = self
        self.wrap(task, "measurement", "validation forward")
        self.wrap(inrun_mod, "example_grads", "validation backward")
        self.wrap(Capture, "collect", "collect per-example pieces")
        self.wrap(engine, "_check_finite", "collect per-example pieces")
        self.wrap(Capture, "__init__", "in-run bookkeeping")
        self.wrap(engine._Call, "set_grad", "capture hooks")
        orig_hook = Capture.__dict__["_hook"]

        def _hook(this, path, rule):
            h = orig_hook(this, path, rule)

            def timed(*a):
                bd.enter("capture hooks")
                try:
                    return h(*a)
                finally:
                    bd.exit()

            return timed

        Capture._hook = _hook
        self._restore.append((Capture, "_hook", orig_hook))

        def grad_label(*a, **k):
            if bd.top() == "_accumulate":
                return "validation backward" if k.get("create_graph") else "HVP (double backward)"
            return "validation backward" if bd.top() == "validation backward" else "other autograd.grad"

        self.wrap(torch.autograd, "grad", grad_label)
        self.wrap(InRunShapley, "_accumulate", "_accumulate")
        for fn in ("piece_dot", "piece_gram"):
            self.wrap(inrun_mod, fn, "dot products")
        self.wrap(ExampleGrads, "dot", "dot products")
        self.wrap(ExampleGrads, "gram", "dot products")
        self.wrap(ExampleGrads, "scale", "scale by preconditioner")
        self.wrap(inrun_mod, "_sum_totals", "batch / validation totals")
        self.wrap(inrun_mod, "affine_step", "optimizer model (affine_step)")
        for fn in ("_on_step", "_step_values", "_first_order", "_add", "_validation_weights", "_summed_terms"):
            self.wrap(InRunShapley, fn, "in-run bookkeeping")

    def uninstall(self) -> None:
        for owner, attr, orig in reversed(self._restore):
            setattr(owner, attr, orig)
        self._restore.clear()


def profile_case(case: Case, variants: dict[str, Plain], n_steps: int) -> dict:
    """Per-step exclusive ms by part for plain, inrun1, inrun2 (the warm models of the timed run, continuing)."""
    out = {}
    variants = {k: v for k, v in variants.items() if k in ("plain", "inrun1", "inrun2")}
    first = case.warmup + case.steps
    for name, variant in variants.items():
        bd = Breakdown()
        bd.install(case.task)
        try:
            start = time.perf_counter()
            for k in range(n_steps):
                ids, batch = case.batches[(first + k) % len(case.batches)]
                variant.step(ids, batch, region=bd.region)
            wall = time.perf_counter() - start
        finally:
            bd.uninstall()
        parts = {label: 1000 * t / n_steps for label, t in bd.totals.items()}
        parts["_accumulate"] = parts.pop("_accumulate", 0.0)
        parts["HVP (double backward)"] = parts.get("HVP (double backward)", 0.0) + parts.pop("_accumulate")
        if not parts["HVP (double backward)"]:
            parts.pop("HVP (double backward)")
        parts = {k: round(v, 2) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}
        out[name] = {"step_ms": round(1000 * wall / n_steps, 2), "parts_ms": parts}
    return out


# -- main ------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models and few steps (smoke test)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared 2-core machine more threads than free "
                             "cores makes timings erratic)")
    parser.add_argument("--profile-steps", type=int, default=None)
    parser.add_argument("--only", choices=["mlp", "gpt"], default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out_path = args.out or Path(__file__).parent / "results" / f"inrun_overhead{'_quick' if args.quick else ''}.json"

    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
                    "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "date": time.strftime("%Y-%m-%d"), "load_avg_start": os.getloadavg(), "quick": args.quick, "cases": {}}
    cases = [c for c in (mlp_case(args.quick), gpt_case(args.quick)) if args.only in (None, c.name)]
    for case in cases:
        entry: dict[str, Any] = {"describe": case.describe, "optimizers": {}}
        for opt_name in case.opts:
            print(f"{case.name} / {opt_name}: timing", file=sys.stderr, flush=True)
            res, variants = time_interleaved(case, opt_name)
            print(f"{case.name} / {opt_name}: profiling", file=sys.stderr, flush=True)
            res["breakdown"] = profile_case(case, variants, args.profile_steps or case.profile_steps)
            del variants
            entry["optimizers"][opt_name] = res
            print(json.dumps({"case": case.name, "opt": opt_name, "median_step_s": res["median_step_s"],
                              "ratios": res["ratios"], "values_rel_diff": res["values_rel_diff"],
                              "memory": res["memory"]}, indent=1),
                  file=sys.stderr, flush=True)
            gc.collect()
        report["cases"][case.name] = entry
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    report["load_avg_end"] = os.getloadavg()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    print_tables(report)
    print(f"\nwrote {out_path} ({report['wall_s']} s)")


def print_tables(report: dict) -> None:
    print("\n| case | optimizer | plain ms | inrun1 ms | inrun2 ms | func ms | inrun1/plain | inrun2/plain | "
          "func/inrun1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, entry in report["cases"].items():
        for opt_name, res in entry["optimizers"].items():
            m, r = res["median_step_s"], res["ratios"]
            print(f"| {name} | {opt_name} | {1000 * m['plain']:.1f} | {1000 * m['inrun1']:.1f} | "
                  f"{1000 * m['inrun2']:.1f} | {1000 * m['func']:.1f} | {r['inrun1/plain']:.2f}× | "
                  f"{r['inrun2/plain']:.2f}× | {r['func/inrun1']:.2f}× |")
    for name, entry in report["cases"].items():
        for opt_name, res in entry["optimizers"].items():
            extra = {k: v for k, v in res["ratios"].items()
                     if k not in ("inrun1/plain", "inrun2/plain", "func/inrun1", "func/plain")}
            print(f"{name}/{opt_name}: " + ", ".join(f"{k} {v:.2f}×" for k, v in extra.items())
                  + "; values rel. diff: " + ", ".join(f"{k} {v:.1e}" for k, v in res["values_rel_diff"].items()))
    for name, entry in report["cases"].items():
        for opt_name, res in entry["optimizers"].items():
            for variant, b in res["breakdown"].items():
                parts = ", ".join(f"{k} {v:.1f}" for k, v in b["parts_ms"].items())
                print(f"{name}/{opt_name}/{variant}: {b['step_ms']:.1f} ms = {parts}")


if __name__ == "__main__":
    main()
