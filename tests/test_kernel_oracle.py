"""The kernel is the oracle: the same bytes through the real KSM and through ksm-proto.

For each page layout, every "VM" is a process of its own on the kernel side (mmap,
MADV_MERGEABLE, /sys/kernel/mm/ksm) and a VM worker on ours.  pages_shared,
pages_sharing, stable_node_chains, stable_node_dups and ksm_zero_pages must be equal,
pages_unshared within 1%, and per process ksm_rmap_items / ksm_merging_pages /
ksm_zero_pages equal.  Ours runs with one scanner and with N (the machine's cores, at
least 2; core/shard.py): the same numbers either way.  Skipped, with the reason, where
sysfs is not writable; every knob is restored and run left at 0 (kernel_ksm.KernelKSM).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from proto import MADV_MERGEABLE, PAGE_SIZE
from workers.oracle import kernel_ksm

OK, WHY = kernel_ksm.available()
pytestmark = [pytest.mark.kernel, pytest.mark.skipif(not OK, reason=f"kernel KSM not usable here: {WHY}")]

EXACT = ("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups", "ksm_zero_pages")
SCANNERS = (1, max(2, os.cpu_count() or 1))
_kernel: dict = {}          # the kernel's counts of a layout, measured once for every scanner count


def kernel_counts(name: str, layouts, knobs: dict, rewrite=None) -> dict:
    if name not in _kernel:
        _kernel[name] = kernel_ksm.merge_counts(layouts, dict(knobs), full_scans=3, timeout=120, rewrite=rewrite)
    return _kernel[name]


def pages(*parts) -> np.ndarray:
    """Concatenate (value_or_seed, count) parts: ints 0..255 fill a page, 'rN' is random seed N."""
    out = []
    for what, count in parts:
        if isinstance(what, str):
            rng = np.random.default_rng(int(what[1:]))
            out.append(rng.integers(0, 256, (count, PAGE_SIZE), dtype=np.uint8))
        else:
            out.append(np.full((count, PAGE_SIZE), what, dtype=np.uint8))
    return np.concatenate(out)


LAYOUTS = {
    # duplicates across VMs and inside one VM, plus unique pages
    "dups": ([pages((1, 5), (2, 3), ("r1", 20)), pages((1, 2), (3, 4), (2, 1), ("r2", 7))], {}),
    # more copies than max_page_sharing: chains of dups
    "chains-default": ([pages((9, 300)), pages((9, 400), (8, 2))], {}),
    "chains-small": ([pages((7, 23)), pages((7, 10), (6, 9))], {"max_page_sharing": 4}),
    "zero-off": ([pages((0, 40), ("r3", 5)), pages((0, 3))], {"use_zero_pages": 0}),
    "zero-on": ([pages((0, 40), ("r3", 5)), pages((0, 3), (4, 2))], {"use_zero_pages": 1}),
    "unique": ([pages(("r4", 200)), pages(("r5", 100))], {}),
}


def proto_counts(m, layouts, knobs, rewrite=None) -> dict:
    m.ksm.set(pages_to_scan=100000, sleep_millisecs=0, **knobs)
    vms = []
    for i, lay in enumerate(layouts):
        vm = m.spawn_vm(f"p{i}", pages=len(lay) + 64)
        data = lay.tobytes()
        x = vm.mmap(len(data))
        vm.write(x, data)
        vm.madvise(x, len(data), MADV_MERGEABLE)
        if rewrite and rewrite[i]:
            vm.writer_start(x, rewrite[i], seed=0, count=0, values=0, period_ms=0.5)
        vms.append(vm)
    m.ksm.set(run=1)
    s = m.ksm.wait_stable(60, scans=3)
    m.ksm.set(run=0)
    return {"ksm": s, "procs": [vm.ksm_stat() for vm in vms]}


@pytest.mark.parametrize("scanners", SCANNERS)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_same_counters_as_the_kernel(ksm_machine_factory, name, scanners):
    layouts, knobs = LAYOUTS[name]
    knobs = {"smart_scan": 0, **knobs}
    kern = kernel_counts(name, layouts, knobs)
    ours = proto_counts(ksm_machine_factory(frames=4096, scanners=scanners), layouts, knobs)
    for k in EXACT:
        assert ours["ksm"][k] == kern["ksm"][k], (k, ours["ksm"][k], kern["ksm"][k])
    ku, ou = kern["ksm"]["pages_unshared"], ours["ksm"]["pages_unshared"]
    assert abs(ku - ou) <= 0.01 * max(ku, ou), ("pages_unshared", ou, ku)
    for kp, op in zip(kern["procs"], ours["procs"]):
        for k in ("ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages"):
            assert op[k] == kp[k], (k, op[k], kp[k])


@pytest.mark.parametrize("scanners", SCANNERS)
def test_pages_rewritten_every_scan(ksm_machine_factory, scanners):
    """Pages that change all the time never merge, on either side; the rest merges alike."""
    layouts = [pages((3, 6), (5, 4)), pages((5, 4), (3, 2), ("r6", 3))]
    rewrite = [6, 4]          # all of VM 0's copies of 3 and VM 1's copies of 5 keep changing
    kern = kernel_counts("rewritten", layouts, {"smart_scan": 0}, rewrite=rewrite)
    ours = proto_counts(ksm_machine_factory(frames=4096, scanners=scanners), layouts, {"smart_scan": 0},
                        rewrite=rewrite)
    for k in EXACT:
        assert ours["ksm"][k] == kern["ksm"][k], (k, ours["ksm"][k], kern["ksm"][k])
    assert (ours["ksm"]["pages_shared"], ours["ksm"]["pages_sharing"]) == (2, 4)


@pytest.mark.parametrize("scanners", SCANNERS)
def test_smart_scan_on_merges_the_same(ksm_machine_factory, scanners):
    layouts, knobs = LAYOUTS["dups"]
    kern = kernel_counts("dups-smart", layouts, {"smart_scan": 1})
    ours = proto_counts(ksm_machine_factory(frames=4096, scanners=scanners), layouts, {"smart_scan": 1})
    for k in EXACT:
        assert ours["ksm"][k] == kern["ksm"][k], (k, ours["ksm"][k], kern["ksm"][k])
