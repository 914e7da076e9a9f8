"""Store: roundtrips, atomic writes, detection of truncated/corrupt files, resumable chunked arrays."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from datacredit.errors import DataError, StoreError
from datacredit.store import Store, atomic_write_bytes, atomic_write_json


def _no_temp_files(directory) -> bool:
    return not [p for p in os.listdir(directory) if p.endswith(".tmp")]


def _truncate(path, n_bytes: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - n_bytes])


def _flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- roundtrips ------------------------------------------------------------------------------------
def test_tensors_roundtrip_and_manifest(tmp_path):
    store = Store(tmp_path / "s")
    a = torch.randn(3, 4, dtype=torch.float64)
    tensors = {"a": a, "a_view": a[1], "b": torch.arange(5, dtype=torch.int32)}
    store.save_tensors("factors", tensors, meta={"layer": "fc1", "damping": 1e-3})
    out = store.load_tensors("factors")
    assert set(out) == set(tensors)
    for key, t in tensors.items():
        torch.testing.assert_close(out[key], t, rtol=0, atol=0)
    entry = json.loads((tmp_path / "s" / "manifest.json").read_text())["artefacts"]["factors"]
    assert entry["kind"] == "tensors" and entry["file"] == "factors.safetensors"
    assert entry["shape"] == {"a": [3, 4], "a_view": [4], "b": [5]}
    assert entry["dtype"]["a"] == "float64" and len(entry["sha256"]) == 64
    assert entry["meta"] == {"layer": "fc1", "damping": 1e-3}
    assert entry["bytes"] == (tmp_path / "s" / "factors.safetensors").stat().st_size


def test_json_and_array_roundtrip(tmp_path):
    store = Store(tmp_path)
    store.save_json("config", {"lr": 0.1, "layers": ["fc1", "fc2"]})
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    store.save_array("grads", arr, meta={"proj_dim": 4})
    assert store.load_json("config") == {"lr": 0.1, "layers": ["fc1", "fc2"]}
    np.testing.assert_array_equal(store.load_array("grads"), arr)
    mapped = store.load_array("grads", mmap=True)
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, arr)
    assert store.info("grads")["meta"] == {"proj_dim": 4}
    assert store.names() == ["config", "grads"] and store.has("grads") and not store.has("nope")


def test_fortran_order_and_memmap_input_roundtrip(tmp_path):
    store = Store(tmp_path)
    arr = np.asfortranarray(np.random.default_rng(0).normal(size=(5, 7)))
    store.save_array("f", arr)
    store.save_array("m", store.load_array("f", mmap=True))
    np.testing.assert_array_equal(store.load_array("m"), arr)


def test_remove_deletes_entry_and_files(tmp_path):
    store = Store(tmp_path)
    store.save_array("x", np.zeros(3))
    store.remove("x")
    assert not store.has("x") and not (tmp_path / "x.npy").exists()
    with pytest.raises(StoreError, match="no artefact named 'x'"):
        store.load_array("x")


def test_replacing_a_name_with_another_kind_removes_old_file(tmp_path):
    store = Store(tmp_path)
    store.save_array("thing", np.zeros(3))
    store.save_json("thing", [1, 2])
    assert store.load_json("thing") == [1, 2] and not (tmp_path / "thing.npy").exists()
    with pytest.raises(StoreError, match="is 'json', not 'array'"):
        store.load_array("thing")


def test_bad_input_raises_data_error_and_writes_nothing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(DataError, match="object arrays"):
        store.save_array("obj", np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="invalid artefact name"):
        store.save_json("../escape", 1)
    with pytest.raises(DataError, match="invalid artefact name"):
        store.save_json("manifest", 1)
    with pytest.raises(DataError, match="JSON-serialisable"):
        store.save_json("cfg", {"f": object()})
    with pytest.raises(DataError, match="JSON-serialisable"):
        store.save_array("a", np.zeros(2), meta={"bad": {1, 2}})
    assert store.names() == [] and os.listdir(tmp_path) == []


def test_missing_store_directory_is_not_created_when_reading(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()


# -- atomicity -------------------------------------------------------------------------------------
def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write_json(target, {"v": 1})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"partial")
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert _no_temp_files(tmp_path)


def test_failed_save_keeps_previous_artefact_loadable(tmp_path, monkeypatch):
    store = Store(tmp_path)
    old = np.arange(10.0)
    store.save_array("a", old)
    store.save_tensors("t", {"w": torch.ones(2)})

    def boom(src, dst):
        raise OSError("crash during rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        store.save_array("a", np.zeros(50))
    with pytest.raises(OSError):
        store.save_tensors("t", {"w": torch.zeros(7)})
    monkeypatch.undo()
    np.testing.assert_array_equal(store.load_array("a"), old)
    torch.testing.assert_close(store.load_tensors("t")["w"], torch.ones(2))
    assert _no_temp_files(tmp_path)


def test_writer_error_midway_leaves_no_partial_file(tmp_path, monkeypatch):
    store = Store(tmp_path)
    store.save_array("a", np.arange(4.0))
    real_save = np.save

    def save_then_fail(f, arr, allow_pickle):
        real_save(f, arr[:1], allow_pickle=allow_pickle)
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(np, "save", save_then_fail)
    with pytest.raises(RuntimeError, match="killed"):
        store.save_array("a", np.arange(1000.0))
    monkeypatch.undo()
    np.testing.assert_array_equal(store.load_array("a"), np.arange(4.0))
    assert _no_temp_files(tmp_path)


# -- corruption ------------------------------------------------------------------------------------
def test_truncated_safetensors_raises_store_error_naming_file(tmp_path):
    store = Store(tmp_path)
    store.save_tensors("f", {"w": torch.randn(8, 8)})
    path = tmp_path / "f.safetensors"
    _truncate(path, 10)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"f\.safetensors.*truncated"):
        store.load_tensors("f")
    assert path.read_bytes() == before  # a failed load never rewrites anything


def test_corrupted_bytes_detected_by_sha256(tmp_path):
    store = Store(tmp_path)
    store.save_tensors("f", {"w": torch.randn(8, 8)})
    store.save_json("j", {"a": 1})
    store.save_array("a", np.arange(100.0))
    _flip_byte(tmp_path / "f.safetensors", -5)
    _flip_byte(tmp_path / "j.json", 2)
    _flip_byte(tmp_path / "a.npy", -3)
    with pytest.raises(StoreError, match=r"f\.safetensors.*sha256"):
        store.load_tensors("f")
    with pytest.raises(StoreError, match=r"j\.json.*sha256"):
        store.load_json("j")
    with pytest.raises(StoreError, match=r"a\.npy.*sha256"):
        store.load_array("a")


def test_invalid_safetensors_matching_manifest_is_wrapped(tmp_path):
    # A file whose size and hash agree with a (hand-edited) manifest but is not safetensors.
    store = Store(tmp_path)
    store.save_json("f", "x" * 40)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["artefacts"]["f"]
    entry.update(kind="tensors")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"f\.json: not a valid safetensors file"):
        store.load_tensors("f")


def test_truncated_npy_raises_store_error_naming_file(tmp_path):
    store = Store(tmp_path)
    store.save_array("a", np.ones((50, 4), dtype=np.float32))
    _truncate(tmp_path / "a.npy", 16)
    for mmap in (False, True):
        with pytest.raises(StoreError, match=r"a\.npy.*truncated"):
            store.load_array("a", mmap=mmap)


def test_npy_with_wrong_shape_against_manifest(tmp_path):
    store = Store(tmp_path)
    store.save_array("a", np.zeros((4, 3)))
    np.save(tmp_path / "a.npy", np.zeros((3, 4)))  # same size, different layout, replaced behind our back
    with pytest.raises(StoreError, match=r"a\.npy: corrupt, sha256"):  # memmaps are hash-checked too
        store.load_array("a", mmap=True)
    with pytest.raises(StoreError, match=r"a\.npy: holds shape \(3, 4\)"):  # and the layout without the hash
        store.load_array("a", mmap=True, verify=False)


def test_missing_file_and_corrupt_manifest(tmp_path):
    store = Store(tmp_path)
    store.save_array("a", np.zeros(3))
    (tmp_path / "a.npy").unlink()
    with pytest.raises(StoreError, match=r"a\.npy: file is missing"):
        store.load_array("a")
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "artefacts": {')
    with pytest.raises(StoreError, match=r"manifest\.json: corrupt manifest"):
        store.names()
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(StoreError, match=r"manifest\.json: corrupt manifest"):
        store.has("a")


# -- chunked, resumable work -----------------------------------------------------------------------
def _fill(chunked, i):
    rows = chunked.rows(i)
    chunked.array[rows] = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] + 0.5
    chunked.mark_done(i)


def test_chunk_rows_cover_axis_like_array_split(tmp_path):
    chunked = Store(tmp_path).chunked("g", (10, 2), np.float32, n_chunks=3)
    sizes = [chunked.rows(i).stop - chunked.rows(i).start for i in range(3)]
    assert sizes == [len(p) for p in np.array_split(np.arange(10), 3)]
    assert chunked.rows(2).stop == 10


def test_chunked_resume_after_crash(tmp_path):
    shape, meta = (10, 3), {"proj": "rademacher", "seed": 0}
    chunked = Store(tmp_path).chunked("g", shape, np.float32, n_chunks=4, meta=meta)
    assert chunked.pending() == [0, 1, 2, 3] and not chunked.complete
    _fill(chunked, 0)
    _fill(chunked, 2)
    chunked.array[chunked.rows(1)] = 99.0  # written but never marked done: the "crash" happens here
    del chunked

    resumed = Store(tmp_path).chunked("g", shape, "float32", 4, meta=dict(meta))
    assert resumed.pending() == [1, 3]
    assert resumed.done(0) and resumed.done(2) and not resumed.done(1)
    for i in (0, 2):
        rows = resumed.rows(i)
        expected = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] + 0.5
        np.testing.assert_array_equal(resumed.array[rows], np.broadcast_to(expected, (len(expected), 3)))
    with pytest.raises(StoreError, match="incomplete.*2 of 4"):
        Store(tmp_path).load_array("g")
    for i in resumed.pending():
        rows = resumed.rows(i)
        resumed.write(i, rows, np.full((rows.stop - rows.start, 3), float(i), dtype=np.float32))
    assert resumed.complete
    loaded = Store(tmp_path).load_array("g", mmap=True)
    assert loaded.shape == shape and loaded[resumed.rows(3)].tolist()[0] == [3.0, 3.0, 3.0]
    assert loaded[0, 0] == 0.5


@pytest.mark.parametrize(
    "change",
    [
        {"shape": (11, 3)},
        {"dtype": np.float64},
        {"n_chunks": 5},
        {"meta": {"proj": "gaussian", "seed": 0}},
    ],
)
def test_chunked_mismatched_reopen_raises_and_overwrite_starts_fresh(tmp_path, change):
    args = {"shape": (10, 3), "dtype": np.float32, "n_chunks": 4, "meta": {"proj": "rademacher", "seed": 0}}
    store = Store(tmp_path)
    _fill(store.chunked("g", **args), 1)
    with pytest.raises(StoreError, match=r"g\.npy: cannot resume 'g'"):
        store.chunked("g", **{**args, **change})
    assert store.chunked("g", **args).pending() == [0, 2, 3]  # the refused reopen changed nothing
    fresh = store.chunked("g", **{**args, **change}, overwrite=True)
    assert fresh.pending() == list(range(fresh.n_chunks)) and not fresh.array.any()


def test_chunked_reopen_of_plain_array_refused(tmp_path):
    store = Store(tmp_path)
    store.save_array("g", np.zeros((10, 3), dtype=np.float32))
    with pytest.raises(StoreError, match="not a chunked array"):
        store.chunked("g", (10, 3), np.float32, 4, meta={})


def test_chunked_truncated_memmap_raises_naming_file(tmp_path):
    store = Store(tmp_path)
    _fill(store.chunked("g", (10, 3), np.float32, 2), 0)
    _truncate(tmp_path / "g.npy", 12)
    with pytest.raises(StoreError, match=r"g\.npy: truncated or wrong size"):
        store.chunked("g", (10, 3), np.float32, 2)


def test_chunk_index_out_of_range(tmp_path):
    chunked = Store(tmp_path).chunked("g", (4,), np.int64, 2)
    with pytest.raises(DataError, match=r"chunk index 2 out of range \[0, 2\)"):
        chunked.mark_done(2)
    assert chunked.pending() == [0, 1]
