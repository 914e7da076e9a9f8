"""Report sections that show examples: the proponent/opponent gallery per query, and mislabel candidates."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DataError
from ..scores import Scores
from .examples import Display, Examples
from .markup import details_json, esc, fmt, note, signed, table
from .sections import per_example

__all__ = ["gallery_section", "mislabel_section"]

IMAGES = Display()  # the default: 8×8 grayscale images


def _flipped(flipped_ids: Any) -> set[int]:
    return set() if flipped_ids is None else {int(i) for i in np.asarray(flipped_ids).reshape(-1)}


def gallery_section(scores: Scores, train_items: Any, query_items: Any, k: int = 3, display: Display = IMAGES,
                    max_queries: int | None = 8, flipped_ids: Any = None) -> str:
    """Per query (column of ``scores``): the query, its ``k`` top proponents (highest scores: training on them
    lowered the query's loss) and ``k`` top opponents (lowest scores), each with its score, drawn as ``display``
    says."""
    if not isinstance(scores, Scores):
        raise DataError(f"a gallery needs Scores, got {type(scores).__name__}")
    train: Examples = display.examples(train_items)
    queries: Examples = display.examples(query_items)
    kind, image_shape = display.kind, display.image_shape
    flipped = _flipped(flipped_ids)
    n_shown = scores.n_query if max_queries is None else min(scores.n_query, int(max_queries))
    parts = [f'<p class="muted">method <b>{esc(scores.method)}</b> · top {esc(k)} proponents and opponents of '
             f"{esc(n_shown)} of {esc(scores.n_query)} queries.</p>"]
    missing = set()
    blocks = []
    for q in range(n_shown):
        qid = int(scores.query_ids[q])
        groups = []
        for title, pairs in (("helps most", scores.topk(k, q)), ("hurts most", scores.bottomk(k, q))):
            missing.update(i for i, _ in pairs if i not in train)
            cards = "".join(train.card(i, image_shape, v, i in flipped) for i, v in pairs)
            groups.append(f'<div class="group"><h4>{esc(title)}</h4><div class="cards">{cards}</div></div>')
        query = f'<div class="group"><h4>query</h4>{queries.card(qid, image_shape)}</div>'
        blocks.append(f'<div class="query {esc(kind)}">{query}{"".join(groups)}</div>')
    if missing:
        parts.append(note(f"{len(missing)} training examples in the gallery are not among the stored items"))
    parts.extend(blocks)
    if scores.config:
        parts.append(details_json("method config", scores.config))
    return "".join(parts)


def _labels(labels: Any, ids: np.ndarray, items: Examples | None) -> list[Any]:
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(ids):
            raise DataError(f"{len(labels)} labels for {len(ids)} values")
        return [v.item() if hasattr(v, "item") else v for v in labels]
    if items is not None:
        return [items.label(i) for i in ids]
    return [None] * len(ids)


def _detection_summary(vec: np.ndarray, ids: np.ndarray, flipped: set[int], top_ids: list[int],
                       higher_is_suspicious: bool) -> str:
    known = flipped & {int(i) for i in ids}
    hits = sum(i in flipped for i in top_ids)
    chance = len(top_ids) * len(known) / max(len(ids), 1)
    text = (f"{hits} of these {len(top_ids)} candidates are among the {len(known)} examples whose labels were "
            f"flipped (picking at random would find about {chance:.1f}).")
    if 0 < len(known) < len(ids) and np.isfinite(vec).all():
        from ..evaluate.mislabel import mislabel_detection

        result = mislabel_detection(vec, np.array(sorted(known)), ids, higher_is_suspicious=higher_is_suspicious)
        text += f" AUROC over all {len(ids)} examples: {fmt(result['auroc'], 3)} (0.5 = chance, 1 = perfect)."
    return f"<p>{esc(text)}</p>"


def mislabel_section(values: Any, items: Any = None, *, higher_is_suspicious: bool, labels: Any = None,
                     flipped_ids: Any = None, k: int = 20, display: Display = IMAGES) -> str:
    """The ``k`` most suspicious examples by a per-example value (``values`` as :func:`per_example` takes them),
    known-flipped ones marked; ``items`` drawn as ``display`` says.

    ``higher_is_suspicious``: True for self-influence / self-scores (mislabelled examples have large ones), False
    for In-Run Shapley and other "positive = helped" values (mislabelled examples hurt, so they score low).
    """
    if not isinstance(higher_is_suspicious, bool):
        raise DataError("say which end is suspicious: higher_is_suspicious=True (self-influence) or False "
                        "(In-Run Shapley values)")
    vec, ids, what, notes = per_example(values)
    examples = None if items is None else display.examples(items)
    label_of = dict(zip(ids.tolist(), _labels(labels, ids, examples)))
    flipped = _flipped(flipped_ids)
    finite = np.flatnonzero(np.isfinite(vec))
    suspicion = vec[finite] if higher_is_suspicious else -vec[finite]
    order = finite[np.argsort(-suspicion, kind="stable")][: int(k)]
    top_ids = [int(ids[i]) for i in order]
    end = "highest" if higher_is_suspicious else "lowest"
    parts = [note(n) for n in notes]
    marked = "; rows in red are known to be flipped" if flipped else ""
    parts.append(f'<p class="muted">The {esc(len(top_ids))} examples with the {end} {esc(what)} '
                 f"of {esc(len(ids))}{marked}.</p>")
    columns = ["rank", "id"] + (["example"] if examples is not None else []) + ["label", "value"]
    rows = []
    for r, (i, pos) in enumerate(zip(top_ids, order)):
        example = [examples.body(i, display.image_shape)] if examples is not None else []
        rows.append([r + 1, i, *example, label_of[i], signed(vec[pos])])
    raw = [False, False] + ([True] if examples is not None else []) + [False, True]
    flags = [i in flipped for i in top_ids]
    if flipped:
        columns.append("flipped")
        for row, flag in zip(rows, flags):
            row.append("yes" if flag else "")
        raw.append(False)
        parts.append(_detection_summary(vec, ids, flipped, top_ids, higher_is_suspicious))
    parts.append(table(columns, rows, raw=raw, flags=flags))
    return "".join(parts)
