"""No lost writes: parent threads and in-worker writers racing ksmd, in every notifier mode.

CI-sized runs of workers/stress.py (`make bench` runs it at 10M writes).  Every assertion is
exact: the stress's record of every byte, the frame check, and COW counts that follow from
what was merged while no writer ran (see the stress's docstring), so none of them can fail
by chance on a correct protocol.
"""
from __future__ import annotations

import pytest

from workers.stress import lost, no_lost_writes

MODES = ["change_pte", "wrapped", "invalidate"]


@pytest.mark.parametrize("mode", MODES)
def test_no_lost_writes(ksm_machine_factory, mode):
    m = ksm_machine_factory(notifier_mode=mode, frames=4096)
    r = no_lost_writes(m, nvms=2, threads_per_vm=2, thread_pages=8, thread_writes=130,
                       workers_per_vm=2, worker_pages=32, worker_writes=600, round_writes=100,
                       values=3, max_page_sharing=3, use_zero_pages=1, seed=11)
    assert r["errors"] == [] and r["scan_errors"] == 0
    assert r["writes"] == r["writes_requested"] == 2 * 2 * 130 + 2 * 2 * 600
    assert r["thread_writes"] == 520 and r["extra_writes"] == 0
    assert r["mismatches"] == 0, r["mismatch_examples"]
    assert r["read_mismatches"] == 0 and r["read_checks"] == 2 * 2 * (130 // 64), r["mismatch_examples"]
    assert r["frame_problems"] == []        # every mapcount matches the PTEs; no frame lost or freed twice
    assert r["unmerge"] == {"mismatches": 0, "frame_problems": [], "pages_shared": 0, "pages_sharing": 0,
                            "ksm_zero_pages": 0}
    assert r["exit_frame_problems"] == []   # the VMs gone, every frame they used is free again
    assert lost(r) == 0
    # merged pages really were written: each page seen merged while no writer ran on it, then
    # written, is one COW fault of a merged page; the fault handler counted at least those
    assert r["rounds"] == 600 // 100
    assert r["cow_faults_merged"] >= r["cow_faults_merged_guaranteed"] > 0
    assert r["cow_faults_remerged_guaranteed"] > 0      # written, merged again by ksmd, written again
    # few values, max_page_sharing 3: each value is a chain of KSM pages
    assert r["stable_node_chains_max"] > 0 and r["stable_node_dups_max"] > r["stable_node_chains_max"]


@pytest.mark.parametrize("mode", ["change_pte", "invalidate"])
def test_ksm_page_churn_keeps_frame_accounting(ksm_machine_factory, mode):
    """Two values only: KSM pages lose their last mapping while ksmd merges more pages into them."""
    m = ksm_machine_factory(notifier_mode=mode, frames=4096)
    r = no_lost_writes(m, nvms=2, threads_per_vm=1, thread_pages=32, thread_writes=1,
                       workers_per_vm=1, worker_pages=32, worker_writes=40000, round_writes=40000,
                       values=2, max_page_sharing=256, use_zero_pages=0, seed=5)
    assert r["writes"] == 2 * 40001
    assert r["mismatches"] == 0, r["mismatch_examples"]
    assert r["frame_problems"] == []
    assert lost(r) == 0, (r["errors"], r["exit_frame_problems"], r["unmerge"])
