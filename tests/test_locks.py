"""The locks (workers.runtime.frames.ShmLock): exclusion and release-on-death come from the kernel.

Real processes take one byte of a run's lock file; the test kills holders with
SIGKILL (only processes it started, by pid) and checks exclusion with counters
in shared memory that the lock itself knows nothing about.
"""
from __future__ import annotations

import os
import queue
import random
import select
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from proto.layout import Segment, create_lock_file, new_run_name, seg_name, unlink_lock_file
from workers.runtime.frames import ShmLock
from workers.actors.supervisor import run_entries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# slots of the counters segment
STOP, STATE, SAVED, CTR, OWNER, VIOLATIONS, ROLLBACKS, HOLDERS, PARK = range(9)

PRELUDE = """
import os, sys, numpy as np
from proto.layout import Segment, seg_name
from workers.runtime.frames import ShmLock
run, kind = sys.argv[1], sys.argv[2]
seg = Segment.attach(seg_name(run, "counters"))
c = seg.view(np.int64, 0, 9)
lk = ShmLock.frame_lock(run) if kind == "frame_lock" else ShmLock.ptl(run, 0)
me = os.getpid()
STOP, STATE, SAVED, CTR, OWNER, VIOLATIONS, ROLLBACKS, HOLDERS, PARK = range(9)
"""

# A critical section that a SIGKILL can cut anywhere and that the next holder repairs
# (as the supervisor repairs what a dead actor left): STATE is 2 x completed sections,
# plus 1 while one is in progress; a holder that finds it odd rolls CTR back to SAVED
# (ROLLBACKS counted first: a repair cut short is counted again, never missed).
# Inside, OWNER is a canary: a second holder overwrites it, and the first one sees it.
# CTR is incremented by non-atomic read-modify-write steps: two holders lose increments.
# PARK == -1 asks the holder to stop halfway, lock held, and say so (PARK = its pid).
HAMMER = PRELUDE + """
import random, time
steps = int(sys.argv[3])
rng = random.Random(me)
while not c[STOP]:
    lk.acquire(60)
    if c[STATE] & 1:
        c[ROLLBACKS] += 1
        c[CTR] = c[SAVED]
        c[STATE] -= 1
    c[SAVED] = c[CTR]
    c[STATE] += 1
    c[OWNER] = me
    for i in range(steps):
        v = c[CTR]
        if c[OWNER] != me:
            c[VIOLATIONS] += 1
        c[CTR] = v + 1
        if i == steps // 2 and c[PARK] == -1:
            c[PARK] = me
            while True:
                time.sleep(0.01)
    if c[OWNER] != me:
        c[VIOLATIONS] += 1
    c[STATE] += 1
    lk.release()
    time.sleep(rng.uniform(0, 0.0005))   # let the others in: a polled lock is not fair
"""

HOLD = PRELUDE + """
print("waiting", flush=True)
lk.acquire(30)
c[OWNER] = me
c[HOLDERS] += 1
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def run():
    """A run name with a lock file and a counters segment, all unlinked afterwards."""
    name = new_run_name()
    create_lock_file(name)
    seg = Segment.create(seg_name(name, "counters"), 4096)
    seg.close()
    yield name
    Segment.unlink(seg_name(name, "counters"))
    unlink_lock_file(name)
    assert run_entries(name) == []


@pytest.fixture
def counters(run):
    seg = Segment.attach(seg_name(run, "counters"))
    yield seg.view(np.int64, 0, 9)
    seg.close()


class Procs:
    """Processes this test started: each one's stdout lines on a queue; kill by pid, reap with a timeout."""

    def __init__(self):
        self.procs: dict[int, subprocess.Popen] = {}
        self.lines: dict[int, queue.Queue] = {}

    def start(self, script: str, *args) -> int:
        p = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        q = queue.Queue()
        threading.Thread(target=lambda: [q.put(line.strip()) for line in p.stdout], daemon=True).start()
        self.procs[p.pid], self.lines[p.pid] = p, q
        return p.pid

    def line(self, pid: int, timeout: float = 30.0) -> str:
        try:
            return self.lines[pid].get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"pid {pid} printed nothing for {timeout}s: {self.stderr(pid)}") from None

    def stderr(self, pid: int) -> str:
        p = self.procs[pid]
        return p.stderr.read() if p.poll() is not None else "(still running)"

    def kill(self, pid: int) -> None:
        p = self.procs[pid]
        p.kill()
        p.wait(10)

    def wait(self, pid: int, timeout: float = 60.0) -> int:
        return self.procs[pid].wait(timeout)

    def close(self) -> None:
        for pid, p in self.procs.items():
            if p.poll() is None:
                p.kill()
            p.wait(10)
            for f in (p.stdin, p.stdout, p.stderr):
                f.close()


@pytest.fixture
def procs():
    ps = Procs()
    yield ps
    ps.close()


def wait_for(cond, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


def own_lock(run: str, kind: str) -> ShmLock:
    return ShmLock.frame_lock(run) if kind == "frame_lock" else ShmLock.ptl(run, 0)


@pytest.mark.parametrize("kind,seed", [("frame_lock", 1), ("ptl", 2)])
def test_sigkill_hammer_never_lets_two_holders_in(run, counters, procs, kind, seed):
    """Kill -9 workers at random moments, and every third time a holder halfway through."""
    workers, kills, steps = 4, 12, 1500
    rng = random.Random(seed)
    c = counters
    live = [procs.start(HAMMER, run, kind, steps) for _ in range(workers)]
    parked = 0
    for k in range(kills):
        done = int(c[STATE]) // 2
        wait_for(lambda: int(c[STATE]) // 2 >= done + 2, what="two more critical sections")
        if k % 3 == 0:
            c[PARK] = -1
            wait_for(lambda: int(c[PARK]) in live, what="a holder to stop halfway")
            victim = int(c[PARK])
            parked += 1
        else:
            pause, victim = rng.uniform(0, 0.02), rng.choice(live)
            time.sleep(pause)                            # a random moment
        procs.kill(victim)
        c[PARK] = 0
        live.remove(victim)
        live.append(procs.start(HAMMER, run, kind, steps))
    c[STOP] = 1
    for pid in live:
        assert procs.wait(pid) == 0, procs.stderr(pid)
    lk = own_lock(run, kind)
    try:
        lk.acquire(5)                   # not stuck, although holders were killed while holding
        if c[STATE] & 1:                # the last section was cut and nobody came after it
            c[ROLLBACKS] += 1
            c[CTR] = c[SAVED]
            c[STATE] -= 1
        completed = int(c[STATE]) // 2
        assert int(c[VIOLATIONS]) == 0
        assert int(c[CTR]) == steps * completed
        assert completed >= 2 * kills
        assert int(c[ROLLBACKS]) >= parked == kills // 3     # each holder killed halfway was rolled back
        lk.release()
        assert lk.try_acquire()
        lk.release()
    finally:
        lk.close()


@pytest.mark.parametrize("kind", ["frame_lock", "ptl"])
def test_lock_of_a_killed_holder_is_free_at_once(run, counters, procs, kind):
    holder = procs.start(HOLD, run, kind)
    assert procs.line(holder) == "waiting" and procs.line(holder) == "held"
    lk = own_lock(run, kind)
    try:
        assert not lk.try_acquire()
        procs.kill(holder)                  # (and reaped: its file descriptions are closed)
        assert lk.try_acquire()             # the first try, no waiting: the kernel dropped its OFD lock
        lk.release()
    finally:
        lk.close()


def test_two_waiters_of_a_killed_holder_exactly_one_gets_it(run, counters, procs):
    c = counters
    holder = procs.start(HOLD, run, "ptl")
    assert procs.line(holder) == "waiting" and procs.line(holder) == "held"
    waiters = [procs.start(HOLD, run, "ptl") for _ in range(2)]
    assert [procs.line(w) for w in waiters] == ["waiting", "waiting"]
    assert int(c[HOLDERS]) == 1
    procs.kill(holder)
    wait_for(lambda: int(c[HOLDERS]) == 2, timeout=10, what="a waiter to take the lock")
    winner = int(c[OWNER])
    assert winner in waiters
    loser = next(w for w in waiters if w != winner)
    assert procs.line(winner) == "held"
    deadline = time.monotonic() + 0.3         # the loser keeps waiting while the winner lives
    while time.monotonic() < deadline:
        assert int(c[HOLDERS]) == 2 and procs.lines[loser].empty()
        time.sleep(0.01)
    procs.kill(winner)
    assert procs.line(loser, timeout=10) == "held"
    assert int(c[HOLDERS]) == 3


def test_two_threads_sharing_one_lock_object_exclude_each_other(run):
    lk = ShmLock.ptl(run, 5)
    state = {"inside": 0, "count": 0, "violations": 0}
    rounds = 300

    def worker():
        for _ in range(rounds):
            with lk:
                if state["inside"]:
                    state["violations"] += 1
                state["inside"] += 1
                v = state["count"]
                time.sleep(0)                   # invite a thread switch inside the section
                state["count"] = v + 1
                state["inside"] -= 1

    try:
        ts = [threading.Thread(target=worker) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not any(t.is_alive() for t in ts)
        assert state == {"inside": 0, "count": 2 * rounds, "violations": 0}
    finally:
        lk.close()


def test_a_thread_waits_for_another_threads_hold(run):
    lk = ShmLock.frame_lock(run)
    held, result = threading.Event(), {}
    try:
        assert lk.try_acquire()

        def other():
            result["try"] = lk.try_acquire()
            held.set()
            lk.acquire(10)                      # returns once the main thread releases
            result["got"] = True
            lk.release()

        t = threading.Thread(target=other)
        t.start()
        assert held.wait(10)
        assert result == {"try": False}
        lk.release()
        t.join(10)
        assert not t.is_alive() and result == {"try": False, "got": True}
    finally:
        lk.close()


def test_two_lock_objects_of_one_process_exclude_and_bytes_are_independent(run):
    a, b, other = ShmLock.ptl(run, 1), ShmLock.ptl(run, 1), ShmLock.ptl(run, 2)
    f = ShmLock.frame_lock(run)
    try:
        assert a.try_acquire()
        assert not b.try_acquire()
        assert other.try_acquire() and f.try_acquire()
        a.release()
        assert b.try_acquire()
        assert not a.try_acquire()
        b.release(), other.release(), f.release()
    finally:
        for lk in (a, b, other, f):
            lk.close()


def test_acquire_times_out_with_the_locks_name(run):
    a, b = ShmLock.ptl(run, 2), ShmLock.ptl(run, 2)
    try:
        assert a.try_acquire()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"^lock ptl\.2 \(byte 3 of /dev/shm/ksmp\..*\.locks\) "
                                               r"busy for over 0\.1s$"):
            b.acquire(0.1)
        assert time.monotonic() - t0 >= 0.1     # it waited its timeout out before giving up
        a.release()
        b.acquire(0.1)                          # a timed-out acquire leaves nothing behind
        b.release()
    finally:
        a.close(), b.close()


def test_close_drops_a_held_lock(run):
    a, b = ShmLock.frame_lock(run), ShmLock.frame_lock(run)
    try:
        assert a.try_acquire()
        a.close()
        assert b.try_acquire()
        b.release()
    finally:
        a.close(), b.close()


def test_a_forked_child_does_not_inherit_its_parents_hold(run):
    lk = ShmLock.ptl(run, 0)
    r, w = os.pipe()
    pid = None
    try:
        lk.acquire(1)
        pid = os.fork()
        if pid == 0:            # child: an inherited fd would make try_acquire() succeed here
            try:
                os.write(w, b"busy" if not lk.try_acquire() else b"SHARED")
                lk.acquire(10)
                os.write(w, b",got")
                lk.release()
            finally:
                os._exit(0)
        os.close(w)
        got = b""
        deadline = time.monotonic() + 10
        while b"busy" not in got and b"SHARED" not in got and time.monotonic() < deadline:
            if select.select([r], [], [], 0.1)[0]:
                got += os.read(r, 64)
        assert got == b"busy"
        lk.release()
        while not got.endswith(b",got") and time.monotonic() < deadline:
            if select.select([r], [], [], 0.1)[0]:
                got += os.read(r, 64)
        assert got == b"busy,got"
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                pid = None
                break
            time.sleep(0.01)
        assert pid is None, "the forked child did not exit"
    finally:
        os.close(r)
        lk.close()
        if pid:                                 # not reaped yet: still ours to kill
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
