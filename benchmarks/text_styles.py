"""A text corpus whose sources are writing styles: the bundled sample rewritten in 9 styles, plus random characters.

Why styles: cut into documents of one style (the ``text-documents`` case), removing one source of 20 moves a
character model's loss on any query by about 1e-2 nats, below seed noise (noise ceiling 0.1). Sources that differ
in *how* the text is written make each source's removal matter for the queries written like it, and by how much it
matters for the other queries depends on what the styles share, which is what a source-level ranking should capture.

Styles are a 3 × 3 design, ``<case>-<order>``: case ∈ {``asis``, ``upper``, ``lower``} (the text as typed, all
capitals, all small letters) × order ∈ {``fwd``, ``rot13``, ``rev``} (as written, letters rotated by 13 places,
characters in reverse order). Two styles share a case, an order, both or neither, so a query of one style has one
source written exactly like it, four sharing one factor and four sharing none (``asis`` and ``lower`` differ only in
the capitals, about 3 % of the characters, so those pairs are close).

Training text: the sample's first ``len - HELD_OUT`` characters, cut into blocks of ``BLOCK`` characters; block b goes
to style ``perm_r[b mod 9]`` of round ``r = b // 9`` (a seeded permutation per round), so every style gets
content from all over the sample and the styles differ in style only. Each source's blocks, styled and joined, are cut
into ``SEQ``-character chunks. A tenth source, ``random``, holds as many chunks of uniformly random characters (the
planted source). Queries: ``PASSAGES`` windows of the last ``HELD_OUT`` characters (never trained on), each written
in all 9 styles: a query's own source is its style.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

import numpy as np
import torch

from datacredit.data import CharDataset, load_text_sample
from datacredit.dataset import ArrayDataset
from datacredit.sources import Sources

SEQ, BLOCK, HELD_OUT, PASSAGES = 32, 320, 4000, 6
CASES = {"asis": lambda s: s, "upper": str.upper, "lower": str.lower}
ORDERS = {"fwd": lambda s: s, "rot13": lambda s: codecs.encode(s, "rot13"), "rev": lambda s: s[::-1]}
STYLES = [f"{c}-{o}" for c in CASES for o in ORDERS]


def style(text: str, name: str) -> str:
    """``text`` written in style ``name`` (``"<case>-<order>"``); the case is applied first."""
    case, order = name.split("-")
    return ORDERS[order](CASES[case](text))


@dataclass
class StyledText:
    """train ``(n, SEQ + 1)`` token ids with ids 0..n-1; sources (level ``"source"``: a style or ``"random"``);
    queries ``(PASSAGES * 9, SEQ + 1)``; ``query_style[q]`` the index of the query's style in ``STYLES``;
    vocab (index = token id)."""

    train: ArrayDataset
    sources: Sources
    queries: ArrayDataset
    query_style: np.ndarray
    vocab: list[str]


def styled_text(seed: int = 0) -> StyledText:
    """Build the corpus (deterministic given ``seed``; see the module doc)."""
    text = load_text_sample()
    body, tail = text[:-HELD_OUT], text[-HELD_OUT:]
    vocab = sorted({c for name in STYLES for c in style(text, name)})
    rng = np.random.default_rng(seed)
    blocks = [body[b : b + BLOCK] for b in range(0, len(body) - BLOCK + 1, BLOCK)]
    rounds = len(blocks) // len(STYLES)
    per_style: dict[str, list[str]] = {name: [] for name in STYLES}
    for r in range(rounds):
        for k, s in enumerate(rng.permutation(len(STYLES))):
            per_style[STYLES[s]].append(style(blocks[r * len(STYLES) + k], STYLES[s]))
    rows, keys = [], []
    for name in STYLES:
        chunks = CharDataset("".join(per_style[name]), seq_len=SEQ, vocab=vocab).tensors[0]
        rows.append(chunks)
        keys += [name] * len(chunks)
    n_random = len(rows[0])
    rows.append(torch.from_numpy(rng.integers(0, len(vocab), size=(n_random, SEQ + 1))))
    keys += ["random"] * n_random
    tokens = torch.cat(rows)
    ids = np.arange(len(tokens))
    starts = np.sort(rng.choice(len(tail) - SEQ - 1, size=PASSAGES, replace=False))
    coder = CharDataset(vocab[0] * (SEQ + 1), seq_len=SEQ, vocab=vocab)
    queries, query_style = [], []
    for s, name in enumerate(STYLES):
        for start in starts:
            queries.append(coder.encode(style(tail[start : start + SEQ + 1], name)))
            query_style.append(s)
    q = torch.stack(queries)
    return StyledText(ArrayDataset(tokens, ids=ids), Sources(ids, {"source": keys}),
                      ArrayDataset(q, ids=np.arange(100_000, 100_000 + len(q))), np.array(query_style), vocab)
