"""Subnormal floats flushed to zero while datacredit's own products run (CPU).

A float32 below 1.2e-38 (float64: 2.2e-308) is *subnormal*, and x86 CPUs do arithmetic on it in microcode, tens of
times slower. A language model's output gradient (softmax minus one-hot, over the tokens) is full of them: on the
benchmark GPT (benchmarks/INRUN.md) 36 k of the 147 k entries of the head's output gradient, and one val-first dot
with it took 36 ms of CPU instead of 0.8 ms. Flushing them (SSE's FTZ and DAZ, ``torch.set_flush_denormal``) changes
each product term by less than the smallest normal float times the other factor: far below the rounding of any
value that is not itself subnormal, so the values are the same to float rounding.

The mode is per thread, so :class:`Flushed` switches it on only around our own work (a backward hook's dots, the
validation pass, the values at ``optimizer.step``) and back off when that work returns: the user's forward and
backward never run under it. Where the user has it on already (probed by :func:`flushing`, once per step) or the CPU
cannot do it (``torch.set_flush_denormal`` returns False), nothing is switched.
"""

from __future__ import annotations

import torch

# 1e-30 · 1e-10 = 1e-40 is subnormal in float32: zero exactly when this thread flushes
_PROBE = torch.tensor([1e-30], dtype=torch.float32, device="cpu")  # the CPU thread's mode, whatever the default device


def flushing() -> bool:
    """Whether this thread already flushes subnormal floats to zero (one float32 product, a few µs)."""
    return float(_PROBE * 1e-10) == 0.0


class Flushed:
    """``with Flushed(on):`` flush subnormals to zero on this thread inside the block when ``on``; restores the
    thread's mode on exit. ``on`` is False where the thread flushes already (:func:`flushing`): nothing to do."""

    __slots__ = ("on", "_switched")

    def __init__(self, on: bool):
        self.on = on
        self._switched = False

    def __enter__(self) -> Flushed:
        self._switched = self.on and torch.set_flush_denormal(True)  # False: the CPU cannot, nothing switched
        return self

    def __exit__(self, *exc) -> None:
        if self._switched:
            torch.set_flush_denormal(False)
            self._switched = False
