"""Benchmark: does In-Run Data Shapley find bad training data, and does removing what it ranks lowest help?

Three experiments, each a few ordinary training runs with ``InRunShapley`` attached (first and second order on the
same run: two companions on one model and one optimizer, so both see the same trajectory):

1. **Mislabel detection** — sklearn digits (1438 training images) and a 5,000-image Fashion-MNIST subset with 10 % of
   the training labels flipped (``datacredit.data.flip_labels``). An MLP is trained a few epochs (SGD, momentum 0.9)
   with a clean validation set held out from the test split. Training examples are ranked by value (lowest = most
   suspicious) and the flipped ones are the positives: AUROC and average precision (``sklearn.metrics``). Baselines
   for context, from the final model: its training loss per example (highest = suspicious) and Grad-Dot
   self-influence ``GradDot(model, task).fit(train).self_scores()`` (highest = suspicious).
2. **Junk detection in a char-level LM** — the bundled text sample, 64-character chunks; 90 % of the text trains, the
   last 10 % gives the validation set (16 chunks). Injected training chunks: uniformly random characters,
   character-shuffled chunks (right unigram statistics, no structure), exact duplicates of clean chunks, and one
   passage repeated 20 times.
   A small TinyGPT is trained a few hundred Adam steps; for each junk kind: the mean percentile of its values among all
   training chunks (0 = lowest value), the fraction in the bottom 10 %, and the AUROC of "junk vs clean".
3. **Data curation** — digits (with 10 % flipped labels, and clean): remove the lowest-valued 10 % of the training
   set and retrain from the same initialisation; compare the loss on an evaluation set (the other half of the held-out
   split, never used for the values) with removing a random 10 %, the 10 % with the highest final training loss (a
   simple baseline) and nothing. Averaged over seeds.

Usage: ``python benchmarks/inrun_quality.py [--quick] [--threads N] [--out benchmarks/results/inrun_quality.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from datacredit import ClassificationTask, GradDot, LanguageModelingTask
from datacredit.data import ArrayDataset, CharDataset, flip_labels, load_digits, load_fashion_mnist, load_text_sample
from datacredit.models import TinyGPT, mlp
from datacredit.task import Task
from datacredit.training import InRunCallback
from datacredit.training import train as fit

ORDERS = (1, 2)


# -- training with values --------------------------------------------------------------------------------------------


def train(model: nn.Module, task: Task, data: ArrayDataset, *, epochs: int, batch_size: int,
          make_opt: Callable, seed: int, validation: Any = None, orders: tuple[int, ...] = ()) -> dict[int, np.ndarray]:
    """Mini-batch training (shuffled by ``seed``) through the library's loop; with ``orders``, In-Run values of each
    order (one callback per order on the same run), aligned with ``data.ids``. The loss is the batch mean."""
    recorders = {o: InRunCallback(task, validation, order=o, targeted=False) for o in orders}
    fit(model, data, optimizer=make_opt(model.parameters()), loss=lambda m, batch: task.loss(m, batch).mean(),
        epochs=epochs, batch_size=batch_size, seed=seed, callbacks=list(recorders.values()))
    out = {}
    for o, c in recorders.items():
        s = c.values()
        row = {int(i): k for k, i in enumerate(s.train_ids)}
        out[o] = np.array([s.values[row[int(i)], 0] for i in data.ids])
    return out


@torch.no_grad()
def per_example_loss(model: nn.Module, task: Task, data: ArrayDataset, batch_size: int = 512) -> np.ndarray:
    return np.concatenate([task.loss(model, tuple(t[k:k + batch_size] for t in data.tensors)).double().numpy()
                           for k in range(0, len(data), batch_size)])


def detection(suspicion: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    """AUROC / AP of ``suspicion`` (higher = more suspicious) for the boolean ``positive``."""
    return {"auroc": float(roc_auc_score(positive, suspicion)),
            "ap": float(average_precision_score(positive, suspicion))}


def mean_sd(xs: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(xs)), "sd": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, "n": len(xs)}


def sgd(lr: float) -> Callable:
    return lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9)


# -- 1 + 3: classification (mislabel detection, curation) --------------------------------------------------------------


def classification_run(name: str, train_set: ArrayDataset, val: tuple, n_classes: int, make_model: Callable,
                       seed: int, epochs: int, batch_size: int, lr: float, flip: bool, baselines: bool = True) -> dict:
    """One seed: flip labels (or not), train with In-Run values, score the detectors."""
    data, flipped_ids = flip_labels(train_set, 0.1, seed=seed, num_classes=n_classes) if flip else (train_set, None)
    task = ClassificationTask()
    torch.manual_seed(seed)
    model = make_model()
    start = time.perf_counter()
    values = train(model, task, data, epochs=epochs, batch_size=batch_size, make_opt=sgd(lr), seed=seed,
                   validation=val, orders=ORDERS)
    out: dict[str, Any] = {"seed": seed, "train_s": time.perf_counter() - start, "values": values, "data": data,
                           "final_loss": per_example_loss(model, task, data)}
    if flip:
        positive = np.isin(data.ids, flipped_ids)
        out["flipped"] = positive
        det = {f"in-run order {o}": detection(-v, positive) for o, v in values.items()}
        if baselines:
            det["final training loss"] = detection(out["final_loss"], positive)
            self_scores = GradDot(model, task, progress=False).fit(data).self_scores()
            row = {int(i): k for k, i in enumerate(self_scores.train_ids)}
            det["Grad-Dot self-influence"] = detection(
                np.array([self_scores.values[row[int(i)], 0] for i in data.ids]), positive)
        out["detection"] = det
    return out


def eval_loss(model: nn.Module, data: tuple) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(data[0])
    return float(F.cross_entropy(logits, data[1])), float((logits.argmax(1) == data[1]).float().mean())


def curation(run: dict, eval_set: tuple, make_model: Callable, epochs: int, batch_size: int, lr: float,
             n_random: int) -> dict:
    """Retrain (same init, same shuffling seed) on: everything, minus the lowest-valued 10 % per order, minus the
    highest-valued 10 % (order 1, a sanity check), minus the 10 % with the highest final training loss (a simple
    baseline), minus a random 10 % (``n_random`` draws). Eval loss/accuracy."""
    data: ArrayDataset = run["data"]
    n = len(data)
    k = int(round(0.1 * n))
    seed = run["seed"]

    def retrain(keep: np.ndarray) -> tuple[float, float]:
        torch.manual_seed(10_000 + seed)
        model = make_model()
        train(model, ClassificationTask(), data.subset(np.sort(keep)), epochs=epochs, batch_size=batch_size,
              make_opt=sgd(lr), seed=10_000 + seed)
        return eval_loss(model, eval_set)

    res: dict[str, Any] = {"full": retrain(np.arange(n))}
    for o, v in run["values"].items():
        order = np.argsort(v, kind="stable")
        res[f"minus lowest 10% (order {o})"] = retrain(order[k:])
        if "flipped" in run:
            res[f"flipped share of lowest 10% (order {o})"] = float(run["flipped"][order[:k]].mean())
    res["minus highest 10% (order 1)"] = retrain(np.argsort(run["values"][1], kind="stable")[:-k])
    by_loss = np.argsort(run["final_loss"], kind="stable")  # ascending: the highest losses last
    res["minus highest final-loss 10% (baseline)"] = retrain(by_loss[:-k])
    if "flipped" in run:
        res["flipped share of highest final-loss 10%"] = float(run["flipped"][by_loss[-k:]].mean())
    rng = np.random.default_rng(seed)
    rand = [retrain(np.sort(rng.permutation(n)[k:])) for _ in range(n_random)]
    res["minus random 10%"] = (float(np.mean([r[0] for r in rand])), float(np.mean([r[1] for r in rand])))
    return res


def digits_experiments(seeds: list[int], epochs: int, n_random: int) -> tuple[dict, dict]:
    train_set, test = load_digits(seed=0)
    perm = np.random.default_rng(0).permutation(len(test))
    half = len(test) // 2
    val = tuple(t[torch.as_tensor(np.sort(perm[:half]))] for t in test.tensors)  # for the values
    eval_set = tuple(t[torch.as_tensor(np.sort(perm[half:]))] for t in test.tensors)  # for curation only

    def make_model() -> nn.Module:
        return mlp(64, [128], 10)

    settings = dict(epochs=epochs, batch_size=32, lr=0.05)
    detections, cur = [], {"noisy (10% flipped)": [], "clean": []}
    for seed in seeds:
        for flip, key in ((True, "noisy (10% flipped)"), (False, "clean")):
            run = classification_run("digits", train_set, val, 10, make_model, seed, flip=flip, **settings)
            if flip:
                detections.append(run["detection"])
            cur[key].append(curation(run, eval_set, make_model, n_random=n_random, **settings))
            print(f"  digits seed {seed} {key}: trained with values in {run['train_s']:.1f} s", file=sys.stderr,
                  flush=True)
    setup = {"data": f"digits: {len(train_set)} train; {half} held-out for the values, {len(test) - half} for "
                     "curation evaluation", "model": "MLP 64-128-10", "optimizer": "SGD lr 0.05 momentum 0.9",
             "batch_size": 32, "epochs": epochs, "seeds": seeds, "random_draws_per_seed": n_random}
    return ({"setup": setup, "detection": summarize_detection(detections)},
            {"setup": setup, "results": {k: summarize_curation(v) for k, v in cur.items()}})


def fmnist_experiment(seeds: list[int], n_train: int, n_val: int, epochs: int) -> dict:
    train_set = load_fashion_mnist(split="train", limit=n_train, seed=0)
    test = load_fashion_mnist(split="test", limit=n_val, seed=0)
    val = test.tensors

    def make_model() -> nn.Module:
        return mlp(784, [256], 10)

    detections = []
    for seed in seeds:
        run = classification_run("fmnist", train_set, val, 10, make_model, seed, epochs=epochs, batch_size=64,
                                 lr=0.05, flip=True)
        detections.append(run["detection"])
        print(f"  fmnist seed {seed}: trained with values in {run['train_s']:.1f} s", file=sys.stderr, flush=True)
    setup = {"data": f"Fashion-MNIST: {n_train} train (random subset), {n_val} test images as validation",
             "model": "MLP 784-256-10", "optimizer": "SGD lr 0.05 momentum 0.9", "batch_size": 64, "epochs": epochs,
             "seeds": seeds}
    return {"setup": setup, "detection": summarize_detection(detections)}


def summarize_detection(runs: list[dict]) -> dict:
    return {method: {metric: mean_sd([r[method][metric] for r in runs]) for metric in ("auroc", "ap")}
            for method in runs[0]}


def summarize_curation(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        if key.startswith("flipped share"):
            out[key] = mean_sd([r[key] for r in runs])
            continue
        out[key] = {"eval_loss": mean_sd([r[key][0] for r in runs]), "eval_acc": mean_sd([r[key][1] for r in runs])}
        if key != "full":
            out[key]["loss_change_vs_full"] = mean_sd([r[key][0] - r["full"][0] for r in runs])
    return out


# -- 2: junk in a char-level LM ----------------------------------------------------------------------------------------


def junk_experiment(seeds: list[int], seq_len: int, d: int, epochs: int) -> dict:
    text = load_text_sample()
    vocab = sorted(set(text))
    cut = int(0.9 * len(text))
    clean = CharDataset(text[:cut], seq_len, vocab=vocab)
    val_chunks = CharDataset(text[cut:], seq_len, vocab=vocab).tensors[0]
    validation = (val_chunks[:16],)
    results = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        chunks = clean.tensors[0]
        n_clean, width = chunks.shape
        n_each = int(round(0.05 * n_clean))
        kinds = {
            "random characters": torch.as_tensor(rng.integers(0, len(vocab), size=(n_each, width))),
            "shuffled characters": torch.stack([c[torch.as_tensor(rng.permutation(width))]
                                                for c in chunks[rng.choice(n_clean, n_each, replace=False)]]),
            "exact duplicate": chunks[torch.as_tensor(rng.choice(n_clean, n_each, replace=False))].clone(),
            "one passage ×20": chunks[int(rng.integers(n_clean))].repeat(20, 1),
        }
        parts, labels = [chunks], ["clean"] * n_clean
        for kind, rows in kinds.items():
            parts.append(rows)
            labels += [kind] * len(rows)
        data = ArrayDataset(torch.cat(parts))
        labels = np.array(labels)
        task = LanguageModelingTask()
        torch.manual_seed(seed)
        model = TinyGPT(len(vocab), d=d, n_layers=2, n_heads=4, max_len=seq_len)
        start = time.perf_counter()
        batch_size = 16
        values = train(model, task, data, epochs=epochs, batch_size=batch_size,
                       make_opt=lambda p: torch.optim.Adam(p, lr=3e-3), seed=seed, validation=validation,
                       orders=ORDERS)
        train_s = time.perf_counter() - start
        steps = epochs * -(-len(data) // batch_size)
        with torch.no_grad():
            val_loss = float(task.loss(model, validation).mean())
        rankings = {f"in-run order {o}": v for o, v in values.items()}
        rankings["final training loss (negated)"] = -per_example_loss(model, task, data)
        res = {"seed": seed, "steps": steps, "train_s": train_s, "final_val_loss": val_loss, "n": len(data),
               "counts": {k: int((labels == k).sum()) for k in ["clean", *kinds]}, "by_method": {}}
        for method, v in rankings.items():
            pct = 100.0 * (np.argsort(np.argsort(v, kind="stable"), kind="stable") + 0.5) / len(v)  # 0 = lowest
            bottom = pct < 10.0
            per_kind = {kind: {"mean_percentile": float(pct[labels == kind].mean()),
                               "frac_bottom_10pct": float(bottom[labels == kind].mean()),
                               "mean_value": float(v[labels == kind].mean())} for kind in ["clean", *kinds]}
            per_kind["all junk vs clean"] = detection(-v, labels != "clean")
            noise = np.isin(labels, ["clean", "random characters", "shuffled characters"])
            per_kind["random+shuffled vs clean"] = detection(-v[noise], labels[noise] != "clean")
            res["by_method"][method] = per_kind
        results.append(res)
        print(f"  char-LM seed {seed}: {steps} steps in {train_s:.1f} s, val loss {val_loss:.3f}", file=sys.stderr,
              flush=True)
    setup = {"data": f"bundled text sample, {seq_len}-char chunks: {len(clean)} clean training chunks (first 90 % of "
                     f"the text), validation = 16 chunks of the last 10 %",
             "model": f"TinyGPT d={d}, 2 layers, 4 heads, T={seq_len}, tied", "optimizer": "Adam lr 3e-3",
             "batch_size": 16, "epochs": epochs, "seeds": seeds}
    return {"setup": setup, "runs": results, "summary": summarize_junk(results)}


def summarize_junk(runs: list[dict]) -> dict:
    out = {}
    for method in runs[0]["by_method"]:
        out[method] = {}
        for kind, stats in runs[0]["by_method"][method].items():
            out[method][kind] = {m: statistics.mean(r["by_method"][method][kind][m] for r in runs) for m in stats}
    return out


# -- main ------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer epochs (smoke test)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["digits", "fmnist", "junk"], default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out_path = args.out or Path(__file__).parent / "results" / f"inrun_quality{'_quick' if args.quick else ''}.json"
    start = time.perf_counter()
    report: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
                    "torch_threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d"), "quick": args.quick}
    q = args.quick
    if args.only in (None, "digits"):
        report["digits_mislabel"], report["digits_curation"] = digits_experiments(
            seeds=[0] if q else [0, 1, 2, 3, 4], epochs=5 if q else 10, n_random=1 if q else 3)
    if args.only in (None, "fmnist"):
        report["fmnist_mislabel"] = fmnist_experiment(seeds=[0] if q else [0, 1, 2], n_train=1000 if q else 5000,
                                                      n_val=128 if q else 256, epochs=2 if q else 5)
    if args.only in (None, "junk"):
        report["char_lm_junk"] = junk_experiment(seeds=[0] if q else [0, 1], seq_len=64, d=32 if q else 64,
                                                 epochs=2 if q else 5)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    print_tables(report)
    print(f"\nwrote {out_path} ({report['wall_s']} s)")


def _ms(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} ± {d['sd']:.{digits}f}" if d["n"] > 1 else f"{d['mean']:.{digits}f}"


def print_tables(report: dict) -> None:
    for key, title in (("digits_mislabel", "digits"), ("fmnist_mislabel", "Fashion-MNIST 5k")):
        if key not in report:
            continue
        print(f"\nMislabel detection, {title} (10 % flipped; mean ± sd over seeds {report[key]['setup']['seeds']})")
        print("| ranking | AUROC | AP |\n|---|---|---|")
        for method, m in report[key]["detection"].items():
            print(f"| {method} | {_ms(m['auroc'])} | {_ms(m['ap'])} |")
    if "char_lm_junk" in report:
        junk = report["char_lm_junk"]
        print(f"\nJunk in the char-LM ({junk['setup']['model']}; {junk['runs'][0]['steps']} steps; "
              f"counts {junk['runs'][0]['counts']}; mean over seeds {junk['setup']['seeds']})")
        print("| ranking | kind | mean percentile (0 = lowest) | in bottom 10 % | mean value |\n|---|---|---|---|---|")
        for method, kinds in junk["summary"].items():
            for kind, s in kinds.items():
                if "auroc" in s:
                    print(f"| {method} | {kind} | AUROC {s['auroc']:.3f} | AP {s['ap']:.3f} | |")
                else:
                    print(f"| {method} | {kind} | {s['mean_percentile']:.1f} | {100 * s['frac_bottom_10pct']:.0f} % | "
                          f"{s['mean_value']:+.3g} |")
    if "digits_curation" in report:
        cur = report["digits_curation"]
        print(f"\nCuration, digits (retrain after removing 10 %; evaluation loss on held-out images never used for "
              f"the values; mean ± sd over seeds {cur['setup']['seeds']})")
        print("| training data | removed | eval loss | Δ loss vs full | eval acc |\n|---|---|---|---|---|")
        for setting, rows in cur["results"].items():
            for key, r in rows.items():
                if key.startswith("flipped share"):
                    continue
                delta = _ms(r["loss_change_vs_full"], 4) if "loss_change_vs_full" in r else "—"
                print(f"| {setting} | {key} | {_ms(r['eval_loss'], 4)} | {delta} | {_ms(r['eval_acc'])} |")
            for key, r in rows.items():
                if key.startswith("flipped share"):
                    print(f"| {setting} | {key} | {_ms(r)} | | |")


if __name__ == "__main__":
    main()
