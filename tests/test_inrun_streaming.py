"""Streaming In-Run values (per-layer dots inside the training backward) against the deferred reference route, and the
validation budget (a per-step validation subsample) against the exact value (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import datacredit.methods.inrun as inrun
from datacredit import ClassificationTask, LanguageModelingTask
from datacredit.methods.inrun import InRunShapley
from datacredit.models import TinyGPT, mlp

from .test_inrun_safety import InplaceNet

pytestmark = pytest.mark.usefixtures("float64")


class ConvLN(nn.Module):
    """Conv2d (bias-free, strided) → LayerNorm over (C, H, W) → Linear: the conv and norm rules in one model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=2, bias=False)
        self.ln = nn.LayerNorm([2, 3, 3])
        self.out = nn.Linear(18, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.ln(self.conv(x))).flatten(1))


def problem(name: str, seed: int = 0):
    """(model, task, training batches for 3 steps, validation batch)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if name == "gpt":
        model = TinyGPT(vocab=7, d=8, n_layers=1, n_heads=2, max_len=8)
        return (model, LanguageModelingTask(), [torch.randint(0, 7, (6, 7), generator=g) for _ in range(3)],
                torch.randint(0, 7, (3, 7), generator=g))
    if name == "mlp":
        model, shape = mlp(4, [5, 4], 3), (4,)
    elif name == "inplace":
        model, shape = InplaceNet(seq=True), (3, 4)
    else:
        model, shape = ConvLN(), (1, 7, 7)
    batches = [(torch.randn(6, *shape, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(3)]
    return model, ClassificationTask(), batches, (torch.randn(5, *shape, generator=g),
                                                 torch.randint(0, 3, (5,), generator=g))


OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.3),
    "nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "groups": lambda m: torch.optim.SGD([{"params": list(m.parameters())[:1], "lr": 0.05},
                                         {"params": list(m.parameters())[1:]}], lr=0.2, momentum=0.5),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1),
}


def train(name: str, opt_name: str, streaming: bool, micro: int = 1, clip: float | None = None, **kw):
    model, task, batches, val = problem(name)
    opt = OPTIMIZERS[opt_name](model)
    shapley = InRunShapley(model, task, validation=val, optimizer=opt, streaming=streaming, keep_history=True, **kw)
    for step, batch in enumerate(batches):
        opt.zero_grad()
        n = len(batch) if isinstance(batch, torch.Tensor) else len(batch[1])
        for part in torch.arange(n).chunk(micro):
            with shapley.step(part.numpy() + 100 * step):
                rows = batch[part] if isinstance(batch, torch.Tensor) else (batch[0][part], batch[1][part])
                (task.loss(model, rows).sum() / n).backward()
        if clip is not None:
            shapley.clip_grad_norm_(clip)
        opt.step()
    return shapley


def close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * np.abs(b).max())


@pytest.mark.parametrize("name", ["mlp", "gpt", "inplace", "convln"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_streaming_equals_the_deferred_route(name, opt_name, monkeypatch):
    """Three steps (the first is the checked step; the next two stream for SGD): identical values to 1e-10."""
    calls = []
    real = InRunShapley._consume
    monkeypatch.setattr(InRunShapley, "_consume", lambda self, *a: calls.append(1) or real(self, *a))
    fast = train(name, opt_name, streaming=True).values().values
    streamed = len(calls)
    slow = train(name, opt_name, streaming=False).values().values
    assert len(calls) == streamed
    assert (streamed > 0) == (opt_name in ("sgd", "nesterov", "groups"))
    close(fast, slow)


@pytest.mark.parametrize("route", ["ghost", "val-first"])
@pytest.mark.parametrize("name", ["mlp", "gpt", "convln"])
def test_both_streaming_routes_are_exact(name, route, monkeypatch):
    """Forced ghost / val-first inside the backward, with accumulation (3 micro-batches) and clipping."""
    monkeypatch.setattr(inrun, "_ghost_is_cheaper", lambda a, pieces: route == "ghost")
    fast = train(name, "nesterov", streaming=True, micro=3, clip=0.5)
    slow = train(name, "nesterov", streaming=False, micro=3, clip=0.5)
    close(fast.values().values, slow.values().values)
    assert len(fast.history) == 9


def test_routes_that_change_between_steps_stay_exact(monkeypatch):
    """A layer that took the ghost route on one step (so the next validation pass skips its weight gradient) and
    the val-first route on the next gets its validation gradient summed from the pieces."""
    flips = iter([True] * 12 + [False] * 100)  # 6 pieces a step: the checked step, then one streamed ghost step
    monkeypatch.setattr(inrun, "_ghost_is_cheaper", lambda a, pieces: next(flips))
    summed = []
    real = inrun._Validation.grad
    monkeypatch.setattr(inrun._Validation, "grad", lambda self, name: summed.append(name not in self.grads)
                        or real(self, name))
    fast = train("mlp", "sgd", streaming=True)
    assert any(summed)
    monkeypatch.setattr(inrun, "_ghost_is_cheaper", lambda a, pieces: False)
    close(fast.values().values, train("mlp", "sgd", streaming=False).values().values)


def repeated_step_values(order: int, k: int | None, steps: int, validation=None, targeted: bool = False):
    """``steps`` optimizer steps at one θ and one batch (the parameters are restored after each step): per-step
    values ``(steps, B, Q)``."""
    model, task, batches, val = problem("mlp", seed=7)
    if validation is not None:
        val = validation
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    theta = [p.detach().clone() for p in model.parameters()]
    shapley = InRunShapley(model, task, validation=val, optimizer=opt, order=order, keep_history=True,
                           validation_subsample=k, seed=3, targeted=targeted)
    batch = batches[0]
    for _ in range(steps):
        opt.zero_grad()
        with shapley.step(np.arange(6)):
            task.loss(model, batch).mean().backward()
        opt.step()
        with torch.no_grad():
            for p, t in zip(model.parameters(), theta):
                p.copy_(t)
    return np.stack([h[2] for h in shapley.history])


@pytest.mark.parametrize("order", [1, 2])
def test_validation_subsample_is_unbiased_with_the_stated_variance(order):
    """Mean over 400 sampled steps → the exact value (within 4.5 standard errors), and the spread matches
    ``n²(1 − k/n)σ²/k`` computed from the per-validation-example values (targeted run)."""
    n, k, m = 5, 2, 400
    exact = repeated_step_values(order, None, 2)[-1, :, 0]
    per_query = repeated_step_values(order, None, 2, targeted=True)[-1]  # (B, n): y_q per example
    np.testing.assert_allclose(per_query.sum(1), exact, rtol=1e-9)
    sampled = repeated_step_values(order, k, m + 1)[1:, :, 0]  # the first step is the checked one: drop it
    variance = n**2 * (1 - k / n) * per_query.var(axis=1, ddof=1) / k
    mean = sampled.mean(0)
    assert np.all(np.abs(mean - exact) <= 4.5 * np.sqrt(variance / m)), (mean, exact)
    ratio = sampled.var(0, ddof=1) / variance
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio


def test_validation_subsample_of_a_dataset_and_its_errors():
    model, task, batches, (xv, yv) = problem("mlp", seed=7)
    full = repeated_step_values(1, None, 3, validation=TensorDataset(xv, yv))
    same = repeated_step_values(1, 5, 3, validation=TensorDataset(xv, yv))  # k = n: every example, factor 1
    np.testing.assert_allclose(same, full, rtol=1e-10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="targeted"):
        InRunShapley(model, task, validation=(xv, yv), optimizer=opt, targeted=True, validation_subsample=2)
    with pytest.raises(ValueError, match=r"1\.\.5"):
        InRunShapley(model, task, validation=(xv, yv), optimizer=opt, validation_subsample=6)


def sketch_run(opt_name: str, rank: int | None, streaming: bool = True):
    """An MLP 8-16-3 with one validation example: each layer's validation gradient ``b aᵀ`` has rank 1."""
    torch.manual_seed(11)
    g = torch.Generator().manual_seed(12)
    model, task = mlp(8, [16], 3), ClassificationTask()
    opt = OPTIMIZERS[opt_name](model)
    val = (torch.randn(1, 8, generator=g), torch.randint(0, 3, (1,), generator=g))
    shapley = InRunShapley(model, task, validation=val, optimizer=opt, validation_rank=rank, streaming=streaming)
    for step in range(3):
        x, y = torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
        opt.zero_grad()
        with shapley.step(np.arange(6) + 6 * step):
            task.loss(model, (x, y)).mean().backward()
        opt.step()
    return shapley.values().values[:, 0]


def test_low_rank_sketch_is_exact_for_a_rank_one_validation_gradient_and_close_otherwise(monkeypatch):
    monkeypatch.setattr(inrun, "_ghost_is_cheaper", lambda a, pieces: False)  # every layer val-first → sketched
    exact = sketch_run("sgd", None)
    close(sketch_run("sgd", 1), exact)
    close(sketch_run("sgd", 1, streaming=False), exact)
    adam_exact, adam = sketch_run("adam", None), sketch_run("adam", 2)  # s ⊙ b aᵀ is no longer rank 1
    assert np.linalg.norm(adam - adam_exact) < 0.5 * np.linalg.norm(adam_exact)
    with pytest.raises(ValueError, match="first-order"):
        InRunShapley(mlp(8, [16], 3), ClassificationTask(), validation=None, optimizer=None, order=2,
                     validation_rank=2)


def test_layernorm_rule_reads_autograd_statistics_and_falls_back_to_recomputing():
    """x̂ from autograd's saved mean/rstd (NativeLayerNormBackward0) equals x̂ recomputed with var_mean."""
    from datacredit.capture.layernorm import LayerNormRule

    ln = nn.LayerNorm([3, 4])
    x = torch.randn(5, 2, 3, 4, requires_grad=True)
    y = ln(x)
    rule = LayerNormRule()
    saved = rule.saved(ln, (x.detach(),), y)
    assert saved is not None and saved[0].shape == (5, 2, 1, 1)
    b = torch.randn_like(y)
    with_saved = rule.pieces(ln, (x.detach(),), b, saved=saved)
    recomputed = rule.pieces(ln, (x.detach(),), b)
    torch.testing.assert_close(with_saved["weight"].g, recomputed["weight"].g, rtol=1e-12, atol=1e-12)
    assert rule.saved(ln, (x.detach(),), y * 2) is None  # not the norm's own node: recompute


def test_subnormals_are_flushed_in_our_dots_only_and_the_threads_mode_is_restored(monkeypatch):
    """Our per-layer dots run with subnormal floats flushed to zero (capture/subnormals.py); the user's forward and
    backward never do, and after every step the thread's mode is what the user set (off, or on)."""
    from datacredit.capture.subnormals import flushing

    seen: dict[str, list[bool]] = {"dots": [], "user": []}
    user = [False]  # inside the user's own forward/backward (the validation pass runs the model's hooks too)

    def note() -> None:  # a hook of the user's: returns None (leaves the output alone)
        if user[0]:
            seen["user"].append(flushing())

    real_ghost, real_dot = inrun.ghost_total, inrun.piece_dot
    monkeypatch.setattr(inrun, "ghost_total", lambda *a: seen["dots"].append(flushing()) or real_ghost(*a))
    monkeypatch.setattr(inrun, "piece_dot", lambda *a: seen["dots"].append(flushing()) or real_dot(*a))
    for user_mode in (False, True):
        torch.set_flush_denormal(user_mode)
        try:
            model, task, batches, val = problem("gpt")
            model.blocks[0].fc.register_forward_hook(lambda *a: note())
            model.blocks[0].fc.register_full_backward_hook(lambda *a: note())
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            shapley = InRunShapley(model, task, validation=val, optimizer=opt)
            for step, batch in enumerate(batches):
                with shapley.step(np.arange(6) + 6 * step):
                    user[0] = True
                    task.loss(model, batch).mean().backward()
                    user[0] = False
                opt.step()
                opt.zero_grad()
                assert flushing() == user_mode
            if not torch.set_flush_denormal(True):
                pytest.skip("this CPU cannot flush subnormals")
        finally:
            torch.set_flush_denormal(False)
        assert seen["dots"] and all(seen["dots"])
        assert len(seen["user"]) == 6 and all(flag == user_mode for flag in seen["user"])
        seen = {"dots": [], "user": []}


def test_flushing_subnormals_leaves_float32_values_unchanged(monkeypatch):
    """A language model whose output gradient holds subnormals (very confident logits): the streamed values with
    subnormals flushed equal those computed without flushing, to float32 rounding."""
    import datacredit.capture.subnormals as subnormals

    def run():
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        model = TinyGPT(vocab=7, d=8, n_layers=1, n_heads=2, max_len=8).float()  # float32: subnormals < 1e-38
        with torch.no_grad():
            model.tok.weight.mul_(12.0)  # tied head: logits of a few hundred, probabilities down to e^-100
        task = LanguageModelingTask()
        batches = [torch.randint(0, 7, (6, 7), generator=g) for _ in range(3)]
        val = torch.randint(0, 7, (3, 7), generator=g)
        probs = model(batches[1][:, :-1]).float().softmax(-1)
        tiny = torch.finfo(torch.float32).tiny
        assert bool(((probs > 0) & (probs < tiny)).any())  # subnormals do occur here
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        shapley = InRunShapley(model, task, validation=val, optimizer=opt)
        for step, batch in enumerate(batches):
            with shapley.step(np.arange(6) + 6 * step):
                task.loss(model, batch).mean().backward()
            opt.step()
            opt.zero_grad()
        return shapley.values().values[:, 0]

    flushed = run()
    monkeypatch.setattr(inrun, "Flushed", lambda on: subnormals.Flushed(False))
    plain = run()
    np.testing.assert_allclose(flushed, plain, rtol=1e-5, atol=1e-6 * np.abs(plain).max())


def test_streamed_validation_pass_forms_pieces_only_for_ghost_route_layers(monkeypatch):
    """Once the routes are known, the validation pass forms pieces only for the calls of ghost-route parameters
    (LayerNorms and val-first layers take autograd's weight gradient), and the values stay exact."""
    made: list[tuple[set, set]] = []
    real = inrun._Validation.__init__
    monkeypatch.setattr(inrun._Validation, "__init__", lambda self, grads, pieces, shapes:
                        made.append((set(grads), set(pieces))) or real(self, grads, pieces, shapes))
    monkeypatch.setattr(inrun, "_ghost_is_cheaper", lambda a, pieces: getattr(a, "m", 0) * getattr(a, "n", 0) > 40)
    fast = train("gpt", "sgd", streaming=True)
    grads, pieces = made[-1]  # the last step's validation pass (routes known)
    routes = fast._routes
    ghost = {k for k, r in routes.items() if r == "ghost"}
    assert ghost and set(routes) - ghost  # both routes taken
    assert pieces == ghost and not any("ln" in k for k in pieces)
    assert grads == set(routes) - ghost
    close(fast.values().values, train("gpt", "sgd", streaming=False).values().values)


@pytest.mark.parametrize("positions", [1, 40])
@pytest.mark.parametrize("kernel", [False, True])
def test_layernorm_pieces_equal_torch_func_per_example_gradients(kernel, positions, monkeypatch):
    """Both forms of the LayerNorm rule (autograd's fused kernel per example, or b ⊙ x̂ summed) against torch.func
    per-example gradients of γ and β, with a bias and without."""
    import datacredit.capture.layernorm as layernorm
    from datacredit.capture.layernorm import LayerNormRule

    monkeypatch.setattr(layernorm, "KERNEL_ELEMENTS", 1 if kernel else 10**12)
    for with_bias in (True, False):
        ln = nn.LayerNorm(6, bias=with_bias)
        with torch.no_grad():
            ln.weight.uniform_(0.5, 1.5)
        x = torch.randn(4, positions, 6, requires_grad=True) * 3 + 1
        b = torch.randn(4, positions, 6)
        y = ln(x)
        rule = LayerNormRule()
        got = rule.pieces(ln, (x.detach(),), b, saved=rule.saved(ln, (x.detach(),), y))
        params = dict(ln.named_parameters())

        def loss(p, xi, bi, module=ln):
            return (torch.func.functional_call(module, p, (xi,)) * bi).sum()

        want = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x.detach(), b)
        assert set(got) == set(want)
        for name, piece in got.items():
            torch.testing.assert_close(piece.g, want[name].reshape(4, -1), rtol=1e-10, atol=1e-12)
