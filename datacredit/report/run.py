"""A run directory: what ``datacredit report RUN_DIR`` reads (``render_report``) and ``save_run`` writes.

Layout (every part optional; a missing part is skipped with a note in the report)::

    RUN_DIR/
      run.json            {"title": str, "notes": str, "kind": "image" | "text", "image_shape": [8, 8],
                           "suspicious": {"<values name>": "low" | "high"}, "gallery_k": 3, "max_queries": 8}
                          every key optional; "suspicious" says which end of each values/<name> flags likely
                          mislabelled examples (default "low": In-Run Shapley and other positive = helped values;
                          use "high" for self-influence)
      metrics.json        [{"method": str, "lds": float, "time_s": float, ...}, ...] one row per method
                          (optional keys "lds_ci_low", "lds_ci_high", "noise_ceiling" and any others shown as
                          columns) -> the methods table and the LDS-vs-time plot
      values/<name>/      a saved one-column Scores (``Scores.save``) of per-example values, e.g. In-Run Shapley
                          or self-influence -> histogram, top/bottom tables, mislabel candidates
      scores/<method>/    a saved Scores (n_train, n_query) -> histogram of mean score per example and the
                          proponent/opponent gallery
      inrun_history.npz   steps (M,) int, ids (M,) int, values (M, Q) float: one row per (step, example), as
                          ``history_arrays(InRunShapley.history)`` -> In-Run value over training
      items.npz           train_ids (n,), train_data, [train_labels (n,)], [query_ids (m,), query_data,
                          query_labels (m,)], [flipped_ids (f,)]; data is (n, *image_shape) numbers for kind
                          "image" or (n,) unicode strings for kind "text" -> pictures in the gallery and the
                          mislabel table, known flips marked

Sections appear in this order: notes, methods table, LDS vs time, values, In-Run history, mislabel candidates,
galleries. All ``.npz`` files are read with ``allow_pickle=False``. A missing ``RUN_DIR``, or one holding none of
these parts, raises ``StoreError``. Anything else wrong is skipped with a note naming the error, and the rest is
rendered: an unreadable part (corrupt JSON, a bad zip or ``.npy``, a bad dtype, missing keys, a broken manifest), a
section that cannot be drawn from what was read, an invalid ``run.json`` setting (its default is used instead).
Strings holding lone surrogates (which UTF-8 cannot encode) are shown with U+FFFD in their place.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataCreditError, DataError, StoreError
from ..scores import Scores
from ..store import atomic_write_bytes, atomic_write_json
from .builder import Report
from .examples import Display, Examples, check_kind
from .history import history_arrays

__all__ = ["render_report", "save_run"]

logger = logging.getLogger(__name__)

PARTS = ("run.json", "metrics.json", "values", "scores", "inrun_history.npz", "items.npz")
_SUSPICIOUS = ("low", "high")
# A part of a run directory is data from anywhere (a crashed writer, a hand edit, another tool), and the report
# promises to skip what it cannot read rather than fail: so reading and drawing a part catch every Exception, each
# noted in the report by type and message and logged (one line; the traceback at DEBUG level, to find a bug).
_UNREADABLE = Exception


def _clean(obj: Any) -> Any:
    """``obj`` (parsed JSON, a name) with lone surrogates in its strings replaced by U+FFFD (UTF-8 cannot encode
    them, and the plots cannot draw them)."""
    if isinstance(obj, str):
        return obj.encode("utf-8", "surrogatepass").decode("utf-8", "replace") if _has_surrogate(obj) else obj
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, dict):
        return {_clean(k): _clean(v) for k, v in obj.items()}
    return obj


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _why(exc: BaseException) -> str:
    return _clean(f"{type(exc).__name__}: {exc}" if not isinstance(exc, DataCreditError) else str(exc))


def _skipping(what: str | Path, exc: BaseException) -> str:
    """Log that ``what`` is skipped because of ``exc``; returns the reason for the report's note."""
    why = _why(exc)
    logger.warning("skipping %s: %s", what, why)
    logger.debug("why %s was skipped", what, exc_info=exc)
    return why


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _as_values_scores(name: str, values: Any) -> Scores:
    if isinstance(values, Scores):
        return values
    ids, vec = values
    vec = np.asarray(vec, dtype=np.float64).reshape(-1, 1)
    return Scores(vec, np.asarray(ids), np.array([-1]), method=name)


def _item_arrays(prefix: str, items: Examples) -> dict[str, np.ndarray]:
    data = np.asarray(items.data, dtype=str) if items.kind == "text" else np.asarray(items.data)
    if data.dtype.hasobject:
        raise DataError(f"{prefix} items cannot be stored: object arrays would need pickle")
    out = {f"{prefix}_ids": items.ids, f"{prefix}_data": data}
    if items.labels is not None:
        out[f"{prefix}_labels"] = np.asarray(items.labels)
    return out


def save_run(run_dir: str | os.PathLike[str], *, scores: Mapping[str, Scores] | None = None,
             values: Mapping[str, Any] | None = None, metrics: Sequence[Mapping[str, Any]] | None = None,
             history: Any = None, train_items: Examples | None = None, query_items: Examples | None = None,
             flipped_ids: Any = None, run: Mapping[str, Any] | None = None) -> Path:
    """Write the parts given into ``run_dir`` in the layout of this module (each file atomically).

    ``scores``: ``{method: Scores}``; ``values``: ``{name: Scores (n, 1) | (ids, vector)}``; ``metrics``: rows;
    ``history``: ``InRunShapley.history`` or its arrays; items: :class:`Examples` (build them with
    ``as_examples``); ``run``: the ``run.json`` settings. Returns ``run_dir``.
    """
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    if run is not None:
        atomic_write_json(root / "run.json", dict(run))
    if metrics is not None:
        atomic_write_json(root / "metrics.json", [dict(row) for row in metrics])
    for folder, entries in (("scores", scores or {}), ("values", values or {})):
        for name, item in entries.items():
            _check_name(name)
            target = item if folder == "scores" else _as_values_scores(name, item)
            target.save(root / folder / name)
    if history is not None:
        atomic_write_bytes(root / "inrun_history.npz", _npz_bytes(history_arrays(history)))
    arrays: dict[str, np.ndarray] = {}
    if train_items is not None:
        arrays.update(_item_arrays("train", train_items))
    if query_items is not None:
        arrays.update(_item_arrays("query", query_items))
    if flipped_ids is not None:
        arrays["flipped_ids"] = np.asarray(flipped_ids, dtype=np.int64).reshape(-1)
    if arrays:
        atomic_write_bytes(root / "items.npz", _npz_bytes(arrays))
    return root


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise DataError(f"{name!r} cannot be a directory name in a run directory")


def _load_items(path: Path, kind: str) -> tuple[Examples | None, Examples | None, np.ndarray | None]:
    with np.load(path, allow_pickle=False) as z:
        files = dict(z.items())

    def examples(prefix: str) -> Examples | None:
        if f"{prefix}_ids" not in files or f"{prefix}_data" not in files:
            return None
        return Examples(files[f"{prefix}_ids"], files[f"{prefix}_data"], files.get(f"{prefix}_labels"), kind)

    return examples("train"), examples("query"), files.get("flipped_ids")


def _scores_dirs(root: Path, folder: str, notes: list[str]) -> dict[str, Scores]:
    out: dict[str, Scores] = {}
    base = root / folder
    if not base.is_dir():
        return out
    for sub in sorted(p for p in base.iterdir() if p.is_dir()):
        name = _clean(sub.name)
        try:
            out[name] = Scores.load(sub, mmap=True)
        except _UNREADABLE as exc:
            notes.append(f"{folder}/{name} could not be read and was skipped: {_skipping(sub, exc)}")
    return out


# run.json settings: (check, default); a value failing its check is noted and replaced by the default
_SETTINGS: dict[str, tuple[Callable[[Any], bool], Any]] = {
    "title": (lambda v: isinstance(v, str), None),
    "notes": (lambda v: isinstance(v, str), None),
    "kind": (lambda v: v in ("image", "text"), "image"),
    "image_shape": (lambda v: isinstance(v, list) and 1 <= len(v) <= 3
                    and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v), [8, 8]),
    "gallery_k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, 3),
    "max_queries": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1), 8),
    "suspicious": (lambda v: isinstance(v, dict) and all(e in _SUSPICIOUS for e in v.values()), {}),
}


def _settings(run: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """``run.json`` with every known setting valid: an invalid one is noted and its default used."""
    out = dict(run)
    for key, (valid, default) in _SETTINGS.items():
        if key in out and not valid(out[key]):
            notes.append(f"run.json: invalid {key!r} ({out[key]!r}) ignored; using {default!r}")
            out[key] = default
    return out


class _Parts:
    """What a run directory holds, each part loaded or None, with notes for what is missing or broken."""

    def __init__(self, root: Path) -> None:
        self.notes: list[str] = []
        self.run = _settings(self._json(root / "run.json", dict) or {}, self.notes)
        self.kind = check_kind(str(self.run.get("kind", "image")))
        self.metrics = self._json(root / "metrics.json", list)
        self.values = _scores_dirs(root, "values", self.notes)
        self.scores = _scores_dirs(root, "scores", self.notes)
        self.history = self._npz(root / "inrun_history.npz", lambda p: dict(np.load(p, allow_pickle=False)))
        items = self._npz(root / "items.npz", lambda p: _load_items(p, self.kind))
        self.train, self.queries, self.flipped = items if items is not None else (None, None, None)

    def _json(self, path: Path, kind: type) -> Any:
        if not path.is_file():
            return None
        try:
            obj = _clean(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            self.notes.append(f"{path.name} could not be read and was skipped: {_why(exc)}")
            return None
        if not isinstance(obj, kind):
            self.notes.append(f"{path.name} should hold a JSON {kind.__name__}, holds a {type(obj).__name__}")
            return None
        return obj

    def _npz(self, path: Path, load: Any) -> Any:
        if not path.is_file():
            return None
        try:
            return load(path)
        except _UNREADABLE as exc:  # BadZipFile, a TokenError from a mangled .npy header, missing keys, ...
            self.notes.append(f"{path.name} could not be read and was skipped: {_skipping(path, exc)}")
            return None


def _suspicious(run: Mapping[str, Any], name: str) -> bool:
    return run.get("suspicious", {}).get(name, "low") == "high"  # checked by _settings


def _there(path: Path) -> bool:
    """Whether a part is on disk (a folder counts when it holds a subfolder, as ``_scores_dirs`` reads them)."""
    if path.is_dir():
        return any(p.is_dir() for p in path.iterdir())
    return path.exists()


class _Sections:
    """Adds sections to a report; one that cannot be drawn from what was read is skipped with a note."""

    def __init__(self, report: Report, notes: list[str]) -> None:
        self.report, self.notes = report, notes

    def add(self, what: str, draw: Callable[[], Any]) -> None:
        try:
            draw()  # a section is appended only once fully rendered, so a failure leaves no half section
        except _UNREADABLE as exc:
            self.notes.append(f"{what}: could not be drawn and was skipped: {_skipping(what, exc)}")


def render_report(run_dir: str | os.PathLike[str], out_path: str | os.PathLike[str] | None = None) -> Path:
    """Build the HTML report of ``run_dir`` (layout in this module's docstring) and write it atomically to
    ``out_path`` (default ``run_dir/report.html``). Returns the path written."""
    root = Path(run_dir)
    if not root.is_dir():
        raise StoreError(f"{root}: no such run directory (expected a folder holding some of {', '.join(PARTS)})")
    if not any((root / part).exists() for part in PARTS):
        raise StoreError(f"{root}: not a run directory; it holds none of {', '.join(PARTS)}")
    parts = _Parts(root)
    run = parts.run
    title = run.get("title") or f"datacredit report: {_clean(root.resolve().name)}"
    report = Report(title, _clean(f"run directory {root}"))
    display = Display(parts.kind, tuple(run.get("image_shape", (8, 8))))
    # a part that is there but could not be read already has its note
    skipped = [f"{part}: not present, its section is skipped" for part, present in (
        ("metrics.json", parts.metrics is not None), ("values/", bool(parts.values)),
        ("inrun_history.npz", parts.history is not None), ("scores/", bool(parts.scores)),
        ("items.npz", parts.train is not None)) if not present and not _there(root / part)]
    if parts.scores and parts.train is not None and parts.queries is None:
        skipped.append("items.npz holds no query_ids/query_data: the galleries are skipped")
    if run.get("notes"):
        report.add_text(run["notes"])
    notes_at = len(report.sections)  # the notes go here, once every section has had its chance to fail
    drawn: list[str] = []
    sections = _Sections(report, drawn)
    if parts.metrics:
        sections.add("metrics.json (methods table)", lambda: report.add_table(parts.metrics, "Methods"))
        sections.add("metrics.json (LDS against time)", lambda: report.add_lds_vs_time(parts.metrics))
    for name, values in parts.values.items():
        sections.add(f"values/{name}", lambda values=values, name=name: report.add_values(
            values, name=name, higher_is_suspicious=_suspicious(run, name)))
    if parts.history is not None:
        sections.add("inrun_history.npz", lambda: report.add_history(parts.history))
    for name, values in parts.values.items():
        sections.add(f"values/{name} (mislabel candidates)", lambda values=values, name=name: (
            report.add_mislabel_candidates(values, items=parts.train, flipped_ids=parts.flipped, display=display,
                                           higher_is_suspicious=_suspicious(run, name),
                                           title=f"Mislabel candidates: {name}")))
    for name, scores in parts.scores.items():
        sections.add(f"scores/{name}", lambda scores=scores, name=name: (
            report.add_values(scores, name=name, title=f"Scores: {name}")))
        if parts.train is not None and parts.queries is not None:
            sections.add(f"scores/{name} (gallery)", lambda scores=scores: report.add_gallery(
                scores, parts.train, parts.queries, k=run.get("gallery_k", 3), display=display,
                max_queries=run.get("max_queries", 8), flipped_ids=parts.flipped))
    notes = parts.notes + drawn + skipped
    if notes:
        report.add_notes(notes, "What this run holds")
        report.sections.insert(notes_at, report.sections.pop())
    out = root / "report.html" if out_path is None else Path(out_path)
    return report.write(out)
