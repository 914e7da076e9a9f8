"""``Report``: sections added one call at a time, rendered to one self-contained HTML file.

::

    report = Report("digits: who helped whom")
    report.add_values(inrun.values(), name="In-Run Shapley")
    report.add_history(inrun.history)
    report.add_gallery(scores, train, queries, k=3, display=Display("image", image_shape=(8, 8)))
    report.add_mislabel_candidates(inrun.values(), items=train, flipped_ids=flipped, higher_is_suspicious=False)
    report.add_table(metric_rows, "Methods")
    report.add_lds_vs_time(metric_rows)
    report.write("runs/demo/report.html")

The file holds its CSS and every image (base64 PNGs); it loads nothing from the network and runs no script.
Sections are rendered when added, so a bad argument fails at the ``add_*`` call that passed it, and ``write``
replaces the file atomically: a reader sees the old report or the new one, never half of one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..scores import Scores
from ..store import atomic_write_bytes
from .examples import Display
from .gallery import gallery_section, mislabel_section
from .history import history_section
from .markup import note, page
from .sections import lds_time_section, table_section, text_section, values_section

__all__ = ["Report"]

CONVENTION = ("Sign convention: a positive score means the training example helps (training on it lowers the "
              "query's loss, or the validation loss for In-Run Shapley); a negative score means it hurts.")


class Report:
    """A static HTML report. Every ``add_*`` method appends a section and returns the report (calls chain)."""

    def __init__(self, title: str, subtitle: str | None = None) -> None:
        self.title, self.subtitle = str(title), subtitle
        self.sections: list[tuple[str, str, str]] = []  # (anchor, title, body html)

    def _add(self, title: str, body: str) -> Report:
        slug = re.sub(r"[^a-z0-9]+", "-", str(title).lower()).strip("-")[:40] or "section"
        self.sections.append((f"s{len(self.sections) + 1}-{slug}", str(title), body))
        return self

    def add_text(self, text: str, title: str = "Notes") -> Report:
        """Paragraphs of plain text (blank lines separate them); nothing in it is interpreted as markup."""
        return self._add(title, text_section(text))

    def add_notes(self, notes: Sequence[str], title: str = "Notes") -> Report:
        """Highlighted one-line notes (things skipped, warnings); plain text, escaped."""
        return self._add(title, "".join(note(str(n)) for n in notes))

    def add_values(self, values: Any, *, name: str = "values", k: int = 10, title: str | None = None,
                   higher_is_suspicious: bool = False) -> Report:
        """Histogram and top/bottom ``k`` of per-example values: a one-column Scores (In-Run Shapley values,
        self-scores), a Scores with several queries (mean over queries), a pair ``(ids, vector)``, or a vector
        ``(n,)`` (ids = positions). ``higher_is_suspicious=True`` for a suspicion score (self-influence): its ends
        are not "helped"/"hurt"."""
        return self._add(title or f"Values: {name}", values_section(values, name, k, higher_is_suspicious))

    def add_history(self, history: Any, *, top: int = 5, title: str = "In-Run value over training") -> Report:
        """Running In-Run Shapley value over steps of the ``top`` highest and lowest examples. ``history`` is
        ``InRunShapley.history`` (``[(step, ids (B,), values (B, Q))]``) or arrays ``steps``/``ids``/``values``."""
        return self._add(title, history_section(history, top))

    def add_gallery(self, scores: Scores, train_items: Any, query_items: Any, k: int = 3, *,
                    display: Display | None = None, max_queries: int | None = 8, flipped_ids: Any = None,
                    title: str | None = None) -> Report:
        """Per query, its ``k`` top proponents and opponents with their scores. Items are an ``Examples``, an
        ``ArrayDataset``/``CharDataset`` or a mapping ``{id: item}``, drawn as ``display`` says (default
        ``Display()``: 8×8 grayscale images; ``Display("text")`` for text)."""
        body = gallery_section(scores, train_items, query_items, k, display or Display(), max_queries, flipped_ids)
        return self._add(title or f"Proponents and opponents: {scores.method}", body)

    def add_mislabel_candidates(self, values: Any, items: Any = None, *, higher_is_suspicious: bool,
                                labels: Any = None, flipped_ids: Any = None, k: int = 20,
                                display: Display | None = None, title: str = "Mislabel candidates") -> Report:
        """The ``k`` most suspicious examples: lowest values when ``higher_is_suspicious=False`` (In-Run Shapley),
        highest when True (self-influence). ``values`` as for :meth:`add_values`; ``items`` drawn as ``display``
        says. Known-flipped ids are marked and, when given, scored (AUROC)."""
        body = mislabel_section(values, items, higher_is_suspicious=higher_is_suspicious, labels=labels,
                                flipped_ids=flipped_ids, k=k, display=display or Display())
        return self._add(title, body)

    def add_table(self, rows: Sequence[Mapping[str, Any]], title: str = "Methods") -> Report:
        """A table of dicts (e.g. one row per method: LDS, time, memory), one column per key."""
        return self._add(title, table_section(rows))

    def add_lds_vs_time(self, rows: Sequence[Mapping[str, Any]], *, x: str = "time_s", y: str = "lds",
                        label: str = "method", title: str = "LDS against time") -> Report:
        """Scatter of each row's ``y`` against ``x`` on a log axis; ``lds_ci_low``/``lds_ci_high`` give error bars
        and ``noise_ceiling`` a dashed reference line."""
        return self._add(title, lds_time_section(rows, x, y, label))

    def html(self) -> str:
        """The whole report as one HTML document."""
        from .._version import __version__

        convention = ("convention", "How to read the scores", f'<p class="convention">{CONVENTION}</p>')
        return page(self.title, self.subtitle, [convention, *self.sections],
                    f"datacredit {__version__} · self-contained report: no scripts, no network")

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Render and write the report to ``path`` atomically (parents created); returns the path."""
        path = Path(path)
        # render fully before touching the file; a lone surrogate (from JSON "\\ud800", or a file name that is not
        # UTF-8) cannot be encoded, and is shown as "?" rather than failing the whole report
        data = self.html().encode("utf-8", errors="replace")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        return path
