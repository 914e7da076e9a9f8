"""On-disk artefacts of one method or run, kept in one directory.

Layout of a store directory::

    root/
      manifest.json          {"format_version": 1, "artefacts": {name: entry}}
      <name>.safetensors     kind "tensors": a dict of torch tensors (curvature factors, ...)
      <name>.npy             kind "array": a numpy array (plain, or a memmap filled chunk by chunk)
      <name>.npy.done        done flags of a chunked array: a bool .npy of shape (n_chunks,)
      <name>.json            kind "json": any JSON-serialisable object

An entry is ``{"file", "kind", "shape", "dtype", "bytes", "sha256", "meta"}`` (chunked arrays add
``"chunks"``). For tensors, ``shape`` and ``dtype`` map each tensor's key to its shape / dtype. ``sha256`` is
``None`` for chunked memmaps (never hashed); arrays are hash-checked only when loaded into memory.

Atomicity: every file except a chunked memmap is written to a temporary file in the same directory, fsynced,
and moved over its final name with ``os.replace``, so a reader sees the old file or the new one, never a
partial one. The data file is written before the manifest, and the manifest is the source of truth: an
artefact exists only once its entry is written, and a load checks size (and hash) against the entry, so a
crash between the two is detected. A chunked memmap is written in place; its done flags are rewritten
atomically after each chunk (after the memmap is flushed), so on resume only chunks whose flag is set are
trusted. Nothing is ever pickled: tensors go through safetensors, arrays through ``np.save``/``np.load`` with
``allow_pickle=False``.

One process writes a store at a time; readers may run concurrently with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import safetensors.torch
import torch

from datacredit.errors import DataError, StoreError

__all__ = ["ChunkedArray", "Store", "atomic_write_bytes", "atomic_write_json"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_SUFFIX = {"tensors": ".safetensors", "array": ".npy", "json": ".json"}
_HASH_BLOCK = 1 << 22


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a file that, on a clean exit, is fsynced and moved over ``path``; on error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, ``os.replace``)."""
    with _atomic_file(path) as f:
        f.write(data)


def _json_bytes(obj: Any, what: str) -> bytes:
    try:
        return json.dumps(obj, indent=2).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what} is not JSON-serialisable: {exc}") from exc


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically; raises DataError if it is not JSON-serialisable."""
    atomic_write_bytes(path, _json_bytes(obj, f"object for {path}"))


class _HashingWriter:
    """File-like wrapper that hashes and counts what passes through ``write``."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self.sha.update(data)
        self.n += len(data)
        return len(data)


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            sha.update(block)
    return sha.hexdigest()


def _meta(meta: dict[str, Any] | None) -> dict[str, Any]:
    """Validate ``meta`` and return it as it will read back from JSON (tuples become lists)."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise DataError(f"meta must be a dict, got {type(meta).__name__}")
    return json.loads(_json_bytes(meta, "meta"))


class ChunkedArray:
    """An ``.npy`` memmap filled chunk by chunk, with a persisted done flag per chunk (see ``Store.chunked``).

    Write rows into ``.array`` then call ``mark_done(i)`` (or use ``write``); after a crash, reopening the
    same name resumes: ``pending()`` lists the chunks still to do, and rows of finished chunks are kept.
    """

    def __init__(self, array: np.memmap, flags: np.ndarray, flags_path: Path) -> None:
        self.array = array
        self._flags = flags
        self._flags_path = flags_path

    @property
    def n_chunks(self) -> int:
        return len(self._flags)

    def _check(self, i: int) -> int:
        if not 0 <= i < self.n_chunks:
            raise DataError(f"chunk index {i} out of range [0, {self.n_chunks})")
        return int(i)

    def rows(self, i: int) -> slice:
        """Rows (axis 0) of chunk ``i``, splitting the array as evenly as possible (as ``np.array_split``)."""
        i = self._check(i)
        size, extra = divmod(self.array.shape[0], self.n_chunks)
        start = i * size + min(i, extra)
        return slice(start, start + size + (i < extra))

    def done(self, i: int) -> bool:
        return bool(self._flags[self._check(i)])

    def pending(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self._flags)]

    @property
    def complete(self) -> bool:
        return bool(self._flags.all())

    def mark_done(self, i: int) -> None:
        """Flush the memmap to disk, then persist chunk ``i``'s done flag atomically."""
        i = self._check(i)
        self.array.flush()
        flags = self._flags.copy()
        flags[i] = True
        _write_flags(self._flags_path, flags)
        self._flags = flags

    def write(self, i: int, rows: slice | int | np.ndarray | None, values: np.ndarray) -> None:
        """``array[rows] = values`` then ``mark_done(i)``; ``rows=None`` means ``self.rows(i)``."""
        self.array[self.rows(i) if rows is None else rows] = values
        self.mark_done(i)


def _write_flags(path: Path, flags: np.ndarray) -> None:
    with _atomic_file(path) as f:
        np.save(f, flags, allow_pickle=False)


class Store:
    """A directory of named artefacts (tensors, arrays, JSON) listed in ``manifest.json``; see module doc."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise StoreError(f"{self.root}: store directory does not exist")

    # -- manifest -------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def _read_manifest(self) -> dict[str, dict[str, Any]]:
        path = self.manifest_path
        if not path.exists():
            return {}
        try:
            doc = json.loads(path.read_bytes())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise StoreError(f"{path}: corrupt manifest ({exc})") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("artefacts"), dict):
            raise StoreError(f"{path}: corrupt manifest (no 'artefacts' mapping)")
        if doc.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path}: unsupported format_version {doc.get('format_version')!r}")
        return doc["artefacts"]

    def _write_manifest(self, artefacts: dict[str, dict[str, Any]]) -> None:
        doc = {"format_version": FORMAT_VERSION, "artefacts": artefacts}
        atomic_write_bytes(self.manifest_path, _json_bytes(doc, "manifest"))

    def _commit(self, name: str, entry: dict[str, Any]) -> None:
        """Record ``entry`` under ``name``; delete files of a replaced entry that the new one does not use."""
        artefacts = self._read_manifest()
        old = artefacts.get(name)
        artefacts[name] = entry
        self._write_manifest(artefacts)
        if old is not None:
            for stale in set(_files(old)) - set(_files(entry)):
                (self.root / stale).unlink(missing_ok=True)

    def _entry(self, name: str, kind: str) -> dict[str, Any]:
        entry = self._read_manifest().get(name)
        if entry is None:
            raise StoreError(f"{self.manifest_path}: no artefact named {name!r}")
        if entry.get("kind") != kind:
            raise StoreError(
                f"{self.manifest_path}: artefact {name!r} is {entry.get('kind')!r}, not {kind!r}"
            )
        return entry

    def _path(self, name: str, kind: str) -> Path:
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == Path(MANIFEST).stem:
            raise DataError(
                f"invalid artefact name {name!r}: use letters, digits, '_', '-', '.' (not 'manifest')"
            )
        return self.root / (name + _SUFFIX[kind])

    def _read_checked(self, entry: dict[str, Any], *, verify: bool = True) -> Path:
        """Path of ``entry``'s file after checking it exists, has the recorded size and (if asked) hash."""
        path = self.root / entry["file"]
        if not path.is_file():
            raise StoreError(f"{path}: file is missing (listed in {self.manifest_path})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise StoreError(f"{path}: truncated or wrong size: {size} bytes, manifest says {entry['bytes']}")
        if verify and entry.get("sha256") and _file_sha256(path) != entry["sha256"]:
            raise StoreError(f"{path}: corrupt, sha256 does not match the manifest")
        return path

    # -- queries --------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._read_manifest())

    def has(self, name: str) -> bool:
        return name in self._read_manifest()

    def info(self, name: str) -> dict[str, Any]:
        """A copy of ``name``'s manifest entry (file, kind, shape, dtype, bytes, sha256, meta)."""
        entry = self._read_manifest().get(name)
        if entry is None:
            raise StoreError(f"{self.manifest_path}: no artefact named {name!r}")
        return json.loads(json.dumps(entry))

    def remove(self, name: str) -> None:
        """Drop ``name`` from the manifest, then delete its files."""
        artefacts = self._read_manifest()
        if name not in artefacts:
            raise StoreError(f"{self.manifest_path}: no artefact named {name!r}")
        entry = artefacts.pop(name)
        self._write_manifest(artefacts)
        for file in _files(entry):
            (self.root / file).unlink(missing_ok=True)

    # -- tensors --------------------------------------------------------------------------------------------
    def save_tensors(
        self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
    ) -> None:
        """Save a dict of tensors (moved to CPU, made contiguous) as ``<name>.safetensors``."""
        path, meta = self._path(name, "tensors"), _meta(meta)
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in tensors.items()
        ):
            raise DataError(f"save_tensors({name!r}) needs a dict[str, torch.Tensor]")
        flat, seen = {}, set()
        for key, t in tensors.items():
            t = t.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            flat[key] = t.clone() if ptr in seen and t.numel() else t  # safetensors rejects shared storage
            seen.add(ptr)
        data = safetensors.torch.save(flat)
        atomic_write_bytes(path, data)
        self._commit(name, {
            "file": path.name, "kind": "tensors",
            "shape": {k: list(t.shape) for k, t in flat.items()},
            "dtype": {k: str(t.dtype).removeprefix("torch.") for k, t in flat.items()},
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "meta": meta,
        })

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Load tensors saved by ``save_tensors`` (on CPU), after checking size and sha256."""
        path = self._read_checked(self._entry(name, "tensors"))
        try:
            return safetensors.torch.load(path.read_bytes())
        except Exception as exc:  # safetensors raises several types for a malformed file
            raise StoreError(f"{path}: not a valid safetensors file ({exc})") from exc

    # -- json -----------------------------------------------------------------------------------------------
    def save_json(self, name: str, obj: Any, meta: dict[str, Any] | None = None) -> None:
        path, meta = self._path(name, "json"), _meta(meta)
        data = _json_bytes(obj, f"artefact {name!r}")
        atomic_write_bytes(path, data)
        self._commit(name, {
            "file": path.name, "kind": "json", "shape": None, "dtype": None,
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "meta": meta,
        })

    def load_json(self, name: str) -> Any:
        path = self._read_checked(self._entry(name, "json"))
        try:
            return json.loads(path.read_bytes())
        except (UnicodeDecodeError, ValueError) as exc:
            raise StoreError(f"{path}: invalid JSON ({exc})") from exc

    # -- arrays ---------------------------------------------------------------------------------------------
    def save_array(self, name: str, arr: np.ndarray, meta: dict[str, Any] | None = None) -> None:
        """Save ``arr`` (any shape, no object dtype; a memmap is streamed) as ``<name>.npy``."""
        path, meta = self._path(name, "array"), _meta(meta)
        arr = np.asanyarray(arr)
        if arr.dtype.hasobject:
            raise DataError(f"save_array({name!r}): object arrays cannot be stored (they would need pickle)")
        with _atomic_file(path) as f:
            writer = _HashingWriter(f)
            np.save(writer, arr, allow_pickle=False)
        self._commit(name, {
            "file": path.name, "kind": "array", "shape": list(arr.shape), "dtype": arr.dtype.str,
            "bytes": writer.n, "sha256": writer.sha.hexdigest(), "meta": meta,
        })

    def load_array(self, name: str, mmap: bool = False) -> np.ndarray:
        """Load an array; ``mmap=True`` gives a read-only memmap (its hash is not checked).

        A chunked array loads only once every chunk is done.
        """
        entry = self._entry(name, "array")
        path = self._read_checked(entry, verify=not mmap)
        if "chunks" in entry:
            flags = self._load_flags(entry)
            if not flags.all():
                n_pending = int((~flags).sum())
                raise StoreError(
                    f"{path}: chunked array is incomplete ({n_pending} of {len(flags)} chunks pending)"
                )
        arr = _load_npy(path, "r" if mmap else None)
        _check_layout(path, arr, entry["shape"], entry["dtype"])
        return arr

    def _load_flags(self, entry: dict[str, Any]) -> np.ndarray:
        path = self.root / entry["chunks"]["file"]
        flags = _load_npy(path, None)
        if flags.dtype != np.bool_ or flags.shape != (entry["chunks"]["n"],):
            raise StoreError(f"{path}: done flags have dtype {flags.dtype} and shape {flags.shape}, "
                             f"expected bool ({entry['chunks']['n']},)")
        return flags

    def chunked(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: np.dtype | type | str,
        n_chunks: int,
        meta: dict[str, Any] | None = None,
        *,
        overwrite: bool = False,
    ) -> ChunkedArray:
        """Open (resume) or create a memmap of ``shape``/``dtype`` filled in ``n_chunks`` chunks along axis 0.

        Reopening with the same shape, dtype, n_chunks and meta resumes; anything else raises StoreError
        unless ``overwrite=True``, which starts afresh (all chunks pending).
        """
        path, meta = self._path(name, "array"), _meta(meta)
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        if dtype.hasobject or not shape or min(shape) < 0 or int(n_chunks) < 1:
            raise DataError(
                f"chunked({name!r}): need a non-object dtype, a shape with >= 1 non-negative dims and "
                f"n_chunks >= 1; got dtype={dtype}, shape={shape}, n_chunks={n_chunks}"
            )
        n_chunks = int(n_chunks)
        flags_path = path.with_name(path.name + ".done")
        want = {"shape": list(shape), "dtype": dtype.str, "n_chunks": n_chunks, "meta": meta}
        artefacts = self._read_manifest()
        old = artefacts.get(name)
        if old is not None and not overwrite:
            have = {"shape": old.get("shape"), "dtype": old.get("dtype"),
                    "n_chunks": old.get("chunks", {}).get("n"), "meta": old.get("meta")}
            diff = [f"{k}: stored {have[k]!r}, requested {want[k]!r}" for k in want if have[k] != want[k]]
            if old.get("kind") != "array" or "chunks" not in old or diff:
                why = "; ".join(diff) if "chunks" in old else "not a chunked array"
                raise StoreError(
                    f"{self.root / old.get('file', name)}: cannot resume {name!r} ({why}); "
                    "pass overwrite=True to start afresh"
                )
            data_path = self._read_checked(old, verify=False)
            array = _load_npy(data_path, "r+")
            _check_layout(data_path, array, old["shape"], old["dtype"])
            return ChunkedArray(array, self._load_flags(old), flags_path)
        if old is not None:  # forget the old entry first: a crash below must never pair old flags, new data
            self.remove(name)
        flags = np.zeros(n_chunks, dtype=np.bool_)
        _write_flags(flags_path, flags)
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        array.flush()
        self._commit(name, {
            "file": path.name, "kind": "array", "shape": list(shape), "dtype": dtype.str,
            "bytes": path.stat().st_size, "sha256": None, "meta": meta,
            "chunks": {"n": n_chunks, "file": flags_path.name},
        })
        return ChunkedArray(array, flags, flags_path)


def _files(entry: dict[str, Any]) -> list[str]:
    return [entry["file"]] + ([entry["chunks"]["file"]] if "chunks" in entry else [])


def _load_npy(path: Path, mmap_mode: str | None) -> np.ndarray:
    if not path.is_file():
        raise StoreError(f"{path}: file is missing")
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise StoreError(f"{path}: truncated or corrupt .npy file ({exc})") from exc


def _check_layout(path: Path, arr: np.ndarray, shape: list[int], dtype: str) -> None:
    if list(arr.shape) != list(shape) or arr.dtype != np.dtype(dtype):
        raise StoreError(f"{path}: holds shape {tuple(arr.shape)} dtype {arr.dtype.str}, "
                         f"manifest says shape {tuple(shape)} dtype {dtype}")
