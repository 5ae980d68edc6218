"""Tracing: exact flows of a scripted merge + COW per mode, killed actors, summary and check."""
from __future__ import annotations

import json
import signal
import time
from collections import Counter

import pytest

from proto import MADV_MERGEABLE, PAGE_SIZE
from proto.trace import Tracer
from workers import tracetool

NOTIFY = {"change_pte": ["CHANGE_PTE"], "wrapped": ["START", "CHANGE_PTE", "END"], "invalidate": ["START", "END"]}


def flows(path) -> Counter:
    """(sender, receiver, type) of every send matched to its receive."""
    doc = tracetool.load(path)
    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "process_name"}
    sends = {e["id"]: e for e in doc["traceEvents"] if e.get("ph") == "s"}
    out = Counter()
    for e in doc["traceEvents"]:
        if e.get("ph") == "f":
            s = sends[e["id"]]
            out[(names[s["pid"]], names[e["pid"]], e["name"])] += 1
    return out


@pytest.mark.parametrize("mode", ["change_pte", "wrapped", "invalidate"])
def test_scripted_merge_and_cow_exact_flows(ksm_machine_factory, tmp_path, mode):
    path = str(tmp_path / "t.json")
    m = ksm_machine_factory(notifier_mode=mode, trace=path)
    m.ksm.set(pages_to_scan=1000, sleep_millisecs=0)
    a, b = m.spawn_vm("a"), m.spawn_vm("b")
    xs = []
    for vm in (a, b):
        x = vm.mmap(PAGE_SIZE)
        vm.write(x, b"\x09" * PAGE_SIZE)          # one anonymous fault each
        vm.madvise(x, PAGE_SIZE, MADV_MERGEABLE)
        xs.append(x)
    m.ksm.set(run=1)
    s = m.ksm.wait_stable(30)
    m.ksm.set(run=0)
    assert (s["pages_shared"], s["pages_sharing"]) == (1, 1)
    a.write(xs[0], b"!")                           # one COW fault
    m.close()
    want = Counter()
    for t in NOTIFY[mode]:
        want[("ksmd", "vm:a", t)] += 2                 # a's page: write-protected, then replaced
        want[("vm:a", "ksmd", "ACK")] += 2
        want[("ksmd", "vm:b", t)] += 1                 # b's page became the KSM page: write-protected
        want[("vm:b", "ksmd", "ACK")] += 1
        want[("faultd", "vm:a", t)] += 1               # the COW: set_pte_at_notify
        want[("vm:a", "faultd", "ACK")] += 1
    want[("vm:a", "faultd", "FAULT")] = 2
    want[("faultd", "vm:a", "FAULT_REPLY")] = 2
    want[("vm:b", "faultd", "FAULT")] = 1
    want[("faultd", "vm:b", "FAULT_REPLY")] = 1
    assert flows(path) == want
    assert tracetool.check(path) == []
    summ = tracetool.summary(path)
    assert summ["faults"]["vm:a"]["cow_fault"]["count"] == 1
    assert summ["messages"]["FAULT"]["count"] == 3
    doc = tracetool.load(path)
    counters = {e["name"] for e in doc["traceEvents"] if e.get("ph") == "C"}
    assert {"pages_shared", "pages_sharing", "free_frames"} <= counters
    spans = {e["name"] for e in doc["traceEvents"] if e.get("cat") == "span"}
    assert {"scan_batch", "merge", "secondary_fault", "cow_fault"} <= spans


def test_trace_with_a_killed_actor_still_loads(ksm_machine_factory, tmp_path):
    path = str(tmp_path / "k.json")
    m = ksm_machine_factory(trace=path)
    a, b = m.spawn_vm("a"), m.spawn_vm("b")
    for vm in (a, b):
        x = vm.mmap(8 * PAGE_SIZE)
        vm.write(x, b"\x01" * 8 * PAGE_SIZE)
    time.sleep(0.3)                                # let a flush part of its records
    a.kill(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while "a" not in m.dead_vms and time.monotonic() < deadline:
        time.sleep(0.02)
    m.close()
    doc = json.load(open(path))                    # valid JSON
    info = doc["otherData"]["ksm_proto"]
    assert info["killed"] == ["vm:a"]
    names = [e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "process_name"]
    assert "vm:a (killed)" in names and "vm:b" in names
    assert tracetool.check(path) == []             # a killed actor's unfinished sequence is no violation


def _synthetic(tmp_path, seq, ended=True):
    """A merged trace from hand-written records of one VM (sequence of (ts_us, type))."""
    d = tmp_path / "raw"
    d.mkdir()
    lines = [["h", "vm:x", 1, 0, 0], ["c", 0, "pages_shared", 0]]     # the trace starts at 0
    for ts, typ in seq:
        lines.append(["m", int(ts * 1000), "recv", "ksmd", typ, 0, 0, 0, 1, 0, 0, 1])
    if ended:
        lines.append(["e", 10**9])
    (d / "vm_x.1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '["m", 12, "recv"')
    out = str(tmp_path / "m.json")
    info = tracetool.merge(str(d), out)
    assert info["skipped_lines"] == 1              # the truncated last line
    return out


@pytest.mark.parametrize("seq, at, msg", [
    ([(1, "START")], 1, "got START, expected REGISTER"),
    ([(1, "REGISTER"), (2, "START"), (3, "START")], 3, "got START, expected CHANGE_PTE or END"),
    ([(1, "REGISTER"), (2, "END")], 2, "got END, expected START"),
    ([(1, "REGISTER"), (2, "START"), (3, "CHANGE_PTE"), (4, "CHANGE_PTE")], 4, "got CHANGE_PTE, expected END"),
    ([(1, "REGISTER"), (2, "RELEASE"), (5, "CLEAR_YOUNG")], 5, "expected nothing after RELEASE"),
    ([(1, "REGISTER"), (2, "CHANGE_PTE")], 2, "before RELEASE"),
])
def test_check_reports_the_first_violation(tmp_path, seq, at, msg):
    v = tracetool.check(_synthetic(tmp_path, seq))
    assert len(v) == 1 and msg in v[0] and f"{at:.3f} us" in v[0], v


def test_check_accepts_the_grammar_and_unfinished_killed_actors(tmp_path):
    ok = [(1, "REGISTER"), (2, "START"), (3, "CHANGE_PTE"), (4, "END"), (5, "START"), (6, "END"),
          (7, "CHANGE_PTE"), (8, "INVALIDATE_PAGE"), (9, "CLEAR_YOUNG"), (10, "RELEASE")]
    assert tracetool.check(_synthetic(tmp_path, ok)) == []
    (tmp_path / "raw").rename(tmp_path / "raw0")
    assert tracetool.check(_synthetic(tmp_path, ok[:3], ended=False)) == []


def test_tracing_is_off_by_default():
    assert Tracer.open(None, "ksmd") is None
