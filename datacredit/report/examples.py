"""The examples a report shows next to their scores: images as small inline PNGs, text as escaped ``<pre>``.

``Examples`` pairs ids with what each example looks like (and optionally its label); ``Display`` says how a section
draws them (kind, image shape, a decoder for token ids). ``as_examples`` builds one from
what a user already has: an ``ArrayDataset`` (first tensor = inputs, an optional 1-D last tensor = labels; a
``CharDataset``'s token ids are decoded to text), a mapping ``{id: item}`` or ``{id: (item, label)}``, or an
``Examples``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .markup import esc, img, signed
from .png import image_png

__all__ = ["KINDS", "Display", "Examples", "as_examples"]

KINDS = ("image", "text")


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise DataError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


@dataclass(frozen=True)
class Display:
    """How a report section draws examples.

    kind: ``"image"`` (grayscale or RGB thumbnails, each row of numbers reshaped to ``image_shape``: ``(H, W)``,
    ``(H, W, 3)`` or ``(C, H, W)``) or ``"text"`` (escaped preformatted text; token ids are turned into text by
    ``decode``, by default the dataset's own ``decode``)."""

    kind: str = "image"
    image_shape: tuple[int, ...] = (8, 8)
    decode: Callable[[Any], str] | None = None

    def __post_init__(self) -> None:
        check_kind(self.kind)
        object.__setattr__(self, "image_shape", tuple(int(n) for n in self.image_shape))

    def examples(self, items: Any) -> Examples:
        """``items`` as :class:`Examples` of this kind (see :func:`as_examples`)."""
        return as_examples(items, self.kind, self.decode)


@dataclass(eq=False)
class Examples:
    """What ``n`` examples look like.

    Attributes:
        ids: ``(n,)`` unique integer ids.
        data: ``(n, ...)`` numbers for ``kind="image"`` (each row reshaped by the section's ``image_shape``), or a
            sequence of ``n`` strings for ``kind="text"``.
        labels: ``(n,)`` labels or None.
        kind: ``"image"`` or ``"text"``.
    """

    ids: np.ndarray
    data: Any
    labels: np.ndarray | None = None
    kind: str = "image"

    def __post_init__(self) -> None:
        check_kind(self.kind)
        self.ids = _numpy(self.ids)
        if self.ids.ndim != 1 or (self.ids.size and not np.issubdtype(self.ids.dtype, np.integer)):
            raise DataError(f"Examples ids must be 1-D integers, got {self.ids.dtype} {self.ids.shape}")
        self.ids = self.ids.astype(np.int64)
        if len(np.unique(self.ids)) != len(self.ids):
            raise DataError("Examples ids are not unique")
        if self.kind == "text":
            self.data = [str(t) for t in self.data]
        else:
            self.data = _numpy(self.data)
        if len(self.data) != len(self.ids):
            raise DataError(f"Examples: {len(self.data)} items for {len(self.ids)} ids")
        if self.labels is not None:
            self.labels = _numpy(self.labels).reshape(-1)
            if len(self.labels) != len(self.ids):
                raise DataError(f"Examples: {len(self.labels)} labels for {len(self.ids)} ids")
        self._pos = {int(i): p for p, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, example_id: int) -> bool:
        return int(example_id) in self._pos

    def label(self, example_id: int) -> Any:
        if self.labels is None or int(example_id) not in self._pos:
            return None
        value = self.labels[self._pos[int(example_id)]]
        return value.item() if hasattr(value, "item") else value

    def body(self, example_id: int, image_shape: Sequence[int], thumb_class: str = "thumb") -> str:
        """The example as HTML: an inline PNG or an escaped ``<pre>``; a muted note if the id is unknown."""
        pos = self._pos.get(int(example_id))
        if pos is None:
            return '<span class="muted">(not stored)</span>'
        if self.kind == "text":
            return f"<pre>{esc(self.data[pos])}</pre>"
        return img(image_png(self.data[pos], tuple(image_shape)), f"example {int(example_id)}", thumb_class)

    def card(self, example_id: int, image_shape: Sequence[int], score: float | None = None,
             flagged: bool = False) -> str:
        """A captioned figure: the example, its id and label, its score, and a badge if ``flagged``."""
        caption = [f"id {esc(int(example_id))}"]
        label = self.label(example_id)
        if label is not None:
            caption.append(f"label {esc(label)}")
        line = " · ".join(caption)
        if score is not None:
            line += f"<br>{signed(score)}"
        if flagged:
            line += ' <span class="badge">flipped</span>'
        cls = "ex flag" if flagged else "ex"
        return f'<figure class="{cls}">{self.body(example_id, image_shape)}<figcaption>{line}</figcaption></figure>'


def _from_dataset(dataset: Any, kind: str, decode: Callable[[Any], str] | None) -> Examples:
    tensors = dataset.tensors
    data = tensors[0]
    labels = tensors[-1] if len(tensors) > 1 and tensors[-1].dim() == 1 else None
    if kind == "text" and not isinstance(data, (list, tuple)):
        decode = decode or getattr(dataset, "decode", None)
        if decode is None:
            raise DataError("text examples need strings or a decode function (token ids -> str)")
        data = [decode(row) for row in data]
    return Examples(np.asarray(dataset.ids), data, labels, kind)


def _from_mapping(items: Mapping[int, Any], kind: str, decode: Callable[[Any], str] | None) -> Examples:
    ids, data, labels = [], [], []
    for example_id, item in items.items():
        if isinstance(item, tuple):  # (item,) or (item, label), as datasets return them
            if len(item) > 1:
                label = item[1]
                labels.append(_numpy(label).item() if isinstance(label, (torch.Tensor, np.ndarray)) else label)
            item = item[0]
        ids.append(int(example_id))
        if kind == "text" and not isinstance(item, str):
            if decode is None:
                raise DataError("text examples need strings or a decode function (token ids -> str)")
            item = decode(item)
        data.append(item if kind == "text" else _numpy(item).reshape(-1))
    if labels and len(labels) != len(ids):
        raise DataError("give every item a label ((item, label) pairs) or none of them")
    stacked = data if kind == "text" else (np.stack(data) if data else np.zeros((0, 0)))
    return Examples(np.asarray(ids, dtype=np.int64), stacked, np.asarray(labels) if labels else None, kind)


def as_examples(items: Any, kind: str = "image", decode: Callable[[Any], str] | None = None) -> Examples:
    """``items`` as :class:`Examples` of ``kind``. Accepts an ``Examples``, a dataset with ``.ids`` and
    ``.tensors`` (``ArrayDataset``, ``CharDataset``), or a mapping ``{id: item}`` / ``{id: (item, label)}``.
    ``decode`` turns token ids into text for ``kind="text"`` (a ``CharDataset``'s own ``decode`` is used)."""
    check_kind(kind)
    if isinstance(items, Examples):
        if items.kind != kind:
            raise DataError(f"examples are of kind {items.kind!r}, the section asks for {kind!r}")
        return items
    if hasattr(items, "ids") and hasattr(items, "tensors"):
        return _from_dataset(items, kind, decode)
    if isinstance(items, Mapping):
        return _from_mapping(items, kind, decode)
    raise DataError(f"cannot show examples from a {type(items).__name__}: pass an Examples, an ArrayDataset or "
                    "a mapping {id: item}")
