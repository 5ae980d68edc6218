"""The kernel's own KSM selftests, ported: each test is written once and runs twice, on ksm-proto and
on the real kernel, with the same expected results.

The scenarios are those of tools/testing/selftests/mm/ksm_functional_tests.c (unmerge, unmerge of
zero pages, of discarded pages, of PROT_NONE pages, prctl set/get, prctl inherited by fork, prctl
unmerge, ksm_merging_pages after fork) and ksm_tests.c (-M merge, -U unmerge, -Z zero pages,
-N merge_across_nodes, -P merge time, -D unmerge time, -C COW time), re-expressed (not copied)
against one interface: a "side" gives processes with the VM handle's API (mmap, write, read,
madvise, mprotect, prctl, fork, ksm_stat, pagemap) and the KSM knobs.  On ksm-proto a process is a
VM worker of a Machine; on the kernel it is a helper process (kernel_ksm.KernelProc) whose memory
the real ksmd merges, its knobs in /sys/kernel/mm/ksm (all put back, run left at 0).  The kernel
side is skipped, with the reason, where /sys/kernel/mm/ksm is not writable.

Not ported, and why:
  * test_unmerge_uffd_wp: userfaultfd write-protect is not modelled (no uffd in the prototype);
  * test_prctl_fork_exec: there is no exec: a VM worker's address space is only made by spawn or fork;
  * test_prot_none's first half is written through /proc/self/mem (a ptrace FOLL_FORCE write, which
    breaks COW in a PROT_NONE area): no such access exists here, so that half is unmerged by
    MADV_UNMERGEABLE after the other half was checked alone;
  * ksm_tests -H (merge time with THP) and anything with huge pages: pages are 4 KiB only;
  * ksm_tests -N on the kernel needs two NUMA nodes with memory and mbind placement, which the
    helper does not do: it runs on ksm-proto (a Machine with two nodes) and is skipped on a
    one-node host.
Timings (-P, -D, -C) are measured and reported (record_property), never asserted: the machine is
shared, so they are noisy; each test asserts that the work was done, with the same counters.
"""
from __future__ import annotations

import errno
import os
import time

import pytest

from proto import (MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE, PR_GET_MEMORY_MERGE,
                   PR_SET_MEMORY_MERGE, PROT_NONE, PROT_READ, PROT_WRITE)
from workers.oracle import kernel_ksm

MiB = 1 << 20
RW = PROT_READ | PROT_WRITE
KNOBS = dict(pages_to_scan=100000, sleep_millisecs=10)
KERNEL_OK, KERNEL_WHY = kernel_ksm.available()


class ProtoSide:
    """ksm-proto: processes are VM workers of one Machine (two NUMA nodes)."""
    name = "proto"
    numa_nodes = 2

    def __init__(self, machine):
        self.m = machine
        self.n = 0

    def proc(self, node: int = 0):
        self.n += 1
        return self.m.spawn_vm(f"p{self.n}", pages=8192, node=node)

    def set(self, **knobs):
        self.m.ksm.set(**knobs)

    def stats(self) -> dict:
        return self.m.ksm.stats()

    def scans(self, n: int) -> None:
        self.m.ksm.wait_full_scans(n, timeout=120)

    def run_scans(self, n: int) -> None:
        """run=1 and n full scans from now (counted from before ksmd wakes: the first may end at once)."""
        n0 = self.stats()["full_scans"]
        self.set(run=1)
        self.m.ksm.wait_full_scans(timeout=120, at_least=n0 + n)


class KernelSide:
    """The real kernel: processes are kernel_ksm.KernelProc helpers, knobs in /sys/kernel/mm/ksm."""
    name = "kernel"

    def __init__(self, k: kernel_ksm.KernelKSM):
        self.k = k
        self.procs: list = []
        self.numa_nodes = 1          # placement on a node (mbind) is not done by the helper

    def proc(self, node: int = 0):
        if node:
            pytest.skip("the kernel helper does not place memory on a NUMA node")
        p = kernel_ksm.KernelProc(f"k{len(self.procs)}")
        self.procs.append(p)
        return p

    def set(self, **knobs):
        self.k.set(**knobs)

    def stats(self) -> dict:
        return self.k.stats()

    def scans(self, n: int) -> None:
        self.k.wait_full_scans(n, timeout=120)

    def run_scans(self, n: int) -> None:
        n0 = self.stats()["full_scans"]
        self.set(run=1)
        deadline = time.monotonic() + 120
        while self.stats()["full_scans"] < n0 + n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"kernel ksmd: {self.stats()['full_scans'] - n0} of {n} full scans in 120s")
            time.sleep(0.002)

    def close(self) -> None:
        for p in self.procs:
            p.close()


@pytest.fixture(params=["proto", "kernel"])
def side(request, ksm_machine_factory):
    if request.param == "proto":
        s = ProtoSide(ksm_machine_factory(frames=16384, nodes=2, knobs=KNOBS))
        yield s
        assert s.m.check_frames() == []      # (under every ptl: a COW's put after APPLIED is waited for)
        return
    if not KERNEL_OK:
        pytest.skip(f"kernel KSM not usable here: {KERNEL_WHY}")
    with kernel_ksm.KernelKSM() as k:
        kernel_ksm._start(k, KNOBS, 120)
        s = KernelSide(k)
        try:
            yield s
        finally:
            k.set(run=0)
            s.close()
            k.unmerge_all(60)
            others = kernel_ksm.other_ksm_processes()
            assert not others, f"other processes use KSM meanwhile, the counters were not ours alone: {others}"


# ------------------------------------------------------------------ the selftests' helpers, re-expressed
def ksm_start(side) -> None:
    """run=1, then two full scans: whatever can merge has merged."""
    side.run_scans(2)


def ksm_stop(side) -> None:
    """run=2: everything unmerged, every rmap item gone (ksmd stays stopped)."""
    side.set(run=2)


def range_maps_duplicates(p, addr: int, size: int) -> bool:
    """Does the range map one frame twice?  (Pages not present are skipped.)"""
    pfns = [f for f in p.pagemap(addr, size // PAGE_SIZE) if f is not None]
    return len(set(pfns)) != len(pfns)


def mmap_and_merge_range(side, p, val: int, size: int, prot: int = RW, merge: str = "madvise") -> int:
    """The selftests' set-up: KSM stopped, a range filled with val, mprotect(prot), made mergeable by
    madvise or prctl (or not at all: merge-any inherited), KSM started; some pages merged if val."""
    ksm_stop(side)
    assert p.ksm_stat()["ksm_merging_pages"] == 0
    addr = p.mmap(size)
    p.write(addr, bytes([val]) * size)
    p.mprotect(addr, size, prot)
    if merge == "madvise":
        p.madvise(addr, size, MADV_MERGEABLE)
    elif merge == "prctl":
        assert p.prctl(PR_SET_MEMORY_MERGE, 1) == 0
    ksm_start(side)
    if val:
        assert p.ksm_stat()["ksm_merging_pages"] > 0, "no pages got merged"
    return addr


def expected_counts(dupl: int, max_page_sharing: int) -> tuple[int, int]:
    """ksm_tests' assert_ksm_pages_count: (pages_shared, pages_sharing) for dupl copies of one page."""
    if dupl % max_page_sharing in (0, 1):
        shared = dupl // max_page_sharing
        return shared, shared * (max_page_sharing - 1)
    shared = dupl // max_page_sharing + 1
    return shared, dupl - shared


def counts(side) -> tuple[int, int]:
    s = side.stats()
    return s["pages_shared"], s["pages_sharing"]


# ------------------------------------------------------------------ ksm_functional_tests.c
def test_unmerge(side):
    p = side.proc()
    x = mmap_and_merge_range(side, p, 0xcf, 2 * MiB)
    assert range_maps_duplicates(p, x, 2 * MiB)
    p.madvise(x, 2 * MiB, MADV_UNMERGEABLE)
    assert not range_maps_duplicates(p, x, 2 * MiB)


def test_unmerge_zero_pages(side):
    p = side.proc()
    side.set(use_zero_pages=1)
    size = 2 * MiB
    n = size // PAGE_SIZE
    x = mmap_and_merge_range(side, p, 0x00, size)
    assert p.ksm_stat()["ksm_zero_pages"] == n              # counted as they were merged
    p.madvise(x, size // 2, MADV_UNMERGEABLE)
    assert p.ksm_stat()["ksm_zero_pages"] == n // 2         # at once, not at the next scan
    for off in range(size // 2, size, PAGE_SIZE):           # a write fault unmerges the other half
        p.write(x + off, off.to_bytes(4, "little"))
    assert p.ksm_stat()["ksm_zero_pages"] == 0
    assert not range_maps_duplicates(p, x, size)


def test_unmerge_discarded(side):
    p = side.proc()
    x = mmap_and_merge_range(side, p, 0xcf, 2 * MiB)
    p.madvise(x, MiB, MADV_DONTNEED)                        # half the range: no PTE at all
    assert p.pagemap(x, 4) == [None] * 4
    p.madvise(x, 2 * MiB, MADV_UNMERGEABLE)
    assert not range_maps_duplicates(p, x, 2 * MiB)
    assert p.read(x, 4) == bytes(4) and p.read(x + MiB, 4) == b"\xcf" * 4


def test_prot_none(side):
    p = side.proc()
    size = 2 * MiB
    x = mmap_and_merge_range(side, p, 0x11, size, prot=PROT_NONE)
    p.madvise(x + size // 2, size // 2, MADV_UNMERGEABLE)  # PROT_NONE pages are unmerged all the same
    assert not range_maps_duplicates(p, x + size // 2, size // 2)
    assert range_maps_duplicates(p, x, size // 2)           # (the selftest's ptrace-written half, still merged)
    p.madvise(x, size // 2, MADV_UNMERGEABLE)
    assert not range_maps_duplicates(p, x, size)
    with pytest.raises(OSError) as ei:
        p.read(x, 1)
    assert ei.value.errno == errno.EFAULT                    # and still PROT_NONE
    p.mprotect(x, size, PROT_READ)
    assert p.read(x + size - 4, 4) == b"\x11" * 4


def test_prctl(side):
    p = side.proc()
    assert p.prctl(PR_SET_MEMORY_MERGE, 1) == 0
    assert p.prctl(PR_GET_MEMORY_MERGE) == 1
    assert p.prctl(PR_SET_MEMORY_MERGE, 0) == 0
    assert p.prctl(PR_GET_MEMORY_MERGE) == 0


def test_prctl_errnos(side):
    p = side.proc()
    for args in ((PR_SET_MEMORY_MERGE, 1, 1), (PR_SET_MEMORY_MERGE, 0, 0, 1), (PR_GET_MEMORY_MERGE, 1),
                 (PR_GET_MEMORY_MERGE, 0, 0, 0, 1)):
        with pytest.raises(OSError) as ei:
            p.prctl(*args)
        assert ei.value.errno == errno.EINVAL, args
    assert p.prctl(PR_GET_MEMORY_MERGE) == 0               # and it keeps running


def test_prctl_fork(side):
    p = side.proc()
    assert p.prctl(PR_SET_MEMORY_MERGE, 1) == 0
    c = p.fork("child")
    assert c.prctl(PR_GET_MEMORY_MERGE) == 1                # inherited
    st = c.ksm_stat()
    assert st["ksm_merge_any"] is True
    # and merging really happens in the child, with no madvise (test_child_ksm)
    mmap_and_merge_range(side, c, 0xcf, 2 * MiB, merge="none")
    ksm_stop(side)
    assert p.prctl(PR_SET_MEMORY_MERGE, 0) == 0


def test_prctl_unmerge(side):
    p = side.proc()
    x = mmap_and_merge_range(side, p, 0xcf, 2 * MiB, merge="prctl")
    assert p.ksm_stat()["ksm_merge_any"] is True
    assert p.prctl(PR_SET_MEMORY_MERGE, 0) == 0
    assert not range_maps_duplicates(p, x, 2 * MiB)


def test_fork_ksm_merging_page_count(side):
    """ksm_merging_pages is not inherited by fork: 0 in the child until ksmd scans it."""
    p = side.proc()
    n = 2 * MiB // PAGE_SIZE
    x = mmap_and_merge_range(side, p, 0xcf, 2 * MiB)
    side.set(run=0)                                          # a still picture: no scan moves a counter
    shared, sharing = counts(side)
    c = p.fork("child")
    st = c.ksm_stat()
    assert (st["ksm_merging_pages"], st["ksm_rmap_items"], st["ksm_zero_pages"]) == (0, 0, 0)
    assert c.pagemap(x, n) == p.pagemap(x, n)                # the same KSM frame, mapped in both
    assert counts(side) == (shared, sharing)
    side.run_scans(2)                                        # ksmd walks the child: its pages are appended
    side.set(run=0)
    st = c.ksm_stat()
    assert (st["ksm_merging_pages"], st["ksm_rmap_items"]) == (n, n)
    assert counts(side) == (shared, sharing + n)


def _errno(f, *args) -> int | None:
    try:
        f(*args)
    except OSError as e:
        return e.errno
    return None


def test_errno_rules_for_bad_ranges(side):
    """Not a selftest: the same bad calls on both sides give the same errno, apply to the same part of
    the range, and leave the process running (mprotect, madvise MADV_DONTNEED, munmap, access)."""
    p = side.proc()
    x = p.mmap(3 * PAGE_SIZE)
    p.write(x, b"\x01" * 3 * PAGE_SIZE)
    p.munmap(x + PAGE_SIZE, PAGE_SIZE)                     # a hole in the middle
    got = {
        "mprotect unaligned": _errno(p.mprotect, x + 1, PAGE_SIZE, PROT_READ),
        "mprotect bad prot": _errno(p.mprotect, x, PAGE_SIZE, 0x10),
        "mprotect PROT_GROWSDOWN": _errno(p.mprotect, x, PAGE_SIZE, 0x01000000 | PROT_READ),
        "mprotect negative length": _errno(p.mprotect, x, -PAGE_SIZE, PROT_READ),
        "mprotect length 0": _errno(p.mprotect, x + PAGE_SIZE, 0, PROT_READ),
        "mprotect from the hole": _errno(p.mprotect, x + PAGE_SIZE, 2 * PAGE_SIZE, PROT_READ),
        "write after it": _errno(p.write, x + 2 * PAGE_SIZE, b"w"),
        "mprotect over the hole": _errno(p.mprotect, x, 3 * PAGE_SIZE, PROT_READ),
        "write before the hole": _errno(p.write, x, b"w"),
        "write after the hole": _errno(p.write, x + 2 * PAGE_SIZE, b"w"),
        "read of the hole": _errno(p.read, x + PAGE_SIZE, 1),
        "DONTNEED unaligned": _errno(p.madvise, x + 1, PAGE_SIZE, MADV_DONTNEED),
        "DONTNEED negative length": _errno(p.madvise, x, -PAGE_SIZE, MADV_DONTNEED),
        "DONTNEED length 0": _errno(p.madvise, x + PAGE_SIZE, 0, MADV_DONTNEED),
        "DONTNEED over the hole": _errno(p.madvise, x, 3 * PAGE_SIZE, MADV_DONTNEED),
        "bad advice": _errno(p.madvise, x, PAGE_SIZE, 99),
        "munmap unaligned": _errno(p.munmap, x + 1, PAGE_SIZE),
        "munmap length 0": _errno(p.munmap, x, 0),
        "mprotect PROT_NONE": _errno(p.mprotect, x, PAGE_SIZE, PROT_NONE),
        "read of PROT_NONE": _errno(p.read, x, 1),
    }
    assert got == {
        "mprotect unaligned": errno.EINVAL, "mprotect bad prot": errno.EINVAL,
        "mprotect PROT_GROWSDOWN": errno.EINVAL, "mprotect negative length": errno.ENOMEM,
        "mprotect length 0": None, "mprotect from the hole": errno.ENOMEM, "write after it": None,
        "mprotect over the hole": errno.ENOMEM, "write before the hole": errno.EFAULT,
        "write after the hole": None, "read of the hole": errno.EFAULT,
        "DONTNEED unaligned": errno.EINVAL, "DONTNEED negative length": errno.EINVAL,
        "DONTNEED length 0": None, "DONTNEED over the hole": errno.ENOMEM, "bad advice": errno.EINVAL,
        "munmap unaligned": errno.EINVAL, "munmap length 0": errno.EINVAL, "mprotect PROT_NONE": None,
        "read of PROT_NONE": errno.EFAULT,
    }
    assert p.pagemap(x, 3) == [None, None, None]           # DONTNEED applied to the mapped parts
    p.mprotect(x, PAGE_SIZE, RW)
    assert p.read(x, 1) == b"\x00" and p.read(x + 2 * PAGE_SIZE, 1) == b"\x00"


# ------------------------------------------------------------------ ksm_tests.c
@pytest.mark.parametrize("prot", [RW, PROT_READ], ids=["rw", "r"])
@pytest.mark.parametrize("merge", ["madvise", "prctl"])
@pytest.mark.parametrize("max_page_sharing", [256, 4])
def test_check_ksm_merge(side, prot, merge, max_page_sharing):
    """-M: page_count (10) identical pages, read-only or not, merged by madvise or prctl."""
    ksm_stop(side)
    side.set(max_page_sharing=max_page_sharing)
    p = side.proc()
    mmap_and_merge_range(side, p, ord("*"), 10 * PAGE_SIZE, prot=prot, merge=merge)
    assert counts(side) == expected_counts(10, max_page_sharing)
    if merge == "prctl":
        p.prctl(PR_SET_MEMORY_MERGE, 0)
    ksm_stop(side)
    side.set(max_page_sharing=256)


def test_check_ksm_unmerge(side):
    """-U: two merged pages, one byte written in each: after a scan nothing is merged."""
    p = side.proc()
    x = mmap_and_merge_range(side, p, ord("*"), 2 * PAGE_SIZE)
    assert counts(side) == (1, 1)
    p.write(x, b"-")
    p.write(x + PAGE_SIZE, b"+")
    side.scans(2)
    assert counts(side) == (0, 0)


@pytest.mark.parametrize("use_zero_pages", [0, 1])
def test_check_ksm_zero_page_merge(side, use_zero_pages):
    """-Z: zero pages merge with the zero page (use_zero_pages 1: no KSM page at all) or with each other."""
    side.set(use_zero_pages=use_zero_pages)
    p = side.proc()
    mmap_and_merge_range(side, p, 0, 10 * PAGE_SIZE)
    assert counts(side) == ((0, 0) if use_zero_pages else expected_counts(10, 256))
    assert p.ksm_stat()["ksm_zero_pages"] == (10 if use_zero_pages else 0)


@pytest.mark.parametrize("merge_across_nodes", [1, 0])
def test_check_ksm_numa_merge(side, merge_across_nodes):
    """-N: one page on each of two NUMA nodes: merged only across nodes."""
    if side.numa_nodes < 2:
        pytest.skip(f"{side.name}: at least 2 NUMA nodes needed")
    ksm_stop(side)
    side.set(merge_across_nodes=merge_across_nodes)
    for node in (0, 1):
        p = side.proc(node=node)
        x = p.mmap(PAGE_SIZE)
        p.write(x, b"*" * PAGE_SIZE)
        p.madvise(x, PAGE_SIZE, MADV_MERGEABLE)
    ksm_start(side)
    assert counts(side) == ((1, 1) if merge_across_nodes else (0, 0))
    ksm_stop(side)
    side.set(merge_across_nodes=1)


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def test_ksm_merge_time(side, record_property):
    """-P: the time to merge a duplicated area (8 MiB here)."""
    size = 8 * MiB
    p = side.proc()
    ksm_stop(side)
    x = p.mmap(size)
    p.write(x, b"*" * size)
    p.madvise(x, size, MADV_MERGEABLE)
    secs = _timed(lambda: ksm_start(side))
    assert counts(side) == expected_counts(size // PAGE_SIZE, 256)
    record_property(f"{side.name}_merge_MiB_per_s", round(size / MiB / secs, 1))


def test_ksm_unmerge_time(side, record_property):
    """-D: the time MADV_UNMERGEABLE takes to unmerge a merged area (8 MiB here)."""
    size = 8 * MiB
    p = side.proc()
    x = mmap_and_merge_range(side, p, ord("*"), size)
    secs = _timed(lambda: p.madvise(x, size, MADV_UNMERGEABLE))
    assert not range_maps_duplicates(p, x, size)
    record_property(f"{side.name}_unmerge_MiB_per_s", round(size / MiB / secs, 1))


def test_ksm_cow_time(side, record_property):
    """-C: one-byte writes to 2000 private pages, then to 2000 merged pages (each a COW)."""
    n = 4000
    p = side.proc()
    ksm_stop(side)
    x = p.mmap(n * PAGE_SIZE)
    p.write(x, b"*" * n * PAGE_SIZE)
    plain = _timed(lambda: [p.write(x + i * PAGE_SIZE, b"-") for i in range(0, n - 1, 2)])
    pairs = bytearray(n * PAGE_SIZE)
    for i in range(0, n - 1, 2):                            # 2000 pairs of pages, each pair unlike the others
        k = i // 2 + 1
        pairs[i * PAGE_SIZE:i * PAGE_SIZE + k] = b"+" * k
        pairs[(i + 1) * PAGE_SIZE:(i + 1) * PAGE_SIZE + k] = b"+" * k
    p.write(x, bytes(pairs))
    p.madvise(x, n * PAGE_SIZE, MADV_MERGEABLE)
    ksm_start(side)
    assert counts(side) == (n // 2, n // 2)
    side.set(run=0)
    cow = _timed(lambda: [p.write(x + i * PAGE_SIZE, b"-") for i in range(0, n - 1, 2)])
    side.run_scans(2)
    assert counts(side) == (n // 2, 0)                      # every pair broken: one page each still on its KSM page
    record_property(f"{side.name}_cow_over_plain", round(cow / plain, 2))


# ------------------------------------------------------------------ the counters, step by step, against the kernel
STAT_KEYS = ("ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_merge_any", "ksm_mergeable")
SYS_KEYS = ("pages_shared", "pages_sharing", "ksm_zero_pages")


def _timeline(side) -> list:
    """fork, DONTNEED, MADV_UNMERGEABLE, mprotect, prctl: ksm_stat of both processes and the machine's
    counters after each step, ksmd stopped (run=0) while a counter is read."""
    side.set(use_zero_pages=1)
    out = []

    def snap(what, *procs):
        out.append((what, [{k: q.ksm_stat()[k] for k in STAT_KEYS} for q in procs],
                    {k: side.stats()[k] for k in SYS_KEYS}))

    def scan(n=2):
        side.run_scans(n)
        side.set(run=0)

    p = side.proc()
    x = p.mmap(48 * PAGE_SIZE)
    p.write(x, b"\x5a" * 16 * PAGE_SIZE + bytes(16 * PAGE_SIZE) + os.urandom(16 * PAGE_SIZE))
    p.madvise(x, 48 * PAGE_SIZE, MADV_MERGEABLE)
    scan(3)
    snap("merged", p)
    c = p.fork("child")
    snap("forked", p, c)
    scan()
    snap("child scanned", p, c)
    c.madvise(x + 8 * PAGE_SIZE, 16 * PAGE_SIZE, MADV_DONTNEED)     # 8 KSM pages, 8 KSM zero pages
    snap("child DONTNEED", p, c)
    scan()
    snap("DONTNEED scanned", p, c)
    c.mprotect(x, 48 * PAGE_SIZE, PROT_NONE)
    c.madvise(x, 4 * PAGE_SIZE, MADV_UNMERGEABLE)                   # PROT_NONE KSM pages
    snap("child UNMERGEABLE", p, c)
    scan()
    snap("UNMERGEABLE scanned", p, c)
    p.prctl(PR_SET_MEMORY_MERGE, 1)
    y = p.mmap(8 * PAGE_SIZE)
    p.write(y, b"\x5a" * 8 * PAGE_SIZE)
    snap("merge-any", p, c)
    scan()
    snap("merge-any scanned", p, c)
    p.prctl(PR_SET_MEMORY_MERGE, 0)
    snap("merge-any off", p, c)
    scan(1)
    snap("merge-any off scanned", p, c)
    return out


@pytest.mark.kernel
def test_counters_move_when_the_kernels_move(ksm_machine_factory):
    """The same steps on both sides: every ksm_stat field and pages_shared / pages_sharing /
    ksm_zero_pages equal after each one (the real kernel, 6.18 on the reference machine, is the judge)."""
    if not KERNEL_OK:
        pytest.skip(f"kernel KSM not usable here: {KERNEL_WHY}")
    proto = ProtoSide(ksm_machine_factory(frames=16384, knobs=KNOBS))
    ours = _timeline(proto)
    with kernel_ksm.KernelKSM() as k:
        kernel_ksm._start(k, KNOBS, 120)
        ks = KernelSide(k)
        try:
            theirs = _timeline(ks)
        finally:
            k.set(run=0)
            ks.close()
            k.unmerge_all(60)
    for o, t in zip(ours, theirs):
        assert o == t, f"after {o[0]}: ksm-proto {o[1:]}, kernel {t[1:]}"
    assert ours[1][1][1]["ksm_merging_pages"] == 0 and ours[1][1][1]["ksm_zero_pages"] == 16
