"""``datacredit demo`` end to end at small sizes, with thresholds that a wrong sign or a broken method would fail."""

from __future__ import annotations

import numpy as np

from datacredit.cli import main
from datacredit.demo import run_demo


def test_demo_finds_flipped_labels_and_influence_beats_grad_dot(tmp_path):
    # Measured at these sizes (10 queries, m=8 halves, 1 worker), seeds 0 / 1 / 2:
    #   In-Run AUROC (low value = flipped) 0.711 / 0.759 / 0.782; Grad-Dot self-influence AUROC 0.996 / 0.997 / 0.997;
    #   LDS influence-ekfac 0.638 / 0.605 / 0.629 vs grad-dot 0.300 / 0.202 / 0.376;
    #   test accuracy 0.967 / 0.964 / 0.955.
    result = run_demo(tmp_path / "run", n_queries=10, m=8, workers=1, seed=0, progress=False)
    assert result.report.is_file() and result.report.stat().st_size > 10_000
    assert result.accuracy > 0.9
    assert result.detection["In-Run Shapley (low value)"]["auroc"] > 0.6  # chance is 0.5; a flipped sign gives < 0.4
    assert result.detection["Grad-Dot self-influence (high)"]["auroc"] > 0.9
    assert set(result.lds) == {"grad-dot", "grad-cos", "influence-ekfac", "trak"}
    assert all(np.isfinite(v) for v in result.lds.values())
    assert result.lds["influence-ekfac"] > 0.4
    assert result.lds["influence-ekfac"] > result.lds["grad-dot"] + 0.1


def test_demo_command_reuses_the_cached_ground_truth(tmp_path, capsys):
    """A second run of the command finds the first run's ground truth (no retraining) and writes the report."""
    out = tmp_path / "run"
    run_demo(out, n_queries=3, m=3, workers=1, seed=1, progress=False)
    built = (out / "gt" / "outputs.npy").stat().st_mtime_ns
    assert main(["demo", "--out", str(out), "--queries", "3", "--m", "3", "--workers", "1", "--seed", "1",
                 "--no-progress"]) == 0
    assert (out / "gt" / "outputs.npy").stat().st_mtime_ns == built
    assert "report:" in capsys.readouterr().out and (out / "report.html").is_file()
