"""Bundled small data (sklearn digits, a public-domain text sample) and a local Fashion-MNIST reader.

Every dataset here is map-style and its examples carry stable integer ids (`example_ids`);
nothing is downloaded.
"""

from datacredit.data.digits import flip_labels, load_digits
from datacredit.data.fmnist import load_fashion_mnist, read_idx
from datacredit.data.text import CharDataset, load_text_sample
from datacredit.dataset import ArrayDataset, example_ids

__all__ = [
    "ArrayDataset",
    "CharDataset",
    "example_ids",
    "flip_labels",
    "load_digits",
    "load_fashion_mnist",
    "load_text_sample",
    "read_idx",
]
