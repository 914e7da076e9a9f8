"""Package layout: core types in core modules (old import paths kept), one version string, one public API."""

from __future__ import annotations

import importlib.metadata

import datacredit


def test_core_types_live_in_a_core_module_and_the_old_path_still_works():
    from datacredit.data import ArrayDataset as from_data
    from datacredit.data.dataset import ArrayDataset as old
    from datacredit.data.dataset import example_ids as old_ids
    from datacredit.dataset import ArrayDataset, example_ids

    assert old is ArrayDataset and from_data is ArrayDataset and old_ids is example_ids
    assert ArrayDataset.__module__ == "datacredit.dataset"


def test_version_has_one_source():
    from datacredit._version import __version__

    assert datacredit.__version__ == __version__ == importlib.metadata.version("datacredit")


def test_benchmark_code_is_not_in_the_wheel():
    """The packages setuptools ships under pyproject's find settings: datacredit without benchmarks/bench."""
    from pathlib import Path

    import tomllib
    from setuptools import find_namespace_packages

    root = Path(__file__).resolve().parents[1]
    found = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = find_namespace_packages(str(root), include=found["include"], exclude=found.get("exclude", ()))
    assert {"datacredit", "datacredit.methods", "datacredit.evaluate"} <= set(shipped)
    assert not [p for p in shipped if p.startswith(("datacredit.bench", "benchmarks"))]


def test_dir_lists_the_public_api_and_submodules_stay_importable():
    import datacredit.errors
    import datacredit.models

    assert set(dir(datacredit)) == {*datacredit.__all__, "__version__"}
    assert not {"demo", "errors", "models", "optimizers", "lock", "methods"} & set(dir(datacredit))
    assert all(getattr(datacredit, name) is not None for name in datacredit.__all__)
    assert datacredit.errors.DataError is datacredit.DataError and callable(datacredit.models.mlp)
    for name in ("Sources", "SourceValues", "CompletionTask", "Ledger", "PayoutRule", "compensation", "GradientStore"):
        assert name in datacredit.__all__
