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

# 1e-300 · 1e-10 = 1e-310 is subnormal in float64: zero exactly when this thread flushes. A Python float product is
# an SSE multiply on this thread (AArch64: an FP multiply under FPCR), so it obeys the same FTZ/DAZ bits that
# torch.set_flush_denormal sets for torch's CPU kernels on this thread. Module globals: the product is not folded
# at compile time. (A float32 tensor product measured 3 µs alone and 35-45 µs inside a training step, issue 16.)
_TINY = 1e-300
_SCALE = 1e-10


def flushing() -> bool:
    """Whether this thread already flushes subnormal floats to zero (one Python float product, ~50 ns)."""
    return _TINY * _SCALE == 0.0


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
