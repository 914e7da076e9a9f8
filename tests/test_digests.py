"""One digest module: every cache names its model, data, ids and configuration with the same functions, and the
digests see what the old per-module copies missed (frozen parameters, buffers, contents of non-array data sets)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from datacredit import ClassificationTask, GradDot, ledger
from datacredit import digests as dg
from datacredit import gradstore as gs_module
from datacredit.data import ArrayDataset
from datacredit.methods import base
from datacredit.models import mlp


def test_one_definition_of_each_digest():
    assert base.model_digest is dg.model_digest and gs_module.model_digest is dg.model_digest
    assert ledger.model_digest is dg.model_digest
    assert base.data_digest is dg.data_digest and base.ids_digest is dg.ids_digest


def test_model_digest_sees_values_buffers_and_frozen_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    same = copy.deepcopy(model)
    assert dg.model_digest(model) == dg.model_digest(same)
    frozen = copy.deepcopy(model)
    frozen[0].weight.requires_grad_(False)
    with torch.no_grad():
        frozen[0].weight[0, 0] += 1e-6
    assert dg.model_digest(frozen) != dg.model_digest(model)
    buffered = copy.deepcopy(model)
    buffered[1].running_mean += 1.0
    assert dg.model_digest(buffered) != dg.model_digest(model)
    # a permutation keeps every cheap statistic (sum, sum of squares) but is another model
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        permuted[0].weight.copy_(model[0].weight.flip(0))
    assert dg.model_digest(permuted) != dg.model_digest(model)


class Items(Dataset):
    """A data set without ``.tensors``: read item by item."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y, self.ids = x, y, np.arange(len(x)) + 100

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def test_data_digest_is_content_not_ids():
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    a = dg.data_digest(ArrayDataset(x, y, ids=np.arange(6)))
    assert a == dg.data_digest(ArrayDataset(x.clone(), y.clone(), ids=np.arange(10, 16)))
    assert a != dg.data_digest(ArrayDataset(x, (y + 1) % 3, ids=np.arange(6)))
    assert dg.data_digest(Items(x, y)) != dg.data_digest(Items(x, (y + 1) % 3))  # the old base digest: ids only
    assert dg.ids_digest(np.arange(6)) != dg.ids_digest(np.arange(6)[::-1])


def test_tree_hash_is_delimited():
    assert dg.config_digest([[1, 2], [3]]) != dg.config_digest([[1], [2, 3]])
    assert dg.config_digest({"a": "bc"}) != dg.config_digest({"a": ["b", "c"]})
    assert dg.config_digest((1, 2)) != dg.config_digest([1, 2])
    assert dg.config_digest(torch.zeros(2, 3)) != dg.config_digest(torch.zeros(3, 2))
    assert dg.config_digest(torch.zeros(2)) != dg.config_digest(torch.zeros(2, dtype=torch.float64))
    assert dg.config_digest({"t": torch.ones(2)}) == dg.config_digest({"t": torch.ones(2)})


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x, y = torch.randn(24, 6, dtype=torch.float64), torch.randint(0, 3, (24,))
    model = mlp(6, 8, 3).double()
    return model, x, y


def test_grad_dot_cache_sees_a_changed_frozen_parameter(setup, tmp_path):
    """The old Grad-Dot digest hashed the trainable parameters only: a changed frozen layer reused stale features."""
    model, x, y = setup
    train, test = ArrayDataset(x[:18], y[:18]), ArrayDataset(x[18:], y[18:])
    net = copy.deepcopy(model)
    net[0].weight.requires_grad_(False)  # frozen: not attributed, but it shapes every gradient behind it
    task = ClassificationTask()
    GradDot(net, task, projection=8, store=tmp_path / "c", progress=False).fit(train).score(test)
    with torch.no_grad():
        net[0].weight.mul_(1.5)
    cached = GradDot(net, task, projection=8, store=tmp_path / "c", progress=False).fit(train).score(test).values
    fresh = GradDot(net, task, projection=8, progress=False).fit(train).score(test).values
    np.testing.assert_allclose(cached, fresh, rtol=1e-6, atol=1e-9)


def test_grad_dot_cache_sees_changed_contents_of_a_plain_dataset(setup, tmp_path):
    """Same ids, other labels, in a data set without ``.tensors``: the old digest (ids only) reused the features."""
    model, x, y = setup
    task = ClassificationTask()
    test = ArrayDataset(x[18:], y[18:])
    GradDot(model, task, projection=8, store=tmp_path / "c", progress=False).fit(Items(x[:18], y[:18])).score(test)
    relabelled = Items(x[:18], (y[:18] + 1) % 3)
    cached = GradDot(model, task, projection=8, store=tmp_path / "c", progress=False).fit(relabelled).score(test)
    fresh = GradDot(model, task, projection=8, progress=False).fit(relabelled).score(test)
    np.testing.assert_allclose(cached.values, fresh.values, rtol=1e-6, atol=1e-9)
