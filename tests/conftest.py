"""Shared test settings."""

import torch

# The tests use tiny models: one thread avoids oversubscribing CI's 2 cores (measured: an LBFGS fit went from
# 1.0 s to 0.04 s on a loaded machine).
torch.set_num_threads(1)
