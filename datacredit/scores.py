"""``Scores``: the one result type every method returns and every metric and report consumes."""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from datacredit.errors import DataError, StoreError
from datacredit.sources import Sources, SourceValues
from datacredit.store import Store

__all__ = ["Scores"]

FORMAT_VERSION = 1
KIND = "scores"  # the manifest-level kind of a Scores directory
ARTEFACTS = ("values", "train_ids", "query_ids")  # what a Scores directory written before kinds holds


def _ids(ids: Any, what: str) -> np.ndarray:
    ids = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if ids.ndim != 1:
        raise DataError(f"{what} must be 1-D, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{what} must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{what} are not unique; duplicated: {uniq[counts > 1][:10].tolist()}")
    return ids


@dataclass(eq=False)
class Scores:
    """Attribution scores of ``n_train`` training examples for ``n_query`` queries.

    ``values[i, j] > 0`` means training example ``train_ids[i]`` HELPS query ``query_ids[j]``: training on it
    lowers the query's loss (or raises its margin); negative values mark opponents.

    Attributes:
        values: ``(n_train, n_query)`` floating array (may be an ``np.memmap``).
        train_ids: ``(n_train,)`` unique int64 ids of the training examples (rows).
        query_ids: ``(n_query,)`` unique int64 ids of the queries (columns).
        method: name of the method that produced the scores.
        config: JSON-serialisable settings of that method.
        sources: optional :class:`~datacredit.sources.Sources` of the training ids (owner, document, licence, ...);
            kept through ``save``/``load``; ``by_source()`` rolls the scores up to them.
    """

    values: np.ndarray
    train_ids: np.ndarray
    query_ids: np.ndarray
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    sources: Sources | None = None

    def __post_init__(self) -> None:
        if isinstance(self.values, torch.Tensor):
            self.values = self.values.detach().cpu().numpy()
        self.values = np.asanyarray(self.values)
        if self.values.ndim != 2:
            raise DataError(f"values must be 2-D (n_train, n_query), got shape {self.values.shape}")
        if not np.issubdtype(self.values.dtype, np.floating):
            raise DataError(f"values must be floating point, got dtype {self.values.dtype}")
        self.train_ids = _ids(self.train_ids, "train_ids")
        self.query_ids = _ids(self.query_ids, "query_ids")
        if self.values.shape != (len(self.train_ids), len(self.query_ids)):
            raise DataError(
                f"values have shape {self.values.shape} but there are {len(self.train_ids)} train_ids "
                f"and {len(self.query_ids)} query_ids"
            )
        if not isinstance(self.method, str) or not self.method:
            raise DataError(f"method must be a non-empty string, got {self.method!r}")
        try:
            json.dumps(self.config)
        except (TypeError, ValueError) as exc:
            raise DataError(f"config must be JSON-serialisable: {exc}") from exc
        if self.sources is not None:
            if not isinstance(self.sources, Sources):
                raise DataError(f"sources must be a datacredit.Sources, got {type(self.sources).__name__}")
            self.sources.keys_of(self.train_ids)  # every training id needs a source (DataError names the missing)

    def by_source(self, level: str | None = None) -> SourceValues:
        """Scores summed per source (``(n_source, n_query)``, see :mod:`datacredit.sources`); needs ``sources``."""
        if self.sources is None:
            raise DataError("these Scores carry no sources: pass sources=Sources(ids, keys) or use Sources.values")
        return self.sources.values(self, level)

    def __repr__(self) -> str:
        return f"Scores(method={self.method!r}, n_train={self.n_train}, n_query={self.n_query})"

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    @property
    def n_train(self) -> int:
        return self.values.shape[0]

    @property
    def n_query(self) -> int:
        return self.values.shape[1]

    def _index(self, key: int | None, axis: int, by_id: bool) -> int:
        ids, what = (self.train_ids, "train") if axis == 0 else (self.query_ids, "query")
        if key is None:
            if len(ids) != 1:
                raise DataError(f"pass a {what}: there are {len(ids)} of them, not 1")
            return 0
        key = operator.index(key)
        if by_id:
            hit = np.flatnonzero(ids == key)
            if not len(hit):
                raise DataError(f"no {what} with id {key}")
            return int(hit[0])
        if not 0 <= key < len(ids):
            raise DataError(f"{what} index {key} out of range [0, {len(ids)})")
        return key

    def column(self, query: int | None = None, *, by_id: bool = False) -> np.ndarray:
        """Scores of every training example for one query: ``(n_train,)``."""
        return np.asarray(self.values[:, self._index(query, 1, by_id)])

    def row(self, train: int, *, by_id: bool = False) -> np.ndarray:
        """Scores of one training example for every query: ``(n_query,)``."""
        return np.asarray(self.values[self._index(train, 0, by_id)])

    def topk(
        self, k: int, query: int | None = None, *, by_id: bool = False, largest: bool = True
    ) -> list[tuple[int, float]]:
        """The ``k`` strongest proponents of one query as ``(train_id, score)``, strongest first.

        ``query`` is a column index (a query id with ``by_id=True``); it may be omitted when there is one
        query. ``largest=False`` gives opponents, most negative first. Ties keep training order.
        """
        k = operator.index(k)
        if k < 0:
            raise DataError(f"k must be >= 0, got {k}")
        col = self.column(query, by_id=by_id).astype(np.float64)
        order = np.argsort(-col if largest else col, kind="stable")[:k]
        return [(int(self.train_ids[i]), float(col[i])) for i in order]

    def bottomk(self, k: int, query: int | None = None, *, by_id: bool = False) -> list[tuple[int, float]]:
        """The ``k`` strongest opponents (most negative scores first) of one query."""
        return self.topk(k, query, by_id=by_id, largest=False)

    @classmethod
    def average(cls, scores: Sequence[Scores]) -> Scores:
        """Elementwise mean of scores over the same train and query ids (e.g. ensemble members)."""
        scores = list(scores)
        if not scores:
            raise DataError("Scores.average needs at least one Scores")
        first = scores[0]
        for n, s in enumerate(scores[1:], start=1):
            if not np.array_equal(s.train_ids, first.train_ids):
                raise DataError(f"Scores.average: scores[{n}] has different train_ids than scores[0]")
            if not np.array_equal(s.query_ids, first.query_ids):
                raise DataError(f"Scores.average: scores[{n}] has different query_ids than scores[0]")
        total = np.zeros(first.shape, dtype=np.float64)
        for s in scores:
            total += s.values
        dtype = np.result_type(*(s.values.dtype for s in scores))
        members = [{"method": s.method, "config": s.config} for s in scores]
        return cls((total / len(scores)).astype(dtype), first.train_ids.copy(), first.query_ids.copy(),
                   method="average", config={"members": members})

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write ``values``, ``train_ids`` and ``query_ids`` (``.npy``) into the store directory ``path``.

        Atomic as a whole: the three arrays are written and fsynced under fresh names, then committed in one
        manifest update (:meth:`Store.transaction`), and the previous scores' files are deleted only after that.
        A save killed at any instant leaves the previous Scores (or, after the commit, the new one) fully
        loadable, never a mix. ``path`` must hold Scores or nothing: a directory holding another kind of
        artefact (a ground-truth build, a method cache, ...) raises StoreError naming it, unless
        ``overwrite=True``, which replaces its whole contents.
        """
        store = Store(path)
        meta = {"format_version": FORMAT_VERSION, "method": self.method, "config": self.config}
        with store.transaction(kind=KIND, overwrite=overwrite, adopt=(*ARTEFACTS, "sources")):
            store.save_array("train_ids", self.train_ids)
            store.save_array("query_ids", self.query_ids)
            store.save_array("values", self.values, meta=meta)
            store.save_json("sources", None if self.sources is None else self.sources.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str], mmap: bool = False) -> Scores:
        """Read scores saved by ``save``; ``mmap=True`` maps ``values`` read-only instead of loading it.

        Every array is size- and sha256-checked, the memmap included (one streaming pass when it is opened).
        """
        store = Store(path, create=False)

        def read(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
            # one manifest snapshot for the kind, the meta and all three arrays: never a mix of two saves
            if doc.get("kind") not in (None, KIND):
                raise StoreError(f"{store.manifest_path}: holds a {doc['kind']!r} store, not Scores")
            entry = store._entry("values", "array", doc["artefacts"])
            meta = entry.get("meta")
            if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or "method" not in meta:
                raise StoreError(f"{store.manifest_path}: not a Scores directory of format {FORMAT_VERSION}")
            arrays = {name: store._load_array(doc, name, name == "values" and mmap, True) for name in ARTEFACTS}
            sources = None
            if "sources" in doc["artefacts"]:  # absent in directories saved before sources existed
                path, data = store._read_bytes(doc, "sources", "json")
                try:
                    sources = json.loads(data)
                except (UnicodeDecodeError, ValueError) as exc:
                    raise StoreError(f"{path}: invalid JSON ({exc})") from exc
            return entry, arrays, sources

        entry, arrays, sources = store._retrying(read)
        meta, values, train_ids, query_ids = entry["meta"], arrays["values"], arrays["train_ids"], arrays["query_ids"]
        if values.ndim != 2 or values.shape != (len(train_ids), len(query_ids)):
            raise StoreError(
                f"{store.root / entry['file']}: shape {values.shape} does not match {len(train_ids)} "
                f"train_ids and {len(query_ids)} query_ids"
            )
        try:
            return cls(values, train_ids, query_ids, meta["method"], meta.get("config", {}),
                       None if sources is None else Sources.from_json(sources))
        except DataError as exc:
            raise StoreError(f"{store.root}: invalid scores on disk ({exc})") from exc
