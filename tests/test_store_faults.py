"""Fault injection: SIGKILL a process at random moments of ``Scores.save`` and of ``ChunkedArray`` filling.

After every kill: ``Scores.load`` returns exactly the old or exactly the new Scores (bit-identical, the one the
killed writer's progress allows), the next open for writing leaves no stray files, and a chunked array resumes with
every chunk reported done kept (none redone, none lost). The fast variants run by default; ``-m slow`` runs the long
ones (run with ``-s`` to see the counts).

The writers are forked from the test process (no interpreter start-up per trial), so a kill can land anywhere in
the save: writing the data, fsync, the rename, the manifest commit, or the retirement of the old files.
"""

from __future__ import annotations

import os
import random
import signal
import time

import numpy as np
import pytest

from datacredit.scores import Scores
from datacredit.store import Store


def _fork(fn, *args) -> int:
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            fn(*args)
        finally:
            os._exit(0)
    return pid


def _drain(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 65536):
        out += chunk
    return out


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _same(a: Scores, b: Scores) -> bool:
    return (a.values.dtype == b.values.dtype and np.array_equal(a.values, b.values)
            and np.array_equal(a.train_ids, b.train_ids) and np.array_equal(a.query_ids, b.query_ids)
            and (a.method, a.config) == (b.method, b.config))


def _only_live_files(root) -> bool:
    store = Store(root, create=False)
    live = {f for e in store._read_manifest().values() for f in [e["file"], e.get("chunks", {}).get("file")] if f}
    extra = set(os.listdir(root)) - live - {"manifest.json", ".manifest.lock"}
    return not extra


def _save_loop(versions: list[Scores], root, w: int) -> None:
    """Save versions[0], versions[1], versions[0], ... forever; one byte on ``w`` after each completed save."""
    k = 0
    while True:
        versions[k % 2].save(root)
        os.write(w, b"s")
        k += 1


def _scores_kill_trials(tmp_path, trials: int, n_train: int, n_query: int, seed: int = 0) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    a = Scores(rng.normal(size=(n_train, n_query)), np.arange(n_train), np.arange(n_query), "a", {"v": 1})
    b = Scores(rng.normal(size=(n_train + 7, n_query - 3)), np.arange(5, n_train + 12), np.arange(n_query - 3),
               "b", {"v": 2})
    root = tmp_path / "scores"
    a.save(root)
    # calibrate on an unkilled writer: time from fork to its second completed save
    r, w = os.pipe()
    start = time.perf_counter()
    pid = _fork(_save_loop, [b, a], root, w)
    os.close(w)
    os.read(r, 1)
    os.read(r, 1)
    two_saves = time.perf_counter() - start
    _kill(pid)
    os.close(r)
    Scores.load(root)  # whichever version the calibration left is fine: find out below
    a.save(root)
    current = a  # what the directory holds
    stats = {"trials": trials, "kept_old": 0, "got_new": 0, "completed_saves": 0, "lost": 0, "mixed": 0,
             "strays_cleaned": 0, "strays_left": 0}
    for _ in range(trials):
        other = b if current is a else a
        r, w = os.pipe()
        pid = _fork(_save_loop, [other, current], root, w)
        os.close(w)
        time.sleep(pick.uniform(0.0, two_saves))  # anywhere in the first two saves
        _kill(pid)
        done = len(_drain(r))
        os.close(r)
        stats["completed_saves"] += done
        # the writer saves other, current, other, ...: after j completed saves the directory holds state(j); the
        # kill may land after a save's commit but before its progress byte, hence state(done) or state(done + 1)
        seq = [other, current]
        allowed = [current if j == 0 else seq[(j - 1) % 2] for j in (done, done + 1)]
        try:
            loaded = Scores.load(root, mmap=True)
        except Exception:  # noqa: BLE001 - any failure to load is a lost result
            stats["lost"] += 1
            continue
        match = next((v for v in allowed if _same(loaded, v)), None)
        if match is None:
            stats["mixed"] += 1
            continue
        stats["kept_old" if match is current else "got_new"] += 1
        current = match
        stats["strays_cleaned"] += len(Store(root, create=False).clean())
        stats["strays_left"] += not _only_live_files(root)
    print(f"\nScores.save SIGKILL ({n_train}x{n_query} float64, {a.values.nbytes / 1e6:.0f} MB, "
          f"{two_saves:.2f} s for two saves in a forked writer): {stats}")
    return stats


def _check(stats: dict[str, int]) -> None:
    assert stats["lost"] == 0 and stats["mixed"] == 0 and stats["strays_left"] == 0
    assert stats["kept_old"] + stats["got_new"] == stats["trials"]


def test_kill_during_scores_save_keeps_old_or_new(tmp_path):
    _check(_scores_kill_trials(tmp_path, trials=8, n_train=1000, n_query=500))


@pytest.mark.slow
def test_kill_during_scores_save_keeps_old_or_new_many(tmp_path):
    stats = _scores_kill_trials(tmp_path, trials=30, n_train=2500, n_query=1250, seed=1)  # 25 MB values
    _check(stats)
    assert stats["kept_old"] > 0 and stats["got_new"] > 0  # the kills really landed on both sides


# -- chunked arrays -------------------------------------------------------------------------------------
SHAPE, N_CHUNKS = (4000, 250), 40


def _chunk(c, i: int) -> np.ndarray:
    rows = c.rows(i)
    return np.random.default_rng(i).normal(size=(rows.stop - rows.start, SHAPE[1]))


def _fill_loop(root, w: int) -> None:
    c = Store(root).chunked("g", SHAPE, np.float64, N_CHUNKS, meta={"m": 1})
    for i in c.pending():
        c.write(i, None, _chunk(c, i))
        os.write(w, bytes([i]))
        time.sleep(0.002)


def _chunked_kill_trials(tmp_path, trials: int, seed: int = 0) -> dict[str, int]:
    pick = random.Random(seed)
    root = tmp_path / "chunked"
    reported: set[int] = set()
    stats = {"kills": 0, "chunks_reported_done": 0, "redone": 0, "lost": 0, "wrong_rows": 0}
    for _ in range(trials):
        r, w = os.pipe()
        pid = _fork(_fill_loop, root, w)
        os.close(w)
        time.sleep(pick.uniform(0.0, 0.25))
        _kill(pid)
        stats["kills"] += 1
        got = list(_drain(r))
        os.close(r)
        stats["redone"] += len(reported & set(got))
        reported |= set(got)
        c = Store(root).chunked("g", SHAPE, np.float64, N_CHUNKS, meta={"m": 1})
        done = {i for i in range(N_CHUNKS) if c.done(i)}
        stats["lost"] += len(reported - done)
        stats["wrong_rows"] += sum(not np.array_equal(c.array[c.rows(i)], _chunk(c, i)) for i in done)
        if c.complete:
            break
    stats["chunks_reported_done"] = len(reported)
    c = Store(root).chunked("g", SHAPE, np.float64, N_CHUNKS, meta={"m": 1})
    for i in c.pending():
        c.write(i, None, _chunk(c, i))
    full = Store(root, create=False).load_array("g", mmap=True)  # hash-checked
    stats["final_equal"] = int(all(np.array_equal(full[c.rows(i)], _chunk(c, i)) for i in range(N_CHUNKS)))
    print(f"\nChunkedArray SIGKILL ({N_CHUNKS} chunks): {stats}")
    return stats


def _check_chunked(stats: dict[str, int]) -> None:
    assert stats["redone"] == 0 and stats["lost"] == 0 and stats["wrong_rows"] == 0 and stats["final_equal"] == 1


def test_kill_during_chunked_fill_keeps_finished_chunks(tmp_path):
    _check_chunked(_chunked_kill_trials(tmp_path, trials=4))


@pytest.mark.slow
def test_kill_during_chunked_fill_keeps_finished_chunks_many(tmp_path):
    _check_chunked(_chunked_kill_trials(tmp_path, trials=25, seed=1))
