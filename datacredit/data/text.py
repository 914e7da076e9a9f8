"""A public-domain English text sample shipped with the package, and a character-level LM dataset."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from importlib import resources

import numpy as np
import torch

from datacredit.data.dataset import ArrayDataset
from datacredit.errors import DataError

__all__ = ["CharDataset", "load_text_sample"]

_SAMPLE = "sample.txt"


def load_text_sample() -> str:
    """The bundled sample (`datacredit/data/sample.txt`, ~40 KB of ASCII) without its '#' comment lines."""
    raw = resources.files("datacredit.data").joinpath(_SAMPLE).read_text(encoding="ascii")
    return "".join(line for line in raw.splitlines(keepends=True) if not line.startswith("#"))


class CharDataset(ArrayDataset):
    """Chunks of a text, encoded character by character, for next-character prediction.

    Chunk `k` covers characters `[k * stride, k * stride + seq_len]` (inclusive), so its item is a 1-tuple
    `(x,)` with `x` a `(seq_len + 1,)` int64 tensor: a language model reads `x[:-1]` and predicts `x[1:]`.
    The id of a chunk is its index `k`. A trailing piece shorter than `seq_len + 1` is dropped.

    Args:
        text: the text to chunk.
        seq_len: number of input positions per chunk (>= 1).
        stride: offset between chunk starts; default `seq_len` (each target character appears once).
        vocab: the characters, index = token id; default the sorted unique characters of `text`.
            Characters of `text` missing from it raise DataError.
    """

    def __init__(
        self, text: str, seq_len: int, stride: int | None = None, vocab: Iterable[str] | None = None
    ):
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        stride = seq_len if stride is None else stride
        if stride < 1:
            raise DataError(f"stride must be >= 1, got {stride}")
        chars = sorted(set(text)) if vocab is None else list(vocab)
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise DataError("vocab must be single characters")
        if len(set(chars)) != len(chars):
            raise DataError(
                f"vocab has repeated characters: {sorted({c for c in chars if chars.count(c) > 1})!r}"
            )
        if not chars:
            raise DataError("empty vocabulary (empty text and no vocab given)")
        self.vocab: str = "".join(chars)
        self._index = {c: i for i, c in enumerate(self.vocab)}
        self.seq_len = seq_len
        self.stride = stride

        tokens = self.encode(text)
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"text of {len(tokens)} characters is too short for one chunk of seq_len + 1 = {seq_len + 1}"
            )
        n_chunks = (len(tokens) - (seq_len + 1)) // stride + 1
        starts = torch.arange(n_chunks) * stride
        chunks = tokens[starts[:, None] + torch.arange(seq_len + 1)]  # (n_chunks, seq_len + 1)
        super().__init__(chunks, ids=np.arange(n_chunks, dtype=np.int64))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """`(len(text),)` int64 token ids; characters outside the vocabulary raise DataError naming them."""
        unknown = set(text) - self._index.keys()
        if unknown:
            raise DataError(f"characters not in the vocabulary: {''.join(sorted(unknown))!r}")
        return torch.tensor([self._index[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int] | np.ndarray) -> str:
        """The text of a 1-D sequence of token ids; ids outside `0..vocab_size-1` raise DataError."""
        flat = np.asarray(
            ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64
        ).reshape(-1)
        bad = flat[(flat < 0) | (flat >= self.vocab_size)]
        if bad.size:
            raise DataError(
                f"token ids {sorted(set(bad.tolist()))[:5]} outside the vocabulary of {self.vocab_size}"
            )
        return "".join(self.vocab[i] for i in flat)
