"""mmu_notifiers: the exact messages each secondary MMU receives, per mode; the seed's claim."""
from __future__ import annotations

import pytest

from proto import MADV_MERGEABLE, PAGE_SIZE

FAST = dict(pages_to_scan=100000, sleep_millisecs=0)
MODES = ["change_pte", "wrapped", "invalidate"]

# what one set_pte_at_notify looks like to a subscriber with / without change_pte
WITH = {"change_pte": ["CHANGE_PTE"], "wrapped": ["START", "CHANGE_PTE", "END"], "invalidate": ["START", "END"]}
WITHOUT = {"change_pte": ["INVALIDATE_PAGE"], "wrapped": ["START", "END"], "invalidate": ["START", "END"]}


def merged_pair(m, npages=1, device=False):
    """Two VMs holding the same pages, both mapped in their secondary MMUs, then merged."""
    m.ksm.set(**FAST)
    a = m.spawn_vm("a", device=device)
    b = m.spawn_vm("b", device=device)
    data = b"".join(bytes([i % 250 + 1]) * PAGE_SIZE for i in range(npages))
    xs = []
    for vm in (a, b):
        x = vm.mmap(len(data))
        vm.write(x, data)
        vm.madvise(x, len(data), MADV_MERGEABLE)
        assert vm.read(x, len(data)) == data
        if device:
            assert vm.dma_read(x, len(data)) == data
        xs.append(x)
    m.ksm.set(run=1)
    s = m.ksm.wait_stable(30)
    m.ksm.set(run=0)
    assert (s["pages_shared"], s["pages_sharing"]) == (npages, npages)
    return a, b, xs, data


@pytest.mark.parametrize("mode", MODES)
def test_exact_messages_for_one_merge_and_one_cow(ksm_machine_factory, mode):
    m = ksm_machine_factory(notifier_mode=mode)
    a, b, (xa, xb), data = merged_pair(m, 1, device=True)
    # a's page was the unstable-tree page: write-protected, then replaced by b's (now KSM) frame;
    # b's page became the KSM page in place: only write-protected
    la, lb = a.msg_log(clear=True), b.msg_log(clear=True)
    assert la["kvm"] == ["REGISTER"] + WITH[mode] * 2
    assert lb["kvm"] == ["REGISTER"] + WITH[mode]
    assert la["dev"] == ["REGISTER"] + WITHOUT[mode] * 2          # change_pte falls back to invalidate_page
    assert lb["dev"] == ["REGISTER"] + WITHOUT[mode]
    # one COW fault: a new frame set with set_pte_at_notify
    a.write(xa, b"!")
    la = a.msg_log(clear=True)
    assert la["kvm"] == WITH[mode] and la["dev"] == WITHOUT[mode]
    assert b.msg_log() == {"kvm": [], "dev": []}                 # b heard nothing of a's COW
    assert a.read(xa, 2) == b"!" + data[1:2]
    assert b.read(xb, PAGE_SIZE) == data


@pytest.mark.parametrize("mode", MODES)
def test_seed_claim_reread_after_merge(ksm_machine_factory, mode):
    """After merging N mapped pages: 0 secondary faults on re-read with change_pte, N without."""
    n = 32
    m = ksm_machine_factory(notifier_mode=mode)
    a, b, (xa, xb), data = merged_pair(m, n)
    for vm, x in ((a, xa), (b, xb)):
        before = vm.stats()["secondary_faults"]
        assert vm.read(x, len(data)) == data
        faults = vm.stats()["secondary_faults"] - before
        assert faults == (0 if mode == "change_pte" else n), (vm.name, faults)
    # and per merged page, the messages a's shadow MMU received
    st = a.stats()["subs"]["kvm"]["msgs"]
    per = {k: v / n for k, v in st.items() if v and k not in ("REGISTER",)}
    assert per == {"change_pte": {"CHANGE_PTE": 2.0},
                   "wrapped": {"START": 2.0, "CHANGE_PTE": 2.0, "END": 2.0},
                   "invalidate": {"START": 2.0, "END": 2.0}}[mode]


@pytest.mark.parametrize("mode", MODES)
def test_cow_secondary_faults(ksm_machine_factory, mode):
    m = ksm_machine_factory(notifier_mode=mode)
    a, b, (xa, xb), data = merged_pair(m, 4)
    s0 = a.stats()
    a.write(xa, b"\x00" * 4 * PAGE_SIZE)
    s1 = a.stats()
    assert s1["cow_faults"] - s0["cow_faults"] == 4
    # change_pte installs the new writable frame in place; the others fault it back in
    assert s1["secondary_faults"] - s0["secondary_faults"] == (0 if mode == "change_pte" else 4)


def test_release_on_exit_and_unregister(ksm_machine):
    m = ksm_machine
    vm = m.spawn_vm("a", device=True)
    vm.unregister(1)
    assert vm.msg_log()["dev"] == ["REGISTER", "RELEASE"]
    x = vm.mmap(PAGE_SIZE)
    vm.write(x, b"1")
    with pytest.raises(OSError):
        vm.dma_read(x, 1)                    # the device's translations are gone for good


def test_page_referenced_clear_young(ksm_machine):
    m = ksm_machine
    vm = m.spawn_vm("a", device=True)
    x = vm.mmap(2 * PAGE_SIZE)
    vm.write(x, b"y" * 2 * PAGE_SIZE)
    vm.msg_log(clear=True)
    assert m.page_referenced(vm, x, 2) == 2          # both young in the primary PTEs
    assert vm.msg_log()["kvm"] == ["CLEAR_YOUNG"] and vm.msg_log()["dev"] == ["CLEAR_YOUNG"]
    assert m.page_referenced(vm, x, 2) == 0          # nobody touched them since
    assert vm.read(x + PAGE_SIZE, 1) == b"y"           # the shadow MMU sets its accessed bit
    assert m.page_referenced(vm, x, 2) == 1


def test_a_subscriber_that_stops_answering_is_released(ksm_machine_factory):
    """ksmd does not wait forever on a stopped VM: after ack_timeout it releases that secondary MMU,
    merges, and the VM, once running again, drops its stale translations instead of using them."""
    import os
    import signal
    import time
    m = ksm_machine_factory(ack_timeout=0.5)
    m.ksm.set(pages_to_scan=1000, sleep_millisecs=0)
    a, b = m.spawn_vm("a"), m.spawn_vm("b")
    xs = []
    for vm in (a, b):
        x = vm.mmap(2 * PAGE_SIZE)
        vm.write(x, b"\x04" * 2 * PAGE_SIZE)
        vm.madvise(x, 2 * PAGE_SIZE, MADV_MERGEABLE)
        xs.append(x)
    os.kill(a.pid, signal.SIGSTOP)
    try:
        m.ksm.set(run=1)
        deadline = time.monotonic() + 20
        while m.ksm.stats()["pages_sharing"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        s = m.ksm.stats()
        assert (s["pages_shared"], s["pages_sharing"]) == (1, 3)      # merged without a's acks
    finally:
        os.kill(a.pid, signal.SIGCONT)
    m.ksm.set(run=0)
    with pytest.raises(OSError) as ei:
        a.read(xs[0], 1)
    assert "released" in str(ei.value)
    assert a.stats()["subs"]["kvm"]["released"] is True
    assert b.read(xs[1], 2 * PAGE_SIZE) == b"\x04" * 2 * PAGE_SIZE    # the others go on
