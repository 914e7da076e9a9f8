"""Benchmark scripts, their tables, and the benchmark package :mod:`benchmarks.bench` (cases, peer adapters,
process isolation, the report). None of it is installed with datacredit: run it from a repository checkout."""
