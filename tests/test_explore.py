"""The interleaving explorer (workers/check/explore.py) on the toy lock protocol (workers/check/toyworld.py), and
`ksm-proto check --world toy`."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from workers.tools import cli
from workers.check import explore
from workers.check.explore import Step, exhaustive, random_runs, replay
from workers.check.toyworld import BREAKS, SIZES, world_factory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = list(SIZES)
# the shortest violating schedule of each break: the takeover needs 6 steps (p0 trywait; p1 trywait fails,
# reads owner 0; p0 writes its pid; p1 reads it again and takes over); a lost update needs every step to run
SHORTEST = {("change_pte", "owner-read-twice"): 6, ("wrapped", "owner-read-twice"): 6,
            ("invalidate", "owner-read-twice"): 6, ("change_pte", "no-lock"): 6, ("wrapped", "no-lock"): 12,
            ("invalidate", "no-lock"): 9}


@pytest.mark.parametrize("mode", MODES)
def test_correct_lock_passes(mode):
    f = world_factory(mode, None)
    r = random_runs(f, seed=1, runs=300)
    assert r.found is None and r.schedules == 301
    x = exhaustive(f, depth=40)
    assert x.found is None and x.complete and x.states > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("brk", list(BREAKS))
def test_each_break_is_caught_shortest(mode, brk):
    f = world_factory(mode, brk)
    r = random_runs(f, seed=0, runs=300)
    assert r.found, f"{brk} not caught by 300 random schedules"
    tr = replay(f, r.found.schedule)
    assert tr.violations == r.found.violations
    assert len(tr.steps) >= SHORTEST[mode, brk]
    x = exhaustive(f, depth=20)
    assert x.found and x.found.found_by["minimal"] is True
    assert len(x.found.schedule) == SHORTEST[mode, brk]
    assert ("two holders" if brk == "owner-read-twice" else "lost update") in x.found.violations[0]


def test_random_shrinks_to_the_shortest_takeover():
    r = random_runs(world_factory("change_pte", "owner-read-twice"), seed=0, runs=300)
    assert len(r.found.schedule) == 6 < r.found.found_by["shrunk_from"]
    labels = [s.label[4:] for s in replay(world_factory("change_pte", "owner-read-twice"), r.found.schedule).steps]
    assert labels == ["sem trywait", "sem trywait", "read owner (holder dead?)", "write owner = pid",
                      "read owner again", "take over: write owner = pid"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("brk", [None, *BREAKS])
def test_reduction_explores_fewer_schedules_same_verdict(mode, brk):
    f = world_factory(mode, brk)
    plain = exhaustive(f, depth=16, por=False, hashing=False)
    verdicts = {(r.found is None, r.found and len(r.found.schedule))
                for r in (plain, exhaustive(f, depth=16), exhaustive(f, depth=16, hashing=False),
                          exhaustive(f, depth=16, por=False))}
    assert len(verdicts) == 1
    assert exhaustive(f, depth=16).schedules < plain.schedules


def test_same_seed_same_result():
    f = world_factory("invalidate", "owner-read-twice")
    a, b = random_runs(f, seed=7, runs=200), random_runs(f, seed=7, runs=200)
    assert (a.schedules, a.steps, a.found) == (b.schedules, b.steps, b.found)
    clean = world_factory("wrapped", None)
    assert random_runs(clean, seed=3, runs=50).steps == random_runs(clean, seed=3, runs=50).steps


def test_strategies_each_run_alone():
    assert random_runs(world_factory("change_pte", "owner-read-twice"), seed=0, runs=300, strategy="uniform").found
    assert random_runs(world_factory("wrapped", "no-lock"), seed=0, runs=300, strategy="pct").found
    with pytest.raises(ValueError):
        random_runs(world_factory("wrapped", None), strategy="dfs")


def test_replayed_schedule_gives_the_same_trace_bytes(tmp_path):
    f = world_factory("wrapped", "owner-read-twice")
    found = random_runs(f, seed=2, runs=300).found
    meta = {"world": "toy", "mode": "wrapped", "break": "owner-read-twice", "max_steps": 10_000}
    tr = replay(f, found.schedule)
    text = explore.trace_json(tr, meta)
    doc = explore.load_schedule(explore.schedule_json(tr, meta, found.found_by))
    assert explore.trace_json(replay(f, doc["steps"]), meta) == text
    assert [s["i"] for s in doc["steps"]] == found.schedule and doc["violations"] == found.violations
    ev = json.loads(text)
    assert ev["otherData"]["ksm_proto_check"]["violations"] == found.violations
    bad = [dict(s) for s in doc["steps"]]
    bad[0]["label"] = "p9: nothing"
    with pytest.raises(explore.ReplayError, match="step 1"):
        replay(f, bad)


def test_trace_has_a_track_per_actor_and_flows():
    f = world_factory("invalidate", None)
    tr = replay(f, [0] * 15)
    assert tr.violations == [] and len(tr.steps) == 15                 # finished: final_violations() == []
    ev = json.loads(explore.trace_json(tr, {"world": "toy"}))["traceEvents"]
    assert sorted(e["args"]["name"] for e in ev if e["name"] == "thread_name") == ["p0", "p1", "p2"]
    assert [e["ts"] for e in ev if e["ph"] == "X"] == list(range(1, 16))
    starts = {e["id"]: e["ts"] for e in ev if e["ph"] == "s"}
    ends = {e["id"]: e["ts"] for e in ev if e["ph"] == "f"}
    assert len(ends) == 2 and ends.keys() < starts.keys() and all(starts[i] < ends[i] for i in ends)


ORDER = {"t0": ("a", "b"), "t1": ("b", "a")}


class Deadlock:
    """Two actors take locks a and b in opposite orders: ABBA."""

    def __init__(self):
        self.held = {"a": None, "b": None}
        self.pc = {"t0": 0, "t1": 0}

    def enabled(self):
        return [Step(t, f"{t}: lock {ORDER[t][pc]}", frozenset({(ORDER[t][pc], "w")}))
                for t, pc in self.pc.items() if pc < 2 and self.held[ORDER[t][pc]] is None]

    def take(self, i):
        s = self.enabled()[i]
        self.held[ORDER[s.actor][self.pc[s.actor]]] = s.actor
        self.pc[s.actor] += 1
        return {"actor": s.actor, "label": s.label, "args": {}}

    def violations(self):
        return []

    def finished(self):
        return all(pc == 2 for pc in self.pc.values())

    def final_violations(self):
        return []

    def state_key(self):
        return None


class Spin(Deadlock):
    """t0 waits for a flag nobody sets."""

    def enabled(self):
        return [Step("t0", "t0: read flag", frozenset({("flag", "r")}))]

    def take(self, i):
        return {"actor": "t0", "label": "t0: read flag", "args": {"flag": 0}}


def test_deadlock_and_livelock_are_violations():
    x = exhaustive(Deadlock, depth=10)
    assert x.found.violations[0].startswith("deadlock") and len(x.found.schedule) == 2
    assert x.found.found_by["minimal"]
    r = random_runs(Deadlock, seed=0, runs=50)
    assert r.found and r.found.violations[0].startswith("deadlock") and len(r.found.schedule) == 2
    r = random_runs(Spin, seed=0, runs=5, max_steps=50)
    assert r.found.violations == ["livelock: not finished after 50 steps, the last 50 round-robin"]


# ============================================================================ the command line
def check(*args):
    return subprocess.run([sys.executable, "-m", "workers.tools.cli", "check", "--world", "toy", *args], check=False,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def untimed(text: str) -> str:
    return re.sub(r"[\d.]+ s, [\d,]+ schedules/s", "T", text)


def test_cli_nothing_found_exits_0():
    p = check("--runs", "200")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == MODES and all(ln.endswith("no violation") for ln in lines)
    p = check("--exhaustive", "--mode", "wrapped")
    assert p.returncode == 0 and "exhaustive to depth 20 (every schedule)" in p.stdout


def test_cli_violation_exits_1_same_bytes_and_replays(tmp_path):
    runs = []
    for n in (1, 2):
        t, s = tmp_path / f"t{n}.json", tmp_path / f"s{n}.json"
        p = check("--break", "owner-read-twice", "--seed", "5", "--trace", str(t), "--save-schedule", str(s))
        assert p.returncode == 1, p.stderr
        runs.append((untimed(p.stdout).replace(f"{n}.json", "N.json"), t.read_bytes(), s.read_bytes()))
    assert runs[0] == runs[1]
    out = runs[0][0]
    assert "VIOLATION: two holders" in out and "schedule, 6 steps" in out and "take over" in out
    assert json.loads(runs[0][1])["traceEvents"]
    p = check("--replay", str(tmp_path / "s1.json"), "--trace", str(tmp_path / "t3.json"))
    assert p.returncode == 1 and (tmp_path / "t3.json").read_bytes() == runs[0][1]
    p = check("--break", "no-lock", "--exhaustive", "--depth", "12", "--mode", "invalidate")
    assert p.returncode == 1 and "schedule, 9 steps" in p.stdout and "no shorter schedule violates" in p.stdout


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    p = check("--break", "nonsense")
    assert p.returncode == 2 and "unknown --break 'nonsense'" in p.stderr
    assert all(name in p.stderr for name in BREAKS)
    for bad in (["--mode", "sideways"], ["--depth", "3"], ["--runs", "0"], ["--world", "mars"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["check", "--world", "toy", *bad])
        assert e.value.code == 2, bad
    (tmp_path / "x.json").write_text("{}")
    assert cli.main(["check", "--replay", str(tmp_path / "x.json")]) == 2
    assert "not a schedule" in capsys.readouterr().err
    assert cli.main(["check", "--world", "toy", "--list-breaks"]) == 0
    assert capsys.readouterr().out.split() == list(BREAKS)
