"""Fault injection for resumable builds: kill -9 at random points of a ground-truth build then resume (0 finished
jobs redone, 0 lost, bit-identical results), two builds at once on one store (the second refuses naming the holder,
or waits and trains nothing twice), worker processes that die with their parent (SIGKILL, SIGTERM), and a
directory that holds something else.

Builds under test run in child processes started with ``python -c`` that import this module (``child``); each
training run appends ``<pid> <seed>`` to a log, so who trained which job is known (a job's seed is unique).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from datacredit import StoreError
from datacredit.data import ArrayDataset
from datacredit.evaluate import ClassifierRecipe, build_groundtruth, build_loo, load_groundtruth
from datacredit.evaluate.jobstore import train_seed
from datacredit.lock import LockedError
from datacredit.scores import Scores
from datacredit.store import Store

# the children import this module under the name pytest gave it, so a recipe pickled there matches the config here
IMPORT_ROOT = Path(__file__).resolve().parents[__name__.count(".")]
TINY = ClassifierRecipe(d_in=5, d_out=3, epochs=2, lr=0.1, batch_size=8)
M = 8  # jobs per build (one seed each)
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find worker processes")


@dataclasses.dataclass(frozen=True)
class LoggedRecipe:
    """TINY, logging ``<pid> <seed>`` at the start of every training run and sleeping ``sleep`` seconds (so a
    build lasts long enough to be interrupted). Only ``inner`` is its config: logs and sleeps do not change the
    build, so an interrupted build and its resumption are the same build."""

    inner: ClassifierRecipe
    log: str
    sleep: float = 0.0

    measures = ClassifierRecipe.measures

    def config(self) -> dict:
        return dataclasses.asdict(self.inner)

    def train(self, dataset, seed):
        # one write() of one short line in O_APPEND mode: lines of concurrent processes never interleave
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, f"{os.getpid()} {seed}\n".encode())
        finally:
            os.close(fd)
        time.sleep(self.sleep)
        return self.inner.train(dataset, seed)

    def evaluate(self, model, queries):
        return self.inner.evaluate(model, queries)


def data() -> tuple[ArrayDataset, ArrayDataset]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 5, generator=gen, dtype=torch.float64)
    y = (x[:, :3] + 0.5 * torch.randn(48, 3, generator=gen, dtype=torch.float64)).argmax(1)
    return ArrayDataset(x[:40], y[:40]), ArrayDataset(x[40:], y[40:], ids=np.arange(50, 58))


def build(out: Path | str, log: Path | str, *, sleep: float = 0.0, workers: int = 1, wait: bool = False):
    train, queries = data()
    return build_groundtruth(LoggedRecipe(TINY, str(log), sleep), train, queries, out, m=M, seeds=1, seed=0,
                             workers=workers, backend="process", progress=False, wait=wait)


def child(args: str) -> None:
    """Entry point of a child build: ``build(**json.loads(args))``; writes ``<out>.ready`` just before building.
    A LockedError exits with status 2 and its message on stderr, as the CLI does."""
    torch.set_num_threads(1)
    kw = json.loads(args)
    Path(kw["out"] + ".ready").write_text(str(os.getpid()))
    try:
        build(**kw)
    except LockedError as exc:
        print(f"locked: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def start(out: Path, log: Path, **kw) -> subprocess.Popen:
    args = json.dumps({"out": str(out), "log": str(log), **kw})
    code = f"import sys; sys.path.insert(0, {str(IMPORT_ROOT)!r}); import {__name__} as t; t.child({args!r})"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # its own session: a signal to its process group (as Ctrl-C in a terminal sends) reaches it and its workers only
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True, start_new_session=True)


def wait_for(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def calls(log: Path) -> list[tuple[int, int]]:
    """``(pid, seed)`` of every training run logged so far."""
    if not log.exists():
        return []
    return [(int(p), int(s)) for p, s in (line.split() for line in log.read_text().splitlines())]


def finished(out: Path) -> set[int]:
    """Seeds of the jobs a store holds as finished (their outputs flag is set)."""
    store = Store(out, create=False)
    if not store.has("outputs") or not store.has("train_seeds"):
        return set()
    entry = store.info("outputs")
    flags = np.load(out / entry["chunks"]["file"], allow_pickle=False)
    return set(store.load_array("train_seeds")[flags].tolist())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted build, in this process."""
    tmp = tmp_path_factory.mktemp("reference")
    return build(tmp / "gt", tmp / "log.txt")


def _assert_same(gt, reference) -> None:
    for name, out in reference.outputs.items():
        np.testing.assert_array_equal(gt.outputs[name], out)  # bit-identical
    np.testing.assert_array_equal(gt.masks, reference.masks)


# -- kill -9 at random points, then resume ---------------------------------------------------------------------
def _kill_and_resume(tmp: Path, trials: int, reference, seed: int) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    totals = {"trials": trials, "finished_before_kill": 0, "redone": 0, "lost": 0, "resumed_jobs": 0}
    all_seeds = set(load_seeds(reference))
    for trial in range(trials):
        out, log = tmp / f"gt{trial}", tmp / f"log{trial}.txt"
        proc = start(out, log, sleep=0.03)
        ready = Path(str(out) + ".ready")
        wait_for(ready.exists, what="the child build to start")
        # a random point of the build: once k of its M jobs have started (k = 0: before the store exists, or while
        # it is being set up), plus a random part of a job's time, so kills land in training and in writing
        k = int(rng.integers(0, M + 1))
        wait_for(lambda k=k, log=log, proc=proc: len(calls(log)) >= k or proc.poll() is not None,
                 what=f"job {k} to start")
        time.sleep(rng.uniform(0.0, 0.06))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        done_before = finished(out) if (out / "manifest.json").exists() else set()
        resume_log = tmp / f"resume{trial}.txt"
        gt = build(out, resume_log)
        rerun = {s for _, s in calls(resume_log)}
        totals["finished_before_kill"] += len(done_before)
        totals["redone"] += len(done_before & rerun)
        totals["lost"] += len(all_seeds - done_before - rerun)
        totals["resumed_jobs"] += len(rerun)
        assert len(calls(resume_log)) == len(rerun)  # no job ran twice within the resumed build
        _assert_same(gt, reference)
        _assert_same(load_groundtruth(out), reference)
    return totals


def load_seeds(gt) -> list[int]:
    """The training seed of every job of ``gt``, in job order (unique per job)."""
    return [train_seed(gt.config["seed"], k, r) for k in range(gt.m) for r in range(gt.seeds)]


def test_kill_9_at_random_points_then_resume(tmp_path, reference):
    totals = _kill_and_resume(tmp_path, 2, reference, seed=0)
    print("kill -9 then resume:", totals)
    assert totals["redone"] == 0 and totals["lost"] == 0


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_many(tmp_path, reference):
    totals = _kill_and_resume(tmp_path, 12, reference, seed=1)
    print("kill -9 then resume:", totals)
    assert totals["redone"] == 0 and totals["lost"] == 0
    assert totals["finished_before_kill"] > 0  # some kills landed after jobs had finished, so resumption was tested


# -- two builds on one store -----------------------------------------------------------------------------------
def test_two_builds_at_once_train_each_job_once_and_a_third_is_refused_naming_the_holder(tmp_path, reference):
    out, log = tmp_path / "gt", tmp_path / "log.txt"
    procs = [start(out, log, sleep=0.1, wait=True) for _ in range(2)]  # started together on a fresh directory
    wait_for(lambda: len(calls(log)) >= 1, what="a first job")
    holder = calls(log)[0][0]
    with pytest.raises(LockedError, match=r"held by pid (\d+) on host .*; wait for it") as refused:
        build(out, log)  # without wait: refused at once, naming the holder
    assert f"held by pid {holder} " in str(refused.value)
    assert os.getpid() not in {pid for pid, _ in calls(log)}  # the refused build trained nothing
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    gt = build(out, log, wait=True)  # nothing left to do
    seeds = [s for _, s in calls(log)]
    assert sorted(seeds) == sorted(load_seeds(reference))  # 0 duplicated, 0 missing
    assert {pid for pid, _ in calls(log)} == {holder}  # the other waited, then found every job done
    _assert_same(gt, reference)
    _assert_same(load_groundtruth(out), reference)


# -- workers die with their parent -----------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc's parent links)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _workers_running(tmp: Path) -> tuple[subprocess.Popen, list[int], Path, Path]:
    out, log = tmp / "gt", tmp / "log.txt"
    proc = start(out, log, sleep=1.0, workers=2)
    # both workers have started a job: they are up and busy
    wait_for(lambda: len({pid for pid, _ in calls(log)}) >= 2, timeout=120, what="two busy workers")
    workers = _descendants(proc.pid)
    assert {pid for pid, _ in calls(log)} <= set(workers)
    return proc, workers, out, log


@linux_only
def test_workers_die_when_the_main_process_is_killed(tmp_path):
    proc, workers, _, _ = _workers_running(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    wait_for(lambda: not any(_alive(p) for p in workers), timeout=5, what=f"workers {workers} to exit")


@pytest.mark.slow
@linux_only
@pytest.mark.parametrize(("how", "status"), [("SIGTERM", 143), ("SIGINT to the process group", 130)])
def test_sigterm_or_ctrl_c_stops_the_workers_and_keeps_what_is_done(tmp_path, reference, how, status):
    proc, workers, out, log = _workers_running(tmp_path)
    time.sleep(1.2)  # let a job or two finish
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: workers get it too
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == status, err
    assert "Traceback" not in err  # neither the main process nor any worker prints one
    wait_for(lambda: not any(_alive(p) for p in workers), timeout=5, what=f"workers {workers} to exit")
    done = finished(out)
    resume_log = tmp_path / "resume.txt"
    gt = build(out, resume_log)
    rerun = {s for _, s in calls(resume_log)}
    assert not done & rerun and done | rerun == set(load_seeds(reference))
    _assert_same(gt, reference)


# -- a directory holding something else ------------------------------------------------------------------------
def test_a_directory_holding_scores_or_another_build_is_refused(tmp_path, reference):
    train, queries = data()
    scores = Scores(np.ones((40, 2)), np.arange(40), np.array([7, 8]), "grad-dot")
    scores.save(tmp_path / "scores")
    with pytest.raises(StoreError, match=r"holds a saved Scores result \(method 'grad-dot'.*--overwrite"):
        build(tmp_path / "scores", tmp_path / "log.txt")
    np.testing.assert_array_equal(Scores.load(tmp_path / "scores").values, scores.values)  # untouched
    assert not calls(tmp_path / "log.txt")
    build_loo(TINY, train, queries, tmp_path / "loo", indices=[0], backend="serial", progress=False)
    with pytest.raises(StoreError, match=r"holds a leave-one-out ground truth \(build_loo\), not a subset"):
        build(tmp_path / "loo", tmp_path / "log.txt")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file, not a directory"):
        build(tmp_path / "file", tmp_path / "log.txt")
    assert not calls(tmp_path / "log.txt")
    # overwrite replaces what is there
    train, queries = data()
    gt = build_groundtruth(LoggedRecipe(TINY, str(tmp_path / "log.txt")), train, queries, tmp_path / "scores", m=M,
                           seeds=1, backend="serial", progress=False, overwrite=True)
    _assert_same(gt, reference)
    with pytest.raises(StoreError):
        Scores.load(tmp_path / "scores")
