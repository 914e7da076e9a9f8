"""Efficient ensembles (Deng et al. 2024) checked, not assumed: LDS vs K for independent, dropout and LoRA ensembles of
Grad-Dot and TRAK, with training time, serving time and storage as ratios to the independent ensemble of the same K.

    .venv/bin/python benchmarks/ensembles.py --case digits-mlp             # about 5 minutes on 2 shared cores
    .venv/bin/python benchmarks/ensembles.py --case fmnist-mlp
    .venv/bin/python benchmarks/ensembles.py --case digits-mlp --gt-only   # build (or resume) the ground truth only

Per case, K_max = 10 members of every ensemble are built once; the ensemble of the first K members (K = 1, 2, 5, 10)
is scored from them (``Ensemble.first(K)``) — valid because a member never depends on K (member j's seed, mask or
adapter seed is a function of j) — and its costs are the first K members' costs plus the shared part
(``EnsembleCost.prefix``). Training times are measured here, with the same recipe for every model:

* independent: K models ``recipe.train(train, 1000 + j)`` (the ground truth's recipe, so the same training noise);
* dropout: model 0 of the independent ensemble, K fixed masks (p given by ``--p``; the model was trained with 0.1);
* LoRA: model 0 as the base, K fine-tunes of rank ``--rank`` adapters on every Linear, ``--lora-epochs`` epochs of
  SGD + momentum (lr 0.05, batch 64: the recipe's settings), seeds ``j``.

Results go to ``benchmarks/results/ensembles-<case>.json`` and are printed as markdown tables (see ENSEMBLES.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from datacredit import ClassificationTask, GradDot
from datacredit.data import load_digits, load_fashion_mnist
from datacredit.ensembles import DropoutEnsemble, IndependentEnsemble, LoRAEnsemble
from datacredit.evaluate import ClassifierRecipe, Execution, SubsetConfig, build_groundtruth, lds
from datacredit.methods.trak import TRAK

ROOT = Path("runs/bench/ensembles")
RESULTS = Path(__file__).parent / "results"
KS = (1, 2, 5, 10)
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    recipe: ClassifierRecipe
    gt: SubsetConfig
    trak_projection: int

    def data(self):
        if self.name == "digits-mlp":
            train, test = load_digits(seed=0)
            queries = test.subset(np.sort(np.random.default_rng(0).choice(len(test), 50, replace=False)))
            return train, queries
        train = load_fashion_mnist(split="train", limit=5000, seed=0)
        queries = load_fashion_mnist(split="test", limit=50, seed=0)
        return train, queries


CASES = {
    "digits-mlp": Case("digits-mlp", ClassifierRecipe(64, 10, (64,), dropout=0.1), SubsetConfig(m=100, seeds=2), 1024),
    "fmnist-mlp": Case("fmnist-mlp", ClassifierRecipe(784, 10, (64,), epochs=20, dropout=0.1),
                       SubsetConfig(m=100, seeds=2), 1024),
}


def groundtruth(case: Case, workers: int = 2):
    train, queries = case.data()
    return build_groundtruth(case.recipe, train, queries, ROOT / case.name / "gt", case.gt,
                             execution=Execution(workers=workers, progress=False))


def methods(case: Case) -> dict:
    """name -> (factory (model, member) -> method, ground-truth measure). TRAK members get their own projection."""
    loss, margin = ClassificationTask(), ClassificationTask(measurement="margin")
    return {
        "grad-dot": (lambda m, j: GradDot(m, loss, progress=False), "loss"),
        "trak": (lambda m, j: TRAK(m, margin, projection=case.trak_projection, seed=j, progress=False), "margin"),
    }


def train_models(case: Case, train, k: int, clock) -> tuple[list, list[float]]:
    case.recipe.train(train.subset(np.arange(64)), 0)  # warm-up: one-time costs (lazy inits) count for no model
    models, seconds = [], []
    for j in range(k):
        start = clock()
        models.append(case.recipe.train(train, 1000 + j))
        seconds.append(clock() - start)
    return models, seconds


def accuracy(model, data) -> float:
    with torch.no_grad():
        return float((model(data.tensors[0]).argmax(1) == data.tensors[1]).double().mean())


def rows_of(name: str, ensemble, gt, measure: str, baseline=None) -> list[dict]:
    rows = []
    for k in KS:
        if k > ensemble.k:
            continue
        scores = ensemble.first(k)
        cost = ensemble.cost.prefix(k)
        result = lds(scores, gt, measure, bootstrap=500, seed=0)
        row = {"ensemble": name, "k": k, "lds": result.mean, "ci": [result.ci_low, result.ci_high],
               "noise_ceiling": result.noise_ceiling, "training_s": cost.training_seconds,
               "serving_s": cost.serving_seconds, "stored_bytes": cost.stored_bytes, "weight_bytes": cost.weight_bytes}
        if baseline is not None:
            ref = baseline.cost.prefix(k)
            row.update(train_ratio=cost.training_seconds / ref.training_seconds,
                       serve_ratio=cost.serving_seconds / ref.serving_seconds,
                       storage_ratio=cost.stored_bytes / ref.stored_bytes,
                       weights_ratio=cost.weight_bytes / ref.weight_bytes)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| ensemble | K | LDS [95% CI] | training s | serving s | stored KB (weights) | train × | serve × "
             "| storage × | weights × |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    keys = ("train_ratio", "serve_ratio", "storage_ratio", "weights_ratio")
    for r in rows:
        ratios = [f"{r[key]:.2f}" if key in r else "1" for key in keys]
        lines.append(f"| {r['ensemble']} | {r['k']} | {r['lds']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | "
                     f"{r['training_s']:.1f} | {r['serving_s']:.1f} | {r['stored_bytes'] / 1024:.0f} "
                     f"({r['weight_bytes'] / 1024:.0f}) | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def run(case: Case, args) -> dict:
    gt = groundtruth(case, args.workers)
    train, queries = case.data()
    start = time.perf_counter()
    clock = CLOCKS[args.clock]
    models, seconds = train_models(case, train, args.kmax, clock)
    print(f"{case.name}: {len(train)} train, {len(queries)} queries; {args.kmax} models trained in "
          f"{time.perf_counter() - start:.1f} s; ground truth {gt}, noise ceiling {gt.seed_agreement():.3f}")
    out = {"case": case.name, "recipe": dataclasses.asdict(case.recipe), "n_train": len(train),
           "n_query": len(queries), "ground_truth": {k: v for k, v in gt.config.items() if k != "recipe"},
           "noise_ceiling": gt.seed_agreement(), "accuracy_model0": accuracy(models[0], queries),
           "training_seconds": seconds, "settings": vars(args), "torch_threads": torch.get_num_threads(),
           "machine": platform.platform(), "methods": {}}
    lora = LoRAEnsemble(models[0], lambda m, _: None, args.kmax, rank=args.rank, epochs=args.lora_epochs,
                        base_training_seconds=seconds[0])
    for name, (factory, measure) in methods(case).items():
        if name not in args.methods:
            continue
        factory(models[0], 0).fit(train.subset(np.arange(128))).score(queries)  # warm-up, untimed
        ind = IndependentEnsemble(factory, models=models, training_seconds=seconds)
        ind.clock = clock
        ind.fit(train, keep=False).score(queries)  # one fitted member in memory at a time
        rows = rows_of("independent", ind, gt, measure)
        variants = []
        if "dropout" in args.variants:
            variants += [(f"dropout p={p}", DropoutEnsemble(models[0], factory, args.kmax, p=p, seed=0,
                                                             training_seconds=seconds[0])) for p in args.p]
        if "shared" in args.variants and name != "grad-dot":  # exact Grad-Dot caches nothing: sharing is a no-op
            variants += [(f"dropout p={p} shared", DropoutEnsemble(models[0], factory, args.kmax, p=p, seed=0,
                                                                    share_train_cache=True,
                                                                    training_seconds=seconds[0])) for p in args.p]
        if "lora" in args.variants:
            lora = lora.with_method(factory)
            variants.append((f"lora r={args.rank}", lora))
        for label, ens in variants:
            ens.clock = clock
            ens.fit(train, keep=False).score(queries)
            rows += rows_of(label, ens, gt, measure, baseline=ind)
        if lora.peft_models:
            out["lora_accuracy"] = [accuracy(m, queries) for m in lora.peft_models]
        print(f"\n### {case.name}, {name} (LDS against the retrained models' {measure})\n")
        print(table(rows))
        out["methods"][name] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default="digits-mlp", choices=sorted(CASES))
    parser.add_argument("--gt-only", action="store_true")
    parser.add_argument("--kmax", type=int, default=10)
    parser.add_argument("--p", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-epochs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["grad-dot", "trak"])
    parser.add_argument("--variants", nargs="+", default=["dropout", "shared", "lora"],
                        help="which ensembles to compare with the independent one")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: this process's CPU time (steady on a shared machine, 1 torch thread); wall")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    case = CASES[args.case]
    if args.gt_only:
        gt = groundtruth(case, args.workers)
        print(gt, "noise ceiling", gt.seed_agreement())
        return
    out = run(case, args)
    path = Path(args.out) if args.out else RESULTS / f"ensembles-{case.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
