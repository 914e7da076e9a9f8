"""Benchmark: the cost of In-Run Data Shapley per training step against plain training, before and after (issue 16).

Every configuration (model, optimizer, validation set) runs several variants side by side on identical copies of the
model (same seed), the same batches and the same optimizer settings:

* ``plain``   — ``task.loss(model, batch).mean().backward(); opt.step(); opt.zero_grad()``;
* ``new1`` / ``new2`` — the same loop with ``with shapley.step(ids):`` around the backward, this checkout's
  ``InRunShapley(order=1 | 2)``;
* ``old1`` / ``old2`` — the same with the ``InRunShapley`` of another checkout (``--old DIR``, e.g. a
  ``git worktree`` of the commit before the streaming work), imported in this process as ``datacredit_old``;
* ``new1 k=K`` — first order with a validation budget (``validation_subsample=K``): a per-step sample of K of the
  validation examples, an unbiased estimate of the exact value;
* ``new1 r=R`` — first order with a rank-R sketch of each large layer's validation gradient (``validation_rank=R``):
  biased, its fidelity measured.

Validation does not change training, so every variant follows the same trajectory; the first-order values of
``new1``, ``old1`` and the budget variants are compared at the end (relative error of the per-example totals and
their Spearman correlation against ``new1``, the exact value).

Timing: every step of every variant is timed with ``time.perf_counter`` (forward, backward, values, update). The
variants take turns step by step in a rotating order (ABCD, BCDA, ...), so load from other processes hits them
alike; the reported time is the median over the steps after the warm-up, and the ratios are ratios of medians.
After the timed steps, a few more steps of ``new1`` / ``new2`` are instrumented (wrapping functions of ``datacredit``
in this process only) to report exclusive time per part.

Usage: ``python benchmarks/inrun_overhead.py [--old /tmp/inrun-old] [--quick] [--only gpt|gpt32|mlp] [--out FILE]``
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import datacredit.methods.inrun as inrun_mod
from datacredit import ClassificationTask, LanguageModelingTask
from datacredit.capture import Capture
from datacredit.data import CharDataset, load_fashion_mnist, load_text_sample
from datacredit.models import TinyGPT, mlp
from datacredit.task import Task

# -- the other checkout ----------------------------------------------------------------------------------------------


def load_old(root: Path) -> Any:
    """``InRunShapley`` of another checkout's ``datacredit`` package, imported as ``datacredit_old`` (a copy with its
    absolute ``datacredit.`` imports renamed, so both versions live in one process)."""
    target = Path(tempfile.mkdtemp(prefix="inrun-old-")) / "datacredit_old"
    shutil.copytree(root / "datacredit", target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in target.rglob("*.py"):
        text = path.read_text()
        new = re.sub(r"\b(from|import) datacredit([. ])", r"\1 datacredit_old\2", text)
        if new != text:
            path.write_text(new)
    sys.path.insert(0, str(target.parent))
    return importlib.import_module("datacredit_old.methods.inrun").InRunShapley


# -- configurations --------------------------------------------------------------------------------------------------


@dataclass
class Config:
    name: str
    describe: str
    make_model: Callable[[], nn.Module]
    task: Task
    batches: list[tuple[np.ndarray, tuple]]
    validation: tuple
    opt: Callable
    opt_name: str
    variants: list[str]
    warmup: int
    steps: int
    profile: list[str] = field(default_factory=list)


def _slice(batch: tuple, n: int) -> tuple:
    return tuple(t[:n] for t in batch)


def mlp_configs(quick: bool) -> list[Config]:
    b, b_val = 64, 32
    warmup, steps = (2, 4) if quick else (3, 20)
    train = load_fashion_mnist(split="train", limit=b * 24, seed=0)
    test = load_fashion_mnist(split="test", limit=256, seed=0)
    x, y = train.tensors
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    batches = [(train.ids[idx.numpy()], (x[idx], y[idx])) for idx in perm.split(b)]

    def make() -> nn.Module:
        torch.manual_seed(0)
        return mlp(784, [512, 256], 10)

    opts = {"SGD": lambda p: torch.optim.SGD(p, lr=0.05), "Adam": lambda p: torch.optim.Adam(p, lr=1e-3)}
    return [Config(f"MLP 784-512-256-10, batch {b}, val {b_val}", f"Fashion-MNIST, validation {b_val} test images",
                   make, ClassificationTask(), batches, _slice(test.tensors, b_val), opts[o], o,
                   ["plain", "new1", "old1", "new2", "old2", "new1 k=8"], warmup, steps, ["new1", "new2"])
            for o in opts]


def gpt_configs(quick: bool) -> list[Config]:
    if quick:
        d, layers, heads, t, b, warmup, steps = 64, 2, 4, 32, 8, 1, 2
    else:
        d, layers, heads, t, b, warmup, steps = 256, 4, 4, 128, 16, 1, 8
    data = CharDataset(load_text_sample(), t)
    tokens = data.tensors[0]
    n_pool = 16
    pool = tokens[-n_pool:]
    rows = torch.randperm(len(tokens) - n_pool, generator=torch.Generator().manual_seed(0))
    batches = [(data.ids[idx.numpy()], (tokens[idx],)) for idx in rows.split(b) if len(idx) == b]

    def make() -> nn.Module:
        torch.manual_seed(0)
        return TinyGPT(data.vocab_size, d=d, n_layers=layers, n_heads=heads, max_len=t)

    n_params = sum(p.numel() for p in make().parameters())
    opts = {"SGD": lambda p: torch.optim.SGD(p, lr=0.1), "Adam": lambda p: torch.optim.Adam(p, lr=3e-4)}
    head = f"TinyGPT d={d}, {layers} layers, T={t}, batch {b}"
    describe = f"{n_params / 1e6:.2f} M params, tied embedding, vocab {data.vocab_size}"
    out = []
    for o in opts:
        out.append(Config(f"{head}, val 4×{t}", describe, make, LanguageModelingTask(), batches, (pool[:4],),
                          opts[o], o, ["plain", "new1", "old1", "new2", "old2", "new1 k=1", "new1 r=16"], warmup, steps,
                          ["new1", "new2"]))
    short = min(32, t)
    for o in opts:  # twice the steps: its ratios differ by a few percent, which 8 steps on a loaded machine blur
        out.append(Config(f"{head}, val {short} tokens", describe, make, LanguageModelingTask(), batches,
                          (pool[4:5, : short + 1],), opts[o], o, ["plain", "new1", "old1", "new2"], warmup,
                          2 * steps, ["new1"]))
    return out


# -- variants --------------------------------------------------------------------------------------------------------


class Plain:
    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, task: Task):
        self.model, self.opt, self.task = model, opt, task

    def step(self, ids: np.ndarray, batch: tuple) -> None:
        self.task.loss(self.model, batch).mean().backward()
        self.opt.step()
        self.opt.zero_grad()


class Recorded(Plain):
    def __init__(self, model, opt, task, shapley):
        super().__init__(model, opt, task)
        self.shapley = shapley

    def step(self, ids, batch) -> None:
        with self.shapley.step(ids):
            self.task.loss(self.model, batch).mean().backward()
        self.opt.step()  # In-Run's pre-hook computes the step's values here
        self.opt.zero_grad()

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        s = self.shapley.values()
        return s.train_ids, s.values[:, 0]


def build(config: Config, old_cls: Any) -> dict[str, Plain]:
    out: dict[str, Plain] = {}
    for kind in config.variants:
        if kind.startswith("old") and old_cls is None:
            continue
        model = config.make_model()
        opt = config.opt(model.parameters())
        if kind == "plain":
            out[kind] = Plain(model, opt, config.task)
            continue
        order = int(kind[3])
        kw: dict[str, int] = {}
        if "k=" in kind:
            kw = {"validation_subsample": int(kind.split("k=")[1]), "seed": 0}
        if "r=" in kind:
            kw = {"validation_rank": int(kind.split("r=")[1]), "seed": 0}
        cls = old_cls if kind.startswith("old") else inrun_mod.InRunShapley
        out[kind] = Recorded(model, opt, config.task, cls(model, config.task, validation=config.validation,
                                                          optimizer=opt, order=order, **kw))
    return out


def _paired(new: list[float], old: list[float]) -> dict:
    """Per-round CPU ms ``new − old``: median, quartiles, and in how many rounds ``new`` was faster."""
    d = 1000 * (np.asarray(new) - np.asarray(old))
    return {"median": round(float(np.median(d)), 1), "q25": round(float(np.percentile(d, 25)), 1),
            "q75": round(float(np.percentile(d, 75)), 1), "new_faster": f"{int((d < 0).sum())}/{len(d)}"}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def run_config(config: Config, old_cls: Any, profile_steps: int) -> dict:
    variants = build(config, old_cls)
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    load = [os.getloadavg()[0]]
    for k in range(config.warmup + config.steps):
        ids, batch = config.batches[k % len(config.batches)]
        shift = k % len(names)
        for name in names[shift:] + names[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            variants[name].step(ids, batch)
            if k >= config.warmup:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        load.append(os.getloadavg()[0])
        print(f"  {config.name} / {config.opt_name}: step {k + 1}/{config.warmup + config.steps}", file=sys.stderr,
              flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: med[k] / med["plain"] for k in names if k != "plain"}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    cpu_ratios = {k: med_cpu[k] / med_cpu["plain"] for k in names if k != "plain"}
    # new minus old in the same round (they ran back to back, under the same load): less noisy than two medians
    paired = {f"{k} - old{k[3:]}": _paired(cpu[k], cpu[f"old{k[3:]}"]) for k in names
              if k in ("new1", "new2") and f"old{k[3:]}" in cpu}
    exact_ids, exact = variants["new1"].values()
    fidelity = {}
    for name in names:
        if name != "old1" and "k=" not in name and "r=" not in name:
            continue
        ids, v = variants[name].values()
        assert np.array_equal(ids, exact_ids)
        fidelity[name] = {"rel_err": float(np.linalg.norm(v - exact) / np.linalg.norm(exact)),
                          "spearman": spearman(v, exact)}
    if "new2" in variants and "old2" in variants:
        ids, a = variants["new2"].values()
        _, b = variants["old2"].values()
        fidelity["old2 vs new2"] = {"rel_err": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
                                    "spearman": spearman(a, b)}
    breakdown = {name: profile(config, variants[name], profile_steps) for name in config.profile}
    return {"name": config.name, "describe": config.describe, "optimizer": config.opt_name,
            "median_step_s": med, "ratios": ratios, "median_cpu_s": med_cpu, "cpu_ratios": cpu_ratios,
            "all_step_s": times, "all_cpu_s": cpu, "paired_cpu_ms": paired, "fidelity": fidelity,
            "load_1min": [round(x, 2) for x in load], "breakdown": breakdown}


# -- where the time goes ---------------------------------------------------------------------------------------------


class Breakdown:
    """Exclusive wall time per label; nested labelled calls are subtracted from their parent."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []
        self._restore: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        orig = owner.__dict__[attr]
        bd = self

        @functools.wraps(orig)
        def wrapper(*a, **k):
            bd.stack.append([label, time.perf_counter(), 0.0])
            try:
                return orig(*a, **k)
            finally:
                lab, start, child = bd.stack.pop()
                dt = time.perf_counter() - start
                bd.totals[lab] += dt - child
                if bd.stack:
                    bd.stack[-1][2] += dt

        setattr(owner, attr, staticmethod(wrapper) if isinstance(orig, staticmethod) else wrapper)
        self._restore.append((owner, attr, orig))

    def install(self) -> None:
        cls = inrun_mod.InRunShapley
        self.wrap(cls, "_validation", "validation forward+backward (first order)")
        self.wrap(cls, "_consume", "per-layer dots inside the training backward (streaming)")
        self.wrap(cls, "_first_order", "values at optimizer.step (first order)")
        self.wrap(cls, "_summed_terms", "validation gradient + HVP (second order)")
        self.wrap(cls, "_step_values", "In-Run step bookkeeping")
        self.wrap(cls, "finish", "In-Run step bookkeeping")
        self.wrap(Capture, "collect", "collect per-example pieces")
        self.wrap(inrun_mod.ExampleGrads, "dot", "val-first dots at optimizer.step")
        self.wrap(inrun_mod.__dict__["_Validation"], "ghost", "stack validation factors")
        for fn, label in (("step_scale", "optimizer model (s)"), ("affine_step", "optimizer model (s, c)")):
            self.wrap(inrun_mod, fn, label)

    def uninstall(self) -> None:
        for owner, attr, orig in reversed(self._restore):
            setattr(owner, attr, orig)
        self._restore.clear()


def profile(config: Config, variant: Plain, n_steps: int) -> dict:
    bd = Breakdown()
    bd.install()
    first = config.warmup + config.steps
    try:
        start = time.perf_counter()
        for k in range(n_steps):
            ids, batch = config.batches[(first + k) % len(config.batches)]
            variant.step(ids, batch)
        wall = time.perf_counter() - start
    finally:
        bd.uninstall()
    parts = {label: round(1000 * t / n_steps, 1) for label, t in sorted(bd.totals.items(), key=lambda kv: -kv[1])}
    rest = 1000 * wall / n_steps - sum(parts.values())
    return {"step_ms": round(1000 * wall / n_steps, 1), "parts_ms": parts,
            "user forward+backward, update, hooks": round(rest, 1)}


# -- main ------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, default=None, help="another checkout to compare (old1/old2 variants)")
    parser.add_argument("--quick", action="store_true", help="small models and few steps (smoke test)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["mlp", "gpt", "gpt32"], default=None,
                        help="gpt32: only the GPT with the 32-token validation (SGD and Adam)")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old_cls = load_old(args.old) if args.old else None
    out_path = args.out or Path(__file__).parent / "results" / f"inrun_overhead{'_quick' if args.quick else ''}.json"
    report: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available()},
        "date": time.strftime("%Y-%m-%d %H:%M"), "old": str(args.old) if args.old else None,
        "load_avg_start": os.getloadavg(), "quick": args.quick, "configs": []}
    t0 = time.perf_counter()
    configs = []
    if args.only in (None, "gpt"):
        configs += gpt_configs(args.quick)
    if args.only == "gpt32":
        configs += [c for c in gpt_configs(args.quick) if c.name.endswith("tokens")]
    if args.only in (None, "mlp"):
        configs += mlp_configs(args.quick)
    for config in configs:
        res = run_config(config, old_cls, args.profile_steps)
        report["configs"].append(res)
        print(json.dumps({k: res[k] for k in ("name", "optimizer", "ratios", "cpu_ratios", "fidelity")}, indent=1),
              file=sys.stderr, flush=True)
        gc.collect()
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["load_avg_end"] = os.getloadavg()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    print_tables(report)
    print(f"\nwrote {out_path} ({report['wall_s']} s)")


def print_tables(report: dict) -> None:
    for key, what in (("cpu_ratios", "process CPU time"), ("ratios", "wall time")):
        print(f"\nRatios of medians of {what} per step (recorded / plain):\n")
        print("| case | opt | plain ms | first order: before → after | second order: before → after | budget: ratio, "
              "rel. err, Spearman | load |")
        print("|---|---|---|---|---|---|---|")
        for res in report["configs"]:
            r, f = res[key], res["fidelity"]
            m = res["median_cpu_s" if key == "cpu_ratios" else "median_step_s"]
            first = f"{r['old1']:.2f}× → **{r['new1']:.2f}×**" if "old1" in r else f"**{r['new1']:.2f}×**"
            second = "—"
            if "new2" in r:
                second = f"{r['old2']:.2f}× → **{r['new2']:.2f}×**" if "old2" in r else f"**{r['new2']:.2f}×**"
            budget = "<br>".join(f"{k[5:]}: {r[k]:.2f}×, {f[k]['rel_err']:.3f}, {f[k]['spearman']:.3f}"
                                for k in r if "k=" in k or "r=" in k) or "—"
            lo, hi = min(res["load_1min"]), max(res["load_1min"])
            print(f"| {res['name']} | {res['optimizer']} | {1000 * m['plain']:.0f} | {first} | {second} | {budget} | "
                  f"{lo:.1f}–{hi:.1f} |")
    print()
    for res in report["configs"]:
        agree = ", ".join(f"{k} rel. err {v['rel_err']:.1e}" for k, v in res["fidelity"].items()
                          if "k=" not in k and "r=" not in k)
        print(f"{res['name']} / {res['optimizer']}: {agree}")
        for k, p in res.get("paired_cpu_ms", {}).items():
            print(f"  {k}, CPU ms per round: median {p['median']} (quartiles {p['q25']}..{p['q75']}), new faster in "
                  f"{p['new_faster']}")
        for name, b in res["breakdown"].items():
            parts = ", ".join(f"{k} {v:.1f}" for k, v in b["parts_ms"].items())
            print(f"  {name}: {b['step_ms']:.1f} ms/step = {parts}; rest {b['user forward+backward, update, hooks']}")


if __name__ == "__main__":
    main()
