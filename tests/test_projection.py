"""Random projections: seeded, reproducible, batch-independent, unbiased within a stated statistical bound."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from datacredit.capture import Capture, example_grads
from datacredit.capture.projection import Projector
from datacredit.models import TinyGPT
from datacredit.task import LanguageModelingTask

from .helpers import TOL


@pytest.fixture(scope="module")
def gpt_grads():
    torch.manual_seed(0)
    model = TinyGPT(vocab=11, d=16, n_layers=1, n_heads=2, max_len=16).double()
    with Capture(model) as cap:
        grads = example_grads(cap, LanguageModelingTask().loss(model, torch.randint(0, 11, (6, 9))))
    return model, grads


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "kronecker"])
def test_same_seed_same_result_other_seed_differs(gpt_grads, kind):
    model, g = gpt_grads
    shapes = {k: p.shape for k, p in model.named_parameters()}
    a = Projector(shapes, 64, kind, seed=3).project(g)
    b = Projector(shapes, 64, kind, seed=3).project(g)
    c = Projector(shapes, 64, kind, seed=4).project(g)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "kronecker"])
def test_projection_does_not_depend_on_the_batch(gpt_grads, kind):
    model, g = gpt_grads
    p = Projector({k: v.shape for k, v in model.named_parameters()}, 32, kind, seed=1, cache_bytes=0)
    whole = p.project(g)
    parts = torch.cat([p.project(g.select(slice(0, 2))), p.project(g.select(slice(2, 6)))])
    torch.testing.assert_close(parts, whole, **TOL)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_kept_matrix_equals_the_redrawn_one_and_is_budgeted_in_its_dtype(gpt_grads, kind):
    """The dense matrix is kept converted to the gradients' dtype only while ``k·D·itemsize`` fits the budget, and
    kept or redrawn for every batch, the projection is the same, bit for bit, in float64 and float32."""
    model, g = gpt_grads
    shapes = {k: v.shape for k, v in model.named_parameters()}
    numel = sum(v.numel() for v in shapes.values())
    model32 = TinyGPT(vocab=11, d=16, n_layers=1, n_heads=2, max_len=16)
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with Capture(model32) as cap:
        g32 = example_grads(cap, LanguageModelingTask().loss(model32, torch.randint(0, 11, (6, 9))))
    for grads in (g, g32):
        size = grads.flat_dtype.itemsize
        kept = Projector(shapes, 16, kind, seed=2, cache_bytes=numel * 16 * size)
        redrawn = Projector(shapes, 16, kind, seed=2, cache_bytes=numel * 16 * size - 1)
        assert torch.equal(kept.project(grads), redrawn.project(grads))
        assert torch.equal(kept.project(grads), redrawn.project(grads))  # second batch: from the kept chunks
        assert kept._cache and not redrawn._cache
        assert all(m.dtype == grads.flat_dtype for m in kept._cache.values())


def test_kronecker_with_room_for_everything_is_exact(gpt_grads):
    model, g = gpt_grads
    p = Projector({k: v.shape for k, v in model.named_parameters()}, 10**6, "kronecker")
    z = p.project(g)
    torch.testing.assert_close(z @ z.T, g.gram(g), **TOL)


def _z_scores(exact: torch.Tensor, approx: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    off = ~torch.eye(len(exact), dtype=torch.bool)
    return ((approx - exact) / var.sqrt())[off]


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_dense_projection_preserves_inner_products_within_bound(kind):
    """Dense JL with N(0, 1/k) entries: Var⟨Pg, Ph⟩ = (‖g‖²‖h‖² + ⟨g,h⟩²)/k (Rademacher's is no larger).

    Over all pairs: every error within 5σ and the RMS of the z-scores ≤ 1.5 (it is ≈ 1 when the bound is tight).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 20)).double()
    with Capture(model) as cap:
        g = example_grads(cap, model(torch.randn(24, 40, dtype=torch.float64)).pow(2).sum(1))
    k = 1024
    z = Projector({n: q.shape for n, q in model.named_parameters()}, k, kind, seed=7).project(g)
    exact, sq = g.gram(g), g.sq_norms()
    var = (sq[:, None] * sq[None, :] + exact**2) / k
    zs = _z_scores(exact, z @ z.T, var)
    assert zs.abs().max() <= 5 and zs.pow(2).mean().sqrt() <= 1.5, zs.abs().max()


def test_kronecker_projection_variance_matches_its_formula():
    """Per layer, Kronecker projects u and v separately: for rank-one gradients b aᵀ, ⟨φ(g_i), φ(g_j)⟩ = X·Y with
    X = ⟨P_u b_i, P_u b_j⟩, Y = ⟨P_v a_i, P_v a_j⟩ independent, so Var = E[X²]E[Y²] − (E X · E Y)² with
    E[X²] = (b_i·b_j)² + (‖b_i‖²‖b_j‖² + (b_i·b_j)²)/k_u. Its noise per dimension is larger than a dense projection's
    (the price of never forming d_out × d_in); this test pins the formula, 5σ per pair, RMS z ≤ 1.5.
    """
    torch.manual_seed(0)
    layer = nn.Linear(60, 50, bias=False).double()
    x = torch.randn(24, 60, dtype=torch.float64)
    with Capture(layer) as cap:
        g = example_grads(cap, torch.tanh(layer(x)).sum(1))
    p = Projector({"weight": layer.weight.shape}, 256, "kronecker", seed=5)
    k_u, k_v = p.out_dims["weight"]
    assert (k_u, k_v) == (16, 16)
    piece = g.pieces["weight"][0]
    b, a = piece.u[:, 0], piece.v[:, 0]

    def second_moment(w, k):
        dots, sq = w @ w.T, (w * w).sum(1)
        return dots, dots**2 + (sq[:, None] * sq[None, :] + dots**2) / k

    bb, ex2 = second_moment(b, k_u)
    aa, ey2 = second_moment(a, k_v)
    var = ex2 * ey2 - (bb * aa) ** 2
    z = p.project(g)
    zs = _z_scores(g.gram(g), z @ z.T, var)
    assert zs.abs().max() <= 5 and zs.pow(2).mean().sqrt() <= 1.5, zs.abs().max()


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        Projector({"w": torch.Size([2, 2])}, 4, "sparse")
    with pytest.raises(ValueError, match="positive"):
        Projector({"w": torch.Size([2, 2])}, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on CI; runs where a GPU is lent)")
@pytest.mark.parametrize("kind", ["gaussian", "kronecker"])
def test_projection_follows_the_gradients_device(kind):
    """Projection matrices are drawn on the CPU (same numbers on every device) and moved to the gradients' device."""
    torch.manual_seed(0)
    model = TinyGPT(vocab=11, d=16, n_layers=1, n_heads=2, max_len=16).double()
    tokens = torch.randint(0, 11, (6, 9))
    out = {}
    for device in ("cpu", "cuda"):
        m = model.to(device)
        with Capture(m) as cap:
            grads = example_grads(cap, LanguageModelingTask().loss(m, tokens.to(device)))
        shapes = {k: p.shape for k, p in m.named_parameters()}
        out[device] = Projector(shapes, 32, kind, seed=2).project(grads)
        assert out[device].device.type == device
    torch.testing.assert_close(out["cuda"].cpu(), out["cpu"], rtol=1e-9, atol=1e-10)
