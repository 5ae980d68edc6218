"""ksm-proto check on the real protocol cores: clean in every mode, and each --break is caught.

The world (workers/check_world.py) runs the same generators the actors run; these tests pin
what the checker proves on its small configuration and that it can fail.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from workers import explore
from workers.check_world import BREAKS, world_factory

MODES = ("change_pte", "wrapped", "invalidate")
# what each break must produce: a word of the violation the checker reports
EXPECTED = {
    "no-write-protect": ("lost write",),
    "no-recheck-pte": ("FrameAccountingError", "free stack does not hold each free frame exactly once"),
    "free-before-acks": ("which is free",),
    "pid-takeover-lock": ("two holders",),
    # messages of the fault handler and of ksmd to one VM overtake each other once ptl is let go early
    "cow-reply-before-acks": ("which is free", "nested START", "no notification is on its way", "lost write"),
    "no-repair": ("PTEs map it",),              # frame N: mapcount M but K PTEs map it
    "no-spte-flush": ("writable but its PTE",),
}
# only change_pte mode needs the flush: in the other modes invalidate_range_start has zapped
# the secondary translation before the dead notifier changed any PTE
MODES_OF = {"no-spte-flush": ("change_pte",)}


def test_every_break_has_an_expectation():
    assert set(BREAKS) == set(EXPECTED)


def check(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "workers.cli", "check", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_2000_random_schedules_find_nothing_in_any_mode():
    p = check("--runs", "2000", "--seed", "7")
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == list(MODES)
    assert all("2,001 schedules" in ln and ln.endswith("no violation") for ln in lines), p.stdout


def test_exhaustive_small_configuration_finds_nothing_in_any_mode():
    p = check("--exhaustive", "--depth", "10")
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(p.stdout.splitlines()) == 3 and all(ln.endswith("no violation") for ln in p.stdout.splitlines())


def test_parallel_jobs_find_what_one_finds():
    f = world_factory("change_pte", "pid-takeover-lock")
    one = explore.random_runs(f, seed=0, runs=100, max_steps=4000, shrink=False)
    two = explore.parallel_random_runs(f, seed=0, runs=100, max_steps=4000, shrink=False, jobs=2)
    assert one.found is not None and two.found is not None
    assert (one.found.schedule, one.found.violations) == (two.found.schedule, two.found.violations)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("brk", sorted(EXPECTED))
def test_each_break_is_caught(mode, brk):
    if mode not in MODES_OF.get(brk, MODES):
        pytest.skip(f"{brk} breaks nothing in {mode} mode: START zaps the spte before any PTE change")
    res = explore.parallel_random_runs(world_factory(mode, brk), seed=0, runs=800, max_steps=4000, shrink=False,
                                       jobs=2)
    assert res.found is not None, f"{brk} not caught in {mode}"
    assert any(w in v for v in res.found.violations for w in EXPECTED[brk]), res.found.violations


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kill", ["ksmd", "faultd"])
def test_kill_and_recovery_find_nothing(mode, kill):
    """kill -9 of ksmd or the fault handler at any point, then the supervisor's recovery (notifier
    loss in each VM, repair_frames, restart with KsmScan.restore, lost FAULTs sent again): no lost
    write, exact frame accounting and counters at the end, in every mode."""
    res = explore.random_runs(world_factory(mode, kill=kill), seed=2, runs=200, max_steps=4000)
    assert res.found is None, explore.format_steps(explore.replay(world_factory(mode, kill=kill),
                                                                  res.found.schedule))
    assert res.schedules == 201


@pytest.mark.parametrize("kill", ["ksmd", "faultd"])
def test_kill_exhaustive_small_configuration_finds_nothing(kill):
    res = explore.exhaustive(world_factory("change_pte", kill=kill), depth=6, max_steps=4000)
    assert res.found is None
    assert res.schedules > 20


def test_kill_happens_and_is_repaired():
    """ksmd killed right after replace_page took its references on the KSM page (before any PTE
    points there): the KSM frame's mapcount is too high, and the supervisor's repair fixes it."""
    w = world_factory("change_pte", kill="ksmd")()
    leaked = None
    for n in range(20000):       # round robin over the enabled steps: fair, so it ends
        if w.finished():
            break
        steps = w.enabled()
        assert steps, "deadlock"
        i = n % len(steps)
        if leaked is None:
            k = next((j for j, s in enumerate(steps) if s.label.startswith("ksmd: get pfn")), None)
            if k is not None:
                w.take(k)
                i = next(j for j, s in enumerate(w.enabled()) if s.label == "supervisor: kill -9 ksmd")
                maps, mc = w._mappings(), w.ft.mapcount.tolist()
                leaked = [p for p in range(1, w.nframes) if mc[p] > maps[p]]
        if leaked is None and steps[i].label == "supervisor: kill -9 ksmd":
            i = (i + 1) % len(steps)     # not before ksmd got there
        rec = w.take(i)
        assert not w.violations(), rec
    assert w.finished()
    assert leaked, "the kill left no frame with a mapcount above its mappings"
    assert w.final_violations() == []


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
    p = check("--mode", "change_pte", "--runs", "200", "--break", "pid-takeover-lock", "--trace", str(out))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "two holders" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["traceEvents"]
    assert out.stat().st_mode & 0o777 == 0o600            # addresses and frame numbers: private
    p = check("--list-breaks")
    assert p.returncode == 0 and p.stdout.split() == list(BREAKS)
