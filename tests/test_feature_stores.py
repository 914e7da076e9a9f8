"""Post-hoc methods on one GradientStore (``features=``), against their own projected routes or torch.func twins.

Every comparison is float64 at rtol 1e-9: a float64 model and a float64 store, the same projection matrices.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datacredit import ClassificationTask, GradDot
from datacredit.capture.kronecker import KronProjection
from datacredit.data import ArrayDataset
from datacredit.errors import StoreError
from datacredit.gradstore import DenseProjection, GradientStore
from datacredit.methods.influence import Influence
from datacredit.methods.tracin import TracIn
from datacredit.methods.trak import TRAK
from datacredit.models import mlp
from datacredit.trajectory import Trajectory

from .helpers import TOL, torch_func_grads

LRS = [0.5, 0.3, 0.1]


@pytest.fixture(scope="module")
def setup():
    """A small float64 MLP trained a little (3 checkpoints recorded), 40 training and 7 query examples."""
    torch.manual_seed(0)
    x, y = torch.randn(47, 6, dtype=torch.float64), torch.randint(0, 3, (47,))
    model = mlp(6, 8, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    states = []
    for step in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x[:40]), y[:40]).backward()
        opt.step()
        if step in (4, 14, 29):
            states.append({k: v.clone() for k, v in model.state_dict().items()})
    train = ArrayDataset(x[:40], y[:40], ids=np.arange(100, 140))
    test = ArrayDataset(x[40:], y[40:], ids=np.arange(7))
    return model, Trajectory.from_states(states, lrs=LRS, steps=[5, 10, 15]), train, test


def _kron_store(path, model, task, **kwargs):
    return GradientStore(path, model, task, projection=KronProjection(3, seed=4), dtype="float64", batch_size=16,
                         **kwargs)


def _explicit(gs: GradientStore, data: ArrayDataset, measurement: bool) -> dict[str, torch.Tensor]:
    """Per block, torch.func per-example gradients times the block's explicit Kronecker matrix ``(n, size)``."""
    grads = torch_func_grads(gs.model, gs.task, data.tensors, measurement)
    return {b.name: grads[b.name].reshape(len(data), -1) @ gs.projection.matrix(b) for b in gs.blocks}


def _same_topk(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-12)


def _cat(blocks: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(blocks.values()), dim=1)


# -- Grad-Dot ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [False, True])
def test_graddot_on_store_equals_torch_func_times_projection(setup, tmp_path, normalize):
    model, _, train, test = setup
    task = ClassificationTask()
    gs = _kron_store(tmp_path / "gs", model, task)
    method = GradDot(model, task, features=gs, normalize=normalize, batch_size=16, progress=False).fit(train)
    phi, phi_q = _cat(_explicit(gs, train, False)), _cat(_explicit(gs, test, True))
    if normalize:
        phi, phi_q = phi / phi.norm(dim=1, keepdim=True), phi_q / phi_q.norm(dim=1, keepdim=True)
    want = (phi @ phi_q.T).numpy()
    scores = method.score(test)
    np.testing.assert_allclose(scores.values, want, **TOL)
    assert list(scores.train_ids) == list(range(100, 140)) and list(scores.query_ids) == list(range(7))
    top = method.topk(test, 5)
    for j in range(7):
        _same_topk(top.query(j), scores.topk(5, j))
    want_self = np.ones(40) if normalize else (phi**2).sum(1).numpy()
    np.testing.assert_allclose(method.self_scores().values[:, 0], want_self, **TOL)
    from_store = GradDot.from_store(gs, normalize=normalize, progress=False).fit(train)
    np.testing.assert_allclose(from_store.score(test).values, want, **TOL)


# -- influence (projected Fisher) --------------------------------------------------------------------------------------
def test_projected_influence_equals_explicit_block_fisher(setup, tmp_path):
    """score = Σ_b φ_bᵀ (Φ_bᵀΦ_b/n + δ_b I)⁻¹ φ_{q,b}, δ_b = 0.1·trace/size + absolute, from torch.func gradients."""
    from datacredit.curvature import Damping

    model, _, train, test = setup
    task = ClassificationTask()
    gs = _kron_store(tmp_path / "gs", model, task)
    damping = Damping(absolute=0.01, relative=0.1)
    method = Influence(model, task, features=gs, damping=damping, batch_size=16, progress=False).fit(train)
    phi, phi_q = _explicit(gs, train, False), _explicit(gs, test, True)
    want, want_self = 0.0, 0.0
    for b in gs.blocks:
        fisher = phi[b.name].T @ phi[b.name] / len(train)
        lam = 0.1 * torch.trace(fisher) / b.size + 0.01
        inv = torch.linalg.inv(fisher + lam * torch.eye(b.size, dtype=torch.float64))
        want = want + phi[b.name] @ inv @ phi_q[b.name].T
        want_self = want_self + ((phi[b.name] @ inv) * phi[b.name]).sum(1)
    scores = method.score(test)
    assert scores.method == "influence-projected-fisher"
    np.testing.assert_allclose(scores.values, want.numpy(), **TOL)
    np.testing.assert_allclose(method.self_scores().values[:, 0], want_self.numpy(), **TOL)
    top = method.topk(test, 4, largest=False)
    for j in range(7):
        _same_topk(top.query(j), scores.topk(4, j, largest=False))
    ident = Influence(model, task, features=gs, curvature="identity", damping=0.5, progress=False).fit(train)
    np.testing.assert_allclose(ident.score(test).values, (_cat(phi) @ _cat(phi_q).T).numpy() / 1.5, **TOL)


# -- TRAK --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_models", [1, 2])
def test_trak_on_stores_equals_trak_projected(setup, tmp_path, n_models):
    """Same dense projection (seed + m per member), same kernel, same GCV ridge: the same τ and self-scores."""
    model, traj, train, test = setup
    task = ClassificationTask(measurement="margin")
    members = [traj.load_into(mlp(6, 8, 3).double(), k) for k in (2, 0)[:n_models]]
    own = TRAK(members[0], task, models=members, projection=40, batch_size=16, progress=False).fit(train)
    stores = [GradientStore(tmp_path / f"m{m}", net, task, projection=DenseProjection(40, "gaussian", seed=m),
                            dtype="float64", train_target="measurement") for m, net in enumerate(members)]
    on_store = TRAK(members[0], task, features=stores if n_models > 1 else stores[0], batch_size=16,
                    progress=False).fit(train)
    assert on_store.relative_ridges == own.relative_ridges
    np.testing.assert_allclose(on_store.score(test).values, own.score(test).values, **TOL)
    np.testing.assert_allclose(on_store.self_scores().values, own.self_scores().values, **TOL)


# -- TracIn ------------------------------------------------------------------------------------------------------------
def test_tracin_on_per_checkpoint_stores_equals_tracin_projected(setup, tmp_path):
    model, traj, train, test = setup
    task = ClassificationTask()
    own = TracIn(model, task, traj, projection=30, projection_kind="gaussian", batch_size=16, progress=False)
    stores = TracIn.feature_stores(tmp_path, model, task, traj, projection=DenseProjection(30, "gaussian", 0),
                                   dtype="float64")
    on_store = TracIn(model, task, traj, features=stores, batch_size=16, progress=False)
    np.testing.assert_allclose(on_store.fit(train).score(test).values, own.fit(train).score(test).values, **TOL)
    np.testing.assert_allclose(on_store.self_scores().values, own.self_scores().values, **TOL)
    with pytest.raises(ValueError, match="another model than checkpoint 0"):
        TracIn(model, task, traj, features=stores[::-1], progress=False)


# -- one store, many methods and rounds --------------------------------------------------------------------------------
def test_one_store_serves_two_methods_and_two_query_rounds_featurizing_once(setup, tmp_path):
    model, _, train, test = setup
    task = ClassificationTask()
    gs = _kron_store(tmp_path / "gs", model, task)
    dot = GradDot(model, task, features=gs, progress=False).fit(train)
    assert gs.batches_featurized == 3  # 40 training examples in batches of 16
    inf = Influence(model, task, features=gs, progress=False).fit(train)
    rounds = [ArrayDataset(*test.tensors, ids=np.arange(7)),
              ArrayDataset(*(t[:9] for t in train.tensors), ids=np.arange(9))]
    for queries in rounds:
        dot.score(queries)
        inf.score(queries)
    # training features once (3 batches), then one batch per query round per method
    assert gs.batches_featurized == 3 + 4
    reopened = _kron_store(tmp_path / "gs", model, task)
    cached = GradDot(model, task, features=reopened, store=tmp_path / "scores", progress=False).fit(train)
    assert reopened.batches_featurized == 0
    np.testing.assert_array_equal(cached.score(test).values, dot.score(test).values)  # a memmap in the score store
    inf_cached = Influence(model, task, features=reopened, store=tmp_path / "inf", progress=False).fit(train)
    np.testing.assert_array_equal(inf_cached.score(test).values, inf.score(test).values)


def test_changed_model_is_refused_by_every_method_on_the_store(setup, tmp_path):
    model, _, train, test = setup
    net = mlp(6, 8, 3).double()
    net.load_state_dict(model.state_dict())
    task = ClassificationTask()
    gs = _kron_store(tmp_path / "gs", net, task)
    dot = GradDot(net, task, features=gs, progress=False).fit(train)
    with torch.no_grad():
        next(net.parameters()).add_(0.01)
    with pytest.raises(StoreError, match="another model"):
        dot.score(test)
    with pytest.raises(StoreError, match="another model"):
        Influence(net, task, features=gs, progress=False).fit(train)
    refit = _kron_store(tmp_path / "gs", net, task, on_mismatch="refit")
    inf = Influence(net, task, features=refit, curvature="identity", damping=0.0, progress=False).fit(train)
    want = (_cat(_explicit(refit, train, False)) @ _cat(_explicit(refit, test, True)).T).numpy()
    np.testing.assert_allclose(inf.score(test).values, want, **TOL)


def test_bad_arguments(setup, tmp_path):
    model, traj, train, _ = setup
    task = ClassificationTask()
    gs = _kron_store(tmp_path / "gs", model, task)
    with pytest.raises(TypeError, match="GradientStore"):
        GradDot(model, task, features=tmp_path / "gs")
    with pytest.raises(ValueError, match="projection"):
        GradDot(model, task, features=gs, projection=8)
    with pytest.raises(ValueError, match="same model object"):
        GradDot(mlp(6, 8, 3).double(), task, features=gs)
    with pytest.raises(ValueError, match="curvature must be"):
        Influence(model, task, features=gs, curvature="ekfac")
    with pytest.raises(ValueError, match="needs features="):
        Influence(model, task, curvature="projected-fisher")
    with pytest.raises(ValueError, match="train_target='measurement'"):
        TRAK(model, ClassificationTask(measurement="margin"),
             features=_kron_store(tmp_path / "loss", model, ClassificationTask(measurement="margin")))
    with pytest.raises(ValueError, match="one GradientStore per checkpoint"):
        TracIn(model, task, traj, features=[gs])
    assert Influence(model, task).config.curvature == "ekfac"  # the default without features= is unchanged
