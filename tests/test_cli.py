"""The command line: report from a run directory, a clear error for a missing one, demo options."""

from __future__ import annotations

import numpy as np

from datacredit import Scores
from datacredit.cli import main
from datacredit.report import save_run


def test_report_command(tmp_path, capsys):
    scores = Scores(np.random.default_rng(0).normal(size=(6, 2)), np.arange(6), np.arange(2), "grad-dot", {})
    save_run(tmp_path / "run", scores={"grad-dot": scores}, metrics=[{"method": "grad-dot", "lds": 0.4, "time_s": 1}])
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.html").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
