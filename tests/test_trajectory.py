"""Trajectory recording: metadata (lr, momentum, steps), a killed run resumed exactly, load_into round trip."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from datacredit.errors import DataError, StoreError
from datacredit.models import mlp
from datacredit.trajectory import Trajectory, TrajectoryRecorder

X = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))


def batch_for(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic batch per step, so a resumed run sees the same data as an uninterrupted one."""
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(step))[:8]
    return X[idx], Y[idx]


def fresh():
    torch.manual_seed(0)
    model = mlp(5, 7, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt


def train(model, opt, recorder, start: int, stop: int, crash_at: int | None = None, scheduler=None):
    for step in range(start, stop):
        if step == crash_at:
            raise KeyboardInterrupt
        x, y = batch_for(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        recorder.step()
        if scheduler is not None:
            scheduler.step()


def test_metadata_lr_momentum_steps(tmp_path):
    model, opt = fresh()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    recorder = TrajectoryRecorder(model, tmp_path / "t", optimizer=opt, at_steps=[0, 3, 8], steps_per_epoch=4)
    train(model, opt, recorder, 0, 10, scheduler=sched)
    recorder.save()  # the final state, off the schedule
    traj = Trajectory.load(tmp_path / "t")
    assert traj.steps.tolist() == [0, 3, 8, 10]
    assert [c.steps for c in traj] == [0, 3, 5, 2]
    # lr in force: 0.1 for steps 0-3, 0.05 for 4-7, 0.025 for 8-11
    assert traj.lrs.tolist() == pytest.approx([0.1, 0.1, 0.05, 0.025])
    assert [c.lr_sum for c in traj] == pytest.approx([0.0, 0.3, 0.1 + 4 * 0.05, 2 * 0.025])
    assert all(c.momentum == 0.9 for c in traj)
    assert traj[2].epoch == 2.0 and traj[2].hyper["lr"] == pytest.approx(0.05)
    assert not [p for p in os.listdir(tmp_path / "t") if p.endswith(".tmp")]
    # only the latest optimizer state is kept
    assert sum(n.startswith("optimizer-") for n in traj.store.names()) == 1


def test_load_into_round_trip(tmp_path):
    model, opt = fresh()
    recorder = TrajectoryRecorder(model, tmp_path / "t", optimizer=opt, every=2)
    snapshots = {}
    for step in range(6):
        x, y = batch_for(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if recorder.step() is not None:
            snapshots[step + 1] = {k: v.clone() for k, v in model.state_dict().items()}
    traj = Trajectory.load(tmp_path / "t")
    assert traj.steps.tolist() == [2, 4, 6]
    other = mlp(5, 7, 3)
    for k, step in enumerate(traj.steps):
        traj.load_into(other, k)
        for name, value in other.state_dict().items():
            torch.testing.assert_close(value, snapshots[int(step)][name], rtol=0, atol=0)
    assert traj.digest(0) != traj.digest(1)
    assert [t.steps.tolist() for t in traj.segments(2)] == [[2, 4], [6]]
    assert traj.select([2, 0]).steps.tolist() == [6, 2]


def test_killed_run_resumes_exactly(tmp_path):
    model, opt = fresh()
    recorder = TrajectoryRecorder(model, tmp_path / "full", optimizer=opt, every=3)
    train(model, opt, recorder, 0, 12)
    full = Trajectory.load(tmp_path / "full")

    model, opt = fresh()
    recorder = TrajectoryRecorder(model, tmp_path / "run", optimizer=opt, every=3)
    with pytest.raises(KeyboardInterrupt):
        train(model, opt, recorder, 0, 12, crash_at=8)  # killed after the checkpoint at 6, two steps lost
    assert Trajectory.load(tmp_path / "run").steps.tolist() == [3, 6]

    model, opt = fresh()  # a new process: fresh objects, the same directory
    recorder = TrajectoryRecorder(model, tmp_path / "run", optimizer=opt, every=3)
    start = recorder.resume()
    assert start == 6
    train(model, opt, recorder, start, 12)
    resumed = Trajectory.load(tmp_path / "run")
    assert resumed.steps.tolist() == full.steps.tolist() == [3, 6, 9, 12]
    assert [c.steps for c in resumed] == [3, 3, 3, 3]
    for k in range(len(full)):
        a, b = full.state_dict(k), resumed.state_dict(k)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)  # momentum buffers were restored too


def test_reopening_without_resume_continues_the_count(tmp_path):
    model, opt = fresh()
    recorder = TrajectoryRecorder(model, tmp_path / "t", optimizer=opt, every=2)
    train(model, opt, recorder, 0, 4)
    again = TrajectoryRecorder(model, tmp_path / "t", optimizer=opt, every=2)
    assert again.global_step == 4
    train(model, opt, again, 4, 6)
    assert Trajectory.load(tmp_path / "t").steps.tolist() == [2, 4, 6]
    over = TrajectoryRecorder(model, tmp_path / "t", optimizer=opt, every=2, overwrite=True)
    assert over.global_step == 0
    with pytest.raises(StoreError, match="no checkpoints"):
        Trajectory.load(tmp_path / "t")


def test_lr_without_optimizer_and_in_memory_trajectories(tmp_path):
    model, _ = fresh()
    recorder = TrajectoryRecorder(model, tmp_path / "t", lr=lambda step: 1.0 / (step + 1), every=2)
    for _ in range(4):
        recorder.step()
    traj = Trajectory.load(tmp_path / "t")
    assert traj.lrs.tolist() == pytest.approx([1 / 2, 1 / 4])
    assert [c.lr_sum for c in traj] == pytest.approx([1 + 1 / 2, 1 / 3 + 1 / 4])
    with pytest.raises(StoreError):
        traj.load_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))

    mem = Trajectory.from_states([model, model.state_dict()], lrs=[0.5, 0.25], steps=[10, 5])
    assert mem.steps.tolist() == [10, 15] and mem[1].lr_sum == pytest.approx(1.25)
    assert mem.digest(0) == mem.digest(1)


def test_bad_arguments(tmp_path):
    model, opt = fresh()
    with pytest.raises(ValueError, match="either"):
        TrajectoryRecorder(model, tmp_path / "a", optimizer=opt, every=2, at_steps=[3])
    with pytest.raises(ValueError, match="positive"):
        TrajectoryRecorder(model, tmp_path / "a", every=0)
    with pytest.raises(ValueError, match="not both"):
        TrajectoryRecorder(model, tmp_path / "a", optimizer=opt, lr=0.1)
    with pytest.raises(StoreError):
        Trajectory.load(tmp_path / "missing")
    with pytest.raises(DataError, match="lrs"):
        Trajectory.from_states([model], lrs=[0.1, 0.2])
    with pytest.raises(DataError, match="out of range"):
        Trajectory.from_states([model])[3]
