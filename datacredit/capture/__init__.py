"""Capture engine: factored per-example gradients of tracked modules, and products between them."""

from .engine import Capture, check_finite_losses, check_per_example, example_grads, resolve_modules
from .grads import ExampleGrads
from .kronecker import KronProjection as KronProjection
from .pieces import Dense, Outer
from .registry import LayerRule, register, registered, rule_for, rule_mismatch

__all__ = [
    "Capture",
    "Dense",
    "ExampleGrads",
    "LayerRule",
    "Outer",
    "check_finite_losses",
    "check_per_example",
    "example_grads",
    "register",
    "registered",
    "resolve_modules",
    "rule_for",
    "rule_mismatch",
]
