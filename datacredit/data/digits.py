"""scikit-learn's bundled 8x8 digits (1797 images, 10 classes; shipped with sklearn, never downloaded).

Ids are the rows' indices in sklearn's array, so they are the same in every call, split and subset.
"""

from __future__ import annotations

import numpy as np
import torch

from datacredit.data.dataset import ArrayDataset
from datacredit.errors import DataError

__all__ = ["flip_labels", "load_digits"]


def load_digits(
    test_fraction: float = 0.2,
    seed: int = 0,
    flatten: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Train and test splits of the digits as `ArrayDataset(x, y)`.

    `x` is `(n, 64)` (or `(n, 1, 8, 8)` when `flatten=False`) with pixels in [0, 1]; `y` is `(n,)` int64
    in 0..9. The split is a permutation from `np.random.default_rng(seed)`: its first
    `round(test_fraction * 1797)` rows are the test set. Each split is sorted by id.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise DataError("load_digits needs scikit-learn (pip install scikit-learn)") from e
    bunch = sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) / 16.0  # (1797, 8, 8), raw values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    n = len(labels)
    x = torch.as_tensor(images, dtype=dtype)
    x = x.reshape(n, -1) if flatten else x.reshape(n, 1, 8, 8)
    y = torch.as_tensor(labels)

    n_test = int(round(test_fraction * n))
    if n_test == 0 or n_test == n:
        raise DataError(f"test_fraction={test_fraction} leaves an empty split of {n} examples")
    perm = np.random.default_rng(seed).permutation(n)
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    full = ArrayDataset(x, y, ids=np.arange(n))
    return full.subset(train_idx), full.subset(test_idx)


def flip_labels(
    dataset: ArrayDataset, fraction: float, seed: int, num_classes: int
) -> tuple[ArrayDataset, np.ndarray]:
    """Copy of `dataset` with exactly `round(fraction * n)` labels changed to a different random class.

    The labels are the last tensor of the dataset (`(n,)` integers in 0..num_classes-1). Returns the new
    dataset (same ids, same inputs) and the sorted ids of the flipped examples, for mislabel detection.
    """
    if not 0.0 <= fraction <= 1.0:
        raise DataError(f"fraction must be in [0, 1], got {fraction}")
    if num_classes < 2:
        raise DataError(f"flipping labels needs at least 2 classes, got num_classes={num_classes}")
    labels = dataset.tensors[-1]
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DataError(
            f"labels (the last tensor) must be 1-D integers, got {labels.dtype} {tuple(labels.shape)}"
        )
    n = len(labels)
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"labels must lie in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}"
        )
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.choice(n, size=int(round(fraction * n)), replace=False))
    shift = rng.integers(1, num_classes, size=len(pos))  # nonzero shift mod num_classes => a different class
    new = labels.clone()
    new[torch.as_tensor(pos, dtype=torch.long)] = (
        labels[torch.as_tensor(pos, dtype=torch.long)] + torch.as_tensor(shift, dtype=labels.dtype)
    ) % num_classes
    flipped = ArrayDataset(*dataset.tensors[:-1], new, ids=dataset.ids.copy())
    return flipped, np.sort(dataset.ids[pos])
