"""Source-level attribution against retraining on the bundled text sample (issue: credit by data source).

Set-up (all bundled, no download): the text sample cut into 32-character chunks; the first 1,000 chunks form 20
"documents" (sources ``doc00``–``doc19``, 50 consecutive chunks each), plus one planted source ``random`` of 50 chunks
of uniformly random characters. Queries: 25 near-verbatim windows (each straddles two consecutive chunks of one
document, offset by 16 characters: the text is in the training set, cut differently) and 25 held-out chunks from the
end of the sample. Model: the text-gpt recipe (TinyGPT d=32, 2 layers, Adam, 8 epochs).

Ground truth, retrained with ``--seeds`` seeds each (common seeds across jobs): the full set; the full set without
each source (leave-one-source-out, LOSO); ``--halves`` random halves of the sources (for a source-level LDS).
The measured value of source s for query q is ``loss_without_s(q) − loss_full(q)`` (positive: the source helped q),
averaged over seeds. Every subset is trained with the same seeds (common random numbers: seed k fixes the
initialisation and the shuffling stream of every subset, so seed effects shared by the subsets cancel in their
difference). Methods attribute the seed-0 full model; their source value is the sum of members' scores.
``--seed-offset S`` moves every seed by S (retraining seeds S..S+seeds-1, methods' models S..); ``--halves-seed H``
draws other halves (default 1, the earlier draw); both enter the ground-truth store's key only when not default.

A less noisy text case, ``--case text-styles`` (``benchmarks/text_styles.py``): the sample rewritten in 9 styles
(case × letter order), one source per style plus a planted source of random characters; 54 held-out queries, 6
passages written in each style, each expecting its own style's source first. Same recipe.

A second case, ``--case digits-classes``: sklearn's digits with each class as one source (10 sources) plus a planted
source of 50 uniform-noise images with random labels; 50 test images as queries, each expecting its own class's
source first; the demo's MLP recipe (64-64-10, SGD).

Reported per method: Spearman over sources between predicted and measured LOSO values, per query then averaged (with
a bootstrap interval over queries), and for the query-averaged values; the source-level LDS on the halves; the
seed-to-seed noise ceiling of each (split-half: the ground truth of the first half of the seeds against that of
the second half, with a bootstrap interval over queries; and one seed against the mean of the others); planted
checks (the expected source ranks first for its queries; the random source gets ≤ 0 credit). Usage::

    .venv/bin/python benchmarks/source_credit.py [--case text-documents|text-styles|digits-classes] [--seeds 3] \
        [--halves 24] [--model-seeds 1] [--seed-offset 0] [--halves-seed 1] [--results PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datacredit import ClassificationTask, GradDot, Influence, LanguageModelingTask, Scores, Source, TracIn
from datacredit.data import CharDataset, load_digits, load_text_sample
from datacredit.dataset import ArrayDataset
from datacredit.evaluate import ClassifierRecipe, Execution, LMRecipe
from datacredit.evaluate.runner import Retraining, run_jobs
from datacredit.evaluate.stats import bootstrap_mean_ci, spearman_columns
from datacredit.methods import TRAK
from datacredit.sources import Sources
from datacredit.store import Store, atomic_write_json
from datacredit.training import InRunCallback, TrajectoryCallback

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks.text_styles from this checkout when run as a script
    sys.path.append(str(ROOT))
from benchmarks.text_styles import STYLES, styled_text  # noqa: E402

SEQ, DOCS, PER_DOC, N_VERBATIM, N_HELDOUT = 32, 20, 50, 25, 25


@dataclass
class Case:
    """train, queries, sources (one level, ``"source"``), the expected top source per query (or -1), recipe, task
    for the gradient methods, task for TRAK (margin for classifiers)."""

    train: ArrayDataset
    queries: ArrayDataset
    sources: Sources
    expected: np.ndarray
    recipe: Any
    task: Any
    trak_task: Any


def make_text(seed: int = 0) -> Case:
    """The text case; ``expected[q]`` is the document of a near-verbatim query, -1 for a held-out one."""
    text = load_text_sample()
    chunks = CharDataset(text, seq_len=SEQ)
    rng = np.random.default_rng(seed)
    tokens = chunks.tensors[0][: DOCS * PER_DOC]
    noise = torch.from_numpy(rng.integers(0, chunks.vocab_size, size=(PER_DOC, SEQ + 1)))
    train_tokens = torch.cat([tokens, noise])
    keys = [f"doc{k // PER_DOC:02d}" for k in range(DOCS * PER_DOC)] + ["random"] * PER_DOC
    train_set = ArrayDataset(train_tokens, ids=np.arange(len(train_tokens)))
    encoded = chunks.encode(text)
    starts = rng.choice(DOCS * PER_DOC - 1, size=N_VERBATIM, replace=False)
    starts = starts[(starts + 1) % PER_DOC != 0][:N_VERBATIM]  # both halves of the window in one document
    windows = torch.stack([encoded[s * SEQ + SEQ // 2 : s * SEQ + SEQ // 2 + SEQ + 1] for s in starts])
    held = chunks.tensors[0][-N_HELDOUT:]
    queries = ArrayDataset(torch.cat([windows, held]), ids=np.arange(10_000, 10_000 + len(windows) + N_HELDOUT))
    verbatim = np.concatenate([starts // PER_DOC, -np.ones(N_HELDOUT, dtype=np.int64)])
    return Case(train_set, queries, Sources(np.arange(len(train_tokens)), {"source": keys}), verbatim,
                LMRecipe(chunks.vocab_size, SEQ), LanguageModelingTask(), LanguageModelingTask())


def make_digits(seed: int = 0) -> Case:
    """Digits with each class as one source, plus a planted source of 50 uniform-noise images with random labels.
    Queries: 50 test images; ``expected[q]`` is the query's own class."""
    train, test = load_digits(seed=seed)
    rng = np.random.default_rng(seed)
    x, y = train.tensors
    noise_x = torch.from_numpy(rng.uniform(float(x.min()), float(x.max()), size=(50, x.shape[1]))).to(x.dtype)
    noise_y = torch.from_numpy(rng.integers(0, 10, size=50))
    train_set = ArrayDataset(torch.cat([x, noise_x]), torch.cat([y, noise_y]), ids=np.arange(len(x) + 50))
    keys = [f"class-{int(c)}" for c in y] + ["random"] * 50
    pick = np.sort(rng.choice(len(test), size=50, replace=False))
    queries = test.subset(pick)
    names = sorted(set(keys))
    expected = np.array([names.index(f"class-{int(c)}") for c in queries.tensors[1]])
    return Case(train_set, queries, Sources(np.arange(len(keys)), {"source": keys}), expected,
                ClassifierRecipe(64, 10, hidden=(64,)), ClassificationTask(), ClassificationTask(measurement="margin"))


def make_text_styles(seed: int = 0) -> Case:
    """The styled text case (``benchmarks/text_styles.py``); ``expected[q]`` is the source of the query's style."""
    corpus = styled_text(seed)
    names = sorted(set(corpus.sources.levels["source"]))
    expected = np.array([names.index(STYLES[s]) for s in corpus.query_style])
    return Case(corpus.train, corpus.queries, corpus.sources, expected, LMRecipe(len(corpus.vocab), SEQ),
                LanguageModelingTask(), LanguageModelingTask())


CASES = {"text-documents": make_text, "text-styles": make_text_styles, "digits-classes": make_digits}


def plan(keys: np.ndarray, seeds: int, halves: int, seed_offset: int = 0, halves_seed: int = 1):
    """The retraining jobs: ``(subsets, half_masks, jobs, meta)``.

    subsets: boolean ``(1 + n_source + halves, n_train)`` masks (full set, each LOSO set, each half); half_masks:
    ``(halves, n_source)`` over the sorted source names, drawn with ``default_rng(halves_seed)``; jobs: ``(positions,
    seed)`` for every subset and every seed ``seed_offset .. seed_offset + seeds - 1`` (subset-major); meta: the
    store's key. The defaults (offset 0, halves seed 1) give the jobs and the store key of the runs before these options
    existed, so their caches resume; a non-default offset or halves seed enters the key.
    """
    names = np.unique(keys)
    rng = np.random.default_rng(halves_seed)
    half_masks = np.stack([rng.permutation(len(names)) < len(names) // 2 for _ in range(halves)])
    subsets = [np.ones(len(keys), bool)] + [keys != n for n in names] + [np.isin(keys, names[h]) for h in half_masks]
    jobs = [(np.flatnonzero(mask), seed) for mask in subsets for seed in range(seed_offset, seed_offset + seeds)]
    meta: dict[str, Any] = {"seeds": seeds, "halves": halves}
    if seed_offset:
        meta["seed_offset"] = seed_offset
    if halves_seed != 1:
        meta["halves_seed"] = halves_seed
    return np.stack(subsets), half_masks, jobs, meta


def groundtruth(recipe, train_set, queries, sources, args) -> dict[str, np.ndarray]:
    """Retrain the full set, each LOSO set and each half; resumable (one chunk per job in a Store)."""
    keys = sources.levels["source"]
    names = np.unique(keys)
    subsets, halves, jobs, meta = plan(keys, args.seeds, args.halves, args.seed_offset, args.halves_seed)
    config = {**meta, "recipe": str(recipe), "n_train": len(keys)}
    store = Store(Path(args.out) / args.case / "gt")
    outputs = store.chunked("loss", (len(jobs), len(queries)), np.float64, len(jobs), meta=config)
    todo = outputs.pending()
    print(f"ground truth: {len(jobs)} retrainings, {len(todo)} to do", file=sys.stderr)
    start = time.perf_counter()
    run_jobs(Retraining(recipe, train_set, queries), jobs, lambda j, out, sec: outputs.write(j, None, out[:1]),
             todo=todo, execution=Execution(workers=args.workers))
    loss = np.asarray(outputs.array).reshape(len(subsets), args.seeds, len(queries))
    return {"full": loss[0], "loso": loss[1 : 1 + len(names)], "halves": loss[1 + len(names) :],
            "half_masks": halves, "names": names, "seconds": time.perf_counter() - start}


METHODS = ("inrun-1", "inrun-2", "grad-dot", "influence-ekfac", "trak", "tracin", "source")


def attribute(case: Case, out: Path, methods: tuple[str, ...] = METHODS, model_seeds: int = 1,
              seed_offset: int = 0) -> dict[str, tuple]:
    """Scores of ``methods`` for the full model of seed ``seed_offset`` (``model_seeds=1``), or their mean over the
    full models of seeds ``seed_offset .. seed_offset + model_seeds - 1`` (an ensemble over training seeds, as the
    ground truth averages over seeds), with the summed wall time."""
    runs = [attribute_seed(case, out, methods, seed) for seed in range(seed_offset, seed_offset + model_seeds)]
    if model_seeds == 1:
        return runs[0]
    results = {}
    for name, (first, _) in runs[0].items():
        mean = np.mean([np.asarray(r[name][0].values, dtype=np.float64) for r in runs], axis=0)
        results[name] = (Scores(mean, first.train_ids, first.query_ids, first.method,
                                {**first.config, "model_seeds": model_seeds}), sum(r[name][1] for r in runs))
    return results


def attribute_seed(case: Case, out: Path, methods: tuple[str, ...], seed: int) -> dict[str, tuple]:
    """Scores of ``methods`` for the full model of ``seed``, with their wall time (In-Run: extra over plain run)."""
    recipe, train_set, queries, task = case.recipe, case.train, case.queries, case.task
    traj_dir = out / ("traj" if seed == 0 else f"traj-seed{seed}")
    traj = TrajectoryCallback(str(traj_dir), 6)
    t0 = time.perf_counter()
    model = recipe.train(train_set, seed, callbacks=[traj])
    plain = time.perf_counter() - t0
    results = {}
    for order in [o for o in (1, 2) if f"inrun-{o}" in methods]:
        inrun = InRunCallback(task, queries, order=order, targeted=True)
        t0 = time.perf_counter()
        recipe.train(train_set, seed, callbacks=[inrun])
        results[f"inrun-{order}"] = (inrun.values(), time.perf_counter() - t0 - plain)
        print(f"inrun-{order}: {results[f'inrun-{order}'][1]:.1f} s extra", file=sys.stderr)
    factories = {
        "grad-dot": lambda: GradDot(model, task, progress=False),
        "influence-ekfac": lambda: Influence(model, task, curvature="ekfac", progress=False),
        "trak": lambda: TRAK(model, case.trak_task, projection=512, progress=False),
        "tracin": lambda: TracIn(model, task, str(traj_dir), progress=False),
        "source": lambda: Source(model, task, str(traj_dir), segments=3, progress=False),
    }
    for name, make in [(n, f) for n, f in factories.items() if n in methods]:
        t0 = time.perf_counter()
        scores = make().fit(train_set).score(queries)
        results[name] = (scores, time.perf_counter() - t0)
        print(f"{name}: {results[name][1]:.1f} s", file=sys.stderr)
    return results


def spearman_rows(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Spearman over the first axis for every column: ``(n_query,)``."""
    return spearman_columns(pred, true)


def loso_effect(gt: dict, seeds: np.ndarray) -> np.ndarray:
    """``(n_source, Q)``: mean over ``seeds`` of ``loss_without_s − loss_full`` (positive: the source helped)."""
    return gt["loso"][:, seeds].mean(1) - gt["full"][seeds].mean(0)


def mean_ci(per_query: np.ndarray) -> dict[str, Any]:
    """Mean over queries with a 90 % bootstrap interval over queries (1,000 resamples)."""
    lo, hi = bootstrap_mean_ci(per_query, 1000, 0.9, 0)
    return {"mean": float(np.nanmean(per_query)), "ci": [lo, hi]}


def ceilings(gt: dict) -> dict[str, dict]:
    """Seed-to-seed agreement of the ground truth itself, per query: split-half (first half of the seeds against the
    second half) and one seed against the mean of the others, for the LOSO values and for the halves' losses."""
    n = gt["loso"].shape[1]
    if n < 2:
        return {}
    first, second = np.arange(n // 2), np.arange(n // 2, n)
    one, rest = np.arange(1), np.arange(1, n)
    halves = gt["halves"]  # (m, seeds, Q)
    return {
        "loso_split_half": mean_ci(spearman_rows(loso_effect(gt, first), loso_effect(gt, second))),
        "loso_one_vs_rest": mean_ci(spearman_rows(loso_effect(gt, one), loso_effect(gt, rest))),
        "lds_split_half": mean_ci(spearman_rows(halves[:, first].mean(1), halves[:, second].mean(1))),
        "lds_one_vs_rest": mean_ci(spearman_rows(halves[:, 0], halves[:, rest].mean(1))),
    }


def evaluate(results, gt, sources, expected) -> tuple[list[dict], dict, dict[str, np.ndarray]]:
    """Rows per method, the noise ceilings, and the arrays behind them (measured LOSO, each method's values)."""
    seeds = np.arange(gt["loso"].shape[1])
    measured = loso_effect(gt, seeds)  # (n_source, Q)
    half_loss = gt["halves"].mean(1)  # (m, Q)
    ceil = ceilings(gt)
    has = expected >= 0
    arrays = {"measured": measured, "names": gt["names"]}
    rnd = list(gt["names"]).index("random")
    for key, c in ceil.items():
        print(f"ceiling {key}: {c['mean']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]", file=sys.stderr)
    truth_top = float((np.argmax(measured[:, has], axis=0) == expected[has]).mean())
    print(f"retraining's own expected-source top-1 ({len(seeds)}-seed mean): {truth_top:.2f}", file=sys.stderr)
    rows = []
    for name, (scores, seconds) in results.items():
        sv = sources.values(scores, "source")
        assert (sv.names == gt["names"]).all()
        arrays[name] = sv.values
        per_query = spearman_rows(sv.values, measured)
        predicted_half = gt["half_masks"].astype(np.float64) @ sv.values  # (m, Q): summed credit of the half
        lds = spearman_rows(predicted_half, -half_loss)
        top = np.argmax(sv.values[:, has], axis=0)
        loso = mean_ci(per_query)
        rows.append({
            "method": name, "seconds": round(seconds, 2),
            "loso_spearman": loso["mean"], "loso_ci": loso["ci"],
            "loso_spearman_expected": float(np.nanmean(per_query[has])),
            "loso_spearman_other": float(np.nanmean(per_query[~has])) if (~has).any() else float("nan"),
            "loso_spearman_mean_query": float(spearman_rows(sv.values.mean(1, keepdims=True),
                                                             measured.mean(1, keepdims=True))[0]),
            "source_lds": float(np.nanmean(lds)), "source_lds_ci": mean_ci(lds)["ci"],
            "expected_top1": float((top == expected[has]).mean()),
            "random_credit": float(sv.values[rnd].mean()),
            "random_credit_positive_queries": float((sv.values[rnd] > 0).mean()),
            "random_measured": float(measured[rnd].mean()),
            "random_measured_positive_queries": float((measured[rnd] > 0).mean()),
        })
    return rows, {**ceil, "truth_expected_top1": truth_top}, arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--halves", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="runs/source-credit")
    parser.add_argument("--case", choices=sorted(CASES), default="text-documents")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--model-seeds", type=int, default=1,
                        help="attribute the full models of this many seeds and average the scores (default 1: seed 0)")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="retraining seeds are S..S+seeds-1; the methods read the full models of the first "
                             "--model-seeds of them (default 0)")
    parser.add_argument("--halves-seed", type=int, default=1,
                        help="seed of the random draw of the source halves (default 1, the draw of earlier runs)")
    parser.add_argument("--gt-only", action="store_true", help="retrain (resumable) and stop before the methods")
    parser.add_argument("--results", default=None, help="default benchmarks/results/source-credit-<case>.json")
    args = parser.parse_args()
    if args.seeds < 1 or args.halves < 4 or args.workers < 1 or args.model_seeds < 1 or args.seed_offset < 0:
        parser.error("need --seeds >= 1, --halves >= 4, --workers >= 1, --model-seeds >= 1, --seed-offset >= 0")
    methods = tuple(m for m in args.methods.split(",") if m)
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods: choose from {','.join(METHODS)}, got {args.methods!r}")
    torch.set_num_threads(1)
    args.results = args.results or f"benchmarks/results/source-credit-{args.case}.json"
    case = CASES[args.case]()
    gt = groundtruth(case.recipe, case.train, case.queries, case.sources, args)
    if args.gt_only:
        return
    results = attribute(case, Path(args.out) / args.case, methods, args.model_seeds, args.seed_offset)
    rows, ceil, arrays = evaluate(results, gt, case.sources, case.expected)
    suffix = "" if args.model_seeds == 1 else f"-{args.model_seeds}seeds"
    np.savez(Path(args.out) / args.case / f"values{suffix}.npz", **arrays)
    atomic_write_json(args.results, {"args": vars(args), "gt_seconds": gt["seconds"], "ceilings": ceil, "rows": rows})
    print("| method | LOSO Spearman (per query, 90% CI) | expected / other queries | LOSO Spearman (query-mean) |"
          " source LDS (90% CI) | expected-source top-1 | random source: credit / measured | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['loso_spearman']:.3f} [{r['loso_ci'][0]:.3f}, {r['loso_ci'][1]:.3f}] | "
              f"{r['loso_spearman_expected']:.3f} / {r['loso_spearman_other']:.3f} | "
              f"{r['loso_spearman_mean_query']:.3f} | {r['source_lds']:.3f} [{r['source_lds_ci'][0]:.3f}, "
              f"{r['source_lds_ci'][1]:.3f}] | {r['expected_top1']:.2f} | "
              f"{r['random_credit']:.2e} / {r['random_measured']:.2e} | {r['seconds']} |")
    for key, c in ceil.items():
        if isinstance(c, dict):
            print(f"noise ceiling {key}: {c['mean']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]")
    print(json.dumps({"gt_seconds": round(gt["seconds"], 1)}))


if __name__ == "__main__":
    main()
