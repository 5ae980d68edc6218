"""The pipelined rounds (workers/mm/ksm/ahead.py): two scanners hash the next round's pages while
they wait at a barrier, in the checker's world and in real processes."""
from __future__ import annotations

import collections
import random

import numpy as np
import pytest

from proto import MADV_MERGEABLE, PAGE_SIZE
from workers.check import explore
from workers.check.world import world_factory
from workers.mm.ksm.shard import Round, from_wire, to_wire

MODES = ("change_pte", "wrapped", "invalidate")


@pytest.mark.parametrize("mode", MODES)
def test_pipelined_rounds_random_schedules_find_nothing(mode):
    f = world_factory(mode, scanners=2, scenario="pipelined")
    res = explore.random_runs(f, seed=1, runs=60, max_steps=4000)
    assert res.found is None, explore.format_steps(explore.replay(f, res.found.schedule))
    assert res.schedules == 61


def test_pipelined_rounds_hash_ahead_and_the_next_visit_takes_the_checksums():
    """What the pipelined world covers: a full scan is three rounds, the first round's guess is vm1's
    pages; in every run the scanners hash ahead while the other is not there and each page hashed
    ahead is visited with that checksum unless its frame changed; the merges end where one scanner's
    do.  Without the two-scanner world's round size (one round a scan) nothing is ever hashed ahead."""
    seen, hashed, used = collections.Counter(), 0, 0
    for r in range(40):
        w = world_factory("change_pte", scanners=2, scenario="pipelined")()
        assert explore._run(w, [], 4000, explore._uniform(random.Random(r)), 4000) == []
        st = [sc.ahead_stats for sc in w.scans]
        assert all(s["used_ahead"] <= s["hashed_ahead"] for s in st)
        assert sum(s["hashed_ahead"] for s in st) > 0, r
        hashed += sum(s["hashed_ahead"] for s in st)
        used += sum(s["used_ahead"] for s in st)
        assert (w.totals()["pages_shared"], w.totals()["pages_sharing"]) == (2, 2)
        seen.update(w.coverage)
    assert used > 0 and seen["a scanner hashes ahead while the others' messages are not there"] > 0, seen
    w = world_factory("change_pte", scanners=2)()
    assert explore._run(w, [], 4000, explore._uniform(random.Random(0)), 4000) == []
    assert [sc.ahead_stats["polls"] for sc in w.scans] == [0, 0]


def test_the_round_carries_its_guess_of_the_next_one_on_the_wire():
    r = Round(7, {"pages_to_scan": 4}, [[(0, 0, 2)], [(1, 0, 2)]], False, False, False, [[(1, 2, 3)], [(1, 3, 5)]])
    back = from_wire(*_split(to_wire(r)))
    assert (back.seq, back.parts, back.ahead) == (7, r.parts, [[(1, 2, 3)], [(1, 3, 5)]])
    assert from_wire(*_split(to_wire(Round(8, {}, [[], []], True, True, True)))).ahead is None


def _split(wire):
    import json
    head, data = wire
    return json.loads(json.dumps(head)), data


def _merge_dups(m, vms: int = 2, pages: int = 512, distinct: int = 128):
    """Each VM maps `pages` pages holding `distinct` contents, each as often as the others."""
    rng = np.random.default_rng(5)
    contents = rng.integers(0, 256, size=(distinct, PAGE_SIZE), dtype=np.uint8)
    order = rng.permutation(np.repeat(np.arange(distinct), vms * pages // distinct))
    out = []
    for v in range(vms):
        vm = m.spawn_vm(f"v{v}", pages=pages + 64)
        a = vm.mmap(pages * PAGE_SIZE)
        vm.write(a, contents[order[v * pages:(v + 1) * pages]].tobytes())
        vm.madvise(a, pages * PAGE_SIZE, MADV_MERGEABLE)
        out.append((vm, a, contents[order[v * pages:(v + 1) * pages]].tobytes()))
    return out


@pytest.mark.parametrize("ahead", ["1", "0"])
def test_two_scanner_processes_hash_ahead_and_merge_exactly_as_without(ksm_machine_factory, monkeypatch, ahead):
    """Real processes, rounds of 64 pages (16 a full scan): with the pipelined rounds the scanners hash
    pages of the next round while they wait and the visits take those checksums; the counters after
    three full scans are exactly those without (KSM_PROTO_HASH_AHEAD=0), and every byte reads back."""
    monkeypatch.setenv("KSM_PROTO_HASH_AHEAD", ahead)
    m = ksm_machine_factory(scanners=2, frames=4096)
    vms = _merge_dups(m)
    m.ksm.set(pages_to_scan=64, sleep_millisecs=0, smart_scan=0)
    m.ksm.set(run=1)
    s = m.ksm.wait_full_scans(3)
    m.ksm.set(run=0)
    assert (s["pages_shared"], s["pages_sharing"], s["pages_unshared"]) == (128, 896, 0)
    for vm, a, data in vms:
        assert vm.read(a, len(data)) == data
    info = m.ksmd.call("info")[0]
    assert info["hash_ahead"] is (ahead == "1") and info["scan_errors"] == 0
    if ahead == "1":
        assert info["polls"] > 0 and 0 < info["used_ahead"] <= info["hashed_ahead"], info
    else:
        assert (info["polls"], info["hashed_ahead"], info["used_ahead"]) == (0, 0, 0)


def test_a_bad_hash_ahead_setting_is_refused_by_name(monkeypatch):
    from workers.actors.ksmd_common import hash_ahead_enabled
    monkeypatch.setenv("KSM_PROTO_HASH_AHEAD", "yes")
    with pytest.raises(SystemExit, match="KSM_PROTO_HASH_AHEAD='yes'"):
        hash_ahead_enabled()
    monkeypatch.setenv("KSM_PROTO_HASH_AHEAD", "0")
    assert hash_ahead_enabled() is False


def test_check_runs_the_pipelined_scenario_with_two_scanners_and_only_then():
    """`ksm-proto check --scanners 2` runs the pipelined world among its scenarios; with one scanner it is
    not among "all" (nothing would be pipelined), and named alone it still runs (multi-round scans)."""
    import subprocess
    import sys

    def check(*args):
        p = subprocess.run([sys.executable, "-m", "workers.tools.cli", "check", "--mode", "change_pte", "--jobs", "1",
                            "--runs", "10", *args], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr
        return [ln.split(":")[0] for ln in p.stdout.splitlines()], p.stdout

    heads, out = check("--scanners", "2", "--scenario", "pipelined")
    assert heads == ["change_pte pipelined"] and "11 schedules" in out and out.rstrip().endswith("no violation")
    heads, _ = check("--scanners", "2", "--scenario", "all")
    assert heads == ["change_pte base", "change_pte pipelined", "change_pte fork"]
    heads, _ = check("--scenario", "all")
    assert heads == ["change_pte base", "change_pte fork"]
