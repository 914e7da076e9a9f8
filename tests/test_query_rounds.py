"""Query rounds and sub-groups of :meth:`Influence.score` (methods/influence.py, ``QueryPreparer`` in
methods/prepared.py): the queries of one round prepared sub-group by sub-group into preallocated weights give the same
scores as one sub-group per round, as many rounds, and as the slow twin ``∇ℓ_iᵀ · apply_inverse(∇f_q)`` on torch.func
gradients; the deferred right rotation is decided once per round with the round's total query count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datacredit import ClassificationTask
from datacredit.curvature import Damping
from datacredit.data import ArrayDataset
from datacredit.methods import influence, prepared
from datacredit.methods.influence import Influence
from datacredit.methods.prepared import QueryPreparer
from datacredit.models import TinyGPT
from datacredit.task import LanguageModelingTask

from .helpers import flat, slow_influence, trained_relu_mlp

DAMPING = Damping(absolute=0.5, relative=0.1)


@pytest.fixture(scope="module")
def relu_problem():
    """A trained ReLU MLP in float64: 30 training examples, 12 queries."""
    model, x, y = trained_relu_mlp(42)
    return model, ClassificationTask(), ArrayDataset(x[:30], y[:30], ids=np.arange(30)), ArrayDataset(x[30:], y[30:])


def counted(monkeypatch) -> dict[str, list]:
    """Record the sizes of the sub-groups given to QueryPreparer.add, the rounds, and the deferral questions."""
    seen: dict[str, list] = {"adds": [], "rounds": [], "deferred": []}
    add, side, deferred = QueryPreparer.add, Influence._query_side, prepared.deferred
    monkeypatch.setattr(QueryPreparer, "add", lambda self, grads: seen["adds"].append(sum(g.n for g in grads))
                        or add(self, grads))
    monkeypatch.setattr(Influence, "_query_side", lambda self, groups, n: seen["rounds"].append(n)
                        or side(self, groups, n))
    monkeypatch.setattr(prepared, "deferred", lambda t, q: seen["deferred"].append((t, q)) or deferred(t, q))
    return seen


def run(model, task, train, test, curvature, monkeypatch, *, query_batch, sub_elements, budget=2**40, batch=3):
    """Scores and top-3 with the given round size (``query_batch``, None: from ``budget`` bytes) and sub-group bound
    (``QUERY_ELEMENTS``), and what was recorded."""
    monkeypatch.setattr(influence, "QUERY_ELEMENTS", sub_elements)
    monkeypatch.setattr(influence, "prepared_budget", lambda device="cpu": budget)
    seen = counted(monkeypatch)
    inf = Influence(model, task, curvature=curvature, damping=DAMPING, batch_size=batch, query_batch=query_batch,
                    progress=False).fit(train)
    values = inf.score(test).values
    top = inf.topk(test, 3)
    monkeypatch.undo()
    return inf, values, top, seen


@pytest.mark.parametrize("curvature", ["diagonal", "kfac", "ekfac"])
@pytest.mark.parametrize("defer", [False, True])
def test_sub_groups_and_rounds_give_the_slow_twins_scores(relu_problem, curvature, defer, monkeypatch):
    model, task, train, test = relu_problem
    results = {}
    for key, kw in {"tiny sub-groups, one round": dict(query_batch=None, sub_elements=1),
                    "one sub-group, one round": dict(query_batch=None, sub_elements=2**26),
                    "many rounds": dict(query_batch=3, sub_elements=1),
                    "rounds from the budget": dict(query_batch=None, sub_elements=1,
                                                   budget=6 * sum(p.numel() * 8 for p in model.parameters()))}.items():
        monkeypatch.setattr(prepared, "deferred", lambda t, q: defer)  # wrapped by run's counting, undone after
        results[key] = run(model, task, train, test, curvature, monkeypatch, **kw)
    # the slow twin: torch.func gradients and the curvature's own apply_inverse
    inf = results["many rounds"][0]
    slow = slow_influence(inf, model, task, train, test, DAMPING)
    for key, (_, values, top, _) in results.items():
        np.testing.assert_allclose(values, slow, rtol=1e-9, atol=1e-12, err_msg=key)
        order = np.argsort(-slow, axis=0, kind="stable")[:3].T  # (n_query, 3); train ids are 0..29
        np.testing.assert_array_equal(top.train_ids, order, err_msg=key)
        np.testing.assert_allclose(top.values, np.take_along_axis(slow.T, order, 1), rtol=1e-9, err_msg=key)
    seen = {key: r[3] for key, r in results.items()}  # score, then topk: each list twice
    one = seen["tiny sub-groups, one round"]
    assert one["rounds"] == [12] * 2 and one["adds"] == [3] * 8
    assert seen["one sub-group, one round"]["adds"] == [12] * 2
    assert seen["many rounds"]["rounds"] == [3] * 8 and seen["many rounds"]["adds"] == [3] * 8
    assert seen["rounds from the budget"]["rounds"] == [6, 6] * 2  # 6 queries' prepared weights fit the budget


def test_the_deferral_is_decided_once_with_the_rounds_total(relu_problem, monkeypatch):
    """With four sub-groups of 3 queries in a round of 12 the deferral is asked about 12 queries, once per layer."""
    model, task, train, test = relu_problem
    inf, _, _, seen = run(model, task, train, test, "ekfac", monkeypatch, query_batch=None, sub_elements=1)
    assert seen["adds"] == [3] * 8  # score, then topk
    blocks = [b for b in inf.curvature.blocks.values() if b.q_v is not None]
    expected = [(30, 12 * b.m) for b in blocks]  # n_train·T (T = 1), Q·m
    assert blocks and seen["deferred"] == expected * 2


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_a_float32_gpt_sub_grouped_equals_the_precondition_route(curvature, monkeypatch):
    """Sequences (T = 7 positions) in float32: the deferral taken from the real cost rule (n_train·T = 42 < Q·m for
    the wide layers at Q = 10), sub-grouped and one-round scores against many rounds and against
    ``Influence.precondition`` on the same query gradients."""
    torch.manual_seed(0)
    model = TinyGPT(11, d=8, n_layers=1, n_heads=2, max_len=8)
    task = LanguageModelingTask()
    tokens = torch.randint(0, 11, (16, 8), generator=torch.Generator().manual_seed(1))
    train, test = ArrayDataset(tokens[:6], ids=np.arange(6)), ArrayDataset(tokens[6:])
    sub, _, _, seen = run(model, task, train, test, curvature, monkeypatch, query_batch=None, sub_elements=1, batch=2)
    _, many, _, _ = run(model, task, train, test, curvature, monkeypatch, query_batch=2, sub_elements=1, batch=2)
    assert seen["rounds"][0] == 10 and seen["adds"][:5] == [2] * 5
    pre = sub.prepare([g for _, _, g in sub._grads(test, measurement=True)])
    assert any(p.r is not None for p in pre.weights.values())  # some layer defers at Q = 10
    weights = sub.precondition([g for _, _, g in sub._grads(test, measurement=True)])
    names = list(weights)
    g_train = torch.cat([flat(g.materialize(), names) for _, _, g in sub._grads(train)])
    slow = (g_train.double() @ flat(weights, names).double().T).numpy()
    values = sub.score(test).values
    scale = np.abs(slow).max()
    np.testing.assert_allclose(values, slow, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(many, slow, rtol=0, atol=1e-5 * scale)


def test_the_default_round_is_set_by_the_memory_budget(relu_problem, monkeypatch):
    model, task, train, test = relu_problem
    inf = Influence(model, task, curvature="kfac", batch_size=4, progress=False).fit(train)
    per_query = inf.numel * 8  # float64 weights
    monkeypatch.setattr(influence, "prepared_budget", lambda device="cpu": 5 * per_query)
    assert inf._round_size() == 8  # 5 queries fit, rounded up to whole batches of 4
    monkeypatch.setattr(influence, "prepared_budget", lambda device="cpu": 0)
    assert inf._round_size() == 4
    monkeypatch.setattr(influence, "QUERY_ELEMENTS", 1)  # the sub-group bound no longer sets the round
    monkeypatch.setattr(influence, "prepared_budget", lambda device="cpu": 100 * per_query)
    assert inf._round_size() == 100
    again = Influence(model, task, curvature="kfac", batch_size=4, query_batch=3, progress=False).fit(train)
    assert again._round_size() == 4  # the user's query_batch, in whole batches
    assert influence.prepared_budget() > 0


def test_resumed_scoring_skips_the_query_gradients_of_finished_rounds(relu_problem, tmp_path, monkeypatch):
    """4 rounds of 3 queries, 10 training batches; interrupted in round 2 after 4 of its training batches: the resumed
    score computes the query gradients of rounds 2 and 3 only, scores the 6 + 10 missing chunks, and equals a fresh
    score."""
    from datacredit import Store
    from datacredit.methods.prepared import PreparedQueries

    model, task, train, test = relu_problem
    make = lambda: Influence(model, task, curvature="ekfac", damping=DAMPING, batch_size=3, query_batch=3,  # noqa: E731
                             store=Store(tmp_path / "s"), progress=False).fit(train)
    fresh = Influence(model, task, curvature="ekfac", damping=DAMPING, batch_size=3, progress=False).fit(train)
    calls = {"products": 0, "query batches": 0}
    products, grads = PreparedQueries.products, Influence._grads

    def flaky(self, g):
        calls["products"] += 1
        if calls["products"] == 25:
            raise KeyboardInterrupt
        return products(self, g)

    def counting(self, data, **kw):
        for item in grads(self, data, **kw):
            calls["query batches"] += kw.get("measurement", False)
            yield item

    monkeypatch.setattr(PreparedQueries, "products", flaky)
    monkeypatch.setattr(Influence, "_grads", counting)
    with pytest.raises(KeyboardInterrupt):
        make().score(test)
    calls.update({"products": 100, "query batches": 0})
    values = make().score(test).values
    assert calls == {"products": 100 + 6 + 10, "query batches": 2}
    np.testing.assert_allclose(values, fresh.score(test).values, rtol=1e-9, atol=1e-12)


def test_one_rounds_prepared_queries_are_alive_at_a_time(relu_problem, monkeypatch):
    """score and topk release a round's query side before the next round's is built (else peak memory is two
    rounds' prepared weights, twice the budget the rounds were sized for)."""
    import weakref

    class Side:  # the returned query side, weakly tracked
        def __init__(self, f):
            self.f = f

        def __call__(self, g):
            return self.f(g)

    alive, overlaps = weakref.WeakSet(), []
    side = Influence._query_side

    def tracked(self, groups, n):
        overlaps.append(len(alive))  # another round's query side still referenced while this one is built
        out = Side(side(self, groups, n))
        alive.add(out)
        return out

    model, task, train, test = relu_problem
    monkeypatch.setattr(Influence, "_query_side", tracked)
    inf = Influence(model, task, curvature="kfac", damping=DAMPING, batch_size=3, query_batch=3,
                    progress=False).fit(train)
    inf.score(test)
    inf.topk(test, 3)
    assert len(overlaps) == 8  # 12 queries in rounds of 3, for score and for topk
    assert overlaps == [0] * 8
