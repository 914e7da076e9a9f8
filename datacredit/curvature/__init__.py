"""Curvature strategies for influence functions: fit from training data, apply the damped inverse to gradients.

Registered by name: ``"identity"``, ``"diagonal"``, ``"kfac"``, ``"ekfac"`` (fitted from captured per-example
gradients) and the exact twins ``"explicit"`` and ``"cg"`` (true Hessian of the mean training loss, from the model).
"""

from .base import Curvature, Damping, all_reduce_sum, as_damping, curvature_class, curvature_names, register_curvature
from .eigen import EigenBlock
from .factored import EKFAC, KFAC, DiagonalCurvature, IdentityCurvature
from .hessian import ExplicitHessian, HessianCG, tracked_parameters


def make_curvature(name: str, **options) -> Curvature:
    """A fresh strategy of the registered ``name`` (options go to its constructor)."""
    return curvature_class(name)(**options)


__all__ = [
    "EKFAC",
    "KFAC",
    "Curvature",
    "Damping",
    "DiagonalCurvature",
    "EigenBlock",
    "ExplicitHessian",
    "HessianCG",
    "IdentityCurvature",
    "all_reduce_sum",
    "as_damping",
    "curvature_class",
    "curvature_names",
    "make_curvature",
    "register_curvature",
    "tracked_parameters",
]
