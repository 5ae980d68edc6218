"""ksmd: merging, counters, chains, zero pages, unmerge and re-merge, knobs (exact numbers).

Every test runs with one scanner and with two (core/shard.py): the same numbers.
"""
from __future__ import annotations

import errno
import os

import pytest

from proto import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE

FAST = dict(pages_to_scan=100000, sleep_millisecs=0)


@pytest.fixture(params=[1, 2], ids=["1-scanner", "2-scanners"])
def scanners(request):
    return request.param


@pytest.fixture
def ksm_machine(ksm_machine_factory, scanners):
    return ksm_machine_factory(scanners=scanners)


def page(v: int) -> bytes:
    return bytes([v]) * PAGE_SIZE


def load(vm, pages: list[bytes], mergeable=True) -> int:
    a = vm.mmap(len(pages) * PAGE_SIZE)
    vm.write(a, b"".join(pages))
    if mergeable:
        vm.madvise(a, len(pages) * PAGE_SIZE, MADV_MERGEABLE)
    return a


def test_duplicates_across_vms_merge_and_read_back(ksm_machine):
    m = ksm_machine
    m.ksm.set(smart_scan=0, **FAST)
    contents = [page(i + 1) for i in range(8)] + [os.urandom(PAGE_SIZE) for _ in range(4)]
    vms = [m.spawn_vm(f"vm{i}") for i in range(3)]
    addrs = [load(vm, contents[:8] + [os.urandom(PAGE_SIZE) for _ in range(4)]) for vm in vms]
    free0 = m.alloc.nr_free
    m.ksm.set(run=1)
    s = m.ksm.wait_stable(30)
    assert s["pages_shared"] == 8
    assert s["pages_sharing"] == 16
    assert s["pages_unshared"] == 12
    assert s["pages_volatile"] == 0
    assert s["stable_node_chains"] == 0 and s["stable_node_dups"] == 0
    assert s["ksm_rmap_items"] == 36
    assert m.alloc.nr_free == free0 + 16          # the merged frames went back to the allocator
    for vm, a in zip(vms, addrs):
        assert vm.read(a, 8 * PAGE_SIZE) == b"".join(contents[:8])
        st = vm.ksm_stat()
        assert st["ksm_rmap_items"] == 12 and st["ksm_merging_pages"] == 8
    assert s["general_profit"] == 16 * PAGE_SIZE - s["metadata_bytes"]


def test_first_full_scan_only_records_checksums(ksm_machine):
    m = ksm_machine
    m.ksm.set(pages_to_scan=11, sleep_millisecs=60000)   # one wake-up = one full scan of 10 pages
    vm = m.spawn_vm("a")
    load(vm, [page(1)] * 10)
    m.ksm.set(run=1)
    s = m.ksm.wait_full_scans(timeout=30, at_least=1)
    assert s["full_scans"] == 1
    assert (s["pages_shared"], s["pages_sharing"], s["pages_volatile"], s["pages_scanned"]) == (0, 0, 10, 10)
    m.ksm.set(sleep_millisecs=60000)                     # a knob write wakes ksmd: the second full scan
    s = m.ksm.wait_full_scans(timeout=30, at_least=2)
    assert s["full_scans"] == 2
    assert (s["pages_shared"], s["pages_sharing"], s["pages_volatile"], s["pages_scanned"]) == (1, 9, 0, 20)


def test_max_page_sharing_chains(ksm_machine):
    m = ksm_machine
    m.ksm.set(max_page_sharing=4, **FAST)
    vm = m.spawn_vm("a")
    load(vm, [page(9)] * 10)
    m.ksm.set(run=1)
    s = m.ksm.wait_stable(30)
    # 4 + 4 + 2: three dups of one content, chained (kernel: chain created with 2 dups)
    assert (s["pages_shared"], s["pages_sharing"]) == (3, 7)
    assert (s["stable_node_chains"], s["stable_node_dups"]) == (1, 3)
    assert s["pages_unshared"] == 0


def test_max_page_sharing_leftover_stays_unshared(ksm_machine):
    m = ksm_machine
    m.ksm.set(max_page_sharing=4, smart_scan=0, **FAST)
    vm = m.spawn_vm("a")
    load(vm, [page(9)] * 9)
    m.ksm.set(run=1)
    s = m.ksm.wait_stable(30)
    assert (s["pages_shared"], s["pages_sharing"], s["pages_unshared"]) == (2, 6, 1)
    assert (s["stable_node_chains"], s["stable_node_dups"]) == (1, 2)


@pytest.mark.parametrize("use_zero", [0, 1])
def test_zero_pages(ksm_machine, use_zero):
    m = ksm_machine
    m.ksm.set(use_zero_pages=use_zero, **FAST)
    vm = m.spawn_vm("a")
    a = load(vm, [page(0)] * 20 + [page(5)] * 2)
    m.ksm.set(run=1)
    s = m.ksm.wait_stable(30)
    if use_zero:
        assert s["ksm_zero_pages"] == 20 and vm.ksm_stat()["ksm_zero_pages"] == 20
        assert (s["pages_shared"], s["pages_sharing"]) == (1, 1)
        assert s["ksm_rmap_items"] == 2          # zero-page mappings are no candidates any more
    else:
        assert s["ksm_zero_pages"] == 0
        assert (s["pages_shared"], s["pages_sharing"]) == (2, 20)
    assert vm.read(a, 22 * PAGE_SIZE) == bytes(20 * PAGE_SIZE) + page(5) * 2
    # a write to a KSM zero page is a COW; ksm_zero_pages drops at once
    vm.write(a, b"\x01")
    if use_zero:
        assert m.ksm.stats()["ksm_zero_pages"] == 19
    assert vm.read(a, 2) == b"\x01\x00"


def test_cow_then_remerge(ksm_machine):
    m = ksm_machine
    m.ksm.set(smart_scan=0, **FAST)       # smart_scan would delay the re-merge by up to 8 scans
    a, b = m.spawn_vm("a"), m.spawn_vm("b")
    xa, xb = load(a, [page(3)] * 4), load(b, [page(3)] * 4)
    m.ksm.set(run=1)
    s = m.ksm.wait_stable(30)
    assert (s["pages_shared"], s["pages_sharing"]) == (1, 7)
    c0 = a.stats()["cow_faults"]
    a.write(xa, b"\x04" * 10)                    # COW: a private copy
    assert a.stats()["cow_faults"] == c0 + 1
    assert a.read(xa, 12) == b"\x04" * 10 + b"\x03\x03"
    assert b.read(xb, 4) == b"\x03" * 4
    s = m.ksm.wait_stable(30)
    assert (s["pages_shared"], s["pages_sharing"]) == (1, 6)
    a.write(xa, b"\x03" * 10)                    # identical again: merged again
    s = m.ksm.wait_stable(30)
    assert (s["pages_shared"], s["pages_sharing"]) == (1, 7)
    assert a.read(xa, PAGE_SIZE) == page(3)


def test_unmergeable_and_run2_unmerge_everything(ksm_machine):
    m = ksm_machine
    m.ksm.set(use_zero_pages=1, **FAST)
    a, b = m.spawn_vm("a"), m.spawn_vm("b")
    pages = [page(7)] * 6 + [page(0)] * 3
    xa, xb = load(a, pages + [os.urandom(PAGE_SIZE)]), load(b, pages + [os.urandom(PAGE_SIZE)])
    m.ksm.set(run=1)
    s = m.ksm.wait_stable(30)
    assert (s["pages_shared"], s["pages_sharing"], s["ksm_zero_pages"]) == (1, 11, 6)
    free_merged = m.alloc.nr_free
    a.madvise(xa, 10 * PAGE_SIZE, MADV_UNMERGEABLE)
    assert m.alloc.nr_free == free_merged - 9             # 6 KSM + 3 zero pages became private copies
    assert m.ksm.stats()["ksm_zero_pages"] == 3           # at once
    s = m.ksm.wait_stable(30)
    assert (s["pages_shared"], s["pages_sharing"], s["ksm_zero_pages"]) == (1, 5, 3)
    assert a.read(xa, 9 * PAGE_SIZE) == b"".join(pages)
    m.ksm.set(run=2)                                       # returns once everything is unmerged
    s = m.ksm.stats()
    for k in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "ksm_zero_pages",
              "stable_node_chains", "stable_node_dups", "full_scans", "ksm_rmap_items"):
        assert s[k] == 0, k
    assert b.read(xb, 9 * PAGE_SIZE) == b"".join(pages)
    assert b.ksm_stat()["ksm_merging_pages"] == 0
    m.ksm.set(run=1)                                       # VM_MERGEABLE stays: merged again
    s = m.ksm.wait_stable(30)
    assert (s["pages_shared"], s["pages_sharing"], s["ksm_zero_pages"]) == (1, 5, 3)


def test_knob_errors(ksm_machine):
    m = ksm_machine
    for bad in (dict(run=3), dict(pages_to_scan=-1), dict(max_page_sharing=1), dict(sleep_millisecs=60001),
                dict(use_zero_pages=2), dict(advisor_mode="fast"), dict(no_such_knob=1),
                dict(advisor_target_scan_time=0)):
        with pytest.raises(OSError) as ei:
            m.ksm.set(**bad)
        assert ei.value.errno == errno.EINVAL, bad
        assert list(bad)[0] in str(ei.value)
    assert m.ksm.get("run") == 0 and m.ksm.get("pages_to_scan") == 100
    m.ksm.set(advisor_mode="scan-time")
    assert m.ksm.get("pages_to_scan") == 500
    with pytest.raises(OSError) as ei:
        m.ksm.set(pages_to_scan=5)
    assert ei.value.errno == errno.EINVAL
    m.ksm.set(advisor_mode="none")
    assert m.ksm.get("pages_to_scan") == 100
    # EBUSY while merged, fine after run=2
    m.ksm.set(**FAST)
    vm = m.spawn_vm("a")
    load(vm, [page(1)] * 4)
    m.ksm.set(run=1)
    m.ksm.wait_stable(30)
    for k, v in (("max_page_sharing", 10), ("merge_across_nodes", 0)):
        with pytest.raises(OSError) as ei:
            m.ksm.set(**{k: v})
        assert ei.value.errno == errno.EBUSY
    m.ksm.set(max_page_sharing=256)                       # same value: fine
    m.ksm.set(run=2)
    m.ksm.set(max_page_sharing=10, merge_across_nodes=0)
    assert m.ksm.get("max_page_sharing") == 10


def test_merge_across_nodes_zero_keeps_nodes_apart(ksm_machine_factory, scanners):
    m = ksm_machine_factory(nodes=2, scanners=scanners)
    m.ksm.set(merge_across_nodes=0, **FAST)
    a, b, c = m.spawn_vm("a", node=0), m.spawn_vm("b", node=1), m.spawn_vm("c", node=1)
    for vm in (a, b, c):
        load(vm, [page(2)] * 2)
    m.ksm.set(run=1)
    s = m.ksm.wait_stable(30)
    assert (s["pages_shared"], s["pages_sharing"]) == (2, 4)    # one KSM page per node


def test_smart_scan_skips_pages_that_never_merge(ksm_machine):
    m = ksm_machine
    m.ksm.set(**FAST)
    vm = m.spawn_vm("a")
    load(vm, [os.urandom(PAGE_SIZE) for _ in range(10)])
    m.ksm.set(run=1)
    m.ksm.wait_full_scans(5, 30)
    m.ksm.set(run=0)
    s = m.ksm.stats()
    # visits 1-4 processed, visit 5 skipped (kernel pattern), so after >= 5 scans each page was skipped
    assert s["pages_skipped"] >= 10 and s["pages_skipped"] % 10 == 0
    assert s["pages_scanned"] + s["pages_skipped"] == 10 * s["full_scans"]


def test_scanners_and_fault_handlers_are_fixed_at_start(ksm_machine_factory):
    m = ksm_machine_factory(scanners=2, fault_handlers=2)
    assert (m.ksm.get("scanners"), m.ksm.get("fault_handlers")) == (2, 2)
    assert len(m.scanner_procs) == 2 and len(m.faultds) == 2
    m.ksm.set(scanners=2)                                 # the same value: fine
    for k, v in (("scanners", 3), ("fault_handlers", 1)):
        with pytest.raises(OSError) as ei:
            m.ksm.set(**{k: v})
        assert ei.value.errno == errno.EBUSY and k in str(ei.value)
    with pytest.raises(OSError) as ei:
        m.ksm.set(scanners=0)
    assert ei.value.errno == errno.EINVAL
    vms = [m.spawn_vm(f"v{i}") for i in range(2)]          # mm 0 and mm 1: one fault handler each
    xs = [load(vm, [page(4)] * 6) for vm in vms]
    m.ksm.set(run=1, **FAST)
    s = m.ksm.wait_stable(30)
    assert (s["pages_shared"], s["pages_sharing"]) == (1, 11)
    m.ksm.set(run=0)
    for vm, x in zip(vms, xs):
        vm.write(x, b"\x05" * PAGE_SIZE)                  # COW, each by its VM's fault handler
        assert vm.read(x, 2 * PAGE_SIZE) == b"\x05" * PAGE_SIZE + page(4)
    assert [fd.call("stats")[0]["cow_copies"] for fd in m.faultds] == [1, 1]
    info = m.ksmd.call("info")[0]
    assert info["scanners"] == 2 and info["scan_errors"] == 0


def test_a_page_shared_with_a_fork_child_is_not_merged_with_itself(ksm_machine):
    """unstable_tree_search_insert: the tree page being this very frame (COW-shared by fork) is no
    match: no KSM page is made of it, and the page stays out of both trees (volatile), as in the kernel."""
    m = ksm_machine
    m.ksm.set(smart_scan=0, **FAST)
    a = m.spawn_vm("a", pages=256)
    x = a.mmap(8 * PAGE_SIZE)
    a.write(x, os.urandom(8 * PAGE_SIZE))
    a.madvise(x, 8 * PAGE_SIZE, MADV_MERGEABLE)
    b = a.fork("b")
    m.ksm.set(run=1)
    s = m.ksm.wait_full_scans(3)
    m.ksm.set(run=0)
    assert (s["pages_shared"], s["pages_sharing"], s["pages_unshared"], s["pages_volatile"]) == (0, 0, 8, 8)
    assert a.ksm_stat()["ksm_merging_pages"] == b.ksm_stat()["ksm_merging_pages"] == 0
    assert a.pagemap(x, 8) == b.pagemap(x, 8)


def test_publish_writes_full_scans_last():
    """A reader that sees full_scans advance must see that scan's counters and every mm's ksm_stat:
    ksmd.publish stores full_scans after everything else (the selftests' ksm_start waits on it and
    then reads ksm_merging_pages; before the fix it could read the row of the scan before)."""
    from types import SimpleNamespace

    from proto.layout import COUNTERS, MM_STATS
    from workers.actors.ksmd import Ksmd

    stores = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, key):
            return 0

        def __setitem__(self, key, value):
            stores.append((self.name, key))

    items = SimpleNamespace(nr_items=10, merging=9)
    scan = SimpleNamespace(slots={3: SimpleNamespace(id=3, items=items)},
                           counters=lambda zero: {"pages_shared": 1, "pages_sharing": 8, "full_scans": 2})
    ksmd = SimpleNamespace(scan=scan, tr=None, stats=SimpleNamespace(counters=Recorder("counters"),
                                                                       mm=Recorder("mm")))
    Ksmd.publish(ksmd)
    fs = ("counters", COUNTERS.index("full_scans"))
    assert stores[-1] == fs and stores.count(fs) == 1
    assert ("mm", (3, MM_STATS.index("ksm_merging_pages"))) in stores[:-1]
    assert ("counters", COUNTERS.index("pages_sharing")) in stores[:-1]


def test_fault_poll_us_is_a_knob_of_any_time_and_zero_sleeps(ksm_machine):
    """fault_poll_us (ksm-proto's own, like KVM's halt_poll_ns): how long a fault handler, after a
    VM's frame, and a VM waiting for its fault's reply poll their sockets before they sleep.  0: they
    sleep at once, so no frame is read while polling; either way the COWs are the same."""
    m = ksm_machine
    assert m.ksm.get("fault_poll_us") == 200
    for bad in (-1, 100_001, "soon"):
        with pytest.raises(OSError) as ei:
            m.ksm.set(fault_poll_us=bad)
        assert ei.value.errno == errno.EINVAL and "fault_poll_us" in str(ei.value)
    vm = m.spawn_vm("a")
    x = load(vm, [page(3)] * 16)
    m.ksm.set(run=1, **FAST)
    assert m.ksm.wait_stable(30)["pages_sharing"] == 15
    m.ksm.set(run=0)
    fd = m.faultd_of(vm.mm_id)

    def cows(pages, byte):
        v0, f0 = vm.stats(), fd.call("stats")[0]
        for p in pages:
            vm.write(x + p * PAGE_SIZE, bytes([byte]) * PAGE_SIZE)
        v1, f1 = vm.stats(), fd.call("stats")[0]
        return (v1["cow_faults"] - v0["cow_faults"], f1["cow_copies"] - f0["cow_copies"],
                v1["fast_replies"] - v0["fast_replies"], v1["polled_replies"] - v0["polled_replies"],
                f1["polled"] - f0["polled"])

    # (how many replies the VM read on the socket itself, `fast`, depends on whether each came within
    # FAST_WAIT_NS: a wall-clock bound, so it is not asserted; what polling does is)
    m.ksm.set(fault_poll_us=0)
    assert m.ksm.get("fault_poll_us") == 0
    cow, copies, fast, polled, fd_polled = cows(range(0, 8), 7)
    assert (cow, copies, polled, fd_polled) == (8, 8, 0, 0)     # every reply waited for asleep, nothing polled
    m.ksm.set(fault_poll_us=100_000)
    cow, copies, fast, polled, fd_polled = cows(range(8, 16), 9)
    assert (cow, copies) == (8, 8)                      # (a KSM page is copied even by its last mapper)
    assert polled + fd_polled >= 1      # (the fault handler polls 100 ms after each frame: the APPLIED comes in it)
    assert vm.read(x, 16 * PAGE_SIZE) == b"\x07" * 8 * PAGE_SIZE + b"\x09" * 8 * PAGE_SIZE
