"""Sources and source values: exhaustive Shapley over sources as players, aggregation, bootstrap, payouts."""

from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch

from datacredit import ClassificationTask, Scores
from datacredit.errors import DataError
from datacredit.ledger import UNALLOCATED, PayoutRule, compensation, split_amount
from datacredit.sources import Sources, across_members

from .test_inrun import OPTIMIZERS, Twin, make_problem, one_step, warm_up


def source_shapley(twin: Twin, groups: list[list[int]], order: int) -> torch.Tensor:
    """Exact Shapley values of the step's Taylor game with each group of examples as one player."""
    k = len(groups)
    phi = torch.zeros(k, dtype=torch.float64)

    def members(players):
        return tuple(i for p in players for i in groups[p])

    for s in range(k):
        others = [p for p in range(k) if p != s]
        for size in range(k):
            weight = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
            for coalition in itertools.combinations(others, size):
                phi[s] += weight * (twin.utility(members(coalition + (s,)), order)
                                    - twin.utility(members(coalition), order))
    return phi


@pytest.mark.parametrize("name", ["sgd", "adam"])
@pytest.mark.parametrize("order", [1, 2])
def test_source_as_player_equals_the_sum_of_its_members(name, order):
    """The module doc's claim, by enumeration over coalitions of sources (not of examples)."""
    model, train, val = make_problem(n=7)
    task = ClassificationTask()
    opt = OPTIMIZERS[name](model.parameters())
    warm_up(model, opt, task, train)
    ids = np.arange(100, 107)
    shapley = one_step(model, task, train, val, opt, order, ids=ids)
    twin = Twin(model, task, train, val, opt, loss_scale=1 / 7)
    opt.step()
    owners = ["a", "b", "a", "c", "b", "a", "d"]
    values = Sources(ids, {"owner": owners}).values(shapley.values())
    groups = [[i for i, o in enumerate(owners) if o == name] for name in values.names]
    torch.testing.assert_close(torch.from_numpy(values.values[:, 0]), source_shapley(twin, groups, order),
                               rtol=1e-8, atol=1e-12)
    assert values.counts.tolist() == [3, 2, 1, 1]


@pytest.mark.parametrize("order", [1, 2])
def test_a_duplicated_source_doubles_only_under_the_first_order_game(order):
    """A copy of source A as a second player in the same step: first order pays the pair exactly 2·φ_A; second
    order pays 2·φ_A − x_Aᵀ H x_A, i.e. the copy shares A's curvature term instead of doubling it."""
    model, train, val = make_problem(n=4)
    task = ClassificationTask()
    opt = OPTIMIZERS["sgd"](model.parameters())
    warm_up(model, opt, task, train)
    opt.zero_grad()
    task.loss(model, train).mean().backward()
    twin = Twin(model, task, train, val, opt, loss_scale=1 / 4)
    alone = source_shapley(twin, [[0, 1], [2], [3]], order)
    twin.x = torch.cat([twin.x, twin.x[:2]])  # examples 4, 5 are copies of 0, 1 in the same step
    with_copy = source_shapley(twin, [[0, 1], [2], [3], [4, 5]], order)
    x_a = twin.x[:2].sum(0)
    expected = 2 * alone[0] - (0 if order == 1 else x_a @ twin.H @ x_a)
    torch.testing.assert_close(with_copy[0] + with_copy[3], expected, rtol=1e-9, atol=1e-12)
    if order == 2:
        assert not torch.isclose(with_copy[0] + with_copy[3], 2 * alone[0])


def test_values_sum_members_and_keep_levels():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(50, 3))
    scores = Scores(values, np.arange(50) * 3, [7, 8, 9], "grad-dot")
    owners = [f"o{i % 4}" for i in range(50)]
    src = Sources(np.arange(50)[::-1] * 3, {"owner": owners[::-1], "licence": ["cc"] * 50})
    sv = src.values(scores, "owner")
    for s, name in enumerate(sv.names):
        rows = [i for i in range(50) if owners[i] == name]
        np.testing.assert_allclose(sv.values[s], values[rows].sum(0))
    assert src.values(scores, "licence").values.shape == (1, 3)
    np.testing.assert_allclose(sv.total("sum").sum(), values.sum())
    np.testing.assert_allclose(sv.total("mean"), sv.values.mean(1))
    assert Sources.from_json(json.loads(json.dumps(src.to_json()))).levels.keys() == src.levels.keys()
    assert sv.ranking()[0][1] == sv.total().max()


def test_bad_sources_are_refused_by_name():
    with pytest.raises(DataError, match="3 keys for 2 ids"):
        Sources([1, 2], ["a", "b", "c"])
    with pytest.raises(DataError, match="non-empty strings"):
        Sources([1, 2], ["a", ""])
    with pytest.raises(DataError, match="duplicated"):
        Sources([1, 1], ["a", "b"])
    with pytest.raises(DataError, match="no source level 'x'"):
        Sources([1], ["a"]).level("x")
    with pytest.raises(DataError, match="have no source"):
        Sources([1], ["a"]).values(Scores(np.ones((2, 1)), [1, 2], [0], "m"))
    with pytest.raises(DataError, match="missing field"):
        Sources.from_records([{"id": 1}], "id", ["owner"])


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_queries():
    rng = np.random.default_rng(1)
    few = Sources(np.arange(4), ["a", "a", "b", "b"]).values(
        Scores(rng.normal(1.0, 1.0, (4, 10)), np.arange(4), np.arange(10), "m"))
    many = Sources(np.arange(4), ["a", "a", "b", "b"]).values(
        Scores(rng.normal(1.0, 1.0, (4, 1000)), np.arange(4), np.arange(1000), "m"))
    lo, hi, std = few.bootstrap(500, seed=0)
    assert (lo <= few.total()).all() and (few.total() <= hi).all()
    assert (many.bootstrap(500, seed=0)[2] < std).all()
    mean, spread = across_members([few, few])
    np.testing.assert_allclose(mean, few.total())
    np.testing.assert_allclose(spread, 0)


def test_payout_rule_negative_noise_efficiency():
    paid, status, rest = split_amount(10.0, np.array([3.0, 1.0, -2.0, 0.1]), np.array([0.5, 0.1, 0.1, 0.2]))
    assert status.tolist() == ["paid", "paid", "negative", "within-noise"]
    assert paid.tolist() == [7.5, 2.5, 0.0, 0.0] and rest == 0.0
    paid, _, _ = split_amount(1.0, np.array([1.0, 1.0, 1.0]), None)
    assert paid.sum() == pytest.approx(1.0) and sorted(paid.tolist()) == [0.33, 0.33, 0.34]
    paid, status, rest = split_amount(5.0, np.array([-1.0, 0.01]), np.array([0.0, 1.0]))
    assert paid.sum() == 0 and rest == 5.0
    with pytest.raises(DataError, match="amount"):
        split_amount(-1.0, np.ones(2), None)
    with pytest.raises(DataError, match="min_evidence"):
        PayoutRule(min_evidence=-1)


def test_ledger_sums_to_the_amounts_and_writes_json_and_csv(tmp_path):
    rng = np.random.default_rng(2)
    scores = Scores(rng.normal(0.2, 1.0, (30, 4)), np.arange(30), [10, 11, 12, 13], "influence", {"damping": 0.1})
    sv = Sources(np.arange(30), [f"s{i % 6}" for i in range(30)]).values(scores)
    ledger = compensation(sv, [1.0, 2.0, 0.5, 3.0], noise=np.full(sv.values.shape, 0.3),
                          audit={"model": "abc"})
    for out, amount in zip([10, 11, 12, 13], [1.0, 2.0, 0.5, 3.0], strict=True):
        assert sum(line["paid"] for line in ledger.lines if line["output"] == out) == pytest.approx(amount)
    assert all(line["paid"] == 0 for line in ledger.lines if line["status"] in ("negative", "within-noise"))
    assert sum(ledger.totals().values()) == pytest.approx(6.5)
    ledger.save(tmp_path / "ledger")
    doc = json.loads((tmp_path / "ledger" / "ledger.json").read_text())
    assert doc["audit"]["model"] == "abc" and doc["audit"]["method"] == "influence" and doc["rule"]["decimals"] == 2
    rows = list(csv.DictReader((tmp_path / "ledger" / "ledger.csv").open()))
    assert len(rows) == len(ledger.lines)
    assert {r["source"] for r in rows} <= {*sv.names.tolist(), UNALLOCATED}


def test_scores_keep_their_sources_through_save_and_load(tmp_path):
    src = Sources([5, 6, 7], {"owner": ["x", "y", "x"], "licence": ["a", "a", "b"]})
    scores = Scores(np.arange(6.0).reshape(3, 2), [5, 6, 7], [0, 1], "grad-dot", sources=src)
    scores.save(tmp_path / "s")
    back = Scores.load(tmp_path / "s", mmap=True)
    assert back.sources.levels.keys() == src.levels.keys()
    np.testing.assert_array_equal(back.by_source("owner").values, [[4.0, 6.0], [2.0, 3.0]])
    Scores(scores.values, scores.train_ids, scores.query_ids, "grad-dot").save(tmp_path / "s")
    assert Scores.load(tmp_path / "s").sources is None  # a later save without sources leaves none behind
    with pytest.raises(DataError, match="have no source"):
        Scores(np.ones((2, 1)), [5, 99], [0], "m", sources=src)
    with pytest.raises(DataError, match="carry no sources"):
        Scores(np.ones((1, 1)), [5], [0], "m").by_source()
