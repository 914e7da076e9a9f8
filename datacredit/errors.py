"""Errors raised by datacredit. Each names the problem so a user can fix it without reading our code."""

from __future__ import annotations


class DataCreditError(Exception):
    """Base class of every error datacredit raises on purpose."""


class UnsupportedModuleError(DataCreditError):
    """A tracked module has trainable parameters but no capture rule (message names its path and type)."""


class NonFiniteError(DataCreditError):
    """A loss or gradient is NaN/inf; the message names the example ids (and step, where known)."""


class DataError(DataCreditError):
    """Bad input data: empty dataset, mismatched or duplicated ids, missing data package."""


class StoreError(DataCreditError):
    """An on-disk artefact is missing, truncated, corrupt or inconsistent with its manifest."""
