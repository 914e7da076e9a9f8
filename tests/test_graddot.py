"""Grad-Dot / Grad-Cos against torch.func, sign convention, batch invariance, resumable cached features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datacredit import ClassificationTask, DataError, GradDot, Store
from datacredit.data import ArrayDataset
from datacredit.models import mlp

from .helpers import flat, torch_func_grads


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    model = mlp(6, 8, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    train = ArrayDataset(x[:30], y[:30], ids=np.arange(100, 130))
    test = ArrayDataset(x[30:], y[30:], ids=np.arange(10))
    return model, train, test


def reference(model, task, train, test):
    names = [n for n, _ in model.named_parameters()]
    g_train = flat(torch_func_grads(model, task, train.tensors), names)
    g_test = flat(torch_func_grads(model, task, test.tensors, measurement=True), names)
    return g_train, g_test


@pytest.mark.parametrize("measurement", ["loss", "margin"])
def test_exact_grad_dot_equals_torch_func(setup, measurement):
    model, train, test = setup
    task = ClassificationTask(measurement=measurement)
    scores = GradDot(model, task, batch_size=7, progress=False).fit(train).score(test)
    g_train, g_test = reference(model, task, train, test)
    np.testing.assert_allclose(scores.values, (g_train @ g_test.T).numpy(), rtol=1e-9, atol=1e-12)
    assert scores.train_ids.tolist() == list(range(100, 130)) and scores.query_ids.tolist() == list(range(10))
    assert scores.method == "grad-dot"


def test_grad_cos_and_self_scores(setup):
    model, train, test = setup
    task = ClassificationTask()
    g_train, g_test = reference(model, task, train, test)
    cos = GradDot(model, task, normalize=True, progress=False).fit(train).score(test)
    want = (g_train @ g_test.T) / g_train.norm(dim=1)[:, None] / g_test.norm(dim=1)[None, :]
    np.testing.assert_allclose(cos.values, want.numpy(), rtol=1e-9, atol=1e-12)
    self_dot = GradDot(model, task, progress=False).fit(train).self_scores()
    np.testing.assert_allclose(self_dot.values[:, 0], (g_train**2).sum(1).numpy(), rtol=1e-9)


@pytest.mark.parametrize("kind", ["kronecker", "gaussian"])
def test_projected_grad_dot(setup, kind):
    model, train, test = setup
    task = ClassificationTask()
    exact = GradDot(model, task, progress=False).fit(train).score(test).values
    numel = sum(p.numel() for p in model.parameters())
    big = GradDot(model, task, projection=4 * numel, projection_kind=kind, progress=False).fit(train).score(test)
    if kind == "kronecker":  # every layer fits: exact
        np.testing.assert_allclose(big.values, exact, rtol=1e-5, atol=1e-6)
    else:  # a dense JL estimate: close, not equal
        assert np.corrcoef(big.values.ravel(), exact.ravel())[0, 1] > 0.95


def test_duplicated_query_is_its_own_top_proponent(setup):
    """Sign convention: a copy of the query in the training set helps it most (cosine 1) and has a positive dot."""
    model, train, test = setup
    x, y = train.tensors
    qx, qy = test.tensors
    with_copy = ArrayDataset(torch.cat([x, qx[3:4]]), torch.cat([y, qy[3:4]]), ids=np.arange(31))
    task = ClassificationTask()
    cos = GradDot(model, task, normalize=True, progress=False).fit(with_copy).score(test)
    assert cos.topk(1, query=3)[0][0] == 30
    assert cos.topk(1, query=3)[0][1] == pytest.approx(1.0)
    dot = GradDot(model, task, progress=False).fit(with_copy).score(test)
    assert dot.values[30, 3] > 0


def test_scores_do_not_depend_on_batch_size(setup):
    model, train, test = setup
    task = ClassificationTask()
    a = GradDot(model, task, batch_size=1, progress=False).fit(train).score(test).values
    b = GradDot(model, task, batch_size=64, progress=False).fit(train).score(test).values
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_cached_features_resume_after_a_crash(setup, tmp_path, monkeypatch):
    model, train, test = setup
    task = ClassificationTask()
    full = GradDot(model, task, projection=16, batch_size=4, progress=False).fit(train).train_features

    from datacredit.capture import projection

    calls = {"n": 0}
    original = projection.Projector.project

    def flaky(self, grads):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the fourth batch
        return original(self, grads)

    from datacredit.methods import base

    monkeypatch.setattr(projection.Projector, "project", flaky)
    monkeypatch.setattr(base, "CACHE_CHUNK_ROWS", 8)  # chunks of 2 batches
    store = Store(tmp_path / "gd")
    with pytest.raises(KeyboardInterrupt):
        GradDot(model, task, projection=16, batch_size=4, store=store, progress=False).fit(train)
    assert calls["n"] == 4
    calls["n"] = 10  # no more failures; count the batches the resumed fit recomputes
    resumed = GradDot(model, task, projection=16, batch_size=4, store=store, progress=False).fit(train)
    assert calls["n"] - 10 == 8 - 2  # 8 batches of 4 (30 examples); the first chunk (2 batches) was done
    np.testing.assert_allclose(resumed.train_features, full, rtol=1e-6)
    again = GradDot(model, task, projection=16, batch_size=4, store=store, progress=False).fit(train)
    assert calls["n"] - 10 == 6  # complete: nothing recomputed
    np.testing.assert_allclose(again.score(test).values, resumed.score(test).values)


def test_bad_input(setup):
    model, train, test = setup
    task = ClassificationTask()
    method = GradDot(model, task, progress=False)
    with pytest.raises(DataError, match="sequential"):
        method.fit(DataLoader(train, batch_size=4, shuffle=True))
    with pytest.raises(DataError, match="empty"):
        method.fit(train.subset([]))
    with pytest.raises(RuntimeError, match="fit"):
        GradDot(model, task, progress=False).score(test)


def test_exact_scores_go_to_the_store_and_a_killed_score_resumes(setup, tmp_path, monkeypatch):
    """A pathlib.Path store; scores chunked into a memmap there; an interrupted score redoes no finished chunk."""
    model, train, test = setup
    task = ClassificationTask()
    fresh = GradDot(model, task, batch_size=4, progress=False).fit(train).score(test).values

    from datacredit.methods import base
    from datacredit.methods.querygram import QueryGram

    monkeypatch.setattr(base, "SCORE_CHUNK_BYTES", 8 * 10 * 8)  # 8 rows (2 batches of 4) per chunk: 4 chunks
    calls = {"n": 0}
    original = QueryGram.gram

    def flaky(self, g):
        calls["n"] += 1
        if calls["n"] == 5:  # third chunk (one gram call per training batch: 2 per chunk)
            raise KeyboardInterrupt
        return original(self, g)

    monkeypatch.setattr(QueryGram, "gram", flaky)
    with pytest.raises(KeyboardInterrupt):
        GradDot(model, task, batch_size=4, store=tmp_path / "gd", progress=False).fit(train).score(test)
    calls["n"] = 100
    scores = GradDot(model, task, batch_size=4, store=tmp_path / "gd", progress=False).fit(train).score(test)
    assert calls["n"] - 100 == 4  # chunks 3 and 4 only
    assert isinstance(scores.values, np.memmap)
    np.testing.assert_allclose(scores.values, fresh, rtol=1e-12, atol=1e-14)
    calls["n"] = 100
    GradDot(model, task, batch_size=4, store=tmp_path / "gd", progress=False).fit(train).score(test)
    assert calls["n"] == 100  # complete: read back


def test_a_changed_model_data_or_config_refits_the_cache(setup, tmp_path):
    """The same store under another model, other data (same ids) or another config is refitted, never reused."""
    import copy

    model, train, test = setup
    task = ClassificationTask()
    store = tmp_path / "cache"

    def run(m, data, **kw):
        cached = GradDot(m, task, projection=16, store=store, progress=False, **kw).fit(data).score(test).values
        plain = GradDot(m, task, projection=16, progress=False, **kw).fit(data).score(test).values
        np.testing.assert_allclose(cached, plain, rtol=1e-6, atol=1e-9)
        return cached

    first = run(model, train)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved[0].weight.mul_(1.5)
    assert not np.allclose(run(moved, train), first)
    x, y = train.tensors
    relabelled = ArrayDataset(x, (y + 1) % 3, ids=train.ids)  # same ids, other contents
    assert not np.allclose(run(model, relabelled), first)
    assert not np.allclose(run(model, train, seed=1), first)
    # the exact route's stored scores too
    a = GradDot(model, task, store=store, progress=False).fit(train).score(test).values
    b = GradDot(moved, task, store=store, progress=False).fit(train).score(test).values
    np.testing.assert_allclose(b, GradDot(moved, task, progress=False).fit(train).score(test).values, rtol=1e-9)
    assert not np.allclose(a, b)


# -- exact Grad-Dot in query rounds past the memory budget -------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt():
    """A tied TinyGPT in float64 whose layers are wide enough against T = 16 positions that materializing beats ghost
    dots; 12 training and 16 query sequences, batches of 2 (8 query batches: pairwise would materialize every training
    batch 8 times). ``per_query``: bytes of one query's gradient, all parameters materialized."""
    from datacredit.models import TinyGPT
    from datacredit.task import LanguageModelingTask

    torch.manual_seed(0)
    model = TinyGPT(11, d=16, n_layers=1, n_heads=2, max_len=16, tied=True).double()
    gen = torch.Generator().manual_seed(1)
    train = ArrayDataset(torch.randint(0, 11, (12, 17), generator=gen), ids=np.arange(200, 212))
    queries = ArrayDataset(torch.randint(0, 11, (16, 17), generator=gen))
    return model, LanguageModelingTask(), train, queries, 8 * sum(p.numel() for p in model.parameters())


def _budget(monkeypatch, nbytes):
    from datacredit.methods import querygram

    monkeypatch.setattr(querygram, "memory_budget", lambda device: nbytes)


def _counted(monkeypatch):
    """Count GradDot's passes over the training set, query batches whose gradients are computed, QueryGrams built
    (one per round), their gram calls (one per training batch scored) and QueryGrams built while another was alive."""
    import weakref

    from datacredit.methods.querygram import QueryGram

    counts = {"train": 0, "query_batches": 0, "rounds": 0, "grams": 0, "prepared": set(), "overlaps": 0}
    stream, init, gram = GradDot.stream, QueryGram.__init__, QueryGram.gram
    alive = weakref.WeakSet()  # the rounds' query sides not yet freed

    def counted_stream(self, data, *, measurement=False, **kw):
        counts["train"] += not measurement
        for item in stream(self, data, measurement=measurement, **kw):
            counts["query_batches"] += measurement
            yield item

    def counted_init(self, *args, **kw):
        counts["rounds"] += 1
        counts["overlaps"] += len(alive)  # another round's query side still alive while this one is built
        alive.add(self)
        init(self, *args, **kw)
        counts["prepared"] |= set(self.prepared)

    def counted_gram(self, g):
        counts["grams"] += 1
        return gram(self, g)

    monkeypatch.setattr(GradDot, "stream", counted_stream)
    monkeypatch.setattr(QueryGram, "__init__", counted_init)
    monkeypatch.setattr(QueryGram, "gram", counted_gram)
    return counts


@pytest.mark.parametrize("normalize", [False, True])
def test_rounds_past_the_budget_equal_one_round_and_torch_func(gpt, monkeypatch, normalize):
    """A budget of 5 queries' prepared side and passes costed at nothing (rounds wherever they hold more prepared
    parameters): 4 rounds of 2 query batches, one pass over the training set each (each query batch computed once),
    the same scores as without a budget and as the torch.func twin; top-k the same as score's."""
    from datacredit.methods import querygram

    model, task, train, queries, per_query = gpt
    monkeypatch.setattr(querygram, "PASS_MULTIPLY_ADDS", 0)
    kw = {"normalize": normalize, "batch_size": 2, "progress": False}
    _budget(monkeypatch, 2**40)
    one = GradDot(model, task, **kw).fit(train).score(queries).values
    _budget(monkeypatch, 5 * per_query)
    method = GradDot(model, task, **kw).fit(train)  # Grad-Cos: one pass for the training norms, not counted
    counts = _counted(monkeypatch)
    rounds = method.score(queries).values
    n_rounds = counts["rounds"]
    assert n_rounds == counts["train"] == 4 and counts["query_batches"] == 8 and counts["grams"] == n_rounds * 6
    assert counts["overlaps"] == 0  # one round's prepared queries in memory at a time: the budget holds
    np.testing.assert_allclose(rounds, one, rtol=1e-10, atol=1e-12)
    names = [n for n, _ in model.named_parameters()]
    g_train = flat(torch_func_grads(model, task, train.tensors[0]), names)
    g_query = flat(torch_func_grads(model, task, queries.tensors[0], measurement=True), names)
    want = g_train @ g_query.T
    if normalize:
        want = want / g_train.norm(dim=1)[:, None] / g_query.norm(dim=1)[None, :]
    np.testing.assert_allclose(rounds, want.numpy(), rtol=1e-9, atol=1e-11)
    top = method.topk(queries, 3)
    assert counts["rounds"] == counts["train"] == 2 * n_rounds
    for j in (0, 7, 15):
        assert [r for r, _ in top.query(j)] == [r for r, _ in method.score(queries).topk(3, j)]


def test_past_the_budget_wide_layers_take_rounds_not_pairwise(gpt, monkeypatch):
    """The routing decision: with room for 9 of 16 queries, the layers where materializing is cheaper stay prepared
    and the queries take 2 passes (the old code sent the overflow to the pairwise route in one pass)."""
    model, task, train, queries, per_query = gpt
    _budget(monkeypatch, 9 * per_query)
    counts = _counted(monkeypatch)
    GradDot(model, task, batch_size=2, progress=False).fit(train).score(queries)
    assert counts["train"] == counts["rounds"] == 2
    assert {"blocks.0.fc.weight", "blocks.0.out.weight", "blocks.0.qkv.weight"} <= counts["prepared"]


def test_a_killed_score_in_its_second_round_resumes(gpt, tmp_path, monkeypatch):
    """Store chunks are (query batch, row block): killed in round 2's second row block, a new run computes no
    gradients of round 1's queries and no training batch of round 2's finished block; a complete run reads back."""
    from datacredit.methods import base

    model, task, train, queries, per_query = gpt
    fresh = GradDot(model, task, batch_size=2, progress=False).fit(train).score(queries).values
    monkeypatch.setattr(base, "SCORE_CHUNK_BYTES", 6 * 16 * 8)  # blocks of 6 rows (3 training batches): 2 blocks
    _budget(monkeypatch, 8 * per_query)  # rounds of 4 query batches: 2 rounds
    counts = _counted(monkeypatch)
    from datacredit.methods.querygram import QueryGram

    counted_gram = QueryGram.gram

    def flaky(self, g):
        if counts["grams"] == 6 + 3:  # round 1 (6 training batches) and round 2's first block are written
            raise KeyboardInterrupt
        return counted_gram(self, g)

    monkeypatch.setattr(QueryGram, "gram", flaky)
    with pytest.raises(KeyboardInterrupt):
        GradDot(model, task, batch_size=2, store=tmp_path / "gd", progress=False).fit(train).score(queries)
    assert counts["rounds"] == 2
    counts.update(train=0, query_batches=0, rounds=0, grams=0)
    scores = GradDot(model, task, batch_size=2, store=tmp_path / "gd", progress=False).fit(train).score(queries)
    assert counts == {**counts, "train": 1, "query_batches": 4, "rounds": 1, "grams": 3}
    assert isinstance(scores.values, np.memmap)
    np.testing.assert_allclose(scores.values, fresh, rtol=1e-12, atol=1e-14)
    counts.update(train=0, query_batches=0, rounds=0, grams=0)
    again = GradDot(model, task, batch_size=2, store=tmp_path / "gd", progress=False).fit(train).score(queries)
    assert counts["train"] == counts["query_batches"] == counts["grams"] == 0
    np.testing.assert_array_equal(again.values, scores.values)
