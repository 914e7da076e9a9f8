"""In-Run Data Shapley in the training set-ups that gave wrong values (issue 16): in-place ops, GradScaler, a weight
used outside its module, a wrong loss shape, a batch-second model. Each is exact against the twin or refused by name."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from datacredit import ClassificationTask
from datacredit.errors import DataCreditError, DataError, UnsupportedModuleError
from datacredit.methods.inrun import InRunShapley

from .helpers import FunctionalReuse
from .test_inrun import OPTIMIZERS, Twin, one_step, warm_up

pytestmark = pytest.mark.usefixtures("float64")


class InplaceNet(nn.Module):
    """Linear → ReLU(inplace) → Linear, on ``(N, d)`` or on ``(N, T, d)`` averaged over T."""

    def __init__(self, seq: bool):
        super().__init__()
        self.seq = seq
        self.a, self.act, self.b = nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)

    def forward(self, x):
        out = self.b(self.act(self.a(x)))
        return out.mean(1) if self.seq else out


def data(n, seq, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, generator=g) if seq else torch.randn(n, 4, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("seq", [False, True])
@pytest.mark.parametrize("name, order", [("sgd", 1), ("sgd", 2), ("adam", 1), ("adam", 2)])
def test_inplace_relu_after_a_linear_equals_the_twin(seq, name, order):
    """Before: SGD values off by 0.3–0.97, Adam raised AttributeError ('int' object has no attribute 'reshape')."""
    torch.manual_seed(0)
    model, train, val = InplaceNet(seq), data(6, seq, 1), data(5, seq, 2)
    task = ClassificationTask()
    opt = OPTIMIZERS[name](model.parameters())
    warm_up(model, opt, task, train)
    shapley = one_step(model, task, train, val, opt, order)
    twin = Twin(model, task, train, val, opt, loss_scale=1 / 6)
    opt.step()
    torch.testing.assert_close(torch.from_numpy(shapley.values().values[:, 0]), twin.formula(order), rtol=1e-8,
                               atol=1e-12)


def mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def train_with(model, opt, *, scaler=None, skip_at=None, order=1, clip=None, steps=4):
    """A few steps of a plain loop, optionally with a GradScaler; ``skip_at``: the scaled run sees inf gradients
    there (the scaler skips the step), the unscaled run leaves that step out."""
    task = ClassificationTask()
    shapley = InRunShapley(model, task, validation=data(5, False, 9), optimizer=opt, order=order, scaler=scaler,
                           keep_history=True)
    for step in range(steps):
        x, y = data(8, False, 100 + step)
        if step == skip_at and scaler is None:
            continue
        opt.zero_grad()
        with shapley.step(np.arange(8) + 8 * step):
            loss = task.loss(model, (x, y)).mean()
            if step == skip_at:
                loss = loss * float("inf")
            (loss if scaler is None else scaler.scale(loss)).backward()
        if clip is not None:
            if scaler is not None:
                scaler.unscale_(opt)
            shapley.clip_grad_norm_(clip)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    shapley.close()
    return shapley


@pytest.mark.parametrize("name, order, clip", [("sgd", 1, None), ("momentum", 2, 0.05), ("adam", 1, 0.05),
                                               ("adamw", 2, None)])
def test_grad_scaler_gives_the_values_of_unscaled_training(name, order, clip):
    """Before: values ×65536. Loss scales are powers of two, so scaled float64 training is the same to rounding;
    the scale changes every step (growth_interval=1) and a skipped step (inf gradients) adds no value."""
    a, b = mlp(), mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1)
    scaled = train_with(a, OPTIMIZERS[name](a.parameters()), scaler=scaler, skip_at=2, order=order, clip=clip)
    plain = train_with(b, OPTIMIZERS[name](b.parameters()), skip_at=2, order=order, clip=clip)
    assert scaled.skipped == 1 and scaled.steps == plain.steps == 3
    assert "update" not in vars(scaler)  # close() gave the scaler its own method back
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)
    got, want = scaled.values(), plain.values()
    assert got.train_ids.tolist() == want.train_ids.tolist() == [i for i in range(32) if not 16 <= i < 24]
    np.testing.assert_allclose(got.values, want.values, rtol=1e-10, atol=1e-14 * np.abs(want.values).max())


def test_loss_scaled_by_hand_is_refused_naming_the_parameters():
    model = mlp()
    task = ClassificationTask()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shapley = InRunShapley(model, task, validation=data(5, False, 9), optimizer=opt)
    x, y = data(8, False, 0)
    with shapley.step(np.arange(8)):
        (task.loss(model, (x, y)).mean() * 1024.0).backward()
    for p in model.parameters():
        p.grad /= 1024.0  # unscaled by hand: the captured gradients are still ×1024
    with pytest.raises(DataCreditError, match=r"'0\.weight'.*1024 × .*scaler=scaler"):
        opt.step()


@pytest.mark.parametrize("order", [1, 2])
def test_weight_used_outside_its_module_is_refused_by_name(order):
    model = FunctionalReuse()
    task = ClassificationTask()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    one_step(model, task, data(6, False, 0), data(4, False, 1), opt, order)
    with pytest.raises(DataCreditError, match=r"'b\.weight' \(off by .*F\.linear"):
        opt.step()


def test_regularizer_is_refused_unless_declared_baseline():
    """An L2 term in the loss is not any example's: by default refused by name; declared, it is the baseline and the
    values equal the twin's (whose baseline is p.grad − Σ g_z)."""
    task = ClassificationTask()
    for mode in ("raise", "baseline"):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        train, val = data(6, False, 0), data(5, False, 1)
        shapley = InRunShapley(model, task, validation=val, optimizer=opt, order=2, unexplained_gradient=mode)
        opt.zero_grad()
        with shapley.step(np.arange(6)):
            (task.loss(model, train).mean() + 0.1 * model[0].weight.square().sum()).backward()
        if mode == "raise":
            with pytest.raises(DataCreditError, match=r"'0\.weight'.*regularizer.*unexplained_gradient='baseline'"):
                opt.step()
            continue
        twin = Twin(model, task, train, val, opt, loss_scale=1 / 6)
        opt.step()
        torch.testing.assert_close(torch.from_numpy(shapley.values().values[:, 0]), twin.formula(2), rtol=1e-8,
                                   atol=1e-12)


def test_untracked_modules_stay_baseline_without_error():
    model = mlp()
    task = ClassificationTask(modules=["2"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shapley = one_step(model, task, data(6, False, 0), data(4, False, 1), opt, order=2)
    opt.step()
    assert np.isfinite(shapley.values().values).all()


class BatchSecond(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):  # (N, T, 4) in, layers run on (T, N, 4)
        return self.b(torch.tanh(self.a(x.transpose(0, 1)))).mean(0)


@pytest.mark.parametrize("order", [1, 2])
def test_batch_second_model_is_refused(order):
    """T == N: shapes agree and only the validation side's one-off check sees it (before: 15–37 % off)."""
    task = ClassificationTask()
    torch.manual_seed(0)
    model = BatchSecond()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 6, 4), torch.randint(0, 3, (6,))
    val = (torch.randn(6, 6, 4), torch.randint(0, 3, (6,)))
    one_step(model, task, (x, y), val, opt, order)
    with pytest.raises(UnsupportedModuleError, match="batch dimension first"):
        opt.step()
    shapley = InRunShapley(model, task, validation=val, optimizer=opt, order=order)
    with pytest.raises(DataError, match="6 ids for a batch of 5.*batch dimension must come first"):
        with shapley.step(np.arange(6)):
            task.loss(model, (torch.randn(6, 5, 4), y)).mean().backward()


def test_loss_with_one_value_too_few_is_refused():
    class Short(ClassificationTask):
        def loss(self, model, batch):
            return super().loss(model, batch)[:-1]

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    one_step(model, Short(), data(6, False, 0), data(4, False, 1), opt, order=1)
    with pytest.raises(DataError, match=r"shape \(3,\)"):
        opt.step()
    shapley = InRunShapley(model, Short(), validation=data(4, False, 1), optimizer=opt)
    with pytest.raises(DataError, match="5 ids for a batch of 6"):
        with shapley.step(np.arange(5), data(6, False, 0)):
            pass


def test_checks_run_once(monkeypatch):
    """The validation check (one extra backward) runs on the first step only, however many steps follow."""
    import datacredit.capture.engine as engine

    calls = []
    real = engine._verify
    monkeypatch.setattr(engine, "_verify", lambda *a: calls.append(1) or real(*a))
    for order in (1, 2):
        calls.clear()
        model = mlp()
        train_with(model, torch.optim.SGD(model.parameters(), lr=0.1), order=order, steps=4)
        assert calls == [1]


def test_scaler_copy_is_untouched_by_other_instances():
    """The scaler's update is wrapped per instance; a second InRunShapley on the same scaler chains, and closing both
    restores it."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    first = InRunShapley(model, ClassificationTask(), validation=data(4, False, 1), optimizer=opt, scaler=scaler)
    second = InRunShapley(copy.deepcopy(model), ClassificationTask(), validation=data(4, False, 1), optimizer=opt,
                          scaler=scaler)
    second.close()
    first.close()
    assert "update" not in vars(scaler)


@pytest.mark.parametrize("mode, rtol", [("bf16", 2e-2), ("fp16", 5e-3)])
def test_autocast_values_equal_float32_training_to_half_precision(mode, rtol):
    """Float32 model under CPU autocast (fp16 with a GradScaler, bf16 without): values equal float32 training's to
    half-precision rounding (measured 2e-3 for bf16, 5e-4 for fp16), with no false alarm from the one-off checks."""
    from datacredit import LanguageModelingTask
    from datacredit.models import TinyGPT

    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    model = TinyGPT(vocab=32, d=32, n_layers=1, n_heads=2, max_len=16)
    task = LanguageModelingTask()
    batches = [torch.randint(0, 32, (8, 13)) for _ in range(3)]
    val = torch.randint(0, 32, (4, 13))
    out = {}
    for run in ("fp32", mode):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if run == "fp16" else None
        shapley = InRunShapley(m, task, validation=val, optimizer=opt, scaler=scaler)
        for k, batch in enumerate(batches):
            opt.zero_grad()
            with shapley.step(np.arange(8) + 8 * k):
                dtype = torch.float16 if run == "fp16" else torch.bfloat16
                with torch.autocast("cpu", dtype=dtype, enabled=run != "fp32"):
                    loss = task.loss(m, batch).mean()
                (loss if scaler is None else scaler.scale(loss)).backward()
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
        out[run] = shapley.values().values[:, 0]
    np.testing.assert_allclose(out[mode], out["fp32"], rtol=0, atol=rtol * np.abs(out["fp32"]).max())
