"""SOURCE against exact unrolled differentiation (autograd through every training step), influence and Grad-Dot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from datacredit import ClassificationTask, GradDot, Influence
from datacredit.data import ArrayDataset
from datacredit.methods.source import Source
from datacredit.models import mlp
from datacredit.task import Task
from datacredit.trajectory import Trajectory

from .helpers import flat, torch_func_grads


class Regression(Task):
    """½ (xᵀθ − y)² per example."""

    def loss(self, model, batch):
        x, y = batch[0], batch[1]
        return 0.5 * (model(x).squeeze(-1) - y) ** 2


def data_with_optimum(theta, n, seed):
    """Least-squares data whose optimum is exactly ``theta``: residuals orthogonal to the columns of X."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(theta), generator=g, dtype=torch.float64)
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(x)
    residual = noise - q @ (q.T @ noise)
    return x, x @ theta + residual


def gd_trajectory(model, x, y, lr, steps, n_checkpoints):
    """Full-batch gradient descent on the mean loss; equally spaced checkpoints (state, lr, interval length)."""
    task, states, every = Regression(), [], steps // n_checkpoints
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(n_checkpoints):
        for _ in range(every):
            opt.zero_grad()
            task.loss(model, (x, y)).mean().backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return Trajectory.from_states(states, lrs=[lr] * n_checkpoints, steps=[every] * n_checkpoints)


def unrolled(theta0, stages, queries):
    """``−d f_q(θ_T) / dε_z`` by autograd through every step of full-batch GD on (1/N_s) Σ (1 + ε_i) ℓ_i, per stage."""
    eps = [torch.zeros(len(x), dtype=torch.float64, requires_grad=True) for x, _, _, _ in stages]
    theta = theta0.clone().requires_grad_(True)
    for (x, y, lr, steps), e in zip(stages, eps):
        for _ in range(steps):
            loss = ((1 + e) * 0.5 * (x @ theta - y) ** 2).mean()
            (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
            theta = theta - lr * grad
    xq, yq = queries
    f = 0.5 * (xq @ theta - yq) ** 2
    rows = [torch.autograd.grad(f[q], eps, retain_graph=True) for q in range(len(f))]
    return -torch.stack([torch.cat(r) for r in rows], dim=1)  # (n_train, n_query)


@pytest.fixture
def problem():
    torch.manual_seed(0)
    theta = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    x, y = data_with_optimum(theta, 10, seed=1)
    xq = torch.randn(4, 3, dtype=torch.float64)
    yq = xq @ theta + torch.randn(4, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(theta[None])
    return model, theta, x, y, (xq, yq)


@pytest.mark.parametrize("segments", [1, 3])
def test_discrete_source_with_exact_curvature_equals_unrolled_differentiation(problem, segments):
    """Stationary gradients (training starts at the optimum), exact Hessian, the recorded GD steps: exact."""
    model, theta, x, y, queries = problem
    traj = gd_trajectory(model, x, y, lr=0.1, steps=60, n_checkpoints=6)
    src = Source(model, Regression(), traj, segments=segments, curvature="explicit", time="discrete", progress=False)
    scores = src.fit(ArrayDataset(x, y)).score(ArrayDataset(*queries))
    want = unrolled(theta, [(x, y, 0.1, 60)], queries)
    np.testing.assert_allclose(scores.values, want.numpy(), rtol=1e-9, atol=1e-12)
    assert np.abs(want.numpy()).max() > 1e-3  # not a trivially zero comparison


def test_continuous_source_is_the_gradient_flow_limit(problem):
    """The paper's exp form differs from discrete GD by O(η‖H‖) per step: shrinking η at fixed ηK shrinks the gap."""
    model, theta, x, y, queries = problem
    gaps = []
    for lr, steps in ((0.1, 60), (0.01, 600)):
        traj = gd_trajectory(model, x, y, lr=lr, steps=steps, n_checkpoints=6)
        src = Source(model, Regression(), traj, segments=3, curvature="explicit", progress=False)
        got = src.fit(ArrayDataset(x, y)).score(ArrayDataset(*queries)).values
        want = unrolled(theta, [(x, y, lr, steps)], queries).numpy()
        gaps.append(np.abs(got - want).max() / np.abs(want).max())
    assert gaps[0] < 0.15 and gaps[1] < gaps[0] / 5, gaps


def test_two_stage_pipeline_equals_unrolled_differentiation(problem):
    """Pretrain on A, fine-tune on B (same optimum, so stationary): scores for both stages' examples are exact."""
    model, theta, x, y, queries = problem
    xb, yb = data_with_optimum(theta, 7, seed=2)
    pre = gd_trajectory(model, x, y, lr=0.1, steps=40, n_checkpoints=4)
    fine = gd_trajectory(model, xb, yb, lr=0.05, steps=30, n_checkpoints=3)
    src = Source(model, Regression(), stages=[(pre, 2), (fine, 1)], curvature="explicit", time="discrete",
                 progress=False)
    train_a, train_b = ArrayDataset(x, y), ArrayDataset(xb, yb, ids=np.arange(100, 107))
    scores = src.fit([train_a, train_b]).score(ArrayDataset(*queries))
    want = unrolled(theta, [(x, y, 0.1, 40), (xb, yb, 0.05, 30)], queries)
    assert scores.train_ids.tolist() == list(range(10)) + list(range(100, 107))
    np.testing.assert_allclose(scores.values, want.numpy(), rtol=1e-9, atol=1e-12)
    # removing a fine-tuning example: its score is the (first-order) change of the query loss, sign included
    i = 100 + int(np.argmax(np.abs(want.numpy()[10:, 0])))
    assert scores.values[scores.train_ids.tolist().index(i), 0] == pytest.approx(want[10 + i - 100, 0].item())


def trained_classifier():
    torch.manual_seed(0)
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    model = mlp(5, [], 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, ArrayDataset(x[:30], y[:30]), ArrayDataset(x[30:], y[30:], ids=np.arange(10))


def test_one_long_segment_is_influence_over_n(problem):
    """L = 1, ηK → ∞: (1 − e^{−ηKλ})/λ → 1/λ, so τ = influence (explicit Hessian, no damping) / N."""
    model, theta, x, _, queries = problem
    y = torch.randn(len(x), dtype=torch.float64)  # any data: the Hessian XᵀX/N is positive definite
    train = ArrayDataset(x, y)
    traj = Trajectory.from_states([model], lrs=[1e9], steps=[1])
    src = Source(model, Regression(), traj, segments=1, curvature="explicit", progress=False)
    got = src.fit(train).score(ArrayDataset(*queries)).values
    inf = Influence(model, Regression(), curvature="explicit", damping=0.0, progress=False).fit(train)
    np.testing.assert_allclose(got, inf.score(ArrayDataset(*queries)).values / len(train), rtol=1e-7, atol=1e-14)


@pytest.mark.parametrize("curvature", ["explicit", "ekfac"])
def test_short_segment_is_grad_dot_times_eta_k_over_n(curvature):
    """ηK → 0: the factor → ηK, so τ = (ηK/N)·⟨∇f_q, ∇ℓ_z⟩ — TracIn at one checkpoint, up to scale."""
    model, train, test = trained_classifier()
    task = ClassificationTask()
    traj = Trajectory.from_states([model], lrs=[1e-6], steps=[1])
    src = Source(model, task, traj, segments=1, curvature=curvature, progress=False).fit(train).score(test)
    dot = GradDot(model, task, progress=False).fit(train).score(test)
    np.testing.assert_allclose(src.values, dot.values * 1e-6 / len(train), rtol=1e-4, atol=1e-16)


def test_source_on_a_real_run_is_batch_invariant_and_self_scores_match_the_diagonal():
    model, train, _ = trained_classifier()
    task = ClassificationTask()
    states, lrs = [], []
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = train.tensors
    for _ in range(6):
        for _ in range(5):
            opt.zero_grad()
            task.loss(model, (x, y)).mean().backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        lrs.append(0.1)
    traj = Trajectory.from_states(states, lrs=lrs, steps=[5] * 6)
    a = Source(model, task, traj, batch_size=7, progress=False).fit(train)
    b = Source(model, task, traj, batch_size=30, progress=False).fit(train)
    sa, sb = a.score(train), b.score(train)
    np.testing.assert_allclose(sa.values, sb.values, rtol=1e-8, atol=1e-14)
    # the checkpoint sums in blocks of 7 rows (SUM_ELEMENTS tiny), and every sum materialized instead of factored
    import datacredit.methods.source as source_module
    from datacredit.methods.piece_sums import PieceSum

    small = pytest.MonkeyPatch()
    small.setattr(source_module, "SUM_ELEMENTS", 1)
    try:
        np.testing.assert_allclose(a.score(train).values, sa.values, rtol=1e-10, atol=1e-15)
        small.setattr(PieceSum, "_merge", lambda self, piece: False)  # every sum materialized (the old route)
        np.testing.assert_allclose(a.score(train).values, sa.values, rtol=1e-10, atol=1e-15)
    finally:
        small.undo()
    assert sa.config["segments"] == [2, 2, 2]
    np.testing.assert_allclose(a.self_scores().values[:, 0], np.diag(sa.values), rtol=1e-8, atol=1e-14)
    assert all(torch.equal(model.state_dict()[k], states[-1][k]) for k in states[-1])  # user's model untouched


def unrolled_minibatch(theta0, x, y, lr, order, queries):
    """``−d f_q(θ_T)/dε_z`` through SGD steps on mini-batches (``order``: one index tensor per step)."""
    eps = torch.zeros(len(x), dtype=torch.float64, requires_grad=True)
    theta = theta0.clone().requires_grad_(True)
    for idx in order:
        loss = ((1 + eps[idx]) * 0.5 * (x[idx] @ theta - y[idx]) ** 2).mean()
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta = theta - lr * grad
    xq, yq = queries
    f = 0.5 * (xq @ theta - yq) ** 2
    return -torch.stack([torch.autograd.grad(f[q], eps, retain_graph=True)[0] for q in range(len(f))], dim=1)


def test_stochastic_non_converged_run_is_close_to_unrolled_differentiation(problem):
    """Mini-batch SGD from far away (gradients change along the run): SOURCE (3 segments, 6 checkpoints, exact
    Hessian) is an approximation. Stated bound: per-query Pearson r ≥ 0.95 and relative max error ≤ 0.35 (measured
    when written: r 0.987–0.998, relative max error 0.27)."""
    model, theta, x, _, queries = problem
    y = torch.randn(len(x), dtype=torch.float64) * 2
    theta0 = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        model.weight.zero_()
    g = torch.Generator().manual_seed(3)
    order = [torch.randperm(10, generator=g)[:5] for _ in range(60)]
    states, task = [], Regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step, idx in enumerate(order):
        opt.zero_grad()
        task.loss(model, (x[idx], y[idx])).mean().backward()
        opt.step()
        if (step + 1) % 10 == 0:
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    traj = Trajectory.from_states(states, lrs=[0.05] * 6, steps=[10] * 6)
    got = Source(model, task, traj, segments=3, curvature="explicit", progress=False).fit(
        ArrayDataset(x, y)).score(ArrayDataset(*queries)).values
    want = unrolled_minibatch(theta0, x, y, 0.05, order, queries).numpy()
    r = [np.corrcoef(got[:, q], want[:, q])[0, 1] for q in range(want.shape[1])]
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert min(r) >= 0.95 and rel <= 0.35, (r, rel)


@pytest.mark.parametrize("curvature", ["diagonal", "kfac", "ekfac"])
@pytest.mark.parametrize("defer", [False, True])
def test_factored_scoring_equals_materialized_weights_on_torch_func_gradients(curvature, defer, monkeypatch):
    """The eigenbasis chain (queries rotated from their factors, changes of basis between segments, ``Q_v`` left to
    the training side or not) and the factored checkpoint sums (a ReLU MLP's first-layer input is the same at every
    checkpoint) against the slow twin: each segment's weights by ``apply_functions`` on materialized query gradients
    (:meth:`Source._segment_weights`), dotted with torch.func per-example gradients at every checkpoint."""
    import datacredit.methods.source as source_module
    from datacredit.methods.piece_sums import PieceSum


    torch.manual_seed(0)
    x, y = torch.randn(36, 6, dtype=torch.float64), torch.randint(0, 3, (36,))
    x[:, :2] = 0
    model = mlp(6, [9], 3).double()
    task = ClassificationTask()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    states = []
    for _ in range(6):
        for _ in range(4):
            opt.zero_grad()
            task.loss(model, (x[:30], y[:30])).mean().backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    traj = Trajectory.from_states(states, lrs=[0.3] * 6, steps=[4] * 6)
    train, test = ArrayDataset(x[:30], y[:30]), ArrayDataset(x[30:], y[30:], ids=np.arange(6))
    monkeypatch.setattr(source_module, "deferred", lambda train_positions, query_rows: defer)
    merges = {"v": 0}
    original = PieceSum._merge

    def counted(self, piece):
        merged = original(self, piece)
        merges["v"] += merged and self.fixed == "v"
        return merged

    monkeypatch.setattr(PieceSum, "_merge", counted)
    src = Source(model, task, traj, segments=3, curvature=curvature, batch_size=8, progress=False).fit(train)
    got = src.score(test).values
    assert merges["v"] > 0  # the first layer's input summed factored

    np.testing.assert_allclose(got, _slow_segment_scores(src, task, test, train.tensors), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("defer", [False, True])
def test_factored_scoring_on_a_tied_gpt_equals_the_slow_twin(defer, monkeypatch):
    """The checkpoint sums' other paths: Embedding rows (the token index is the same at every checkpoint: summed by
    ``v``), tied weights (two pieces per parameter), LayerNorm's Dense pieces and Linear pieces over 7 positions whose
    inputs change between checkpoints (materialized on the first mismatch, ``v`` rotated first where deferred)."""
    import datacredit.methods.source as source_module
    from datacredit.models import TinyGPT
    from datacredit.task import LanguageModelingTask


    torch.manual_seed(0)
    model = TinyGPT(11, d=8, n_layers=1, n_heads=2, max_len=8, tied=True).double()
    task = LanguageModelingTask()
    tokens = torch.randint(0, 11, (14, 8), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    states = []
    for _ in range(4):
        for _ in range(3):
            opt.zero_grad()
            task.loss(model, tokens[:10]).mean().backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    traj = Trajectory.from_states(states, lrs=[0.2] * 4, steps=[3] * 4)
    train, test = ArrayDataset(tokens[:10]), ArrayDataset(tokens[10:], ids=np.arange(4))
    monkeypatch.setattr(source_module, "deferred", lambda train_positions, query_rows: defer)
    src = Source(model, task, traj, segments=2, curvature="ekfac", batch_size=4, progress=False).fit(train)
    got = src.score(test).values

    np.testing.assert_allclose(got, _slow_segment_scores(src, task, test, train.tensors[0]), rtol=1e-8, atol=1e-13)


def _slow_segment_scores(src, task, test, batch) -> np.ndarray:
    """The slow twin of ``src.score(test)`` from its own segment weights: each checkpoint's torch.func per-example
    gradients of ``batch`` (the whole training set) times the segment's query weights, averaged over checkpoints."""
    names = [n for n, _ in src.model.named_parameters()]
    _, v = src._query_vectors(test)
    n_train = len(src.train_ids)
    expected = 0
    for seg, w in zip(src.segments, src._segment_weights(v)):
        for k in range(len(seg.trajectory)):
            seg.trajectory.load_into(src.model, k)
            g = flat(torch_func_grads(src.model, task, batch), names)
            expected = expected + (g @ flat(w, names).T).numpy() / (len(seg.trajectory) * n_train)
    return expected
