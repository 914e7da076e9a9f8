"""Scores: validation, topk/bottomk, accessors, save/load, average."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from datacredit.errors import DataError, StoreError
from datacredit.scores import Scores
from datacredit.store import Store


def _scores(n_train: int = 5, n_query: int = 2, seed: int = 0, method: str = "graddot") -> Scores:
    values = np.random.default_rng(seed).normal(size=(n_train, n_query))
    return Scores(values, np.arange(100, 100 + n_train), np.arange(7, 7 + n_query), method, {"seed": seed})


# -- validation ------------------------------------------------------------------------------------
def test_valid_construction_and_properties():
    s = _scores(5, 2)
    assert s.shape == (5, 2) and s.n_train == 5 and s.n_query == 2
    assert s.train_ids.dtype == np.int64 and s.query_ids.dtype == np.int64
    assert "n_train=5" in repr(s)


@pytest.mark.parametrize(
    ("values", "train_ids", "query_ids", "message"),
    [
        (np.zeros(3), [0, 1, 2], [0], "must be 2-D"),
        (np.zeros((3, 1)), [0, 1], [0], r"shape \(3, 1\) but there are 2 train_ids"),
        (np.zeros((3, 2)), [0, 1, 2], [5], "1 query_ids"),
        (np.zeros((3, 1)), [0, 1, 1], [0], r"train_ids are not unique; duplicated: \[1\]"),
        (np.zeros((1, 2)), [0], [4, 4], "query_ids are not unique"),
        (np.zeros((2, 1)), [[0, 1]], [0], "train_ids must be 1-D"),
        (np.zeros((2, 1)), [0.5, 1.5], [0], "train_ids must be integers"),
        (np.zeros((2, 1), dtype=np.int64), [0, 1], [0], "floating point"),
    ],
)
def test_validation_errors(values, train_ids, query_ids, message):
    with pytest.raises(DataError, match=message):
        Scores(values, train_ids, query_ids, "m", {})


def test_config_must_be_json():
    with pytest.raises(DataError, match="JSON-serialisable"):
        Scores(np.zeros((1, 1)), [0], [0], "m", {"x": object()})


# -- topk / bottomk / accessors --------------------------------------------------------------------
def test_topk_and_bottomk_order_and_ids():
    values = np.array([[0.1, 5.0], [-2.0, 1.0], [3.0, -1.0], [0.5, 0.0], [-0.7, 2.0]])
    s = Scores(values, [10, 11, 12, 13, 14], [70, 80], "m", {})
    assert s.topk(3, query=0) == [(12, 3.0), (13, 0.5), (10, 0.1)]
    assert s.bottomk(2, query=0) == [(11, -2.0), (14, -0.7)]
    assert s.topk(2, query=80, by_id=True) == [(10, 5.0), (14, 2.0)]
    assert s.bottomk(1, query=1) == [(12, -1.0)]
    assert len(s.topk(99, query=0)) == 5  # k larger than n_train returns everything
    assert s.topk(0, query=0) == []


def test_topk_ties_keep_training_order_and_single_query_default():
    s = Scores(np.array([[1.0], [2.0], [2.0], [1.0]]), [3, 2, 1, 0], [9], "m", {})
    assert s.topk(4) == [(2, 2.0), (1, 2.0), (3, 1.0), (0, 1.0)]


def test_query_resolution_errors():
    s = _scores(4, 3)
    with pytest.raises(DataError, match="pass a query: there are 3"):
        s.topk(1)
    with pytest.raises(DataError, match=r"query index 3 out of range \[0, 3\)"):
        s.topk(1, query=3)
    with pytest.raises(DataError, match="query index -1 out of range"):
        s.bottomk(1, query=-1)
    with pytest.raises(DataError, match="no query with id 0"):
        s.topk(1, query=0, by_id=True)
    with pytest.raises(DataError, match="k must be >= 0"):
        s.topk(-1, query=0)


def test_column_and_row_accessors():
    s = _scores(4, 3)
    np.testing.assert_array_equal(s.column(1), s.values[:, 1])
    np.testing.assert_array_equal(s.column(9, by_id=True), s.values[:, 2])
    np.testing.assert_array_equal(s.row(2), s.values[2])
    np.testing.assert_array_equal(s.row(101, by_id=True), s.values[1])
    with pytest.raises(DataError, match="train index 4 out of range"):
        s.row(4)


# -- save / load -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_roundtrip(tmp_path, mmap):
    s = _scores(6, 3)
    s.save(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == [
        "manifest.json", "query_ids.npy", "sources.json", "train_ids.npy", "values.npy",
    ]
    t = Scores.load(tmp_path / "run", mmap=mmap)
    assert isinstance(t.values, np.memmap) == mmap
    np.testing.assert_array_equal(t.values, s.values)
    np.testing.assert_array_equal(t.train_ids, s.train_ids)
    np.testing.assert_array_equal(t.query_ids, s.query_ids)
    assert (t.method, t.config) == ("graddot", {"seed": 0})
    assert t.topk(2, query=1) == s.topk(2, query=1)


def test_save_overwrites_previous_scores(tmp_path):
    _scores(6, 3, seed=0).save(tmp_path)
    new = _scores(4, 2, seed=1, method="tracin")
    new.save(tmp_path)
    t = Scores.load(tmp_path)
    assert t.shape == (4, 2) and t.method == "tracin"
    np.testing.assert_array_equal(t.values, new.values)


def test_load_from_memmap_and_resave_elsewhere(tmp_path):
    s = _scores(5, 2)
    s.save(tmp_path / "a")
    Scores.load(tmp_path / "a", mmap=True).save(tmp_path / "b")
    np.testing.assert_array_equal(Scores.load(tmp_path / "b").values, s.values)


def test_truncated_values_raises_store_error(tmp_path):
    _scores(20, 4).save(tmp_path)
    path = tmp_path / "values.npy"
    path.write_bytes(path.read_bytes()[:-8])
    for mmap in (False, True):
        with pytest.raises(StoreError, match=r"values\.npy: truncated"):
            Scores.load(tmp_path, mmap=mmap)


def test_missing_files_raise_store_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Scores.load(tmp_path / "nowhere")
    with pytest.raises(StoreError, match=r"manifest\.json: no artefact named 'values'"):
        Scores.load(tmp_path)
    _scores().save(tmp_path)
    (tmp_path / "train_ids.npy").unlink()
    with pytest.raises(StoreError, match=r"train_ids\.npy: file is missing"):
        Scores.load(tmp_path)


def test_interrupted_save_keeps_the_old_scores(tmp_path, monkeypatch):
    # Regression: the old save removed 'values' first, so a failure midway lost the previous result.
    old = _scores(6, 3, seed=0)
    old.save(tmp_path)
    new = _scores(4, 2, seed=1, method="tracin")
    from datacredit import store as store_module

    real = store_module.Store.save_array

    def fail_on_values(self, name, arr, meta=None):
        if name == "values":
            raise OSError("crash")
        real(self, name, arr, meta)

    monkeypatch.setattr(store_module.Store, "save_array", fail_on_values)
    with pytest.raises(OSError):
        new.save(tmp_path)
    monkeypatch.undo()
    t = Scores.load(tmp_path)  # train_ids/query_ids were written but never committed
    np.testing.assert_array_equal(t.values, old.values)
    np.testing.assert_array_equal(t.train_ids, old.train_ids)
    assert t.method == "graddot" and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert sorted(p for p in os.listdir(tmp_path) if not p.startswith(".")) == [
        "manifest.json", "query_ids.npy", "sources.json", "train_ids.npy", "values.npy"]


def test_same_size_corruption_is_caught_under_mmap(tmp_path):
    # Regression: memory-mapped loads (what `datacredit report` uses) skipped the hash check.
    s = _scores(20, 4)
    s.save(tmp_path)
    path = tmp_path / Store(tmp_path).info("values")["file"]
    data = bytearray(path.read_bytes())
    data[-8:] = np.float64(1e9).tobytes()
    path.write_bytes(bytes(data))
    for mmap in (True, False):
        with pytest.raises(StoreError, match=r"values\.npy: corrupt, sha256"):
            Scores.load(tmp_path, mmap=mmap)


def test_resave_keeps_old_until_new_is_committed_and_leaves_only_live_files(tmp_path):
    for seed in range(4):  # alternates file names (canonical / token): each save retires the previous files
        s = _scores(5 + seed, 2, seed=seed)
        s.save(tmp_path)
        t = Scores.load(tmp_path, mmap=True)
        np.testing.assert_array_equal(t.values, s.values)
        live = {e["file"] for e in json.loads((tmp_path / "manifest.json").read_text())["artefacts"].values()}
        assert {p for p in os.listdir(tmp_path) if not p.startswith(".")} == live | {"manifest.json"}
    assert Store(tmp_path).kind == "scores"


def test_save_over_another_kind_is_refused_unless_overwrite(tmp_path):
    gt = Store(tmp_path / "gt")
    gt.claim("groundtruth")
    gt.save_array("masks", np.ones((3, 4), dtype=bool))
    with pytest.raises(StoreError, match=r"holds a 'groundtruth' store \(masks\), not 'scores'.*overwrite=True"):
        _scores().save(tmp_path / "gt")
    assert Store(tmp_path / "gt").names() == ["masks"] and Store(tmp_path / "gt").kind == "groundtruth"
    cache = Store(tmp_path / "cache")  # a method cache that never claimed a kind
    cache.save_array("train_features", np.zeros((5, 3)))
    cache.save_array("train_ids", np.arange(5))
    with pytest.raises(StoreError, match=r"holds other artefacts \(train_features\), not a 'scores' store"):
        _scores().save(tmp_path / "cache")
    assert not any(p.endswith(".tmp") for p in os.listdir(tmp_path / "cache"))
    s = _scores()
    s.save(tmp_path / "gt", overwrite=True)
    np.testing.assert_array_equal(Scores.load(tmp_path / "gt").values, s.values)
    assert Store(tmp_path / "gt").names() == ["query_ids", "sources", "train_ids", "values"]
    assert not any(p.startswith("masks") for p in os.listdir(tmp_path / "gt"))
    with pytest.raises(StoreError, match="holds a 'scores' store"):  # and the other way round
        Store(tmp_path / "gt").claim("groundtruth")


def test_legacy_scores_directory_without_kind_loads_and_is_adopted(tmp_path):
    s = _scores()
    s.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["kind"]  # as written before kinds existed
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    np.testing.assert_array_equal(Scores.load(tmp_path).values, s.values)
    _scores(seed=3).save(tmp_path)
    assert Store(tmp_path).kind == "scores"


def test_load_refuses_another_kind(tmp_path):
    _scores().save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["kind"] = "groundtruth"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="holds a 'groundtruth' store, not Scores"):
        Scores.load(tmp_path)


# -- average ---------------------------------------------------------------------------------------
def test_average():
    a, b, c = _scores(seed=0), _scores(seed=1), _scores(seed=2)
    avg = Scores.average([a, b, c])
    np.testing.assert_allclose(avg.values, (a.values + b.values + c.values) / 3, rtol=1e-12)
    np.testing.assert_array_equal(avg.train_ids, a.train_ids)
    assert avg.method == "average" and len(avg.config["members"]) == 3
    f32 = Scores(a.values.astype(np.float32), a.train_ids, a.query_ids, "m", {})
    assert Scores.average([f32, f32]).values.dtype == np.float32


def test_average_requires_same_ids():
    a = _scores(5, 2)
    shuffled = Scores(a.values, a.train_ids[::-1], a.query_ids, "m", {})
    other_q = Scores(a.values, a.train_ids, [1, 2], "m", {})
    with pytest.raises(DataError, match=r"scores\[1\] has different train_ids"):
        Scores.average([a, shuffled])
    with pytest.raises(DataError, match="different query_ids"):
        Scores.average([a, other_q])
    with pytest.raises(DataError, match="at least one"):
        Scores.average([])
