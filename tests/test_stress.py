"""No lost writes: concurrent writers (parent threads and in-worker workloads) racing ksmd, every mode."""
from __future__ import annotations

import pytest

from workers.stress import no_lost_writes


@pytest.mark.parametrize("mode", ["change_pte", "wrapped", "invalidate"])
def test_no_lost_writes(ksm_machine_factory, mode):
    m = ksm_machine_factory(notifier_mode=mode, frames=4096)
    r = no_lost_writes(m, nvms=3, pages=48, thread_writes=250, worker_writes=400, values=3, seed=11)
    assert r["writes"] == 3 * 250 + 3 * 400
    assert r["mismatches"] == 0, r["mismatch_examples"]
    assert r["frame_problems"] == []        # every mapcount matches the PTEs; no frame lost or freed twice
    # the race really happened: merged pages were written (COW) while ksmd kept merging
    assert r["cow_faults"] > 0 and r["full_scans"] > 0


@pytest.mark.parametrize("mode", ["change_pte", "invalidate"])
def test_ksm_page_churn_keeps_frame_accounting(ksm_machine_factory, mode):
    """Two values only: KSM pages lose their last mapping while ksmd merges more pages into them."""
    m = ksm_machine_factory(notifier_mode=mode, frames=4096)
    r = no_lost_writes(m, nvms=2, pages=64, thread_writes=1, worker_writes=40000, values=2, seed=5)
    assert r["writes"] == 2 * 40001
    assert r["mismatches"] == 0, r["mismatch_examples"]
    assert r["frame_problems"] == []
