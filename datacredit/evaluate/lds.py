"""Linear datamodeling score (LDS; Park et al., TRAK, ICML 2023, eq. 5).

For each query ``q`` and the ``m`` subsets ``S_k`` of a ground truth, the attribution's prediction is
``g_k(q) = Σ_{i ∈ S_k} score(i, q)`` and the truth is the retrained models' outcome averaged over seeds, signed so
that larger = better for the query: the NEGATED loss for ``measure="loss"``, the margin itself for ``"margin"``.
``LDS(q)`` is the Spearman correlation of the two over ``k``; the LDS is its mean over queries. With the Scores
convention (positive = helps, i.e. lowers the loss) a perfect attribution has LDS ≈ 1 and a sign-flipped one ≈ -1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from ..scores import Scores
from .align import positions, same_ids
from .groundtruth import GroundTruth
from .recipes import measure_sign
from .stats import bootstrap_mean_ci, spearman_columns

__all__ = ["LDSResult", "lds", "predicted_outputs"]

logger = logging.getLogger(__name__)

_ROW_BLOCK = 8192


@dataclass(frozen=True)
class LDSResult:
    """LDS and its uncertainty.

    Attributes:
        mean: mean over queries of the per-query Spearman correlation (queries with a constant side skipped).
        ci_low, ci_high: percentile-bootstrap interval of ``mean`` over queries (NaN when ``bootstrap=0``).
        per_query: ``(n_query,)`` per-query LDS in the order of ``query_ids`` (NaN where undefined).
        noise_ceiling: the ground truth's seed-to-seed agreement on these queries (None with one seed).
        query_ids: ``(n_query,)`` the queries evaluated (those of the scores).
        measure: which ground-truth measure was used.
    """

    mean: float
    ci_low: float
    ci_high: float
    per_query: np.ndarray
    noise_ceiling: float | None
    query_ids: np.ndarray
    measure: str

    def __str__(self) -> str:
        ceiling = "n/a (1 seed)" if self.noise_ceiling is None else f"{self.noise_ceiling:.3f}"
        return (f"LDS({self.measure}) = {self.mean:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] over "
                f"{len(self.per_query)} queries; noise ceiling {ceiling}")


def predicted_outputs(scores: Scores, gt: GroundTruth) -> np.ndarray:
    """``(m, n_query)`` the datamodel predictions ``Σ_{i ∈ S_k} score(i, q)`` in the scores' query order.

    Rows of ``scores`` are matched to the ground truth by training id (the id sets must be equal); the product is
    taken in blocks of rows so a memmapped score matrix is never loaded whole.
    """
    rows = same_ids(gt.train_ids, scores.train_ids, "LDS training examples", "the scores")
    masks = gt.masks.astype(np.float64)
    pred = np.zeros((gt.m, scores.n_query), dtype=np.float64)
    for start in range(0, len(rows), _ROW_BLOCK):
        block = rows[start : start + _ROW_BLOCK]
        order = np.argsort(block)  # read the (memmapped) score rows in increasing order
        values = np.asarray(scores.values[block[order]], dtype=np.float64)
        pred += masks[:, start : start + _ROW_BLOCK][:, order] @ values
    return pred


def lds(scores: Scores, gt: GroundTruth, measure: str = "loss", *, bootstrap: int = 1000, seed: int = 0,
        confidence: float = 0.95, higher_is_better: bool | None = None) -> LDSResult:
    """LDS of ``scores`` (``(n_train, n_query)``, positive = helps) against subset-retraining ground truth ``gt``.

    Queries: those of ``scores`` (each must be in ``gt``; extra ground-truth queries are ignored). Training ids of
    ``scores`` and ``gt`` must match as sets (any order). ``measure``: a ground-truth measure; its direction is
    known for ``"loss"`` (negated) and ``"margin"`` (as is), else pass ``higher_is_better``. ``bootstrap``
    resamples of the queries give the ``confidence`` interval (``seed`` fixes them). Mismatched ids raise DataError.
    """
    sign = measure_sign(measure, higher_is_better)
    cols = positions(scores.query_ids, gt.query_ids, "LDS queries: query ids of the scores not in the ground truth")
    if len(cols) < len(gt.query_ids):
        logger.info("LDS over %d of the ground truth's %d queries", len(cols), len(gt.query_ids))
    actual = sign * gt.mean(measure)[:, cols]
    per_query = spearman_columns(predicted_outputs(scores, gt), actual)
    finite = per_query[np.isfinite(per_query)]
    if finite.size == 0:
        raise DataError("LDS is undefined for every query (constant predictions or constant ground truth)")
    if finite.size < per_query.size:
        logger.warning("LDS: %d of %d queries skipped (constant scores over the subsets or constant outputs)",
                       per_query.size - finite.size, per_query.size)
    low, high = bootstrap_mean_ci(finite, bootstrap, confidence, seed)
    ceiling = gt.seed_agreement(measure, scores.query_ids)
    return LDSResult(float(finite.mean()), low, high, per_query, ceiling, scores.query_ids.copy(), measure)
