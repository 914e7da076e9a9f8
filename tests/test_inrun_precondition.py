"""``optimizers.precondition`` (the fused ``s ⊙ d`` of Adam/AdamW used by In-Run's first order) against ``s`` from
``step_scale`` times ``d``, in float64, on the first step (no ``exp_avg_sq`` yet) and after a few steps."""

import pytest
import torch

from datacredit.optimizers import precondition, step_scale


@pytest.mark.parametrize("cls, kw", [(torch.optim.Adam, {}), (torch.optim.Adam, {"weight_decay": 0.1}),
                                     (torch.optim.AdamW, {"weight_decay": 0.1}),
                                     (torch.optim.Adam, {"betas": (0.8, 0.0)})])
@pytest.mark.parametrize("steps", [0, 3])
def test_precondition_equals_step_scale_times_vector(cls, kw, steps):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 7, generator=gen, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(7, generator=gen, dtype=torch.float64))]
    opt = cls(params, lr=0.01, **kw)
    for _ in range(steps + 1):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if _ < steps:
            opt.step()
    vectors = {p: torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params}
    scales = step_scale(opt)
    got = precondition(opt, vectors, factor=0.7)
    for p in params:
        torch.testing.assert_close(got[p], 0.7 * scales[p] * vectors[p], rtol=1e-12, atol=0)
        assert got[p] is not vectors[p] and vectors[p].abs().sum() > 0  # the input vector is not overwritten
