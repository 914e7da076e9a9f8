"""Compensation: split an amount per generated output across the training sources credited for it.

The rule, stated once (and written into every ledger):

1. **Credit** of source s for output j is ``v[s, j]`` from :class:`~datacredit.sources.SourceValues` (positive =
   the source made the output more likely / lowered its loss).
2. **Negative credit is reported, not paid**: a source with ``v ≤ 0`` gets status ``"negative"`` and 0.
3. **Minimum evidence**: a source is paid only if ``v[s, j] > min_evidence · noise[s, j]``, where ``noise`` is a
   standard error the caller estimated (bootstrap over the output's tokens, or the spread across ensemble members or
   seeds); otherwise its status is ``"within-noise"`` and it gets 0. Without a noise estimate every positive source
   is eligible and the ledger says that no noise was estimated.
4. **Efficiency**: the eligible sources split the amount in proportion to their credit, and the paid amounts sum to
   the amount exactly (rounded to ``decimals`` places by largest remainder). If no source is eligible the whole
   amount is booked to ``"(unallocated)"``, so every output's lines still sum to its amount.

The audit trail records the model digest, the data digests, the method and its config, the rule, the datacredit
version and the date. Ledgers are written atomically as JSON and CSV.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from datacredit.digests import model_digest  # the audit's model digest is the one caches use
from datacredit.errors import DataError
from datacredit.sources import SourceValues
from datacredit.store import atomic_write_bytes, atomic_write_json

__all__ = ["UNALLOCATED", "Ledger", "PayoutRule", "compensation", "model_digest", "split_amount"]

UNALLOCATED = "(unallocated)"


@dataclass(frozen=True)
class PayoutRule:
    """How credit becomes payment; see the module doc. ``min_evidence`` is in units of the noise estimate."""

    min_evidence: float = 2.0
    decimals: int = 2

    def __post_init__(self) -> None:
        if not math.isfinite(self.min_evidence) or self.min_evidence < 0:
            raise DataError(f"min_evidence must be a finite number >= 0, got {self.min_evidence}")
        if not 0 <= int(self.decimals) <= 8:
            raise DataError(f"decimals must be in [0, 8], got {self.decimals}")


def _round_exact(amounts: np.ndarray, total: float, decimals: int) -> np.ndarray:
    """Round ``amounts`` (summing to ``total``) to ``decimals`` places so that they still sum to round(total)."""
    unit = 10.0 ** -decimals
    units = amounts / unit
    floor = np.floor(units)
    short = int(round(round(total / unit) - floor.sum()))
    order = np.argsort(-(units - floor), kind="stable")
    floor[order[:short]] += 1
    return np.round(floor * unit, decimals)


def split_amount(amount: float, credit: np.ndarray, noise: np.ndarray | None,
                 rule: PayoutRule = PayoutRule()) -> tuple[np.ndarray, np.ndarray, float]:
    """Split ``amount`` across sources with credits ``credit`` ``(n_source,)``.

    Returns ``(paid, status, unallocated)``: ``paid`` ``(n_source,)`` sums with ``unallocated`` to ``amount`` (after
    rounding); ``status`` holds ``"paid"``, ``"negative"`` or ``"within-noise"`` per source.
    """
    if not math.isfinite(amount) or amount < 0:
        raise DataError(f"amount must be a finite number >= 0, got {amount}")
    credit = np.asarray(credit, dtype=np.float64)
    if not np.isfinite(credit).all():
        raise DataError("credits contain NaN or inf")
    noise = np.zeros_like(credit) if noise is None else np.asarray(noise, dtype=np.float64)
    if noise.shape != credit.shape or not np.isfinite(noise).all() or (noise < 0).any():
        raise DataError(f"noise must be finite, >= 0 and shaped like the credits {credit.shape}, got {noise.shape}")
    status = np.where(credit <= 0, "negative", np.where(credit > rule.min_evidence * noise, "paid", "within-noise"))
    eligible = status == "paid"
    paid = np.zeros_like(credit)
    if not eligible.any():
        return paid, status, round(amount, rule.decimals)
    paid[eligible] = amount * credit[eligible] / credit[eligible].sum()
    paid = _round_exact(paid, amount, rule.decimals)
    return paid, status, 0.0


@dataclass
class Ledger:
    """Payments per output and source, with the rule and the audit trail; save with :meth:`save`."""

    lines: list[dict[str, Any]]
    rule: PayoutRule
    audit: dict[str, Any]

    def totals(self) -> dict[str, float]:
        """Amount paid to each source over all outputs (``(unallocated)`` included when non-zero)."""
        out: dict[str, float] = {}
        for line in self.lines:
            if line["paid"]:
                out[line["source"]] = round(out.get(line["source"], 0.0) + line["paid"], self.rule.decimals)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_json(self) -> dict[str, Any]:
        return {"rule": asdict(self.rule), "audit": self.audit, "totals": self.totals(), "lines": self.lines}

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``ledger.json`` and ``ledger.csv`` into ``directory`` (created), each atomically."""
        os.makedirs(directory, exist_ok=True)
        atomic_write_json(os.path.join(directory, "ledger.json"), self.to_json())
        buf = io.StringIO()
        fields = ["output", "amount", "source", "credit", "noise", "status", "paid"]
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.lines)
        atomic_write_bytes(os.path.join(directory, "ledger.csv"), buf.getvalue().encode("utf-8"))


def compensation(values: SourceValues, amounts: float | Sequence[float] | np.ndarray, *,
                 noise: np.ndarray | None = None, rule: PayoutRule = PayoutRule(),
                 audit: Mapping[str, Any] | None = None) -> Ledger:
    """A ledger paying, for every output (column of ``values``), its amount to the credited sources.

    Args:
        values: source values ``(n_source, n_output)``; each column is one generated output (its completion tokens'
            values summed or averaged, as the caller chose).
        amounts: one amount for every output, or ``(n_output,)`` amounts.
        noise: ``(n_source, n_output)`` standard errors of the credits, or None (not estimated: stated in the audit).
        rule: the payout rule (module doc).
        audit: model/data digests, method and config; date, datacredit version and the method of ``values`` are added.
    """
    n_src, n_out = values.values.shape
    amounts = np.broadcast_to(np.asarray(amounts, dtype=np.float64), (n_out,)) if np.ndim(amounts) == 0 \
        else np.asarray(amounts, dtype=np.float64)
    if amounts.shape != (n_out,):
        raise DataError(f"{len(amounts)} amounts for {n_out} outputs")
    if noise is not None and np.shape(noise) != (n_src, n_out):
        raise DataError(f"noise must have shape {(n_src, n_out)}, got {np.shape(noise)}")
    from datacredit._version import __version__

    lines = []
    for j in range(n_out):
        credit = values.values[:, j]
        err = None if noise is None else np.asarray(noise)[:, j]
        paid, status, unallocated = split_amount(float(amounts[j]), credit, err, rule)
        for s in np.argsort(-credit, kind="stable"):
            lines.append({"output": int(values.query_ids[j]), "amount": float(amounts[j]),
                          "source": str(values.names[s]), "credit": float(credit[s]),
                          "noise": None if err is None else float(err[s]), "status": str(status[s]),
                          "paid": float(paid[s])})
        if unallocated:
            lines.append({"output": int(values.query_ids[j]), "amount": float(amounts[j]), "source": UNALLOCATED,
                          "credit": None, "noise": None, "status": "no source above noise", "paid": unallocated})
    trail = {
        **dict(audit or {}),
        "method": values.method, "config": values.config, "level": values.level,
        "noise": "not estimated" if noise is None else "given per source and output",
        "datacredit": __version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return Ledger(lines, rule, trail)
