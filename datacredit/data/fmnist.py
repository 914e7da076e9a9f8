"""Fashion-MNIST from local IDX files (never downloaded).

The files are looked for in `root`, else in `$DATACREDIT_FMNIST_DIR`, else where Debian's
`dataset-fashion-mnist` package installs them (`/usr/share/datasets/fashion-mnist/`, gzipped).
Ids are the examples' original indices.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from datacredit.data.dataset import ArrayDataset
from datacredit.errors import DataError

__all__ = ["DEBIAN_DIR", "ENV_VAR", "load_fashion_mnist", "read_idx"]

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "DATACREDIT_FMNIST_DIR"
_HOW_TO_GET = (
    "install Debian's `dataset-fashion-mnist` package (apt-get install dataset-fashion-mnist) "
    f"or set {ENV_VAR}"
)

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally `.gz`) into an array of its dims in native byte order.

    Header: two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int, 0x0D float,
    0x0E double), the number of dims, then each dim as a big-endian uint32. Raises DataError naming the file
    if the header is bad or the data is shorter or longer than the dims say.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise DataError(f"IDX file not found: {path}") from e
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut gzip stream raises EOFError
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4:
        raise DataError(
            f"IDX file {path} is truncated: {len(raw)} bytes, shorter than the 4-byte magic number"
        )
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file: magic number starts {raw[:2].hex()}, expected 0000")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"IDX file {path} has unknown type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"IDX file {path} is truncated: {len(raw)} bytes, header needs {header} for {ndim} dims"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) < expected:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, dims {dims} need {expected}")
    if len(raw) > expected:
        raise DataError(f"IDX file {path} has {len(raw) - expected} trailing bytes after dims {dims}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def _search_dirs(root: str | os.PathLike[str] | None) -> list[Path]:
    if root is not None:
        return [Path(root)]
    env = os.environ.get(ENV_VAR)
    return [Path(env)] if env else [DEBIAN_DIR]


def _find(dirs: list[Path], stem: str) -> Path:
    """The first existing `<dir>/<stem>` or `<dir>/<stem>.gz`, else DataError listing every path searched."""
    tried = [d / name for d in dirs for name in (stem, stem + ".gz")]
    for p in tried:
        if p.is_file():
            return p
    raise DataError(
        f"Fashion-MNIST file {stem} not found; searched {', '.join(str(p) for p in tried)}. {_HOW_TO_GET}"
    )


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    flatten: bool = True,
) -> ArrayDataset:
    """Fashion-MNIST `split` ("train": 60000, "test": 10000) as `ArrayDataset(x, y)`.

    `x` is `(n, 784)` float32 (or `(n, 1, 28, 28)` when `flatten=False`) with pixels in [0, 1]; `y` is `(n,)`
    int64 in 0..9. With `limit`, a random subset of that many examples chosen by
    `np.random.default_rng(seed)`, sorted by id. Ids are always the examples' indices in the original files.
    """
    if split not in _PREFIX:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    dirs = _search_dirs(root)
    prefix = _PREFIX[split]
    images = read_idx(_find(dirs, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(dirs, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match "
            "(expected (n, rows, cols) and (n,))"
        )
    n = len(labels)
    ids = np.arange(n, dtype=np.int64)
    if limit is not None:
        if not 0 < limit <= n:
            raise DataError(f"limit must be in 1..{n} for the {split} split, got {limit}")
        ids = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
    x = torch.from_numpy(images[ids].astype(np.float32) / 255.0)
    x = x.reshape(len(ids), -1) if flatten else x.unsqueeze(1)
    y = torch.from_numpy(labels[ids].astype(np.int64))
    return ArrayDataset(x, y, ids=ids)
