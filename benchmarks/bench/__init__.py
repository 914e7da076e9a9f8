"""Benchmark cases, a registry of methods (ours and the peers'), and the runner that scores them against ground
truth: ``datacredit groundtruth --case NAME`` then ``datacredit bench --case NAME``.

Not part of the installed package: it lives in the repository's ``benchmarks/`` (import it as ``benchmarks.bench``
with the repository root on ``sys.path``; the two commands above find it from an editable install). The peers it
compares with (dattri, kronfluence, traker) are installed by ``make peers``, not by a pip extra: kronfluence's
metadata pulls torchvision and with it another torch, so they go in with ``--no-deps`` under the torch pin.
"""

from .cases import CASES, Case, CaseSpec, load_case

__all__ = ["CASES", "Case", "CaseSpec", "load_case"]
