"""Mislabel detection: flip a known fraction of labels (``datacredit.data.flip_labels``), rank the training
examples by a per-example value, and measure how well the ranking finds the flipped ones.

Which end is suspicious depends on the value: self-influence / self-scores are HIGH for mislabelled examples
(``higher_is_suspicious=True``); In-Run Shapley values and other "positive = helped" values are LOW for them
(``higher_is_suspicious=False``). The argument has no default so the direction is always stated.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from ..scores import Scores
from .align import positions

__all__ = ["mislabel_detection"]


def mislabel_detection(values: np.ndarray | Scores, flipped_ids: np.ndarray, ids: np.ndarray | None = None, *,
                       higher_is_suspicious: bool, k: int | None = None) -> dict[str, float]:
    """Score a suspicion ranking against the truly flipped examples.

    Args:
        values: ``(n,)`` one value per training example, or a one-column Scores (e.g. self-scores).
        flipped_ids: ids of the examples whose labels were flipped (each must be in ``ids``).
        ids: ``(n,)`` ids of ``values``; defaults to a Scores' ``train_ids`` (required for a plain array).
        higher_is_suspicious: True if a larger value means "more likely mislabelled".
        k: cut-off for precision/recall at k; default the number of flipped examples.
    Returns ``{"auroc", "ap", "precision_at_k", "recall_at_k", "k", "n_flipped", "n"}``; AUROC 1.0 = every flipped
    example ranked above every clean one, 0.5 = chance, 0.0 = exactly reversed.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score  # slow to import; only needed here

    if isinstance(values, Scores):
        if values.n_query != 1:
            raise DataError(f"mislabel_detection needs one value per example; the Scores have {values.n_query} "
                            "columns (pass e.g. scores.column(q) or self-scores)")
        ids = values.train_ids if ids is None else ids
        values = values.column(0)
    if ids is None:
        raise DataError("mislabel_detection: pass ids (the example ids of values)")
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if values.shape != ids.shape:
        raise DataError(f"values {values.shape} and ids {ids.shape} differ in length")
    if not np.isfinite(values).all():
        raise DataError(f"values are not finite for ids {ids[~np.isfinite(values)][:10].tolist()}")
    flipped = np.zeros(len(ids), dtype=bool)
    flipped[positions(np.unique(flipped_ids), ids, "mislabel detection: flipped ids not among ids")] = True
    n_flipped = int(flipped.sum())
    if n_flipped == 0 or n_flipped == len(ids):
        raise DataError(f"need both flipped and clean examples, got {n_flipped} flipped of {len(ids)}")
    suspicion = values if higher_is_suspicious else -values
    k = n_flipped if k is None else int(k)
    if not 1 <= k <= len(ids):
        raise DataError(f"k must be in [1, {len(ids)}], got {k}")
    top = np.argsort(-suspicion, kind="stable")[:k]
    hits = int(flipped[top].sum())
    return {"auroc": float(roc_auc_score(flipped, suspicion)),
            "ap": float(average_precision_score(flipped, suspicion)),
            "precision_at_k": hits / k, "recall_at_k": hits / n_flipped,
            "k": k, "n_flipped": n_flipped, "n": len(ids)}
