"""fork, MADV_DONTNEED, mprotect, prctl merge-any, pagemap: exact messages, counters, frames and errnos.

Everything here runs on real processes and shared memory.  The notifier messages each secondary
MMU receives are checked as exact sequences in every mode: the VM's own changes (fork's
write-protect, DONTNEED, mprotect) are START/END pairs in every mode, as in the kernel; the COW
faults that follow are the fault handler's set_pte_at_notify.  Bad arguments get the kernel's
errno (the same rules tests/test_ksm_selftests.py checks against the real kernel) and the VM
keeps running with its frame accounting clean.
"""
from __future__ import annotations

import errno
import time

import pytest

from proto import (MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE, PR_GET_MEMORY_MERGE,
                   PR_SET_MEMORY_MERGE, PROT_EXEC, PROT_NONE, PROT_READ, PROT_WRITE)
from proto.layout import VM_MERGEABLE, VM_PFNMAP, VM_READ, VM_SHARED, VM_WRITE, MMView

FAST = dict(pages_to_scan=100000, sleep_millisecs=0)
MODES = ["change_pte", "wrapped", "invalidate"]
RW = PROT_READ | PROT_WRITE
# one set_pte_at_notify (a COW), to a subscriber with / without change_pte
WITH = {"change_pte": ["CHANGE_PTE"], "wrapped": ["START", "CHANGE_PTE", "END"], "invalidate": ["START", "END"]}
WITHOUT = {"change_pte": ["INVALIDATE_PAGE"], "wrapped": ["START", "END"], "invalidate": ["START", "END"]}
PAIR = ["START", "END"]                   # invalidate_range_start/end: the VM's own zap, mprotect, fork


def page(v: int) -> bytes:
    return bytes([v]) * PAGE_SIZE


def vmas(m, vm) -> list:
    return MMView(m.mm_segs[vm.mm_id][0]).vma_list()


def errno_of(f, *args) -> int:
    with pytest.raises(OSError) as ei:
        f(*args)
    return ei.value.errno


def mapcount(m, pfns) -> list[int]:
    return [int(m.ft.mapcount[p]) for p in pfns]


def eventually(m, pfns, want, timeout=10.0) -> list[int]:
    """The mapcounts once they reach want: a COW's old frame is put after the secondary MMUs' acks,
    which may come in after the fault's (early) reply."""
    deadline = time.monotonic() + timeout
    while mapcount(m, pfns) != want and time.monotonic() < deadline:
        time.sleep(0.002)
    return mapcount(m, pfns)


def clean(m, timeout: float = 10.0) -> None:
    """Frame accounting exact (once the last COW's deferred put is in)."""
    deadline = time.monotonic() + timeout
    while (problems := m.check_frames()) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert problems == []


def loaded(m, name="a", n=4, device=True, values=None):
    """A VM with n pages of distinct contents, read through every secondary MMU (sptes installed)."""
    vm = m.spawn_vm(name, pages=256, device=device)
    x = vm.mmap(n * PAGE_SIZE)
    data = b"".join(page(v) for v in (values or range(1, n + 1)))
    vm.write(x, data)
    assert vm.read(x, len(data)) == data
    if device:
        assert vm.dma_read(x, len(data)) == data
    vm.msg_log(clear=True)
    return vm, x, data


# ---------------------------------------------------------------- fork
@pytest.mark.parametrize("mode", MODES)
def test_fork_write_protects_the_parent_with_one_start_end_and_cow_follows(ksm_machine_factory, mode):
    m = ksm_machine_factory(notifier_mode=mode)
    a, x, data = loaded(m)
    f0 = a.stats()["secondary_faults"]
    b = a.fork("b")
    assert a.msg_log(clear=True) == {"kvm": PAIR, "dev": PAIR}           # copy_page_range of one VMA
    assert b.msg_log() == {"kvm": ["REGISTER"], "dev": ["REGISTER"]}      # its own, new secondary MMUs
    assert a.stats()["subs"]["kvm"]["msgs"]["START"] == 4                 # the whole VMA, page by page
    pa, pb = a.pagemap(x, 4), b.pagemap(x, 4)
    assert pa == pb and None not in pa and mapcount(m, pa) == [2] * 4     # COW-shared
    assert [f & (VM_READ | VM_WRITE) for _, _, f in vmas(m, b)] == [VM_READ | VM_WRITE]
    assert b.read(x, len(data)) == data and a.read(x, len(data)) == data
    assert a.stats()["secondary_faults"] - f0 == 4                        # START dropped a's translations
    # the child writes page 0: a copy, set with set_pte_at_notify in its own secondary MMUs
    b.write(x, b"child")
    assert b.msg_log(clear=True) == {"kvm": ["REGISTER"] + WITH[mode], "dev": ["REGISTER"] + WITHOUT[mode]}
    assert a.msg_log() == {"kvm": [], "dev": []}
    pb2 = b.pagemap(x, 4)
    assert pb2[0] != pa[0] and pb2[1:] == pa[1:] and eventually(m, [pa[0], pb2[0]], [1, 1]) == [1, 1]
    # the parent writes page 0: its frame is its own again (mapcount 1), reused in place, no message
    f0 = m.faultd.call("stats")[0]
    a.write(x, b"parent")
    assert a.pagemap(x, 1) == pa[:1] and a.msg_log() == {"kvm": [], "dev": []}
    f1 = m.faultd.call("stats")[0]
    assert (f1["reuses"] - f0["reuses"], f1["cow_copies"] - f0["cow_copies"]) == (1, 0)   # do_wp_page's reuse
    # the parent writes page 1, still shared: a copy; the child keeps the old frame
    a.write(x + PAGE_SIZE, b"parent")
    assert a.msg_log(clear=True) == {"kvm": WITH[mode], "dev": WITHOUT[mode]}
    assert a.pagemap(x + PAGE_SIZE, 1) != pa[1:2] and b.pagemap(x + PAGE_SIZE, 1) == pa[1:2]
    assert a.read(x, 6) == b"parent" and b.read(x, 5) == b"child"
    assert b.read(x + PAGE_SIZE, 2) == page(2)[:2] and a.read(x + PAGE_SIZE, 6) == b"parent"
    clean(m)


def test_fork_copies_vmas_flags_and_merge_any(ksm_machine):
    m = ksm_machine
    a = m.spawn_vm("a", pages=256)
    x = a.mmap(4 * PAGE_SIZE)
    y = a.mmap(2 * PAGE_SIZE)                   # never touched: nothing copied, nothing notified
    a.madvise(x, 2 * PAGE_SIZE, MADV_MERGEABLE)
    a.mprotect(x + 3 * PAGE_SIZE, PAGE_SIZE, PROT_READ)
    a.write(x, page(7))
    a.prctl(PR_SET_MEMORY_MERGE, 1)
    a.msg_log(clear=True)
    b = a.fork("b")
    assert vmas(m, b) == vmas(m, a)
    assert b.prctl(PR_GET_MEMORY_MERGE) == 1 and b.ksm_stat()["ksm_merge_any"] is True
    assert a.msg_log()["kvm"] == PAIR                                     # one VMA maps a page
    assert b.pagemap(y, 2) == [None, None] and b.pagemap(x, 2) == [a.pagemap(x, 1)[0], None]
    assert errno_of(b.write, x + 3 * PAGE_SIZE, b"!") == errno.EFAULT    # read-only in the child too
    clean(m)


def test_fork_of_merged_pages_counts_as_the_kernel(ksm_machine):
    """KSM pages stay KSM pages in the child; its ksm_merging_pages / ksm_rmap_items are 0 until ksmd
    scans it, its KSM zero pages count at once (ksm_fork), and so does the machine's ksm_zero_pages."""
    m = ksm_machine
    m.ksm.set(use_zero_pages=1, **FAST)
    a = m.spawn_vm("a", pages=256)
    x = a.mmap(16 * PAGE_SIZE)
    a.write(x, page(9) * 8 + page(0) * 8)
    a.madvise(x, 16 * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.set(run=1)
    s = m.ksm.wait_full_scans(3)
    m.ksm.set(run=0)
    assert (s["pages_shared"], s["pages_sharing"], s["ksm_zero_pages"]) == (1, 7, 8)
    kpfn = a.pagemap(x, 1)[0]
    b = a.fork("b")
    st = b.ksm_stat()
    assert (st["ksm_merging_pages"], st["ksm_rmap_items"], st["ksm_zero_pages"]) == (0, 0, 8)
    assert m.ksm.stats()["ksm_zero_pages"] == 16 and m.ksm.stats()["pages_sharing"] == 7
    assert b.pagemap(x, 16) == a.pagemap(x, 16) == [kpfn] * 8 + [0] * 8
    assert mapcount(m, [kpfn]) == [16]
    m.ksm.set(run=1)
    s = m.ksm.wait_full_scans(2)
    m.ksm.set(run=0)
    st = b.ksm_stat()
    assert (st["ksm_merging_pages"], st["ksm_rmap_items"], st["ksm_zero_pages"]) == (8, 8, 8)
    assert (s["pages_shared"], s["pages_sharing"], s["ksm_zero_pages"]) == (1, 15, 16)
    b.close()
    assert m.ksm.stats()["ksm_zero_pages"] == 8 and eventually(m, [kpfn], [8]) == [8]
    clean(m)


def test_fork_bad_input(ksm_machine):
    m = ksm_machine
    a = m.spawn_vm("a", pages=64)
    with pytest.raises(ValueError):
        a.fork("a")
    free0 = m.alloc.nr_free
    a.close()
    assert errno_of(a.fork, "c") == errno.ESRCH
    assert m.alloc.nr_free == free0 and not m.mm_segs


# ---------------------------------------------------------------- MADV_DONTNEED
@pytest.mark.parametrize("mode", MODES)
def test_dontneed_zaps_with_one_start_end_per_vma(ksm_machine_factory, mode):
    m = ksm_machine_factory(notifier_mode=mode)
    a, x, data = loaded(m, n=6)
    a.mprotect(x + 4 * PAGE_SIZE, 2 * PAGE_SIZE, PROT_READ)             # two VMAs now
    a.msg_log(clear=True)
    free0 = m.alloc.nr_free
    a.madvise(x + 2 * PAGE_SIZE, 4 * PAGE_SIZE, MADV_DONTNEED)
    assert a.msg_log(clear=True) == {"kvm": PAIR * 2, "dev": PAIR * 2}
    assert m.alloc.nr_free == free0 + 4
    assert a.pagemap(x, 6)[2:] == [None] * 4
    assert a.read(x, 6 * PAGE_SIZE) == data[:2 * PAGE_SIZE] + bytes(4 * PAGE_SIZE)   # anonymous: zeros
    assert a.pagemap(x, 6)[2:] == [0] * 4                                 # read faults: the zero page
    a.write(x + 2 * PAGE_SIZE, b"again")                                 # a COW of the zero page
    assert a.read(x + 2 * PAGE_SIZE, 5) == b"again"
    assert a.msg_log(clear=True) == {"kvm": WITH[mode], "dev": WITHOUT[mode]}
    a.madvise(x, 0, MADV_DONTNEED)                                        # length 0: nothing at all
    assert a.msg_log() == {"kvm": [], "dev": []}
    clean(m)


def test_dontneed_errnos_and_ksm_counters(ksm_machine):
    m = ksm_machine
    m.ksm.set(use_zero_pages=1, **FAST)
    a = m.spawn_vm("a", pages=256)
    x = a.mmap(12 * PAGE_SIZE)
    a.write(x, page(5) * 8 + page(0) * 4)
    a.madvise(x, 12 * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.set(run=1)
    m.ksm.wait_full_scans(3)
    m.ksm.set(run=0)
    assert a.ksm_stat()["ksm_merging_pages"] == 8 and a.ksm_stat()["ksm_zero_pages"] == 4
    a.madvise(x + 6 * PAGE_SIZE, 4 * PAGE_SIZE, MADV_DONTNEED)         # 2 KSM pages, 2 KSM zero pages
    st = a.ksm_stat()
    assert (st["ksm_merging_pages"], st["ksm_rmap_items"], st["ksm_zero_pages"]) == (8, 8, 2)   # zero: at once
    assert m.ksm.stats()["ksm_zero_pages"] == 2 and m.ksm.stats()["pages_sharing"] == 7
    m.ksm.set(run=1)
    s = m.ksm.wait_full_scans(2)
    m.ksm.set(run=0)
    assert (s["pages_shared"], s["pages_sharing"]) == (1, 5) and a.ksm_stat()["ksm_merging_pages"] == 6
    # errnos: unaligned start, negative length, bad advice: EINVAL; a hole: ENOMEM after the rest
    assert errno_of(a.madvise, x + 1, PAGE_SIZE, MADV_DONTNEED) == errno.EINVAL
    assert errno_of(a.madvise, x, -PAGE_SIZE, MADV_DONTNEED) == errno.EINVAL
    assert errno_of(a.madvise, x, PAGE_SIZE, 5) == errno.EINVAL
    a.munmap(x + PAGE_SIZE, PAGE_SIZE)
    assert errno_of(a.madvise, x, 3 * PAGE_SIZE, MADV_DONTNEED) == errno.ENOMEM
    assert a.pagemap(x, 3) == [None, None, None]
    assert errno_of(a.madvise, x + PAGE_SIZE, PAGE_SIZE, MADV_DONTNEED) == errno.ENOMEM
    p = a.mmap(2 * PAGE_SIZE, vm_flags=VM_PFNMAP)
    assert errno_of(a.madvise, p, PAGE_SIZE, MADV_DONTNEED) == errno.EINVAL
    assert a.read(x + 4 * PAGE_SIZE, 2) == b"\x05\x05"                   # the VM goes on
    clean(m)


# ---------------------------------------------------------------- mprotect
@pytest.mark.parametrize("mode", MODES)
def test_mprotect_messages_access_and_write_upgrade(ksm_machine_factory, mode):
    m = ksm_machine_factory(notifier_mode=mode)
    a, x, data = loaded(m)
    a.mprotect(x, 2 * PAGE_SIZE, PROT_READ)
    assert a.msg_log(clear=True) == {"kvm": PAIR, "dev": PAIR}
    assert errno_of(a.write, x + PAGE_SIZE, b"no") == errno.EFAULT
    assert a.read(x, 2 * PAGE_SIZE) == data[:2 * PAGE_SIZE]
    a.mprotect(x, 2 * PAGE_SIZE, PROT_READ)                              # no change: no notifier
    assert a.msg_log(clear=True) == {"kvm": [], "dev": []}
    a.mprotect(x, 2 * PAGE_SIZE, RW)                                     # exclusive pages: writable at once
    assert a.msg_log(clear=True) == {"kvm": PAIR, "dev": PAIR}
    p0 = a.stats()["primary_faults"]
    a.write(x, b"rw")
    assert a.stats()["primary_faults"] == p0 and a.read(x, 2) == b"rw"
    assert len(vmas(m, a)) == 1                                          # back to one VMA (vma_merge)
    a.mprotect(x, 4 * PAGE_SIZE, PROT_NONE)
    assert a.msg_log(clear=True) == {"kvm": PAIR, "dev": PAIR}
    for f in (a.read, a.dma_read):
        assert errno_of(f, x + 3 * PAGE_SIZE, 1) == errno.EFAULT
    assert errno_of(a.write, x, b"x") == errno.EFAULT
    assert a.pagemap(x, 4) != [None] * 4                                 # the frames stay
    y = a.mmap(2 * PAGE_SIZE)
    a.mprotect(y, 2 * PAGE_SIZE, PROT_READ)                              # unpopulated: no notifier
    assert a.msg_log() == {"kvm": [], "dev": []}
    a.mprotect(x, 4 * PAGE_SIZE, PROT_READ | PROT_EXEC)
    assert a.read(x, 2) == b"rw" and a.read(x + 3 * PAGE_SIZE, 1) == b"\x04"
    clean(m)


def test_mprotect_errnos(ksm_machine):
    m = ksm_machine
    a = m.spawn_vm("a", pages=64)
    x = a.mmap(3 * PAGE_SIZE)
    a.write(x, page(1) * 3)
    assert errno_of(a.mprotect, x + 1, PAGE_SIZE, PROT_READ) == errno.EINVAL
    assert errno_of(a.mprotect, x, PAGE_SIZE, 0x10) == errno.EINVAL
    assert errno_of(a.mprotect, x, PAGE_SIZE, 0x01000000) == errno.EINVAL      # PROT_GROWSDOWN
    assert errno_of(a.mprotect, x, -PAGE_SIZE, PROT_READ) == errno.ENOMEM
    assert errno_of(a.mprotect, 4096, PAGE_SIZE, PROT_READ) == errno.ENOMEM    # nothing mapped there
    a.mprotect(x, 0, PROT_NONE)                                                # length 0: success, nothing
    a.mprotect(x, 1, PROT_READ | 0x8)                                          # PROT_SEM accepted; rounded up
    assert errno_of(a.write, x, b"x") == errno.EFAULT
    a.munmap(x + PAGE_SIZE, PAGE_SIZE)
    assert errno_of(a.mprotect, x, 3 * PAGE_SIZE, PROT_NONE) == errno.ENOMEM   # a hole: the part before it changed
    assert errno_of(a.read, x, 1) == errno.EFAULT
    a.write(x + 2 * PAGE_SIZE, b"ok")                                          # the part after it did not
    assert errno_of(a.mprotect, x + PAGE_SIZE, 2 * PAGE_SIZE, PROT_READ) == errno.ENOMEM   # starts in the hole
    a.write(x + 2 * PAGE_SIZE, b"ok")
    assert a.read(x + 2 * PAGE_SIZE, 2) == b"ok"
    clean(m)


def test_prot_none_and_read_only_pages_merge_and_unmerge(ksm_machine):
    """KSM merges PROT_NONE and read-only pages (the kernel does); MADV_UNMERGEABLE unmerges them."""
    m = ksm_machine
    m.ksm.set(**FAST)
    a = m.spawn_vm("a", pages=256)
    x = a.mmap(8 * PAGE_SIZE)
    y = a.mmap(8 * PAGE_SIZE)
    a.write(x, page(0x33) * 8)
    a.write(y, page(0x44) * 8)
    a.mprotect(x, 8 * PAGE_SIZE, PROT_NONE)
    a.mprotect(y, 8 * PAGE_SIZE, PROT_READ)
    a.madvise(x, 8 * PAGE_SIZE, MADV_MERGEABLE)
    a.madvise(y, 8 * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.set(run=1)
    s = m.ksm.wait_full_scans(3)
    m.ksm.set(run=0)
    assert (s["pages_shared"], s["pages_sharing"]) == (2, 14)
    assert len(set(a.pagemap(x, 8))) == 1 and len(set(a.pagemap(y, 8))) == 1
    a.madvise(x, 4 * PAGE_SIZE, MADV_UNMERGEABLE)
    pm = a.pagemap(x, 8)
    assert len(set(pm[:4])) == 4 and len(set(pm[4:])) == 1 and pm[0] != pm[4]
    assert errno_of(a.read, x, 1) == errno.EFAULT                         # still PROT_NONE
    a.mprotect(x, 8 * PAGE_SIZE, RW)
    assert a.read(x, 8 * PAGE_SIZE) == page(0x33) * 8
    clean(m)


# ---------------------------------------------------------------- prctl merge-any
def test_prctl_merge_any(ksm_machine):
    m = ksm_machine
    m.ksm.set(**FAST)
    a = m.spawn_vm("a", pages=256)
    x = a.mmap(8 * PAGE_SIZE)
    sh = a.mmap(2 * PAGE_SIZE, vm_flags=VM_SHARED)
    a.write(x, page(3) * 8)
    z = a.mmap(2 * PAGE_SIZE)
    a.madvise(z, 2 * PAGE_SIZE, MADV_MERGEABLE)
    assert a.prctl(PR_GET_MEMORY_MERGE) == 0
    assert a.prctl(PR_SET_MEMORY_MERGE, 2) == 0                           # any non-zero value sets it
    assert a.prctl(PR_GET_MEMORY_MERGE) == 1
    st = a.ksm_stat()
    assert st["ksm_merge_any"] is True and st["ksm_mergeable"] is True
    assert {s: bool(f & VM_MERGEABLE) for s, _, f in vmas(m, a)} == {x: True, sh: False, z: True}
    w = a.mmap(4 * PAGE_SIZE)                                             # later VMAs too
    a.write(w, page(3) * 4)
    assert [bool(f & VM_MERGEABLE) for s, _, f in vmas(m, a) if s == w] == [True]
    m.ksm.set(run=1)
    m.ksm.wait_full_scans(3)
    m.ksm.set(run=0)
    assert a.ksm_stat()["ksm_merging_pages"] == 12
    assert len(set(a.pagemap(x, 8) + a.pagemap(w, 4))) == 1
    a.prctl(PR_SET_MEMORY_MERGE, 0)                                       # off: unmerged, every VMA too
    st = a.ksm_stat()
    assert (st["ksm_merge_any"], st["ksm_mergeable"], st["ksm_merging_pages"]) == (False, False, 12)
    assert len(set(a.pagemap(x, 8) + a.pagemap(w, 4))) == 12
    assert a.read(x, 8 * PAGE_SIZE) == page(3) * 8
    a.prctl(PR_SET_MEMORY_MERGE, 0)                                       # already off: nothing
    n0 = m.ksm.stats()["full_scans"]
    m.ksm.set(run=1)                      # one walk, and ksmd forgets the mm (then has nothing to scan)
    m.ksm.wait_full_scans(at_least=n0 + 1)
    m.ksm.set(run=0)
    st = a.ksm_stat()
    assert (st["ksm_merging_pages"], st["ksm_rmap_items"]) == (0, 0)
    clean(m)


def test_prctl_errnos(ksm_machine_factory):
    m = ksm_machine_factory()
    a = m.spawn_vm("a", pages=64)
    for args in ((PR_SET_MEMORY_MERGE, 1, 1), (PR_SET_MEMORY_MERGE, 0, 0, 1), (PR_SET_MEMORY_MERGE, 1, 0, 0, 7),
                 (PR_GET_MEMORY_MERGE, 1), (PR_GET_MEMORY_MERGE, 0, 0, 0, 1), (999,), (-1, 1)):
        assert errno_of(a.prctl, *args) == errno.EINVAL, args
    assert a.prctl(PR_GET_MEMORY_MERGE) == 0
    m2 = ksm_machine_factory(ksm_enabled=False)                           # CONFIG_KSM=n: no such option
    b = m2.spawn_vm("b", pages=64)
    assert errno_of(b.prctl, PR_SET_MEMORY_MERGE, 1) == errno.EINVAL
    assert errno_of(b.prctl, PR_GET_MEMORY_MERGE) == errno.EINVAL
    x = b.mmap(PAGE_SIZE)
    b.madvise(x, PAGE_SIZE, MADV_DONTNEED)                                # DONTNEED does not need KSM
    clean(m)
    clean(m2)


# ---------------------------------------------------------------- pagemap, EFAULT
def test_pagemap_and_efault_keep_the_vm_running(ksm_machine):
    m = ksm_machine
    a = m.spawn_vm("a", pages=64)
    x = a.mmap(3 * PAGE_SIZE)
    a.write(x + PAGE_SIZE, b"1")
    a.read(x + 2 * PAGE_SIZE, 1)
    pm = a.pagemap(x, 3)
    assert pm[0] is None and pm[1] > 0 and pm[2] == 0                     # the zero page is frame 0
    assert a.pagemap(x - 4 * PAGE_SIZE, 2) == [None, None]               # below the address space
    assert a.pagemap(x + 60 * PAGE_SIZE, 8) == [None] * 8                 # past its end
    assert a.pagemap(x, 0) == []
    assert errno_of(a.pagemap, x + 1, 1) == errno.EINVAL
    assert errno_of(a.pagemap, x, -1) == errno.EINVAL
    for f, args in ((a.read, (x + 3 * PAGE_SIZE, 1)), (a.write, (x - PAGE_SIZE, b"x")),
                    (a.read, (x + 2 * PAGE_SIZE, 2 * PAGE_SIZE))):
        assert errno_of(f, *args) == errno.EFAULT
    a.write(x + 2 * PAGE_SIZE, b"still here")
    assert a.read(x + 2 * PAGE_SIZE, 10) == b"still here"
    a.close()
    assert errno_of(a.pagemap, x, 1) == errno.ESRCH and errno_of(a.ksm_stat) == errno.ESRCH
    clean(m)


def test_a_write_across_a_read_only_page_stops_there(ksm_machine):
    """The part before the forbidden page is written, as a user copy that faults there would."""
    m = ksm_machine
    a = m.spawn_vm("a", pages=64)
    x = a.mmap(3 * PAGE_SIZE)
    a.write(x, page(1) * 3)
    a.mprotect(x + PAGE_SIZE, PAGE_SIZE, PROT_READ)
    assert errno_of(a.write, x + PAGE_SIZE - 2, b"abcd") == errno.EFAULT
    assert a.read(x + PAGE_SIZE - 2, 4) == b"ab\x01\x01"
    clean(m)
