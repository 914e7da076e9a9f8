"""Digests: what a cache depends on, one function per thing digested.

Every cache (a :class:`~datacredit.gradstore.GradientStore` header, a method's stored scores, a fitted curvature,
a ledger's audit) names what it was computed from with these functions, so two caches agree on what "the same model"
or "the same data" means:

* :func:`model_digest` — a model's full ``state_dict`` (parameters *and* buffers: both change the forward), by value;
* :func:`data_digest` — a data set's contents (not its ids: the same ids with corrected labels are other data);
* :func:`ids_digest` — example ids, in order;
* :func:`config_digest` — any configuration: JSON values, tensors and arrays (by value), dataclasses, nested.

All are sha256 hex strings. The tree hash behind them is delimited (type and length of every container, dtype and
shape of every array), so ``[[1, 2], [3]]`` and ``[[1], [2, 3]]`` differ. Objects it cannot see into are hashed by
``repr``; a ``repr`` holding a memory address then changes every run, so such a cache is never reused (refitted or
refused), never wrongly reused. Cost: one read of the bytes hashed (about 1 s per GB); a data set without
``.tensors`` is read item by item (one pass of data loading).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["config_digest", "data_digest", "hash_tree", "ids_digest", "model_digest", "tensor_bytes"]


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of ``t`` (any dtype, bfloat16 included), row-major, on the CPU."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def hash_tree(sha: Any, obj: Any) -> None:
    """Feed ``obj`` into ``sha`` (a hashlib object): tensors and arrays by dtype, shape and bytes; tuples, lists and
    dicts (keys sorted by ``repr``) element by element with their type and length; dataclasses as their fields;
    objects exposing ``__array__`` (PIL images, ...) as arrays; anything else by type name and ``repr``."""
    if isinstance(obj, Tensor):
        sha.update(f"tensor{obj.dtype}{tuple(obj.shape)}".encode())
        sha.update(tensor_bytes(obj))
    elif isinstance(obj, np.ndarray):
        sha.update(f"array{obj.dtype.str}{obj.shape}".encode())
        sha.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, (tuple, list)):
        sha.update(f"{type(obj).__name__}[{len(obj)}]".encode())
        for x in obj:
            hash_tree(sha, x)
    elif isinstance(obj, dict):
        sha.update(f"dict[{len(obj)}]".encode())
        for key in sorted(obj, key=repr):
            sha.update(f"{key!r}=".encode())
            hash_tree(sha, obj[key])
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        sha.update(f"dataclass {type(obj).__module__}.{type(obj).__qualname__}".encode())
        hash_tree(sha, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    elif hasattr(obj, "__array__") and not isinstance(obj, (str, bytes, int, float, bool, np.generic)):
        hash_tree(sha, np.asarray(obj))
    else:
        text = repr(obj)
        sha.update(f"{type(obj).__name__}:{len(text)}:{text}".encode())


def model_digest(model: nn.Module) -> str:
    """sha256 of the model's class and every ``state_dict`` entry's name, dtype, shape and bytes (buffers too: they
    change the forward; frozen parameters too: they change the gradients). Cost: one read of the weights."""
    sha = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        sha.update(repr((name, str(t.dtype), tuple(t.shape))).encode())
        sha.update(tensor_bytes(t))
    return sha.hexdigest()


def data_digest(data: Dataset | DataLoader) -> str:
    """sha256 of a map-style data set's contents (a DataLoader's dataset). A data set with ``.tensors``
    (:class:`~datacredit.data.ArrayDataset`, ``TensorDataset``) is hashed from them directly; any other is read once,
    item by item. Ids are not included: pair it with :func:`ids_digest`."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    sha = hashlib.sha256()
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, (tuple, list)) and tensors and all(isinstance(t, (Tensor, np.ndarray)) for t in tensors):
        hash_tree(sha, list(tensors))
    else:
        n = len(dataset)
        sha.update(f"items[{n}]".encode())
        for i in range(n):
            hash_tree(sha, dataset[i])
    return sha.hexdigest()


def ids_digest(ids: np.ndarray) -> str:
    """sha256 of example ids as int64, in order."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


def config_digest(obj: Any) -> str:
    """sha256 of a configuration (see :func:`hash_tree`): JSON values, tensors, arrays, dataclasses, nested."""
    sha = hashlib.sha256()
    hash_tree(sha, obj)
    return sha.hexdigest()
