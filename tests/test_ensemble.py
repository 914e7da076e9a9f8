"""Ensembles: dropout masks are fixed subnetworks (checked against torch.func on an explicitly masked copy), K identical
members equal one member, the average is the plain mean, LoRA gradients are torch.func's gradients of the adapters,
and the user's model is never changed."""

from __future__ import annotations

import copy
import gc
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from datacredit import ClassificationTask, DataError, GradDot, Influence, UnsupportedModuleError
from datacredit.data import ArrayDataset
from datacredit.ensembles import DropoutEnsemble, IndependentEnsemble, LoRAEnsemble, dropout_mask
from datacredit.methods.tracin import TracIn
from datacredit.methods.trak import TRAK
from datacredit.models import mlp
from datacredit.training import train_classifier
from datacredit.trajectory import Trajectory

from .helpers import TOL, flat, torch_func_grads

TASK = ClassificationTask()


class FixedMask(nn.Module):
    """The obviously-correct twin of a member's mask: ``x * mask`` as a module in place of the dropout layer."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def graddot(model, member=0, *, progress=False, **kw):
    """A factory of the one shape ``(model, member) -> method`` (the member index unused)."""
    return GradDot(model, TASK, progress=progress, **kw)


def reference_scores(model, train, test):
    """``⟨∇ℓ_i, ∇ℓ_q⟩`` over the trainable parameters from torch.func, ``(n_train, n_query)``."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    g_train = flat(torch_func_grads(model, TASK, train.tensors), names)
    g_test = flat(torch_func_grads(model, TASK, test.tensors, measurement=True), names)
    return (g_train @ g_test.T).numpy()


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()}, model.training)


def assert_unchanged(model, snap):
    state, flags, training = snap
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert model.training == training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x, y = torch.randn(36, 6, dtype=torch.float64), torch.randint(0, 3, (36,))
    train = ArrayDataset(x[:30], y[:30], ids=np.arange(100, 130))
    test = ArrayDataset(x[30:], y[30:], ids=np.arange(6))
    model = train_classifier(mlp(6, 8, 3, dropout=0.3).double(), train, epochs=10)
    return model, train, test


# -- masks ---------------------------------------------------------------------------------------------------------
def test_dropout_masks_are_deterministic_per_seed_and_member():
    a = dropout_mask(256, 0.5, seed=3, member=1, path="2")
    assert torch.equal(a, dropout_mask(256, 0.5, seed=3, member=1, path="2"))
    assert set(a.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - p)
    assert 0.35 < (a > 0).double().mean() < 0.65
    for other in (dropout_mask(256, 0.5, 3, 2, "2"), dropout_mask(256, 0.5, 4, 1, "2"),
                  dropout_mask(256, 0.5, 3, 1, "5")):
        assert not torch.equal(a, other)
    assert torch.equal(dropout_mask(16, 0.0, 0, 0, "x"), torch.ones(16, dtype=torch.float64))
    with pytest.raises(ValueError, match="probability"):
        dropout_mask(4, 1.0, 0, 0, "x")


def test_dropout_member_is_the_fixed_subnetwork(setup):
    """Member j's scores are exact Grad-Dot scores of the model with its mask in place of the dropout layer."""
    model, train, test = setup
    snap = snapshot(model)
    ens = DropoutEnsemble(model, graddot, k=2, seed=7)
    scores = ens.fit(train).score(test)
    assert_unchanged(model, snap)
    masks = [ens.masks(j)["2"] for j in range(2)]
    assert not torch.equal(masks[0], masks[1])
    refs = []
    for j in range(2):
        twin = copy.deepcopy(model)
        twin[2] = FixedMask(masks[j])
        refs.append(reference_scores(twin, train, test))
        np.testing.assert_allclose(ens.member_scores[j].values, refs[j], **TOL)
    np.testing.assert_allclose(scores.values, (refs[0] + refs[1]) / 2, **TOL)
    again = DropoutEnsemble(model, graddot, k=2, seed=7)
    np.testing.assert_array_equal(again.fit(train).score(test).values, scores.values)
    other = DropoutEnsemble(model, graddot, k=1, seed=8)
    other.fit(train).score(test)
    assert not torch.equal(other.masks(0)["2"], masks[0])


def test_injected_masks_on_a_model_without_dropout(setup):
    _, train, test = setup
    torch.manual_seed(1)
    model = train_classifier(mlp(6, 8, 3).double(), train, epochs=5)
    snap = snapshot(model)
    ens = DropoutEnsemble(model, graddot, k=1, p=0.4, modules=["1"], seed=0)  # the ReLU's output
    scores = ens.fit(train).score(test)
    twin = nn.Sequential(*copy.deepcopy(list(model)[:2]), FixedMask(ens.masks(0)["1"]), copy.deepcopy(model[2]))
    ref = reference_scores(twin, train, test)
    np.testing.assert_allclose(scores.values, ref, **TOL)
    assert_unchanged(model, snap)
    with pytest.raises(UnsupportedModuleError, match="no nn.Dropout"):
        DropoutEnsemble(model, graddot, k=2)
    with pytest.raises(UnsupportedModuleError, match="own trainable parameters"):
        DropoutEnsemble(model, graddot, k=2, p=0.1, modules=["0"])
    with pytest.raises(ValueError, match="pass p="):
        DropoutEnsemble(model, graddot, k=2, modules=["1"])


# -- K identical members equal one member ----------------------------------------------------------------------------
FACTORIES = {
    "grad-dot": lambda m, _: GradDot(m, TASK),
    "grad-dot-projected": lambda m, _: GradDot(m, TASK, projection=16),
    "influence-kfac": lambda m, _: Influence(m, TASK, curvature="kfac"),
    "trak": lambda m, _: TRAK(m, ClassificationTask(measurement="margin"), projection=24),
    "tracin": lambda m, _: TracIn(m, TASK, Trajectory.from_states([m]), weighting="uniform"),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("share", [False, True])
def test_dropout_with_p0_equals_one_member(setup, name, share):
    model, train, test = setup
    snap = snapshot(model)
    single = FACTORIES[name](model, 0).fit(train).score(test)
    ens = DropoutEnsemble(model, FACTORIES[name], k=3, p=0.0, share_train_cache=share)
    scores = ens.fit(train).score(test)
    np.testing.assert_allclose(scores.values, single.values, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(scores.train_ids, single.train_ids)
    self_single = FACTORIES[name](model, 0).fit(train).self_scores().values
    np.testing.assert_allclose(ens.self_scores().values, self_single, rtol=1e-9, atol=1e-12)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("name", ["trak", "tracin", "influence-kfac"])
def test_masks_reach_methods_that_work_on_a_private_copy(setup, name):
    """TRAK and TracIn attribute with their own copy of the model: the masks must be on it, not on the user's."""
    model, train, test = setup
    ens = DropoutEnsemble(model, FACTORIES[name], k=1, p=0.5, seed=3)
    scores = ens.fit(train).score(test)
    twin = copy.deepcopy(model)
    twin[2] = FixedMask(ens.masks(0)["2"])
    expected = FACTORIES[name](twin, 0).fit(train).score(test)
    np.testing.assert_allclose(scores.values, expected.values, rtol=1e-9, atol=1e-12)
    assert not np.allclose(scores.values, FACTORIES[name](model, 0).fit(train).score(test).values)


def test_independent_ensemble_of_identical_models_equals_one_member(setup):
    model, train, test = setup
    snap = snapshot(model)
    single = graddot(model).fit(train).score(test)
    scores = IndependentEnsemble(graddot, models=[model] * 3).fit(train).score(test)
    np.testing.assert_allclose(scores.values, single.values, rtol=1e-12, atol=0)
    assert_unchanged(model, snap)


def test_average_is_the_plain_mean_of_member_scores(setup):
    _, train, test = setup

    def recipe(seed):
        torch.manual_seed(seed)
        return train_classifier(mlp(6, 8, 3).double(), train, epochs=3, seed=seed)

    ens = IndependentEnsemble(graddot, train_fn=recipe, k=3, seed=10)
    scores = ens.fit(train).score(test)
    assert ens.seeds == [10, 11, 12]
    members = [graddot(recipe(s)).fit(train).score(test).values for s in (10, 11, 12)]
    np.testing.assert_allclose(scores.values, sum(members) / 3, **TOL)
    assert not np.allclose(members[0], members[1])
    np.testing.assert_allclose(ens.first(2).values, (members[0] + members[1]) / 2, **TOL)
    # the costs sit next to the scores, the first k members' costs in first(k)
    cost = scores.config["cost"]
    assert scores.config["k"] == 3 and scores.config["ensemble"] == "independent"
    assert len(cost["member_training"]) == 3 and all(t > 0 for t in cost["member_training"])
    assert cost["training_seconds"] == pytest.approx(ens.training_seconds)
    n_weights = sum(p.numel() for p in recipe(0).parameters()) * 8
    assert cost["member_weight_bytes"] == [n_weights] * 3 and cost["member_cache_bytes"] == [30 * 8] * 3  # train ids
    assert ens.stored_bytes == cost["stored_bytes"] == 3 * (n_weights + 30 * 8)
    assert ens.first(2).config["cost"]["member_training"] == cost["member_training"][:2]
    assert ens.serving_seconds == pytest.approx(sum(cost["member_fit"]) + sum(cost["member_score"]))


def test_fit_without_keep_holds_one_member_at_a_time_and_scores_the_same(setup):
    model, train, test = setup
    kept = DropoutEnsemble(model, FACTORIES["trak"], k=3, seed=1)
    streamed = DropoutEnsemble(model, FACTORIES["trak"], k=3, seed=1)
    expected = kept.fit(train).score(test)
    built, alive = [], []  # weak references to the members built so far; how many were alive at each build

    def counted(m, j):
        gc.collect()
        alive.append(sum(ref() is not None for ref in built))
        method = FACTORIES["trak"](m, j)
        built.append(weakref.ref(method))
        return method

    streamed = DropoutEnsemble(model, counted, k=3, seed=1)
    scores = streamed.fit(train, keep=False).score(test)
    np.testing.assert_allclose(scores.values, expected.values, rtol=1e-12, atol=0)
    assert streamed.methods == [] and len(streamed.member_scores) == 3
    assert alive == [0, 0, 0]  # each earlier member was dropped before the next was built
    for key in ("member_weight_bytes", "member_cache_bytes", "shared_weight_bytes"):
        assert scores.config["cost"][key] == expected.config["cost"][key]
    assert min(scores.config["cost"]["member_cache_bytes"]) > 30 * 24 * 4  # TRAK's features and kernel
    assert all(t > 0 for t in scores.config["cost"]["member_fit"])  # fitted inside score
    np.testing.assert_allclose(streamed.self_scores().values, kept.self_scores().values, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="fit"):
        DropoutEnsemble(model, counted, k=1).self_scores()


def test_average_of_trak_members_is_traks_per_model_estimator(setup):
    _, train, test = setup
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(train_classifier(mlp(6, 8, 3).double(), train, epochs=3, seed=seed))
    margin = ClassificationTask(measurement="margin")
    ens = IndependentEnsemble(lambda m, j: TRAK(m, margin, projection=24, seed=j), models=models)
    trak = TRAK(models[0], margin, models=models, projection=24, average="per-model")
    np.testing.assert_allclose(ens.fit(train).score(test).values, trak.fit(train).score(test).values,
                               rtol=1e-9, atol=1e-12)


# -- sharing the train-side cache ----------------------------------------------------------------------------------
def test_shared_cache_masks_only_the_query_side_of_projected_grad_dot(setup):
    model, train, test = setup
    ens = DropoutEnsemble(model, lambda m, _: graddot(m, projection=16), k=3, seed=2, share_train_cache=True)
    scores = ens.fit(train).score(test)
    phi_train = graddot(model, projection=16).fit(train).train_features.astype(np.float64)
    refs = []
    for j in range(3):
        twin = copy.deepcopy(model)
        twin[2] = FixedMask(ens.masks(j)["2"])
        phi_q = graddot(twin, projection=16)._features(test)[1].astype(np.float64)  # loss = measurement here
        refs.append(phi_train @ phi_q.T)
    np.testing.assert_allclose(scores.values, sum(refs) / 3, rtol=1e-6, atol=1e-9)
    cost = scores.config["cost"]
    assert cost["shared_fit"] > 0 and cost["member_fit"] == [0.0] * 3
    assert cost["shared_weight_bytes"] == sum(p.numel() * 8 for p in model.parameters())
    features = ens.methods[0].train_features
    assert features.shape[0] == 30 and cost["shared_cache_bytes"] == features.nbytes + 30 * 8  # the one cache + ids
    assert cost["member_weight_bytes"] == [8, 8, 8]  # a mask per member: 8 hidden units, a byte each
    assert cost["member_cache_bytes"] == [0, 0, 0]
    exact = [DropoutEnsemble(model, graddot, k=2, seed=2, share_train_cache=s).fit(train).score(test).values
             for s in (False, True)]
    np.testing.assert_allclose(exact[0], exact[1], **TOL)  # exact Grad-Dot caches nothing: sharing is a no-op


# -- LoRA ---------------------------------------------------------------------------------------------------------
def test_lora_gradients_are_torch_func_gradients_of_the_adapters(setup):
    pytest.importorskip("peft")
    model, train, test = setup
    snap = snapshot(model)
    ens = LoRAEnsemble(model, graddot, k=2, rank=2, seed=5, epochs=2, lr=0.1)
    scores = ens.fit(train).score(test)
    assert_unchanged(model, snap)
    refs = []
    for j in range(2):
        inner = ens.peft_models[j].get_base_model()
        tracked = [n for n, p in inner.named_parameters() if p.requires_grad]
        assert tracked and all(".lora_A." in n or ".lora_B." in n for n in tracked)
        assert sorted(ens.methods[j].modules or []) in ([], sorted({n.rsplit(".", 1)[0] for n in tracked}))
        refs.append(reference_scores(inner, train, test))
        np.testing.assert_allclose(ens.member_scores[j].values, refs[j], **TOL)
        assert all("lora_" in k for k in ens.adapter_state_dict(j))
    assert not np.allclose(refs[0], refs[1])  # other seeds: other adapter init and data order
    np.testing.assert_allclose(scores.values, (refs[0] + refs[1]) / 2, **TOL)
    # the members share one frozen copy of the base, and store only their adapters
    a, b = (dict(m.get_base_model().named_parameters()) for m in ens.peft_models)
    assert a["0.base_layer.weight"] is b["0.base_layer.weight"] and a["0.base_layer.weight"] is not model[0].weight
    cost = scores.config["cost"]
    n_base = sum(p.numel() for p in model.parameters()) * 8
    n_adapter = 2 * (6 + 8) * 8 + 2 * (8 + 3) * 8  # rank 2 on Linear(6, 8) and Linear(8, 3), float64
    assert cost["shared_weight_bytes"] == n_base
    assert cost["member_weight_bytes"] == [n_adapter] * 2 and cost["member_cache_bytes"] == [30 * 8] * 2
    assert len(cost["member_training"]) == 2 and all(t > 0 for t in cost["member_training"])
    # members are a function of their seed (the model's dropout during fine-tuning included), not of global RNG state
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    again = LoRAEnsemble(model, graddot, k=1, rank=2, seed=6, epochs=2, lr=0.1).fit(train)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    for name, value in again.adapter_state_dict(0).items():
        torch.testing.assert_close(value, ens.adapter_state_dict(1)[name], rtol=0, atol=0)
    # another method on the same members: nothing is retrained
    cos = ens.with_method(lambda m, _: graddot(m, normalize=True))
    values = cos.fit(train).score(test).values
    assert cos.peft_models is ens.peft_models and cos.cost.member_training == cost["member_training"]
    assert np.abs(values).max() <= 1 + 1e-9


# -- errors -------------------------------------------------------------------------------------------------------
def test_bad_use_raises_clear_errors(setup, tmp_path):
    model, train, test = setup
    with pytest.raises(RuntimeError, match="fit"):
        DropoutEnsemble(model, graddot, k=2).score(test)
    # one factory shape, (model, member) -> method: a class or a one-argument callable is refused, saying so
    with pytest.raises(TypeError, match=r"\(model, member\) -> method.*not the class GradDot"):
        DropoutEnsemble(model, GradDot, k=2)
    with pytest.raises(TypeError, match=r"\(model, member\) -> method.*cannot be called with \(model, member\)"):
        DropoutEnsemble(model, lambda m: graddot(m), k=2)
    with pytest.raises(TypeError, match=r"\(model, member\) -> method"):
        IndependentEnsemble(graddot, models=[model]).with_method(lambda m: m)
    with pytest.raises(TypeError, match=r"\(model, member\) -> method.*, got int"):
        IndependentEnsemble(3, models=[model])
    members = []
    DropoutEnsemble(model, lambda m, j: members.append(j) or graddot(m), k=3, p=0.0).fit(train)
    assert members == [0, 1, 2]
    store = str(tmp_path / "s")
    with pytest.raises(DataError, match="same store"):
        DropoutEnsemble(model, lambda m, _: graddot(m, projection=8, store=store), k=2).fit(train)
    with pytest.raises(DataError, match="store"):
        DropoutEnsemble(model, lambda m, _: graddot(m, store=store), k=2, share_train_cache=True).fit(train)
    with pytest.raises(ValueError, match="either models"):
        IndependentEnsemble(graddot)
    with pytest.raises(ValueError, match="k >= 1"):
        DropoutEnsemble(model, graddot, k=0)
