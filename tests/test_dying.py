"""Dying actors: kill -9 of ksmd or the fault handler, and nothing is lost.

The supervisor replaces the dead actor, repairs what it left half done (core.repair),
and the run goes on: knobs can be set, faults in flight are retried, merges resume, no
write is lost, every frame's mapcount is exact, nothing is left in /dev/shm or the
process table.  Timing figures are not asserted: 2 shared cores.
"""
from __future__ import annotations

import errno
import os
import random
import signal
import threading
import time

import numpy as np
import pytest

import workers.actors.supervisor
import workers.actors.supervisor_recovery
from proto import MADV_MERGEABLE, PAGE_SIZE
from proto.layout import FRAME_RESERVED
from workers.actors.faultd_common import FRAME_RESERVE
from workers.tools.stress import writer_sequence

FAST = dict(pages_to_scan=1000, sleep_millisecs=0)


def gone(pid: int) -> bool:
    """Out of the process table (a zombie is still in it)."""
    return not os.path.exists(f"/proc/{pid}")


def kill_and_wait(m, name: str, timeout: float = 60.0, during=None) -> int:
    """kill -9 the actor, (call during()), wait until its successor is up; the successor's pid."""
    old = m.actors[name].pid
    os.kill(old, signal.SIGKILL)         # a process this test's Machine started, by its pid
    if during is not None:
        during()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        a = m.actors[name]
        if a.pid != old and m.ready[name].is_set():
            return a.pid
        time.sleep(0.01)
    raise TimeoutError(f"{name} was not replaced within {timeout}s")


def merged_pair(m, npages=8):
    a, b = m.spawn_vm("a"), m.spawn_vm("b")
    data = b"".join(bytes([k + 1]) * PAGE_SIZE for k in range(npages))
    xs = []
    for vm in (a, b):
        x = vm.mmap(len(data))
        vm.write(x, data)
        vm.madvise(x, len(data), MADV_MERGEABLE)
        xs.append(x)
    m.ksm.set(**FAST, run=1)
    s = m.ksm.wait_stable(30)
    assert (s["pages_shared"], s["pages_sharing"]) == (npages, npages)
    return a, b, xs, data


def test_kill_ksmd_knobs_keep_working_and_state_is_rebuilt(ksm_machine):
    m = ksm_machine
    a, b, (xa, xb), data = merged_pair(m)
    before = m.ksm.stats()
    old = m.ksmd.pid
    new = kill_and_wait(m, "ksmd")
    m.ksm.set(pages_to_scan=500)                   # was a BrokenPipeError
    assert m.ksm.get("pages_to_scan") == 500 and m.ksm.get("run") == 1
    s = m.ksm.wait_full_scans(2, 30)
    # the new ksmd rebuilt the stable tree from the frame table: same sharing, no new merge needed
    for k in ("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups"):
        assert s[k] == before[k], k
    assert s["full_scans"] >= before["full_scans"] + 2     # counted on, not from 0
    assert m.ksmd.call("info")[0]["merges"] == 0           # nothing had to be merged again
    assert m.ksmd.pid == new and gone_soon([old])
    a.write(xa, b"!")                               # a COW of a KSM page still works
    assert a.read(xa, 2) == b"!" + data[1:2] and b.read(xb, len(data)) == data
    m.ksm.set(run=2)                               # and the new ksmd can unmerge what the old merged
    assert m.ksm.stats()["pages_shared"] == 0
    assert b.read(xb, len(data)) == data and a.read(xa + 1, len(data) - 1) == data[1:]
    assert m.check_frames() == []
    assert [st["notifier_losses"] for st in (a.stats(), b.stats())] == [{"ksmd": 1, "faultd": 0}] * 2


def gone_soon(pids, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.02)
    return False


def test_kill_fault_handler_faults_go_on(ksm_machine):
    m = ksm_machine
    a, b, (xa, xb), data = merged_pair(m)
    m.ksm.set(run=0)
    old = m.faultd.pid
    kill_and_wait(m, "faultd")
    assert gone_soon([old])
    for k in range(8):                             # every COW of a merged page is a fault
        a.write(xa + k * PAGE_SIZE, bytes([0xF0 + k]))
    y = a.mmap(4 * PAGE_SIZE)
    a.write(y, b"fresh" * 1000)                   # anonymous faults
    assert a.read(xa, 1) == b"\xf0" and a.read(y, 5) == b"fresh" and b.read(xb, len(data)) == data
    assert m.faultd.call("stats")[0]["cow_copies"] == 8
    assert m.check_frames() == []
    assert a.stats()["notifier_losses"] == {"ksmd": 0, "faultd": 1}


def test_a_dead_fault_handlers_frame_reserve_is_given_back(ksm_machine):
    """The fault handler's one-page faults take frames from a reserve (FRAME_RESERVE of them, taken
    together); killed, it never gives them back itself: the recovery's repair does, exactly, and the
    free frames (reserves counted) are what the mapped pages leave."""
    m = ksm_machine
    free0 = m.alloc.nr_free
    a = m.spawn_vm("a")
    x = a.mmap(5 * PAGE_SIZE)
    for k in range(4):                              # four one-page write faults
        a.write(x + k * PAGE_SIZE, bytes([k + 1]))
    reserved = lambda: int((m.alloc.ft.flags == FRAME_RESERVED).sum())    # noqa: E731
    assert reserved() == FRAME_RESERVE - 3 and m.alloc.nr_free == free0 - 4
    kill_and_wait(m, "faultd")
    assert m.repairs[-1]["reserves_returned"] == FRAME_RESERVE - 3 and m.repairs[-1]["freed"] == 0
    assert reserved() == 0 and m.alloc.nr_free == free0 - 4 and m.check_frames() == []
    a.write(x + 4 * PAGE_SIZE, b"\x05")              # the successor takes a reserve of its own
    assert reserved() == FRAME_RESERVE and m.alloc.nr_free == free0 - 5 and m.check_frames() == []
    assert [a.read(x + k * PAGE_SIZE, 1) for k in range(5)] == [bytes([k + 1]) for k in range(5)]
    m.exit_vm(a)
    assert m.alloc.nr_free == free0


def test_near_out_of_memory_no_frame_stays_in_a_handlers_reserve(ksm_machine_factory):
    """Two fault handlers.  One takes a reserve on VM b's first write; then VM a's writes run the free
    stack below the level at which a reserve is kept, and the idle handler gives its reserve back on
    its next tick (drain_local_pages), so that VM a's last write gets every free frame, those included.
    One page more is ENOMEM, named as such, and everything written reads back."""
    m = ksm_machine_factory(frames=1024, fault_handlers=2)
    a, b = m.spawn_vm("a", pages=1100), m.spawn_vm("b", pages=64)
    assert m.faultd_name(a.mm_id) != m.faultd_name(b.mm_id)
    reserved = lambda: int((m.alloc.ft.flags == FRAME_RESERVED).sum())    # noqa: E731
    y = b.mmap(PAGE_SIZE)
    b.write(y, b"b")
    assert reserved() == FRAME_RESERVE
    free = m.alloc.nr_free
    x = a.mmap(1024 * PAGE_SIZE)
    first = free - 100 - FRAME_RESERVE                 # (one FAULT: the stack is left with 100 frames)
    a.write(x, b"\x01" * (first * PAGE_SIZE))
    deadline = time.monotonic() + 10
    while reserved() and time.monotonic() < deadline:  # (b's handler, idle: its next tick gives it back)
        time.sleep(0.01)
    assert reserved() == 0 and m.alloc.nr_free == 100 + FRAME_RESERVE
    a.write(x + first * PAGE_SIZE, b"\x02" * ((100 + FRAME_RESERVE) * PAGE_SIZE))
    assert m.alloc.nr_free == 0
    with pytest.raises(OSError) as ei:
        a.write(x + free * PAGE_SIZE, b"\x03")
    assert ei.value.errno == errno.ENOMEM and "out of frames" in str(ei.value)
    assert a.read(x, free * PAGE_SIZE) == b"\x01" * (first * PAGE_SIZE) + b"\x02" * ((free - first) * PAGE_SIZE)
    assert b.read(y, 1) == b"b" and m.check_frames() == []


def test_kill_one_of_two_scanners_restarts_both_and_each_rebuilds_its_shard(ksm_machine_factory):
    """A dead follower takes the leader down with it: both restart on a new mesh, each rebuilds its
    own shard of the stable tree (the counters are back without merging again); a dead fault
    handler of two is restarted alone and only its VMs reconnect."""
    m = ksm_machine_factory(scanners=2, fault_handlers=2)
    a, b, (xa, xb), data = merged_pair(m)
    before = m.ksm.stats()
    olds = [p.pid for p in m.scanner_procs]
    kill_and_wait(m, "ksmd1")
    assert m.ksmd.pid != olds[0] and gone_soon(olds)
    s = m.ksm.wait_full_scans(2, 30)
    for k in ("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups"):
        assert s[k] == before[k], k
    assert m.ksmd.call("info")[0]["merges"] == 0           # nothing had to be merged again
    assert a.stats()["notifier_losses"] == {"faultd": 0, "ksmd": 1, "ksmd1": 1}
    m.ksm.set(run=0)
    served_b = m.faultd_name(b.mm_id)
    old = m.actors[served_b].pid
    kill_and_wait(m, served_b)
    assert gone_soon([old])
    b.write(xb, b"!")                               # a COW of a KSM page, by b's new fault handler
    assert b.read(xb, 2) == b"!" + data[1:2] and a.read(xa, len(data)) == data
    assert b.stats()["notifier_losses"][served_b] == 1
    assert a.stats()["notifier_losses"].get(served_b, 0) == 0     # not a's fault handler: a kept its channel
    m.ksm.set(run=2)
    assert m.ksm.stats()["pages_shared"] == 0
    assert m.check_frames() == []


def test_an_actor_that_keeps_dying_is_a_clear_error(ksm_machine, monkeypatch):
    monkeypatch.setattr(workers.actors.supervisor_recovery, "MAX_RESTARTS", 0)
    m = ksm_machine
    vm = m.spawn_vm("a")
    x = vm.mmap(PAGE_SIZE)
    old = m.ksmd.pid
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "ksmd" not in m.gone and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(OSError) as ei:
        m.ksm.set(run=1)
    assert ei.value.errno == errno.EIO and "ksmd is gone: died 1 times within 60s" in str(ei.value)
    with pytest.raises(RuntimeError, match="ksmd is gone"):
        m.ksm.wait_full_scans(1, 5)
    vm.write(x, b"memory still works")              # the fault handler is fine
    assert vm.read(x, 18) == b"memory still works"
    with pytest.raises(OSError) as ei:
        m.spawn_vm("b")
    assert ei.value.errno == errno.EIO
    assert m.check_frames() == []


def test_fault_injection_kill_each_actor_in_turn(ksm_machine_factory):
    """Writers and merging active; kill -9 ksmd and the fault handler in turn, many times, at random
    moments: 0 lost writes, check_frames clean, m.ksm.set never fails, old processes gone."""
    rng = random.Random(15)
    m = ksm_machine_factory(frames=4096)
    npages, nvms = 48, 3
    vms, regions = [], []
    for i in range(nvms):
        vm = m.spawn_vm(f"v{i}")
        x = vm.mmap(npages * PAGE_SIZE)
        vm.write(x, b"\x01" * npages * PAGE_SIZE)
        vm.madvise(x, npages * PAGE_SIZE, MADV_MERGEABLE)
        vms.append(vm)
        regions.append(x)
    # a parent thread writing through the API into a second region of v0, recorded here
    px = vms[0].mmap(16 * PAGE_SIZE)
    record = bytearray(16 * PAGE_SIZE)
    stop = threading.Event()
    errors: list = []

    def parent_writer():
        r = random.Random(1)
        try:
            while not stop.is_set():
                page, val = r.randrange(16), r.randrange(3)
                vms[0].write(px + page * PAGE_SIZE, bytes([val]) * PAGE_SIZE)
                record[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = bytes([val]) * PAGE_SIZE
                time.sleep(0.002)
        except Exception as e:     # reported below
            errors.append(e)

    m.ksm.set(pages_to_scan=2000, sleep_millisecs=5, run=1)
    wids = [vm.writer_start(x, npages, seed=100 + i, values=3, period_ms=2) for i, (vm, x) in
            enumerate(zip(vms, regions))]
    t = threading.Thread(target=parent_writer)
    t.start()
    killed = []
    try:
        for k in range(12):
            time.sleep(rng.uniform(0.05, 0.5))
            name = ("ksmd", "faultd")[k % 2]
            killed.append(getattr(m, name).pid)
            pts = rng.choice((500, 2000))          # knobs keep working, also while ksmd is being replaced
            kill_and_wait(m, name, during=lambda: m.ksm.set(pages_to_scan=pts))
            assert m.ksm.get("pages_to_scan") == pts
    finally:
        time.sleep(0.3)
        stop.set()
        t.join(60)
    done = [vm.writer_stop(w) for vm, w in zip(vms, wids)]
    assert not errors and [d["error"] for d in done] == [None] * nvms
    assert all(d["done"] > 0 for d in done)
    s = m.ksm.wait_full_scans(1, 30)
    assert s["pages_shared"] > 0                  # merging was (and is) going on
    m.ksm.set(run=0)
    # no lost write: every byte is what its writer wrote last
    for i, (vm, x) in enumerate(zip(vms, regions)):
        want = bytearray(b"\x01" * npages * PAGE_SIZE)
        for page, val in writer_sequence(npages, 100 + i, done[i]["done"], 3):
            want[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = bytes([val]) * PAGE_SIZE
        got = vm.read(x, npages * PAGE_SIZE)
        bad = np.flatnonzero((np.frombuffer(got, np.uint8).reshape(npages, PAGE_SIZE)
                              != np.frombuffer(bytes(want), np.uint8).reshape(npages, PAGE_SIZE)).any(axis=1))
        assert got == bytes(want), f"{vm.name}: lost writes, e.g. page {bad[:4].tolist()}"
    assert vms[0].read(px, len(record)) == bytes(record)
    assert m.check_frames() == []
    assert len(m.repairs) == 12
    assert gone_soon(killed), "a killed actor is still in the process table"
    losses = [vm.stats()["notifier_losses"] for vm in vms]
    assert losses == [{"ksmd": 6, "faultd": 6}] * nvms
    m.ksm.set(run=2)                               # after all that, unmerge everything: still exact
    assert m.ksm.stats()["pages_shared"] == 0 and m.check_frames() == []
