"""The command line: every ordinary mistake is one line on stderr and exit status 2, before any work; a
DataCreditError raised during a command is printed as ``datacredit: error: ...``; anything else keeps its traceback."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from datacredit import cli
from datacredit.data import ArrayDataset
from datacredit.evaluate import LeastSquaresRecipe, build_groundtruth
from datacredit.lock import BuildLock
from datacredit.scores import Scores


def run(argv: list[str], capsys) -> tuple[int, str]:
    """``(exit status, stderr)`` of ``datacredit *argv`` run in this process."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors exit from inside parse_args
        code = exc.code
    return code, capsys.readouterr().err


def one_line_error(argv: list[str], capsys, *expected: str) -> str:
    code, err = run(argv, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return path


@pytest.fixture
def scores_dir(tmp_path):
    path = tmp_path / "scores"
    Scores(np.ones((3, 1)), np.arange(3), np.array([0]), "grad-dot").save(path)
    return path


GT = ["groundtruth", "--case", "digits-lr", "--no-progress"]


@pytest.mark.parametrize(("args", "expected"), [
    (["--m", "2"], "argument --m: must be at least 3, got 2"),
    (["--m", "many"], "argument --m: expected an integer, got 'many'"),
    (["--workers", "0"], "argument --workers: must be at least 1, got 0"),
    (["--seeds", "0"], "argument --seeds: must be at least 1"),
    (["--alpha", "1.5"], "argument --alpha: must be strictly between 0 and 1"),
    (["--threads", "0"], "argument --threads: must be at least 1"),
    (["--backend", "slurm"], "argument --backend: invalid choice"),
    (["--case", "nope"], "unknown case(s)"),
])
def test_groundtruth_argument_mistakes(capsys, args, expected):
    one_line_error(GT + args, capsys, "datacredit groundtruth: error:", expected)


def test_groundtruth_out_that_is_a_file_or_holds_scores(capsys, tmp_path, a_file, scores_dir):
    root = ["--root", str(tmp_path / "cases")]
    one_line_error(GT + root + ["--out", str(a_file)], capsys, f"datacredit: error: --out {a_file}: is a file")
    one_line_error(GT + root + ["--out", str(scores_dir)], capsys,
                   f"datacredit: error: {scores_dir} holds a saved Scores result (method 'grad-dot')", "--overwrite")
    assert Scores.load(scores_dir).method == "grad-dot"  # untouched
    one_line_error(GT + root + ["--root", str(a_file)], capsys, "--root", "is a file")
    one_line_error(GT + root + ["--case", "digits-lr,fmnist-mlp", "--out", str(tmp_path / "x")], capsys,
                   "--out needs a single --case")


def test_groundtruth_store_with_other_settings_or_a_running_build(capsys, tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 2, generator=gen, dtype=torch.float64), torch.randn(12, generator=gen, dtype=torch.float64)
    other = tmp_path / "other"
    build_groundtruth(LeastSquaresRecipe(), ArrayDataset(x[:8], y[:8]), ArrayDataset(x[8:], y[8:]), other, m=3,
                      backend="serial", progress=False)
    root = ["--root", str(tmp_path / "cases"), "--m", "3", "--seeds", "1", "--workers", "1"]
    threads: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # --threads is honoured, not left on the floor
    one_line_error(GT + root + ["--out", str(other), "--threads", "3"], capsys,
                   f"datacredit: error: {other} holds results built with other settings (", "n_train: stored 8,",
                   "--overwrite")
    assert threads == [3]
    busy = tmp_path / "busy"
    with BuildLock(busy):  # as if another process were building there
        one_line_error(GT + root + ["--out", str(busy)], capsys, "a build is already running here",
                       f"held by pid {os.getpid()}")


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="Ray is installed")
def test_backend_ray_without_ray(capsys, tmp_path):
    one_line_error(GT + ["--root", str(tmp_path), "--backend", "ray"], capsys, "--backend ray needs Ray",
                   "pip install ray")


@pytest.mark.parametrize(("args", "expected"), [
    (["--memory-limit-gb", "-1"], "argument --memory-limit-gb: must be a positive number, got -1"),
    (["--memory-limit-gb", "nan"], "must be a positive number"),
    (["--timeout", "0"], "argument --timeout: must be a positive number"),
    (["--threads", "-2"], "argument --threads: must be at least 1"),
])
def test_bench_argument_mistakes(capsys, args, expected):
    one_line_error(["bench", "--case", "digits-lr"] + args, capsys, "datacredit bench: error:", expected)


def test_bench_needs_a_case_and_known_methods(capsys, tmp_path):
    one_line_error(["bench"], capsys, "--case is required")
    one_line_error(["bench", "--case", "digits-lr", "--root", str(tmp_path), "--methods", "grad-dot,nope"], capsys,
                   "--methods: unknown method(s) ['nope']", "grad-dot")


@pytest.mark.parametrize(("args", "expected"), [
    (["--queries", "0"], "argument --queries: must be at least 1, got 0"),
    (["--m", "2"], "argument --m: must be at least 3, got 2"),
    (["--workers", "0"], "argument --workers: must be at least 1"),
])
def test_demo_argument_mistakes(capsys, args, expected):
    one_line_error(["demo"] + args, capsys, "datacredit demo: error:", expected)


def test_demo_checks_before_training(capsys, tmp_path, a_file, monkeypatch):
    from datacredit.evaluate import ClassifierRecipe

    def no_training(*args, **kwargs):
        raise AssertionError("the demo trained before checking its arguments")

    monkeypatch.setattr(ClassifierRecipe, "train", no_training)
    one_line_error(["demo", "--out", str(a_file)], capsys, f"--out {a_file}: is a file")
    one_line_error(["demo", "--out", str(tmp_path / "run"), "--queries", "100000"], capsys,
                   "n_queries=100000, but the digits test split has")
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "gt").write_text("x")
    one_line_error(["demo", "--out", str(tmp_path / "run2")], capsys, "gt: is a file")


def test_report_mistakes_and_broken_parts(capsys, tmp_path):
    one_line_error(["report", str(tmp_path / "nope")], capsys, "datacredit: error:", "no such run directory")
    run_dir = tmp_path / "run"
    Scores(np.arange(6.0).reshape(3, 2), np.arange(3), np.array([0, 1]), "tracin").save(run_dir / "scores" / "tracin")
    (run_dir / "items.npz").write_bytes(b"PK\x03\x04 broken")
    (run_dir / "metrics.json").write_text("{")
    one_line_error(["report", str(run_dir), "-o", str(tmp_path)], capsys, "is a directory")
    (tmp_path / "f").write_text("x")
    one_line_error(["report", str(run_dir), "-o", str(tmp_path / "f" / "r.html")], capsys,
                   "datacredit: error: cannot write the report")
    code, err = run(["report", str(run_dir)], capsys)
    assert code == 0, err
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "items.npz could not be read and was skipped: BadZipFile" in html and ">Scores: tracin</h2>" in html


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_report", broken)  # looked up when the parser is built
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["report", "anywhere"])
