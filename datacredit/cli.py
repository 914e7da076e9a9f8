"""``datacredit`` command line: ``demo``, ``report``, ``groundtruth``, ``bench``, ``attribute``.

Each subcommand is a pair of functions — ``_<name>_args(subparsers)`` declares it and sets ``run`` to its
``_<name>(args) -> int`` — listed in :data:`COMMANDS`; a new subcommand (``report``) adds one pair and one entry.

Mistakes get one line on stderr and exit status 2, before any work: argument types and ranges are checked by the
parser, what needs a look at the disk or the environment (an ``--out`` that is a file, Ray not installed, an
unknown method) right after it, and a DataCreditError raised later (a store built with other settings, a build
already running there) is printed as ``datacredit: error: <message>``. Anything else is a bug and keeps its
traceback. Ctrl-C exits with 130, SIGTERM with 143; finished retrainings are kept either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import DataCreditError

DEFAULT_ROOT = "runs/bench"


class UsageError(DataCreditError):
    """A command-line argument that cannot work (found after parsing: it needed a look at the disk or the system)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``datacredit demo: error: ...``) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _positive_float(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value


def _check_dir(path: str | Path | None, flag: str) -> None:
    """UsageError if ``path`` exists but is not a directory (it would fail only after the work)."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{flag} {path}: is a file, not a directory")


def _check_backend(backend: str | None) -> None:
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise UsageError("--backend ray needs Ray, which is not installed: pip install ray (or pip install "
                         "'datacredit[ray]'), or use --backend process")


# -- demo ---------------------------------------------------------------------------------------------------------
def _demo_args(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="end-to-end demo on the bundled digits data (no download)")
    demo.add_argument("--out", default="runs/demo", help="run directory: report, scores, cached ground truth")
    demo.add_argument("--queries", type=_int_at_least(1), default=30, help="test images to explain")
    demo.add_argument("--m", type=_int_at_least(3), default=40,
                      help="retrainings for the demo's ground truth (LDS; at least 3)")
    demo.add_argument("--workers", type=_int_at_least(1), default=2, help="parallel retraining processes")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _check_dir(args.out, "--out")
    run_demo(args.out, n_queries=args.queries, m=args.m, workers=args.workers, seed=args.seed,
             progress=not args.no_progress)
    return 0


# -- report -------------------------------------------------------------------------------------------------------
def _report_args(sub: argparse._SubParsersAction) -> None:
    rep = sub.add_parser("report", help="write a self-contained HTML report from a run directory")
    rep.add_argument("run_dir", help="a run directory (e.g. runs/demo; layout in datacredit/report/run.py)")
    rep.add_argument("-o", "--out", default=None, help="output file (default RUN_DIR/report.html)")
    rep.set_defaults(run=_report)


def _report(args: argparse.Namespace) -> int:
    from .report import render_report

    if args.out is not None and Path(args.out).is_dir():
        raise UsageError(f"-o/--out {args.out}: is a directory; give the report file's path")
    try:
        written = render_report(args.run_dir, args.out)
    except OSError as exc:  # every part is read defensively, so this is the write: a bad -o path, a full disk
        raise UsageError(f"cannot write the report: {exc}") from exc
    print(f"report written to {written}")
    return 0


# -- shared by the benchmark commands -----------------------------------------------------------------------------
def _benchmarks(module: str):
    """``benchmarks.bench.<module>``: the benchmark package is not installed with datacredit; it is found in the
    repository checkout this package was installed from (editable), else it is a one-line error."""
    import importlib

    root = Path(__file__).resolve().parents[1]
    if (root / "benchmarks" / "bench" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.append(str(root))
    try:
        return importlib.import_module(f"benchmarks.bench.{module}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks", "benchmarks.bench"):
            raise
        raise DataCreditError("the benchmark commands (groundtruth --case, bench) run from a repository checkout: "
                              "benchmarks/bench is not installed with datacredit; clone the repository and "
                              "pip install -e . there") from None


def _case_names(value: str) -> list[str]:
    try:
        cases = _benchmarks("cases").CASES
    except DataCreditError as exc:  # parse time: argparse prints it as one line, exit status 2
        raise argparse.ArgumentTypeError(str(exc)) from None

    names = sorted(cases) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in cases]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown case(s) {unknown or value!r}; choose from {sorted(cases)} or all")
    return names


def _bench_common(parser: argparse.ArgumentParser, threads_help: str, required: bool = True) -> None:
    parser.add_argument("--case", type=_case_names, required=required,
                        help="digits-lr, fmnist-mlp, text-gpt, a comma-separated list, or all")
    parser.add_argument("--root", default=DEFAULT_ROOT, help=f"where the cases live (default {DEFAULT_ROOT})")
    parser.add_argument("--threads", type=_int_at_least(1), default=1, help=threads_help)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


# -- groundtruth --------------------------------------------------------------------------------------------------
def _groundtruth_args(sub: argparse._SubParsersAction) -> None:
    gt = sub.add_parser("groundtruth", help="build (or resume) a benchmark case's ground truth by retraining")
    _bench_common(gt, "torch threads of the retrainings that run in this process (--backend serial or --workers 1; "
                      "default 1); worker processes use one thread each")
    gt.add_argument("--m", type=_int_at_least(3), help="random subsets (default 100; at least 3 for an LDS)")
    gt.add_argument("--alpha", type=_fraction, help="fraction of the training set in each subset (default 0.5)")
    gt.add_argument("--seeds", type=_int_at_least(1), help="training seeds per subset (default 2)")
    gt.add_argument("--workers", type=_int_at_least(1), help="parallel worker processes (default 2)")
    gt.add_argument("--backend", choices=("process", "serial", "ray"), help="where retrainings run (default process)")
    gt.add_argument("--seed", type=int, help="seed of the subsets and training seeds (default 0)")
    gt.add_argument("--out", help="store directory (default <root>/<case>/gt; only with one case)")
    gt.add_argument("--wait", action="store_true",
                    help="if another build is running in the store, wait for it, then run what it left "
                         "(default: exit at once, naming it)")
    gt.add_argument("--overwrite", action="store_true",
                    help="replace what the store directory holds (a saved Scores, a build with other settings)")
    gt.set_defaults(run=_groundtruth)


def _groundtruth(args: argparse.Namespace) -> int:
    import torch

    load_case = _benchmarks("cases").load_case
    if args.out and len(args.case) > 1:
        raise UsageError("--out needs a single --case")
    _check_dir(args.out, "--out")
    _check_dir(args.root, "--root")
    _check_backend(args.backend)
    _logging()
    torch.set_num_threads(args.threads)
    for name in args.case:
        case = load_case(name, args.root)
        out = Path(args.out) if args.out else case.gt_dir()
        config, execution = _groundtruth_configs(args, case)
        start = time.perf_counter()
        gt = case.build_groundtruth(out, config, execution=execution)
        wall = time.perf_counter() - start
        record = {"case": name, "dir": str(out), "wall_seconds": wall, "m": gt.m, "seeds": gt.seeds,
                  "alpha": gt.config["alpha"], "workers": execution.workers,
                  "config": dataclasses.asdict(config), "execution": dataclasses.asdict(execution),
                  "retrain_seconds_median": float(_nanmedian(gt.seconds)),
                  "noise_ceiling_loss": gt.seed_agreement("loss")}
        (out.parent / f"{out.name}-build.json").write_text(json.dumps(record, indent=1) + "\n")
        ceiling = record["noise_ceiling_loss"]
        print(f"{name}: ground truth in {out}: {gt.m} subsets × {gt.seeds} seeds, {wall:.1f} s wall this call "
              f"(median retraining {record['retrain_seconds_median']:.2f} s); noise ceiling (loss) "
              f"{'n/a' if ceiling is None else f'{ceiling:.3f}'}")
    return 0


def _groundtruth_configs(args: argparse.Namespace, case: Any) -> tuple[Any, Any]:
    """The case's SubsetConfig and Execution with the flags given on the command line put over them."""
    from .evaluate import Execution

    given = {k: getattr(args, k) for k in ("m", "alpha", "seeds", "seed") if getattr(args, k) is not None}
    config = dataclasses.replace(case.spec.groundtruth, **given)
    execution = Execution(workers=args.workers or _benchmarks("cases").GT_EXECUTION.workers,
                          backend=args.backend or "process", progress=not args.no_progress, wait=args.wait,
                          overwrite=args.overwrite)
    return config, execution


def _nanmedian(seconds) -> float:
    import numpy as np

    return float(np.nanmedian(seconds)) if seconds is not None and np.isfinite(seconds).any() else float("nan")


# -- bench --------------------------------------------------------------------------------------------------------
def _bench_args(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="score methods (and peers) on a case against its ground truth")
    _bench_common(bench, "torch threads in this process (default 1: stable timings on a shared machine)",
                  required=False)
    bench.add_argument("--methods", help="comma-separated registry names (default: all of ours; see --list)")
    bench.add_argument("--peers", action="store_true",
                       help="also run the installed peers (make peers): dattri, kronfluence, traker, dattri-llm, "
                            "bergson (it needs a Hugging Face model: skipped on the bundled cases)")
    bench.add_argument("--quick", action="store_true",
                       help="smoke run: tiny ground truth (m=8, one seed), fast methods, no mislabel detection")
    bench.add_argument("--mislabel", action=argparse.BooleanOptionalAction, default=None,
                       help="mislabel-detection AUROC (default: on for full runs of classification cases)")
    bench.add_argument("--in-process", action="store_true",
                       help="run every method in this process (default: each in its own, with the limits below)")
    bench.add_argument("--memory-limit-gb", type=_positive_float, default=8.0,
                       help="stop a method whose process grows beyond this resident memory (default 8)")
    bench.add_argument("--timeout", type=_positive_float, default=3600, help="stop a method after this many seconds")
    bench.add_argument("--list", action="store_true", help="list the registered methods and exit")
    bench.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    import torch

    _benchmarks("peers")  # registers the peers
    load_case, registry = _benchmarks("cases").load_case, _benchmarks("methods").REGISTRY
    report, run_bench = _benchmarks("report"), _benchmarks("runner").run_bench
    limits = _benchmarks("isolate").Limits

    if args.list:
        for spec in registry.values():
            print(f"{spec.name:22s} {spec.family:12s} {'pair: ' + spec.pair if spec.pair else ''}")
        return 0
    if not args.case:
        raise UsageError("bench: --case is required (or --list)")
    _check_dir(args.root, "--root")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    unknown = [m for m in methods or () if m not in registry]
    if unknown or (args.methods is not None and not methods):
        raise UsageError(f"--methods: unknown method(s) {unknown or args.methods!r}; registered: "
                         f"{', '.join(sorted(registry))} (see --list)")
    _logging()
    torch.set_num_threads(args.threads)
    for name in args.case:
        case = load_case(name, args.root)
        results = run_bench(case, methods, peers=args.peers, quick=args.quick, mislabel=args.mislabel,
                            progress=not args.no_progress,
                            isolate=None if args.in_process else limits(args.memory_limit_gb * 1024, args.timeout))
        print()
        print(report.markdown(results))
        for line in report.ratio_lines(results):
            print("ours/peer", line)
        print(f"written: {case.dir / ('results-quick' if args.quick else 'results')}.json / .md")
    return 0


def _attribute_args(sub: argparse._SubParsersAction) -> None:
    att = sub.add_parser("attribute", help="credit generated outputs to the sources of your own text data and "
                         "split amounts in a ledger (local files, no download)",
                         description="Reads --train (JSONL: text + source fields) and --outputs (JSONL: prompt, "
                         "completion, optional amount); writes scores, ledger.json/.csv and credit.html to --out.")
    att.add_argument("--train", required=True, help="training records, JSONL with a text and a source field")
    att.add_argument("--outputs", required=True, help="generated outputs, JSONL with prompt and completion")
    att.add_argument("--out", default="runs/attribute", help="directory for scores, ledger and report")
    att.add_argument("--model", action="append", default=None,
                     help="local transformers causal-LM directory (default: train a character-level TinyGPT on "
                     "--train); repeat it to average the scores over several models (e.g. one recipe trained with "
                     "different seeds) that share one tokenizer")
    att.add_argument("--seeds", type=_int_at_least(1), default=1, metavar="K",
                     help="train this many character models (seeds SEED..SEED+K-1) and average each method's scores "
                     "over them (default 1); costs K trainings and K fits. EK-FAC averaged over 5 seed models "
                     "reached source LDS 0.81 against retraining on the benchmark's text case (benchmarks/SOURCES.md "
                     "Case 3b)")
    att.add_argument("--text-field", default="text")
    att.add_argument("--source-field", action="append", default=None,
                     help="source field of a training record, repeatable; the first is paid (default: source)")
    att.add_argument("--method", choices=("influence-ekfac", "influence-kfac", "grad-dot", "trak"), action="append",
                     help="attribution method (default influence-ekfac); repeat it to compare methods in the report: "
                     "the first one pays")
    att.add_argument("--seq-len", type=_int_at_least(2), default=96,
                     help="tokens per training window (and the character model's context)")
    att.add_argument("--epochs", type=_int_at_least(1), default=30, help="epochs of the character model")
    att.add_argument("--amount", type=float, default=1.0, help="amount per output without its own 'amount'")
    att.add_argument("--min-evidence", type=float, default=2.0,
                     help="pay a source only if its credit exceeds this many noise standard errors")
    att.add_argument("--seed", type=int, default=0,
                     help="seed of the (first) character model and of the noise bootstrap (default 0)")
    att.set_defaults(run=_attribute)


def _attribute(args: argparse.Namespace) -> int:
    from .attribute import run

    return run(args)


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _demo_args, _report_args, _groundtruth_args, _bench_args, _attribute_args)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a user's mistake, with a one-line message)."""
    parser = _Parser(prog="datacredit", description="Training-data attribution for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except DataCreditError as exc:
        print(f"datacredit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("datacredit: interrupted; what was finished is kept (a ground-truth build resumes when rerun)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
