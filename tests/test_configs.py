"""Every method takes one frozen config: the keyword form builds the same object, both at once is a TypeError naming
the keyword, values are checked in the config (ValueError naming the field), and the config is what Scores keep."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict

import numpy as np
import pytest
import torch

import datacredit
from datacredit import (
    TRAK,
    ClassificationTask,
    GradDot,
    GradDotConfig,
    Influence,
    InfluenceConfig,
    InRunConfig,
    InRunShapley,
    Scores,
    Source,
    SourceConfig,
    StoreError,
    TracIn,
    TracInConfig,
    TRAKConfig,
)
from datacredit.curvature import Damping
from datacredit.data import ArrayDataset
from datacredit.models import mlp
from datacredit.trajectory import Trajectory

TASK = ClassificationTask()
MARGIN = ClassificationTask(measurement="margin")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x, y = torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 3, (24,))
    train = ArrayDataset(x[:20], y[:20], ids=np.arange(20))
    test = ArrayDataset(x[20:], y[20:], ids=np.arange(4))
    return mlp(5, 6, 3).double(), train, test


def builders(model):
    """(config class, settings, build(config=..., **settings))."""
    traj = Trajectory.from_states([model] * 3, lrs=[0.1] * 3, steps=[2] * 3)
    return [
        (GradDotConfig, {"normalize": True, "projection": 8, "seed": 3},
         lambda **kw: GradDot(model, TASK, progress=False, **kw)),
        (InfluenceConfig, {"curvature": "kfac", "damping": 0.01, "query_batch": 2},
         lambda **kw: Influence(model, TASK, progress=False, **kw)),
        (TracInConfig, {"projection": 8, "weighting": "uniform"},
         lambda **kw: TracIn(model, TASK, traj, progress=False, **kw)),
        (TRAKConfig, {"projection": 8, "ridge": 1e-3, "average": "per-model"},
         lambda **kw: TRAK(model, MARGIN, progress=False, **kw)),
        (SourceConfig, {"segments": 3, "curvature": "kfac", "time": "discrete"},
         lambda **kw: Source(model, TASK, traj, progress=False, **kw)),
    ]


@pytest.mark.parametrize("index", range(5))
def test_keyword_and_config_forms_are_one_object(setup, index):
    model, train, test = setup
    cls, settings, build = builders(model)[index]
    config = cls(**settings)
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]  # every config has a field; seed or another
    by_keyword, by_config = build(**settings), build(config=config)
    assert by_keyword.config == config and by_config.config is config
    a, b = by_keyword.fit(train).score(test), by_config.fit(train).score(test)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.config == b.config
    for key, value in asdict(config).items():  # the config is what the scores keep (Source: segments per stage)
        if key != "segments":
            assert a.config[key] == value
    name = next(iter(settings))
    with pytest.raises(TypeError, match=name):
        build(config=config, **{name: settings[name]})
    with pytest.raises(TypeError, match="no_such_setting"):
        build(no_such_setting=1)
    with pytest.raises(TypeError, match=cls.__name__):
        build(config=object())


@pytest.mark.parametrize(("cls", "field", "value"), [
    (GradDotConfig, "projection", 0), (GradDotConfig, "projection_kind", "fourier"),
    (InfluenceConfig, "curvature", "nope"), (InfluenceConfig, "fisher", "fake"), (InfluenceConfig, "query_batch", 0),
    (TracInConfig, "weighting", "cosine"), (TracInConfig, "projection_kind", "fourier"),
    (TRAKConfig, "ridge", -1.0), (TRAKConfig, "average", "median"),
    (SourceConfig, "time", "later"), (SourceConfig, "segments", 0), (SourceConfig, "curvature", "nope"),
    (InRunConfig, "order", 3), (InRunConfig, "unexplained_gradient", "ignore"),
    (InRunConfig, "validation_batch_size", 0),
])
def test_values_are_checked_in_the_config(cls, field, value):
    with pytest.raises(ValueError, match=field if field != "curvature" else "curvature"):
        cls(**{field: value})


def test_influence_config_takes_a_float_damping_as_absolute():
    assert InfluenceConfig(damping=0.5).damping == Damping(0.5)


def test_inrun_takes_a_config(setup):
    model, train, _ = setup
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the model is unchanged for the other tests
    config = InRunConfig(order=1, keep_history=True, seed=4)
    x, y = train.tensors
    runs = []
    for kw in ({"config": config}, asdict(config)):
        shapley = InRunShapley(model, TASK, (x[:4], y[:4]), opt, **kw)
        assert shapley.config == config and shapley.keep_history
        with shapley.step(np.arange(8)):
            TASK.loss(model, (x[4:12], y[4:12])).sum().backward()
        opt.step()
        opt.zero_grad()
        runs.append(shapley.values())
        shapley.close()
    np.testing.assert_array_equal(runs[0].values, runs[1].values)
    assert runs[0].config == {**asdict(config), "steps": 1, "optimizer": "SGD"}
    with pytest.raises(TypeError, match="order"):
        InRunShapley(model, TASK, (x[:4], y[:4]), opt, config=config, order=2)


def test_every_config_is_public():
    for name in ("GradDotConfig", "InfluenceConfig", "TracInConfig", "TRAKConfig", "SourceConfig", "InRunConfig"):
        assert name in datacredit.__all__ and name in datacredit.methods.__all__


# -- ensembles ----------------------------------------------------------------------------------------------------
def test_ensembles_take_one_config(setup):
    from datacredit.ensembles import (
        DropoutConfig,
        DropoutEnsemble,
        IndependentConfig,
        IndependentEnsemble,
        LoRAConfig,
        LoRAEnsemble,
    )

    model, train, test = setup
    factory = lambda m, _: GradDot(m, TASK, progress=False)  # noqa: E731
    config = DropoutConfig(k=2, p=0.2, seed=5, modules=["1"])
    assert config.modules == ("1",)  # sequences are kept as tuples: the config cannot change
    by_config = DropoutEnsemble(model, factory, config=config).fit(train).score(test)
    by_keyword = DropoutEnsemble(model, factory, 2, p=0.2, seed=5, modules=["1"]).fit(train).score(test)
    np.testing.assert_array_equal(by_config.values, by_keyword.values)
    assert by_config.config["p"] == 0.2 and by_config.config["modules"] == ["1"] and by_config.config["k"] == 2
    with pytest.raises(TypeError, match="seed"):
        DropoutEnsemble(model, factory, config=config, seed=1)
    with pytest.raises(TypeError, match="k"):
        DropoutEnsemble(model, factory, 2, config=config)
    with pytest.raises(ValueError, match="p: the dropout probability"):
        DropoutConfig(k=2, p=1.0)

    ind = IndependentEnsemble(factory, models=[model, model], config=IndependentConfig(k=2))
    assert ind.config == IndependentConfig(k=2) and ind.k == 2
    seeded = IndependentEnsemble(factory, train_fn=lambda s: model, seeds=[3, 4])
    assert seeded.config == IndependentConfig(seeds=(3, 4)) and seeded.seeds == [3, 4]
    with pytest.raises(ValueError, match="seeds"):
        IndependentConfig(k=3, seeds=(1, 2))
    with pytest.raises(ValueError, match="k >= 1"):
        IndependentConfig(k=0)

    lora = LoRAConfig(k=2, rank=2, target_modules=["0"], epochs=1)
    ens = LoRAEnsemble(model, factory, config=lora)
    assert ens.config is lora and ens.rank == 2 and ens.target_modules == ["0"] and ens.finetune["epochs"] == 1
    assert LoRAEnsemble(model, factory, 2, rank=2, target_modules=["0"], epochs=1).config == lora
    with pytest.raises(TypeError, match="rank"):
        LoRAEnsemble(model, factory, config=lora, rank=3)
    for field, value in (("rank", 0), ("lora_dropout", 1.0), ("batch_size", 0)):
        with pytest.raises(ValueError, match=field):
            LoRAConfig(k=1, **{field: value})


# -- evaluations ---------------------------------------------------------------------------------------------------
def _regression(n=24, n_query=5):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n + n_query, 3, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + torch.randn(n + n_query, generator=gen,
                                                                                dtype=torch.float64)
    return ArrayDataset(x[:n], y[:n], ids=np.arange(100, 100 + n)), ArrayDataset(x[n:], y[n:])


def test_evaluations_take_one_config_and_one_execution(tmp_path):
    from datacredit.evaluate import (
        Execution,
        LeastSquaresRecipe,
        RemovalConfig,
        SelectionConfig,
        SubsetConfig,
        build_groundtruth,
        removal,
        selection,
    )

    train, queries = _regression()
    recipe, serial = LeastSquaresRecipe(ridge=0.1), Execution(backend="serial", progress=False)
    config = SubsetConfig(m=4, alpha=0.5, seed=3)
    by_config = build_groundtruth(recipe, train, queries, tmp_path / "a", config, execution=serial)
    by_keyword = build_groundtruth(recipe, train, queries, tmp_path / "b", m=4, alpha=0.5, seed=3, backend="serial",
                                   progress=False)
    np.testing.assert_array_equal(by_config.outputs["loss"], by_keyword.outputs["loss"])
    assert by_config.config == by_keyword.config and by_config.config["m"] == 4 and by_config.config["seed"] == 3
    with pytest.raises(TypeError, match="'m'"):
        build_groundtruth(recipe, train, queries, tmp_path / "c", config, execution=serial, m=5)
    with pytest.raises(TypeError, match="workers"):
        build_groundtruth(recipe, train, queries, tmp_path / "c", config, execution=serial, workers=2)
    with pytest.raises(TypeError, match="nope"):
        build_groundtruth(recipe, train, queries, tmp_path / "c", nope=1)
    with pytest.raises(TypeError, match="SubsetConfig"):
        build_groundtruth(recipe, train, queries, tmp_path / "c", SelectionConfig())

    scores = Scores(np.random.default_rng(0).normal(size=(24, 5)), train.ids, queries.ids, "noise")
    removed = removal(scores, recipe, train, queries, RemovalConfig(k=3, n_queries=2, seed=1), execution=serial)
    again = removal(scores, recipe, train, queries, k=3, n_queries=2, seed=1, backend="serial", progress=False)
    np.testing.assert_array_equal(removed.top_effect, again.top_effect)
    assert removed.config == again.config == RemovalConfig(k=3, n_queries=2, seed=1) and removed.k == 3
    picked = selection(np.arange(24.0), recipe, train, queries, SelectionConfig(fraction=0.25), execution=serial)
    assert picked.config == SelectionConfig(fraction=0.25) and picked.n_selected == 6


@pytest.mark.parametrize(("cls", "field", "value"), [
    ("Execution", "workers", 0), ("Execution", "backend", "slurm"), ("SubsetConfig", "m", 2),
    ("SubsetConfig", "alpha", 1.0), ("SubsetConfig", "seeds", 0), ("LOOConfig", "indices", [1, 1]),
    ("RemovalConfig", "k", 0), ("RemovalConfig", "n_queries", 0), ("RemovalConfig", "measure", "banana"),
    ("SelectionConfig", "fraction", 0.0),
])
def test_evaluation_values_are_checked_in_the_config(cls, field, value):
    import datacredit.evaluate as evaluate

    with pytest.raises(ValueError, match=field):
        getattr(evaluate, cls)(**{field: value})


def test_the_manifest_keeps_the_config_and_every_execution(tmp_path):
    from datacredit.evaluate import Execution, LeastSquaresRecipe, LOOConfig, SubsetConfig, build_groundtruth, build_loo
    from datacredit.store import Store

    train, queries = _regression()
    recipe, out = LeastSquaresRecipe(), tmp_path / "gt"
    build_groundtruth(recipe, train, queries, out, SubsetConfig(m=3, seeds=2), execution=Execution(
        backend="serial", progress=False))
    meta = Store(out).info("outputs")["meta"]
    assert {k: meta[k] for k in ("m", "alpha", "seeds", "seed")} == asdict(SubsetConfig(m=3, seeds=2))
    # a resume under another Execution is the same build (nothing left to run); the call is recorded
    again = build_groundtruth(recipe, train, queries, out, SubsetConfig(m=3, seeds=2),
                              execution=Execution(workers=2, progress=False))
    calls = Store(out).load_json("execution")
    assert [c["backend"] for c in calls] == ["serial", "process"] and [c["jobs_to_run"] for c in calls] == [6, 0]
    assert calls[1]["workers"] == 2 and again.m == 3
    # a store written before the execution record existed (same manifest keys) resumes without retraining
    Store(out).remove("execution")
    build_groundtruth(recipe, train, queries, out, m=3, seeds=2, backend="serial", progress=False)
    assert [c["jobs_to_run"] for c in Store(out).load_json("execution")] == [0]
    # another config is refused, naming the field
    with pytest.raises(StoreError, match=r"alpha: stored 0\.5, requested 0\.25"):
        build_groundtruth(recipe, train, queries, out, SubsetConfig(m=3, seeds=2, alpha=0.25), progress=False)
    with pytest.raises(StoreError, match=r"seeds: stored 2, requested 1"):
        build_groundtruth(recipe, train, queries, out, m=3, progress=False)
    loo = build_loo(recipe, train, queries, tmp_path / "loo", LOOConfig(indices=(0, 5)), backend="serial",
                    progress=False)
    assert loo.config["n_removed"] == 2 and "indices" not in loo.config
    np.testing.assert_array_equal(loo.removed_ids, train.ids[[0, 5]])
    with pytest.raises(StoreError, match=r"seed: stored 0, requested 1"):
        build_loo(recipe, train, queries, tmp_path / "loo", LOOConfig(indices=(0, 5), seed=1), progress=False)
