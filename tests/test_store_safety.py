"""Store safety regressions (issue 13): containment, write-new-before-retire, stray cleanup, hashes on memmaps,
kinds, and concurrent writers."""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import json
import os

import numpy as np
import pytest

from datacredit.errors import StoreError
from datacredit.lock import manifest_lock
from datacredit.scores import Scores
from datacredit.store import Store


def _scores(seed: int = 0, n: int = 6) -> Scores:
    return Scores(np.random.default_rng(seed).normal(size=(n, 3)), np.arange(n), [7, 8, 9], "graddot", {"s": seed})


def _edit_manifest(root, name: str, **fields) -> None:
    path = root / "manifest.json"
    doc = json.loads(path.read_text())
    doc["artefacts"][name].update(fields)
    path.write_text(json.dumps(doc))


def _record_opens(monkeypatch) -> list[str]:
    """Record every path opened through builtins.open / os.open from now on."""
    seen: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        seen.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_os_open(path, *args, **kwargs):
        seen.append(str(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    return seen


# -- containment ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("hostile", ["../victim.npy", "ABSOLUTE", "sub/victim.npy", "..", "manifest.json"])
def test_hostile_manifest_file_is_refused_and_target_untouched(tmp_path, monkeypatch, hostile):
    victim = tmp_path / "victim.npy"
    np.save(victim, np.arange(4.0))
    before = victim.read_bytes()
    root = tmp_path / "store"
    _scores().save(root)
    hostile = str(victim) if hostile == "ABSOLUTE" else hostile
    _edit_manifest(root, "values", file=hostile, bytes=len(before))
    seen = _record_opens(monkeypatch)
    for action in (lambda: Scores.load(root), lambda: Scores.load(root, mmap=True),
                   lambda: _scores(1).save(root), lambda: Store(root).remove("values"),
                   lambda: Store(root).load_array("values")):
        with pytest.raises(StoreError, match=rf"artefact 'values' names file '{hostile}'.*refusing"):
            action()
    monkeypatch.undo()
    assert not any("victim" in p for p in seen)  # never opened, let alone read or deleted
    assert victim.read_bytes() == before


def test_hostile_chunk_flag_file_is_refused(tmp_path):
    store = Store(tmp_path / "s")
    store.chunked("g", (4, 2), np.float32, 2)
    doc = json.loads((tmp_path / "s" / "manifest.json").read_text())
    doc["artefacts"]["g"]["chunks"]["file"] = "../flags.npy"
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=r"artefact 'g' names chunk-flag file '\.\./flags\.npy'"):
        store.chunked("g", (4, 2), np.float32, 2)


def test_symlinked_artefact_is_not_read_nor_deleted(tmp_path):
    outside = tmp_path / "outside.npy"
    root = tmp_path / "store"
    s = _scores()
    s.save(root)
    values = root / Store(root).info("values")["file"]
    values.rename(outside)
    values.symlink_to(outside)  # same bytes, so size and hash would both pass
    for mmap in (False, True):
        with pytest.raises(StoreError, match="is a symlink"):
            Scores.load(root, mmap=mmap)
    _scores(1).save(root)  # retiring the old entry must not follow (or delete) the link's target
    assert outside.exists()
    np.testing.assert_array_equal(np.load(outside), s.values)
    np.testing.assert_array_equal(Scores.load(root).values, _scores(1).values)


def test_symlinked_manifest_is_refused(tmp_path):
    (tmp_path / "elsewhere.json").write_text('{"format_version": 1, "artefacts": {}}')
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(StoreError, match="is a symlink"):
        Store(tmp_path / "s").names()


# -- write new before retiring old ----------------------------------------------------------------------
def test_failed_manifest_commit_keeps_old_and_leaves_no_strays(tmp_path, monkeypatch):
    old = _scores(0)
    old.save(tmp_path)
    real_replace = os.replace

    def fail_on_manifest(src, dst):
        if str(dst).endswith("manifest.json"):
            raise OSError("killed at the commit")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_manifest)
    with pytest.raises(OSError, match="killed at the commit"):
        _scores(1, n=9).save(tmp_path)
    monkeypatch.undo()
    np.testing.assert_array_equal(Scores.load(tmp_path).values, old.values)
    live = {e["file"] for e in Store(tmp_path)._read_manifest().values()}
    assert {p for p in os.listdir(tmp_path) if not p.startswith(".")} == live | {"manifest.json"}


def test_transaction_commits_all_or_nothing(tmp_path):
    store = Store(tmp_path)
    store.save_array("a", np.zeros(2))
    with pytest.raises(RuntimeError), store.transaction():
        store.save_array("a", np.ones(2))
        store.save_json("b", {"x": 1})
        raise RuntimeError("interrupted")
    assert store.names() == ["a"] and store.load_array("a").tolist() == [0.0, 0.0]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with store.transaction():
        store.save_array("a", np.ones(2))
        store.save_json("b", {"x": 1})
        store.save_json("b", {"x": 2})  # saved twice: the last one wins, the first leaves nothing behind
        assert store.load_array("a").tolist() == [0.0, 0.0]  # not visible before the commit
    assert store.load_array("a").tolist() == [1.0, 1.0] and store.load_json("b") == {"x": 2}
    assert {p for p in os.listdir(tmp_path) if not p.startswith(".")} == {
        "manifest.json", store.info("a")["file"], store.info("b")["file"]}


# -- stray cleanup --------------------------------------------------------------------------------------
def test_open_for_writing_cleans_only_its_own_dead_strays(tmp_path):
    store = Store(tmp_path)
    store.save_array("a", np.arange(3))
    strays = [".a.npy.0123456789ab.tmp", "a.0123456789abcdef.npy", "b.fedcba9876543210.npy.done"]
    for name in strays:
        (tmp_path / name).write_bytes(b"left by a killed writer")
    user = ["notes.txt", "a.npy.bak", "mine.json", ".hidden"]
    for name in user:
        (tmp_path / name).write_text("user file")
    live_tmp = tmp_path / ".b.npy.aaaaaaaaaaaa.tmp"  # a writer that is still alive holds its flock
    live_tmp.write_bytes(b"in flight")
    fd = os.open(live_tmp, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with manifest_lock(tmp_path):  # another process committing: cleanup must not run
            assert Store(tmp_path).clean() == []
            assert all((tmp_path / s).exists() for s in strays)
        assert Store(tmp_path, create=False).clean() == sorted(strays)
        assert live_tmp.exists() and all((tmp_path / u).exists() for u in user)
    finally:
        os.close(fd)
    assert Store(tmp_path, create=False).clean() == [live_tmp.name]  # its writer is gone now
    assert Store(tmp_path).load_array("a").tolist() == [0, 1, 2]
    assert all((tmp_path / u).exists() for u in user)


def test_journal_names_a_placed_but_uncommitted_canonical_file(tmp_path):
    store = Store(tmp_path)
    store.save_json("x", 1)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    doc["journal"] = ["y.json"]  # as left by a kill between placing y.json and committing its entry
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    (tmp_path / "y.json").write_text("2")
    (tmp_path / "z.json").write_text("user")  # same naming pattern, but never ours
    assert Store(tmp_path).load_json("x") == 1
    assert not (tmp_path / "y.json").exists() and (tmp_path / "z.json").exists()
    assert "journal" not in json.loads((tmp_path / "manifest.json").read_text())


def test_read_only_open_changes_nothing(tmp_path):
    Store(tmp_path).save_json("x", 1)
    (tmp_path / ".x.json.0123456789ab.tmp").write_bytes(b"")
    Store(tmp_path, create=False).load_json("x")
    assert (tmp_path / ".x.json.0123456789ab.tmp").exists()


# -- hashes on memory-mapped loads ----------------------------------------------------------------------
def test_same_size_corruption_raises_under_mmap(tmp_path):
    store = Store(tmp_path)
    store.save_array("a", np.linspace(0, 1, 1000).reshape(100, 10))
    path = tmp_path / store.info("a")["file"]
    data = bytearray(path.read_bytes())
    data[-80:-72] = np.float64(1e9).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"a\.npy: corrupt, sha256 does not match"):
        store.load_array("a", mmap=True)


def test_chunked_array_is_hashed_when_complete(tmp_path):
    store = Store(tmp_path)
    c = store.chunked("g", (6, 2), np.float64, 3)
    for i in range(3):
        assert store.info("g")["sha256"] is None
        c.write(i, None, np.full((2, 2), float(i)))
    assert len(store.info("g")["sha256"]) == 64
    np.testing.assert_array_equal(store.load_array("g", mmap=True)[:, 0], [0, 0, 1, 1, 2, 2])
    path = tmp_path / store.info("g")["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"g\.npy: corrupt, sha256"):
        store.load_array("g", mmap=True)
    with pytest.raises(StoreError, match=r"g\.npy: corrupt, sha256"):  # a complete reopen is checked too
        store.chunked("g", (6, 2), np.float64, 3)


def test_chunked_overwrite_retires_old_files_after_the_new_entry(tmp_path):
    store = Store(tmp_path)
    c = store.chunked("g", (4,), np.int64, 2)
    c.write(0, None, np.array([5, 5]))
    fresh = store.chunked("g", (6,), np.int64, 3, overwrite=True)
    assert fresh.pending() == [0, 1, 2]
    files = set(os.listdir(tmp_path)) - {"manifest.json", ".manifest.lock"}
    entry = store.info("g")
    assert files == {entry["file"], entry["chunks"]["file"]} and entry["file"] != "g.npy"
    for i in range(3):
        fresh.write(i, None, np.array([i, i]))
    assert store.load_array("g").tolist() == [0, 0, 1, 1, 2, 2]


def test_legacy_manifest_without_new_fields_loads(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(3.0))
    np.save(tmp_path / "g.npy", np.arange(4.0))
    with open(tmp_path / "g.npy.done", "wb") as f:
        np.save(f, np.ones(2, dtype=bool))
    a, g = (tmp_path / "a.npy").read_bytes(), (tmp_path / "g.npy").read_bytes()

    doc = {"format_version": 1, "artefacts": {
        "a": {"file": "a.npy", "kind": "array", "shape": [3], "dtype": "<f8", "bytes": len(a),
              "sha256": hashlib.sha256(a).hexdigest(), "meta": {}},
        "g": {"file": "g.npy", "kind": "array", "shape": [4], "dtype": "<f8", "bytes": len(g), "sha256": None,
              "meta": {}, "chunks": {"n": 2, "file": "g.npy.done"}}}}
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    store = Store(tmp_path)
    assert store.kind is None and store.load_array("a", mmap=True).tolist() == [0, 1, 2]
    assert store.load_array("g").tolist() == [0, 1, 2, 3]
    assert store.chunked("g", (4,), "<f8", 2).complete


# -- concurrent writers ---------------------------------------------------------------------------------
def _fork(fn) -> int:
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def test_two_processes_saving_different_artefacts_lose_nothing(tmp_path):
    n = 25

    def writer(tag: str):
        store = Store(tmp_path)
        for k in range(n):
            store.save_array(f"{tag}{k}", np.full(50, k))
            store.save_json("shared", {"by": tag, "k": k})  # both replace one name: last writer wins

    pids = [_fork(lambda t=t: writer(t)) for t in ("p", "q")]
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    store = Store(tmp_path)
    assert sorted(store.names()) == sorted([f"{t}{k}" for t in "pq" for k in range(n)] + ["shared"])
    for t in "pq":
        for k in range(n):
            assert store.load_array(f"{t}{k}").tolist() == [k] * 50
    assert store.load_json("shared")["k"] == n - 1
    referenced = {f for e in store._read_manifest().values() for f in [e["file"]]}
    assert {p for p in os.listdir(tmp_path) if not p.startswith(".")} == referenced | {"manifest.json"}


def test_reader_never_fails_while_a_writer_replaces(tmp_path):
    Store(tmp_path).save_array("a", np.zeros(1000))
    pid = _fork(lambda: [Store(tmp_path).save_array("a", np.full(1000, float(k))) for k in range(1, 60)])
    reads, status = 0, None
    while status is None:
        arr = Store(tmp_path, create=False).load_array("a", mmap=True)
        assert len(set(arr.tolist())) == 1  # one whole version, never a mix
        reads += 1
        done, code = os.waitpid(pid, os.WNOHANG)
        status = code if done else None
    assert status == 0 and reads > 0


def test_interrupt_right_after_the_commit_point_keeps_the_new_artefact(tmp_path, monkeypatch):
    from datacredit import store as store_module

    store = Store(tmp_path)
    store.save_array("a", np.zeros(3))
    real = store_module._fsync_dir

    def interrupted(directory):
        real(directory)
        if store._read_manifest()["a"]["shape"] == [5]:  # the new manifest is in place: Ctrl-C lands now
            raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "_fsync_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.save_array("a", np.ones(5))
    monkeypatch.undo()
    assert store.load_array("a").tolist() == [1.0] * 5


def test_scores_load_never_mixes_two_saves(tmp_path):
    # same shapes, different ids and values: a load that took values from one save and ids from the other
    # would pass every shape check
    a = Scores(np.zeros((300, 40)), np.arange(300), np.arange(40), "a", {})
    b = Scores(np.ones((300, 40)), np.arange(300) + 1000, np.arange(40) + 1000, "b", {})
    a.save(tmp_path)
    pid = _fork(lambda: [(b if k % 2 else a).save(tmp_path) for k in range(1, 40)])
    loads, status = 0, None
    while status is None:
        s = Scores.load(tmp_path, mmap=loads % 2 == 0)
        ref = a if s.method == "a" else b
        assert np.array_equal(s.values, ref.values) and np.array_equal(s.train_ids, ref.train_ids)
        assert np.array_equal(s.query_ids, ref.query_ids)
        loads += 1
        done, code = os.waitpid(pid, os.WNOHANG)
        status = code if done else None
    assert status == 0 and loads > 0


def test_two_processes_filling_one_chunked_array_keep_each_others_flags(tmp_path):
    Store(tmp_path).chunked("g", (40, 3), np.float64, 20)

    def fill(parity: int):
        c = Store(tmp_path).chunked("g", (40, 3), np.float64, 20)
        for i in range(parity, 20, 2):
            c.write(i, None, np.full((2, 3), float(i)))

    pids = [_fork(lambda p=p: fill(p)) for p in (0, 1)]
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    c = Store(tmp_path).chunked("g", (40, 3), np.float64, 20)
    assert c.complete and len(Store(tmp_path).info("g")["sha256"]) == 64
    np.testing.assert_array_equal(Store(tmp_path).load_array("g")[::2, 0], np.arange(20.0))


def test_symlinked_lock_files_are_refused_and_their_targets_untouched(tmp_path):
    from datacredit.lock import BuildLock

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    root = tmp_path / "s"
    root.mkdir()
    (root / ".build.lock").symlink_to(victim)
    (root / ".manifest.lock").symlink_to(victim)
    with pytest.raises(StoreError, match=r"\.build\.lock: lock file is a symlink"):
        BuildLock(root).acquire()
    with pytest.raises(StoreError, match=r"\.manifest\.lock: lock file is a symlink"):
        Store(root).save_json("x", 1)
    assert victim.read_text() == "precious"
