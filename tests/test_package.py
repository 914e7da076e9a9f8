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
