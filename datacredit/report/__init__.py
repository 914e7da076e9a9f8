"""Static HTML report: one self-contained file (inline CSS, inline PNG plots, no script, no network).

``Report`` builds one section at a time (values, In-Run history, proponent/opponent gallery, mislabel candidates,
methods table, LDS vs time, text; ``Display`` says how examples are drawn); ``render_report`` builds one from a run
directory (layout in :mod:`datacredit.report.run`), which ``save_run`` writes. All user-provided text is HTML-escaped.
"""

from .builder import Report
from .examples import Display, Examples, as_examples
from .history import history_arrays
from .run import render_report, save_run

__all__ = ["Display", "Examples", "Report", "as_examples", "history_arrays", "render_report", "save_run"]
