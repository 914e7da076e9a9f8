"""QueryGram (exact Grad-Dot's prepared query side) against its slow twins: ``ExampleGrads.gram`` pair by pair and
torch.func per-example gradients, on every route (all prepared, all pairwise, a budget that splits them)."""

from __future__ import annotations

import pytest
import torch

from datacredit.capture import Capture, example_grads
from datacredit.capture.pieces import Outer
from datacredit.methods import querygram
from datacredit.methods.querygram import QueryGram
from datacredit.models import TinyGPT
from datacredit.task import LanguageModelingTask

from .helpers import flat, torch_func_grads


@pytest.fixture(scope="module")
def gpt():
    """A tied TinyGPT (Embedding used twice, LayerNorm Dense pieces, Linear with T = 7 positions) in float64; 6
    training and 7 query sequences."""
    torch.manual_seed(0)
    model = TinyGPT(11, d=8, n_layers=1, n_heads=2, max_len=8, tied=True).double()
    gen = torch.Generator().manual_seed(1)
    return model, LanguageModelingTask(), torch.randint(0, 11, (6, 8), generator=gen), torch.randint(0, 11, (7, 8),
                                                                                                      generator=gen)


def _grads(model, task, tokens):
    with Capture(model, None) as cap:
        return example_grads(cap, task.loss(model, tokens), torch.arange(len(tokens)))


@pytest.mark.parametrize("route", ["prepared", "pairwise", "split"])
def test_query_gram_equals_gram_and_torch_func(gpt, route, monkeypatch):
    model, task, train, queries = gpt
    if route != "pairwise":  # materialized wherever the budget allows, whatever the cost model says
        monkeypatch.setattr(querygram, "_pair_cost", lambda a, b: 10**18)
    g = _grads(model, task, train)
    # queries in two batches (columns 0..3 and 4..6): the pairwise route writes each batch's columns
    q1, q2 = _grads(model, task, queries[:4]), _grads(model, task, queries[4:])
    itemsize = 8
    numel = {name: s.numel() for name, s in g.shapes.items()}
    budget = {"prepared": 2**40, "pairwise": 0, "split": 7 * itemsize * sum(numel.values()) // 2}[route]
    qg = QueryGram([(slice(0, 4), q1), (slice(4, 7), q2)], 7, budget=budget)
    fast = qg.gram(g)
    routes = set(qg.routes.values())
    assert routes == ({"prepared", "pairwise"} if route == "split" else {route})
    slow = torch.cat([g.gram(q1), g.gram(q2)], dim=1)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    names = list(g.pieces)
    ref = flat(torch_func_grads(model, task, train), names) @ flat(torch_func_grads(model, task, queries), names).T
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(qg.gram(g), fast, rtol=0, atol=0)  # second batch: the routes fixed, same numbers
    assert qg.used <= budget


def test_route_choice_follows_the_cost_model(monkeypatch):
    """A wide layer over many positions (the GPT-2 of PEERS_LM.md): materializing the queries once beats re-doing it
    per training batch; a wide layer over two positions (ghost dots ``T·T'·(m+n)`` far below ``m·n``): pairwise."""
    def grads(n, t, m, k):
        from datacredit.capture.grads import ExampleGrads

        return ExampleGrads({"w": [Outer(torch.randn(n, t, m), torch.randn(n, t, k), m, k)]},
                            {"w": torch.Size([m, k])}, n)

    wide = QueryGram([(slice(0, 32), grads(32, 128, 256, 768)), (slice(32, 64), grads(32, 128, 256, 768))], 64)
    assert wide.routes["w"] == "prepared" and "w" not in wide.factored and wide.prepared["w"].shape == (64, 256 * 768)
    narrow = QueryGram([(slice(0, 4), grads(4, 2, 256, 256))], 4)
    assert narrow.routes["w"] == "pairwise" and not narrow.prepared and len(narrow.factored["w"]) == 1
    tight = QueryGram([(slice(0, 32), grads(32, 128, 256, 768))], 32, budget=32 * 256 * 768 * 4 - 1)
    assert tight.routes["w"] == "pairwise" and tight.used == 0  # one byte short of the budget
    # no budget given: datacredit.memory's default for the queries' device, looked up once
    asked = []
    monkeypatch.setattr(querygram, "memory_budget", lambda device: asked.append(torch.device(device)) or 0)
    default = QueryGram([(slice(0, 32), grads(32, 128, 256, 768))], 32)
    assert default.routes["w"] == "pairwise" and default.budget == 0 and asked == [torch.device("cpu")]
