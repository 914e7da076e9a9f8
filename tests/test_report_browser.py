"""The report in a real browser: headless Chromium (Debian's ``chromium`` package) renders it and takes a screenshot.

Skipped where Chromium is absent; ``make test-browser`` installs it and runs this file.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from .test_report import EVIL, full_report

TIMEOUT_S = 180
POS_GREEN = np.array([0x1A, 0x7F, 0x37]) / 255  # histogram bars of positive values (datacredit.report.plots.POS)


def chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.skip("headless Chromium not found: install Debian's chromium package: make test-browser")
    return path


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Chromium headless, isolated from the network and from any user profile."""
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def test_report_renders_in_headless_chromium(tmp_path):
    binary = chromium()
    report = full_report(title=f"browser test {EVIL}").write(tmp_path / "report.html")
    url = report.resolve().as_uri()

    shot = tmp_path / "shot.png"
    done = run_chromium(binary, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2000", url)
    assert shot.is_file() and shot.stat().st_size > 0, f"no screenshot (rc {done.returncode}): {done.stderr[-2000:]}"

    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]  # (2000, 1200, 3) floats in [0, 1]
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 0.05, "the screenshot is blank"
    green = np.abs(pixels - POS_GREEN).max(axis=-1) < 0.08
    assert green.sum() > 200, "no histogram bars visible: the inline PNG plots did not render"

    dom = run_chromium(binary, tmp_path / "profile", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "In-Run value over training" in dom.stdout and "Proponents and opponents" in dom.stdout
    assert "&lt;script&gt;" in dom.stdout  # the injected title stayed text
    assert "<script" not in dom.stdout.lower()
