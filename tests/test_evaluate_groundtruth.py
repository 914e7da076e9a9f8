"""Ground truth by retraining: subsets, leave-one-out against the closed form for least squares, resume after a
crash or Ctrl-C without redoing finished jobs, detection of corrupt partial files and changed settings, and the
process-parallel build equal to the serial one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from datacredit import DataError, StoreError
from datacredit.data import ArrayDataset
from datacredit.evaluate import (
    ClassifierRecipe,
    LeastSquaresRecipe,
    build_groundtruth,
    build_loo,
    load_groundtruth,
    load_loo,
)
from datacredit.evaluate.groundtruth import subset_masks

TOL = {"rtol": 0, "atol": 1e-8}  # least squares in float64: closed form vs retraining


def regression(n=30, d=4, n_query=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_query, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(n + n_query, generator=gen,
                                                                                  dtype=torch.float64)
    return (ArrayDataset(x[:n], y[:n], ids=np.arange(1000, 1000 + n)),
            ArrayDataset(x[n:], y[n:], ids=np.arange(n_query)))


def classification(n=40, d=5, classes=3, n_query=8):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n + n_query, d, generator=gen, dtype=torch.float64)
    y = (x[:, :classes] + 0.5 * torch.randn(n + n_query, classes, generator=gen, dtype=torch.float64)).argmax(1)
    return ArrayDataset(x[:n], y[:n]), ArrayDataset(x[n:], y[n:], ids=np.arange(50, 50 + n_query))


@dataclasses.dataclass(frozen=True)
class CountingRecipe:
    """A tiny classifier recipe that appends one line per training run to ``log`` and raises KeyboardInterrupt
    (as Ctrl-C would) once ``crash_after`` runs are logged. Only ``inner`` is its config, so a crashed build and
    its rerun count as the same build."""

    inner: ClassifierRecipe
    log: str
    crash_after: int | None = None

    measures = ClassifierRecipe.measures

    def config(self) -> dict:
        return dataclasses.asdict(self.inner)

    def train(self, dataset, seed):
        path = Path(self.log)
        done = len(path.read_text().splitlines()) if path.exists() else 0
        if self.crash_after is not None and done >= self.crash_after:
            raise KeyboardInterrupt
        with path.open("a") as f:
            f.write(f"{len(dataset)} {seed}\n")
        return self.inner.train(dataset, seed)

    def evaluate(self, model, queries):
        return self.inner.evaluate(model, queries)


TINY = ClassifierRecipe(d_in=5, d_out=3, epochs=2, lr=0.1, batch_size=8)


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


# -- subsets ---------------------------------------------------------------------------------------------------
def test_subset_masks_are_seeded_and_exact():
    masks = subset_masks(101, 20, 0.5, seed=3)
    assert masks.shape == (20, 101) and (masks.sum(1) == 50).all()  # round(50.5) = 50 (banker's rounding)
    np.testing.assert_array_equal(masks, subset_masks(101, 20, 0.5, seed=3))
    assert len({m.tobytes() for m in masks}) == 20
    assert not np.array_equal(masks, subset_masks(101, 20, 0.5, seed=4))


# -- leave-one-out on least squares: the closed form -----------------------------------------------------------
def test_loo_equals_closed_form_for_least_squares(tmp_path):
    train, queries = regression()
    loo = build_loo(LeastSquaresRecipe(), train, queries, tmp_path / "loo", backend="serial", progress=False)
    x, y = (t.numpy() for t in train.tensors)
    xq, yq = (t.numpy() for t in queries.tensors)
    inv = np.linalg.inv(x.T @ x)
    theta = inv @ x.T @ y
    r = y - x @ theta
    h = np.einsum("id,de,ie->i", x, inv, x)
    # removing i moves θ by −(XᵀX)⁻¹ x_i r_i / (1 − h_ii), so a query's prediction by −x_qᵀ(XᵀX)⁻¹ x_i r_i/(1 − h_ii)
    d_pred = -(x @ inv @ xq.T) * (r / (1 - h))[:, None]  # (n, Q)
    pred = xq @ theta
    d_loss = (pred + d_pred - yq) ** 2 - (pred - yq) ** 2
    np.testing.assert_allclose(loo.change("prediction"), d_pred, **TOL)
    np.testing.assert_allclose(loo.values, d_loss, **TOL)  # values = loss_without_i − loss_full: + = i helped
    np.testing.assert_array_equal(loo.removed_ids, train.ids)
    # a chosen subset of examples gives the same rows; a reload gives the same result
    some = build_loo(LeastSquaresRecipe(), train, queries, tmp_path / "some", indices=[3, 17], backend="serial",
                     progress=False)
    np.testing.assert_allclose(some.values, d_loss[[3, 17]], **TOL)
    np.testing.assert_array_equal(load_loo(tmp_path / "some").values, some.values)


# -- resume ----------------------------------------------------------------------------------------------------
def test_resume_after_interrupt_runs_only_unfinished_jobs(tmp_path):
    train, queries = classification()
    kw = {"m": 5, "seeds": 2, "backend": "serial", "progress": False}
    log = tmp_path / "calls.txt"
    with pytest.raises(KeyboardInterrupt):
        build_groundtruth(CountingRecipe(TINY, str(log), crash_after=4), train, queries, tmp_path / "gt", **kw)
    assert len(_calls(log)) == 4
    flags = np.load(tmp_path / "gt" / "outputs.npy.done")
    assert flags.sum() == 4
    with pytest.raises(StoreError, match="rerun build_groundtruth"):
        load_groundtruth(tmp_path / "gt")

    resumed = build_groundtruth(CountingRecipe(TINY, str(log)), train, queries, tmp_path / "gt", **kw)
    assert len(_calls(log)) == 10  # 4 before the interrupt + the 6 unfinished, none redone
    fresh = build_groundtruth(TINY, train, queries, tmp_path / "fresh", **kw)
    for name in ("loss", "margin"):
        np.testing.assert_array_equal(resumed.outputs[name], fresh.outputs[name])
        np.testing.assert_array_equal(load_groundtruth(tmp_path / "gt").outputs[name], fresh.outputs[name])
    assert not np.array_equal(fresh.outputs["loss"][:, 0], fresh.outputs["loss"][:, 1])  # seeds differ
    # a finished build reruns nothing
    build_groundtruth(CountingRecipe(TINY, str(log)), train, queries, tmp_path / "gt", **kw)
    assert len(_calls(log)) == 10


def _partial(tmp_path, train, queries):
    log = tmp_path / "calls.txt"
    with pytest.raises(KeyboardInterrupt):
        build_groundtruth(CountingRecipe(TINY, str(log), crash_after=2), train, queries, tmp_path / "gt", m=4,
                          backend="serial", progress=False)
    return tmp_path / "gt"


def test_truncated_or_corrupt_partial_files_are_detected(tmp_path):
    train, queries = classification()
    kw = {"m": 4, "backend": "serial", "progress": False}
    recipe = CountingRecipe(TINY, str(tmp_path / "rerun.txt"))
    out = _partial(tmp_path / "a", train, queries)
    data = (out / "outputs.npy").read_bytes()
    (out / "outputs.npy").write_bytes(data[:-40])
    with pytest.raises(StoreError, match=r"outputs\.npy: truncated or wrong size"):
        build_groundtruth(recipe, train, queries, out, **kw)

    out = _partial(tmp_path / "b", train, queries)
    (out / "outputs.npy.done").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(StoreError, match=r"outputs\.npy\.done: truncated or corrupt"):
        build_groundtruth(recipe, train, queries, out, **kw)

    out = _partial(tmp_path / "c", train, queries)
    (out / "masks.npy").write_bytes((out / "masks.npy").read_bytes()[:-3])
    with pytest.raises(StoreError, match=r"masks\.npy: truncated or wrong size"):
        build_groundtruth(recipe, train, queries, out, **kw)
    assert not _calls(tmp_path / "rerun.txt")  # nothing was retrained on top of a corrupt store


def test_changed_settings_or_data_are_refused(tmp_path):
    train, queries = classification()
    out = _partial(tmp_path, train, queries)
    same = CountingRecipe(TINY, str(tmp_path / "rerun.txt"))
    kw = {"backend": "serial", "progress": False}
    with pytest.raises(StoreError, match=r"\(recipe: stored .*CountingRecipe.*ClassifierRecipe"):
        build_groundtruth(TINY, train, queries, out, m=4, **kw)
    with pytest.raises(StoreError, match=r"\(m: stored 4, requested 5\)"):
        build_groundtruth(same, train, queries, out, m=5, **kw)
    with pytest.raises(StoreError, match=r"\(recipe: .*'epochs': 2.*'epochs': 3"):
        build_groundtruth(dataclasses.replace(same, inner=dataclasses.replace(TINY, epochs=3)), train, queries, out,
                          m=4, **kw)
    x, y = train.tensors
    changed = ArrayDataset(x.clone().index_fill_(0, torch.tensor([0]), 0.0), y, ids=train.ids)
    with pytest.raises(StoreError, match=r"\(train_sha256: stored"):
        build_groundtruth(same, changed, queries, out, m=4, **kw)
    assert not _calls(tmp_path / "rerun.txt")


# -- backends --------------------------------------------------------------------------------------------------
def test_process_pool_build_equals_serial(tmp_path):
    train, queries = regression(n=24)
    kw = {"m": 4, "seeds": 1, "progress": False}
    parallel = build_groundtruth(LeastSquaresRecipe(ridge=0.1), train, queries, tmp_path / "p", workers=2,
                                 backend="process", **kw)
    serial = build_groundtruth(LeastSquaresRecipe(ridge=0.1), train, queries, tmp_path / "s", backend="serial", **kw)
    np.testing.assert_allclose(parallel.outputs["loss"], serial.outputs["loss"], rtol=1e-12, atol=0)
    assert np.ptp(serial.outputs["prediction"], axis=0).max() > 1e-3  # subsets differ, so rows are not exchangeable
    assert (parallel.seconds > 0).all()


def test_unpicklable_recipe_and_missing_ray_are_clear_errors(tmp_path):
    train, queries = regression(n=12)

    @dataclasses.dataclass(frozen=True)
    class Local(LeastSquaresRecipe):  # defined in a function: worker processes cannot import it
        pass

    with pytest.raises(DataError, match="top level"):
        build_groundtruth(Local(), train, queries, tmp_path / "a", m=3, workers=2, progress=False)
    try:
        import ray  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install ray"):
            build_groundtruth(LeastSquaresRecipe(), train, queries, tmp_path / "b", m=3, backend="ray",
                              progress=False)
    with pytest.raises(ValueError, match="backend"):
        build_groundtruth(LeastSquaresRecipe(), train, queries, tmp_path / "c", m=3, backend="slurm", progress=False)
