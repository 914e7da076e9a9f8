"""In-memory datasets whose examples carry stable integer ids, and `example_ids` to read ids off any dataset.

Every attribution score is indexed by example id, not by position, so that a subset, a shuffled loader or a
shard on another rank still names the same training example. Ids are `np.int64`, 1-D, unique, one per example.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from datacredit.errors import DataError

__all__ = ["ArrayDataset", "example_ids"]

_SHOWN = 5  # how many offending ids an error message lists
_D = TypeVar("_D", bound="ArrayDataset")


def _check_ids(ids: np.ndarray, n: int, what: str) -> np.ndarray:
    """Return `ids` as a 1-D int64 array of length `n` with unique entries, else raise DataError."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise DataError(f"{what}: ids must be 1-D, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{what}: ids must be integers, got dtype {ids.dtype}")
    if len(ids) != n:
        raise DataError(f"{what}: {len(ids)} ids for {n} examples")
    ids = ids.astype(np.int64, copy=False)
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1]
        shown = ", ".join(str(int(i)) for i in dup[:_SHOWN])
        more = f" and {len(dup) - _SHOWN} more" if len(dup) > _SHOWN else ""
        raise DataError(f"{what}: duplicated ids {shown}{more}")
    return ids


class ArrayDataset(Dataset):
    """Tensors sharing their first dimension, one example per row, each with a stable integer id.

    Args:
        *tensors: tensors of shapes `(n, ...)`; item `i` is `tuple(t[i] for t in tensors)`
            (ids are not part of the item).
        ids: `(n,)` unique integers naming the rows; default `arange(n)`.
    """

    def __init__(self, *tensors: torch.Tensor, ids: Sequence[int] | np.ndarray | None = None) -> None:
        if not tensors:
            raise DataError("ArrayDataset needs at least one tensor")
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise DataError(f"ArrayDataset takes tensors, got {type(t).__name__}")
            if t.dim() == 0:
                raise DataError("ArrayDataset tensors need a first (example) dimension, got a 0-d tensor")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
            raise DataError(f"ArrayDataset tensors must share their first dimension, got shapes {shapes}")
        self.tensors: tuple[torch.Tensor, ...] = tuple(tensors)
        self.ids: np.ndarray = _check_ids(np.arange(n) if ids is None else ids, n, "ArrayDataset")

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[i] for t in self.tensors)

    def subset(self: _D, indices: Sequence[int] | np.ndarray | torch.Tensor) -> _D:
        """A dataset of the same type with the rows at positions `indices` (not ids), keeping their ids.

        Other attributes (e.g. a subclass's vocabulary) are shared with this dataset.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        bad = idx[(idx < -n) | (idx >= n)]
        if bad.size:
            raise DataError(f"subset indices {bad[:_SHOWN].tolist()} out of range for {n} examples")
        rows = torch.as_tensor(idx)
        new = copy.copy(self)
        new.tensors = tuple(t[rows] for t in self.tensors)
        new.ids = _check_ids(self.ids[idx], len(idx), type(self).__name__)
        return new

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self.tensors)
        return f"{type(self).__name__}({shapes})"


def _raw_ids(dataset: Dataset) -> np.ndarray:
    ids = getattr(dataset, "ids", None)
    if ids is not None:
        return np.asarray(ids)
    if isinstance(dataset, Subset):
        parent = example_ids(dataset.dataset)
        indices = np.asarray(dataset.indices, dtype=np.int64).reshape(-1)
        bad = indices[(indices < -len(parent)) | (indices >= len(parent))]
        if bad.size:
            raise DataError(
                f"Subset indices {bad[:_SHOWN].tolist()} out of range for a parent of {len(parent)}"
            )
        return parent[indices]
    return np.arange(len(dataset))


def example_ids(dataset: Dataset) -> np.ndarray:
    """The stable ids of a map-style dataset, `(len(dataset),)` int64.

    `dataset.ids` if it has them; for a `torch.utils.data.Subset` the parent's ids at the subset's indices
    (recursively); otherwise positions `arange(len(dataset))`. Raises DataError if the dataset is empty or
    the ids are not 1-D unique integers, one per example.
    """
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as e:
        raise DataError(
            f"{type(dataset).__name__} has no length; example ids need a map-style dataset"
        ) from e
    if n == 0:
        raise DataError(f"empty dataset ({type(dataset).__name__} has no examples)")
    return _check_ids(_raw_ids(dataset), n, type(dataset).__name__)
