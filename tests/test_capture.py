"""Every capture rule against torch.func per-example gradients (float64, random shapes by hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from datacredit.capture import Capture, example_grads, registered, rule_for
from datacredit.capture.pieces import Outer, ghost_gram, piece_sq_norms, val_first_dot
from datacredit.errors import NonFiniteError, UnsupportedModuleError
from datacredit.models import SmallCNN, TinyGPT
from datacredit.task import LanguageModelingTask

from .helpers import TOL, SquashTask, flat, torch_func_grads

SETTINGS = settings(max_examples=12, deadline=None)


pytestmark = pytest.mark.usefixtures("float64")


def build(kind: str, d_in: int, d_out: int, bias: bool) -> tuple[nn.Module, callable]:
    """A one-layer model and a sampler of inputs ``(N, T)`` for it."""
    if kind == "linear":
        linear = nn.Linear(d_in, d_out, bias=bias)
        return linear, lambda n, t: torch.randn(n, t, d_in) if t > 1 else torch.randn(n, d_in)
    if kind == "conv2d":
        conv = nn.Conv2d(d_in, d_out, kernel_size=2, stride=1, padding=1, bias=bias)
        return conv, lambda n, t: torch.randn(n, d_in, t + 1, 3)
    if kind == "embedding":
        emb = nn.Embedding(d_in + 2, d_out, padding_idx=0 if bias else None)
        return emb, lambda n, t: torch.randint(0, d_in + 2, (n, t))
    if kind == "layernorm":
        return nn.LayerNorm(d_out, bias=bias), lambda n, t: torch.randn(n, t, d_out) * 3 + 1
    raise ValueError(kind)


def capture(model, task, batch, measurement=False):
    with Capture(model) as cap:
        fn = task.measurement if measurement else task.loss
        return example_grads(cap, fn(model, batch))


def check_against_reference(model, task, batch_a, batch_b):
    """materialize, gram (a × b), val-first dots with 3 weights, squared norms: all equal the torch.func twin."""
    a, b = capture(model, task, batch_a), capture(model, task, batch_b)
    ref_a, ref_b = torch_func_grads(model, task, batch_a), torch_func_grads(model, task, batch_b)
    names = a.names
    assert set(names) == set(ref_a)
    for name, g in a.materialize().items():
        torch.testing.assert_close(g, ref_a[name], **TOL)
    fa, fb = flat(ref_a, names), flat(ref_b, names)
    torch.testing.assert_close(a.gram(b), fa @ fb.T, **TOL)
    torch.testing.assert_close(a.gram(a), fa @ fa.T, **TOL)
    torch.testing.assert_close(a.sq_norms(), (fa * fa).sum(1), **TOL)
    weights = {k: torch.randn(3, *a.shapes[k]) for k in names}
    torch.testing.assert_close(a.dot(weights), fa @ flat(weights, names).T, **TOL)
    torch.testing.assert_close(a.flat(), fa, **TOL)


@SETTINGS
@given(
    kind=st.sampled_from(["linear", "conv2d", "embedding", "layernorm"]),
    n=st.integers(1, 4), t=st.integers(1, 5), d_in=st.integers(1, 5), d_out=st.integers(1, 5), bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rules_match_torch_func(kind, n, t, d_in, d_out, bias, seed):
    torch.manual_seed(seed)
    model, sample = build(kind, d_in, d_out, bias)
    # weights broadcast over positions, so the query batch may have another length T'
    task = SquashTask(torch.randn(d_out, 1, 1) if kind == "conv2d" else torch.randn(d_out))
    check_against_reference(model, task, sample(n, t), sample(n + 1, t + 1 if kind != "linear" or t > 1 else 1))


@SETTINGS
@given(
    n=st.integers(1, 3), t=st.integers(1, 4), t2=st.integers(1, 4), m=st.integers(1, 6), w=st.integers(1, 6),
    indexed=st.booleans(), indexed2=st.booleans(), seed=st.integers(0, 2**16),
)
def test_ghost_and_val_first_routes_equal_materialized(n, t, t2, m, w, indexed, indexed2, seed):
    """Both exact routes, forced, on random pieces (dense and one-hot-index forms) against materialization."""
    torch.manual_seed(seed)

    def piece(k, tt, ix):
        u = torch.randint(0, m, (k, tt)) if ix else torch.randn(k, tt, m)
        return Outer(u, torch.randn(k, tt, w), m, w)

    a, b = piece(n, t, indexed), piece(n + 1, t2, indexed2)
    ga, gb = a.materialize(), b.materialize()
    torch.testing.assert_close(ghost_gram(a, b), ga @ gb.T, **TOL)
    torch.testing.assert_close(val_first_dot(a, gb.reshape(-1, m, w)), ga @ gb.T, **TOL)
    torch.testing.assert_close(piece_sq_norms(a), (ga * ga).sum(1), **TOL)
    dense = a.dense_u()  # (k, T, m): the index form as one-hot rows, a dense u as itself
    assert dense.shape == (n, t, m)
    if indexed:
        torch.testing.assert_close(dense.argmax(-1), a.u)
        torch.testing.assert_close(dense.sum(-1), torch.ones(n, t, dtype=dense.dtype))
    # Both forms must give the piece's gradients: Σ_t u_t v_tᵀ with the dense u equals materialize()
    torch.testing.assert_close(torch.einsum("ktm,ktw->kmw", dense, a.v).reshape(n, -1), ga, **TOL)


def test_ghost_chunking_gives_the_same_gram(monkeypatch):
    import datacredit.capture.pieces as pieces

    torch.manual_seed(0)
    a = Outer(torch.randn(5, 4, 3), torch.randn(5, 4, 2), 3, 2)
    b = Outer(torch.randn(7, 3, 3), torch.randn(7, 3, 2), 3, 2)
    whole = ghost_gram(a, b)
    monkeypatch.setattr(pieces, "CHUNK_ELEMENTS", 1)
    torch.testing.assert_close(ghost_gram(a, b), whole, **TOL)
    torch.testing.assert_close(val_first_dot(a, torch.randn(4, 3, 2)).shape, torch.Size([5, 4]))


def test_tied_gpt_matches_torch_func():
    """Tied embedding / output layer: both uses are summed, cross terms included."""
    torch.manual_seed(0)
    model = TinyGPT(vocab=13, d=8, n_layers=1, n_heads=2, max_len=16, tied=True)
    assert model.head.weight is model.tok.weight
    task = LanguageModelingTask()
    check_against_reference(model, task, torch.randint(0, 13, (3, 7)), torch.randint(0, 13, (2, 7)))


def test_conv_net_matches_torch_func():
    from datacredit.task import ClassificationTask

    torch.manual_seed(1)
    model = SmallCNN(n_classes=4, channels=3, size=6)
    batch = (torch.randn(3, 1, 6, 6), torch.randint(0, 4, (3,)))
    query = (torch.randn(2, 1, 6, 6), torch.randint(0, 4, (2,)))
    check_against_reference(model, ClassificationTask(), batch, query)


def test_transformers_gpt2_conv1d_matches_torch_func():
    transformers = pytest.importorskip("transformers")

    config = transformers.GPT2Config(vocab_size=17, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(2)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    assert rule_for(model.transformer.h[0].attn.c_attn).name == "conv1d"
    task = LanguageModelingTask(position_ids=True)  # GPT-2's default (1, T) position ids are shared by the batch
    check_against_reference(model, task, torch.randint(0, 17, (3, 6)), torch.randint(0, 17, (2, 6)))


def test_shared_position_ids_raise_a_clear_error():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(5, 3), nn.Embedding(5, 3)

        def forward(self, x):
            return self.tok(x) + self.pos(torch.arange(x.shape[1])[None])

    model = Shared()
    with pytest.raises(ValueError, match=r"\['pos'\].*per-example"):
        capture(model, SquashTask(torch.ones(4, 3)), torch.randint(0, 5, (2, 4)))


def test_unsupported_module_names_path_and_type():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModuleError, match=r"'1'.*BatchNorm1d"):
        Capture(model)
    Capture(model, ["0", "2"])  # leaving it out is allowed
    with pytest.raises(UnsupportedModuleError, match="groups=2"):
        Capture(nn.Conv2d(4, 4, 3, groups=2))


def test_non_finite_loss_names_example_ids():
    model = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    x[2, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"\[12\]"):
        with Capture(model) as cap:
            example_grads(cap, model(x).squeeze(1), ids=[10, 11, 12, 13])


def test_capture_leaves_model_and_grads_untouched():
    model = TinyGPT(vocab=7, d=4, n_layers=1, n_heads=1, max_len=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cap = Capture(model)
    with cap:
        example_grads(cap, LanguageModelingTask().loss(model, torch.randint(0, 7, (2, 5))))
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_registry_lookup_walks_subclasses_and_rejects_duplicates():
    from datacredit.capture import LayerRule, register

    class MyLinear(nn.Linear):
        pass

    assert rule_for(MyLinear(2, 2)).name == "linear"
    assert rule_for(nn.ReLU()) is None
    assert registered()[nn.Linear] == "linear"
    with pytest.raises(ValueError, match="already registered"):
        register(nn.Linear)(type("Dup", (LayerRule,), {}))


def test_non_finite_gradient_with_finite_loss_names_example_ids():
    """An infinite output gradient (d/dx √x at 0) with a finite loss is caught too, not only NaN losses."""
    model = nn.Linear(3, 2)
    with pytest.raises(NonFiniteError, match=r"gradients for example ids \[21\]"):
        with Capture(model) as cap:
            out = model(torch.randn(3, 3))
            # √|o − o| is 0 in value but has an infinite derivative; only example 1 gets it
            spike = (out[1] - out[1].detach()).abs().sqrt().sum()
            losses = out.sum(1) + torch.stack([out.new_zeros(()), spike, out.new_zeros(())])
            example_grads(cap, losses, ids=[20, 21, 22])


def test_finite_check_survives_an_overflowing_sum_and_names_the_bad_example():
    """The check first sums the output gradient (one reduction); a sum that overflows in low precision while every
    entry is finite must not raise, and a NaN must still be named by example."""
    from datacredit.capture.engine import _check_finite

    big = torch.full((4, 3), 6e4, dtype=torch.float16)
    assert not torch.isfinite(big.sum())
    _check_finite(big, [10, 11, 12, 13])
    big[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"example ids \[12\]"):
        _check_finite(big, [10, 11, 12, 13])
    with pytest.raises(NonFiniteError, match=r"example ids \[1\]"):
        _check_finite(torch.tensor([[1.0, 2.0], [float("inf"), float("-inf")]]), None)
