"""What the capture engine cannot see is computed right or refused by name (issue 13 item 5, issue 16).

Each case: exact agreement with the torch.func twin (float64), or an error naming the module / parameter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datacredit.capture.engine as engine
from datacredit import ClassificationTask
from datacredit.capture import Capture, LayerRule, example_grads, rule_for
from datacredit.capture.linear import LinearRule
from datacredit.errors import DataError, UnsupportedModuleError
from datacredit.methods.graddot import GradDot

from .helpers import TOL, FunctionalReuse, torch_func_grads

pytestmark = pytest.mark.usefixtures("float64")


def capture(model, task, batch):
    with Capture(model) as cap:
        return example_grads(cap, task.loss(model, batch))


def assert_twin(model, task, batch):
    """Per-example gradients equal torch.func's, parameter by parameter."""
    got = capture(model, task, batch)
    ref = torch_func_grads(model, task, batch)
    assert set(got.names) == set(ref)
    for name, g in got.materialize().items():
        torch.testing.assert_close(g, ref[name], **TOL)
    return got


def problem(n=6, d=4, t=None):
    torch.manual_seed(0)
    x = torch.randn(n, d) if t is None else torch.randn(n, t, d)
    return x, torch.randint(0, 3, (n,))


# -- item 1: rules match only the forward they implement --------------------------------------------------------------
class ScaledLinear(nn.Linear):
    def __init__(self, *args):
        super().__init__(*args)
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return super().forward(x) * self.scale


class SquaredInput(nn.Linear):
    def forward(self, x):
        return F.linear(x * x, self.weight, self.bias)


class StandardizedConv(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):  # weight standardization: forward untouched, the conv is not
        return super()._conv_forward(x, (weight - weight.mean()) / (weight.std() + 1e-5), bias)


class ConstructionOnly(nn.Linear):
    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out, bias=False)


@pytest.mark.parametrize("module, why", [
    (ScaledLinear(4, 3), r"ScaledLinear defines \['forward'\]"),
    (SquaredInput(4, 3), r"SquaredInput defines \['forward'\]"),
    (StandardizedConv(1, 2, 2), r"StandardizedConv defines \['_conv_forward'\]"),
])
def test_subclass_that_changes_the_forward_is_refused_by_name(module, why):
    model = nn.Sequential(nn.Flatten(0, 0), module)
    assert rule_for(module) is None
    with pytest.raises(UnsupportedModuleError, match=rf"'1' of type .*{type(module).__qualname__}.*{why}"
                                                     r".*datacredit\.capture\.register"):
        Capture(model)


def test_extra_parameter_on_a_registered_type_is_refused():
    """Old-style weight norm keeps the class nn.Linear but trains weight_g / weight_v (no rule knows them)."""
    lin = nn.Linear(4, 3)
    lin.register_parameter("extra", nn.Parameter(torch.ones(3)))
    with pytest.raises(UnsupportedModuleError, match=r"'0'.*\['extra'\].*'linear' rule"):
        Capture(nn.Sequential(lin))


def test_construction_only_subclass_keeps_the_rule_and_is_exact():
    assert rule_for(ConstructionOnly(4, 3)).name == "linear"
    assert rule_for(nn.MultiheadAttention(4, 2).out_proj).name == "linear"  # NonDynamicallyQuantizableLinear
    model = nn.Sequential(ConstructionOnly(4, 5), nn.Tanh(), nn.Linear(5, 3))
    assert_twin(model, ClassificationTask(), problem())


def test_a_rule_registered_for_the_subclass_is_used():
    from datacredit.capture import register
    from datacredit.capture.registry import _RULES

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    @register(Doubled)
    class DoubledRule(LayerRule):
        name, params = "doubled", ("weight", "bias")

        def pieces(self, module, inputs, grad_output):
            return LinearRule().pieces(module, inputs, 2 * grad_output)

    try:
        assert_twin(nn.Sequential(Doubled(4, 5), nn.Tanh(), nn.Linear(5, 3)), ClassificationTask(), problem())
    finally:
        del _RULES[Doubled]


# -- item 2: a tracked parameter used outside its module's call -----------------------------------------------------
class TiedByHand(nn.Module):
    """Output layer tied to the embedding as ``h @ emb.weight.T``: the second use is no module call."""

    def __init__(self, vocab=7, d=4):
        super().__init__()
        self.tok, self.mix = nn.Embedding(vocab, d), nn.Linear(d, d)

    def forward(self, idx):
        return torch.tanh(self.mix(self.tok(idx))).mean(1) @ self.tok.weight.T


def test_weight_used_by_f_linear_is_named():
    with pytest.raises(UnsupportedModuleError, match=r"'b\.weight' \(off by .*%\).*F\.linear"):
        capture(FunctionalReuse(), ClassificationTask(), problem())


def test_functional_tying_is_named():
    torch.manual_seed(0)
    batch = (torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5,)))
    with pytest.raises(UnsupportedModuleError, match=r"'tok\.weight'.*do not add up"):
        capture(TiedByHand(), ClassificationTask(), batch)


def test_the_check_runs_once_per_capture_and_through_methods():
    """Grad-Dot (any method on example_grads) refuses the model; a clean model costs one extra backward, once."""
    x, y = problem()
    data = torch.utils.data.TensorDataset(x, y)
    with pytest.raises(UnsupportedModuleError, match=r"'b\.weight'"):
        GradDot(FunctionalReuse(), ClassificationTask(), progress=False).fit(data).score(data)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    calls = []
    real = engine._verify
    engine._verify = lambda *a: calls.append(1) or real(*a)
    try:
        with Capture(model) as cap:
            for _ in range(3):
                example_grads(cap, ClassificationTask().loss(model, (x, y)))
    finally:
        engine._verify = real
    assert calls == [1] and cap.verified


def test_multihead_attention_is_refused_by_name():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.att(x, x, x)[0].mean(1))

    model = Attn()
    with pytest.raises(UnsupportedModuleError, match=r"'att' of type .*MultiheadAttention.*functionally"):
        Capture(model)
    for p in (model.att.in_proj_weight, model.att.in_proj_bias):
        p.requires_grad_(False)
    with pytest.raises(UnsupportedModuleError, match=r"'att\.out_proj'.*out_proj of nn\.MultiheadAttention 'att'"):
        Capture(model)
    for p in model.att.parameters():
        p.requires_grad_(False)
    assert_twin(model, ClassificationTask(), problem(t=3))  # frozen attention: the head is exact


# -- item 3: in-place ops after a tracked layer ----------------------------------------------------------------------
class InplaceAfter(nn.Module):
    def __init__(self, seq: bool):
        super().__init__()
        self.seq = seq
        self.a, self.act, self.b = nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)
        self.ln = nn.LayerNorm(5)

    def forward(self, x):
        h = self.act(self.a(x))  # (N, T, 5): the Linear's output is a view, and ReLU_ rewrites its history
        h = self.ln(h)
        h.mul_(2.0)  # in place on the LayerNorm's output as well
        out = self.b(h)
        return out.mean(1) if self.seq else out


@pytest.mark.parametrize("seq", [False, True])
def test_inplace_op_after_a_tracked_layer_is_exact(seq):
    x, y = problem(t=3 if seq else None)
    got = assert_twin(InplaceAfter(seq), ClassificationTask(), (x, y))
    assert {"a.weight", "a.bias", "ln.weight", "ln.bias"} <= set(got.names)  # no layer lost


def test_a_lost_hook_is_raised_by_name(monkeypatch):
    """The safety net: were the hook put on the view's own node, the in-place op would orphan it; collect must then
    refuse naming the layer rather than drop it."""
    monkeypatch.setattr(engine, "_own_base", lambda base, inputs: False)
    with pytest.raises(UnsupportedModuleError, match=r"output of module 'a' .*modified in place"):
        capture(InplaceAfter(True), ClassificationTask(), problem(t=3))


def test_input_modified_in_place_after_the_call_is_refused():
    class Later(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.a.weight.requires_grad_(False)  # autograd saves no input, so only our check sees the change

        def forward(self, x):
            out = self.a(x)
            x.mul_(2.0)
            return out

    with pytest.raises(UnsupportedModuleError, match=r"input of module 'a'"):
        capture(Later(), ClassificationTask(), problem())


# -- item 4: per-example loss shape, batch dimension first --------------------------------------------------------
class ShortLoss(ClassificationTask):
    def loss(self, model, batch):
        return super().loss(model, batch)[:-1]


class BatchSecond(nn.Module):
    """Takes ``(N, T, d)`` but runs its layers on ``(T, N, d)``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.transpose(0, 1)))).mean(0)


def test_loss_with_one_value_too_few_is_a_data_error():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(DataError, match=r"shape \(5,\).*leading dimension is \[6\]"):
        capture(model, ShortLoss(), problem())
    x, y = problem()
    with pytest.raises(DataError, match=r"shape \(6,\); got \(5,\)"):
        with Capture(model) as cap:
            example_grads(cap, ShortLoss().loss(model, (x, y)), ids=list(range(6)))


def test_batch_second_model_is_refused_with_batch_dimension_first():
    x, y = problem(t=5)
    with pytest.raises(DataError, match="batch dimension first"):
        capture(BatchSecond(), ClassificationTask(), (x, y))
    x, y = problem(t=6)  # T == N: shapes agree, only the weighted check sees the mixing
    with pytest.raises(UnsupportedModuleError, match="batch dimension first"):
        capture(BatchSecond(), ClassificationTask(), (x, y))
