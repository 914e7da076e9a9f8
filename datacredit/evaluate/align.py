"""Matching scores to ground truth by example id, never by position."""

from __future__ import annotations

import numpy as np

from ..errors import DataError

__all__ = ["positions", "same_ids"]

_SHOWN = 10


def positions(wanted: np.ndarray, available: np.ndarray, what: str) -> np.ndarray:
    """Positions in ``available`` of each id in ``wanted``: ``(len(wanted),)`` int64.

    Raises DataError naming (up to 10 of) the ids of ``wanted`` that ``available`` lacks.
    """
    wanted = np.asarray(wanted, dtype=np.int64).reshape(-1)
    available = np.asarray(available, dtype=np.int64).reshape(-1)
    order = np.argsort(available, kind="stable")
    at = np.searchsorted(available[order], wanted).clip(0, max(len(available) - 1, 0))
    found = available[order][at] == wanted if len(available) else np.zeros(len(wanted), dtype=bool)
    if not found.all():
        missing = wanted[~found]
        more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        raise DataError(f"{what}: {len(missing)} ids missing: {missing[:_SHOWN].tolist()}{more}")
    return order[at]


def same_ids(reference: np.ndarray, other: np.ndarray, what: str, other_name: str) -> np.ndarray:
    """Positions in ``other`` of every id of ``reference``, requiring the two id sets to be equal.

    Raises DataError naming ids of ``reference`` missing from ``other`` or extra ids in ``other``.
    """
    rows = positions(reference, other, f"{what}: ids of the ground truth not in {other_name}")
    if len(other) != len(reference):
        extra = np.setdiff1d(other, reference)
        more = f" and {len(extra) - _SHOWN} more" if len(extra) > _SHOWN else ""
        raise DataError(f"{what}: {len(extra)} ids in {other_name} but not in the ground truth: "
                        f"{extra[:_SHOWN].tolist()}{more}")
    return rows
