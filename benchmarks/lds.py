"""LDS benchmark on every case: build (or resume) the ground truth, then score our methods and the peers.

A thin wrapper around the CLI — the same as, per case::

    datacredit groundtruth --case NAME
    datacredit bench --case NAME --peers

Usage: ``python benchmarks/lds.py [--cases all|a,b] [--no-peers] [--quick] [--methods a,b]``.
Results: ``runs/bench/<case>/results.{json,md}``; the write-up is ``benchmarks/LDS.md``.
"""

from __future__ import annotations

import argparse
import sys

from datacredit.cli import main as cli


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="all")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny ground truth, fast methods (smoke run)")
    parser.add_argument("--methods", help="comma-separated registry names (datacredit bench --list)")
    parser.add_argument("--root", default="runs/bench")
    args = parser.parse_args(argv)
    common = ["--case", args.cases, "--root", args.root, "--no-progress"]
    if not args.quick:
        cli(["groundtruth", *common])
    bench = ["bench", *common] + ([] if args.no_peers else ["--peers"]) + (["--quick"] if args.quick else [])
    return cli(bench + (["--methods", args.methods] if args.methods else []))


if __name__ == "__main__":  # the ground-truth builder spawns worker processes: keep this guard
    sys.exit(run())
