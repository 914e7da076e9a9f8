"""HTML building blocks of the report: escaping, number formatting, tables, inline images, the page shell.

Every string that reaches the page from a caller (titles, method names, ids, labels, text examples, config values)
goes through :func:`esc` (``html.escape`` with quotes). The page carries a Content-Security-Policy that allows no
script and no network fetch at all (images only from ``data:`` URIs, styles only inline), so even a missed escape
could not run code or phone home.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Sequence
from numbers import Integral, Real
from typing import Any

__all__ = ["details_json", "esc", "fmt", "img", "note", "page", "plot", "signed", "table"]

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#ffffff; --panel:#f6f8fa; --pos:#1a7f37; --neg:#cf222e;
        --accent:#0969da; --warn:#9a6700; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header, main, footer { max-width: 1100px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 24px; border-bottom: 1px solid var(--line); }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 0 0 8px; padding-top: 8px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
.subtitle, .muted { color: var(--muted); }
nav ol { columns: 2; margin: 8px 0 16px; padding-left: 20px; }
nav a { color: var(--accent); text-decoration: none; }
section { padding: 16px 0 20px; border-bottom: 1px solid var(--line); }
.note { background: #fff8c5; border: 1px solid #d4a72c66; border-radius: 6px; padding: 6px 10px; margin: 8px 0;
        color: #4d2d00; }
.convention { background: var(--panel); border-radius: 6px; padding: 8px 12px; margin: 12px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: var(--panel); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.flag td { background: #ffebe9; }
.pos { color: var(--pos); } .neg { color: var(--neg); }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.plot { max-width: 100%; height: auto; display: block; margin: 6px 0; }
.thumb { width: 56px; height: 56px; image-rendering: pixelated; display: block; margin: 0 auto;
         border: 1px solid var(--line); background: #000; }
td .thumb { width: 32px; height: 32px; }
.query { display: grid; grid-template-columns: auto 1fr 1fr; gap: 16px; padding: 10px 0;
         border-top: 1px dashed var(--line); align-items: start; }
.query.text { grid-template-columns: 1fr 1fr; }
.query.text > .group:first-child { grid-column: 1 / -1; }
.group h4 { margin: 0 0 4px; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
.cards { display: flex; flex-wrap: wrap; gap: 8px; }
.text .cards { flex-direction: column; }
figure.ex { margin: 0; padding: 6px; border: 1px solid var(--line); border-radius: 6px; background: var(--panel);
            text-align: center; font-size: 12px; min-width: 84px; }
.text figure.ex { text-align: left; }
figure.ex.flag { border-color: var(--neg); background: #ffebe9; }
figure.ex figcaption { margin-top: 4px; line-height: 1.3; }
pre { margin: 0; white-space: pre-wrap; word-break: break-word; font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo,
      Consolas, monospace; }
figure.ex pre { background: #fff; border: 1px solid var(--line); padding: 4px 6px; max-height: 9em; overflow: auto; }
td pre { max-width: 520px; max-height: 6em; overflow: auto; }
.badge { display: inline-block; padding: 0 5px; border-radius: 8px; font-size: 11px; background: var(--neg);
         color: #fff; }
details { margin: 6px 0; font-size: 13px; } summary { cursor: pointer; color: var(--muted); }
details pre { background: var(--panel); padding: 6px 8px; border-radius: 6px; }
footer { padding: 16px 24px 32px; color: var(--muted); font-size: 12px; }
"""


def esc(value: Any) -> str:
    """``str(value)`` with ``& < > " '`` escaped: safe in text and in quoted attributes."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A number or value as short text (not escaped): ints as is, reals to ``digits`` significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, Real):
        v = float(value)
        if math.isnan(v):
            return "n/a"
        return f"{v:.{digits}g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def signed(value: float, digits: int = 3) -> str:
    """A score as escaped HTML, coloured by sign (green helps, red hurts)."""
    cls = "pos" if value > 0 else "neg" if value < 0 else "muted"
    return f'<span class="{cls}">{esc(f"{float(value):+.{digits}g}")}</span>'


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, raw: Sequence[bool] | None = None,
          flags: Sequence[bool] | None = None) -> str:
    """An HTML table. Cells are escaped and formatted with :func:`fmt`, except columns whose ``raw`` entry is True
    (the caller passes HTML it built and escaped itself). Rows whose ``flags`` entry is True are highlighted."""
    raw = list(raw) if raw is not None else [False] * len(columns)
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for r, row in enumerate(rows):
        cells = []
        for c, value in enumerate(row):
            if raw[c]:
                cells.append(f"<td>{value}</td>")
            else:
                cls = ' class="num"' if _is_number(value) else ""
                cells.append(f"<td{cls}>{esc(fmt(value))}</td>")
        cls = ' class="flag"' if flags is not None and flags[r] else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def img(png: bytes, alt: str, css_class: str = "plot", scale: float | None = None) -> str:
    """An ``<img>`` with the PNG inlined as a base64 ``data:`` URI (no file, no network). ``scale`` sets the
    displayed width to that fraction of the PNG's pixel width (0.5 for the double-resolution plots)."""
    data = base64.b64encode(png).decode("ascii")
    size = f' width="{round(int.from_bytes(png[16:20], "big") * scale)}"' if scale else ""
    return f'<img class="{esc(css_class)}" alt="{esc(alt)}"{size} src="data:image/png;base64,{data}">'


def plot(png: bytes, alt: str) -> str:
    """A plot from :mod:`datacredit.report.plots`, drawn at double resolution and shown at half its pixel size."""
    return img(png, alt, "plot", 0.5)


def note(text: str) -> str:
    """A highlighted paragraph for something skipped or worth a warning (escaped)."""
    return f'<p class="note">{esc(text)}</p>'


def details_json(summary: str, obj: Any) -> str:
    """A collapsed block showing ``obj`` as indented JSON (escaped), e.g. a method's config."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    return f"<details><summary>{esc(summary)}</summary><pre>{esc(text)}</pre></details>"


def page(title: str, subtitle: str | None, sections: Sequence[tuple[str, str, str]], footer: str) -> str:
    """The whole document. ``sections`` are ``(anchor, title, body_html)``; anchors are ours, titles escaped here."""
    toc = "".join(f'<li><a href="#{esc(a)}">{esc(t)}</a></li>' for a, t, _ in sections)
    body = "".join(f'<section id="{esc(a)}"><h2>{esc(t)}</h2>{b}</section>' for a, t, b in sections)
    sub = f'<p class="subtitle">{esc(subtitle)}</p>' if subtitle else ""
    nav = f"<nav><ol>{toc}</ol></nav>" if sections else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1>{sub}{nav}</header><main>{body}</main>"
        f"<footer>{esc(footer)}</footer></body></html>\n"
    )
