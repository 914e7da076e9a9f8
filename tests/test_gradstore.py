"""Kronecker projection and the on-disk gradient store, against torch.func per-example gradients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from datacredit.capture import Capture, ExampleGrads, Outer, example_grads
from datacredit.capture.kronecker import KronProjection
from datacredit.capture.projection import Projector
from datacredit.dataset import ArrayDataset
from datacredit.errors import NonFiniteError, StoreError
from datacredit.gradstore import DenseProjection, ExactFeatures, GradientStore
from datacredit.models import TinyGPT, mlp
from datacredit.store import Store
from datacredit.task import ClassificationTask, LanguageModelingTask

from .helpers import torch_func_grads

ROOT = Path(__file__).resolve().parents[1]
EXACT = {"rtol": 1e-10, "atol": 1e-12}


def _mlp_setup(dtype=torch.float64, n=12, seed=0):
    torch.manual_seed(seed)
    model = mlp(6, [8], 3).to(dtype)
    x = torch.randn(n, 6, dtype=dtype)
    y = torch.randint(0, 3, (n,))
    return model, ClassificationTask(), ArrayDataset(x, y)


def _gpt_setup(dtype=torch.float64, n=10, seed=0):
    torch.manual_seed(seed)
    model = TinyGPT(vocab=11, d=8, n_layers=1, n_heads=2, max_len=16).to(dtype)
    return model, LanguageModelingTask(), ArrayDataset(torch.randint(0, 11, (n, 9)))


def _explicit(proj: KronProjection, model, task, data: ArrayDataset, shapes, measurement=False) -> torch.Tensor:
    """Features by the slow route: torch.func per-example gradients times each block's explicit Kronecker matrix."""
    grads = torch_func_grads(model, task, data.tensors, measurement)
    n = len(data)
    return torch.cat([grads[b.name].reshape(n, -1) @ proj.matrix(b) for b in proj.layout(shapes)], dim=1)


def _shapes(model):
    return {k: p.shape for k, p in model.named_parameters()}


# -- Kronecker projection --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", [_mlp_setup, _gpt_setup])
def test_kronecker_projection_equals_explicit_kronecker_matrix(setup):
    """φ(G_i) from the factors equals vec(G_i) @ (P_u ⊗ P_v) with G_i from torch.func (biases, embeddings with tied
    output layer, LayerNorm dense pieces and T > 1 all included)."""
    model, task, data = setup()
    proj = KronProjection(3, seed=5)
    with Capture(model) as cap:
        grads = example_grads(cap, task.loss(model, data.tensors))
    fast = proj.project(grads, _shapes(model))
    torch.testing.assert_close(fast, _explicit(proj, model, task, data, _shapes(model)), **EXACT)
    assert fast.shape[1] == proj.out_dim(_shapes(model))


def test_kronecker_sides_kept_exactly_when_narrow_and_seeds_differ():
    model, task, data = _mlp_setup()
    shapes = _shapes(model)
    wide = KronProjection(100)  # every side narrower than k: the identity, i.e. the exact gradient
    with Capture(model) as cap:
        grads = example_grads(cap, task.loss(model, data.tensors))
    torch.testing.assert_close(wide.project(grads, shapes), grads.flat(), **EXACT)
    a, b = KronProjection(3, seed=1).project(grads, shapes), KronProjection(3, seed=2).project(grads, shapes)
    assert not torch.allclose(a, b)
    assert torch.equal(a, KronProjection(3, seed=1).project(grads, shapes))
    small = KronProjection(3, exact_numel=8)  # biases (8 and 3 entries) kept exactly
    assert [blk.exact for blk in small.layout(shapes)] == [False, True, False, True]


def test_kronecker_matrices_on_gradient_dtype_and_generated_once():
    proj = KronProjection(4, seed=0)
    a = proj.side("w", "u", 10, 4, "cpu", torch.float32)
    assert a.dtype == torch.float32 and a is proj.side("w", "u", 10, 4, "cpu", torch.float32)
    torch.testing.assert_close(a.double(), proj.side("w", "u", 10, 4), atol=1e-6, rtol=1e-6)


def test_kronecker_jl_preserves_norms_and_inner_products_in_expectation():
    """E‖φ(G)‖² = ‖G‖², E⟨φ(G), φ(H)⟩ = ⟨G, H⟩ over seeds (within 4 standard errors), and the spread shrinks with k."""
    gen = torch.Generator().manual_seed(0)
    m, n, t = 24, 20, 5
    u = torch.randn(2, t, m, generator=gen, dtype=torch.float64)
    v = torch.randn(2, t, n, generator=gen, dtype=torch.float64)
    grads = ExampleGrads({"w": [Outer(u, v, m, n)]}, {"w": torch.Size([m, n])}, 2)
    g = grads.flat()
    norm2, inner = float(g[0] @ g[0]), float(g[0] @ g[1])
    spread = {}
    for k in (4, 12):
        z = torch.stack([KronProjection(k, seed=s).project(grads) for s in range(300)])  # (seeds, 2, k·k)
        ratio = (z[:, 0] ** 2).sum(1) / norm2
        cross = (z[:, 0] * z[:, 1]).sum(1)
        assert abs(ratio.mean() - 1) < 4 * ratio.std() / len(ratio) ** 0.5
        assert abs(cross.mean() - inner) < 4 * cross.std() / len(cross) ** 0.5
        spread[k] = float(ratio.std())
    assert spread[12] < spread[4]


# -- the store: exactness ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", [_mlp_setup, _gpt_setup])
def test_store_scores_equal_explicit_projected_grad_dot(tmp_path, setup, float64):
    model, task, data = setup()
    queries = setup(n=4, seed=1)[2]
    proj = KronProjection(3, seed=2)
    gs = GradientStore(tmp_path / "gs", model, task, projection=proj, dtype="float64", batch_size=4, chunk_size=4)
    gs.build(data)
    scores = gs.score(queries)
    shapes = _shapes(model)
    want = _explicit(proj, model, task, data, shapes) @ _explicit(proj, model, task, queries, shapes, True).T
    np.testing.assert_allclose(scores.values, want.numpy(), **EXACT)
    assert scores.values.shape == (len(data), len(queries))
    np.testing.assert_array_equal(scores.train_ids, data.ids)
    header = gs.header()
    assert header["config"]["projection"]["seed"] == 2 and header["config"]["storage_dtype"] == "<f8"
    assert [b["name"] for b in header["config"]["layout"]] == list(shapes)


def test_exact_store_equals_torch_func_grad_dot(tmp_path, float64):
    model, task, data = _gpt_setup()
    queries = _gpt_setup(n=3, seed=1)[2]
    gs = GradientStore.exact(tmp_path / "gs", model, task, dtype="float64", batch_size=4).build(data)
    names = list(_shapes(model))
    g = torch.cat([v.reshape(len(data), -1) for v in _ordered(torch_func_grads(model, task, data.tensors), names)], 1)
    q = torch.cat([v.reshape(3, -1) for v in _ordered(torch_func_grads(model, task, queries.tensors, True), names)], 1)
    np.testing.assert_allclose(gs.score(queries).values, (g @ q.T).numpy(), **EXACT)
    np.testing.assert_allclose(gs.self_scores().values[:, 0], (g * g).sum(1).numpy(), **EXACT)


def _ordered(grads, names):
    return [grads[k] for k in names]


def test_dense_projection_store_matches_projector(tmp_path, float64):
    model, task, data = _mlp_setup()
    gs = GradientStore(tmp_path / "gs", model, task, projection=DenseProjection(16, seed=3), dtype="float64")
    gs.build(data)
    with Capture(model) as cap:
        grads = example_grads(cap, task.loss(model, data.tensors))
    want = Projector(_shapes(model), 16, "gaussian", seed=3).project(grads)
    np.testing.assert_allclose(gs.features(), want.numpy(), **EXACT)


def test_preconditioner_per_layer_and_callable(tmp_path, float64):
    model, task, data = _mlp_setup()
    queries = _mlp_setup(n=3, seed=1)[2]
    gs = GradientStore(tmp_path / "gs", model, task, projection=KronProjection(3), dtype="float64").build(data)
    phi = torch.from_numpy(np.array(gs.features()))
    _, q = gs.featurize(queries)
    inv = gs.fisher_inverse(damping=0.1)
    want = torch.zeros(len(data), 3, dtype=torch.float64)
    for b in gs.blocks:
        x = phi[:, b.columns]
        fisher = x.T @ x / len(data)
        lam = 0.1 * torch.trace(fisher) / b.size
        want += x @ torch.linalg.solve(fisher + lam * torch.eye(b.size, dtype=torch.float64), q[:, b.columns].T)
    np.testing.assert_allclose(gs.score(queries, preconditioner=inv).values, want.numpy(), rtol=1e-8, atol=1e-10)
    doubled = gs.score(queries, preconditioner=lambda z: 2 * z).values
    np.testing.assert_allclose(doubled, 2 * gs.score(queries).values, **EXACT)


# -- topk, blocks, budget -------------------------------------------------------------------------------------------
def test_topk_equals_dense_topk_with_ties_and_small_blocks(tmp_path):
    model, task, data = _mlp_setup(torch.float32, n=30)
    # duplicate rows under new ids: identical features, so ties must keep training order as Scores.topk does
    x, y = data.tensors
    data = ArrayDataset(torch.cat([x, x[:10]]), torch.cat([y, y[:10]]), ids=np.arange(40) * 7 + 3)
    queries = _mlp_setup(torch.float32, n=5, seed=1)[2]
    gs = GradientStore(tmp_path / "gs", model, task, projection=KronProjection(3), batch_size=8).build(data)
    dense = gs.score(queries)
    tiny = 4e-6  # GB: a few training rows per block
    top = gs.topk(queries, 7, memory_gb=tiny)
    for j in range(len(queries)):
        assert top.for_query(j) == dense.topk(7, j)
    np.testing.assert_array_equal(gs.score(queries, memory_gb=tiny).values, dense.values)

    # ties across the k-th place inside one block: 20 copies of one example among 6 others
    many = ArrayDataset(torch.cat([x[:3], x[3:4].expand(20, -1), x[4:7]]),
                        torch.cat([y[:3], y[3:4].expand(20), y[4:7]]))
    gs = GradientStore(tmp_path / "ties", model, task, projection=KronProjection(3), batch_size=8).build(many)
    dense = gs.score(queries)
    assert (dense.values[3:23] == dense.values[3]).all()  # really tied
    for memory_gb in (tiny, 1.0):
        top = gs.topk(queries, 5, memory_gb=memory_gb)
        for j in range(len(queries)):
            assert top.for_query(j) == dense.topk(5, j)


def test_large_result_goes_to_a_memmap_and_budget_too_small_raises(tmp_path):
    model, task, data = _mlp_setup(torch.float32)
    queries = _mlp_setup(torch.float32, n=3, seed=1)[2]
    gs = GradientStore(tmp_path / "gs", model, task, projection=KronProjection(3)).build(data)
    in_ram = gs.score(queries)
    on_disk = gs.score(queries, out=tmp_path / "spill")
    assert isinstance(on_disk.values, np.memmap)
    np.testing.assert_array_equal(np.asarray(on_disk.values), in_ram.values)
    spilled = gs.score(queries, memory_gb=800 / 2**30)  # result + queries (432 bytes) > half the budget: spilled
    assert isinstance(spilled.values, np.memmap) and Store(gs.root, create=False).has("scores")
    np.testing.assert_array_equal(np.asarray(spilled.values), in_ram.values)
    with pytest.raises(ValueError, match="memory_gb"):
        gs.score(queries, memory_gb=1e-9)


@pytest.mark.parametrize(("dtype", "unit"), [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_half_precision_storage_within_rounding_bound(tmp_path, dtype, unit):
    """Rounding each stored feature to ``dtype`` moves a score by at most ``u·‖φ_i‖·‖φ_q‖`` (Cauchy-Schwarz on the
    per-element relative error ``u``), plus a tiny absolute term for float16 subnormals."""
    model, task, data = _gpt_setup(torch.float32)
    queries = _gpt_setup(torch.float32, n=4, seed=1)[2]
    full = GradientStore(tmp_path / "f32", model, task, projection=KronProjection(4)).build(data)
    half = GradientStore(tmp_path / dtype, model, task, projection=KronProjection(4), dtype=dtype).build(data)
    assert half.features().dtype == (np.float16 if dtype == "float16" else np.uint16)
    exact, approx = full.score(queries).values, half.score(queries).values
    norms_t = np.linalg.norm(np.asarray(full.features()), axis=1)
    _, q = full.featurize(queries)
    bound = unit * norms_t[:, None] * q.norm(dim=1).numpy()[None, :] * 1.01 + 1e-6
    assert (np.abs(approx - exact) <= bound).all()
    assert np.abs(approx - exact).max() > 0  # really stored in lower precision


# -- invalidation -----------------------------------------------------------------------------------------------------
def test_changed_model_data_or_config_refuses_or_refits(tmp_path):
    model, task, data = _mlp_setup(torch.float32)
    queries = _mlp_setup(torch.float32, n=3, seed=1)[2]
    path = tmp_path / "gs"
    GradientStore(path, model, task, projection=KronProjection(3)).build(data)

    other = _mlp_setup(torch.float32, seed=7)[0]
    with pytest.raises(StoreError, match="model"):
        GradientStore(path, other, task, projection=KronProjection(3)).build(data)
    with pytest.raises(StoreError, match="model"):
        GradientStore(path, other, task, projection=KronProjection(3)).score(queries)

    x, y = data.tensors
    changed = ArrayDataset(x.clone().index_fill_(0, torch.tensor([0]), 0.5), y)
    with pytest.raises(StoreError, match="data"):
        GradientStore(path, model, task, projection=KronProjection(3)).build(changed)
    with pytest.raises(StoreError, match="data"):
        GradientStore(path, model, task, projection=KronProjection(3)).build(ArrayDataset(x, y, ids=np.arange(12) + 1))
    for kwargs in ({"projection": KronProjection(3, seed=1)}, {"projection": KronProjection(4)},
                   {"projection": KronProjection(3), "dtype": "float16"},
                   {"projection": KronProjection(3, exact_numel=3)}):
        with pytest.raises(StoreError):
            GradientStore(path, model, task, **kwargs).build(data)
    # batch size and chunking group the rows; they change no feature, so the complete store is reused as it is
    same = GradientStore(path, model, task, projection=KronProjection(3), batch_size=5, chunk_size=7).build(data)
    assert same.batches_featurized == 0 and same.chunk_size == 1024
    np.testing.assert_array_equal(same.score(queries).values,
                                  GradientStore(path, model, task, projection=KronProjection(3)).score(queries).values)
    with pytest.raises(StoreError, match="task"):
        GradientStore(path, model, ClassificationTask("margin"), projection=KronProjection(3)).build(data)

    refit = GradientStore(path, other, task, projection=KronProjection(3), on_mismatch="refit").build(data)
    fresh = GradientStore(tmp_path / "fresh", other, task, projection=KronProjection(3)).build(data)
    np.testing.assert_array_equal(refit.score(queries).values, fresh.score(queries).values)


def test_ids_that_do_not_match_the_header_are_refused(tmp_path):
    model, task, data = _mlp_setup(torch.float32)
    gs = GradientStore(tmp_path / "gs", model, task).build(data)
    gs.store.save_array("train_ids", data.ids + 1)  # as a refit killed after writing the new ids would leave it
    with pytest.raises(StoreError, match="ids"):
        gs.score(_mlp_setup(torch.float32, n=2, seed=1)[2])


def test_rebuild_of_a_complete_store_featurizes_nothing(tmp_path):
    model, task, data = _mlp_setup(torch.float32)
    GradientStore(tmp_path / "gs", model, task, batch_size=4, chunk_size=4).build(data)
    again = GradientStore(tmp_path / "gs", model, task, batch_size=4, chunk_size=4).build(data)
    assert again.batches_featurized == 0


# -- resume after SIGKILL ---------------------------------------------------------------------------------------------
def resume_setup():
    """Shared by the test and its child process: same model, data and store settings in both."""
    torch.manual_seed(0)
    model = TinyGPT(vocab=11, d=8, n_layers=1, n_heads=2, max_len=16)
    data = ArrayDataset(torch.randint(0, 11, (48, 9)))
    return model, LanguageModelingTask(), data, {"projection": KronProjection(3), "batch_size": 4, "chunk_size": 8}


CHILD = """
import sys, time, torch
torch.set_num_threads(1)
from tests.test_gradstore import resume_setup
from datacredit.gradstore import GradientStore
model, task, data, kw = resume_setup()
def on_chunk(i, n):
    print(f"chunk {i}", flush=True)
    time.sleep(0.5)
GradientStore(sys.argv[1], model, task, **kw).build(data, on_chunk=on_chunk)
print("finished", flush=True)
"""


def test_killed_build_resumes_without_recomputing_finished_chunks(tmp_path):
    path = tmp_path / "gs"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), str(path)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.startswith("chunk"), child.stderr.read()
        child.send_signal(signal.SIGKILL)  # mid-build, right after one chunk is durable
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL

    model, task, data, kw = resume_setup()
    gs = GradientStore(path, model, task, **kw)
    flags = np.load(path / Store(path, create=False).info("features")["chunks"]["file"])
    n_done = int(flags.sum())
    assert 1 <= n_done < len(flags)
    gs.build(data)
    batches_per_chunk = kw["chunk_size"] // kw["batch_size"]
    assert gs.batches_featurized == (len(flags) - n_done) * batches_per_chunk

    full = GradientStore(tmp_path / "full", model, task, **kw).build(data)
    assert full.batches_featurized == len(data) // kw["batch_size"]
    np.testing.assert_allclose(np.asarray(gs.features()), np.asarray(full.features()), rtol=1e-5, atol=1e-7)


def test_projection_choice_is_self_describing(tmp_path):
    model, task, data = _mlp_setup(torch.float32)
    gs = GradientStore(tmp_path / "gs", model, task, projection=ExactFeatures(), dtype="bfloat16").build(data)
    header = gs.header()
    assert header["config"]["projection"] == {"kind": "exact"}
    assert header["config"]["dtype"] == "bfloat16" and header["config"]["storage_dtype"] == "<u2"
    assert header["model"]["sha256"] and header["data"]["ids_sha256"] and header["data"]["n"] == len(data)


def test_non_finite_training_example_is_named_by_id(tmp_path):
    model, task, data = _mlp_setup(torch.float32)
    x, y = data.tensors
    bad = ArrayDataset(x.clone().index_fill_(0, torch.tensor([5]), float("nan")), y, ids=np.arange(12) + 100)
    with pytest.raises(NonFiniteError, match="105"):
        GradientStore(tmp_path / "gs", model, task, batch_size=4).build(bad)
