"""BuildLock and manifest_lock: a second holder is refused (or waits), a killed holder frees the lock."""

import os
import signal
import subprocess
import sys
import time

import pytest

from datacredit.lock import BuildLock, LockedError, manifest_lock

HOLD = ("import sys, time; from datacredit.lock import BuildLock; BuildLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(60)")


def _holder(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_is_refused_with_the_holders_pid(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(LockedError, match=f"pid {proc.pid} on host"):
            BuildLock(tmp_path).acquire()
        with pytest.raises(LockedError, match="after waiting"):
            BuildLock(tmp_path, wait=True, timeout=0.3).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with BuildLock(tmp_path) as lock:
        assert lock.held


def test_waiter_gets_the_lock_when_the_holder_exits(tmp_path):
    proc = _holder(tmp_path)
    start = time.monotonic()
    subprocess.Popen(["sh", "-c", f"sleep 0.5; kill {proc.pid}"])
    with BuildLock(tmp_path, wait=True, timeout=30):
        assert time.monotonic() - start >= 0.4
    proc.wait()


def test_same_process_cannot_hold_twice(tmp_path):
    with BuildLock(tmp_path), pytest.raises(LockedError):
        BuildLock(tmp_path).acquire()
    with manifest_lock(tmp_path):
        pass


FORK_THEN_EXIT = ("import os, sys, time; from datacredit.lock import BuildLock; BuildLock(sys.argv[1]).acquire()\n"
                  "if os.fork() == 0:\n    time.sleep(30); os._exit(0)\n"
                  "print('forked', flush=True); os._exit(0)")


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_exits(tmp_path):
    """A fork-started helper that outlives the build must not hold the build lock in the dead parent's name."""
    proc = subprocess.Popen([sys.executable, "-c", FORK_THEN_EXIT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "forked"
    proc.wait()
    with BuildLock(tmp_path, wait=True, timeout=10) as lock:  # the child still sleeps, without the lock
        assert lock.held
