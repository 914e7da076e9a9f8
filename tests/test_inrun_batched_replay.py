"""The replay route (``defer_steps=K, replay="mean"``: nothing captured during training, the dots recomputed at the
flush as a forward-mode derivative of the per-example losses, every step checked against its real ``p.grad``) and
the validation budget on the batched routes, against the per-step reference route in float64; and every refusal
(issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import datacredit.methods.inrun_batched as batched
from datacredit import ClassificationTask
from datacredit.dataset import ArrayDataset
from datacredit.errors import DataCreditError
from datacredit.methods.inrun import InRunShapley
from datacredit.models import mlp

from .test_inrun_batched import same_history
from .test_inrun_streaming import OPTIMIZERS, close, problem

pytestmark = pytest.mark.usefixtures("float64")


def run(name: str, opt_name: str, steps: int = 5, clip: float | None = None, sizes: tuple[int, ...] = (6,),
        give_batch: bool = True, mutate=None, loss_scale=None, **kw) -> InRunShapley:
    """``steps`` optimizer steps of one micro-batch each (loss = mean of task.loss unless ``loss_scale`` says
    otherwise); ``give_batch`` passes the batch to ``step`` (else ids only, looked up in ``data``)."""
    model, task, batches, val = problem(name)
    opt = OPTIMIZERS[opt_name](model)
    shapley = InRunShapley(model, task, validation=val, optimizer=opt, keep_history=True, **kw)
    for step in range(steps):
        batch = batches[step % len(batches)]
        n = sizes[step % len(sizes)]
        rows = batch[:n] if isinstance(batch, torch.Tensor) else (batch[0][:n], batch[1][:n])
        ids = np.arange(n) + 6 * (step % len(batches))
        opt.zero_grad()
        with shapley.step(ids, rows if give_batch else None):
            losses = task.loss(model, rows)
            (losses.sum() * (loss_scale or 1 / n)).backward()
        if mutate is not None:
            mutate(step, model, rows)
        if clip is not None:
            shapley.clip_grad_norm_(clip)
        opt.step()
    return shapley


def dataset(name: str) -> ArrayDataset:
    """The training rows of ``problem(name)`` as a dataset whose ids are the ones :func:`run` gives."""
    _, _, batches, _ = problem(name)
    if isinstance(batches[0], torch.Tensor):
        return ArrayDataset(torch.cat(batches))
    return ArrayDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))


@pytest.mark.parametrize("name", ["mlp", "gpt", "inplace", "convln"])
@pytest.mark.parametrize("opt_name", ["sgd", "nesterov", "groups"])
def test_replay_equals_the_per_step_route(name, opt_name):
    """K = 3 over 5 steps: the checked first step, a full window, a partial one flushed by values()."""
    ref = run(name, opt_name)
    got = run(name, opt_name, defer_steps=3, replay="mean")
    close(got.values().values, ref.values().values)
    same_history(got, ref)


def test_replay_with_data_clipping_and_a_smaller_last_batch():
    ref = run("mlp", "nesterov", steps=7, clip=0.5, sizes=(6, 6, 4))
    got = run("mlp", "nesterov", steps=7, clip=0.5, sizes=(6, 6, 4), give_batch=False, defer_steps=4,
              replay="mean", data=dataset("mlp"))
    close(got.values().values, ref.values().values)
    same_history(got, ref)


class ItemsOnly(torch.utils.data.Dataset):
    """A map-style dataset with ids but no ``tensors``: replay collates its items."""

    def __init__(self, inner: ArrayDataset):
        self.inner, self.ids = inner, inner.ids

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        return self.inner[i]


def test_replay_collates_the_items_of_a_dataset_without_tensors():
    ref = run("convln", "groups", steps=6, sizes=(6, 5))
    got = run("convln", "groups", steps=6, sizes=(6, 5), give_batch=False, defer_steps=3, replay="mean",
              data=ItemsOnly(dataset("convln")))
    close(got.values().values, ref.values().values)


def test_an_id_missing_from_data_is_named():
    from datacredit.errors import DataError

    small = dataset("mlp").subset(np.arange(6))  # ids 0..5: the second batch's ids 6..11 are not there
    with pytest.raises(DataError, match="example id 6 is not in data="):
        run("mlp", "sgd", steps=3, give_batch=False, defer_steps=2, replay="mean", data=small).values()


def test_replay_of_a_summed_loss_and_without_vmap(monkeypatch):
    ref = run("gpt", "sgd", loss_scale=1.0)
    monkeypatch.setattr(torch.func, "vmap", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no batching rule")))
    got = run("gpt", "sgd", loss_scale=1.0, defer_steps=2, replay="sum")
    close(got.values().values, ref.values().values)
    assert not got._deferred.vmap_ok


def test_replay_records_nothing_during_training(monkeypatch):
    """No capture hook runs on a replayed step: the capture engine is entered for the checked first step only."""
    import datacredit.capture.engine as engine

    entered = []
    real = engine.Capture.__enter__
    monkeypatch.setattr(engine.Capture, "__enter__", lambda self: entered.append(1) or real(self))
    run("mlp", "sgd", steps=1, defer_steps=10, replay="mean")
    first = len(entered)
    run("mlp", "sgd", steps=6, defer_steps=10, replay="mean")
    assert first > 0 and len(entered) == 2 * first


def test_a_wrong_loss_scale_is_refused_naming_the_step():
    with pytest.raises(DataCreditError, match=r"at step 1 .*task.loss\(model, batch\).mean\(\)"):
        run("mlp", "sgd", loss_scale=1.0, defer_steps=3, replay="mean").values()


def test_a_batch_changed_in_place_after_the_step_is_refused():
    def mutate(step, model, rows):
        if step == 2:
            rows[0].mul_(3.0)

    with pytest.raises(DataCreditError, match="at step 2"):
        run("mlp", "sgd", defer_steps=3, replay="mean", mutate=mutate).values()


def test_a_gradient_changed_by_hand_is_refused():
    def mutate(step, model, rows):
        if step == 3:
            next(model.parameters()).grad.mul_(0.5)  # clipping without clip_grad_norm_

    with pytest.raises(DataCreditError, match="at step 3"):
        run("mlp", "sgd", defer_steps=4, replay="mean", mutate=mutate).values()


class HiddenDropout(nn.Module):
    """Randomness no module type reveals: functional dropout inside forward."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(nn.functional.dropout(torch.tanh(self.fc(x)), 0.5, training=True))


def test_randomness_in_the_forward_is_caught_by_the_check():
    torch.manual_seed(0)
    model, task = HiddenDropout(), ClassificationTask()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    shapley = InRunShapley(model, task, validation=(x[:3], y[:3]), optimizer=opt, defer_steps=3, replay="mean")
    with pytest.raises(DataCreditError, match="at step 1 .*deterministic forward"):
        for _ in range(4):
            opt.zero_grad()
            with shapley.step(np.arange(6), (x, y)):
                task.loss(model, (x, y)).mean().backward()
            opt.step()


@pytest.mark.parametrize("layer", [nn.Dropout(0.1), nn.BatchNorm1d(5, affine=False)])
def test_dropout_and_batch_norm_in_training_mode_are_refused_up_front(layer):
    model = nn.Sequential(nn.Linear(4, 5), layer, nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    val = (torch.randn(3, 4), torch.randint(0, 3, (3,)))
    with pytest.raises(ValueError, match=f"module '1' \\({type(layer).__name__}\\) is in training mode"):
        InRunShapley(model, ClassificationTask(), validation=val, optimizer=opt, defer_steps=3, replay="mean")
    model.eval()  # in eval mode both are deterministic, per example: accepted
    InRunShapley(model, ClassificationTask(), validation=val, optimizer=opt, defer_steps=3, replay="mean")


def test_dropout_switched_to_training_mode_later_is_refused_at_that_step():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.1), nn.Linear(5, 3)).eval()
    task, opt = ClassificationTask(), torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    shapley = InRunShapley(model, task, validation=(x[:3], y[:3]), optimizer=opt, defer_steps=3, replay="mean")
    with pytest.raises(ValueError, match="Dropout"):
        for step in range(3):
            model[1].train(step == 2)
            opt.zero_grad()
            with shapley.step(np.arange(6), (x, y)):
                task.loss(model, (x, y)).mean().backward()
            opt.step()


def test_replay_refuses_what_it_cannot_check():
    model, task, batches, val = problem("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in ({"replay": "mean"}, {"defer_steps": 3, "replay": "max"},
                {"defer_steps": 3, "replay": "mean", "unexplained_gradient": "baseline"}):
        with pytest.raises(ValueError, match="replay"):
            InRunShapley(model, task, validation=val, optimizer=opt, **bad)
    with pytest.raises(ValueError, match="GradScaler"):
        InRunShapley(model, task, validation=val, optimizer=opt, defer_steps=3, replay="mean",
                     scaler=torch.amp.GradScaler("cpu"))
    shapley = InRunShapley(model, task, validation=val, optimizer=opt, defer_steps=3, replay="mean")
    x, y = batches[0]
    for step in range(3):  # steps 1 and 2 are replayed: a second micro-batch, and a step without its batch, refused
        opt.zero_grad()
        if step == 2:
            with pytest.raises(ValueError, match="needs each step's batch"):
                shapley.begin(np.arange(6))
        with shapley.step(np.arange(6), (x, y)):
            task.loss(model, (x, y)).mean().backward()
        if step == 1:
            with pytest.raises(ValueError, match="one micro-batch per optimizer step"):
                shapley.begin(np.arange(6), (x, y))
        opt.step()


@pytest.mark.parametrize("route", [{}, {"replay": "mean"}])
def test_a_validation_budget_on_the_batched_routes_equals_the_per_step_route_with_the_same_samples(monkeypatch, route):
    """Both routes made to use one table of samples (step -> k indices): the deferred values equal the per-step
    route's, so the budget's only approximation is the sample itself (unbiased: tested on the per-step route)."""
    g = torch.Generator().manual_seed(5)
    table = [torch.randperm(5, generator=g)[:2].sort().values for _ in range(7)]
    monkeypatch.setattr(InRunShapley, "_step_choice", lambda self: table[self.steps])
    ref = run("convln", "nesterov", steps=7, sizes=(6, 6, 4), validation_subsample=2)
    drawn = []
    monkeypatch.setattr(batched.DeferredSteps, "draw",
                        lambda self, steps: drawn.append(len(steps)) or torch.stack([table[st.step] for st in steps]))
    got = run("convln", "nesterov", steps=7, sizes=(6, 6, 4), validation_subsample=2, defer_steps=4, **route)
    close(got.values().values, ref.values().values)
    same_history(got, ref)
    assert drawn == [4, 2]  # one draw per window


def test_draw_samples_are_uniform_subsets_without_replacement():
    g = torch.Generator().manual_seed(0)
    s = batched.draw_samples(4000, 6, 2, g)
    assert s.shape == (4000, 2) and bool((s[:, 0] < s[:, 1]).all())  # distinct, sorted
    freq = torch.bincount(s.flatten(), minlength=6).double() / 4000
    torch.testing.assert_close(freq, torch.full((6,), 2 / 6), atol=0.03, rtol=0)  # each index with prob. k/n


def test_replay_on_the_demo_model_over_many_steps():
    """The demo's set-up in small: SGD with momentum, 12 steps of batch 8, ids repeating (epochs), K = 5, data="""
    def go(**kw):
        torch.manual_seed(3)
        g = torch.Generator().manual_seed(4)
        model, task = mlp(6, [7], 3), ClassificationTask()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
        data = ArrayDataset(x, y, ids=np.arange(32) + 100)
        shapley = InRunShapley(model, task, validation=(x[:9], y[:9]), optimizer=opt,
                               data=data if kw else None, **kw)
        for step in range(12):
            rows = torch.arange(8) + 8 * (step % 4)
            opt.zero_grad()
            with shapley.step(rows.numpy() + 100):
                task.loss(model, (x[rows], y[rows])).mean().backward()
            opt.step()
        return shapley.values().values

    close(go(defer_steps=5, replay="mean"), go())
