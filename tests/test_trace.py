"""Tracing: exact flows of a scripted merge + COW per mode, killed actors, summary and check.

The first part runs real Machines; the second drives proto.trace.Tracer from several
real child processes (one SIGKILLed, one file cut mid-chunk) and from hand-written
.jsonl files (the format before 2026-12-07, still read) with known timestamps, then checks
merge, summary and check exactly; a .ktrace file gives back every record kind exactly, and
one cut short or damaged is named while the others merge.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from collections import Counter, defaultdict

import numpy as np
import pytest

from proto import MADV_MERGEABLE, PAGE_SIZE
from proto import trace
from proto.trace import Tracer, read_records
from workers.tools import tracetool

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
    # the COW: set_pte_at_notify rides on the FAULT_REPLY (vm:a applies it on arrival, a local call,
    # no flow) and vm:a answers APPLIED
    want[("vm:a", "faultd", "APPLIED")] = 1
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


# ============================================================================ the recorder
def _lines(path) -> list:
    """The records of a .ktrace file, as lists (each as its JSON would read); none may be damaged."""
    recs, skipped, err = read_records(path)
    assert (skipped, err) == (0, None)
    return recs


def test_record_format_and_file_name(tmp_path):
    tr = Tracer.open(str(tmp_path / "t"), "vm:x")
    assert os.path.basename(tr.path) == f"vm_x.{os.getpid()}.ktrace"
    tr.send("ksmd", "START", 3, 1, 0x7f0000001000, 4, 0x11, 0x22, 7)
    tr.recv("ksmd", "ACK", np.int64(3), np.int32(1), np.uint64(0x7f0000001000), 0, 0, 0, np.int64(7))
    tr.span("cow_fault", 1000, 3500, mm=3, pages=2)
    with tr.spanning("merge", ops=np.int64(5)):
        pass
    tr.counter("pages_shared", 12)
    tr.send('peer "odd" é', "WEIRD\n", 0, -1, 0, 0, 0, 0, 1)   # any string is written as valid JSON
    tr.close()
    tr.close()                                                 # idempotent
    size = os.path.getsize(tr.path)
    tr.send("ksmd", "START", 3, 1, 0, 1, 0, 0, 8)              # after close: dropped
    tr.flush()
    assert os.path.getsize(tr.path) == size
    h, m1, m2, s1, s2, c, m3, e = _lines(tr.path)
    assert h[:3] == ["h", "vm:x", os.getpid()] and isinstance(h[3], int) and abs(h[4] - time.time_ns()) < 60e9
    assert m1[0] == "m" and m1[2:] == ["send", "ksmd", "START", 3, 1, 0x7f0000001000, 4, 0x11, 0x22, 7]
    assert m2[2:] == ["recv", "ksmd", "ACK", 3, 1, 0x7f0000001000, 0, 0, 0, 7]
    assert h[3] <= m1[1] <= m2[1] <= e[1]
    assert s1 == ["s", 1000, 2500, "cow_fault", 3, {"pages": 2}]
    assert s2[0] == "s" and s2[2] >= 0 and s2[3:] == ["merge", -1, {"ops": 5}]
    assert c[0] == "c" and c[2:] == ["pages_shared", 12]
    assert m3[3:5] == ['peer "odd" é', "WEIRD\n"]
    assert e[0] == "e" and len(e) == 2


def _as_json(rec) -> list:
    """A record as the JSON line of the format before 2026-12-07 read back (numpy scalars as numbers)."""
    return json.loads(json.dumps(list(rec), default=lambda o: o.item()))


def test_every_record_kind_round_trips_exactly(tmp_path):
    """Records written by a real Tracer read back equal, kind by kind: the packed ones (messages, int spans
    and counters), the ones that go as JSON in their chunk (a float, a bool, a string, a PTE past u64, a
    negative address, numpy scalars...), across chunks (a key defined in the first, used in the third),
    the header and the end."""
    big = (1 << 64) - 1
    tr = Tracer.open(str(tmp_path), "vm:x", flush_interval_s=3600)
    want = []

    def msg(d, *a):
        (tr.send if d == "send" else tr.recv)(*a)
        want.append(["m", None, d, *a])

    def span(name, t0, t1, mm=-1, **args):
        tr.span(name, t0, t1, mm, **args)
        want.append(["s", t0, t1 - t0, name, mm, args])

    def ctr(name, v):
        tr.counter(name, v)
        want.append(["c", None, name, v])

    msg("send", "ksmd", "START", 3, 1, 0x7f0000001000, 4, 0x11, 0x22, 7)
    msg("recv", "ksmd", "ACK", np.int64(3), np.int32(-1), np.uint64(0x7f0000001000), 0, 0, big, np.int64(7))
    msg("send", "faultd", "FAULT", 3, -1, big, 1, big, 0x8000000012345067, -(1 << 63))
    msg("send", 'peer "odd" é', "WEIRD\n", 0, -1, 0, 0, 0, 0, 1)
    msg("recv", "ksmd", "START", 3, 1, -1, 1, 0, 1 << 64, 5)              # no u64: as JSON
    span("cow_fault", 1000, 3500, mm=3, pages=2)
    span("handle_mm_fault", 10, 25, 2, pages=1, write=1)
    span("scan_batch", 5, 5)
    span("odd", 1, 2, ok=True, what="x", ratio=0.5, n=np.int64(9))        # as JSON, types kept
    span("many", 1, 2, **{f"a{i}": i for i in range(200)})                # past the buffer's slack
    ctr("pages_shared", 12)
    ctr("ratio", 1.5)
    ctr("n", np.int64(-7))
    ctr("huge", 1 << 70)
    tr.flush()                                   # the keys are on disk; the next chunk only uses them
    tr.flush()                                   # (an empty flush writes nothing)
    msg("send", "ksmd", "START", 3, 1, 0x7f0000002000, 1, 0x33, 0x44, 8)
    span("cow_fault", 2000, 2600, mm=3, pages=1)
    ctr("pages_shared", 13)
    with tr.spanning("merge", mm=1, ops=np.int64(5)):
        pass
    tr.close()
    got = _lines(tr.path)
    h, e, mid = got[0], got[-1], got[1:-1]
    assert h[:3] == ["h", "vm:x", os.getpid()] and h[3] <= e[1] and e[0] == "e" and len(e) == 2
    merge = mid.pop()
    assert merge[0] == "s" and merge[2] >= 0 and merge[3:] == ["merge", 1, {"ops": 5}]
    assert len(mid) == len(want)
    for g, w in zip(mid, want):
        if w[1] is None:                          # stamped by the tracer: in order, after the header
            assert h[3] <= g[1] <= e[1]
            w[1] = g[1]
        assert g == _as_json(w), (g, w)
    with open(tr.path, "rb") as f:
        data = f.read()
    assert data.count(trace.MAGIC) == 3 and os.stat(tr.path).st_mode & 0o777 == 0o600


def test_a_group_reads_back_as_its_records_exactly(tmp_path):
    """A group (one record for a COW fault's messages and spans, Tracer.group / emit) reads back as the
    records it stands for, in its order, as separate send / recv / span calls would have written them:
    packed, with a span alone (an "s" key), across chunks, and as JSON when a word is no int64 / u64;
    a wrong word count is a TypeError naming the group, and nothing is written for it."""
    big = (1 << 64) - 1
    tr = Tracer.open(str(tmp_path), "faultd", flush_interval_s=3600)
    msgs = (("recv", "vm:a", "FAULT"), ("send", "vm:a", "FAULT_REPLY"), ("recv", "vm:a", "APPLIED"))
    g3 = tr.group(msgs, ("handle_mm_fault", ("pages", "write")))
    g1 = tr.group(msgs[:1])
    gs = tr.group((), ("secondary_fault", ("sub", "addr")))
    assert tr.group(msgs[:1]) is g1 and (g3.nwords, g1.nwords, gs.nwords) == (29, 8, 5)
    words3 = (100, 3, -1, 0x7f0000001000, 1, 0, 0, 7, 150, 3, -1, 0x7f0000001000, 1, 0, big, 7,
              170, 3, -1, 0, 0, 0, 0, 7, 100, 80, 3, 1, 1)
    tr.emit(g3, 180, *words3)
    tr.emit(g1, 200, 200, 3, -1, big, 2, 0, 0, -(1 << 63))
    tr.flush()
    tr.emit(gs, 300, 250, 50, 3, 0, 0x7f0000002000)
    tr.emit(g1, 400, 400, 3, -1, -5, 1, 0, 0, 9)                   # a negative address: as JSON
    tr.emit(g3, 500, *words3[:-1], np.int64(1))                     # a numpy word: as JSON
    g2s = tr.group(msgs[1:2], ("cow_fault", ("pages",)), ("secondary_fault", ("sub", "addr")))
    tr.emit(g2s, 700, 650, 3, -1, 0x1000, 1, 0, 5, 11, 640, 20, 3, 1, 630, 70, 3, 2, 0x1000)   # two spans
    with pytest.raises(TypeError, match="handle_mm_fault.*29 words, 28 given"):
        tr.emit(g3, 600, *words3[:-2], "x")
    tr.close()
    full = [["m", 100, "recv", "vm:a", "FAULT", 3, -1, 0x7f0000001000, 1, 0, 0, 7],
            ["m", 150, "send", "vm:a", "FAULT_REPLY", 3, -1, 0x7f0000001000, 1, 0, big, 7],
            ["m", 170, "recv", "vm:a", "APPLIED", 3, -1, 0, 0, 0, 0, 7],
            ["s", 100, 80, "handle_mm_fault", 3, {"pages": 1, "write": 1}]]
    got = _lines(tr.path)
    assert got[1:-1] == full + [["m", 200, "recv", "vm:a", "FAULT", 3, -1, big, 2, 0, 0, -(1 << 63)],
                                ["s", 250, 50, "secondary_fault", 3, {"sub": 0, "addr": 0x7f0000002000}],
                                ["m", 400, "recv", "vm:a", "FAULT", 3, -1, -5, 1, 0, 0, 9]] + full + [
                                ["m", 650, "send", "vm:a", "FAULT_REPLY", 3, -1, 0x1000, 1, 0, 5, 11],
                                ["s", 640, 20, "cow_fault", 3, {"pages": 1}],
                                ["s", 630, 70, "secondary_fault", 3, {"sub": 2, "addr": 0x1000}]]
    assert got[0][0] == "h" and got[-1][0] == "e"
    merged = tracetool.merge(str(tmp_path), str(tmp_path / "m.json"))
    assert (merged["records"], merged["errors"]) == (14, [])


def test_a_cut_or_damaged_file_is_named_and_the_others_merge(tmp_path):
    """A .ktrace file cut short mid-chunk, one with a damaged chunk, one that is no trace at all: merge
    names each (file and byte offset, one line, no traceback), keeps the records of their whole chunks
    before that, and merges the other files; check and summary read the result."""
    d = str(tmp_path / "raw")
    trs = {}
    for actor in ("ksmd", "vm:a", "vm:b", "vm:c"):
        tr = trs[actor] = Tracer.open(d, actor, flush_interval_s=3600)
        for i in range(3):
            tr.send("vm:x", "START", 1, 0, 0x1000, 1, 0, 0, i)
            tr.flush()                           # a chunk per record: header, 3 records, end
        tr.close()
    paths = {a: t.path for a, t in trs.items()}
    with open(paths["vm:a"], "rb") as f:
        a = f.read()
    with open(paths["vm:a"], "wb") as f:
        f.write(a[:-10])                         # the end chunk cut short: vm:a looks killed
    with open(paths["vm:b"], "r+b") as f:
        at = len(trace.MAGIC.join(f.read().split(trace.MAGIC)[:3]))    # the chunk of the second record
        f.seek(at + trace.CHUNK.size + 20)
        f.write(b"\xff")                         # one of its words
    with open(os.path.join(d, "vm_d.99.ktrace"), "wb") as f:
        f.write(b'["h","vm:d",99,0,0]\n')         # not a trace file of this format
    out = str(tmp_path / "m.json")
    info = tracetool.merge(d, out)
    ba, bb = os.path.basename(paths["vm:a"]), os.path.basename(paths["vm:b"])
    cut_at = len(a) - len(trace.MAGIC.join(a.split(trace.MAGIC)[-1:])) - len(trace.MAGIC)
    assert info["errors"] == [
        f"{ba}: cut short at byte {cut_at}: a chunk of {len(a) - cut_at} bytes, {len(a) - cut_at - 10} there",
        f"{bb}: damaged chunk at byte {at} (checksum mismatch)",
        "vm_d.99.ktrace: no chunk at byte 0 (starts " + repr(b'["h"') + ", expected b'KTR1'): not a ksm-proto "
        "trace file, or damaged"]
    assert "\n" not in "".join(info["errors"])
    # ksmd and vm:c whole (3 each), vm:a its 3 records (no end), vm:b the first only, vm:d nothing
    assert (info["records"], info["skipped_lines"]) == (3 + 3 + 3 + 1, 3)
    assert info["actors"] == ["ksmd", "vm:a", "vm:b", "vm:c", "vm:d"]
    assert info["killed"] == ["vm:a", "vm:b", "vm:d"]
    doc = tracetool.load(out)
    assert tracetool.check(doc) == [] and tracetool.summary(doc)["messages"]["START"]["sent"] == 10


def test_tracing_off_is_none_and_no_actor_records(ksm_machine_factory, tmp_path):
    """Off, the tracer is None (each call site is one `if tr:`), and no actor of a Machine gets a trace
    directory or opens a trace file through a merge and a COW. (What off costs beside on: the bench's
    trace part.)"""
    assert Tracer.open(None, "vm:x") is None and Tracer.open("", "vm:x") is None
    m = ksm_machine_factory()
    assert m.trace_dir is None
    m.ksm.set(pages_to_scan=1000, sleep_millisecs=0)
    a, b = m.spawn_vm("a"), m.spawn_vm("b")
    xs = []
    for vm in (a, b):
        xs.append(vm.mmap(PAGE_SIZE))
        vm.write(xs[-1], b"\x09" * PAGE_SIZE)
        vm.madvise(xs[-1], PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.set(run=1)
    s = m.ksm.wait_stable(30)
    m.ksm.set(run=0)
    assert (s["pages_shared"], s["pages_sharing"]) == (1, 1)
    a.write(xs[0], b"!")                                        # a COW fault through the fault handler
    assert a.read(xs[0], 2) == b"!\x09"
    pids = [p.pid for p in m.scanner_procs + m.faultds] + [vm.pid for vm in (a, b)]
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"--trace" not in f.read().split(b"\0"), pid
        opened = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert not [p for p in opened if p.endswith((".ktrace", ".jsonl"))], (pid, opened)


def test_flush_on_count_and_on_time(tmp_path):
    from proto import trace
    assert (trace.FLUSH_RECORDS, trace.FLUSH_INTERVAL_NS) == (2048, 250_000_000)
    d = Tracer.open(str(tmp_path), "ksmd")
    assert (d._limit, d._interval) == (2048 * 72, 250_000_000)     # (bytes: 2048 messages of 9 words)
    d.close()
    tr = Tracer.open(str(tmp_path), "vm:a", flush_interval_s=3600)
    for i in range(2047):
        tr.send("ksmd", "ACK", 0, 0, 0, 0, 0, 0, i)
    assert len(_lines(tr.path)) == 1                  # the header only
    tr.send("ksmd", "ACK", 0, 0, 0, 0, 0, 0, 2047)     # the 2048th record flushes them all
    assert len(_lines(tr.path)) == 1 + 2048
    tr.close()
    tt = Tracer.open(str(tmp_path), "vm:b", flush_interval_s=0.2)
    tt.counter("x", 1)
    assert len(_lines(tt.path)) == 1
    time.sleep(0.21)
    tt.counter("x", 2)                                 # checked on each record: both written
    assert [r[3] for r in _lines(tt.path)[1:]] == [1, 2]
    tt.close()


def test_forked_child_does_not_write_its_parents_records(tmp_path):
    tr = Tracer.open(str(tmp_path), "ksmd")
    tr.send("vm:a", "START", 0, 0, 0, 1, 0, 0, 1)      # buffered, not yet written
    pid = os.fork()
    if pid == 0:
        tr.flush()
        tr.close()
        os._exit(0)
    os.waitpid(pid, 0)
    tr.close()
    assert [r[0] for r in _lines(tr.path)] == ["h", "m", "e"]


def test_every_record_of_a_long_run_reaches_the_file_in_order(tmp_path):
    """100,000 records with the default flushing (a flush every 2048, and on time): each on disk once, in
    order, with its fields, the close record last. (Their cost per record: `ksm-proto bench --only trace`, record_cost_us.)"""
    n = 100_000
    tr = Tracer.open(str(tmp_path), "vm:long")
    for i in range(n):
        tr.send("ksmd", "CHANGE_PTE", 3, 1, 0x7f0000000000 + i, 1, 0x8000000012345067, 0x8000000054321067, i)
    tr.close()
    recs = _lines(tr.path)
    assert len(recs) == 1 + n + 1 and recs[0][0] == "h" and recs[-1][0] == "e"
    assert [r[-1] for r in recs[1:-1]] == list(range(n))
    assert recs[1][2:] == ["send", "ksmd", "CHANGE_PTE", 3, 1, 0x7f0000000000, 1, 0x8000000012345067,
                           0x8000000054321067, 0]


# ============================================================================ real processes
def _vm_child(d, name, mm, kconn, fconn, ready, die):
    tr = Tracer.open(d, name, flush_interval_s=3600 if die else 0.25)
    tr.recv(name, "REGISTER", mm, 0, 0, 0, 0, 0, 0)
    if fconn is not None:                                       # one COW fault through faultd
        t0 = time.monotonic_ns()
        tr.send("faultd", "FAULT", mm, -1, 0x2000, 1, 0, 0, 500)
        fconn.send(("FAULT", 500))
        _, corr = fconn.recv()
        tr.recv("faultd", "FAULT_REPLY", mm, -1, 0x2000, 1, 0, 0, corr)
        tr.span("cow_fault", t0, time.monotonic_ns(), mm=mm, pages=1)
    for i in range(3):
        typ, m, sub, addr, n, old, new, corr = kconn.recv()
        tr.recv("ksmd", typ, m, sub, addr, n, old, new, corr)
        tr.send("ksmd", "ACK", m, sub, addr, 0, 0, 0, corr)
        kconn.send(("ACK", corr))
        if die and i == 1:
            tr.flush()                                          # what a SIGKILL leaves: these two
    if die:
        ready.send("ready")
        time.sleep(60)
    tr.recv(name, "RELEASE", mm, 0, 0, 0, 0, 0, 0)
    tr.close()


def _ksmd_child(d, sup, va, vb):
    tr = Tracer.open(d, "ksmd")
    for _ in range(2):
        typ, mm, corr = sup.recv()
        tr.recv("supervisor", typ, mm, -1, 0, 0, 0, 0, corr)
        tr.send("supervisor", "ACK", mm, -1, 0, 0, 0, 0, corr)
        sup.send(("ACK", corr))
    corr = 100
    for conn, vm, mm in ((va, "vm:a", 1), (vb, "vm:b", 2)):
        with tr.spanning("merge", mm=mm, pages=3):
            for typ, n in (("START", 3), ("CHANGE_PTE", 1), ("END", 3)):
                corr += 1
                tr.send(vm, typ, mm, 0, 0x1000, n, 0x11, 0x22, corr)
                conn.send((typ, mm, 0, 0x1000, n, 0x11, 0x22, corr))
                _, c = conn.recv()
                tr.recv(vm, "ACK", mm, 0, 0x1000, 0, 0, 0, c)
    tr.counter("pages_shared", 1)
    tr.counter("pages_sharing", 1)
    tr.counter("free_frames", 100)
    tr.close()


def _faultd_child(d, conn):
    tr = Tracer.open(d, "faultd")
    _, corr = conn.recv()
    tr.recv("vm:a", "FAULT", 1, -1, 0x2000, 1, 0, 0, corr)
    with tr.spanning("handle_mm_fault", mm=1, pages=1):
        pass
    tr.send("vm:a", "FAULT_REPLY", 1, -1, 0x2000, 1, 0, 0, corr)
    conn.send(("FAULT_REPLY", corr))
    tr.close()


def _flows(doc) -> set:
    """(sender, receiver, type, corr) of every flow arrow, read through the slices it is bound to."""
    names = {a["pid"]: n for n, a in doc["otherData"]["ksm_proto"]["actors"].items()}
    at = defaultdict(list)
    for e in doc["traceEvents"]:
        if e.get("ph") == "X" and e.get("cat") == "msg":
            at[(e["pid"], e["tid"], e["ts"])].append(e)
    ends = defaultdict(dict)
    for e in doc["traceEvents"]:
        if e.get("ph") in ("s", "f"):
            assert e["cat"] == "flow" and (e["ph"] == "s" or e["bp"] == "e")
            (x,) = [m for m in at[(e["pid"], e["tid"], e["ts"])] if m["name"] == e["name"]]
            assert x["args"]["dir"] == ("send" if e["ph"] == "s" else "recv")
            ends[e["id"]][e["ph"]] = (names[e["pid"]], x)
    out = set()
    for fid, se in ends.items():
        (sa, sx), (ra, rx) = se["s"], se["f"]
        assert sx["args"]["peer"] == ra and rx["args"]["peer"] == sa and sx["args"]["corr"] == rx["args"]["corr"]
        assert sx["ts"] <= rx["ts"]
        out.add((sa, ra, sx["name"], sx["args"]["corr"]))
    assert len(out) == len(ends)
    return out


def _assert_well_formed(doc):
    """What Perfetto and chrome://tracing need: numeric ts, known phases, properly nested slices per thread."""
    per_thread = defaultdict(list)
    last = -1.0
    for e in doc["traceEvents"]:
        assert e["ph"] in ("M", "X", "s", "f", "C", "i") and isinstance(e["pid"], int) and isinstance(e["tid"], int)
        assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        if e["ph"] != "M":
            assert e["ts"] >= last
            last = e["ts"]
        if e["ph"] == "X":
            per_thread[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"]))
    for slices in per_thread.values():
        stack = []
        for b, end in sorted(slices, key=lambda x: (x[0], -x[1])):
            while stack and stack[-1] <= b:
                stack.pop()
            assert not stack or end <= stack[-1], "slices overlap without nesting"
            stack.append(end)


def test_merge_of_real_processes_with_a_killed_actor_and_a_cut_line(tmp_path):
    d = str(tmp_path / "trace")
    ctx = multiprocessing.get_context("fork")
    sup_k, k_sup = ctx.Pipe()
    ka, ak = ctx.Pipe()
    kb, bk = ctx.Pipe()
    af, fa = ctx.Pipe()
    ready_r, ready_w = ctx.Pipe(duplex=False)
    procs = {"ksmd": ctx.Process(target=_ksmd_child, args=(d, k_sup, ka, kb)),
             "faultd": ctx.Process(target=_faultd_child, args=(d, fa)),
             "vm:a": ctx.Process(target=_vm_child, args=(d, "vm:a", 1, ak, af, None, False)),
             "vm:b": ctx.Process(target=_vm_child, args=(d, "vm:b", 2, bk, None, ready_w, True))}
    for p in procs.values():
        p.start()
    try:
        tr = Tracer.open(d, "supervisor")
        for mm, corr in ((1, 1), (2, 2)):
            tr.send("ksmd", "MM_ADD", mm, -1, 0, 0, 0, 0, corr)
            sup_k.send(("MM_ADD", mm, corr))
            _, c = sup_k.recv()
            tr.recv("ksmd", "ACK", mm, -1, 0, 0, 0, 0, c)
        tr.counter("free_frames", 99)
        assert ready_r.poll(10) and ready_r.recv() == "ready"
        os.kill(procs["vm:b"].pid, signal.SIGKILL)
        tr.close()
        for p in procs.values():
            p.join(10)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
    assert procs["vm:b"].exitcode == -signal.SIGKILL and all(procs[a].exitcode == 0 for a in ("ksmd", "faultd", "vm:a"))
    vb_file = os.path.join(d, f"vm_b.{procs['vm:b'].pid}.ktrace")
    cut = os.path.getsize(vb_file)
    with open(vb_file, "ab") as f:
        f.write(trace.MAGIC + b"\x10\x00")                  # a write cut by the kill

    out = str(tmp_path / "merged.json")
    info = tracetool.merge(d, out)
    with open(out) as f:
        doc = json.load(f)
    _assert_well_formed(doc)
    assert info["actors"] == ["supervisor", "ksmd", "faultd", "vm:a", "vm:b"]
    assert info["killed"] == ["vm:b"] and info["skipped_lines"] == 1 and info["files"] == 5
    assert info["errors"] == [f"vm_b.{procs['vm:b'].pid}.ktrace: cut short at byte {cut}: 6 bytes of a 16-byte "
                              f"chunk header"]
    # records (no h/e): supervisor 4+1, ksmd 4+12+2+3, faultd 3, vm:a 2+1+6+1+1, vm:b 1+4 flushed
    assert info["records"] == 5 + 21 + 3 + 11 + 5
    assert doc["displayTimeUnit"] == "ns" and doc["otherData"]["killed"] == ["vm:b"]
    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    order = {e["pid"]: e["args"]["sort_index"] for e in doc["traceEvents"] if e["name"] == "process_sort_index"}
    assert sorted(names.values(), key=lambda n: order[[p for p in names if names[p] == n][0]]) == \
        ["supervisor", "ksmd", "faultd", "vm:a", "vm:b (killed)"]
    threads = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert f"messages pid {procs['vm:b'].pid} (killed)" in threads and "spans pid %d" % procs["ksmd"].pid in threads

    want = {("supervisor", "ksmd", "MM_ADD", 1), ("supervisor", "ksmd", "MM_ADD", 2),
            ("ksmd", "supervisor", "ACK", 1), ("ksmd", "supervisor", "ACK", 2),
            ("vm:a", "faultd", "FAULT", 500), ("faultd", "vm:a", "FAULT_REPLY", 500)}
    for vm, corrs in (("vm:a", (101, 102, 103)), ("vm:b", (104, 105))):   # vm:b's third recv died unflushed
        for typ, c in zip(("START", "CHANGE_PTE", "END"), corrs):
            want |= {("ksmd", vm, typ, c), (vm, "ksmd", "ACK", c)}
    assert _flows(doc) == want and info["flows"] == len(want)
    assert (info["unmatched_sends"], info["unmatched_recvs"]) == (1, 1)   # ksmd's END 106 and the ACK to it

    ksmd_pid = doc["otherData"]["ksm_proto"]["actors"]["ksmd"]["pid"]
    sup_pid = doc["otherData"]["ksm_proto"]["actors"]["supervisor"]["pid"]
    counters = {(e["pid"], e["name"]): e["args"]["value"] for e in doc["traceEvents"] if e["ph"] == "C"}
    assert counters == {(ksmd_pid, "pages_shared"): 1, (ksmd_pid, "pages_sharing"): 1,
                        (ksmd_pid, "free_frames"): 100, (sup_pid, "free_frames"): 99}
    x = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["name"] == "START" and e["args"]["dir"] == "send"]
    assert x[0]["args"] == {"dir": "send", "peer": "vm:a", "mm": 1, "sub": 0, "addr": "0x1000", "n": 3,
                            "old_pte": "0x11", "new_pte": "0x22", "corr": 101}
    assert min(e["ts"] for e in doc["traceEvents"] if e["ph"] != "M") == 0
    marks = Counter((e["pid"], e["name"]) for e in doc["traceEvents"] if e["ph"] == "i")
    vb_pid = doc["otherData"]["ksm_proto"]["actors"]["vm:b"]["pid"]
    assert marks[(vb_pid, "trace open")] == 1 and marks[(vb_pid, "trace end")] == 0
    assert sum(1 for (_, n) in marks if n == "trace end") == 4

    assert tracetool.check(out) == []            # vm:a complete; vm:b killed inside START..END
    s = tracetool.summary(out)
    got = {t: (m["count"], m["pages"], m["matched"]) for t, m in s["messages"].items()}
    assert got == {"MM_ADD": (2, 0, 2), "START": (2, 6, 2), "CHANGE_PTE": (2, 2, 2), "END": (2, 6, 1),
                   "ACK": (8, 0, 7), "FAULT": (1, 1, 1), "FAULT_REPLY": (1, 1, 1), "REGISTER": (2, 0, 0),
                   "RELEASE": (1, 0, 0)}
    assert {t: r["count"] for t, r in s["round_trips"].items()} == \
        {"MM_ADD": 2, "START": 2, "CHANGE_PTE": 2, "END": 2, "FAULT": 1}
    assert s["faults"]["vm:a"]["cow_fault"]["count"] == 1 and s["faults"]["vm:b"]["cow_fault"]["count"] == 0
    assert s["killed"] == ["vm:b"]
    text = tracetool.format_summary(s)
    assert "FAULT_REPLY" in text and "killed actors: vm:b" in text


# ============================================================================ hand-written files
def _write(d, actor, pid, records, t_open=0, end=None, tail=""):
    os.makedirs(d, exist_ok=True)
    lines = [["h", actor, pid, t_open, 1_700_000_000_000_000_000]] + records + ([["e", end]] if end is not None else [])
    with open(os.path.join(d, f"{actor.replace(':', '_')}.{pid}.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines) + tail)


def _m(ts, d, peer, typ, corr, n=0, mm=1, sub=0):
    return ["m", ts, d, peer, typ, mm, sub, 0x1000, n, 0, 0, corr]


def test_summary_counts_and_percentiles(tmp_path):
    d = str(tmp_path / "raw")
    ks, vm = [], []
    for i in range(1, 101):                      # latency i us; ACK latency i - 0.5 us; round trip 2i us
        t = i * 1_000_000
        ks.append(_m(t, "send", "vm:x", "START", i, n=4))
        vm.append(_m(t + i * 1000, "recv", "ksmd", "START", i, n=4))
        vm.append(_m(t + i * 1000 + 500, "send", "ksmd", "ACK", i))
        ks.append(_m(t + 2 * i * 1000, "recv", "vm:x", "ACK", i))
    ks.append(_m(200_000_000, "send", "vm:x", "CLEAR_YOUNG", 999, n=7))     # never received
    vm += [["s", 300_000_000 + i * 100_000, i * 1000, "secondary_fault", 1, {"sub": 0}] for i in range(1, 11)]
    vm.append(["s", 300_000_000, 50_000_000, "scan_like", 1, {}])           # overlaps the faults: nests
    vm.append(["s", 300_250_000, 50_000_000, "overlap", 1, {}])             # overlaps without nesting
    _write(d, "ksmd", 10, ks, end=400_000_000)
    _write(d, "vm:x", 11, vm, end=400_000_000)
    out = str(tmp_path / "m.json")
    tracetool.merge(d, out)
    doc = tracetool.load(out)
    _assert_well_formed(doc)
    lanes = {e["name"]: e["tid"] for e in doc["traceEvents"] if e.get("cat") == "span"}
    assert lanes["overlap"] != lanes["scan_like"] == lanes["secondary_fault"]
    s = tracetool.summary(out)
    st, ack, cy = s["messages"]["START"], s["messages"]["ACK"], s["messages"]["CLEAR_YOUNG"]
    assert (st["count"], st["pages"], st["matched"], st["sent"], st["received"]) == (100, 400, 100, 100, 100)
    assert st["latency_us"] == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert (ack["count"], ack["pages"]) == (100, 0)
    assert ack["latency_us"] == {"p50": 49.5, "p90": 89.5, "p99": 98.5, "max": 99.5}
    assert (cy["count"], cy["pages"], cy["matched"]) == (1, 7, 0)
    assert cy["latency_us"] == {"p50": None, "p90": None, "p99": None, "max": None}
    assert s["round_trips"] == {"START": {"count": 100, "p50": 100.0, "p90": 180.0, "p99": 198.0, "max": 200.0}}
    assert s["faults"] == {"vm:x": {"secondary_fault": {"count": 10, "p50_us": 5.0, "p99_us": 10.0},
                                    "cow_fault": {"count": 0, "p50_us": None, "p99_us": None}}}
    assert s["killed"] == []
    text = tracetool.format_summary(s)
    assert "START" in text and "50.0" in text and "killed actors: none" in text
    assert tracetool.percentile([3, 1, 2, 4], 50) == 2 and tracetool.percentile([], 50) is None


def test_merge_skips_garbled_lines_anywhere_and_loads_only_merged_files(tmp_path):
    d = str(tmp_path / "raw")
    _write(d, "ksmd", 5, [_m(10, "send", "vm:x", "START", 1, n=1)], end=20,
           tail="")
    with open(os.path.join(d, "ksmd.5.jsonl")) as f:
        lines = f.read().splitlines(keepends=True)
    lines.insert(1, "\x00\x01garbage\n")
    lines.insert(2, '["m", 1]\n')                     # valid JSON, not a record
    lines.insert(3, '{"m": 1}\n')
    with open(os.path.join(d, "ksmd.5.jsonl"), "w") as f:
        f.write("".join(lines))
    with open(os.path.join(d, "vm_x.6.jsonl"), "w") as f:
        f.write('["h","vm:x",6,0,0]\n["m",15,"recv","ksmd","START",1,0,4096,1,0,0,1]\n["e",3')
    out = str(tmp_path / "m.json")
    info = tracetool.merge(d, out)
    assert (info["skipped_lines"], info["records"], info["flows"], info["killed"]) == (4, 2, 1, ["vm:x"])
    assert tracetool.load(out)["otherData"]["ksm_proto"]["skipped_lines"] == 4
    empty = str(tmp_path / "e.json")
    os.makedirs(tmp_path / "none")
    assert tracetool.merge(str(tmp_path / "none"), empty)["actors"] == []
    assert tracetool.load(empty)["traceEvents"] == [] and tracetool.check(empty) == []
    (tmp_path / "x.json").write_text('{"traceEvents": []}')
    with pytest.raises(ValueError):
        tracetool.load(str(tmp_path / "x.json"))
    (tmp_path / "y.json").write_text('{"traceEv')
    with pytest.raises(ValueError):
        tracetool.check(str(tmp_path / "y.json"))


def _check(tmp_path, seqs, killed=()):
    """check() of vm actors whose received notifier messages are seqs[actor] = [(ts_ns, type), ...]."""
    d = str(tmp_path / "raw")
    for pid, (actor, seq) in enumerate(seqs.items(), 1):
        recs = [_m(ts, "recv", actor if typ in ("REGISTER", "RELEASE") else "ksmd", typ, i, n=1, mm=pid, sub=0)
                for i, (ts, typ) in enumerate(seq)]
        _write(d, actor, pid, recs, end=None if actor in killed else 90_000)
    out = str(tmp_path / "m.json")
    tracetool.merge(d, out)
    return tracetool.check(out)


VALID = [(1000, "REGISTER"), (2000, "START"), (3000, "CHANGE_PTE"), (4000, "END"), (5000, "START"),
         (6000, "END"), (7000, "CHANGE_PTE"), (8000, "INVALIDATE_PAGE"), (9000, "CLEAR_YOUNG"),
         (10500, "RELEASE")]


@pytest.mark.parametrize("seq, at_us, got, expected, why", [
    ([(1000, "START"), (2000, "END"), (3000, "RELEASE")], 1.0, "START", "REGISTER", "START before REGISTER"),
    (VALID[:2] + [(2500, "START")] + VALID[3:], 2.5, "START", "CHANGE_PTE or END", "nested START"),
    (VALID[:1] + [(1500, "END")] + VALID[1:], 1.5, "END",
     "START, CHANGE_PTE, INVALIDATE_PAGE, CLEAR_YOUNG or RELEASE", "END without START"),
    (VALID[:3] + [(3500, "CHANGE_PTE")] + VALID[3:], 3.5, "CHANGE_PTE", "END", "second CHANGE_PTE"),
    (VALID + [(11250, "CLEAR_YOUNG")], 11.25, "CLEAR_YOUNG", "nothing after RELEASE", "CLEAR_YOUNG after RELEASE"),
    (VALID[:-1], 9.0, "(end)", "START, CHANGE_PTE, INVALIDATE_PAGE, CLEAR_YOUNG or RELEASE", "stops before RELEASE"),
])
def test_check_each_violation_exactly(tmp_path, seq, at_us, got, expected, why):
    v = _check(tmp_path, {"vm:ok": VALID, "vm:bad": seq})
    assert len(v) == 1, v
    (x,) = v
    assert (x.actor, x.mm, x.sub, x.ts_us, x.got, x.expected) == ("vm:bad", 2, 0, at_us, got, expected)
    assert x.startswith(f"vm:bad mm 2 sub 0 at {at_us:.3f} us: ") and why in x and "\n" not in x


def test_check_valid_sequence_and_killed_actor(tmp_path):
    assert _check(tmp_path, {"vm:a": VALID}) == []
    (tmp_path / "raw").rename(tmp_path / "raw1")
    # unfinished on a killed actor: fine; a real violation before the kill is still reported
    v = _check(tmp_path, {"vm:k": VALID[:3], "vm:j": [(500, "END")] + VALID[:3]}, killed=("vm:k", "vm:j"))
    assert [(x.actor, x.ts_us, x.got) for x in v] == [("vm:j", 0.5, "END")]


def test_a_scanner_blocked_on_a_ksm_lock_shows_as_a_wait_span_until_it_is_let_go(ksm_machine_factory, tmp_path):
    """With two scanners an owner waits for the ksm lock of an mm another holds (mm.ksm.merge.merge_in_groups):
    the trace shows that wait (Driver.wait's `wait_ksm_lock` span), which is what makes the scanners'
    serialised merges visible.  Here the test holds the lock: no merge while it does, the scan stalls on
    it, and the one wait that spans the moment of release is a scanner's, on that mm."""
    from workers.runtime.frames import ShmLock
    path = str(tmp_path / "t.json")
    m = ksm_machine_factory(scanners=2, trace=path)
    m.ksm.set(pages_to_scan=1000, sleep_millisecs=0)
    vm = m.spawn_vm("a")
    x = vm.mmap(64 * PAGE_SIZE)
    vm.write(x, b"\x07" * (64 * PAGE_SIZE))       # 64 equal pages: one content, one owner
    vm.madvise(x, 64 * PAGE_SIZE, MADV_MERGEABLE)
    held = ShmLock.ksm(m.run, vm.mm_id)
    assert held.try_acquire()
    try:
        m.ksm.set(run=1)
        # the first full scan takes the checksums; the next merges, and must wait.  (at_least: the first
        # scan may end before a wait for "one more" reads its start, and that wait is for the stalled one)
        s = m.ksm.wait_full_scans(timeout=30, at_least=1)
        last, since = s["full_scans"], time.monotonic()
        deadline = since + 30
        while time.monotonic() - since < 0.5:  # the scan stalls: the owner waits for our lock
            assert time.monotonic() < deadline, "the scan never stalled on the held ksm lock"
            time.sleep(0.05)
            s = m.ksm.stats()
            if s["full_scans"] != last:
                last, since = s["full_scans"], time.monotonic()
        assert (s["pages_shared"], s["pages_sharing"]) == (0, 0)
        t_release = time.monotonic_ns()
    finally:
        held.release()
        held.close()
    s = m.ksm.wait_stable(30)
    m.ksm.set(run=0)
    assert (s["pages_shared"], s["pages_sharing"]) == (1, 63)
    m.close()
    doc = tracetool.load(path)
    t0 = doc["otherData"]["ksm_proto"]["t0_monotonic_ns"]
    names = {a["pid"]: name for name, a in doc["otherData"]["ksm_proto"]["actors"].items()}
    over = [e for e in doc["traceEvents"] if e.get("name") == "wait_ksm_lock" and e.get("ph") == "X"
            and t0 + e["ts"] * 1000 <= t_release <= t0 + (e["ts"] + e["dur"]) * 1000]
    assert len(over) == 1, over
    assert names[over[0]["pid"]].startswith("ksmd")
    assert over[0]["args"]["mm"] == vm.mm_id
    # the summary counts it: one wait on a ksm lock in the whole run (uncontended locks make no span)
    waits = tracetool.summary(doc)["waits"]
    assert {a: w["wait_ksm_lock"]["count"] for a, w in waits.items() if "wait_ksm_lock" in w} == \
        {names[over[0]["pid"]]: 1}
    assert waits[names[over[0]["pid"]]]["wait_ksm_lock"]["total_ms"] == round(over[0]["dur"] / 1000, 3)
    assert "wait_ksm_lock" in tracetool.format_summary(tracetool.summary(doc))
