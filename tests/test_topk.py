"""Top-k without the dense matrix: ``method.topk(queries, k)`` equals ``Scores.topk`` on the dense scores, for every
method that has it, with the training set split into several blocks (and several query rounds for influence)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datacredit.methods.source as source_module
from datacredit import ClassificationTask, GradDot, Influence, Source, TracIn
from datacredit.data import ArrayDataset
from datacredit.methods import TRAK, base
from datacredit.methods.base import TopKAccumulator
from datacredit.models import mlp
from datacredit.trajectory import Trajectory


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x, y = torch.randn(52, 6, dtype=torch.float64), torch.randint(0, 3, (52,))
    model = mlp(6, 8, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    states = []
    for step in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step in (9, 19):
            states.append({k: v.clone() for k, v in model.state_dict().items()})
    train = ArrayDataset(x[:40], y[:40], ids=np.arange(500, 540))
    test = ArrayDataset(x[40:], y[40:], ids=np.arange(12))
    return model, Trajectory.from_states(states, lrs=[0.5, 0.5], steps=[10, 10]), train, test


def methods(model, traj):
    task, kw = ClassificationTask(), {"batch_size": 4, "progress": False}
    return {
        "graddot": GradDot(model, task, **kw),
        "gradcos-projected": GradDot(model, task, normalize=True, projection=16, **kw),
        "influence-kfac": Influence(model, task, curvature="kfac", query_batch=4, **kw),  # 3 query rounds
        "influence-identity": Influence(model, task, curvature="identity", **kw),
        "tracin": TracIn(model, task, traj, **kw),
        "trak": TRAK(model, ClassificationTask(measurement="margin"), projection=32, **kw),
        "source": Source(model, task, traj, segments=2, **kw),
    }


@pytest.mark.parametrize("name", ["graddot", "gradcos-projected", "influence-kfac", "influence-identity", "tracin",
                                  "trak", "source"])
def test_topk_equals_the_dense_topk(setup, name, monkeypatch, float64):
    model, traj, train, test = setup
    monkeypatch.setattr(base, "SCORE_CHUNK_BYTES", 8 * 12 * 8)  # blocks of 8 training rows: 5 blocks
    monkeypatch.setattr(source_module, "SUM_ELEMENTS", 1)  # SOURCE: blocks of one batch (4 rows)
    seen = []
    original = base.TopKAccumulator.add

    def spy(self, rows, cols, values):
        seen.append(rows.stop - rows.start)
        return original(self, rows, cols, values)

    monkeypatch.setattr(base.TopKAccumulator, "add", spy)
    method = methods(model, traj)[name].fit(train)
    dense = method.score(test)
    top = method.topk(test, 5)
    bottom = method.topk(test, 3, largest=False)
    assert max(seen) < len(train)  # never the whole training set at once
    for j in range(len(test)):
        want = dense.topk(5, j)
        assert [i for i, _ in top.query(j)] == [i for i, _ in want]
        np.testing.assert_allclose([v for _, v in top.query(j)], [v for _, v in want], rtol=1e-9, atol=1e-12)
        assert [i for i, _ in bottom.query(j)] == [i for i, _ in dense.bottomk(3, j)]
    assert top.query_ids.tolist() == list(range(12)) and top.train_ids.shape == (12, 5)


def test_ties_keep_training_order_and_k_larger_than_n():
    acc = TopKAccumulator(4, 1)
    acc.add(slice(0, 2), slice(None), np.array([[1.0], [2.0]]))
    acc.add(slice(2, 3), slice(None), np.array([[2.0]]))
    top = acc.result(np.array([10, 11, 12]), np.array([0]), "m")
    assert top.query(0) == [(11, 2.0), (12, 2.0), (10, 1.0)]
