"""QueryGram (exact Grad-Dot's prepared query side) against its slow twins: ``ExampleGrads.gram`` pair by pair and
torch.func per-example gradients, on every route (all prepared, all pairwise, split, by cost), and the plan that
sizes the query rounds to the memory budget."""

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


@pytest.mark.parametrize("route", ["prepared", "pairwise", "split", "cost"])
def test_query_gram_equals_gram_and_torch_func(gpt, route):
    model, task, train, queries = gpt
    g = _grads(model, task, train)
    # queries in two batches (columns 0..3 and 4..6): the pairwise route writes each batch's columns
    q1, q2 = _grads(model, task, queries[:4]), _grads(model, task, queries[4:])
    names = list(g.pieces)
    routes = {"prepared": dict.fromkeys(names, "prepared"), "pairwise": dict.fromkeys(names, "pairwise"),
              "split": {name: ("prepared", "pairwise")[i % 2] for i, name in enumerate(names)},
              "cost": None}[route]
    qg = QueryGram([(slice(0, 4), q1), (slice(4, 7), q2)], 7, routes=routes)
    fast = qg.gram(g)
    if routes is not None:
        assert qg.routes == routes and set(qg.prepared) == {n for n in names if routes[n] == "prepared"}
        assert qg.used == sum(7 * g.shapes[n].numel() * 8 for n in qg.prepared)
    slow = torch.cat([g.gram(q1), g.gram(q2)], dim=1)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    ref = flat(torch_func_grads(model, task, train), names) @ flat(torch_func_grads(model, task, queries), names).T
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(qg.gram(g), fast, rtol=0, atol=0)  # second batch: the routes fixed, same numbers


def _wide(n, t, m, k):
    from datacredit.capture.grads import ExampleGrads

    return ExampleGrads({"w": [Outer(torch.randn(n, t, m), torch.randn(n, t, k), m, k)]}, {"w": torch.Size([m, k])}, n)


def test_route_choice_follows_the_cost_model():
    """A wide layer over many positions (the GPT-2 of PEERS_LM.md): materializing the queries once beats re-doing it
    per training batch; a wide layer over two positions (ghost dots ``T·T'·(m+n)`` far below ``m·n``): pairwise."""
    wide = QueryGram([(slice(0, 32), _wide(32, 128, 256, 768)), (slice(32, 64), _wide(32, 128, 256, 768))], 64)
    assert wide.routes["w"] == "prepared" and "w" not in wide.factored and wide.prepared["w"].shape == (64, 256 * 768)
    narrow = QueryGram([(slice(0, 4), _wide(4, 2, 256, 256))], 4)
    assert narrow.routes["w"] == "pairwise" and not narrow.prepared and len(narrow.factored["w"]) == 1
    # a parameter the given routes do not name stays pairwise (exact, and nothing held past the plan's budget)
    unnamed = QueryGram([(slice(0, 32), _wide(32, 128, 256, 768))], 32, routes={})
    assert unnamed.routes["w"] == "pairwise" and unnamed.used == 0


def test_plan_takes_rounds_past_the_budget_where_materializing_is_cheaper(monkeypatch):
    """Past the memory budget the wide layer is prepared in rounds (each one more pass over the training set), not
    sent to the pairwise route as before; the round's materialized queries fit the budget; one byte more budget than
    all queries need gives one round; where the passes cost more than they save, pairwise in one round."""
    g = _wide(32, 128, 256, 768)
    per_query = 256 * 768 * 4
    p = querygram.plan(g, 256, 32, budget=128 * per_query)
    assert p.routes == {"w": "prepared"} and p.n_rounds == 2 and p.per_round == 4 and p.bytes_per_query == per_query
    p = querygram.plan(g, 256, 32, budget=128 * per_query - 1)  # 127 queries fit: rounds of 3 batches (96)
    assert p.routes == {"w": "prepared"} and p.n_rounds == 3 and p.per_round == 3
    assert querygram.plan(g, 256, 32, budget=256 * per_query).n_rounds == 1
    monkeypatch.setattr(querygram, "PASS_MULTIPLY_ADDS", 10**6)  # passes dearer than anything pairwise costs
    p = querygram.plan(g, 256, 32, budget=128 * per_query)
    assert p.routes == {"w": "pairwise"} and p.n_rounds == 1 and p.bytes_per_query == 0
    # ghost dots cheaper (two positions): pairwise whatever the budget
    assert querygram.plan(_wide(4, 2, 256, 256), 64, 4, budget=2**40).routes == {"w": "pairwise"}


def test_plan_prefers_the_largest_saving_per_byte_and_the_default_budget(monkeypatch):
    """Two parameters, room for one per round: the one that saves more per byte is prepared; no budget given:
    datacredit.memory's default for the queries' device, looked up once."""
    from datacredit.capture.grads import ExampleGrads

    long, short = _wide(8, 64, 64, 64), _wide(8, 16, 64, 64)  # same bytes, the long one saves ~4x more per query
    g = ExampleGrads({"long": long.pieces["w"], "short": short.pieces["w"]},
                     {"long": torch.Size([64, 64]), "short": torch.Size([64, 64])}, 8)
    monkeypatch.setattr(querygram, "PASS_MULTIPLY_ADDS", 10**6)  # one round: the budget decides
    p = querygram.plan(g, 64, 8, budget=64 * 64 * 64 * 4)
    assert p.routes == {"long": "prepared", "short": "pairwise"} and p.n_rounds == 1
    asked = []
    monkeypatch.setattr(querygram, "memory_budget", lambda device: asked.append(torch.device(device)) or 0)
    p = querygram.plan(g, 64, 8)
    assert p.routes == {"long": "pairwise", "short": "pairwise"} and asked == [torch.device("cpu")]
