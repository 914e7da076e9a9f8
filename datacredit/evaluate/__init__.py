"""Evaluation of attributions against retraining: ground truth (random subsets, leave-one-out), LDS, LOO
correlation, mislabel detection, counterfactual removal and data selection.

Each evaluation takes one frozen config saying what it is (:class:`SubsetConfig`, :class:`LOOConfig`,
:class:`RemovalConfig`, :class:`SelectionConfig`) and one :class:`Execution` saying how it runs (workers, backend,
progress, wait, overwrite), or their fields as keywords; both are recorded with what the evaluation writes.

Sign convention (as for Scores): positive = the training example helps the query (lowers its loss).
"""

from .config import Execution, LOOConfig, RemovalConfig, SelectionConfig, SubsetConfig
from .groundtruth import GroundTruth, LOOResult, build_groundtruth, build_loo, load_groundtruth, load_loo
from .lds import LDSResult, lds
from .loo import loo_correlation
from .mislabel import mislabel_detection
from .recipes import ClassifierRecipe, LeastSquaresRecipe, LMRecipe, Recipe, measure_sign
from .removal import RemovalResult, SelectionResult, removal, selection

__all__ = [
    "ClassifierRecipe",
    "Execution",
    "LMRecipe",
    "GroundTruth",
    "LDSResult",
    "LOOConfig",
    "LOOResult",
    "LeastSquaresRecipe",
    "Recipe",
    "RemovalConfig",
    "RemovalResult",
    "SelectionConfig",
    "SelectionResult",
    "SubsetConfig",
    "build_groundtruth",
    "build_loo",
    "lds",
    "load_groundtruth",
    "load_loo",
    "loo_correlation",
    "measure_sign",
    "mislabel_detection",
    "removal",
    "selection",
]
