"""Benchmark cases, a registry of methods (ours and the peers'), and the runner that scores them against ground
truth: ``datacredit groundtruth --case NAME`` then ``datacredit bench --case NAME``."""

from .cases import CASES, Case, CaseSpec, load_case

__all__ = ["CASES", "Case", "CaseSpec", "load_case"]
