"""Gaps in the cache tests of the cached methods: killed *score* runs of TracIn and TRAK resume without recomputing
finished chunks; influence's cached curvature and scores follow a changed configuration; a method's own feature store
is one GradientStore that a second method object (or process) reuses and whose header names model, data and config.

(Changed model / data / config and killed fits are tested per method in test_graddot, test_tracin, test_trak,
test_influence, test_gradstore and test_digests; Source keeps no cache.)"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datacredit import ClassificationTask, GradDot, Store
from datacredit.data import ArrayDataset
from datacredit.digests import data_digest, model_digest
from datacredit.gradstore import GradientStore
from datacredit.methods import base
from datacredit.methods import tracin as tracin_module
from datacredit.methods import trak as trak_module
from datacredit.methods.influence import Influence
from datacredit.methods.tracin import TracIn
from datacredit.methods.trak import TRAK
from datacredit.models import mlp
from datacredit.trajectory import Trajectory


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x, y = torch.randn(46, 6, dtype=torch.float64), torch.randint(0, 3, (46,))
    model = mlp(6, 8, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    states = []
    for step in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x[:40]), y[:40]).backward()
        opt.step()
        if step in (9, 19):
            states.append({k: v.clone() for k, v in model.state_dict().items()})
    train = ArrayDataset(x[:40], y[:40], ids=np.arange(100, 140))
    test = ArrayDataset(x[40:], y[40:], ids=np.arange(6))
    return model, Trajectory.from_states(states, lrs=[0.5, 0.1]), train, test


def _flaky(monkeypatch, module, fail_at: int) -> dict[str, int]:
    """Count the calls of ``module.store_products`` (one per block of scores) and raise at call ``fail_at``."""
    calls = {"n": 0}
    original = module.store_products

    def flaky(terms, rows):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyboardInterrupt
        return original(terms, rows)

    monkeypatch.setattr(module, "store_products", flaky)
    return calls


@pytest.mark.parametrize("method", ["tracin", "trak"])
def test_killed_score_resumes_without_recomputing_finished_blocks(setup, tmp_path, monkeypatch, method):
    model, traj, train, test = setup
    monkeypatch.setattr(base, "SCORE_CHUNK_BYTES", 8 * len(test) * 8)  # 8 rows per block: 5 blocks of 40 rows
    if method == "tracin":
        module = tracin_module

        def make(store):
            return TracIn(model, ClassificationTask(), traj, projection=16, batch_size=8, store=store,
                          progress=False)
    else:
        module = trak_module

        def make(store):
            return TRAK(model, ClassificationTask(measurement="margin"), [traj.state_dict(0), traj.state_dict(1)],
                        projection=16, ridge=0.1, batch_size=8, store=store, progress=False)

    fresh = make(None).fit(train).score(test).values
    calls = _flaky(monkeypatch, module, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "s").fit(train).score(test)
    calls["n"] = 100
    scores = make(tmp_path / "s").fit(train).score(test)
    assert calls["n"] - 100 == 5 - 2  # blocks 3, 4 and 5: the first two were written before the crash
    assert isinstance(scores.values, np.memmap)
    np.testing.assert_allclose(scores.values, fresh, rtol=1e-9, atol=1e-12)
    calls["n"] = 100
    np.testing.assert_allclose(make(tmp_path / "s").fit(train).score(test).values, fresh, rtol=1e-9, atol=1e-12)
    assert calls["n"] == 100  # complete: read back


@pytest.mark.parametrize("change", [{"damping": 0.5}, {"curvature": "ekfac"}, {"fisher": "true", "seed": 3}])
def test_influence_cache_follows_a_changed_configuration(setup, tmp_path, change):
    """The same store under another damping, curvature or Fisher gives the uncached method's numbers."""
    model, _, train, test = setup
    task = ClassificationTask()
    base_kw = {"curvature": "kfac", "batch_size": 8, "progress": False}
    first = Influence(model, task, store=tmp_path / "inf", **base_kw).fit(train).score(test).values
    changed = {**base_kw, **change}
    cached = Influence(model, task, store=tmp_path / "inf", **changed).fit(train).score(test).values
    plain = Influence(model, task, **changed).fit(train).score(test).values
    np.testing.assert_allclose(cached, plain, rtol=1e-9, atol=1e-12)
    assert not np.allclose(cached, first)


def test_own_feature_store_is_a_self_describing_gradient_store_reused_by_a_new_method(setup, tmp_path):
    """Grad-Dot's projected route writes one GradientStore in its store directory; its header names the model, the
    data and the projection; a new method object on the same directory featurizes nothing again."""
    model, _, train, test = setup
    task = ClassificationTask()
    first = GradDot(model, task, projection=16, projection_kind="gaussian", batch_size=8, store=tmp_path / "gd",
                    progress=False).fit(train)
    want = first.score(test).values
    (root,) = [p for p in (tmp_path / "gd").iterdir() if p.name.startswith("features-loss-")]
    header = GradientStore(root, model, task).header()
    assert header["model"]["sha256"] == model_digest(model)
    assert header["data"]["data_sha256"] == data_digest(train) and header["data"]["n"] == len(train)
    assert header["config"]["projection"] == {"kind": "dense", "distribution": "gaussian", "dim": 16, "seed": 0}
    second = GradDot(model, task, projection=16, projection_kind="gaussian", batch_size=8, store=tmp_path / "gd",
                     progress=False)
    second.fit(train)
    np.testing.assert_allclose(second.score(test).values, want, rtol=1e-12)
    assert second._features_store().batches_featurized == 0  # features and scores read back
    other = train.subset(np.arange(5))
    plain = GradDot(model, task, projection=16, projection_kind="gaussian", progress=False).fit(train).score(other)
    np.testing.assert_allclose(second.score(other).values, plain.values, rtol=1e-12)
    assert second._features_store().batches_featurized == 1  # a new query round: its one batch only
    # no store: a private directory, gone with the method
    scratch = GradDot(model, task, projection=16, progress=False).fit(train)
    path = scratch._scratch_dir
    assert path.exists()
    del scratch
    import gc

    gc.collect()
    assert not path.exists()
    assert isinstance(Store(tmp_path / "gd").names(), list)


def test_influence_cache_follows_a_changed_frozen_layer(setup, tmp_path):
    """A frozen layer (not tracked, not attributed) still changes the curvature and the gradients: the same store then
    gives the uncached numbers, not the old model's (influence keyed its cache by the tracked parameters only)."""
    model, _, train, test = setup
    model = copy.deepcopy(model)
    task = ClassificationTask()
    for p in model[0].parameters():
        p.requires_grad_(False)
    kw = {"curvature": "kfac", "batch_size": 8, "progress": False}
    first = Influence(model, task, store=tmp_path / "inf", **kw).fit(train).score(test).values
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    cached = Influence(model, task, store=tmp_path / "inf", **kw).fit(train).score(test).values
    plain = Influence(model, task, **kw).fit(train).score(test).values
    np.testing.assert_allclose(cached, plain, rtol=1e-9, atol=1e-12)
    assert not np.allclose(cached, first)


def test_influence_without_a_store_hashes_nothing(setup, monkeypatch):
    """Digests key stored results only: without a store, fit and score never read the data or weights to hash them."""
    from datacredit.methods import influence as influence_module

    model, _, train, test = setup

    def refuse(*_):
        raise AssertionError("hashed without a store")

    for name in ("data_digest", "model_digest", "ids_digest"):
        monkeypatch.setattr(influence_module, name, refuse)
    Influence(model, ClassificationTask(), curvature="kfac", batch_size=8, progress=False).fit(train).score(test)
