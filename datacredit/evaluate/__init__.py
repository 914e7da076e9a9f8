"""Evaluation of attributions against retraining: ground truth (random subsets, leave-one-out), LDS, LOO
correlation, mislabel detection, counterfactual removal and data selection.

Sign convention (as for Scores): positive = the training example helps the query (lowers its loss).
"""

from .groundtruth import GroundTruth, LOOResult, build_groundtruth, build_loo, load_groundtruth, load_loo
from .lds import LDSResult, lds
from .loo import loo_correlation
from .mislabel import mislabel_detection
from .recipes import ClassifierRecipe, LeastSquaresRecipe, LMRecipe, Recipe, measure_sign
from .removal import RemovalResult, SelectionResult, removal, selection

__all__ = [
    "ClassifierRecipe",
    "LMRecipe",
    "GroundTruth",
    "LDSResult",
    "LOOResult",
    "LeastSquaresRecipe",
    "Recipe",
    "RemovalResult",
    "SelectionResult",
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
