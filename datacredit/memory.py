"""The default memory budget of the methods' query-side buffers: one policy for every method.

Scoring many queries keeps a prepared query side in memory (Influence's preconditioned weights, ``Q × numel``;
exact Grad-Dot's materialized query gradients, ``Q × numel``). By default each may take :data:`FRACTION` of the
memory of the device it lives on: the accelerator's total memory, or on the CPU the machine's physical memory
(4 GiB when the OS does not say). Past it, Influence splits the queries into rounds (one pass over the training
set each); Grad-Dot too where the extra passes cost less than keeping the overflow factored (pairwise products), else
pairwise (:func:`datacredit.methods.querygram.plan`). Per call: ``Influence(..., query_batch=)``; for everything else,
change :data:`FRACTION`.
"""

from __future__ import annotations

import os

import torch

FRACTION = 0.25


def memory_budget(device: torch.device | str = "cpu") -> int:
    """Bytes a method's prepared query side may hold by default on ``device``: :data:`FRACTION` of its memory."""
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 16 * 2**30
    return int(FRACTION * total)
