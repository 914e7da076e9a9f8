"""Shared test settings and fixtures."""

import pytest
import torch

# The tests use tiny models: one thread avoids oversubscribing CI's 2 cores (measured: an LBFGS fit went from
# 1.0 s to 0.04 s on a loaded machine).
torch.set_num_threads(1)


@pytest.fixture
def float64():
    """The slow twins compare in float64; the default dtype is restored afterwards (no global switch left flipped)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
