"""Leave-one-out correlation: do the scores rank training examples as removing them really changes each query?

Per query ``q``: correlate ``score(i, q)`` with the true LOO effect ``LOOResult.effect(measure)[i, q]`` (for the
loss ``loss_without_i − loss_full``; positive = i helped, the Scores sign) over the removed examples ``i``; then
average over queries. A correct attribution gives positive correlations.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from ..scores import Scores
from .align import positions
from .groundtruth import LOOResult
from .stats import pearson_columns, spearman_columns

__all__ = ["loo_correlation"]


def loo_correlation(scores: Scores, loo_result: LOOResult, measure: str = "loss", *,
                    higher_is_better: bool | None = None) -> tuple[float, float]:
    """``(pearson, spearman)``: per-query correlations between scores and LOO effects, averaged over queries.

    Rows are the LOO's removed examples (each must be among the scores' training ids); queries are those of the
    scores (each must be in the LOO result). Queries where either side is constant are skipped.
    """
    rows = positions(loo_result.removed_ids, scores.train_ids, "LOO: removed ids not among the scores' train ids")
    cols = positions(scores.query_ids, loo_result.query_ids, "LOO: query ids of the scores not in the LOO result")
    if len(rows) < 3:
        raise DataError(f"LOO correlation needs at least 3 removed examples, got {len(rows)}")
    predicted = np.asarray(scores.values[rows], dtype=np.float64)
    truth = loo_result.effect(measure, higher_is_better)[:, cols]
    pearson, spearman = pearson_columns(predicted, truth), spearman_columns(predicted, truth)
    ok = np.isfinite(pearson) & np.isfinite(spearman)
    if not ok.any():
        raise DataError("LOO correlation is undefined for every query (constant scores or constant LOO effects)")
    return float(pearson[ok].mean()), float(spearman[ok].mean())
