"""Sources of training data (owners, documents, domains, licences) and attribution rolled up to them.

A :class:`Sources` maps every training example id to one key per *level* (e.g. ``{"owner": [...], "licence": [...]}``).
:meth:`Sources.values` turns any per-example :class:`~datacredit.scores.Scores` (post-hoc scores, In-Run values) into
:class:`SourceValues`: one row per source, the sum of its members' scores.

Why the sum is the right source value for every method here:

* post-hoc methods (Grad-Dot, TracIn, influence, TRAK, SOURCE) are linear in the training examples' contributions, so
  the predicted effect of a source is the sum of its members' scores;
* In-Run Data Shapley with a source as *one player* of each step's game: the step utility is the second-order Taylor
  expansion ``U(S) = η⟨g_val, Σ_{z∈S} g_z⟩ − (η²/2) (Σ_{z∈S} g_z)ᵀ H (Σ_{z∈S} g_z)``, a quadratic polynomial in the
  players' indicators. Shapley values split each pairwise term ``g_iᵀHg_j`` equally between i and j, so a source
  receives all of its internal pairs and half of each pair with an outsider: exactly the sum of its members'
  example-level values. The same holds for the first-order game (linear) and with a diagonal preconditioner. This is
  checked by exhaustive enumeration over coalitions of sources in ``tests/test_sources.py``.

What the source-as-player game does change is *duplication*: a copy of a source placed as a second player in the same
step shares the negative curvature term with the original, so the pair receives less than twice the original value
under the second-order game, and exactly twice under the first-order game (also tested).

Uncertainty: :meth:`SourceValues.bootstrap` resamples queries (columns) with replacement; pass the scores of several
ensemble members or seeds to :func:`across_members` for the spread between them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from datacredit.errors import DataError

if TYPE_CHECKING:  # scores.py imports this module: Scores is needed here for annotations only
    from datacredit.scores import Scores

__all__ = ["SourceValues", "Sources", "across_members"]

_SHOWN = 5


def _key_array(keys: Sequence[Any], n: int, level: str) -> np.ndarray:
    arr = np.asarray(list(keys), dtype=object)
    if arr.ndim != 1 or len(arr) != n:
        raise DataError(f"source level {level!r}: {len(arr)} keys for {n} ids")
    bad = [i for i, k in enumerate(arr) if not isinstance(k, str) or not k.strip()]
    if bad:
        shown = ", ".join(str(i) for i in bad[:_SHOWN])
        raise DataError(f"source level {level!r}: keys must be non-empty strings; bad at positions {shown}")
    return arr.astype(str)


class Sources:
    """Which source each training example comes from, at one or more levels.

    Args:
        ids: ``(n,)`` unique integer example ids.
        keys: one key per id (a single level named ``"source"``), or a mapping ``{level: keys}`` with one
            sequence of ``n`` non-empty strings per level.
    """

    def __init__(self, ids: Sequence[int] | np.ndarray, keys: Sequence[str] | Mapping[str, Sequence[str]]) -> None:
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise DataError(f"source ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        self.ids = ids.astype(np.int64)
        uniq, counts = np.unique(self.ids, return_counts=True)
        if (counts > 1).any():
            raise DataError(f"source ids are not unique; duplicated: {uniq[counts > 1][:_SHOWN].tolist()}")
        levels = dict(keys) if isinstance(keys, Mapping) else {"source": keys}
        if not levels:
            raise DataError("Sources needs at least one level of keys")
        self.levels: dict[str, np.ndarray] = {
            str(level): _key_array(k, len(self.ids), str(level)) for level, k in levels.items()
        }
        self._pos = {int(i): p for p, i in enumerate(self.ids)}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{lv}: {len(np.unique(k))}" for lv, k in self.levels.items())
        return f"Sources(n={len(self.ids)}, {sizes})"

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]], id_field: str, fields: Sequence[str]) -> Sources:
        """Sources from dict records (e.g. JSONL lines); every record needs ``id_field`` and each of ``fields``."""
        for n, rec in enumerate(records):
            missing = [f for f in (id_field, *fields) if f not in rec]
            if missing:
                raise DataError(f"record {n}: missing field(s) {missing}")
        return cls([int(r[id_field]) for r in records], {f: [r[f] for r in records] for f in fields})

    def level(self, level: str | None = None) -> str:
        """The name of ``level`` (default: the only level, or the first one)."""
        if level is None:
            return next(iter(self.levels))
        if level not in self.levels:
            raise DataError(f"no source level {level!r}; levels are {list(self.levels)}")
        return level

    def keys_of(self, ids: Sequence[int] | np.ndarray, level: str | None = None) -> np.ndarray:
        """The source key of each id in ``ids`` at ``level``; an id without a source raises DataError."""
        keys = self.levels[self.level(level)]
        missing = [int(i) for i in np.asarray(ids) if int(i) not in self._pos]
        if missing:
            raise DataError(f"{len(missing)} training ids have no source, e.g. {missing[:_SHOWN]}")
        return keys[[self._pos[int(i)] for i in np.asarray(ids)]]

    def values(self, scores: Scores, level: str | None = None) -> SourceValues:
        """Roll ``scores`` up to sources: ``values[s, j] = Σ_{i ∈ s} scores[i, j]`` (see module doc for why a sum).

        Every training id of ``scores`` must have a source. Cost: one pass over ``scores.values`` (works on memmaps,
        in row blocks).
        """
        level = self.level(level)
        keys = self.keys_of(scores.train_ids, level)
        names, inverse = np.unique(keys, return_inverse=True)
        out = np.zeros((len(names), scores.n_query), dtype=np.float64)
        block = max(1, (64 << 20) // max(1, 8 * scores.n_query))
        for start in range(0, scores.n_train, block):
            rows = slice(start, start + block)
            np.add.at(out, inverse[rows], np.asarray(scores.values[rows], dtype=np.float64))
        counts = np.bincount(inverse, minlength=len(names))
        return SourceValues(out, names.astype(str), scores.query_ids.copy(), counts, level, scores.method,
                            dict(scores.config))

    def to_json(self) -> dict[str, Any]:
        return {"ids": self.ids.tolist(), "levels": {lv: k.tolist() for lv, k in self.levels.items()}}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Sources:
        try:
            return cls(doc["ids"], doc["levels"])
        except (KeyError, TypeError) as exc:
            raise DataError(f"not a Sources document ({exc})") from exc


@dataclass(eq=False)
class SourceValues:
    """Attribution of ``n_query`` queries to ``n_source`` sources.

    ``values[s, j] > 0``: source ``names[s]`` helps query ``query_ids[j]`` (same sign convention as :class:`Scores`).
    ``counts[s]`` is the number of training examples of source s that the scores covered.
    """

    values: np.ndarray
    names: np.ndarray
    query_ids: np.ndarray
    counts: np.ndarray
    level: str
    method: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_source(self) -> int:
        return self.values.shape[0]

    def total(self, reduce: str = "mean") -> np.ndarray:
        """Per-source value over queries, ``(n_source,)``: ``"mean"`` or ``"sum"`` over the columns."""
        if reduce not in ("mean", "sum"):
            raise DataError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
        if self.values.shape[1] == 0:
            raise DataError("no queries to reduce over")
        return self.values.mean(1) if reduce == "mean" else self.values.sum(1)

    def bootstrap(self, n_boot: int = 1000, *, reduce: str = "mean", level: float = 0.9,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Percentile interval of :meth:`total` by resampling queries with replacement.

        Returns ``(low, high, std)``, each ``(n_source,)``. With one query there is nothing to resample: the
        interval collapses to the value and ``std`` is 0 (use :func:`across_members` for another noise estimate).
        """
        if not 0 < level < 1 or n_boot < 1:
            raise DataError(f"need 0 < level < 1 and n_boot >= 1, got level={level}, n_boot={n_boot}")
        q = self.values.shape[1]
        if q == 0:
            raise DataError("no queries to bootstrap over")
        rng = np.random.default_rng(seed)
        draws = np.empty((n_boot, self.n_source))
        for b in range(n_boot):
            cols = rng.integers(0, q, size=q)
            draws[b] = self.values[:, cols].mean(1) * (q if reduce == "sum" else 1)
        tail = (1 - level) / 2
        low, high = np.quantile(draws, [tail, 1 - tail], axis=0)
        return low, high, draws.std(0, ddof=1) if n_boot > 1 else np.zeros(self.n_source)

    def ranking(self, query: int | None = None, *, reduce: str = "mean") -> list[tuple[str, float]]:
        """Sources by value, largest first: for column ``query``, or for :meth:`total` when ``query`` is None."""
        vals = self.total(reduce) if query is None else self.values[:, query]
        order = np.argsort(-vals, kind="stable")
        return [(str(self.names[i]), float(vals[i])) for i in order]


def across_members(members: Sequence[SourceValues], reduce: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of :meth:`SourceValues.total` across ensemble members or seeds.

    All members must cover the same sources in the same order. Returns ``(mean, std)``, each ``(n_source,)``;
    ``std`` uses ``ddof=1`` (0 for a single member).
    """
    if not members:
        raise DataError("across_members needs at least one SourceValues")
    first = members[0]
    for n, m in enumerate(members[1:], start=1):
        if not np.array_equal(m.names, first.names):
            raise DataError(f"member {n} covers other sources than member 0")
    totals = np.stack([m.total(reduce) for m in members])
    std = totals.std(0, ddof=1) if len(members) > 1 else np.zeros(first.n_source)
    return totals.mean(0), std
