"""Trace tools: merge the actors' records into one Chrome Trace Event file; summarise; check.

Pure logic over files (no process of its own).  `merge` turns the per-actor JSON
lines of proto/trace.py into one file that opens in Perfetto (ui.perfetto.dev)
and chrome://tracing: a named process track per actor, every message as a short
slice with a flow arrow from its send to its receive, spans for scan batches,
merges and faults, and counter tracks.  Truncated or garbled lines (an actor
killed mid-write) are skipped and counted; the output is valid JSON regardless.

`check` verifies that every secondary MMU saw its notifier messages in the order
of DESIGN.md's grammar:

    REGISTER ( START [CHANGE_PTE] END | CHANGE_PTE | INVALIDATE_PAGE | CLEAR_YOUNG )* RELEASE
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np

NOTIFIER = ("REGISTER", "START", "END", "CHANGE_PTE", "INVALIDATE_PAGE", "CLEAR_YOUNG", "RELEASE")
REPLIES = ("ACK", "FAULT_REPLY", "REPLY")
MSG_DUR_US = 0.5


def _actor_order(name: str) -> tuple:
    rank = {"supervisor": 0, "ksmd": 1, "faultd": 2}
    return (rank.get(name, 3), name)


def read_actor_file(path: str) -> tuple[dict, list, int]:
    """(header, records, bad lines) of one actor's .jsonl file."""
    header, recs, bad = None, [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if not isinstance(r, list) or not r:
                bad += 1
                continue
            if r[0] == "h" and header is None:
                header = {"actor": r[1], "pid": r[2]}
            else:
                recs.append(r)
    if header is None:
        base = os.path.basename(path).rsplit(".", 2)[0]
        header = {"actor": base.replace("_", ":", 1), "pid": 0}
    return header, recs, bad


def merge(trace_dir: str, out_path: str) -> dict:
    """Merge every actor file in trace_dir into one Chrome Trace Event JSON file."""
    actors: dict[str, dict] = {}
    bad = 0
    for path in sorted(glob.glob(os.path.join(trace_dir, "*.jsonl"))):
        h, recs, b = read_actor_file(path)
        bad += b
        a = actors.setdefault(h["actor"], {"pids": [], "recs": [], "ended": False})
        a["pids"].append(h["pid"])
        a["recs"].extend(recs)
        a["ended"] = a["ended"] or any(r[0] == "e" for r in recs)
    t0 = min((r[1] for a in actors.values() for r in a["recs"] if len(r) > 1 and isinstance(r[1], int)),
             default=0)
    events: list[dict] = []
    order = sorted(actors, key=_actor_order)
    pid_of = {name: i + 1 for i, name in enumerate(order)}
    killed = [n for n in order if not actors[n]["ended"]]
    for name in order:
        p = pid_of[name]
        label = name + (" (killed)" if name in killed else "")
        events.append({"ph": "M", "name": "process_name", "pid": p, "tid": 1, "args": {"name": label}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": p, "tid": 1, "args": {"sort_index": p}})
        events.append({"ph": "M", "name": "thread_name", "pid": p, "tid": 1, "args": {"name": "events"}})
    sends: dict[tuple, dict] = {}
    recvs: list[tuple[tuple, dict]] = []
    records = 0
    for name in order:
        p = pid_of[name]
        for r in actors[name]["recs"]:
            records += 1
            try:
                kind = r[0]
                if kind == "m":
                    _, ts, d, peer, typ, mm, sub, addr, n, old, new, corr = r
                    ev = {"ph": "X", "name": typ, "cat": "msg", "pid": p, "tid": 1,
                          "ts": (ts - t0) / 1000, "dur": MSG_DUR_US,
                          "args": {"dir": d, "peer": peer, "mm": mm, "sub": sub, "addr": hex(addr), "n": n,
                                   "old_pte": hex(old), "new_pte": hex(new), "corr": corr}}
                    events.append(ev)
                    if d == "send":
                        sends[(name, peer, typ, corr)] = ev
                    else:
                        recvs.append(((peer, name, typ, corr), ev))
                elif kind == "s":
                    _, ts, dur, sname, mm, args = r
                    events.append({"ph": "X", "name": sname, "cat": "span", "pid": p, "tid": 1,
                                   "ts": (ts - t0) / 1000, "dur": max(dur / 1000, 0.001),
                                   "args": {"mm": mm, **(args or {})}})
                elif kind == "c":
                    _, ts, cname, value = r
                    events.append({"ph": "C", "name": cname, "pid": p, "tid": 1, "ts": (ts - t0) / 1000,
                                   "args": {cname: value}})
            except (ValueError, TypeError):
                bad += 1
    flows = 0
    for key, rev in recvs:
        sev = sends.get(key)
        if sev is None:
            continue
        flows += 1
        fid = flows
        events.append({"ph": "s", "id": fid, "name": key[2], "cat": "flow", "pid": sev["pid"], "tid": 1,
                       "ts": sev["ts"]})
        events.append({"ph": "f", "bp": "e", "id": fid, "name": key[2], "cat": "flow", "pid": rev["pid"],
                       "tid": 1, "ts": rev["ts"]})
    events.sort(key=lambda e: (e.get("ts", -1), 0 if e["ph"] == "M" else 1))
    info = {"actors": order, "records": records, "skipped_lines": bad, "killed": killed, "flows": flows}
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ns", "otherData": {"ksm_proto": info}}, f)
    os.replace(tmp, out_path)
    return info


def load(path: str) -> dict:
    with open(path) as f:
        try:
            doc = json.load(f)
        except ValueError as e:
            raise ValueError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or "traceEvents" not in doc:
        raise ValueError("no traceEvents")
    return doc


def _actors(doc: dict) -> tuple[dict[int, str], list[str]]:
    names = {}
    for e in doc["traceEvents"]:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            names[e["pid"]] = e["args"]["name"].replace(" (killed)", "")
    killed = doc.get("otherData", {}).get("ksm_proto", {}).get("killed", [])
    return names, killed


def _pcts(xs) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(xs, dtype=np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 2), "p90": round(float(np.percentile(a, 90)), 2),
            "p99": round(float(np.percentile(a, 99)), 2), "max": round(float(a.max()), 2)}


def summary(path: str) -> dict:
    doc = load(path)
    names, killed = _actors(doc)
    sends, recvs = {}, {}
    per_type: dict[str, dict] = {}
    faults: dict[str, dict[str, list]] = {}
    for e in doc["traceEvents"]:
        if e.get("cat") == "msg":
            a = e["args"]
            me = names.get(e["pid"], str(e["pid"]))
            if a["dir"] == "send":
                t = per_type.setdefault(e["name"], {"count": 0, "entries": 0, "lat": []})
                t["count"] += 1
                t["entries"] += a["n"]
                sends[(me, a["peer"], e["name"], a["corr"])] = e["ts"]
            else:
                recvs[(a["peer"], me, e["name"], a["corr"])] = e["ts"]
        elif e.get("cat") == "span" and e["name"] in ("secondary_fault", "cow_fault"):
            me = names.get(e["pid"], str(e["pid"]))
            faults.setdefault(me, {"secondary_fault": [], "cow_fault": []})[e["name"]].append(e["dur"])
    rtt: dict[str, list] = {}
    for (a, b, typ, corr), ts in sends.items():
        r = recvs.get((a, b, typ, corr))
        if r is not None:
            per_type[typ]["lat"].append(r - ts)
        if typ not in REPLIES:
            for rep in REPLIES:
                back = recvs.get((b, a, rep, corr))
                if back is not None:
                    rtt.setdefault(typ, []).append(back - ts)
                    break
    out = {"messages": {t: {"count": v["count"], "entries": v["entries"], "latency_us": _pcts(v["lat"])}
                        for t, v in sorted(per_type.items())},
           "round_trip_us": {t: {"count": len(v), **_pcts(v)} for t, v in sorted(rtt.items())},
           "faults": {vm: {k: {"count": len(v), **_pcts(v)} for k, v in d.items()} for vm, d in sorted(faults.items())},
           "killed": killed}
    return out


def format_summary(d: dict) -> str:
    lines = ["messages (sent)            count   entries    p50 us    p90 us    p99 us    max us"]
    for t, v in d["messages"].items():
        L = v["latency_us"]
        lines.append(f"  {t:22s} {v['count']:>7} {v['entries']:>9} " +
                     " ".join(f"{'-' if L[k] is None else L[k]:>9}" for k in ("p50", "p90", "p99", "max")))
    if d["round_trip_us"]:
        lines.append("request -> reply            count    p50 us    p90 us    p99 us    max us")
        for t, v in d["round_trip_us"].items():
            lines.append(f"  {t:22s} {v['count']:>7} " +
                         " ".join(f"{v[k]:>9}" for k in ("p50", "p90", "p99", "max")))
    if d["faults"]:
        lines.append("faults per VM              secondary (p50/p99 us)        cow (p50/p99 us)")
        for vm, v in d["faults"].items():
            s, c = v["secondary_fault"], v["cow_fault"]
            lines.append(f"  {vm:22s} {s['count']:>7} ({s['p50']}/{s['p99']})      {c['count']:>7} ({c['p50']}/{c['p99']})")
    if d["killed"]:
        lines.append(f"killed actors: {', '.join(d['killed'])}")
    return "\n".join(lines)


def check(path: str) -> list[str]:
    """Grammar violations, first one first ("" list: every secondary MMU is fine)."""
    doc = load(path)
    names, killed = _actors(doc)
    seqs: dict[tuple, list] = {}
    for e in doc["traceEvents"]:
        if e.get("cat") == "msg" and e["name"] in NOTIFIER and e["args"]["dir"] == "recv":
            me = names.get(e["pid"], str(e["pid"]))
            seqs.setdefault((me, e["args"]["mm"], e["args"]["sub"]), []).append((e["ts"], e["name"]))
    out = []
    for (actor, mm, sub), seq in sorted(seqs.items()):
        state = "new"
        where = f"{actor} mm {mm} secondary MMU {sub}"
        bad = None
        for ts, typ in seq:
            if state == "new":
                nxt = "idle" if typ == "REGISTER" else None
                want = "REGISTER"
            elif state == "idle":
                nxt = {"START": "started", "CHANGE_PTE": "idle", "INVALIDATE_PAGE": "idle", "CLEAR_YOUNG": "idle",
                       "RELEASE": "released"}.get(typ)
                want = "START, CHANGE_PTE, INVALIDATE_PAGE, CLEAR_YOUNG or RELEASE"
            elif state == "started":
                nxt = {"CHANGE_PTE": "changed", "END": "idle"}.get(typ)
                want = "CHANGE_PTE or END"
            elif state == "changed":
                nxt = "idle" if typ == "END" else None
                want = "END"
            else:
                nxt, want = None, "nothing after RELEASE"
            if nxt is None:
                bad = (ts, f"{where}: at {ts:.3f} us got {typ}, expected {want}")
                break
            state = nxt
        if bad is None and state != "released" and actor not in killed:
            bad = (seq[-1][0], f"{where}: trace ends (at {seq[-1][0]:.3f} us) before RELEASE")
        if bad:
            out.append(bad)
    return [b for _, b in sorted(out)]
