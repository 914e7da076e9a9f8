"""The report's plots as PNG bytes, drawn with matplotlib's object API on the Agg canvas.

No ``pyplot``: figures are plain ``matplotlib.figure.Figure`` objects rendered by ``FigureCanvasAgg``, so nothing
global (backend, open-figure registry, rcParams) is touched and it works without a display. Labels that come from a
caller are drawn with ``parse_math=False`` so a ``$`` in a method name is text, not mathtext.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import DataError

__all__ = ["cumulative_plot", "histogram", "scatter_log_x"]

POS, NEG, INK = "#1a7f37", "#cf222e", "#0969da"


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise DataError("the HTML report draws its plots with matplotlib: pip install 'datacredit[report]'") from exc
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    """PNG at twice the layout resolution (sharp on high-density screens; shown at half size, see markup.img)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=2 * fig.dpi, metadata={"Software": None})
    return buf.getvalue()


def _style(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)


def histogram(values: np.ndarray, xlabel: str, bins: int = 50) -> bytes:
    """Histogram of finite ``values`` ``(n,)``, bars coloured by sign, a line at zero."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    fig = _figure(7.0, 2.8)
    ax = fig.add_subplot()
    _style(ax)
    if v.size:
        counts, edges = np.histogram(v, bins=bins if np.ptp(v) > 0 else 1)
        centers = (edges[:-1] + edges[1:]) / 2
        colors = [POS if c > 0 else NEG if c < 0 else "#888888" for c in centers]
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=colors, alpha=0.85, linewidth=0)
        ax.axvline(0.0, color="#333333", linewidth=1)
    ax.set_xlabel(xlabel, parse_math=False)
    ax.set_ylabel("examples")
    return _png(fig)


def cumulative_plot(panels: Sequence[tuple[str, Sequence[tuple[str, np.ndarray, np.ndarray]]]], xlabel: str,
                    ylabel: str) -> bytes:
    """Side-by-side panels of step curves. ``panels`` are ``(title, [(label, x (k,), y (k,)), ...])``."""
    fig = _figure(10.0, 3.4)
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, (title, curves) in zip(axes, panels):
        _style(ax)
        for label, x, y in curves:
            ax.plot(x, y, drawstyle="steps-post", linewidth=1.6, label=label)
        ax.axhline(0.0, color="#333333", linewidth=0.8)
        ax.set_title(title, fontsize=11, parse_math=False)
        ax.set_xlabel(xlabel, parse_math=False)
        ax.set_ylabel(ylabel, parse_math=False)
        if curves:
            legend = ax.legend(fontsize=8, frameon=False, loc="best")
            for text in legend.get_texts():
                text.set_parse_math(False)
    return _png(fig)


def scatter_log_x(points: Sequence[tuple[str, float, float, float | None, float | None]], xlabel: str, ylabel: str,
                  hline: tuple[str, float] | None = None) -> bytes:
    """Labelled scatter on a log x axis. ``points`` are ``(label, x > 0, y, y_low | None, y_high | None)``;
    ``hline`` is an optional ``(label, y)`` reference line (e.g. the ground truth's noise ceiling)."""
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    _style(ax)
    for label, x, y, lo, hi in points:
        if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
            ax.errorbar([x], [y], yerr=[[max(y - lo, 0.0)], [max(hi - y, 0.0)]], fmt="none", ecolor="#8c959f",
                        elinewidth=1, capsize=3)
        ax.scatter([x], [y], s=46, color=INK, zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=9, parse_math=False)
    if hline is not None:
        ax.axhline(hline[1], color=NEG, linestyle="--", linewidth=1)
        ax.annotate(hline[0], (0.01, hline[1]), xycoords=("axes fraction", "data"), textcoords="offset points",
                    xytext=(0, 4), fontsize=8, color=NEG, parse_math=False)
    ax.set_xscale("log")
    if points:
        xs = [p[1] for p in points]
        ax.set_xlim(min(xs) / 2.0, max(xs) * 4.0)  # room for the labels on the right
    ax.set_xlabel(xlabel, parse_math=False)
    ax.set_ylabel(ylabel, parse_math=False)
    return _png(fig)
