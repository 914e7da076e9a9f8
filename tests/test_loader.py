"""``as_loader``'s one-indexing-per-batch route gives exactly what a default DataLoader gives, and is taken only where
``data[list]`` is that batch (an ArrayDataset or a Subset of one, ``__getitem__`` not overridden)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from datacredit.data import CharDataset
from datacredit.dataset import ArrayDataset
from datacredit.methods.base import _rows_at_once, as_loader


def _same(a, b) -> None:
    assert type(a) is type(b) and len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v)


def test_batched_rows_equal_the_default_collation():
    torch.manual_seed(0)
    data = ArrayDataset(torch.randn(53, 3, 4), torch.randint(0, 5, (53,)), torch.rand(53) > 0.5,
                        ids=np.arange(53) * 7)
    text = CharDataset("abcdefghijklmnopqrstuvwxyz" * 4, seq_len=8)  # a subclass that keeps ArrayDataset's items
    for d in (data, Subset(data, list(range(5, 50, 2))), text):
        assert _rows_at_once(d)
        fast, ids = as_loader(d, 8)
        slow = DataLoader(d, batch_size=8, shuffle=False)
        assert len(fast) == len(slow)
        for a, b in zip(fast, slow, strict=True):
            _same(a, b)
    np.testing.assert_array_equal(as_loader(data, 8)[1], np.arange(53) * 7)


def test_an_overridden_getitem_keeps_the_per_item_loader():
    class Doubled(ArrayDataset):
        def __getitem__(self, i):
            return tuple(2 * t[i] for t in self.tensors)

    doubled = Doubled(torch.arange(10.0))
    assert not _rows_at_once(doubled)
    assert not _rows_at_once(Subset(doubled, [0, 1]))
    _same(next(iter(as_loader(doubled, 4)[0])), [torch.tensor([0.0, 2.0, 4.0, 6.0])])
