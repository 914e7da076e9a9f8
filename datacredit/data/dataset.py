"""Compatibility alias: :class:`ArrayDataset` and :func:`example_ids` live in :mod:`datacredit.dataset` (core types,
not sample data). Kept so older imports (``datacredit.data.dataset``) still work."""

from datacredit.dataset import ArrayDataset, example_ids

__all__ = ["ArrayDataset", "example_ids"]
