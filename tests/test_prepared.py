"""Prepared query weights (methods/prepared.py) against their slow twins: ``ExampleGrads.dot`` with the unrotated
weights, torch.func per-example gradients, and ``Curvature.apply_inverse`` on materialized query gradients; every route
forced in turn (zero-skipping by rows and by columns, materialize + GEMM, val-first, a deferred right rotation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datacredit import ClassificationTask
from datacredit.capture import Capture, example_grads
from datacredit.capture.pieces import Outer
from datacredit.curvature import Damping
from datacredit.data import ArrayDataset
from datacredit.methods import base, prepared
from datacredit.methods.influence import Influence
from datacredit.methods.prepared import Prepared, PreparedQueries
from datacredit.models import TinyGPT, mlp
from datacredit.task import LanguageModelingTask

from .helpers import flat, slow_influence, torch_func_grads, trained_relu_mlp

ROUTES = ["rows", "cols", "gemm", "val-first"]


def force(monkeypatch, way: str) -> None:
    """Make every non-indexed Outer piece take ``way`` (and the base route of indexed ones match it)."""
    monkeypatch.setattr(prepared, "route", lambda piece, q: way if way in ("rows", "cols") and not piece.indexed
                        else "base")
    monkeypatch.setattr(base, "VAL_FIRST_ADVANTAGE", 0 if way == "val-first" else 10**9)


def relu_mlp_grads():
    """A ReLU MLP's per-example gradients with many exact zeros in u (dead units) and in v (post-ReLU inputs)."""
    torch.manual_seed(0)
    model = mlp(6, [8, 7], 3).double()
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    x[:, :2] = 0  # blank inputs: zero columns of v in the first layer
    with Capture(model, None) as cap:
        g = example_grads(cap, F.cross_entropy(model(x), y, reduction="none"), torch.arange(12))
    return model, ClassificationTask(), (x, y), g


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("rotate", [False, True])
def test_products_equal_dot_on_a_relu_mlp_and_a_tied_gpt(route, rotate, monkeypatch, float64):
    model, task, batch, g = relu_mlp_grads()
    torch.manual_seed(1)
    gpt = TinyGPT(11, d=8, n_layers=1, n_heads=2, max_len=8, tied=True).double()
    tokens = torch.randint(0, 11, (6, 8), generator=torch.Generator().manual_seed(1))
    with Capture(gpt, None) as cap:
        g_gpt = example_grads(cap, LanguageModelingTask().loss(gpt, tokens), torch.arange(6))
    assert sum(int((p.u == 0).sum()) for ps in g.pieces.values() for p in ps if isinstance(p, Outer)) > 50
    force(monkeypatch, route)
    for grads, ref_model, ref_task, ref_batch in ((g, model, task, batch),
                                                  (g_gpt, gpt, LanguageModelingTask(), tokens)):
        views = prepared.views([grads])
        weights = {name: torch.randn(5, *shape) for name, shape in grads.shapes.items()}
        prep = PreparedQueries.from_weights(weights, views)
        if rotate:  # W = (W r) rᵀ with r orthogonal: the same weights, the right rotation deferred to the training side
            for name, p in prep.weights.items():
                m, n, _ = p.w.shape
                r = torch.linalg.qr(torch.randn(n, n))[0]
                w = weights[name].reshape(5, m, n) @ r
                prep.weights[name] = Prepared(w.permute(1, 2, 0).contiguous(), r)
        fast = prep.products(grads)
        torch.testing.assert_close(fast, grads.dot(weights), rtol=1e-10, atol=1e-12)
        names = list(grads.pieces)
        ref = flat(torch_func_grads(ref_model, ref_task, ref_batch), names) @ flat(weights, names).T
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-10)


def test_the_zero_skipping_route_is_taken_for_sparse_u_and_many_queries(monkeypatch):
    """Cost model: 75 % zeros in u, one position, 500 queries: rows; a dense u: the GEMM (no zeros to skip)."""
    calls = []
    monkeypatch.setattr(prepared, "row_sparse_scores", lambda *a: calls.append(1) or torch.zeros(256, 500))
    u = torch.randn(256, 1, 64) * (torch.rand(256, 1, 64) < 0.25)
    piece = Outer(u, torch.randn(256, 1, 784), 64, 784)
    prep = Prepared(torch.zeros(64, 784, 500))
    prepared.piece_scores(piece, prep)
    assert calls == [1]
    prepared.piece_scores(Outer(torch.randn(256, 1, 64), piece.v, 64, 784), prep)
    assert calls == [1]
    assert prepared.route(piece, 500) == "rows"
    assert prepared.route(Outer(piece.u.to("meta"), piece.v.to("meta"), 64, 784), 500) == "base"  # CPU only


@pytest.fixture(scope="module")
def relu_problem():
    """A trained ReLU MLP in float64 with dead units (zeros in u) and blank inputs (zeros in v)."""
    model, x, y = trained_relu_mlp(48, blank_inputs=2)
    return model, ArrayDataset(x[:36], y[:36], ids=np.arange(36)), ArrayDataset(x[36:], y[36:])


@pytest.mark.parametrize("curvature", ["diagonal", "kfac", "ekfac", "explicit"])
@pytest.mark.parametrize("route", ["rows", "cols", "gemm"])
@pytest.mark.parametrize("defer", [False, True])
def test_influence_scores_equal_apply_inverse_on_torch_func_gradients(relu_problem, curvature, route, defer,
                                                                        monkeypatch):
    """The whole scoring route (queries rotated from their factors, the right rotation deferred or not, training
    batches by zero-skipping or GEMM) against ∇ℓ_iᵀ · apply_inverse(∇f_q) on torch.func gradients."""
    model, train, test = relu_problem
    task = ClassificationTask()
    force(monkeypatch, route)
    monkeypatch.setattr(prepared, "deferred", lambda train_positions, query_rows: defer)
    inf = Influence(model, task, curvature=curvature, damping=Damping(absolute=0.5, relative=0.1), batch_size=7,
                    query_batch=5, progress=False).fit(train)  # absolute damping: the explicit Hessian is indefinite
    pre = inf.prepare([g for _, _, g in inf._grads(test, measurement=True)])
    assert any(p.r is not None for p in pre.weights.values()) == (defer and curvature in ("kfac", "ekfac"))
    slow = slow_influence(inf, model, task, train, test, inf.config.damping)
    np.testing.assert_allclose(inf.score(test).values, slow, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_rotate_pieces_equals_rotating_the_materialized_gradient(relu_problem, curvature, float64):
    model, train, test = relu_problem
    inf = Influence(model, ClassificationTask(), curvature=curvature, progress=False).fit(train)
    g = next(iter(inf._grads(test, measurement=True)))[2]
    for name, pieces in g.pieces.items():
        block = inf.curvature.blocks[name]
        mat = sum(p.materialize() for p in pieces).reshape(g.n, block.m, block.n)
        torch.testing.assert_close(block.rotate_pieces(pieces, g.n, torch.float64), block.rotate(mat))


@pytest.mark.parametrize("rotate", [False, True])
def test_piece_sums_over_checkpoints_equal_the_sum_of_materialized_products(rotate, float64):
    """PieceSum on every path (factored by a shared v, by a shared index u, materialized on a mismatch, Dense pieces),
    against Σ_k ⟨materialized G_k, W_q⟩ with W = w rᵀ."""
    from datacredit.capture.pieces import Dense
    from datacredit.methods.piece_sums import PieceSum

    torch.manual_seed(0)
    m, n, q, t = 4, 5, 3, 2
    w = torch.randn(m, n, q)
    r = torch.linalg.qr(torch.randn(n, n))[0] if rotate else None
    full = w if r is None else torch.einsum("mcq,nc->mnq", w, r)  # W_q = w_q rᵀ
    v = torch.randn(6, t, n)
    idx = torch.randint(0, m, (6, t))
    cases = {
        "shared v": [Outer(torch.randn(6, t, m) * (torch.rand(6, t, m) < 0.5), v, m, n) for _ in range(3)],
        "shared index": [Outer(idx, torch.randn(6, t, n), m, n) for _ in range(3)],
        "mismatch": [Outer(torch.randn(6, t, m), v, m, n), Outer(torch.randn(6, t, m), v, m, n),
                     Outer(torch.randn(6, t, m), torch.randn(6, t, n), m, n), Outer(idx, v, m, n)],
        "dense": [Dense(torch.randn(6, m * n)) for _ in range(3)],
    }
    for case, pieces in cases.items():
        s = PieceSum(r)
        for p in pieces:
            s.add(p)
        assert (s.outer is not None) == (case in ("shared v", "shared index")), case
        expected = sum(p.materialize() for p in pieces) @ full.reshape(m * n, q)
        torch.testing.assert_close(s.scores(Prepared(w, r)), expected, msg=case)


@pytest.mark.parametrize("n_examples", [1, 2, 7, 8])
def test_piece_products_gemm_route_in_chunks_equals_the_explicit_gradients(n_examples, monkeypatch):
    """The GEMM route materializes chunks of examples into one reused buffer and writes each chunk's rows of the
    result in place: the same numbers as every example's gradient ``Σ_t u_t v_tᵀ`` formed explicitly, for chunk sizes
    that divide the examples, do not, and exceed them."""
    torch.manual_seed(0)
    u, v = torch.randn(n_examples, 3, 4, dtype=torch.float64), torch.randn(n_examples, 3, 5, dtype=torch.float64)
    weights = torch.randn(6, 20, dtype=torch.float64)
    explicit = torch.einsum("ntm,ntk->nmk", u, v).reshape(n_examples, 20) @ weights.T
    monkeypatch.setattr(base, "val_first_cost", lambda piece, n_query: 10**18)  # force the GEMM route
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 40)  # two examples of 20 entries per chunk
    got = base.piece_products(Outer(u, v, 4, 5), weights)
    assert got.shape == (n_examples, 6)
    torch.testing.assert_close(got, explicit, rtol=1e-12, atol=1e-12)
