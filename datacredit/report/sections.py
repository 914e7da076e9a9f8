"""Report sections about numbers: value histograms with top/bottom tables, free tables, LDS vs time, paragraphs.

Each function returns the HTML body of one section (its title is added by :class:`~datacredit.report.Report`);
everything from the caller is escaped here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..scores import Scores
from .markup import details_json, esc, fmt, note, plot, signed, table
from .plots import histogram, scatter_log_x

__all__ = ["lds_time_section", "per_example", "table_section", "text_section", "values_section"]

_ROWS = 1 << 14  # rows of a Scores matrix read at a time


def per_example(values: Any) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    """One value per example: ``(values (n,), ids (n,), what the value is, notes)``.

    ``values``: a one-column Scores (its column), a Scores with several queries (the mean over queries), a pair
    ``(ids, vector)`` (the form ``save_run`` takes), or a bare vector ``(n,)`` / ``(n, 1)`` (ids = positions, with
    a note saying so).
    """
    notes: list[str] = []
    ids: Any = None
    if isinstance(values, Scores):
        if values.n_query == 1:
            return values.column(0).astype(np.float64), values.train_ids, "value", notes
        mean = np.empty(values.n_train)
        for start in range(0, values.n_train, _ROWS):  # in row blocks: the matrix may be a large memmap
            block = np.asarray(values.values[start:start + _ROWS], dtype=np.float64)
            mean[start:start + _ROWS] = block.mean(axis=1)
        return mean, values.train_ids, f"mean score over {values.n_query} queries", notes
    if isinstance(values, tuple) and len(values) == 2 and np.ndim(values[0]) == 1 and np.ndim(values[1]) in (1, 2):
        ids, values = values
    vec = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if vec.ndim == 2 and vec.shape[1] == 1:
        vec = vec[:, 0]
    if vec.ndim != 1:
        raise DataError(f"values must be a Scores, an (ids, vector) pair or a vector (n,), got shape {vec.shape}")
    if ids is None:
        ids = np.arange(len(vec))
        notes.append("no ids given: the ids shown are positions 0..n-1")
    ids = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if ids.shape != vec.shape:
        raise DataError(f"{len(vec)} values but ids of shape {ids.shape}")
    return vec.astype(np.float64), ids.astype(np.int64), "value", notes


def _ranked(vec: np.ndarray, ids: np.ndarray, k: int, largest: bool) -> list[tuple[int, float]]:
    finite = np.flatnonzero(np.isfinite(vec))
    order = finite[np.argsort(-vec[finite] if largest else vec[finite], kind="stable")][:k]
    return [(int(ids[i]), float(vec[i])) for i in order]


def _rank_table(pairs: Sequence[tuple[int, float]]) -> str:
    return table(["rank", "id", "value"], [(r + 1, i, signed(v)) for r, (i, v) in enumerate(pairs)],
                 raw=[False, False, True])


def values_section(values: Any, name: str, k: int = 10, higher_is_suspicious: bool = False) -> str:
    """Histogram of per-example values, summary numbers, and the ``k`` highest and lowest examples.

    higher_is_suspicious: False for values signed as every score (positive = helped: In-Run Shapley, scores), whose
    ends are headed "helped most" / "hurt most"; True for a suspicion score (self-influence: large = likely
    mislabelled or atypical, not "helped"), whose ends are headed "most suspicious" / "least suspicious".
    ``values``: as :func:`per_example` takes them."""
    vec, ids, what, notes = per_example(values)
    if not len(vec):
        raise DataError(f"values {name!r} are empty")
    finite = vec[np.isfinite(vec)]
    if len(finite) < len(vec):
        notes.append(f"{len(vec) - len(finite)} non-finite values left out of the histogram and the rankings")
    parts = [note(n) for n in notes]
    if isinstance(values, Scores):
        parts.append(f'<p class="muted">method <b>{esc(values.method)}</b> · {esc(values.n_train)} training '
                     f"examples × {esc(values.n_query)} {'query' if values.n_query == 1 else 'queries'}</p>")
    if len(finite):
        stats = {"examples": len(vec), "mean": finite.mean(), "median": np.median(finite), "min": finite.min(),
                 "max": finite.max(),
                 "positive" if higher_is_suspicious else "positive (helped)": f"{100 * (finite > 0).mean():.1f} %"}
        parts.append(table(list(stats), [list(stats.values())]))
        parts.append(plot(histogram(finite, f"{name}: {what}"), f"histogram of {name}"))
    high, low = ("most suspicious", "least suspicious") if higher_is_suspicious else ("helped most", "hurt most")
    parts.append('<div class="row">'
                 f"<div><h3>Highest ({high})</h3>{_rank_table(_ranked(vec, ids, k, True))}</div>"
                 f"<div><h3>Lowest ({low})</h3>{_rank_table(_ranked(vec, ids, k, False))}</div></div>")
    if isinstance(values, Scores) and values.config:
        parts.append(details_json("method config", values.config))
    return "".join(parts)


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        if not isinstance(row, Mapping):
            raise DataError(f"table rows must be dicts, got a {type(row).__name__}")
        columns.update(dict.fromkeys(str(c) for c in row))
    return list(columns)


def table_section(rows: Sequence[Mapping[str, Any]]) -> str:
    """A table with one column per key (in order of first appearance); missing cells show as —."""
    rows = list(rows)
    if not rows:
        return note("no rows")
    columns = _columns(rows)
    return table(columns, [[row.get(c) for c in columns] for row in rows])


def _number(value: Any) -> float | None:
    if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    return None


def lds_time_section(rows: Sequence[Mapping[str, Any]], x: str = "time_s", y: str = "lds",
                     label: str = "method", ci: tuple[str, str] = ("lds_ci_low", "lds_ci_high"),
                     ceiling: str = "noise_ceiling") -> str:
    """Scatter of ``y`` against ``x`` (log scale) per row, labelled by ``label``, with the CI as error bars where
    rows have them and the ground truth's noise ceiling as a dashed line. Rows without a finite ``y`` and a
    positive ``x`` are listed as skipped."""
    points, skipped, ceilings = [], [], []
    for n, row in enumerate(rows):
        name = str(row.get(label, f"row {n}"))
        xv, yv = _number(row.get(x)), _number(row.get(y))
        if xv is None or yv is None or xv <= 0:
            skipped.append(name)
            continue
        points.append((name, xv, yv, _number(row.get(ci[0])), _number(row.get(ci[1]))))
        if _number(row.get(ceiling)) is not None:
            ceilings.append(float(row[ceiling]))
    parts = []
    if skipped:
        parts.append(note(f"left out (no finite {y} or no positive {x}): {', '.join(skipped)}"))
    if not points:
        return "".join(parts) + note(f"nothing to plot: no row has both {y} and {x}")
    hline = None
    if ceilings:
        level = float(np.median(ceilings))
        hline = (f"noise ceiling {fmt(level, 3)}", level)
    xlabel = "attribution time (s, log scale)" if x == "time_s" else f"{x} (log scale)"
    ylabel = "LDS" if y == "lds" else y
    parts.append(plot(scatter_log_x(points, xlabel, ylabel, hline), f"{y} against {x} per method"))
    parts.append('<p class="muted">Up and to the left is better: higher LDS for less time. '
                 + ("Error bars: confidence interval over queries. " if any(p[3] is not None for p in points) else "")
                 + ("Dashed line: the ground truth's seed-to-seed agreement, which caps any method's LDS."
                    if hline else "") + "</p>")
    return "".join(parts)


def text_section(text: str) -> str:
    """Plain paragraphs (blank lines separate them); no markup is interpreted."""
    paragraphs = [p.strip() for p in str(text).split("\n\n") if p.strip()]
    return "".join(f"<p>{esc(p)}</p>" for p in paragraphs)
