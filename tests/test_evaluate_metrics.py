"""Mislabel detection on constructed rankings, LOO correlation on constructed effects, and the retraining checks
(top-k removal vs random removal, top-valued vs random selection) on least squares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datacredit import DataError, Scores
from datacredit.data import ArrayDataset
from datacredit.evaluate import (
    ClassifierRecipe,
    LeastSquaresRecipe,
    LOOResult,
    build_loo,
    loo_correlation,
    mislabel_detection,
    removal,
    selection,
)

SERIAL = {"backend": "serial", "progress": False}


# -- mislabel detection ----------------------------------------------------------------------------------------
def test_mislabel_auroc_perfect_reversed_and_direction():
    ids = np.arange(200, 300)
    flipped = ids[::10]  # 10 flipped examples
    suspicion = np.where(np.isin(ids, flipped), 1.0, 0.0) + np.linspace(0, 0.5, 100)
    perfect = mislabel_detection(suspicion, flipped, ids, higher_is_suspicious=True)
    assert perfect["auroc"] == 1.0 and perfect["ap"] == pytest.approx(1.0) and perfect["precision_at_k"] == 1.0
    assert perfect["k"] == perfect["n_flipped"] == 10
    reversed_ = mislabel_detection(suspicion, flipped, ids, higher_is_suspicious=False)
    assert reversed_["auroc"] == 0.0 and reversed_["precision_at_k"] == 0.0
    # an In-Run-style value (low = suspicious) ranked the right way round is perfect again
    assert mislabel_detection(-suspicion, flipped, ids, higher_is_suspicious=False)["auroc"] == 1.0
    # a one-column Scores carries its own ids
    scores = Scores(suspicion[:, None], ids, [0], "self-influence")
    assert mislabel_detection(scores, flipped, higher_is_suspicious=True)["auroc"] == 1.0
    with pytest.raises(DataError, match="999"):
        mislabel_detection(suspicion, [999], ids, higher_is_suspicious=True)


# -- LOO correlation -------------------------------------------------------------------------------------------
def test_loo_correlation_sign_and_alignment():
    rng = np.random.default_rng(0)
    n_removed, n_query = 15, 4
    full = {"loss": rng.normal(size=(2, n_query))}
    without = {"loss": rng.normal(size=(n_removed, 2, n_query))}
    removed = np.arange(100, 100 + n_removed)
    loo = LOOResult(full, without, removed, np.arange(n_query))
    effect = loo.values  # loss_without − loss_full
    np.testing.assert_allclose(effect, without["loss"].mean(1) - full["loss"].mean(0))
    extra = rng.normal(size=(5, n_query))  # training examples the LOO did not remove are ignored
    train_ids = np.concatenate([removed[::-1], np.arange(5)])
    good = Scores(np.concatenate([effect[::-1], extra]), train_ids, np.arange(n_query), "exact")
    assert loo_correlation(good, loo) == pytest.approx((1.0, 1.0))
    bad = Scores(-good.values, train_ids, np.arange(n_query), "flipped")
    assert loo_correlation(bad, loo) == pytest.approx((-1.0, -1.0))


# -- removal and selection by retraining -----------------------------------------------------------------------
def regression(n, noise, seed=0, n_val=50, d=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_val, d, generator=gen, dtype=torch.float64)
    noise = torch.cat([torch.as_tensor(noise, dtype=torch.float64), torch.full((n_val,), 0.01, dtype=torch.float64)])
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + noise * torch.randn(n + n_val, generator=gen,
                                                                                        dtype=torch.float64)
    return ArrayDataset(x[:n], y[:n], ids=np.arange(500, 500 + n)), ArrayDataset(x[n:], y[n:])


def test_removing_top_proponents_hurts_more_than_random(tmp_path):
    train, queries = regression(40, np.full(40, 1.0))
    queries = queries.subset(np.arange(10))
    loo = build_loo(LeastSquaresRecipe(), train, queries, tmp_path / "loo", **SERIAL)
    scores = Scores(loo.values, loo.removed_ids, loo.query_ids, "exact-loo")  # positive = helped
    result = removal(scores, LeastSquaresRecipe(), train, queries, k=5, n_queries=None, **SERIAL)
    summary = result.summary()
    assert summary["top_effect"] > 0 and summary["top_effect"] > summary["random_effect"]
    assert summary["fraction_top_greater"] >= 0.8
    # stored and resumed: the same numbers come back without retraining
    stored = removal(scores, LeastSquaresRecipe(), train, queries, k=5, n_queries=4, seed=1, out_dir=tmp_path / "r",
                     **SERIAL)
    again = removal(scores, LeastSquaresRecipe(), train, queries, k=5, n_queries=4, seed=1, out_dir=tmp_path / "r",
                    **SERIAL)
    np.testing.assert_array_equal(stored.top_effect, again.top_effect)
    assert len(stored.query_ids) == 4


def test_selecting_top_valued_half_beats_random_half():
    noise = np.where(np.arange(60) % 2 == 0, 0.01, 3.0)  # even positions clean, odd ones very noisy
    train, val = regression(60, noise, seed=2)
    values = np.where(noise < 1, 1.0, -1.0)  # higher = more useful
    result = selection(values, LeastSquaresRecipe(), train, val, fraction=0.5, **SERIAL)
    assert result.n_selected == 30 and result.top_accuracy is None
    assert result.top_loss < 0.1 * result.random_loss


def test_selection_reports_accuracy_for_classifiers():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(80, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    train, val = ArrayDataset(x[:60], y[:60]), ArrayDataset(x[60:], y[60:])
    recipe = ClassifierRecipe(d_in=4, d_out=2, epochs=5, lr=0.1, batch_size=16)
    result = selection(np.arange(60.0), recipe, train, val, **SERIAL)
    assert 0.0 <= result.random_accuracy <= 1.0 and result.top_accuracy > 0.7
