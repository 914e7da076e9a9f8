"""Slow, obviously-correct references shared by the tests: torch.func per-example gradients."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from datacredit.task import Task

TOL = {"rtol": 1e-9, "atol": 1e-10}  # float64 everywhere in the twins


class SquashTask(Task):
    """Per-example loss ``Σ tanh(module(x)) ⊙ C``: nonlinear, so every position's gradient differs."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        out = torch.tanh(model(x))
        return (out * self.weights).reshape(out.shape[0], -1).sum(1)


def torch_func_grads(model: nn.Module, task: Task, batch, measurement: bool = False) -> dict[str, torch.Tensor]:
    """Per-example gradients ``{name: (N, *shape)}`` by ``vmap(grad(...))`` over single examples (tied weights tied)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    fn = task.measurement if measurement else task.loss
    items = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)

    def single(p, *example):
        one = tuple(e.unsqueeze(0) for e in example)
        call = lambda *a, **kw: functional_call(model, p, a, kw)  # noqa: E731
        return fn(call, one if isinstance(batch, (tuple, list)) else one[0])[0]

    return vmap(grad(single), in_dims=(None, *([0] * len(items))))(params, *items)


def flat(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    n = next(iter(grads.values())).shape[0]
    return torch.cat([grads[k].reshape(n, -1) for k in names], dim=1)


class FunctionalReuse(nn.Module):
    """A tracked Linear whose weight is also used outside its module call (``F.linear``): the engine must notice."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) + torch.nn.functional.linear(h, self.b.weight)


def trained_relu_mlp(n: int, *, blank_inputs: int = 0, steps: int = 50):
    """A float64 ReLU MLP 6-9-3 trained ``steps`` full-batch SGD steps on ``n`` random examples (seed 0), and the
    examples ``(x, y)``: dead units give exact zeros in the output gradients ``u``; the first ``blank_inputs``
    input columns are zero (exact zeros in ``v``)."""
    import torch.nn.functional as F

    from datacredit.models import mlp

    torch.manual_seed(0)
    x, y = torch.randn(n, 6, dtype=torch.float64), torch.randint(0, 3, (n,))
    x[:, :blank_inputs] = 0
    model = mlp(6, [9], 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def slow_influence(inf, model, task, train, test, damping) -> np.ndarray:
    """The slow twin of a fitted ``Influence``'s scores, ``(n_train, n_query)``: torch.func training gradients times
    the curvature's own ``apply_inverse`` of the torch.func query gradients (``train``/``test``: ArrayDatasets)."""
    names = list(inf.params)
    g_train = flat(torch_func_grads(model, task, train.tensors), names)
    q = torch_func_grads(model, task, test.tensors, measurement=True)
    pre = inf.curvature.apply_inverse({k: q[k] for k in names}, damping)
    return (g_train @ flat(pre, names).T).numpy()
