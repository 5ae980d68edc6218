"""Trace tools: merge the actors' trace files into one Chrome/Perfetto trace, summarize it, check it.

    merge(trace_dir, out_path) -> dict    every *.ktrace (and *.jsonl, the older format) of a run -> one
                                          Chrome Trace Event Format file
    load(path) -> dict                    a merged file (ValueError if it is not JSON or not merge()'s)
    summary(path) -> dict, format_summary(d) -> str
                                          counts, page entries and latencies per message type,
                                          request/reply round trips, fault spans per VM, killed actors
    check(path) -> list[Violation]        every secondary MMU follows the mmu_notifier grammar
    messages(path) -> list[dict]          the message records of a merged file, in time order

The record format is proto/trace.py's (its .ktrace files; the JSON lines of the .jsonl files that
versions before 2026-12-07 wrote are read too).  In the merged file: one process per actor (pid 1..N:
supervisor, ksmd, faultd, vm:* by name, then the rest; "(killed)" appended when a file of it has
no end record), a thread per actor process file for its messages (0.5 us "X" slices, cat "msg")
and as many span threads as needed to keep spans properly nested; flow arrows ("s" -> "f", cat
"flow") join each send to its recv; counters ("C", series "value") sit on the actor that sampled
them.  Timestamps are microseconds since the earliest record.  otherData.ksm_proto holds what
summary() and check() need (format, actors, pids, killed, t0); otherData.killed and
otherData.skipped_lines repeat the essentials.  Owns nothing else: it never runs an actor.
"""
from __future__ import annotations

import functools
import gc
import glob
import json
import math
import os
from collections import defaultdict, deque
from json.encoder import encode_basestring_ascii as _esc

from proto.trace import KINDS, NOTIFIER_TYPES, REPLY_TYPES, SUFFIX, open_private, read_records

from workers.mm.mmu_notifier import DONE, EXPECT, FAILED, INIT, grammar_why
from workers.mm.mmu_notifier import GRAMMAR as _GRAMMAR_TABLE

__all__ = ["merge", "load", "summary", "format_summary", "check", "Violation", "messages", "percentile",
           "FORMAT", "GRAMMAR"]

FORMAT = "ksm-proto trace 1"
GRAMMAR = "REGISTER ( START [CHANGE_PTE] END | CHANGE_PTE | INVALIDATE_PAGE | CLEAR_YOUNG )* RELEASE"
MSG_DUR_NS = 500                       # drawn width of a message slice (shortened so slices never overlap)
COUNTERS_NOTE = "counters are drawn on the process of the actor that sampled them, one series per name"
_ORDER = {"supervisor": 0, "ksmd": 1, "faultd": 2}


def _bulk(fn):
    """Run fn with the cyclic GC paused: it builds millions of acyclic objects (3x faster)."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*a, **kw)
        finally:
            if was:
                gc.enable()
    return wrapper


# ============================================================================ reading the actors' files
def _valid(r) -> bool:
    """A record as proto/trace.py writes it (anything else counts as a garbled line)."""
    if type(r) is not list or not r:
        return False
    k = r[0]
    if k == "m":
        return (len(r) == 12 and type(r[1]) is int and (r[2] == "send" or r[2] == "recv")
                and type(r[3]) is str and type(r[4]) is str and type(r[5]) is int and type(r[6]) is int
                and type(r[7]) is int and type(r[8]) is int and type(r[9]) is int and type(r[10]) is int
                and type(r[11]) is int)
    if k not in KINDS or len(r) != KINDS[k]:
        return False
    if k == "h":
        return type(r[1]) is str and type(r[2]) is int and type(r[3]) is int and type(r[4]) is int
    if type(r[1]) is not int:
        return False
    if k == "s":
        return type(r[2]) is int and type(r[3]) is str and type(r[4]) is int and type(r[5]) is dict
    if k == "c":
        return type(r[2]) is str and type(r[3]) in (int, float)
    return True


def _actor_from_file_name(path: str) -> tuple[str, int]:
    stem = os.path.splitext(os.path.basename(path))[0]
    name, _, pid = stem.rpartition(".")
    if not name:
        name, pid = stem, "0"
    if name.startswith("vm_"):
        name = "vm:" + name[3:]
    try:
        return name, int(pid)
    except ValueError:
        return stem, 0


def _read_lines(path: str) -> list:
    """The records of a .jsonl file (None for a line that is not JSON)."""
    with open(path, "rb") as f:
        data = f.read()
    lines = [x for x in data.split(b"\n") if x.strip()]
    try:                              # fast path: every line parses (one C call for the whole file)
        parsed = json.loads(b"[" + b",".join(lines) + b"]")
        if len(parsed) != len(lines):
            raise ValueError("a line held more than one value")
    except ValueError:                # truncated by a SIGKILL, garbled, not UTF-8: line by line
        parsed = []
        for raw in lines:
            try:
                parsed.append(json.loads(raw))
            except ValueError:
                parsed.append(None)
    return parsed


def _read_file(path: str) -> dict:
    """One actor file: its header, its records in file order, how many lines (chunks of a .ktrace
    file) were skipped, and the error that cut a .ktrace file short (None if none: the records before
    it are kept)."""
    error = None
    if path.endswith(".jsonl"):
        parsed, skipped = _read_lines(path), 0
    else:
        try:
            parsed, skipped, err = read_records(path)
            error = None if err is None else str(err)
        except OSError as e:
            parsed, skipped, error = [], 1, f"{os.path.basename(path)}: {e.strerror or e}"
    header, recs, ended, end_ts = None, [], False, None
    for r in parsed:
        if not _valid(r):
            skipped += 1
            continue
        k = r[0]
        if k == "h":
            if header is None:
                header = r
            continue
        if k == "e":
            ended, end_ts = True, r[1]
            continue
        recs.append(r)
    if header is not None:
        actor, pid, t_open, wall = header[1], header[2], header[3], header[4]
    else:
        actor, pid = _actor_from_file_name(path)
        t_open = wall = None
    return {"path": path, "actor": actor, "os_pid": pid, "t_open": t_open, "wall": wall,
            "records": recs, "skipped": skipped, "ended": ended, "end_ts": end_ts, "error": error}


# ============================================================================ matching
def _match(sends: list, recvs: list, key) -> tuple[list, list, list]:
    """Pair each send with its recv: same (sender, receiver, type, corr), in time order.

    sends/recvs are lists of (ts, actor, dir, peer, type, corr, ...); returns (pairs, lone_sends,
    lone_recvs), pairs as (send, recv).
    """
    queues: dict = defaultdict(deque)
    for s in sorted(sends, key=lambda x: x[0]):
        queues[key(s, True)].append(s)
    pairs, lone_recvs = [], []
    for r in sorted(recvs, key=lambda x: x[0]):
        q = queues.get(key(r, False))
        if q:
            pairs.append((q.popleft(), r))
        else:
            lone_recvs.append(r)
    lone_sends = sorted((s for q in queues.values() for s in q), key=lambda x: x[0])
    return pairs, lone_sends, lone_recvs


def _msg_key(m, is_send: bool):
    # m = (ts, actor, dir, peer, type, corr, ...): sender, receiver, type, corr
    return (m[1], m[3], m[4], m[5]) if is_send else (m[3], m[1], m[4], m[5])


# ============================================================================ merge
def _actor_order(name: str) -> tuple:
    if name in _ORDER:
        return (_ORDER[name], "")
    return (3, name) if name.startswith("vm:") else (4, name)


def _lanes(spans: list) -> list[int]:
    """A lane per span so that the spans of one lane nest properly (asyncio tasks may interleave)."""
    order = sorted(range(len(spans)), key=lambda i: (spans[i][0], -spans[i][1]))
    stacks: list[list[int]] = []         # per lane, the end times of the open spans
    lane = [0] * len(spans)
    for i in order:
        start, dur = spans[i][0], spans[i][1]
        end = start + max(dur, 0)
        for j, st in enumerate(stacks):
            while st and st[-1] <= start:
                st.pop()
            if not st or st[-1] >= end:
                st.append(end)
                lane[i] = j
                break
        else:
            stacks.append([end])
            lane[i] = len(stacks) - 1
    return lane


def _us(ns: int, t0: int) -> float:
    return (ns - t0) / 1000      # int / int is correctly rounded: its repr is the exact decimal (3 places)


def _dumps(o) -> str:
    return json.dumps(o, separators=(",", ":"), default=str)


def _ts_of(r):
    return r[1]


def _ts_of0(e):
    return e[0]


_X_MSG = ('{"ph":"X","name":%s,"cat":"msg","pid":%d,"tid":%d,"ts":%r,"dur":%r,"args":{"dir":"%s","peer":%s,'
          '"mm":%d,"sub":%d,"addr":"%s","n":%d,"old_pte":"%s","new_pte":"%s","corr":%d}}')
_FLOW_S = '{"ph":"s","name":%s,"cat":"flow","id":%d,"pid":%d,"tid":%d,"ts":%r}'
_FLOW_F = '{"ph":"f","bp":"e","name":%s,"cat":"flow","id":%d,"pid":%d,"tid":%d,"ts":%r}'


@_bulk
def merge(trace_dir: str, out_path: str) -> dict:
    """Merge every *.ktrace (and *.jsonl) in trace_dir into one Chrome Trace Event Format file at out_path.

    Garbled or truncated lines, and the chunks of a .ktrace file from the first one cut short or
    damaged on, are skipped and counted; what is wrong with a file is in "errors" (one line each,
    naming the file), its records before that are merged, and so are the other files.  An actor
    whose file has no end record is marked "(killed)".  Returns what was merged.
    """
    paths = glob.glob(os.path.join(trace_dir, "*" + SUFFIX)) + glob.glob(os.path.join(trace_dir, "*.jsonl"))
    files = [_read_file(p) for p in sorted(paths)]
    by_actor: dict[str, list] = defaultdict(list)
    for f in files:
        by_actor[f["actor"]].append(f)
    actors = sorted(by_actor, key=_actor_order)
    for a in actors:
        by_actor[a].sort(key=lambda f: (f["t_open"] if f["t_open"] is not None else 0, f["os_pid"]))

    stamps = [f["t_open"] for f in files if f["t_open"] is not None]
    for f in files:
        for r in f["records"]:
            stamps.append(r[1])
        if f["end_ts"] is not None:
            stamps.append(f["end_ts"])
    t0 = min(stamps) if stamps else 0
    wall0 = None
    for f in files:
        if f["t_open"] is not None and f["wall"] is not None:
            wall0 = f["wall"] - (f["t_open"] - t0)
            break

    # Events are kept as (ts_us, JSON text): the hot ones are formatted directly (5x faster than
    # building dicts for json.dumps), the rest go through json.dumps.
    meta: list[str] = []
    events: list[tuple[float, str]] = []
    tids = iter(range(1, 1 << 30))
    killed, info = [], {}
    sends, recvs = [], []
    n_records = sum(len(f["records"]) for f in files)

    def m_(name, pid, tid, args):
        meta.append(_dumps({"ph": "M", "name": name, "pid": pid, "tid": tid, "ts": 0, "args": args}))

    def ev(e):
        events.append((e["ts"], _dumps(e)))

    for idx, actor in enumerate(actors):
        pid = idx + 1
        fs = by_actor[actor]
        dead = not all(f["ended"] for f in fs)
        if dead:
            killed.append(actor)
        m_("process_name", pid, 0, {"name": actor + (" (killed)" if dead else "")})
        m_("process_sort_index", pid, 0, {"sort_index": pid})
        info[actor] = {"pid": pid, "os_pids": [f["os_pid"] for f in fs], "killed": dead,
                       "end_ts_us": (None if dead or not fs else _us(max(f["end_ts"] for f in fs), t0)),
                       "files": [os.path.basename(f["path"]) for f in fs],
                       "skipped_lines": sum(f["skipped"] for f in fs)}
        for inc, f in enumerate(fs):
            suffix = f" pid {f['os_pid']}" + (" (killed)" if not f["ended"] else "")
            msgs = [r for r in f["records"] if r[0] == "m"]
            spans = [r for r in f["records"] if r[0] == "s"]
            ctrs = [r for r in f["records"] if r[0] == "c"]
            mtid = next(tids)
            m_("thread_name", pid, mtid, {"name": "messages" + suffix})
            m_("thread_sort_index", pid, mtid, {"sort_index": inc * 100})
            if f["t_open"] is not None:
                ev({"ph": "i", "s": "t", "name": "trace open", "cat": "actor", "pid": pid, "tid": mtid,
                    "ts": _us(f["t_open"], t0), "args": {"os_pid": f["os_pid"]}})
            if f["end_ts"] is not None:
                ev({"ph": "i", "s": "t", "name": "trace end", "cat": "actor", "pid": pid, "tid": mtid,
                    "ts": _us(f["end_ts"], t0), "args": {"os_pid": f["os_pid"]}})
            msgs.sort(key=_ts_of)
            last = len(msgs) - 1
            for i, r in enumerate(msgs):
                _, ts, d, peer, typ, mm, sub, addr, n, old, new, corr = r
                t = (ts - t0) / 1000
                # never overlap the next slice of the thread: overlapping X events do not nest
                dur = MSG_DUR_NS if i == last else max(0, min(MSG_DUR_NS, msgs[i + 1][1] - ts - 1))
                events.append((t, _X_MSG % (_esc(typ), pid, mtid, t, dur / 1000, d, _esc(peer), mm, sub,
                                            hex(addr), n, hex(old), hex(new), corr)))
                (sends if d == "send" else recvs).append((ts, actor, d, peer, typ, corr, pid, mtid, t))
            if spans:
                lanes = _lanes([(r[1], r[2]) for r in spans])
                lane_tids = {}
                for r, ln in zip(spans, lanes):
                    if ln not in lane_tids:
                        lane_tids[ln] = next(tids)
                        m_("thread_name", pid, lane_tids[ln], {"name": "spans" + (f" {ln + 1}" if ln else "") + suffix})
                        m_("thread_sort_index", pid, lane_tids[ln], {"sort_index": inc * 100 + 1 + ln})
                    _, ts, dur, name, mm, args = r
                    ev({"ph": "X", "name": name, "cat": "span", "pid": pid, "tid": lane_tids[ln],
                        "ts": _us(ts, t0), "dur": max(dur, 0) / 1000, "args": {"mm": mm, **args}})
            for r in ctrs:
                _, ts, name, value = r
                ev({"ph": "C", "name": name, "cat": "counter", "pid": pid, "tid": mtid,
                    "ts": _us(ts, t0), "args": {"value": value}})

    pairs, lone_sends, lone_recvs = _match(sends, recvs, _msg_key)
    for fid, (s, r) in enumerate(pairs, 1):
        name = _esc(s[4])
        events.append((s[8], _FLOW_S % (name, fid, s[6], s[7], s[8])))
        events.append((r[8], _FLOW_F % (name, fid, r[6], r[7], r[8])))
    events.sort(key=_ts_of0)

    skipped = sum(f["skipped"] for f in files)
    result = {"actors": actors, "files": len(files), "records": n_records, "skipped_lines": skipped,
              "killed": killed, "flows": len(pairs), "unmatched_sends": len(lone_sends),
              "unmatched_recvs": sum(1 for r in lone_recvs if r[3] != r[1]), "events": len(meta) + len(events),
              "errors": [f["error"] for f in files if f["error"]]}
    other = {"killed": killed, "skipped_lines": skipped,
             "ksm_proto": {"format": FORMAT, "t0_monotonic_ns": t0, "t0_wall_time_ns": wall0,
                           "actors": info, "killed": killed, "records": n_records,
                           "skipped_lines": skipped, "flows": len(pairs),
                           "unmatched_sends": result["unmatched_sends"],
                           "unmatched_recvs": result["unmatched_recvs"], "note": COUNTERS_NOTE}}
    d = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(out_path)}.{os.getpid()}.tmp")
    try:
        with open_private(tmp) as f:
            f.write('{"traceEvents":[\n')
            texts = meta + [e[1] for e in events]
            for k in range(0, len(texts), 8192):
                f.write((",\n" if k else "") + ",\n".join(texts[k:k + 8192]))
            f.write('\n],"displayTimeUnit":"ns","otherData":' + _dumps(other) + "}\n")
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    result["out"] = out_path
    return result


# ============================================================================ reading a merged file
@_bulk
def load(path: str) -> dict:
    """A merged trace; ValueError when the file is not JSON or not one that merge() wrote."""
    with open(path, "rb") as f:
        doc = json.loads(f.read())
    if (not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list)
            or not isinstance(doc.get("otherData"), dict) or not isinstance(doc["otherData"].get("ksm_proto"), dict)
            or doc["otherData"]["ksm_proto"].get("format") != FORMAT):
        raise ValueError(f"no {FORMAT!r} in otherData.ksm_proto (was it written by tracetool.merge?)")
    return doc


def _doc(path_or_doc) -> dict:
    return path_or_doc if isinstance(path_or_doc, dict) else load(path_or_doc)


def _actor_names(doc: dict) -> dict[int, str]:
    return {a["pid"]: name for name, a in doc["otherData"]["ksm_proto"]["actors"].items()}


def _msg_tuples(doc: dict) -> list[tuple]:
    """(ts_us, actor, dir, peer, type, corr, args) of every message slice, in file (= time) order."""
    names = _actor_names(doc)
    out = []
    for e in doc["traceEvents"]:
        if e.get("cat") == "msg" and e.get("ph") == "X":
            a = e["args"]
            out.append((e["ts"], names.get(e["pid"], str(e["pid"])), a["dir"], a["peer"], e["name"], a["corr"], a))
    return out


def messages(path_or_doc) -> list[dict]:
    """Every message record of a merged trace, in time order: dicts with ts (us), actor and the fields."""
    return [{"ts": ts, "actor": actor, "dir": d, "peer": peer, "type": typ, "mm": a["mm"], "sub": a["sub"],
             "addr": int(a["addr"], 16), "n": a["n"], "old_pte": int(a["old_pte"], 16),
             "new_pte": int(a["new_pte"], 16), "corr": corr}
            for ts, actor, d, peer, typ, corr, a in _msg_tuples(_doc(path_or_doc))]


def percentile(values, p: float, _sorted: bool = False) -> float | None:
    """Nearest-rank percentile: the smallest value with at least p% of the values at or below it."""
    if not values:
        return None
    v = values if _sorted else sorted(values)
    k = max(1, math.ceil(p / 100.0 * len(v)))
    return v[min(k, len(v)) - 1]


def _pcts(values, ps=(50, 90, 99)) -> dict:
    v = sorted(values)
    d = {f"p{p}": (None if not v else round(percentile(v, p, True), 3)) for p in ps}
    d["max"] = round(v[-1], 3) if v else None
    return d


# ============================================================================ summary
@_bulk
def summary(path_or_doc) -> dict:
    """Counts and latencies of a merged trace (microseconds).

    messages[type]: count (each message once: a matched send/recv pair, or a lone send or recv),
      sent, received, matched, pages (sum of n), latency percentiles of send -> matching recv.
    round_trips[request type]: request sent by A to B with corr c -> the ACK/FAULT_REPLY B sent back
      to A with corr c, up to A's recv of it (or B's send when A's recv is missing).
    faults[actor]: secondary_fault and cow_fault span counts, p50/p99 durations, per VM actor.
    waits[actor][span]: the wait_* spans (runtime.driver.Driver.wait): count, total_ms, p50/p99.
    """
    doc = _doc(path_or_doc)
    od = doc["otherData"]["ksm_proto"]
    tup = _msg_tuples(doc)
    pairs, lone_s, lone_r = _match([t for t in tup if t[2] == "send"], [t for t in tup if t[2] == "recv"], _msg_key)

    per: dict[str, dict] = {}

    def slot(t):
        if t not in per:
            per[t] = {"count": 0, "sent": 0, "received": 0, "matched": 0, "pages": 0, "_lat": []}
        return per[t]

    for t in tup:
        slot(t[4])["sent" if t[2] == "send" else "received"] += 1
    for s, r in pairs:
        d = slot(s[4])
        d["count"] += 1
        d["matched"] += 1
        d["pages"] += s[6]["n"]
        d["_lat"].append(r[0] - s[0])
    for x in lone_s + lone_r:
        d = slot(x[4])
        d["count"] += 1
        d["pages"] += x[6]["n"]
    for d in per.values():
        d["latency_us"] = _pcts(d.pop("_lat"))

    # round trips: request send by A (peer B) ... reply of B to A with the same corr
    reply_end: dict = defaultdict(deque)         # (B, A, corr) -> ts of the reply's arrival
    for s, r in pairs:
        if s[4] in REPLY_TYPES:
            reply_end[(s[1], s[3], s[5])].append(r[0])
    for s in lone_s:
        if s[4] in REPLY_TYPES:
            reply_end[(s[1], s[3], s[5])].append(s[0])
    for r in lone_r:
        if r[4] in REPLY_TYPES:
            reply_end[(r[3], r[1], r[5])].append(r[0])
    for q in reply_end.values():
        q_sorted = sorted(q)
        q.clear()
        q.extend(q_sorted)
    rtt: dict[str, list] = defaultdict(list)
    for s in sorted((t for t in tup if t[2] == "send" and t[4] not in REPLY_TYPES), key=lambda x: x[0]):
        q = reply_end.get((s[3], s[1], s[5]))
        while q and q[0] < s[0]:
            q.popleft()
        if q:
            rtt[s[4]].append(q.popleft() - s[0])
    round_trips = {t: {"count": len(v), **_pcts(v)} for t, v in sorted(rtt.items())}

    names = _actor_names(doc)
    vm_spans: dict[str, dict[str, list]] = {a: {} for a in od["actors"] if a.startswith("vm:")}
    for e in doc["traceEvents"]:
        if e.get("ph") == "X" and e.get("cat") == "span" and e["name"] in ("secondary_fault", "cow_fault"):
            a = names.get(e["pid"], str(e["pid"]))
            vm_spans.setdefault(a, {}).setdefault(e["name"], []).append(e["dur"])
    vms = {}
    for a in sorted(vm_spans, key=_actor_order):
        vms[a] = {}
        for name in ("secondary_fault", "cow_fault"):
            v = vm_spans[a].get(name, [])
            p = _pcts(v, (50, 99))
            vms[a][name] = {"count": len(v), "p50_us": p["p50"], "p99_us": p["p99"]}

    # waits: an actor blocked on a lock another holds, or a scanner on the others' part of a round
    wait_spans: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for e in doc["traceEvents"]:
        if e.get("ph") == "X" and e.get("cat") == "span" and e["name"].startswith("wait_"):
            wait_spans[names.get(e["pid"], str(e["pid"]))][e["name"]].append(e["dur"])
    waits = {a: {n: {"count": len(v), "total_ms": round(sum(v) / 1000, 3), **_pcts(v, (50, 99))}
                 for n, v in sorted(wait_spans[a].items())} for a in sorted(wait_spans, key=_actor_order)}

    return {"messages": dict(sorted(per.items())), "round_trips": round_trips, "faults": vms, "waits": waits,
            "killed": list(od.get("killed", [])), "actors": list(od["actors"]),
            "skipped_lines": od.get("skipped_lines", 0), "records": od.get("records", 0)}


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))


def _table(head: list[str], rows: list[list]) -> list[str]:
    cells = [head] + [[_fmt(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(head))]
    out = []
    for j, r in enumerate(cells):
        out.append("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)).rstrip())
        if j == 0:
            out.append("  ".join("-" * x for x in w))
    return out


def format_summary(d: dict) -> str:
    """summary() as plain text tables (latencies in microseconds)."""
    lines = [f"actors: {', '.join(d['actors']) or '-'}; records: {d['records']}; "
             f"skipped lines: {d['skipped_lines']}", "", "messages (latency = send -> matching recv, us)"]
    lines += _table(["type", "count", "pages", "matched", "p50", "p90", "p99", "max"],
                    [[t, m["count"], m["pages"], m["matched"], m["latency_us"]["p50"], m["latency_us"]["p90"],
                      m["latency_us"]["p99"], m["latency_us"]["max"]] for t, m in d["messages"].items()])
    lines += ["", "round trips (request -> ACK/FAULT_REPLY, us)"]
    if d["round_trips"]:
        lines += _table(["request", "count", "p50", "p90", "p99", "max"],
                        [[t, r["count"], r["p50"], r["p90"], r["p99"], r["max"]] for t, r in d["round_trips"].items()])
    else:
        lines.append("  (none)")
    lines += ["", "faults per VM (durations in us)"]
    if d["faults"]:
        lines += _table(["vm", "secondary", "p50", "p99", "cow", "p50", "p99"],
                        [[a, v["secondary_fault"]["count"], v["secondary_fault"]["p50_us"],
                          v["secondary_fault"]["p99_us"], v["cow_fault"]["count"], v["cow_fault"]["p50_us"],
                          v["cow_fault"]["p99_us"]] for a, v in d["faults"].items()])
    else:
        lines.append("  (none)")
    lines += ["", "waits per actor (a lock another held; a scanner's barrier: wait_lead, wait_routed, wait_done)"]
    rows = [[a, n, w["count"], w["total_ms"], w["p50"], w["p99"]] for a, ws in d.get("waits", {}).items()
            for n, w in ws.items()]
    lines += _table(["actor", "wait", "count", "total ms", "p50 us", "p99 us"], rows) if rows else ["  (none)"]
    lines += ["", f"killed actors: {', '.join(d['killed']) if d['killed'] else 'none'}"]
    return "\n".join(lines)


# ============================================================================ check
class Violation(str):
    """One grammar violation; the string is the one-line report, the attributes its parts."""

    actor: str
    mm: int
    sub: int
    ts_us: float
    got: str
    expected: str

    def __new__(cls, actor: str, mm: int, sub: int, ts_us: float, got: str, expected: str, text: str):
        v = super().__new__(cls, text)
        v.actor, v.mm, v.sub, v.ts_us, v.got, v.expected = actor, mm, sub, ts_us, got, expected
        return v


_INIT, _DONE, _FAILED = INIT, DONE, FAILED
_EXPECT, _STEP, _why = EXPECT, _GRAMMAR_TABLE, grammar_why


@_bulk
def check(path_or_doc) -> list[Violation]:
    """Violations of the notifier grammar, in time order (an empty list: every secondary MMU is fine).

    For each (receiving actor, mm, sub) its received notifier messages must spell
    REGISTER ( START [CHANGE_PTE] END | CHANGE_PTE | INVALIDATE_PAGE | CLEAR_YOUNG )* RELEASE.
    At most one violation per secondary MMU: its first (later messages would only cascade);
    a sequence without RELEASE counts only when its actor ended cleanly, reported at its last message.
    """
    doc = _doc(path_or_doc)
    actors = doc["otherData"]["ksm_proto"]["actors"]
    state: dict[tuple, int] = {}
    last: dict[tuple, tuple] = {}
    out: list[Violation] = []
    notifier = frozenset(NOTIFIER_TYPES)
    for m in _msg_tuples(doc):
        ts, actor, d, peer, typ, corr, a = m
        if d != "recv" or typ not in notifier:
            continue
        key = (actor, a["mm"], a["sub"])
        st = state.get(key, _INIT)
        if st == _FAILED:
            continue
        nxt = _STEP.get((st, typ))
        if nxt is None:
            out.append(Violation(actor, key[1], key[2], ts, typ, _EXPECT[st],
                                 f"{actor} mm {key[1]} sub {key[2]} at {ts:.3f} us: {_why(st, typ)}: got {typ}, "
                                 f"expected {_EXPECT[st]} ({typ} from {peer}, corr {corr}, addr {a['addr']}, "
                                 f"n {a['n']})"))
            nxt = _FAILED
        state[key] = nxt
        last[key] = m
    for key, st in state.items():
        a = actors.get(key[0], {})
        if st in (_DONE, _FAILED) or a.get("killed", True):
            continue
        ts, typ = last[key][0], last[key][4]
        end = a.get("end_ts_us")
        out.append(Violation(key[0], key[1], key[2], ts, "(end)", _EXPECT[st],
                             f"{key[0]} mm {key[1]} sub {key[2]} at {ts:.3f} us: sequence stops before "
                             f"RELEASE: got no more messages after {typ}, expected {_EXPECT[st]} "
                             f"(the actor ended cleanly at {_fmt(end)} us)"))
    out.sort(key=lambda v: v.ts_us)
    return out
