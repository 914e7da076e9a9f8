"""Curvature strategies against their definitions computed naively (float64), storage, streaming, the CG twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datacredit import Store
from datacredit.capture import Capture, example_grads
from datacredit.curvature import (
    Curvature,
    Damping,
    ExplicitHessian,
    curvature_names,
    make_curvature,
    register_curvature,
    tracked_parameters,
)
from datacredit.curvature import base as curvature_base
from datacredit.curvature.fisher import check_fisher, sample_classes, uniforms
from datacredit.models import SmallCNN, TinyGPT
from datacredit.task import ClassificationTask, LanguageModelingTask, Task

from .helpers import TOL, SquashTask, torch_func_grads

pytestmark = pytest.mark.usefixtures("float64")


class Tokens(nn.Module):
    """Embedding → LayerNorm → tanh → Linear over ``(N, T)`` tokens: every kind of block KFAC distinguishes."""

    def __init__(self, vocab: int = 6, d: int = 4, d_out: int = 3):
        super().__init__()
        self.emb, self.ln, self.lin = nn.Embedding(vocab, d), nn.LayerNorm(d), nn.Linear(d, d_out)

    def forward(self, idx):
        return self.lin(torch.tanh(self.ln(self.emb(idx))))


def stream(model, task, batch, size):
    """A callable giving a fresh iterator of ExampleGrads over ``batch`` in chunks of ``size`` (two passes need it)."""
    items = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    n = items[0].shape[0]

    def gen():
        with Capture(model) as cap:
            for s in range(0, n, size):
                part = tuple(t[s : s + size] for t in items)
                yield example_grads(cap, task.loss(model, part if isinstance(batch, (tuple, list)) else part[0]))

    return gen


def per_example_io(model, task, batch, module):
    """The module's input and each example's own output gradient, by one autograd call per example (naive)."""
    seen = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach(), out=o))
    losses = task.loss(model, batch)
    handle.remove()
    grads = [torch.autograd.grad(losses[i], seen["out"], retain_graph=True)[0][i] for i in range(len(losses))]
    return seen["x"], torch.stack(grads)


def naive_kronecker(us, vs):
    """``(1/N) Σ_{i,t} u uᵀ`` and ``Σ_{i,t} v vᵀ / P`` from per-example position lists, one outer product at a time."""
    n, positions = len(us), sum(len(v) for v in vs)
    uu = sum(torch.outer(u, u) for rows in us for u in rows) / n
    vv = sum(torch.outer(v, v) for rows in vs for v in rows) / positions
    return uu, vv


def _shared_problem():
    """9 sequences of 5 tokens through :class:`Tokens` in float64 (also rebuilt inside each distributed rank)."""
    torch.manual_seed(0)
    model = Tokens().double()
    idx = torch.randint(0, 6, (9, 5), generator=torch.Generator().manual_seed(1))
    return model, SquashTask(torch.randn(3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)), idx


@pytest.fixture(scope="module")
def tokens():
    return _shared_problem()


def test_kfac_factors_equal_their_definitions(tokens):
    model, task, idx = tokens
    kfac = make_curvature("kfac").fit(stream(model, task, idx, 4))
    # Linear: U = output-gradient covariance (sum over positions, mean over examples), V = input covariance
    x, b = per_example_io(model, task, idx, model.lin)
    s, a = naive_kronecker(list(b), list(x))
    torch.testing.assert_close(kfac.matrix("lin.weight"), torch.kron(s, a), **TOL)
    torch.testing.assert_close(kfac.matrix("lin.bias"), s, **TOL)  # separate bias block: v = 1
    # Embedding: U diagonal (token counts / N), V = output-gradient covariance
    _, b = per_example_io(model, task, idx, model.emb)
    counts = torch.bincount(idx.reshape(-1), minlength=6).double() / len(idx)
    _, vv = naive_kronecker([[]], list(b))
    torch.testing.assert_close(kfac.matrix("emb.weight"), torch.kron(torch.diag(counts), vv), **TOL)
    assert kfac.blocks["emb.weight"].q_u is None
    # LayerNorm: diagonal empirical Fisher fallback
    ref = torch_func_grads(model, task, idx)
    for name in ("ln.weight", "ln.bias"):
        torch.testing.assert_close(kfac.matrix(name), torch.diag((ref[name] ** 2).mean(0)), **TOL)


def test_kfac_conv2d_factors_equal_their_definitions():
    torch.manual_seed(3)
    model = SmallCNN(n_classes=3, channels=2, size=4).double()
    x, y = torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,))
    task = ClassificationTask()
    kfac = make_curvature("kfac").fit(stream(model, task, (x, y), 2))
    inp, b = per_example_io(model, task, (x, y), model.conv2)
    patches = F.unfold(inp, 3, padding=1, stride=2).transpose(1, 2)  # (N, P, C·k·k)
    s, a = naive_kronecker(list(b.flatten(2).transpose(1, 2)), list(patches))
    torch.testing.assert_close(kfac.matrix("conv2.weight"), torch.kron(s, a), **TOL)


def tiny_gpt():
    """Tied embedding / output layer (two pieces of one parameter, one indexed), position embeddings, LayerNorms."""
    torch.manual_seed(6)
    model = TinyGPT(vocab=7, d=4, n_layers=1, n_heads=2, max_len=8).double()
    return model, LanguageModelingTask(), torch.randint(0, 7, (6, 6), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("problem", ["tokens", "tiny_gpt"])
def test_ekfac_eigenvalues_equal_their_definition(tokens, problem):
    """Λ = (1/N) Σ_i (Q_uᵀ G_i Q_v)² for every block (diagonal fallbacks: Q = I), G_i from torch.func."""
    model, task, idx = tokens if problem == "tokens" else tiny_gpt()
    kfac = make_curvature("kfac").fit(stream(model, task, idx, 4))
    ekfac = make_curvature("ekfac").fit(stream(model, task, idx, 4))
    ref = torch_func_grads(model, task, idx)
    assert set(ekfac.blocks) == set(ref)
    for name in ref:
        k, e = kfac.blocks[name], ekfac.blocks[name]
        for qk, qe in ((k.q_u, e.q_u), (k.q_v, e.q_v)):  # the same first pass: the same eigenbases
            assert (qk is None) == (qe is None) and (qk is None or torch.equal(qk, qe))
        g = ref[name].reshape(len(idx), e.m, e.n)
        rotated = g if e.q_u is None else e.q_u.T @ g
        rotated = rotated if e.q_v is None else rotated @ e.q_v
        torch.testing.assert_close(e.eigenvalues, (rotated**2).mean(0), **TOL)
    if problem == "tiny_gpt":
        assert ekfac.blocks["tok.weight"].q_u is not None  # the tied head's dense u makes the vocabulary factor dense
        return
    # the eigenbases diagonalize the naive factors
    x, b = per_example_io(model, task, idx, model.lin)
    s, a = naive_kronecker(list(b), list(x))
    for q, factor in ((kfac.blocks["lin.weight"].q_u, s), (kfac.blocks["lin.weight"].q_v, a)):
        rotated = q.T @ factor @ q
        torch.testing.assert_close(rotated, torch.diag(torch.diagonal(rotated)), **TOL)


def test_diagonal_is_the_mean_squared_gradient(tokens):
    model, task, idx = tokens
    diag = make_curvature("diagonal").fit(stream(model, task, idx, 3))
    ref = torch_func_grads(model, task, idx)
    for name, g in ref.items():
        torch.testing.assert_close(diag.matrix(name), torch.diag((g.reshape(len(idx), -1) ** 2).mean(0)), **TOL)


class Bilinear(Task):
    """``ℓ_i = c_iᵀ W x_i`` on batches ``(x, c)``: per-example gradient ``c_i x_iᵀ`` exactly, one position."""

    def loss(self, model, batch):
        return (model(batch[0]) * batch[1]).sum(1)


def test_ekfac_is_exact_when_the_fisher_is_diagonal_in_the_kronecker_eigenbasis():
    """u = R_u e_a, v = R_v e_b with pair frequencies p(a, b) that are not a product: the empirical Fisher is
    (R_u ⊗ R_v) diag(p) (R_u ⊗ R_v)ᵀ. KFAC (a product of marginals) misses it; EK-FAC recovers it exactly."""
    gen = torch.Generator().manual_seed(4)
    m, n = 3, 2
    r_u = torch.linalg.qr(torch.randn(m, m, generator=gen))[0]
    r_v = torch.linalg.qr(torch.randn(n, n, generator=gen))[0]
    counts = torch.tensor([[6, 1], [1, 3], [2, 4]])  # distinct marginals (rows 7, 4, 6; columns 9, 8)
    pairs = [(a, b) for a in range(m) for b in range(n) for _ in range(int(counts[a, b]))]
    c = torch.stack([r_u[:, a] for a, _ in pairs])
    x = torch.stack([r_v[:, b] for _, b in pairs])
    model, task = nn.Linear(n, m, bias=False), Bilinear()
    g = torch_func_grads(model, task, (x, c))["weight"].reshape(len(pairs), -1)
    fisher = g.T @ g / len(pairs)
    ekfac = make_curvature("ekfac").fit(stream(model, task, (x, c), 5))
    kfac = make_curvature("kfac").fit(stream(model, task, (x, c), 5))
    torch.testing.assert_close(ekfac.matrix("weight"), fisher, **TOL)
    assert (kfac.matrix("weight") - fisher).abs().max() > 1e-2  # KFAC's product of marginals is not exact here
    w = torch.randn(4, m, n, generator=gen)
    for damping, delta in ((0.3, 0.3), (Damping(absolute=0.1, relative=0.5), 0.1 + 0.5 * torch.trace(fisher) / 6)):
        want = torch.linalg.solve(fisher + delta * torch.eye(m * n), w.reshape(4, -1).T).T.reshape(4, m, n)
        torch.testing.assert_close(ekfac.apply_inverse({"weight": w}, damping)["weight"], want, **TOL)


def test_results_do_not_depend_on_batch_size(tokens):
    model, task, idx = tokens
    w = {k: torch.randn(2, *p.shape) for k, p in model.named_parameters()}
    for name in ("diagonal", "kfac", "ekfac"):
        one = make_curvature(name).fit(stream(model, task, idx, 1)).apply_inverse(w, 0.01)
        all_ = make_curvature(name).fit(stream(model, task, idx, 9)).apply_inverse(w, 0.01)
        for k in w:
            torch.testing.assert_close(one[k], all_[k], rtol=1e-9, atol=1e-11)


def test_save_and_load_give_the_same_inverse(tokens, tmp_path):
    model, task, idx = tokens
    store = Store(tmp_path / "curv")
    w = {k: torch.randn(3, *p.shape) for k, p in model.named_parameters()}
    loss = ClassificationTask().loss
    lin = nn.Linear(3, 2)
    lin_x, lin_y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    for name in ("identity", "diagonal", "kfac", "ekfac", "explicit"):
        if name == "explicit":
            fitted = make_curvature(name).bind(lin, loss, ["weight", "bias"]).fit([(lin_x, lin_y)])
            weights = {"weight": torch.randn(3, 2, 3), "bias": torch.randn(3, 2)}
        else:
            fitted, weights = make_curvature(name).fit(stream(model, task, idx, 4)), w
        fitted.save(store, name)
        loaded = Curvature.load(store, name)
        assert type(loaded) is type(fitted) and loaded.fitted
        want, got = fitted.apply_inverse(weights, 0.1), loaded.apply_inverse(weights, 0.1)
        for k in weights:
            torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=0)


def test_two_pass_fit_resumes_from_its_first_pass(tokens, tmp_path, monkeypatch):
    model, task, idx = tokens
    monkeypatch.setattr(curvature_base, "REPLAY_BYTES", 0)  # the second pass streams again (and is interrupted)
    store = Store(tmp_path / "ekfac")
    full = make_curvature("ekfac").fit(stream(model, task, idx, 3))
    partial = make_curvature("ekfac")
    with pytest.raises(KeyboardInterrupt):
        def interrupted():
            yield from stream(model, task, idx, 3)()
            if partial.passes_done == 1:
                raise KeyboardInterrupt

        partial.fit(interrupted, on_pass=lambda c: c.save(store, "ekfac"))
    resumed = Curvature.load(store, "ekfac")
    assert resumed.passes_done == 1 and not resumed.fitted
    resumed.fit(stream(model, task, idx, 3))
    for name, block in full.blocks.items():
        torch.testing.assert_close(resumed.blocks[name].eigenvalues, block.eigenvalues, **TOL)


def test_cg_equals_explicit():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    loss, names = ClassificationTask().loss, list(tracked_parameters(model))
    explicit = make_curvature("explicit", chunk=7).bind(model, loss, names).fit(data)
    cg = make_curvature("cg").bind(model, loss, names).fit(data)
    ref = torch.autograd.functional.hessian(
        lambda *ps: loss(lambda z: torch.func.functional_call(model, dict(zip(names, ps)), (z,)), (x, y)).mean(),
        tuple(dict(model.named_parameters()).values()))
    sizes = [p.numel() for p in model.parameters()]
    dim = sum(sizes)
    h = torch.cat([torch.cat([ref[i][j].reshape(sizes[i], sizes[j]) for j in range(len(names))], 1)
                   for i in range(len(names))])
    torch.testing.assert_close(explicit.matrix(), h, **TOL)
    w = {k: torch.randn(3, *p.shape) for k, p in model.named_parameters()}
    damping = 1.0 + max(0.0, -torch.linalg.eigvalsh(h)[0].item())  # positive definite
    want = torch.linalg.solve(h + damping * torch.eye(dim), torch.cat([w[k].reshape(3, -1) for k in names], 1).T).T
    got_explicit = explicit.apply_inverse(w, damping)
    got_cg = cg.apply_inverse(w, damping)
    flat = lambda d: torch.cat([d[k].reshape(3, -1) for k in names], 1)  # noqa: E731
    torch.testing.assert_close(flat(got_explicit), want, **TOL)
    torch.testing.assert_close(flat(got_cg), want, rtol=1e-7, atol=1e-9)
    assert 0 < cg.iterations <= dim


def test_registry_and_errors(tokens):
    assert {"identity", "diagonal", "kfac", "ekfac", "explicit", "cg"} <= set(curvature_names())
    with pytest.raises(ValueError, match="already registered"):
        register_curvature(type("Again", (ExplicitHessian,), {"name": "explicit"}))
    with pytest.raises(ValueError, match="unknown curvature"):
        make_curvature("hessian-free")
    model, task, idx = tokens
    one_shot = stream(model, task, idx, 3)()
    with pytest.raises(ValueError, match="one-shot"):
        make_curvature("ekfac").fit(one_shot)
    with pytest.raises(RuntimeError, match="not fitted"):
        make_curvature("kfac").apply_inverse({"lin.weight": torch.zeros(1, 3, 4)})
    with pytest.raises(ValueError, match=">= 0"):
        Damping(relative=-1.0)
    indefinite = make_curvature("explicit").bind(
        nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)), ClassificationTask().loss,
        ["0.weight", "0.bias", "2.weight", "2.bias"])
    indefinite.fit([(torch.randn(6, 2) * 3, torch.randint(0, 2, (6,)))])
    if indefinite.block.eigenvalues.min() < 0:
        with pytest.raises(ValueError, match="increase the damping"):
            indefinite.apply_inverse({"0.weight": torch.zeros(1, 3, 2)})


def _rank_fit(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a gloo group: fit EK-FAC on its own shard of the examples, save the (all-reduced) result."""
    import torch.distributed as dist

    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, task, idx = _shared_problem()
        fitted = make_curvature("ekfac").fit(stream(model, task, idx[rank::world], 2))
        if rank == 0:
            fitted.save(Store(out), "ekfac")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: ~15 s on 2 cores
def test_sharded_fit_with_all_reduce_equals_one_process(tmp_path):
    """Two gloo ranks, each streaming half of the data: the all-reduced EK-FAC equals the one-process fit."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_fit, args=(2, port, str(tmp_path / "dist")), nprocs=2, join=True)
    model, task, idx = _shared_problem()
    single = make_curvature("ekfac").fit(stream(model, task, idx, 2))
    sharded = Curvature.load(Store(tmp_path / "dist"), "ekfac")
    assert sharded.n_examples == len(idx)
    for name, block in single.blocks.items():
        torch.testing.assert_close(sharded.matrix(name), block.matrix(), rtol=1e-9, atol=1e-11)


def test_true_fisher_draws_are_fixed_per_example_and_follow_the_model():
    ids = np.arange(20000)
    u = uniforms(ids, seed=0)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    np.testing.assert_array_equal(uniforms(ids[5:9], seed=0), u[5:9])  # a function of (seed, id) alone
    assert not np.allclose(uniforms(ids[:100], seed=1), u[:100])
    logits = torch.tensor([[0.0, 1.0, -1.0]]).expand(len(ids), 3)
    freq = torch.bincount(sample_classes(logits, torch.as_tensor(u)), minlength=3).double() / len(ids)
    torch.testing.assert_close(freq, logits[0].softmax(0), atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="sampled_loss"):
        check_fisher("true", SquashTask(torch.ones(3)))


def test_apply_function_is_f_of_the_dense_matrix(tokens):
    """``apply_function(w, f)`` equals ``f(H) w`` with ``f(H)`` built from the dense block by an eigendecomposition;
    with ``f = 1/(λ+δ)`` it is ``apply_inverse``. SOURCE builds on this with ``exp(−ηKλ)``."""
    model, task, idx = tokens
    w = {k: torch.randn(2, *p.shape) for k, p in model.named_parameters()}
    for name in ("identity", "diagonal", "kfac", "ekfac"):
        curv = make_curvature(name).fit(stream(model, task, idx, 4))
        got = curv.apply_function(w, lambda lam: torch.exp(-3.0 * lam))
        inv = curv.apply_function(w, lambda lam: 1.0 / (lam + 0.5))
        want_inv = curv.apply_inverse(w, 0.5)
        both = curv.apply_functions(w, [lambda lam: torch.exp(-3.0 * lam), lambda lam: 1.0 / (lam + 0.5)])
        for k, wk in w.items():
            torch.testing.assert_close(inv[k], want_inv[k], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(both[0][k], got[k], rtol=1e-12, atol=1e-14)  # one rotation for both
            torch.testing.assert_close(both[1][k], inv[k], rtol=1e-12, atol=1e-14)
            if name == "identity":
                torch.testing.assert_close(got[k], wk * torch.exp(torch.tensor(-3.0)), rtol=1e-12, atol=0)
                continue
            dense = curv.matrix(k)
            expected = (torch.linalg.matrix_exp(-3.0 * dense) @ wk.reshape(2, -1).T).T.reshape(wk.shape)
            torch.testing.assert_close(got[k], expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["ekfac"])
def test_later_passes_replay_the_first_passs_gradients(tokens, name, monkeypatch):
    """Under REPLAY_BYTES the second pass replays the first pass's gradients (one stream) and fits the same numbers
    as streaming twice; over it, the stream is run again."""
    model, task, idx = tokens
    calls = {"n": 0}
    fresh = stream(model, task, idx, 3)

    def counted():
        calls["n"] += 1
        return fresh()

    replayed = make_curvature(name).fit(counted)
    assert calls["n"] == 1
    monkeypatch.setattr(curvature_base, "REPLAY_BYTES", 100)  # smaller than the first batch's gradients
    streamed = make_curvature(name).fit(counted)
    assert calls["n"] == 3
    for key, block in streamed.blocks.items():
        assert torch.equal(replayed.blocks[key].eigenvalues, block.eigenvalues)
        for a, b in ((replayed.blocks[key].q_u, block.q_u), (replayed.blocks[key].q_v, block.q_v)):
            assert (a is None and b is None) or torch.equal(a, b)
