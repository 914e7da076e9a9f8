"""File locks: one writer per store, one builder per resumable build.

Both locks are ``fcntl.flock`` locks on a file inside the store directory. The kernel drops a flock when its holder
dies (SIGKILL included), so a lock is never left stale by a crash and needs no timeout-based recovery; the owner's pid,
host and start time are written into the lock file only so that a refused process can name who holds it.

* :func:`manifest_lock` is held for the milliseconds of a manifest read-modify-write, so two processes saving into
  one store never lose each other's entries; it always waits.
* :class:`BuildLock` is held for a whole resumable build (a ground-truth build, a cached fit). A second process
  either fails at once with :class:`LockedError` naming the holder (``wait=False``, the default) or waits until the
  holder finishes (``wait=True``, optionally up to ``timeout`` seconds) and then resumes what is left.

flock is advisory and local: it does not protect a store on a network file system shared by several hosts (the
holder's host is recorded so that the message says so).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datacredit.errors import StoreError

__all__ = ["BUILD_LOCK", "MANIFEST_LOCK", "BuildLock", "LockedError", "manifest_lock"]

MANIFEST_LOCK = ".manifest.lock"
BUILD_LOCK = ".build.lock"
_POLL_S = 0.2


class LockedError(StoreError):
    """Another live process holds the build lock of this store (the message names its pid and host)."""


_HELD: set[int] = set()  # descriptors of locks this process holds


def _close_held_in_child() -> None:
    # A forked child shares the parent's open file descriptions, and a flock lives as long as any descriptor of its
    # description does: a child that outlived its parent (a fork-started worker, a DataLoader worker) would keep the
    # build locked in the name of a dead pid. The child owns no build, so it drops its copies at once.
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _describe(path: Path) -> str:
    try:
        owner = json.loads(path.read_text(encoding="utf-8") or "{}")
        text = f"pid {owner['pid']} on host {owner['host']} (since {owner['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (owner unknown)"
    if owner["host"] == socket.gethostname() and not _alive(int(owner["pid"])):
        text += (f"; that pid has exited, so a process it started still holds the lock file open "
                 f"(find it with `fuser {path}`)")
    return text


def _open_lock_file(path: Path) -> int:
    """Open (create) a lock file, refusing a symlink: BuildLock writes its owner into the file, and a planted link
    must not make it truncate a file outside the store."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(f"{path}: lock file is a symlink; refusing to open it") from exc
        raise


@contextlib.contextmanager
def manifest_lock(root: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the short manifest lock of store ``root`` (blocking) for one read-modify-write."""
    fd = _open_lock_file(Path(root) / MANIFEST_LOCK)
    _HELD.add(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)  # closing the descriptor releases the flock


class BuildLock:
    """Exclusive lock on a resumable build in directory ``root``; use as a context manager.

    ``wait=False`` raises :class:`LockedError` at once if another process holds it; ``wait=True`` blocks (polling, up
    to ``timeout`` seconds when given, then LockedError). Re-entering from the process that holds it is an error
    (LockedError), since two builders in one process would corrupt the build just as two processes would.
    """

    def __init__(self, root: str | os.PathLike[str], *, wait: bool = False, timeout: float | None = None) -> None:
        self.path = Path(root) / BUILD_LOCK
        self.wait, self.timeout = bool(wait), timeout
        self._fd: int | None = None
        self._pid: int | None = None

    def acquire(self) -> BuildLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_lock_file(self.path)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not self.wait or (deadline is not None and time.monotonic() >= deadline):
                    holder = _describe(self.path)
                    os.close(fd)
                    how = "" if not self.wait else f" after waiting {self.timeout:g} s"
                    raise LockedError(
                        f"{self.path.parent}: a build is already running here, held by {holder}{how}; wait for it "
                        "to finish (it resumes what is left), or stop that process"
                    ) from None
                time.sleep(_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner()).encode(), 0)
        self._fd, self._pid = fd, os.getpid()
        _HELD.add(fd)
        return self

    def release(self) -> None:
        if self._fd is not None:
            if self._pid == os.getpid():  # a forked copy of this object closed its descriptor at fork (see above)
                _HELD.discard(self._fd)
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)
                os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> BuildLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
