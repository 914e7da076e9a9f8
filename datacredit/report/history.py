"""In-Run Shapley value over training steps: how the highest- and lowest-valued examples earned their value.

``InRunShapley(..., keep_history=True).history`` is a list of ``(step, ids (B,), values (B, Q))``; on disk the same
thing is three flat arrays, one row per (step, example): ``steps (M,)``, ``ids (M,)``, ``values (M, Q)``.
:func:`history_arrays` converts the first into the second. Values add over steps, so an example's curve is the
running sum of its per-step values and its end point is its In-Run value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .markup import note, plot, signed, table
from .plots import cumulative_plot

__all__ = ["history_arrays", "history_section"]


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def history_arrays(history: Sequence[tuple[int, Any, Any]] | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{"steps": (M,) int64, "ids": (M,) int64, "values": (M, Q) float64}`` from a list of
    ``(step, ids (B,), values (B,) or (B, Q))`` or from a mapping that already has those three arrays."""
    if isinstance(history, Mapping) or hasattr(history, "files"):  # dict or np.load(...) of an .npz
        missing = [key for key in ("steps", "ids", "values") if key not in history]
        if missing:
            raise DataError(f"history arrays lack {missing}; need steps (M,), ids (M,), values (M,) or (M, Q)")
        steps, ids, values = (_np(history[key]) for key in ("steps", "ids", "values"))
    else:
        history = list(history)
        if not history:
            raise DataError("the history is empty (was InRunShapley created with keep_history=True?)")
        parts = []
        for n, entry in enumerate(history):
            if len(entry) != 3:
                raise DataError(f"history[{n}] must be (step, ids, values), got {len(entry)} items")
            step, b_ids, b_values = int(entry[0]), _np(entry[1]).reshape(-1), _np(entry[2])
            b_values = b_values.reshape(len(b_ids), -1)
            parts.append((np.full(len(b_ids), step), b_ids, b_values))
        widths = {p[2].shape[1] for p in parts}
        if len(widths) != 1:
            raise DataError(f"history entries have different numbers of validation columns: {sorted(widths)}")
        steps, ids, values = (np.concatenate([p[k] for p in parts]) for k in range(3))
    values = values.reshape(len(values), -1) if values.ndim != 2 else values
    if not (steps.ndim == ids.ndim == 1 and len(steps) == len(ids) == len(values)):
        raise DataError(f"history arrays disagree: steps {steps.shape}, ids {ids.shape}, values {values.shape}")
    return {"steps": steps.astype(np.int64), "ids": ids.astype(np.int64), "values": values.astype(np.float64)}


def _curve(steps: np.ndarray, values: np.ndarray, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(steps, kind="stable")
    x = np.concatenate([[first], steps[order], [last]])
    running = np.cumsum(values[order])
    y = np.concatenate([[0.0], running, running[-1:]])
    return x, y


def history_section(history: Any, top: int = 5) -> str:
    """Running In-Run value over steps for the ``top`` highest and ``top`` lowest examples by final value."""
    arrays = history_arrays(history)
    steps, ids, per_q = arrays["steps"], arrays["ids"], arrays["values"]
    if not len(steps):
        return note("the history has no rows")
    values = per_q.sum(axis=1)
    uniq, inverse = np.unique(ids, return_inverse=True)
    final = np.bincount(inverse, weights=values, minlength=len(uniq))
    seen = np.bincount(inverse, minlength=len(uniq))
    order = np.argsort(-final, kind="stable")
    top = max(1, min(int(top), len(uniq)))
    high = order[:top]
    low = [i for i in order[::-1][:top] if i not in set(high.tolist())]
    first, last = int(steps.min()), int(steps.max())

    def curves(rows: Sequence[int]) -> list[tuple[str, np.ndarray, np.ndarray]]:
        out = []
        for r in rows:
            mask = inverse == r
            x, y = _curve(steps[mask], values[mask], first, last)
            out.append((f"id {int(uniq[r])}", x, y))
        return out

    panels = [("highest final value", curves(high))]
    if low:
        panels.append(("lowest final value", curves(low)))
    parts = []
    if per_q.shape[1] > 1:
        parts.append(f'<p class="muted">Values are summed over the {per_q.shape[1]} validation columns.</p>')
    parts.append(f'<p class="muted">{len(uniq)} examples over steps {first}–{last}; each curve is the running sum '
                 "of one example's per-step values (it moves only at the steps whose batch held the example).</p>")
    parts.append(plot(cumulative_plot(panels, "training step", "cumulative In-Run value"),
                     "cumulative In-Run value of the highest and lowest examples"))
    rows = [(int(uniq[r]), signed(final[r]), int(seen[r])) for r in [*high, *low]]
    parts.append(table(["id", "final value", "steps in a batch"], rows, raw=[False, True, False]))
    return "".join(parts)
