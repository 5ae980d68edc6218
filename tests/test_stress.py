"""No lost writes: parent threads and in-worker writers racing ksmd, in every notifier mode.

CI-sized runs of workers/tools/stress.py (`make bench` runs it at 10M writes).  Every assertion is
exact: the stress's record of every byte, the frame check, and COW counts that follow from
what was merged while no writer ran (see the stress's docstring), so none of them can fail
by chance on a correct protocol.
"""
from __future__ import annotations

import pytest

from workers.tools.stress import lost, no_lost_writes

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
    assert r["counter_problems"] == []      # ksmd's pages_shared / pages_sharing: what the PTEs map
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
    # merged at the start: all 128 pages (3 contents, ~42 copies each, max_page_sharing 256); then the one
    # round writes all 32 pages of each worker slice, and each parent thread's one write (seed 5) spans 2
    # pages: 2 * 32 + 2 * 2 pages each owe a COW fault of a merged page, and the fault handler made at least those
    assert r["merged_at_start"] == r["pages"] == 128 and r["rounds"] == 1
    assert r["cow_faults_merged"] >= r["cow_faults_merged_guaranteed"] == 2 * 32 + 2 * 2
    assert r["mismatches"] == 0, r["mismatch_examples"]
    assert r["frame_problems"] == []
    assert lost(r) == 0, (r["errors"], r["exit_frame_problems"], r["unmerge"])


def test_a_lost_write_is_found(ksm_machine_factory):
    """A write the record does not know of (as if the one it recorded were lost) is reported."""
    m = ksm_machine_factory(frames=4096)

    def lose(vms, addrs):
        vms[1].write(addrs[1] + 3 * 4096 + 100, b"\xee" * 10)         # a thread's page
        vms[0].write(addrs[0] + (2 * 8 + 40) * 4096, b"\xee" * 4096)   # a worker's page

    r = no_lost_writes(m, nvms=2, threads_per_vm=2, thread_pages=8, thread_writes=20, workers_per_vm=2,
                       worker_pages=32, worker_writes=100, round_writes=100, seed=3, before_check=lose,
                       unmerge_check=False)
    assert r["mismatches"] == 2 and lost(r) == 2
    assert any("stress1 page 3 (thread 0 slice): 10 bytes differ in [100, 109]" in e for e in r["mismatch_examples"])
    assert any("stress0 page 56 (worker 1 slice): 4096 bytes differ" in e for e in r["mismatch_examples"])
    assert r["frame_problems"] == []


def test_bench_exits_1_on_a_lost_write(monkeypatch, tmp_path):
    import bench.run as bench

    def fake(writes, cow, modes, progress):
        r = {"mode": "wrapped", "writes": writes, "writes_requested": writes, "extra_writes": 0, "thread_writes": 0,
             "worker_writes": writes, "mismatches": 1, "read_mismatches": 0, "cow_faults_merged": cow,
             "frame_problems": [], "exit_frame_problems": [], "errors": [], "scan_errors": 0, "seconds": 1.0,
             "writes_per_s": 1.0, "cow_faults_merged_per_s": 1.0, "mismatch_examples": ["page 7 got 1 want 2"]}
        r["lost"] = lost(r)
        return {"modes": {"wrapped": r}, "writes": writes, "mismatches": 1, "cow_faults_merged": cow, "lost": 1,
                "writes_requested": writes, "min_cow_faults": cow, "cow_goal_met": True}

    monkeypatch.setattr(bench, "run_modes", fake)
    assert bench.main(["--only", "stress", "--out", str(tmp_path), "--stress-writes", "10",
                       "--stress-cow", "1"]) == 1
    assert "| 10 / 1 / 1 |" in (tmp_path / "latest.md").read_text()
