"""LDS against a synthetic ground truth that is exactly a linear datamodel: perfect scores ≈ 1, negated ≈ -1,
random ≈ 0; alignment by id; bootstrap interval; the column-wise Spearman against scipy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import spearmanr

from datacredit import DataError, Scores
from datacredit.evaluate import GroundTruth, lds
from datacredit.evaluate.groundtruth import subset_masks
from datacredit.evaluate.stats import spearman_columns

N_TRAIN, N_QUERY, M = 60, 200, 100


@pytest.fixture(scope="module")
def linear():
    """Ground truth whose losses are ``5 − Σ_{i∈S_k} w_iq`` (+ 1e-3 noise per seed): ``w`` is the perfect score
    (positive w = lowers the loss = helps); margins are ``Σ w`` exactly."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(N_TRAIN, N_QUERY))
    masks = subset_masks(N_TRAIN, M, 0.5, seed=1)
    total = masks.astype(np.float64) @ w  # (m, Q)
    loss = 5.0 - total[:, None, :] + 1e-3 * rng.normal(size=(M, 2, N_QUERY))
    margin = np.repeat(total[:, None, :], 2, axis=1)
    gt = GroundTruth(masks, {"loss": loss, "margin": margin}, np.arange(100, 100 + N_TRAIN), np.arange(N_QUERY))
    return w, gt


def _scores(values, gt, train_ids=None, query_ids=None):
    return Scores(values, gt.train_ids if train_ids is None else train_ids,
                  gt.query_ids if query_ids is None else query_ids, "synthetic")


def test_perfect_scores_give_lds_near_one(linear):
    w, gt = linear
    result = lds(_scores(w, gt), gt, bootstrap=200)
    assert result.mean > 0.99
    assert result.ci_low <= result.mean <= result.ci_high
    assert result.noise_ceiling is not None and result.noise_ceiling > 0.99
    assert result.per_query.shape == (N_QUERY,)


def test_sign_flipped_scores_give_lds_near_minus_one(linear):
    w, gt = linear
    assert lds(_scores(-w, gt), gt, bootstrap=0).mean < -0.99
    # the margin is higher-is-better: correlated as is, not negated
    assert lds(_scores(w, gt), gt, "margin", bootstrap=0).mean > 0.99


def test_random_scores_give_lds_near_zero(linear):
    _, gt = linear
    noise = np.random.default_rng(7).normal(size=(N_TRAIN, N_QUERY))
    assert abs(lds(_scores(noise, gt), gt, bootstrap=0).mean) < 0.1


def test_alignment_is_by_id_not_position(linear):
    w, gt = linear
    perm = np.random.default_rng(3).permutation(N_TRAIN)
    shuffled = _scores(w[perm], gt, train_ids=gt.train_ids[perm])
    a, b = lds(_scores(w, gt), gt, bootstrap=0), lds(shuffled, gt, bootstrap=0)
    np.testing.assert_allclose(a.per_query, b.per_query, rtol=0, atol=1e-12)
    # scores for a subset of the queries (in another order) are evaluated on those queries only
    some = np.array([5, 2, 9])
    part = lds(_scores(w[:, some], gt, query_ids=gt.query_ids[some]), gt, bootstrap=0)
    np.testing.assert_allclose(part.per_query, a.per_query[some], rtol=0, atol=1e-12)


def test_mismatched_ids_raise_naming_them(linear):
    w, gt = linear
    ids = gt.train_ids.copy()
    ids[4] = 9999
    with pytest.raises(DataError, match=str(gt.train_ids[4])):
        lds(_scores(w, gt, train_ids=ids), gt)
    with pytest.raises(DataError, match="12345"):
        lds(_scores(w[:, :2], gt, query_ids=[0, 12345]), gt)
    with pytest.raises(DataError, match="measure"):
        lds(_scores(w, gt), gt, "accuracy-of-nothing")


def test_one_seed_has_no_noise_ceiling(linear):
    w, gt = linear
    one = GroundTruth(gt.masks, {"loss": gt.outputs["loss"][:, :1]}, gt.train_ids, gt.query_ids)
    result = lds(_scores(w, one), one, bootstrap=0)
    assert result.noise_ceiling is None and np.isnan(result.ci_low) and result.mean > 0.99


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, (12, 3), elements=st.integers(-3, 3).map(float)),
       arrays(np.float64, (12, 3), elements=st.floats(-5, 5)))
def test_spearman_columns_matches_scipy(a, b):
    ours = spearman_columns(a, b)
    for q in range(3):
        ref = spearmanr(a[:, q], b[:, q]).statistic if np.ptp(a[:, q]) and np.ptp(b[:, q]) else np.nan
        np.testing.assert_allclose(ours[q], ref, rtol=1e-10, atol=1e-12, equal_nan=True)
