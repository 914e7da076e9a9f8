"""The batched route (``defer_steps=K``: K steps' validation gradients in one vmap, their dots in one batched
product) and the streamed fast paths (a bias riding on its weight's ghost products, unit pieces) against the per-step
reference route, in float64 (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import datacredit.methods.inrun_batched as batched
from datacredit import ClassificationTask
from datacredit.capture.pieces import Outer, ghost_factors, ghost_total, val_first_dot
from datacredit.methods.inrun import InRunShapley
from datacredit.models import mlp

from .test_inrun_streaming import OPTIMIZERS, close, problem

pytestmark = pytest.mark.usefixtures("float64")


def run(name: str, opt_name: str, steps: int = 5, micro: int = 1, clip: float | None = None,
        sizes: tuple[int, ...] = (6,), **kw) -> InRunShapley:
    """``steps`` optimizer steps; batch sizes cycle through ``sizes`` (an epoch's smaller last batch)."""
    model, task, batches, val = problem(name)
    opt = OPTIMIZERS[opt_name](model)
    shapley = InRunShapley(model, task, validation=val, optimizer=opt, keep_history=True, **kw)
    for step in range(steps):
        batch = batches[step % len(batches)]
        n = sizes[step % len(sizes)]
        rows_all = batch[:n] if isinstance(batch, torch.Tensor) else (batch[0][:n], batch[1][:n])
        opt.zero_grad()
        for part in torch.arange(n).chunk(micro):
            with shapley.step(part.numpy() + 100 * step):
                rows = rows_all[part] if isinstance(batch, torch.Tensor) else (rows_all[0][part], rows_all[1][part])
                (task.loss(model, rows).sum() / n).backward()
        if clip is not None:
            shapley.clip_grad_norm_(clip)
        opt.step()
    return shapley


def same_history(a: InRunShapley, b: InRunShapley) -> None:
    assert [(s, i.tolist()) for s, i, _ in a.history] == [(s, i.tolist()) for s, i, _ in b.history]
    for (_, _, x), (_, _, y) in zip(a.history, b.history):
        close(x, y)


@pytest.mark.parametrize("name", ["mlp", "gpt", "inplace", "convln"])
@pytest.mark.parametrize("opt_name", ["sgd", "nesterov", "groups"])
def test_deferred_steps_equal_the_per_step_route(name, opt_name):
    """K = 3 over 5 steps (the checked step, one full window, one partial window flushed by values())."""
    ref = run(name, opt_name)
    got = run(name, opt_name, defer_steps=3)
    close(got.values().values, ref.values().values)
    same_history(got, ref)
    assert got._deferred.vmap_ok


def test_deferred_steps_with_micro_batches_clipping_and_a_smaller_last_batch():
    ref = run("mlp", "nesterov", steps=7, micro=2, clip=0.5, sizes=(6, 6, 4))
    got = run("mlp", "nesterov", steps=7, micro=2, clip=0.5, sizes=(6, 6, 4), defer_steps=4)
    close(got.values().values, ref.values().values)
    same_history(got, ref)


def test_deferred_steps_without_vmap_and_without_stacking(monkeypatch):
    """The fallbacks: one torch.func.grad per snapshot (a model vmap cannot run), and one dot per step."""
    ref = run("gpt", "sgd")
    def refuse(fn, *a, **k):
        raise RuntimeError("no batching rule")

    monkeypatch.setattr(torch.func, "vmap", refuse)
    monkeypatch.setattr(batched, "_step_structure", lambda st: None)
    got = run("gpt", "sgd", defer_steps=2)
    close(got.values().values, ref.values().values)
    assert not got._deferred.vmap_ok


def test_deferred_steps_are_computed_by_close_and_only_after_k_steps():
    model, task, batches, val = problem("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shapley = InRunShapley(model, task, validation=val, optimizer=opt, defer_steps=10)
    for step in range(4):
        opt.zero_grad()
        with shapley.step(np.arange(6) + 10 * step):
            task.loss(model, batches[step % 3]).mean().backward()
        opt.step()
    assert len(shapley._deferred.pending) == 3 and len(shapley._rows) == 6  # only the checked step is done
    shapley.close()
    assert not shapley._deferred.pending and len(shapley._rows) == 24


def test_deferred_steps_refuse_what_they_do_not_compute():
    model, task, _, val = problem("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in ({"order": 2}, {"targeted": True}, {"validation_rank": 2}, {"defer_steps": 0}):
        settings = {"defer_steps": 4, **bad}
        with pytest.raises(ValueError, match="defer_steps"):
            InRunShapley(model, task, validation=val, optimizer=opt, **settings)


def test_adam_with_defer_steps_takes_the_per_step_route():
    ref = run("mlp", "adam")
    got = run("mlp", "adam", defer_steps=3)
    assert not got._deferred.pending and got._snap is None
    close(got.values().values, ref.values().values)


def test_a_bias_riding_on_its_weights_ghost_products_is_exact(monkeypatch):
    """Force the ghost route for weights only: biases then take it through the memo (one reduction), and the
    values equal the deferred reference route; the memo was used."""
    import datacredit.methods.inrun as inrun

    monkeypatch.setattr(inrun, "_ghost_is_cheaper", lambda a, pieces: not a.unit)
    used = []
    real = inrun._memoized
    monkeypatch.setattr(inrun, "_memoized", lambda *a: used.append(real(*a)) or used[-1])
    fast = run("mlp", "sgd", steps=3)
    assert any(used)
    monkeypatch.setattr(inrun, "_ghost_is_cheaper", lambda a, pieces: False)
    close(fast.values().values, run("mlp", "sgd", steps=3, streaming=False).values().values)


def test_unit_pieces_give_the_same_dots_as_explicit_ones():
    """A bias piece (v = 1, ``unit``) against the same piece with the flag off, by both dot routes."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(4, 3, 5, generator=g)
    unit, plain = Outer(u, torch.ones(4, 3, 1), 5, 1, unit=True), Outer(u, torch.ones(4, 3, 1), 5, 1)
    w = torch.randn(1, 5, 1, generator=g)
    torch.testing.assert_close(val_first_dot(unit, w), val_first_dot(plain, w), rtol=0, atol=0)
    other = [Outer(torch.randn(2, 3, 5, generator=g), torch.ones(2, 3, 1), 5, 1, unit=True)]
    assert ghost_factors(other)[0][1] is None
    explicit = [(ghost_factors(other)[0][0], torch.ones(6, 1))]
    torch.testing.assert_close(ghost_total(unit, ghost_factors(other), {}), ghost_total(plain, explicit))


def test_deferred_mlp_with_momentum_matches_over_many_steps():
    """The demo's set-up in small: SGD with momentum, 12 steps of batch 8, K = 5."""
    def go(**kw):
        torch.manual_seed(3)
        g = torch.Generator().manual_seed(4)
        model, task = mlp(6, [7], 3), ClassificationTask()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        val = (torch.randn(9, 6, generator=g), torch.randint(0, 3, (9,), generator=g))
        shapley = InRunShapley(model, task, validation=val, optimizer=opt, **kw)
        for step in range(12):
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            with shapley.step(np.arange(8) + 8 * (step % 4)):  # ids repeat: values add over epochs
                task.loss(model, (x, y)).mean().backward()
            opt.step()
        return shapley.values().values

    close(go(defer_steps=5), go())
