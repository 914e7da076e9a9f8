"""``cache_bytes()``: every post-hoc method reports the bytes of what ``fit`` keeps, counted here independently from
the arrays and tensors it holds (and from their shapes), and an ensemble's stored cache is the sum of its members'."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datacredit import TRAK, ClassificationTask, GradDot, Influence, Source, TracIn
from datacredit.data import ArrayDataset
from datacredit.ensembles import DropoutEnsemble, IndependentEnsemble
from datacredit.models import mlp
from datacredit.training import train_classifier
from datacredit.trajectory import Trajectory

TASK = ClassificationTask()
N_TRAIN = 30


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x, y = torch.randn(36, 6, dtype=torch.float64), torch.randint(0, 3, (36,))
    train = ArrayDataset(x[:N_TRAIN], y[:N_TRAIN], ids=np.arange(100, 100 + N_TRAIN))
    test = ArrayDataset(x[N_TRAIN:], y[N_TRAIN:], ids=np.arange(6))
    model = train_classifier(mlp(6, 8, 3, dropout=0.3).double(), train, epochs=5)
    return model, train, test


def size(t) -> int:
    return t.nbytes if isinstance(t, np.ndarray) else t.numel() * t.element_size()


def curvature_bytes(curvature) -> int:
    """The fitted state as the curvature saves it, less its example count."""
    return sum(size(t) for k, t in curvature.state_dict().items() if k != "n_examples")


IDS = N_TRAIN * 8  # int64 training ids, kept by every method


def test_grad_dot(setup):
    model, train, _ = setup
    exact = GradDot(model, TASK, progress=False)
    assert exact.cache_bytes() == 0  # before fit
    assert exact.fit(train).cache_bytes() == IDS  # exact Grad-Dot keeps nothing but the ids
    cos = GradDot(model, TASK, normalize=True, progress=False).fit(train)
    assert cos.cache_bytes() == IDS + N_TRAIN * cos.train_norms.itemsize
    projected = GradDot(model, TASK, projection=16, progress=False).fit(train)
    phi = projected.train_features
    assert phi.shape[0] == N_TRAIN
    assert projected.cache_bytes() == IDS + phi.nbytes == IDS + phi.size * phi.itemsize


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "diagonal", "explicit", "identity"])
def test_influence(setup, curvature):
    model, train, _ = setup
    method = Influence(model, TASK, curvature=curvature, progress=False).fit(train)
    expected = 0 if curvature == "identity" else curvature_bytes(method.curvature)
    assert (curvature == "identity") == (expected == 0)
    assert method.cache_bytes() == IDS + expected  # the model's parameters are not cache


def test_trak(setup):
    model, train, _ = setup
    method = TRAK(model, ClassificationTask(measurement="margin"), models=[model, model], projection=24,
                  progress=False).fit(train)
    held = [*method.train_features, *method.one_minus_p]
    held += [t for m in range(2) for t in method.kernel(m).tensors.values()]
    assert [f.shape for f in method.train_features] == [(N_TRAIN, 24)] * 2
    assert method.cache_bytes() == IDS + sum(size(t) for t in held)


def test_tracin(setup):
    model, train, _ = setup
    traj = Trajectory.from_states([model, model])
    exact = TracIn(model, TASK, traj, weighting="uniform", progress=False).fit(train)
    assert exact.cache_bytes() == IDS
    projected = TracIn(model, TASK, traj, weighting="uniform", projection=8, progress=False).fit(train)
    assert len(projected.train_features) == 2
    assert projected.cache_bytes() == IDS + sum(f.nbytes for f in projected.train_features)


def test_source(setup):
    model, train, _ = setup
    traj = Trajectory.from_states([model] * 6, lrs=[0.1] * 6, steps=[5] * 6)
    method = Source(model, TASK, traj, segments=3, curvature="kfac", progress=False).fit(train)
    curvatures = sum(curvature_bytes(seg.curvature) for seg in method.segments)
    assert len(method.segments) == 3 and curvatures > 0
    assert method.cache_bytes() == 2 * IDS + curvatures  # all ids, and the one stage's ids


def test_ensemble_cache_is_the_members_sum(setup):
    model, train, test = setup
    factory = lambda m, j: TRAK(m, ClassificationTask(measurement="margin"), projection=8 + j, progress=False)  # noqa: E731
    ens = IndependentEnsemble(factory, models=[model] * 3)
    cost = ens.fit(train).score(test).config["cost"]
    members = [m.cache_bytes() for m in ens.methods]
    assert len(set(members)) == 3  # other projection widths: other sizes
    assert cost["member_cache_bytes"] == members and cost["cache_bytes"] == sum(members)
    assert ens.stored_bytes == cost["weight_bytes"] + sum(members)
    shared = DropoutEnsemble(model, lambda m, _: GradDot(m, TASK, projection=16, progress=False), k=2,
                             share_train_cache=True).fit(train)
    assert shared.cost.shared_cache_bytes == shared.methods[0].cache_bytes()
    assert shared.cost.member_cache_bytes == [0, 0]


def test_a_member_without_cache_bytes_is_refused(setup):
    model, train, _ = setup

    class NoCache:
        def __init__(self, model):
            self.model = model

        def fit(self, train):
            return self

        def score(self, queries):
            raise AssertionError

        def self_scores(self):
            raise AssertionError

    with pytest.raises(TypeError, match="cache_bytes"):
        DropoutEnsemble(model, lambda m, _: NoCache(m), k=1).fit(train)
