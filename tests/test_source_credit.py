"""benchmarks/source_credit.py's job plan: the defaults give the jobs and store key of the runs made before
``--seed-offset``/``--halves-seed`` existed (so their caches resume), and the options move only what they name."""

from __future__ import annotations

import numpy as np

from benchmarks.source_credit import plan

KEYS = np.array([f"s{k}" for k in range(10) for _ in range(3)] + ["random"] * 3)


def old_jobs(keys: np.ndarray, seeds: int, halves: int):
    """The job list as groundtruth() built it before the options (copied from commit 309e3b6)."""
    names = np.unique(keys)
    rng = np.random.default_rng(1)
    masks = np.stack([rng.permutation(len(names)) < len(names) // 2 for _ in range(halves)])
    subsets = [np.ones(len(keys), bool)] + [keys != n for n in names] + [np.isin(keys, names[h]) for h in masks]
    return masks, [(np.flatnonzero(mask), seed) for mask in subsets for seed in range(seeds)]


def same_jobs(a, b) -> bool:
    return len(a) == len(b) and all(pa.tolist() == pb.tolist() and sa == sb for (pa, sa), (pb, sb) in zip(a, b))


def test_defaults_reproduce_the_old_jobs_and_store_key():
    masks, jobs = old_jobs(KEYS, 3, 6)
    subsets, half_masks, new_jobs, meta = plan(KEYS, 3, 6)
    assert (half_masks == masks).all()
    assert same_jobs(new_jobs, jobs)
    assert subsets.shape == (1 + 11 + 6, len(KEYS))
    assert meta == {"seeds": 3, "halves": 6}  # the old key, plus recipe and n_train added by groundtruth()


def test_seed_offset_moves_only_the_seeds():
    _, jobs = old_jobs(KEYS, 4, 5)
    _, half_masks, moved, meta = plan(KEYS, 4, 5, seed_offset=100)
    assert [s for _, s in moved] == [s + 100 for _, s in jobs]
    assert same_jobs([(p, s - 100) for p, s in moved], jobs)
    assert (half_masks == old_jobs(KEYS, 4, 5)[0]).all()
    assert meta["seed_offset"] == 100 and "halves_seed" not in meta


def test_halves_seed_draws_other_halves_and_keys_the_store():
    _, old, _, _ = plan(KEYS, 2, 24)
    subsets, fresh, jobs, meta = plan(KEYS, 2, 24, halves_seed=2)
    assert not (fresh == old).all()
    assert (fresh.sum(1) == 5).all()  # still halves of the 11 sources (floor)
    assert meta["halves_seed"] == 2 and "seed_offset" not in meta
    names = np.unique(KEYS)
    for h, mask in zip(fresh, subsets[12:]):
        assert (mask == np.isin(KEYS, names[h])).all()
