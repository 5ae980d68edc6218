"""ksm-proto check on the real protocol cores: clean in every mode, and each --break is caught.

The world (workers/check_world.py) runs the same generators the actors run; these tests pin
what the checker proves on its small configuration and that it can fail, with one scanner
and with two (the round protocol of core/shard.py: two scanners merging into each other's
stable nodes while the VMs write).
"""
from __future__ import annotations

import collections
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from workers import explore
from workers.check_world import BREAKS, SHARD_BREAKS, world_factory

MODES = ("change_pte", "wrapped", "invalidate")
# what each break must produce: words of the violation the checker reports (with two scanners a removed
# step may first show as another of its consequences)
EXPECTED = {
    "no-write-protect": ("lost write",),
    "no-recheck-pte": ("FrameAccountingError", "lost write"),
    "free-before-acks": ("which is free",),
    "pid-takeover-lock": ("two holders",),
    "no-round-barrier": ("but 2 KSM frames are mapped",),
    "no-shard-routing": ("merge incomplete",),
    "no-ksm-lock": ("another scanner made merges fail",),
}
EXPECTED_TWO = {**EXPECTED, "no-write-protect": ("lost write", "merge incomplete"),
                "no-recheck-pte": ("FrameAccountingError", "free stack", "lost write")}
RUNS = {"no-recheck-pte": 1500, "no-round-barrier": 2500}     # the rarer interleavings (default 600)


def test_every_break_has_an_expectation():
    assert set(BREAKS) == set(EXPECTED)


@pytest.mark.parametrize("mode", MODES)
def test_random_schedules_find_nothing(mode):
    res = explore.random_runs(world_factory(mode), seed=1, runs=150, max_steps=4000)
    assert res.found is None, explore.format_steps(explore.replay(world_factory(mode), res.found.schedule))
    assert res.schedules == 151          # the round-robin run, then 150 random ones


@pytest.mark.parametrize("mode", MODES)
def test_exhaustive_small_configuration_finds_nothing(mode):
    res = explore.exhaustive(world_factory(mode), depth=10, max_steps=4000)
    assert res.found is None
    assert res.schedules > 20


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("brk", sorted(set(EXPECTED) - set(SHARD_BREAKS)))
def test_each_break_is_caught(mode, brk):
    res = explore.random_runs(world_factory(mode, brk), seed=0, runs=RUNS.get(brk, 600), max_steps=4000,
                              shrink=False)
    assert res.found is not None, f"{brk} not caught in {mode}"
    assert any(w in v for v in res.found.violations for w in EXPECTED[brk]), res.found.violations


# ---------------------------------------------------------------------------- two scanners
@pytest.mark.parametrize("mode", MODES)
def test_two_scanners_random_schedules_find_nothing(mode):
    res = explore.random_runs(world_factory(mode, scanners=2), seed=1, runs=150, max_steps=4000)
    assert res.found is None, explore.format_steps(explore.replay(world_factory(mode, scanners=2),
                                                                  res.found.schedule))


@pytest.mark.parametrize("mode", MODES)
def test_two_scanners_exhaustive_finds_nothing(mode):
    res = explore.exhaustive(world_factory(mode, scanners=2), depth=8, max_steps=4000)
    assert res.found is None
    assert res.schedules > 20


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("brk", sorted(EXPECTED))
def test_each_break_is_caught_with_two_scanners(mode, brk):
    res = explore.random_runs(world_factory(mode, brk, scanners=2), seed=0, runs=RUNS.get(brk, 600),
                              max_steps=4000, shrink=False)
    assert res.found is not None, f"{brk} not caught in {mode} with two scanners"
    assert any(w in v for v in res.found.violations for w in EXPECTED_TWO[brk]), res.found.violations


def test_two_scanners_merge_each_others_pages_into_one_node_while_vms_write():
    """What the two-scanner world covers: in every run both scanners merge, each into stable nodes
    holding pages of both VMs (the visit is split by VM: each node holds pages the other scanner
    visited), and end with the counters one scanner reaches; over a few runs the two merge at once
    (one finds the ksm lock of an mm the other is merging into taken) and VMs write merged pages (COW
    of a KSM page) while the scanners go on merging."""
    seen = collections.Counter()
    for r in range(40):
        w = world_factory("change_pte", scanners=2)()
        assert explore._run(w, [], 4000, explore._uniform(random.Random(r)), 4000) == []
        assert all(sc.merges > 0 for sc in w.scans)
        for sc in w.scans:
            for d in np.flatnonzero(sc.tree.live[:sc.tree.top]).tolist():
                holders = {mm for mm, slot in sc.slots.items() if (slot.items.sn == sc.gid(d)).any()}
                assert holders == {0, 1}, (sc.shard, d, holders)
        assert (w.totals()["pages_shared"], w.totals()["pages_sharing"]) == (2, 2)
        seen.update(w.coverage)
    assert seen["cow of a KSM page"] > 0 and seen["the other scanner was merging into the same mm"] > 0, seen


def test_shard_breaks_need_two_scanners():
    with pytest.raises(ValueError, match="needs 2 scanners"):
        world_factory("change_pte", "no-ksm-lock", scanners=1)
    assert world_factory("change_pte", "no-ksm-lock")().scans[1].shard == 1


def test_replay_gives_the_same_trace_bytes():
    f = world_factory("wrapped", "free-before-acks")
    res = explore.random_runs(f, seed=0, runs=300, max_steps=4000, shrink=False)
    a, b = explore.replay(f, res.found.schedule), explore.replay(f, res.found.schedule)
    meta = {"mode": "wrapped", "break": "free-before-acks"}
    assert explore.trace_json(a, meta) == explore.trace_json(b, meta)
    assert a.violations == b.violations and a.violations


def test_same_world_same_state():
    """Two worlds built by one factory and driven by one schedule end in byte-identical shared memory."""
    f = world_factory("change_pte")
    tr = explore.replay(f, [0] * 60)
    w1, w2 = f(), f()
    for w in (w1, w2):
        for i in [0] * len(tr.steps):
            if not w.enabled():
                break
            w.take(i)
    assert w1.digest() == w2.digest()


def test_unknown_break_is_a_usage_error():
    with pytest.raises(ValueError, match="unknown break"):
        world_factory("change_pte", "no-such-step")


def test_cli_finds_a_break_and_writes_its_trace(tmp_path):
    out = tmp_path / "t.json"
    p = subprocess.run([sys.executable, "-m", "workers.cli", "check", "--mode", "change_pte", "--runs", "200",
                        "--break", "pid-takeover-lock", "--trace", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "two holders" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["traceEvents"]
    p = subprocess.run([sys.executable, "-m", "workers.cli", "check", "--list-breaks"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.split() == list(BREAKS)


def test_cli_two_scanners(tmp_path):
    sched = tmp_path / "s.json"
    p = subprocess.run([sys.executable, "-m", "workers.cli", "check", "--mode", "wrapped", "--runs", "100",
                        "--break", "no-ksm-lock", "--save-schedule", str(sched)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1 and "another scanner" in p.stdout, p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "workers.cli", "check", "--replay", str(sched)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1 and "another scanner" in p.stdout, p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "workers.cli", "check", "--mode", "change_pte", "--runs", "20",
                        "--scanners", "2"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
