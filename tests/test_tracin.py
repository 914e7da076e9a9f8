"""TracIn-CP against a slow torch.func loop over checkpoints, against Grad-Dot, sign, batch size, store and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datacredit import ClassificationTask, GradDot, Store
from datacredit.data import ArrayDataset, load_digits
from datacredit.errors import DataError, StoreError
from datacredit.methods import base
from datacredit.methods.tracin import TracIn
from datacredit.models import mlp
from datacredit.trajectory import Trajectory, TrajectoryRecorder

from .helpers import flat, torch_func_grads

LRS = [0.5, 0.3, 0.1]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    model = mlp(6, 8, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    states = []
    for step in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step in (4, 14, 29):
            states.append({k: v.clone() for k, v in model.state_dict().items()})
    train = ArrayDataset(x[:30], y[:30], ids=np.arange(100, 130))
    test = ArrayDataset(x[30:], y[30:], ids=np.arange(10))
    return model, Trajectory.from_states(states, lrs=LRS, steps=[5, 10, 15]), train, test


def slow_tracin(model, task, traj, train, test, weights):
    """Σ_k η_k G_train(θ_k) G_query(θ_k)ᵀ with torch.func per-example gradients, one fresh model per checkpoint."""
    total = torch.zeros(len(train), len(test), dtype=torch.float64)
    for k, w in enumerate(weights):
        net = mlp(6, 8, 3).double()
        net.load_state_dict(traj.state_dict(k))
        names = [n for n, _ in net.named_parameters()]
        g_train = flat(torch_func_grads(net, task, train.tensors), names)
        g_test = flat(torch_func_grads(net, task, test.tensors, measurement=True), names)
        total += w * g_train @ g_test.T
    return total.numpy()


@pytest.mark.parametrize("measurement", ["loss", "margin"])
def test_exact_tracin_equals_slow_loop_over_checkpoints(setup, measurement):
    model, traj, train, test = setup
    task = ClassificationTask(measurement=measurement)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = TracIn(model, task, traj, batch_size=7, progress=False).fit(train).score(test)
    np.testing.assert_allclose(scores.values, slow_tracin(model, task, traj, train, test, LRS), rtol=1e-9, atol=1e-12)
    assert scores.train_ids.tolist() == list(range(100, 130)) and scores.method == "tracin"
    for k, v in model.state_dict().items():  # the user's model is never touched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize("weighting, weights", [("lr_sum", [2.5, 3.0, 1.5]), ("uniform", [1.0, 1.0, 1.0])])
def test_weightings(setup, weighting, weights):
    model, traj, train, test = setup
    task = ClassificationTask()
    scores = TracIn(model, task, traj, weighting=weighting, progress=False).fit(train).score(test)
    np.testing.assert_allclose(scores.values, slow_tracin(model, task, traj, train, test, weights), rtol=1e-9,
                               atol=1e-12)


def test_projected_kronecker_with_room_for_every_layer_is_exact(setup):
    model, traj, train, test = setup
    task = ClassificationTask()
    tracin = TracIn(model, task, traj, projection=100, progress=False).fit(train)
    want = slow_tracin(model, task, traj, train, test, LRS)
    np.testing.assert_allclose(tracin.score(test).values, want, rtol=1e-9, atol=1e-12)
    self_want = TracIn(model, task, traj, progress=False).fit(train).self_scores().values
    np.testing.assert_allclose(tracin.self_scores().values, self_want, rtol=1e-9)


def test_one_checkpoint_with_lr_one_is_grad_dot(setup):
    model, _, train, test = setup
    task = ClassificationTask()
    one = Trajectory.from_states([model], lrs=[1.0])
    np.testing.assert_allclose(TracIn(model, task, one, progress=False).fit(train).score(test).values,
                               GradDot(model, task, progress=False).fit(train).score(test).values, rtol=1e-12)
    np.testing.assert_allclose(
        TracIn(model, task, one, projection=8, progress=False).fit(train).score(test).values,
        GradDot(model, task, projection=8, progress=False).fit(train).score(test).values, rtol=1e-5)  # float32 cache
    np.testing.assert_allclose(TracIn(model, task, one, progress=False).fit(train).self_scores().values,
                               GradDot(model, task, progress=False).fit(train).self_scores().values, rtol=1e-12)


def test_scores_do_not_depend_on_batch_size(setup):
    model, traj, train, test = setup
    task = ClassificationTask()
    for projection in (None, 16):
        a = TracIn(model, task, traj, projection=projection, batch_size=3, progress=False).fit(train).score(test)
        b = TracIn(model, task, traj, projection=projection, batch_size=64, progress=False).fit(train).score(test)
        np.testing.assert_allclose(a.values, b.values, rtol=1e-10, atol=1e-12)


def test_store_resume_and_memmap_scores(setup, tmp_path, monkeypatch):
    model, traj, train, test = setup
    task = ClassificationTask()
    memory = TracIn(model, task, traj, projection=16, batch_size=4, progress=False).fit(train)
    want = memory.score(test).values

    from datacredit.capture import projection

    calls = {"n": 0}
    original = projection.Projector.project

    def flaky(self, grads):
        calls["n"] += 1
        if calls["n"] == 12:  # 8 batches per checkpoint: the crash is in the second checkpoint's 4th batch
            raise KeyboardInterrupt
        return original(self, grads)

    monkeypatch.setattr(projection.Projector, "project", flaky)
    monkeypatch.setattr(base, "CACHE_CHUNK_ROWS", 8)  # chunks of 2 batches
    store = Store(tmp_path / "tracin")
    with pytest.raises(KeyboardInterrupt):
        TracIn(model, task, traj, projection=16, batch_size=4, store=store, progress=False).fit(train)
    calls["n"] = 100
    resumed = TracIn(model, task, traj, projection=16, batch_size=4, store=store, progress=False).fit(train)
    assert calls["n"] - 100 == 3 * 8 - 10  # 5 chunks of 2 batches were done before the crash
    scores = resumed.score(test)
    assert isinstance(scores.values, np.memmap)
    np.testing.assert_allclose(scores.values, want, rtol=1e-12)
    calls["n"] = 100
    again = TracIn(model, task, traj, projection=16, batch_size=4, store=store, progress=False).fit(train).score(test)
    assert calls["n"] == 100  # features and scores cached: no gradient is projected
    np.testing.assert_allclose(again.values, want, rtol=1e-12)
    calls["n"] = 100  # another weighting reuses the features: only the queries (3 batches) at 3 checkpoints
    uniform = TracIn(model, task, traj, projection=16, weighting="uniform", batch_size=4, store=store, progress=False)
    uniform.fit(train).score(test)
    assert calls["n"] - 100 == 3 * 3

    # exact route: the scores (not the features) go to the store
    exact = TracIn(model, task, traj, store=tmp_path / "exact", progress=False).fit(train).score(test)
    assert isinstance(exact.values, np.memmap)
    np.testing.assert_allclose(exact.values, slow_tracin(model, task, traj, train, test, LRS), rtol=1e-9, atol=1e-12)

    later = Trajectory.from_states([traj.state_dict(2)], lrs=[1.0])
    with pytest.raises(StoreError, match="another model"):
        TracIn(model, task, later, projection=16, batch_size=4, store=store, progress=False).fit(train)


def test_recorded_trajectory_reads_learning_rates(setup, tmp_path):
    model, _, train, test = setup
    net = mlp(6, 8, 3).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    recorder = TrajectoryRecorder(net, tmp_path / "run", optimizer=opt, every=3)
    x, y = train.tensors
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        recorder.step()
        sched.step()
    traj = Trajectory.load(tmp_path / "run")
    tracin = TracIn(net, ClassificationTask(), tmp_path / "run", progress=False)
    np.testing.assert_allclose(tracin.weights, [0.2, 0.1])
    scores = tracin.fit(train).score(test)
    np.testing.assert_allclose(scores.values, slow_tracin(net, ClassificationTask(), traj, train, test, [0.2, 0.1]),
                               rtol=1e-9, atol=1e-12)


def test_duplicated_mislabelled_query_is_its_own_top_proponent():
    """Sign convention on a trained model. TracIn is an unnormalised dot product, so a *well-fit* duplicate (small
    gradient) can be outscored by any high-loss example; a mislabelled query keeps a large gradient at every
    checkpoint and only its duplicate points its way, so there the answer is known: the duplicate helps it most."""
    train, test = load_digits()
    rng = np.random.default_rng(0)
    base = train.subset(rng.choice(len(train), 300, replace=False))
    picked = [0, 1, 2, 3, 4]
    qx, qy = test.tensors[0][picked], (test.tensors[1][picked] + 1 + torch.arange(5)) % 10
    queries = ArrayDataset(qx, qy, ids=np.arange(5))
    x, y = torch.cat([base.tensors[0], qx]), torch.cat([base.tensors[1], qy])
    data = ArrayDataset(x, y, ids=np.arange(len(x)))
    torch.manual_seed(0)
    model = mlp(64, [], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    states, gen = [], torch.Generator().manual_seed(0)
    for epoch in range(10):
        for idx in torch.randperm(len(x), generator=gen).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if epoch % 2:
            states.append({k: v.clone() for k, v in model.state_dict().items()})
    traj = Trajectory.from_states(states, lrs=[0.1] * len(states))
    scores = TracIn(model, ClassificationTask(), traj, progress=False).fit(data).score(queries)
    assert [scores.topk(1, q)[0][0] for q in range(5)] == [300 + q for q in range(5)]
    assert (scores.values[300 + np.arange(5), np.arange(5)] > 0).all()


def test_bad_input(setup):
    model, traj, train, test = setup
    task = ClassificationTask()
    with pytest.raises(RuntimeError, match="fit"):
        TracIn(model, task, traj, progress=False).score(test)
    with pytest.raises(DataError, match="learning rate"):
        TracIn(model, task, Trajectory.from_states([model]), progress=False)
    with pytest.raises(ValueError, match="weighting"):
        TracIn(model, task, traj, weighting="cosine", progress=False)


def test_a_changed_model_data_or_config_never_reuses_the_cache(setup, tmp_path):
    """TracIn's cached features belong to one trajectory, data set and projection: another trajectory or other data
    (same ids) is refused by name; another projection is another store beside the first (never the first's rows)."""
    model, traj, train, test = setup

    def run(trajectory, data, dim, store):
        return TracIn(model, ClassificationTask(), trajectory, projection=dim, store=store, progress=False
                      ).fit(data).score(test).values

    store = Store(tmp_path / "tracin")
    run(traj, train, 16, store)
    states = [{k: v * 1.1 for k, v in traj.state_dict(j).items()} for j in range(len(traj))]
    scaled = Trajectory.from_states(states, lrs=LRS, steps=[5, 10, 15])
    stale = "built for another model, data or configuration"
    with pytest.raises(StoreError, match=rf"checkpoint-0000: the gradient store was {stale} \(model.sha256"):
        run(scaled, train, 16, store)
    x, y = train.tensors
    shifted = ArrayDataset(x + 0.5, y, ids=np.arange(100, 130))
    with pytest.raises(StoreError, match=rf"{stale} \(data.data_sha256"):
        run(traj, shifted, 16, store)
    other = run(traj, train, 8, store)
    np.testing.assert_allclose(other, run(traj, train, 8, None), rtol=1e-12, atol=1e-12)
    assert len([p for p in (tmp_path / "tracin").iterdir() if p.name.startswith("features-")]) == 2 * 3


def test_stored_exact_scores_see_any_change_of_the_checkpoints(setup, tmp_path):
    """The exact route's stored scores are keyed by each checkpoint's weights by value: swapping two rows of a weight
    (binary fractions, so every sum is exact) keeps sums, sums of squares and first entries (what an earlier fingerprint
    of in-memory trajectories hashed), not the scores."""
    from datacredit.trajectory import state_digest

    model, traj, train, test = setup
    task = ClassificationTask()

    def trajectory(swap: bool) -> Trajectory:
        states = [{k: v.clone() for k, v in traj.state_dict(j).items()} for j in range(len(traj))]
        for state in states:
            w = state["0.weight"]
            w.copy_(torch.round(w * 8) / 8)  # eighths: every sum and sum of squares below is exact in any order
            if swap:
                w[[1, 2]] = w[[2, 1]]
        return Trajectory.from_states(states, lrs=LRS, steps=[5, 10, 15])

    a, b = trajectory(False), trajectory(True)
    assert all(state_digest(a.state_dict(k)) != state_digest(b.state_dict(k)) for k in range(3))
    first = TracIn(model, task, a, store=tmp_path / "s", progress=False).fit(train).score(test).values
    cached = TracIn(model, task, b, store=tmp_path / "s", progress=False).fit(train).score(test).values
    np.testing.assert_allclose(cached, slow_tracin(model, task, b, train, test, LRS), rtol=1e-9, atol=1e-12)
    assert not np.allclose(cached, first)
