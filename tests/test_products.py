"""The scoring products every method shares (methods/base.py) against their slow twins: ``ExampleGrads.dot`` and
torch.func per-example gradients, on both routes (val-first and materialize + GEMM)."""

from __future__ import annotations

import pytest
import torch

from datacredit.capture import Capture, example_grads
from datacredit.methods import base
from datacredit.models import TinyGPT
from datacredit.task import LanguageModelingTask

from .helpers import flat, torch_func_grads


@pytest.fixture(scope="module")
def gpt():
    """A tied TinyGPT (Embedding used twice, LayerNorm Dense pieces, Linear with T = 7 positions) in float64."""
    torch.manual_seed(0)
    model = TinyGPT(11, d=8, n_layers=1, n_heads=2, max_len=8, tied=True).double()
    tokens = torch.randint(0, 11, (6, 8), generator=torch.Generator().manual_seed(1))
    return model, LanguageModelingTask(), tokens


@pytest.mark.parametrize("advantage", [0, 10**9])  # 0: always materialize + GEMM; huge: always val-first
def test_products_equal_dot_and_torch_func(gpt, advantage, monkeypatch, float64):
    model, task, tokens = gpt
    monkeypatch.setattr(base, "VAL_FIRST_ADVANTAGE", advantage)
    with Capture(model, None) as cap:
        g = example_grads(cap, task.loss(model, tokens), torch.arange(6))
    names = list(g.pieces)
    shapes = {name: g.shapes[name] for name in names}
    weights = {name: torch.randn(5, *shape, dtype=torch.float64) for name, shape in shapes.items()}
    fast = base.products(g, weights)
    torch.testing.assert_close(fast, g.dot(weights), rtol=1e-10, atol=1e-12)
    ref = flat(torch_func_grads(model, task, tokens), names) @ flat(weights, names).T
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-10)
    one = {name: w[0] for name, w in weights.items()}  # a single query given in the parameter's own shape
    torch.testing.assert_close(base.products(g, one), ref[:, :1], rtol=1e-9, atol=1e-10)


def test_route_choice_follows_the_cost_model():
    """One position per example and many queries: materialize + GEMM; an Embedding piece (val-first is a row gather,
    far cheaper than materializing vocabulary-sized rows): val-first."""
    from datacredit.capture.pieces import Outer

    dense = Outer(torch.zeros(4, 1, 3), torch.zeros(4, 1, 5), 3, 5)
    assert base.VAL_FIRST_ADVANTAGE * base.val_first_cost(dense, 100) >= base.gemm_cost(dense, 100)
    indexed = Outer(torch.zeros(4, 16, dtype=torch.long), torch.zeros(4, 16, 5), 1000, 5)
    assert base.VAL_FIRST_ADVANTAGE * base.val_first_cost(indexed, 3) < base.gemm_cost(indexed, 3)
