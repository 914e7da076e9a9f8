"""Report sections for credit by data source: top sources per output with share bars, the ledger, the audit trail,
and how stable the source ranking is across methods. Every caller string is escaped (see :mod:`.markup`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..ledger import Ledger
from ..sources import SourceValues
from ..store import atomic_write_bytes
from .markup import details_json, esc, fmt, note, page, signed, table

__all__ = ["credit_sections", "render_credit_report"]


def _bar(value: float, noise: float | None, scale: float) -> str:
    """A horizontal bar for a credit (green helps, red hurts) with its ± noise as a thin whisker."""
    width = 0.0 if scale <= 0 else min(100.0, abs(value) / scale * 100)
    colour = "var(--pos)" if value > 0 else "var(--neg)"
    whisker = ""
    if noise:
        w = min(100.0, noise / scale * 100) if scale > 0 else 0
        whisker = f'<span style="display:inline-block;width:{w:.1f}px;border-top:2px solid var(--muted)"></span>'
    return (f'<span style="display:inline-block;width:{width:.1f}px;height:10px;background:{colour}"></span>'
            f"{whisker}")


def _outputs_section(ledger: Ledger, labels: Mapping[int, str], top: int) -> str:
    parts = []
    outputs = sorted({line["output"] for line in ledger.lines})
    for out in outputs:
        lines = [ln for ln in ledger.lines if ln["output"] == out and ln["credit"] is not None]
        unalloc = [ln for ln in ledger.lines if ln["output"] == out and ln["credit"] is None]
        scale = max([abs(ln["credit"]) for ln in lines] + [1e-300])
        rows = [(esc(ln["source"]), signed(ln["credit"]), "—" if ln["noise"] is None else esc(fmt(ln["noise"], 3)),
                 _bar(ln["credit"], ln["noise"], scale), esc(ln["status"]), esc(fmt(ln["paid"])))
                for k, ln in enumerate(lines) if k < top or ln["paid"]]  # a paid source is never hidden
        rows += [(esc(ln["source"]), "—", "—", "", esc(ln["status"]), esc(fmt(ln["paid"]))) for ln in unalloc]
        amount = lines[0]["amount"] if lines else unalloc[0]["amount"]
        title = labels.get(out, f"output {out}")
        parts.append(f"<h3>{esc(title)} <span class=\"muted\">(amount {esc(fmt(amount))})</span></h3>"
                     + table(["source", "credit", "± noise", "share", "status", "paid"], rows,
                             raw=[True] * 6))
    return "".join(parts)


def _stability(by_method: Mapping[str, SourceValues]) -> str:
    """Spearman between methods' query-averaged source values (same sources required)."""
    from scipy.stats import spearmanr

    names = list(by_method)
    if len(names) < 2:
        return note("Only one method: run more than one to see whether the source ranking is stable.")
    totals = {m: v.total("mean") for m, v in by_method.items()}
    rows = []
    for a in names:
        row = [a]
        for b in names:
            if not np.array_equal(by_method[a].names, by_method[b].names):
                row.append("—")
            else:
                rho = spearmanr(totals[a], totals[b]).statistic
                row.append(float(rho))
        rows.append(row)
    return table(["method", *names], rows)


def credit_sections(ledger: Ledger, *, labels: Mapping[int, str] | None = None, top: int = 8,
                    by_method: Mapping[str, SourceValues] | None = None) -> list[tuple[str, str, str]]:
    """``(anchor, title, html)`` sections: per-output credit, totals paid, stability across methods, audit trail.

    ``labels`` maps an output id to a short text (e.g. the completion) shown as its heading.
    """
    labels = dict(labels or {})
    totals = table(["source", "paid in total"], [(s, v) for s, v in ledger.totals().items()])
    rule = ledger.rule
    rule_text = (f"Negative credit is reported, not paid. A source is paid only when its credit exceeds "
                 f"{fmt(rule.min_evidence)} × its noise estimate; the paid sources split each output's amount in "
                 f"proportion to their credit (rounded to {rule.decimals} decimals, summing exactly to the amount); "
                 "when no source qualifies the amount stays unallocated.")
    sections = [
        ("credit-outputs", "Who gets the credit, per output",
         f'<p class="convention">{esc(rule_text)}</p>' + _outputs_section(ledger, labels, top)),
        ("credit-totals", "Compensation ledger: totals", totals),
    ]
    if by_method is not None:
        sections.append(("credit-stability", "Stability of the source ranking across methods",
                         _stability(by_method)))
    sections.append(("credit-audit", "Audit trail", details_json("model, data, method, config, date", ledger.audit)))
    return sections


def render_credit_report(path: str | os.PathLike[str], ledger: Ledger, *, title: str = "Credit by data source",
                         labels: Mapping[int, str] | None = None,
                         by_method: Mapping[str, SourceValues] | None = None,
                         notes: Sequence[str] = ()) -> Path:
    """Write a self-contained HTML page (atomically) with :func:`credit_sections`; returns its path."""
    sections = credit_sections(ledger, labels=labels, by_method=by_method)
    if notes:
        sections.insert(0, ("credit-notes", "Notes", "".join(note(n) for n in notes)))
    html = page(title, f"method {ledger.audit.get('method', '?')}", sections,
                f"datacredit {ledger.audit.get('datacredit', '')} · {ledger.audit.get('date', '')}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, html.encode("utf-8"))
    return out
