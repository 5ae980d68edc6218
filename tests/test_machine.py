"""The machine: address spaces, madvise's errno table, memory across processes, clean-up."""
from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from proto import (MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE, VM_HUGETLB, VM_IO, VM_PFNMAP, VM_SHARED)
from proto.layout import MMF_VM_MERGEABLE, MMH_FLAGS, VM_MERGEABLE, MMView, create_lock_file, lock_file
from workers.runtime.frames import ShmLock
from workers.actors.supervisor import run_entries
from workers.tools.pytest_plugin import ctrl_c_delivered

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vmas(m, vm):
    seg, _ = m.mm_segs[vm.mm_id]
    return MMView(seg).vma_list()


def mm_flags(m, vm):
    seg, _ = m.mm_segs[vm.mm_id]
    return int(MMView(seg).hdr[MMH_FLAGS])


def test_read_after_write_across_processes(ksm_machine):
    vm = ksm_machine.spawn_vm("a")
    addr = vm.mmap(5 * PAGE_SIZE)
    assert vm.read(addr, 3 * PAGE_SIZE) == bytes(3 * PAGE_SIZE)       # fresh anonymous memory reads zero
    data = os.urandom(3 * PAGE_SIZE + 100)
    vm.write(addr + 50, data)                                           # unaligned, crosses 4 pages
    assert vm.read(addr + 50, len(data)) == data
    assert vm.read(addr, 50) == bytes(50)
    # a second VM sees its own memory, not a's
    vm2 = ksm_machine.spawn_vm("b")
    addr2 = vm2.mmap(PAGE_SIZE)
    assert vm2.read(addr2, PAGE_SIZE) == bytes(PAGE_SIZE)
    st = vm.stats()
    assert st["cow_faults"] == 3          # the read mapped the zero page for 3 pages; writing them is a COW
    assert st["secondary_faults"] == 4     # 3 zero-page reads + 1 fresh page; COW updates sptes in place


def test_vm_handles_from_threads(ksm_machine):
    import threading
    vms = [ksm_machine.spawn_vm(f"t{i}") for i in range(3)]
    errors = []

    def work(vm, seed):
        try:
            addr = vm.mmap(16 * PAGE_SIZE)
            for k in range(20):
                buf = bytes([(seed + k) % 256]) * PAGE_SIZE
                vm.write(addr + (k % 16) * PAGE_SIZE, buf)
                assert vm.read(addr + (k % 16) * PAGE_SIZE, PAGE_SIZE) == buf
        except Exception as e:   # reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(vm, i)) for i, vm in enumerate(vms)]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    assert not errors


def test_munmap_and_segfault(ksm_machine):
    vm = ksm_machine.spawn_vm("a")
    addr = vm.mmap(4 * PAGE_SIZE)
    vm.write(addr, b"x" * 4 * PAGE_SIZE)
    free0 = ksm_machine.alloc.nr_free
    vm.munmap(addr + PAGE_SIZE, 2 * PAGE_SIZE)
    assert ksm_machine.alloc.nr_free == free0 + 2
    assert [(s - addr, e - addr) for s, e, _ in vmas(ksm_machine, vm)] == [(0, PAGE_SIZE), (3 * PAGE_SIZE, 4 * PAGE_SIZE)]
    with pytest.raises(OSError) as ei:
        vm.read(addr + PAGE_SIZE, 1)
    assert ei.value.errno == errno.EFAULT
    assert vm.read(addr + 3 * PAGE_SIZE, 4) == b"xxxx"
    with pytest.raises(OSError) as ei:
        vm.munmap(addr + 1, PAGE_SIZE)
    assert ei.value.errno == errno.EINVAL


def test_madvise_errno_table(ksm_machine):
    m = ksm_machine
    vm = m.spawn_vm("a")
    a = vm.mmap(8 * PAGE_SIZE)
    # EINVAL: unaligned start, unknown advice
    for bad in ((a + 1, PAGE_SIZE, MADV_MERGEABLE), (a, PAGE_SIZE, 99), (a + 100, 0, MADV_UNMERGEABLE)):
        with pytest.raises(OSError) as ei:
            vm.madvise(*bad)
        assert ei.value.errno == errno.EINVAL, bad
    assert not mm_flags(m, vm) & MMF_VM_MERGEABLE
    # length 0 is a no-op success; an unaligned length is rounded up
    vm.madvise(a, 0, MADV_MERGEABLE)
    vm.madvise(a, PAGE_SIZE + 1, MADV_MERGEABLE)
    assert mm_flags(m, vm) & MMF_VM_MERGEABLE
    flags = {s - a: (e - a, bool(f & VM_MERGEABLE)) for s, e, f in vmas(m, vm)}
    assert flags == {0: (2 * PAGE_SIZE, True), 2 * PAGE_SIZE: (8 * PAGE_SIZE, False)}
    # ENOMEM when part of the range is unmapped, after applying to the mapped part
    vm.munmap(a + 4 * PAGE_SIZE, PAGE_SIZE)
    with pytest.raises(OSError) as ei:
        vm.madvise(a, 8 * PAGE_SIZE, MADV_MERGEABLE)
    assert ei.value.errno == errno.ENOMEM
    merg = [(s - a, e - a) for s, e, f in vmas(m, vm) if f & VM_MERGEABLE]
    assert merg == [(0, 4 * PAGE_SIZE), (5 * PAGE_SIZE, 8 * PAGE_SIZE)]
    with pytest.raises(OSError) as ei:                 # wholly unmapped
        vm.madvise(a + 4 * PAGE_SIZE, PAGE_SIZE, MADV_UNMERGEABLE)
    assert ei.value.errno == errno.ENOMEM
    # UNMERGEABLE clears the flag
    vm.madvise(a, 4 * PAGE_SIZE, MADV_UNMERGEABLE)
    merg = [(s - a, e - a) for s, e, f in vmas(m, vm) if f & VM_MERGEABLE]
    assert merg == [(5 * PAGE_SIZE, 8 * PAGE_SIZE)]
    # silently ignored on VM_SHARED / VM_HUGETLB / VM_PFNMAP / VM_IO areas
    for fl in (VM_SHARED, VM_HUGETLB, VM_PFNMAP, VM_IO):
        b = vm.mmap(2 * PAGE_SIZE, vm_flags=fl)
        vm.madvise(b, 2 * PAGE_SIZE, MADV_MERGEABLE)
        assert [f & VM_MERGEABLE for s, e, f in vmas(m, vm) if s == b] == [0], fl


def test_madvise_einval_when_ksm_disabled(ksm_machine_factory):
    m = ksm_machine_factory(ksm_enabled=False)
    vm = m.spawn_vm("a")
    a = vm.mmap(PAGE_SIZE)
    with pytest.raises(OSError) as ei:
        vm.madvise(a, PAGE_SIZE, MADV_MERGEABLE)
    assert ei.value.errno == errno.EINVAL


def test_madvise_unmergeable_eagain_when_out_of_frames(ksm_machine_factory):
    m = ksm_machine_factory(frames=64)
    m.ksm.set(pages_to_scan=1000, sleep_millisecs=0)
    vm = m.spawn_vm("a", pages=256)
    a = vm.mmap(40 * PAGE_SIZE)
    vm.write(a, b"\x07" * 40 * PAGE_SIZE)
    vm.madvise(a, 40 * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.set(run=1)
    s = m.ksm.wait_stable(30)
    assert (s["pages_shared"], s["pages_sharing"]) == (1, 39)
    m.ksm.set(run=0)
    b = vm.mmap(62 * PAGE_SIZE)
    vm.write(b, b"\x01" * 62 * PAGE_SIZE)         # take every frame the merge gave back
    assert m.alloc.nr_free == 0
    with pytest.raises(OSError) as ei:
        vm.madvise(a, 40 * PAGE_SIZE, MADV_UNMERGEABLE)
    assert ei.value.errno == errno.EAGAIN
    assert vm.read(a, 40 * PAGE_SIZE) == b"\x07" * 40 * PAGE_SIZE       # nothing corrupted


def test_out_of_frames_is_a_clear_error(ksm_machine_factory):
    m = ksm_machine_factory(frames=32)
    vm = m.spawn_vm("a", pages=128)
    a = vm.mmap(64 * PAGE_SIZE)
    with pytest.raises(OSError) as ei:
        vm.write(a, b"z" * 64 * PAGE_SIZE)
    assert ei.value.errno == errno.ENOMEM and "out of frames" in str(ei.value)
    vm.munmap(a, 64 * PAGE_SIZE)
    b = vm.mmap(4 * PAGE_SIZE)
    vm.write(b, b"ok" * 2 * PAGE_SIZE)
    assert vm.read(b, 4) == b"okok"


def test_malformed_requests_keep_the_vm_running(ksm_machine):
    vm = ksm_machine.spawn_vm("a")
    with pytest.raises(OSError) as ei:
        vm._call("no_such_op")
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        vm._call("mmap")                          # missing field
    assert ei.value.errno == errno.EINVAL and "length" in str(ei.value)
    for bad in ({"length": float("inf")}, {"length": "4096"}, {"length": True}, {"length": 4096, "vm_flags": -1}):
        with pytest.raises(OSError) as ei:
            vm._call("mmap", **bad)
        assert ei.value.errno == errno.EINVAL, bad
    a = vm.mmap(PAGE_SIZE)
    vm.write(a, b"still alive")
    assert vm.read(a, 11) == b"still alive"


def test_broken_framing_closes_the_channel_not_resynced(ksm_machine):
    """Garbage on a control channel: the VM closes it (never skips to the next magic) and exits;
    the caller's next call fails with ESRCH (not its timeout), the dead VM's frames are freed, the others go
    on."""
    m = ksm_machine
    vm, other = m.spawn_vm("a"), m.spawn_vm("b")
    x = other.mmap(PAGE_SIZE)
    other.write(x, b"unharmed")
    free0 = m.alloc.nr_free
    a = vm.mmap(2 * PAGE_SIZE)
    vm.write(a, b"q" * 2 * PAGE_SIZE)
    vm.actor.ch.sock.sendall(b"\x00garbage-bytes-that-are-no-frame" * 3)
    with pytest.raises(OSError) as ei:
        vm.read(a, 1)                       # (a VM that kept the channel open: TimeoutError after call_timeout)
    assert ei.value.errno == errno.ESRCH
    deadline = time.monotonic() + 10
    while m.dead_vms != ["a"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert m.dead_vms == ["a"] and m.alloc.nr_free == free0
    assert other.read(x, 8) == b"unharmed"
    assert m.check_frames() == []


def test_sigkill_of_a_worker_frees_its_frames(ksm_machine):
    m = ksm_machine
    a, b = m.spawn_vm("a"), m.spawn_vm("b")
    free0 = m.alloc.nr_free
    addr = a.mmap(10 * PAGE_SIZE)
    a.write(addr, os.urandom(10 * PAGE_SIZE))
    assert m.alloc.nr_free == free0 - 10
    a.kill(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while "a" not in m.dead_vms and time.monotonic() < deadline:
        time.sleep(0.02)
    assert m.dead_vms == ["a"]
    assert m.alloc.nr_free == free0
    assert not [n for n in run_entries(m.run) if n.endswith(f".mm.{a.mm_id}")]
    x = b.mmap(PAGE_SIZE)                       # the rest keeps running
    b.write(x, b"fine")
    assert b.read(x, 4) == b"fine"
    with pytest.raises(OSError) as ei:
        a.read(addr, 1)
    assert ei.value.errno == errno.ESRCH


SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from workers import Machine
    from proto import PAGE_SIZE
    with Machine(frames=1024) as m:
        vm = m.spawn_vm("a")
        a = vm.mmap(PAGE_SIZE)
        vm.write(a, b"x")
        print(m.run, m.ksmd.pid, m.faultd.pid, vm.pid, flush=True)
        if {mode!r} == "raise":
            raise RuntimeError("boom")
        time.sleep(60)
""")


def _pids_gone(pids, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for p in pids:
            try:
                os.kill(p, 0)
                # a zombie of an exited child of the (dead) supervisor still counts as gone
                with open(f"/proc/{p}/stat") as f:
                    if f.read().split()[2] != "Z":
                        alive.append(p)
            except (ProcessLookupError, FileNotFoundError):
                pass
        if not alive:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["raise", "sigterm", "sigint", "sigkill"])
def test_nothing_left_behind(how):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(root=ROOT, mode=how)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_delivered)
    line = proc.stdout.readline().split()
    assert line, proc.stderr.read()
    run, pids = line[0], [int(x) for x in line[1:]]
    assert {f"{run}.{what}" for what in ("frames", "frametab", "stats", "mm.0", "locks")} <= set(run_entries(run))
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    elif how == "sigint":
        proc.send_signal(signal.SIGINT)
    elif how == "sigkill":
        proc.kill()
    proc.wait(30)
    if how == "raise":
        assert proc.returncode == 1 and "boom" in proc.stderr.read()
    assert _pids_gone(pids), f"actors {pids} outlived their supervisor"
    deadline = time.monotonic() + 10
    while run_entries(run) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run_entries(run) == []


def test_lock_file_is_private_to_the_run_and_goes_with_it(ksm_machine_factory):
    m = ksm_machine_factory(frames=64)
    vm = m.spawn_vm("a")
    st = os.stat(lock_file(m.run))
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    a = vm.mmap(PAGE_SIZE)
    vm.write(a, b"locked")                     # faultd takes the ptl and the frame lock
    assert vm.read(a, 6) == b"locked"
    ptl = ShmLock.ptl(m.run, vm.mm_id)         # the parent's own lock object: nobody holds it now
    try:
        assert ptl.try_acquire()
        ptl.release()
    finally:
        ptl.close()
    m.close()
    assert run_entries(m.run) == []


def test_new_machine_sweeps_segments_of_dead_runs(ksm_machine_factory):
    import posix_ipc
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"ksmp.{dead.pid}.deadbeef0000"
    posix_ipc.SharedMemory(f"/{stale}.frames", posix_ipc.O_CREX, size=4096).close_fd()
    create_lock_file(stale)
    assert sorted(run_entries(stale)) == [f"{stale}.frames", f"{stale}.locks"]
    ksm_machine_factory(frames=64)
    assert run_entries(stale) == []
