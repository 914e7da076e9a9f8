"""On-disk artefacts of one method or run, kept in one directory.

Layout of a store directory::

    root/
      manifest.json          {"format_version": 1, "kind": "scores" | ... | absent,
                              "artefacts": {name: entry}, "journal": [file, ...]}
      <name>.safetensors     kind "tensors": a dict of torch tensors (curvature factors, ...)
      <name>.npy             kind "array": a numpy array (plain, or a memmap filled chunk by chunk)
      <name>.npy.done        done flags of a chunked array: a bool .npy of shape (n_chunks,)
      <name>.json            kind "json": any JSON-serialisable object
      <name>.<16 hex>.npy    the same, when the canonical name is still in use by the version being replaced
      .manifest.lock         flock taken around every manifest read-modify-write (see datacredit.lock)

An entry is ``{"file", "kind", "shape", "dtype", "bytes", "sha256", "meta"}`` (chunked arrays add
``"chunks": {"n", "file"}``). For tensors, ``shape`` and ``dtype`` map each tensor's key to its shape / dtype.
The manifest is the only source of truth: a file is an artefact only while an entry names it.

**Containment.** An entry's ``file`` (and chunk-flag file) must be one plain file name inside the root: no
``/``, no leading ``.``, no ``..``, not ``manifest.json``. The whole manifest is checked when it is read, so a
hostile manifest is refused (StoreError naming the entry) before anything is opened or deleted; a file that
is a symlink is never read (opened with ``O_NOFOLLOW``) and never deleted.

**Write new before retiring old.** A save writes its data to a fresh temp file (``.<file>.<token>.tmp``,
flocked while its writer lives), fsyncs it, and then, under the manifest lock, renames it to a name no entry
uses (``<name>.npy`` when free, else ``<name>.<16 hex>.npy``), fsyncs the directory, rewrites the manifest
atomically (temp + fsync + rename) and only then unlinks the file the old entry named. A process killed at any
instant therefore leaves the old or the new artefact loadable, never neither. Several saves can be committed in
one manifest update (:meth:`Store.transaction`), which is how ``Scores.save`` swaps values and ids together.
A chunked memmap is created the same way (data and all-pending flags committed together), then filled in
place: after each chunk the memmap is flushed and the done flags are rewritten atomically, so a resume trusts
exactly the chunks whose flag is set. Files the store may leave unreferenced after a kill are recognisable:
temp files (skipped while their writer holds their flock), token-named data files, and files named in the
manifest's ``journal`` (canonical names about to be placed, or just retired). The next ``Store(root)`` opened
for writing deletes those strays, and only those, when no other process holds the manifest lock; unknown files
are never touched.

**Hashes.** Every plain artefact records its sha256; loads check size and hash, memory-mapped loads included
(one streaming pass at open, never the whole array in RAM; about 2 s per GiB, see :meth:`Store.load_array`).
A chunked memmap is hashed once, when its last chunk is marked done, before that flag is written; loads and
reopens of a complete chunked array check it. Legacy complete chunked arrays written before hashes were
recorded load unchecked.

**Kinds.** A store may say what it holds (manifest ``"kind"``: ``"scores"``, ``"groundtruth"``, ...);
:meth:`Store.claim` and ``transaction(kind=...)`` refuse a directory holding another kind of artefact unless
``overwrite=True``. Manifests without the new fields (``kind``, ``journal``) load as before.

Nothing is ever pickled: tensors go through safetensors, arrays through ``np.save``/``np.load`` with
``allow_pickle=False``. Several processes may save different artefacts into one store concurrently (the manifest
lock serialises commits). Readers never lock: a load reads one manifest snapshot (:meth:`Store.load_arrays` for
several artefacts of one version) and starts again from a fresh one if a concurrent save retired a file it needed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TypeVar

import numpy as np
import safetensors.torch
import torch

from datacredit.errors import DataError, StoreError
from datacredit.lock import MANIFEST_LOCK, manifest_lock

__all__ = ["ChunkedArray", "Store", "atomic_write_bytes", "atomic_write_json"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_SUFFIX = {"tensors": ".safetensors", "array": ".npy", "json": ".json"}
_FLAGS = ".done"
_HASH_BLOCK = 1 << 22
_TMP = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")  # what _atomic_file and staged saves create
_TOKEN_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\.[0-9a-f]{16}\.(?:npy|npy\.done|safetensors|json)")
_READ_RETRIES = 50  # a reader racing a writer that replaces the same artefact back to back still gets through
_T = TypeVar("_T")


class _Stale(StoreError):
    """A file looked up in the manifest was retired by a concurrent save before we opened it."""


# -- files ------------------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _create_locked_temp(path: Path) -> tuple[Path, BinaryIO]:
    """Create and flock a fresh temp file next to ``path``; the flock tells stray cleanup its writer is alive.

    Creating and locking are two steps, so a cleaner may delete the file in between; we then see that the
    name no longer points to our file and start again with a new name.
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            still_ours = os.stat(tmp, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            still_ours = False
        if still_ours:
            return tmp, os.fdopen(fd, "r+b")
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a file that, on a clean exit, is fsynced and moved over ``path``; on error it is removed.

    The temp file stays open (and flocked) until after the rename, so cleanup never takes it for a stray.
    """
    path = Path(path)
    tmp, f = _create_locked_temp(path)
    try:
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    finally:
        f.close()
    _fsync_dir(path.parent)


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


def _stream_sha256(f: BinaryIO) -> str:
    """sha256 of an open file from its start, read in 4 MiB blocks (never the whole file in memory)."""
    sha = hashlib.sha256()
    f.seek(0)
    while block := f.read(_HASH_BLOCK):
        sha.update(block)
    return sha.hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return _stream_sha256(f)


def _open_nofollow(path: Path) -> BinaryIO:
    """Open ``path`` for reading, refusing a symlink (StoreError) and a missing file (FileNotFoundError)."""
    try:  # through open() so that f.name (and a memmap's .filename) is the path
        return open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW))  # noqa: SIM115
    except OSError as exc:
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise StoreError(f"{path}: is a symlink; a store only reads plain files inside its directory") from exc
        raise


def _meta(meta: dict[str, Any] | None) -> dict[str, Any]:
    """Validate ``meta`` and return it as it will read back from JSON (tuples become lists)."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise DataError(f"meta must be a dict, got {type(meta).__name__}")
    return json.loads(_json_bytes(meta, "meta"))


def _files(entry: dict[str, Any]) -> list[str]:
    return [entry["file"]] + ([entry["chunks"]["file"]] if "chunks" in entry else [])


def _plain_name(file: Any) -> bool:
    """A single path component the store could have written: no separator, no leading dot, not the manifest."""
    return isinstance(file, str) and bool(_NAME.fullmatch(file)) and file != MANIFEST


# -- staged saves -----------------------------------------------------------------------------------------
@dataclass
class _Staged:
    """A save written to flocked temp files and not yet committed: entry minus file names."""

    name: str
    entry: dict[str, Any]
    suffixes: list[str]  # data file first; a chunked array adds its flags file
    temps: list[Path] = field(default_factory=list)
    handles: list[BinaryIO] = field(default_factory=list)
    finals: list[str] = field(default_factory=list)

    def close(self) -> None:
        for f in self.handles:
            with contextlib.suppress(OSError):
                f.close()
        self.handles = []

    def discard(self, root: Path, keep: Collection[str] = ()) -> None:
        """Remove whatever this save created and never committed (temp files, placed names not in ``keep``)."""
        for p in self.temps + [root / f for f in self.finals if f not in keep]:
            with contextlib.suppress(OSError):
                p.unlink()
        self.close()


class ChunkedArray:
    """An ``.npy`` memmap filled chunk by chunk, with a persisted done flag per chunk (see ``Store.chunked``).

    Write rows into ``.array`` then call ``mark_done(i)`` (or use ``write``); after a crash, reopening the
    same name resumes: ``pending()`` lists the chunks still to do, and rows of finished chunks are kept.
    Marking the last chunk done hashes the whole file and records the sha256 in the manifest before the flag is
    written, so a complete array is always hash-checked on load. A chunk index is a unit of work, not a fixed
    row range (callers may fill any region per chunk), which is why the hash covers the finished file.
    """

    def __init__(self, array: np.memmap, flags: np.ndarray, flags_path: Path, *, store: Store | None = None,
                 name: str | None = None, file: str | None = None) -> None:
        self.array = array
        self._flags = flags
        self._flags_path = flags_path
        self._store, self._name, self._file = store, name, file

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
        """Flush the memmap to disk, then persist chunk ``i``'s done flag atomically.

        With a store (always, from :meth:`Store.chunked`) this happens under the manifest lock and merges the
        flags on disk, so two processes filling different chunks of one array never erase each other's flags.
        When this completes the array, its sha256 is committed to the manifest first: a crash in between
        leaves that chunk pending (it is redone and rehashed), never a complete array without a hash.
        """
        i = self._check(i)
        self.array.flush()
        if self._store is None or self._name is None or self._file is None:
            flags = self._flags.copy()
            flags[i] = True
            _write_flags(self._flags_path, flags)
        else:
            flags = self._store._mark_done(self._name, self._file, self._flags_path, i, self._flags)
        self._flags = flags

    def refresh(self) -> None:
        """Re-read the done flags from disk (chunks another process finished since this one opened the array)."""
        if self._store is not None and self._name is not None:
            self._flags = self._flags | self._store._load_flags(self._name, self._store._entry(self._name, "array"))

    def write(self, i: int, rows: slice | int | np.ndarray | None, values: np.ndarray) -> None:
        """``array[rows] = values`` then ``mark_done(i)``; ``rows=None`` means ``self.rows(i)``."""
        self.array[self.rows(i) if rows is None else rows] = values
        self.mark_done(i)


def _write_flags(path: Path, flags: np.ndarray) -> None:
    with _atomic_file(path) as f:
        np.save(f, flags, allow_pickle=False)


@contextlib.contextmanager
def _try_manifest_lock(root: Path) -> Iterator[bool]:
    """The manifest lock without waiting: yields False (and holds nothing) if another process has it."""
    try:
        fd = os.open(root / MANIFEST_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError:  # read-only directory, or a symlinked lock file: do not clean
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class Store:
    """A directory of named artefacts (tensors, arrays, JSON) listed in ``manifest.json``; see module doc.

    ``Store(root)`` (``create=True``) opens for writing: it creates the directory and removes strays left by a
    killed writer. ``create=False`` opens an existing store read-only and changes nothing on disk.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        self._txn: list[_Staged] | None = None
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
            self.clean()
        elif not self.root.is_dir():
            raise StoreError(f"{self.root}: store directory does not exist")

    # -- manifest -------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def _read_doc(self) -> dict[str, Any]:
        """The whole manifest, validated (every file name contained); an empty store if there is none."""
        path = self.manifest_path
        if not os.path.lexists(path):
            return {"format_version": FORMAT_VERSION, "artefacts": {}}
        try:
            with _open_nofollow(path) as f:
                doc = json.loads(f.read())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise StoreError(f"{path}: corrupt manifest ({exc})") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("artefacts"), dict):
            raise StoreError(f"{path}: corrupt manifest (no 'artefacts' mapping)")
        if doc.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path}: unsupported format_version {doc.get('format_version')!r}")
        if not isinstance(doc.get("kind"), (str, type(None))):
            raise StoreError(f"{path}: corrupt manifest ('kind' is {doc.get('kind')!r}, not a string)")
        journal = doc.get("journal", [])
        if not isinstance(journal, list) or not all(_plain_name(f) for f in journal):
            raise StoreError(f"{path}: corrupt manifest ('journal' must list plain file names inside the store)")
        for name, entry in doc["artefacts"].items():
            self._validate_entry(name, entry)
        return doc

    def _validate_entry(self, name: str, entry: Any) -> None:
        path = self.manifest_path
        if not isinstance(entry, dict) or entry.get("kind") not in _SUFFIX or not isinstance(entry.get("bytes"), int):
            raise StoreError(f"{path}: corrupt manifest (entry {name!r} lacks a valid kind or byte count)")
        chunks = entry.get("chunks")
        if chunks is not None and (not isinstance(chunks, dict) or not isinstance(chunks.get("n"), int)):
            raise StoreError(f"{path}: corrupt manifest (entry {name!r} has malformed 'chunks')")
        files = [("file", entry.get("file"))] + ([("chunk-flag file", chunks.get("file"))] if chunks else [])
        for what, file in files:
            if not _plain_name(file):
                raise StoreError(
                    f"{path}: artefact {name!r} names {what} {file!r}, which is not a plain file name inside "
                    f"{self.root}; refusing to read or delete it"
                )

    def _read_manifest(self) -> dict[str, dict[str, Any]]:
        """The validated ``artefacts`` mapping of the manifest."""
        return self._read_doc()["artefacts"]

    def _write_doc(self, doc: dict[str, Any]) -> None:
        out = {"format_version": FORMAT_VERSION}
        if doc.get("kind") is not None:
            out["kind"] = doc["kind"]
        out["artefacts"] = doc["artefacts"]
        if doc.get("journal"):
            out["journal"] = sorted(set(doc["journal"]))
        atomic_write_bytes(self.manifest_path, _json_bytes(out, "manifest"))

    def _file(self, file: str, name: str) -> Path:
        """Path of a validated file name, refusing a symlink or anything that resolves outside the root."""
        path = self.root / file
        if path.is_symlink():
            raise StoreError(f"{path}: artefact {name!r} is a symlink; a store only reads plain files inside "
                             f"its directory")
        if path.resolve().parent != self.root.resolve():
            raise StoreError(f"{path}: artefact {name!r} resolves outside {self.root}")
        return path

    def _unlink(self, file: str) -> None:
        """Delete a store file by name: only a plain name, never a symlink, never outside the root."""
        if not _plain_name(file):
            return
        path = self.root / file
        with contextlib.suppress(OSError):
            if not path.is_symlink() and path.resolve().parent == self.root.resolve():
                path.unlink()

    def _entry(self, name: str, kind: str, artefacts: dict[str, Any] | None = None) -> dict[str, Any]:
        entry = (self._read_manifest() if artefacts is None else artefacts).get(name)
        if entry is None:
            raise StoreError(f"{self.manifest_path}: no artefact named {name!r}")
        if entry.get("kind") != kind:
            raise StoreError(
                f"{self.manifest_path}: artefact {name!r} is {entry.get('kind')!r}, not {kind!r}"
            )
        return entry

    def _check_name(self, name: str) -> str:
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == Path(MANIFEST).stem:
            raise DataError(
                f"invalid artefact name {name!r}: use letters, digits, '_', '-', '.' (not 'manifest')"
            )
        return name

    @contextlib.contextmanager
    def _open_entry(self, name: str, entry: dict[str, Any], *, verify: bool = True
                    ) -> Iterator[tuple[Path, BinaryIO]]:
        """Open ``entry``'s file after checking its size (and hash, if asked) on the open descriptor.

        A problem with a file whose entry has meanwhile changed (a concurrent save retired it) raises
        :class:`_Stale`, which :meth:`_retrying` answers by reading the manifest again.
        """
        path = self._file(entry["file"], name)
        try:
            f = _open_nofollow(path)
        except FileNotFoundError:
            self._problem(name, entry, f"{path}: file is missing (listed in {self.manifest_path})")
        try:
            size = os.fstat(f.fileno()).st_size
            if size != entry["bytes"]:
                self._problem(name, entry, f"{path}: truncated or wrong size: {size} bytes, manifest says "
                                           f"{entry['bytes']}")
            if verify and entry.get("sha256") and _stream_sha256(f) != entry["sha256"]:
                self._problem(name, entry, f"{path}: corrupt, sha256 does not match the manifest")
            f.seek(0)
        except BaseException:
            f.close()
            raise
        with f:
            yield path, f

    def _problem(self, name: str, entry: dict[str, Any], message: str) -> NoReturn:
        try:
            changed = self._read_manifest().get(name) != entry
        except StoreError:
            changed = False
        raise (_Stale if changed else StoreError)(message)

    def _retrying(self, load: Callable[[dict[str, Any]], _T]) -> _T:
        """``load(manifest)`` on one manifest snapshot, again on a fresh one if a concurrent save retired a file
        it needed: every artefact a load returns comes from the same committed version of the store."""
        for attempt in range(_READ_RETRIES):
            try:
                return load(self._read_doc())
            except _Stale as exc:
                if attempt == _READ_RETRIES - 1:
                    raise StoreError(str(exc)) from None
                time.sleep(0.001 * attempt)  # back off: on a loaded machine the writer may need the core
        raise AssertionError("unreachable")

    # -- commits --------------------------------------------------------------------------------------------
    def _kind_conflict(self, doc: dict[str, Any], kind: str, adopt: Collection[str]) -> str | None:
        """Why this store cannot hold ``kind`` (None if it can): it holds another kind, or unknown artefacts."""
        have, names = doc.get("kind"), sorted(doc["artefacts"])
        if have == kind:
            return None
        if have is not None:
            listed = ", ".join(names) or "no artefacts left"
            return f"{self.root}: holds a {have!r} store ({listed}), not {kind!r}"
        other = [n for n in names if n not in adopt]
        if not other:
            return None
        return f"{self.root}: holds other artefacts ({', '.join(other)}), not a {kind!r} store"

    def _refuse(self, why: str) -> None:
        raise StoreError(f"{why}; pass overwrite=True to replace them, or use another directory")

    def _choose_finals(self, staged: _Staged, taken: set[str]) -> tuple[list[str], bool]:
        """Canonical names if no entry uses them and nothing is there, else fresh token names."""
        canonical = [staged.name + s for s in staged.suffixes]
        if all(c not in taken and not os.path.lexists(self.root / c) for c in canonical):
            return canonical, True
        while True:
            token = secrets.token_hex(8)
            names = [f"{staged.name}.{token}{s}" for s in staged.suffixes]
            if not any(os.path.lexists(self.root / n) for n in names):
                return names, False

    def _commit(self, staged: list[_Staged], *, kind: str | None = None, overwrite: bool = False,
                adopt: Collection[str] = (), remove: Collection[str] = ()) -> None:
        """One atomic manifest update: place staged files, record their entries, drop ``remove``, retire old.

        Under the manifest lock: rename each staged temp file to an unused name (canonical names are first
        written to the journal, so a kill before the manifest names them still marks them as ours), fsync the
        directory, write the new manifest (temp + fsync + rename: the commit point), then unlink the files no
        entry names any more. On any error before the commit point, the staged files are removed and the
        store is as it was.
        """
        try:
            with manifest_lock(self.root):
                doc = self._read_doc()
                arts: dict[str, Any] = doc["artefacts"]
                journal = {f for f in doc.get("journal", []) if os.path.lexists(self.root / f)}
                if kind is not None:
                    why = self._kind_conflict(doc, kind, adopt)
                    if why is not None and not overwrite:
                        self._refuse(why)
                    if why is not None:
                        remove = set(remove) | set(arts)
                    doc["kind"] = kind
                missing = [n for n in remove if n not in arts and n not in {s.name for s in staged}]
                if missing and not staged and kind is None:
                    raise StoreError(f"{self.manifest_path}: no artefact named {missing[0]!r}")
                taken = {f for e in arts.values() for f in _files(e)} | journal
                intents = []
                for s in staged:
                    s.finals, canonical = self._choose_finals(s, taken)
                    taken |= set(s.finals)
                    if canonical:
                        intents += s.finals
                if intents:  # a kill after the rename below must still let cleanup recognise these names
                    self._write_doc({**doc, "journal": sorted(journal | set(intents))})
                for s in staged:
                    for tmp, final in zip(s.temps, s.finals, strict=True):
                        os.replace(tmp, self.root / final)
                    s.temps = []
                if staged:
                    _fsync_dir(self.root)
                old_files = {f for e in arts.values() for f in _files(e)}
                new_arts = {n: e for n, e in arts.items() if n not in remove}
                for s in staged:
                    new_arts[s.name] = {**s.entry, "file": s.finals[0]}
                    if len(s.finals) > 1:
                        new_arts[s.name]["chunks"] = {**s.entry["chunks"], "file": s.finals[1]}
                live = {f for e in new_arts.values() for f in _files(e)}
                retired = old_files - live
                journal = {f for f in journal | retired if f not in live and os.path.lexists(self.root / f)}
                self._write_doc({**doc, "artefacts": new_arts, "journal": sorted(journal)})
                for s in staged:
                    s.finals = []  # committed: no longer ours to discard
                for file in retired:
                    self._unlink(file)
        except BaseException:
            # An interrupt can land after the manifest was replaced but before we noted it: never delete a
            # file the manifest on disk names.
            try:
                keep = {f for e in self._read_manifest().values() for f in _files(e)}
            except StoreError:
                keep = set()
            for s in staged:
                s.discard(self.root, keep)
            raise
        finally:
            for s in staged:
                s.close()

    def _save(self, staged: _Staged) -> None:
        """Commit now, or add to the open transaction."""
        if self._txn is not None:
            for dup in [s for s in self._txn if s.name == staged.name]:  # saved twice: the last save wins
                dup.discard(self.root)
                self._txn.remove(dup)
            self._txn.append(staged)
        else:
            self._commit([staged])

    @contextlib.contextmanager
    def _stage(self, name: str, suffix: str) -> Iterator[tuple[BinaryIO, Path]]:
        """A flocked temp file for ``name``'s data; fsynced on a clean exit and left open for the commit."""
        tmp, f = _create_locked_temp(self.root / (name + suffix))
        try:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            f.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    @contextlib.contextmanager
    def transaction(self, *, kind: str | None = None, overwrite: bool = False,
                    adopt: Collection[str] = ()) -> Iterator[Store]:
        """Group saves into one atomic commit: inside the block ``save_tensors/save_json/save_array`` write
        and fsync their data but change no entry; on a clean exit all of them become visible in a single
        manifest update (old files retired only after it), and on an error none of them does.

        With ``kind``, the store must hold that kind (or nothing, or only artefacts named in ``adopt``: a store
        written before kinds existed); otherwise StoreError names what is there, checked before any data is
        written and again at the commit. ``overwrite=True`` instead replaces everything in the store with the
        transaction's artefacts. Loads inside the block see the old artefacts. Not thread-safe.
        """
        if self._txn is not None:
            raise StoreError(f"{self.root}: a transaction is already open on this Store")
        if kind is not None:
            why = self._kind_conflict(self._read_doc(), kind, adopt)
            if why is not None and not overwrite:
                self._refuse(why)
        self._txn = []
        try:
            yield self
            staged, self._txn = self._txn, None
            self._commit(staged, kind=kind, overwrite=overwrite, adopt=adopt)
        except BaseException:
            for s in self._txn or []:
                s.discard(self.root)
            raise
        finally:
            self._txn = None

    def claim(self, kind: str, *, overwrite: bool = False, adopt: Collection[str] = ()) -> None:
        """Record that this store holds ``kind`` (``"scores"``, ``"groundtruth"``, ``"fit"``, ...).

        Raises StoreError naming what is there if the store already holds another kind, or (with no kind
        recorded) artefacts other than those named in ``adopt``; ``overwrite=True`` removes them instead.
        """
        if not isinstance(kind, str) or not kind:
            raise DataError(f"kind must be a non-empty string, got {kind!r}")
        self._commit([], kind=kind, overwrite=overwrite, adopt=adopt)

    @property
    def kind(self) -> str | None:
        """What this store holds, as recorded by :meth:`claim` (None for a store that never claimed one)."""
        return self._read_doc().get("kind")

    def _mark_done(self, name: str, file: str, flags_path: Path, i: int, mine: np.ndarray) -> np.ndarray:
        """Set chunk ``i``'s flag on disk, merged with the flags there; seal the array when it is complete."""
        with manifest_lock(self.root):
            doc = self._read_doc()
            entry = doc["artefacts"].get(name)
            if entry is None or entry.get("file") != file or "chunks" not in entry:
                raise StoreError(f"{self.root / file}: artefact {name!r} was replaced or removed by another "
                                 "writer while this process was filling it")
            flags = self._load_flags(name, entry) | mine
            flags[i] = True
            if flags.all():  # hash before the last flag: a complete array always has its sha256 recorded
                path = self._file(file, name)
                entry["sha256"] = _file_sha256(path)
                entry["bytes"] = path.stat().st_size
                self._write_doc(doc)
            _write_flags(flags_path, flags)
        return flags

    def clean(self) -> list[str]:
        """Delete strays a killed writer left, return their names; done by ``Store(root)`` opened for writing.

        Only files of the store's own making are candidates (temp files ``.<file>.<token>.tmp``, token-named
        data files ``<name>.<16 hex>.<suffix>`` and files named in the manifest's journal) and only those no
        entry names. Nothing is done while another process holds the manifest lock, on a manifest that does not
        read, or to a temp file whose writer still holds its flock.
        """
        try:
            listing = os.listdir(self.root)
            doc = self._read_doc()
        except (OSError, StoreError):
            return []
        if not self._strays(doc, listing):
            return []  # the common case: no lock taken, nothing written
        removed: list[str] = []
        with _try_manifest_lock(self.root) as held:
            if not held:
                return []
            try:
                doc = self._read_doc()
                listing = os.listdir(self.root)
            except (OSError, StoreError):
                return []
            for file in self._strays(doc, listing):
                if _TMP.fullmatch(file) and not self._unlink_dead_temp(file):
                    continue
                if not _TMP.fullmatch(file):
                    self._unlink(file)
                if not os.path.lexists(self.root / file):
                    removed.append(file)
            journal = [f for f in doc.get("journal", []) if os.path.lexists(self.root / f)]
            if journal != doc.get("journal", []):
                with contextlib.suppress(OSError):
                    self._write_doc({**doc, "journal": journal})
        return sorted(removed)

    def _strays(self, doc: dict[str, Any], listing: list[str]) -> list[str]:
        live = {f for e in doc["artefacts"].values() for f in _files(e)}
        journal = set(doc.get("journal", []))
        is_store = os.path.lexists(self.manifest_path)  # token-like names in a plain directory are not ours
        return [f for f in listing if f not in live
                and (_TMP.fullmatch(f) or (is_store and (_TOKEN_FILE.fullmatch(f) or f in journal)))]

    def _unlink_dead_temp(self, file: str) -> bool:
        """Delete a temp file if no live writer holds its flock; True if it was deleted."""
        path = self.root / file
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # its writer is alive
            if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
                return False
            path.unlink()
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

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
        """Drop ``name`` from the manifest (atomically, under the manifest lock), then delete its files."""
        self._commit([], remove=[name])

    # -- tensors --------------------------------------------------------------------------------------------
    def save_tensors(
        self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
    ) -> None:
        """Save a dict of tensors (moved to CPU, made contiguous) as safetensors; the old version is retired
        only after the new one is committed."""
        self._check_name(name)
        meta = _meta(meta)
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
        entry = {"kind": "tensors",
                 "shape": {k: list(t.shape) for k, t in flat.items()},
                 "dtype": {k: str(t.dtype).removeprefix("torch.") for k, t in flat.items()},
                 "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "meta": meta}
        self._save(self._stage_bytes(name, "tensors", data, entry))

    def _read_bytes(self, doc: dict[str, Any], name: str, kind: str) -> tuple[Path, bytes]:
        with self._open_entry(name, self._entry(name, kind, doc["artefacts"])) as (path, f):
            return path, f.read()

    def _stage_bytes(self, name: str, kind: str, data: bytes, entry: dict[str, Any]) -> _Staged:
        staged = _Staged(name, entry, [_SUFFIX[kind]])
        with self._stage(name, _SUFFIX[kind]) as (f, tmp):
            f.write(data)
        staged.temps, staged.handles = [tmp], [f]
        return staged

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Load tensors saved by ``save_tensors`` (on CPU), after checking size and sha256."""
        path, data = self._retrying(lambda doc: self._read_bytes(doc, name, "tensors"))
        try:
            return safetensors.torch.load(data)
        except Exception as exc:  # safetensors raises several types for a malformed file
            raise StoreError(f"{path}: not a valid safetensors file ({exc})") from exc

    # -- json -----------------------------------------------------------------------------------------------
    def save_json(self, name: str, obj: Any, meta: dict[str, Any] | None = None) -> None:
        self._check_name(name)
        meta = _meta(meta)
        data = _json_bytes(obj, f"artefact {name!r}")
        entry = {"kind": "json", "shape": None, "dtype": None,
                 "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "meta": meta}
        self._save(self._stage_bytes(name, "json", data, entry))

    def load_json(self, name: str) -> Any:
        path, data = self._retrying(lambda doc: self._read_bytes(doc, name, "json"))
        try:
            return json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise StoreError(f"{path}: invalid JSON ({exc})") from exc

    # -- arrays ---------------------------------------------------------------------------------------------
    def save_array(self, name: str, arr: np.ndarray, meta: dict[str, Any] | None = None) -> None:
        """Save ``arr`` (any shape, no object dtype; a memmap is streamed) as ``.npy``, hashed as it is
        written; the old version is retired only after the new one is committed."""
        self._check_name(name)
        meta = _meta(meta)
        arr = np.asanyarray(arr)
        if arr.dtype.hasobject:
            raise DataError(f"save_array({name!r}): object arrays cannot be stored (they would need pickle)")
        staged = _Staged(name, {}, [_SUFFIX["array"]])
        with self._stage(name, _SUFFIX["array"]) as (f, tmp):
            writer = _HashingWriter(f)
            np.save(writer, arr, allow_pickle=False)
        staged.temps, staged.handles = [tmp], [f]
        staged.entry = {"kind": "array", "shape": list(arr.shape), "dtype": arr.dtype.str,
                        "bytes": writer.n, "sha256": writer.sha.hexdigest(), "meta": meta}
        self._save(staged)

    def load_array(self, name: str, mmap: bool = False, *, verify: bool = True) -> np.ndarray:
        """Load an array, checking its size and sha256; ``mmap=True`` gives a read-only memmap.

        The hash is checked for memmaps too: one streaming pass over the file when it is opened (4 MiB
        blocks, no copy in RAM), then the map is made from the same open descriptor, so the bytes mapped are
        the bytes hashed. Measured on a 1 GiB float32 array (shared 2-core VM, page cache warm): 1.7-2.4 s with
        the check vs 0.001 s without; that is sha256's own speed (hashlib on the same bytes already in RAM: 2.2 s),
        and the pass also warms the page cache the memmap then reads. Sealing a 1 GiB chunked array (its last
        ``mark_done``) costs the same one pass (2.7 s). ``verify=False`` skips the check for a caller that has
        just verified the same file. A chunked array loads only once every chunk is done.
        """
        return self._retrying(lambda doc: self._load_array(doc, name, mmap, verify))

    def load_arrays(self, names: Collection[str], *, mmap: Collection[str] = (), verify: bool = True
                    ) -> dict[str, np.ndarray]:
        """Several arrays from one committed version of the store (those named in ``mmap`` memory-mapped):
        never a mix of versions, even while another process saves new ones."""
        return self._retrying(lambda doc: {n: self._load_array(doc, n, n in mmap, verify) for n in names})

    def _load_array(self, doc: dict[str, Any], name: str, mmap: bool, verify: bool) -> np.ndarray:
        entry = self._entry(name, "array", doc["artefacts"])
        with self._open_entry(name, entry, verify=verify) as (path, f):
            if "chunks" in entry:
                flags = self._load_flags(name, entry)
                if not flags.all():
                    n_pending = int((~flags).sum())
                    raise StoreError(
                        f"{path}: chunked array is incomplete ({n_pending} of {len(flags)} chunks pending)"
                    )
            arr = _read_npy(f, path, mmap)
        _check_layout(path, arr, entry["shape"], entry["dtype"])
        return arr

    def _load_flags(self, name: str, entry: dict[str, Any]) -> np.ndarray:
        path = self._file(entry["chunks"]["file"], name)
        try:
            flags = _load_npy(path, None)
        except StoreError as exc:  # retired by a concurrent overwrite? then look again
            self._problem(name, entry, str(exc))
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
        unless ``overwrite=True``, which starts afresh (all chunks pending). A new array is created under
        temp names and committed with its (all-pending) flags in one manifest update, so the old entry is
        retired only when the new one exists. A complete array's hash is checked on reopen.
        """
        self._check_name(name)
        meta = _meta(meta)
        if self._txn is not None:
            raise StoreError(f"{self.root}: chunked({name!r}) cannot be part of a transaction")
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        if dtype.hasobject or not shape or min(shape) < 0 or int(n_chunks) < 1:
            raise DataError(
                f"chunked({name!r}): need a non-object dtype, a shape with >= 1 non-negative dims and "
                f"n_chunks >= 1; got dtype={dtype}, shape={shape}, n_chunks={n_chunks}"
            )
        n_chunks = int(n_chunks)
        want = {"shape": list(shape), "dtype": dtype.str, "n_chunks": n_chunks, "meta": meta}
        old = self._read_manifest().get(name)
        if old is not None and not overwrite:
            have = {"shape": old.get("shape"), "dtype": old.get("dtype"),
                    "n_chunks": old.get("chunks", {}).get("n"), "meta": old.get("meta")}
            diff = [f"{k}: stored {have[k]!r}, requested {want[k]!r}" for k in want if have[k] != want[k]]
            if old.get("kind") != "array" or "chunks" not in old or diff:
                why = "; ".join(diff) if "chunks" in old else "not a chunked array"
                raise StoreError(
                    f"{self.root / old['file']}: cannot resume {name!r} ({why}); "
                    "pass overwrite=True to start afresh"
                )
            return self._resume(name)
        staged = _Staged(name, {}, [_SUFFIX["array"], _SUFFIX["array"] + _FLAGS])
        try:
            with self._stage(name, _SUFFIX["array"]) as (data_f, data_tmp):
                staged.temps, staged.handles = [data_tmp], [data_f]
                array = np.lib.format.open_memmap(data_tmp, mode="w+", dtype=dtype, shape=shape)
                array.flush()
            flags = np.zeros(n_chunks, dtype=np.bool_)
            with self._stage(name, _SUFFIX["array"] + _FLAGS) as (flags_f, flags_tmp):
                np.save(flags_f, flags, allow_pickle=False)
            staged.temps.append(flags_tmp)
            staged.handles.append(flags_f)
        except BaseException:
            staged.discard(self.root)
            raise
        staged.entry = {"kind": "array", "shape": list(shape), "dtype": dtype.str,
                        "bytes": os.fstat(data_f.fileno()).st_size, "sha256": None, "meta": meta,
                        "chunks": {"n": n_chunks}}
        self._commit([staged], remove=[name] if old is not None else ())
        del array  # it was mapped under the temp name: map the committed file, so .filename is right
        return self._resume(name)

    def _resume(self, name: str) -> ChunkedArray:
        return self._retrying(lambda doc: self._resume_from(doc, name))

    def _resume_from(self, doc: dict[str, Any], name: str) -> ChunkedArray:
        entry = self._entry(name, "array", doc["artefacts"])
        flags = self._load_flags(name, entry)
        with self._open_entry(name, entry, verify=bool(flags.all())) as (path, f):
            array = _read_npy(f, path, mmap=True, mode="r+")
        _check_layout(path, array, entry["shape"], entry["dtype"])
        return ChunkedArray(array, flags, self._file(entry["chunks"]["file"], name), store=self, name=name,
                            file=entry["file"])


def _read_npy(f: BinaryIO, path: Path, mmap: bool, mode: str = "r") -> np.ndarray:
    """Read (or map) the ``.npy`` in the open file ``f``, wrapping numpy's errors in a StoreError naming it."""
    try:
        f.seek(0)
        if not mmap:
            return np.load(f, allow_pickle=False)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # format 3.0 (unicode field names): numpy has no public reader for an open file
            return np.load(path, mmap_mode=mode, allow_pickle=False)
        if dtype.hasobject:
            raise ValueError("object arrays cannot be memory-mapped")
        offset = f.tell()
        # map the descriptor that was size- and hash-checked; "r+" (resuming a chunked array) needs a writable
        # open, so it maps the path (chunked arrays are written in place anyway)
        src: Any = f if mode == "r" else path
        return np.memmap(src, dtype=dtype, mode=mode, offset=offset, shape=shape, order="F" if fortran else "C")
    except (OSError, ValueError, EOFError) as exc:
        raise StoreError(f"{path}: truncated or corrupt .npy file ({exc})") from exc


def _load_npy(path: Path, mmap_mode: str | None) -> np.ndarray:
    try:
        f = _open_nofollow(path)
    except FileNotFoundError:
        raise StoreError(f"{path}: file is missing") from None
    with f:
        return _read_npy(f, path, mmap_mode is not None, mmap_mode or "r")


def _check_layout(path: Path, arr: np.ndarray, shape: list[int], dtype: str) -> None:
    if list(arr.shape) != list(shape) or arr.dtype != np.dtype(dtype):
        raise StoreError(f"{path}: holds shape {tuple(arr.shape)} dtype {arr.dtype.str}, "
                         f"manifest says shape {tuple(shape)} dtype {dtype}")
