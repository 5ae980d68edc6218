"""The web view's server: loopback only, one unguessable token, JSON deltas over Server-Sent Events.

    WebServer(source, port=8765, read_only=False).start() -> url     (stop() when done)
    LiveSource(machine)       what a running Machine shows, read from its shared memory
    ReplaySource(trace_file)  a recorded trace (ksm-proto run --trace) replayed on the same page

Requests (every one carries ?token=... or the X-KSM-Token header, else 403):
    GET  /                 the page (static/index.html; the token is written into it)
    GET  /app.js           the page's script
    GET  /api/state        one full snapshot as JSON (what the page shows; tests and scripts)
    GET  /api/events       Server-Sent Events: the first event a full snapshot, then only what changed
    POST /api/control      {"action": "knobs" | "write" | "madvise" | "fork", ...} (none with --read-only)

The snapshot is taken at most every `interval` seconds however many pages are open, in the
server's threads of the supervisor process: the frame table and the PTE arrays are read from
shared memory with numpy (a copy, diffed against what each page last got: only changed cells
go out), the counters from the stats segment; the VMs' notifier logs (a control call each) at
most every `msg_interval` seconds.  Nothing is written to the run except by /api/control.
A bad request gets {"error": "..."} with a 4xx status; an unexpected failure a 500 with the
exception's message, never a traceback.
"""
from __future__ import annotations

import base64
import errno
import hmac
import json
import os
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np

from proto import MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE
from proto.layout import (FRAME_ANON, FRAME_KSM, FRAME_ZERO, PAGE_SHIFT, PTE_PRESENT, PTE_WRITE, USER_BASE,
                          MMView)

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans",
            "pages_scanned", "ksm_zero_pages", "stable_node_chains", "stable_node_dups", "general_profit")
KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages")
ADVICE = {"MADV_MERGEABLE": MADV_MERGEABLE, "MADV_UNMERGEABLE": MADV_UNMERGEABLE, "MADV_DONTNEED": MADV_DONTNEED}
# a frame's cell: 0 free, 1 anonymous, 2 the zero page, 2 + mapcount (clamped to 253) a KSM page
CELL_FREE, CELL_ANON, CELL_ZERO, CELL_KSM = 0, 1, 2, 3
TAIL = 64                       # messages per secondary MMU fetched at each poll
MAX_BODY = 1 << 16
HEARTBEAT = 2.0                 # seconds between events when nothing changes


class RequestError(Exception):
    """A request the server refuses: (HTTP status, message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def frame_cells(flags: np.ndarray, mapcount: np.ndarray) -> np.ndarray:
    """The cell code of every frame (uint8) from the frame table's flags and mapcounts."""
    cells = np.zeros(len(flags), dtype=np.uint8)
    cells[(flags & FRAME_ANON) != 0] = CELL_ANON
    ksm = (flags & FRAME_KSM) != 0
    cells[ksm] = (2 + np.clip(mapcount[ksm], 1, 253)).astype(np.uint8)
    cells[(flags & FRAME_ZERO) != 0] = CELL_ZERO
    return cells


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


# ============================================================================ sources
class LiveSource:
    """A running Machine, read-only through its shared memory (controls through its own API)."""

    kind = "live"

    def __init__(self, machine, msg_interval: float = 0.25):
        self.m = machine
        self.msg_interval = msg_interval
        self._views: dict[int, tuple[object, MMView]] = {}
        self._msgs: dict = {}
        self._msgs_at = 0.0
        self._lock = threading.Lock()
        self.actions = 0            # control actions done (the run's read-back check is void after a write)

    def info(self) -> dict:
        return {"source": "live", "mode": self.m.mode, "nframes": self.m.nframes}

    def frames(self) -> np.ndarray:
        ft = self.m.ft
        return frame_cells(ft.flags.copy(), ft.mapcount.copy())

    def _view(self, mm_id: int):
        seg = self.m.mm_segs.get(mm_id)
        if seg is None:
            return None
        cached = self._views.get(mm_id)
        if cached is None or cached[0] is not seg[0]:
            cached = self._views[mm_id] = (seg[0], MMView(seg[0]))
        return cached[1]

    def vms(self) -> dict:
        """{name: (pfn int32 array of the pages up to the last VMA's end (-1: none), ksm_stat)}."""
        out = {}
        for name, vm in list(self.m.vms.items()):
            if not vm.alive:
                continue
            mv = self._view(vm.mm_id)
            if mv is None:
                continue
            vmas = mv.vma_list()
            used = max(((e - USER_BASE) >> PAGE_SHIFT for _, e, _ in vmas), default=0)
            pte = mv.pte[:min(used, mv.npages)].copy()
            pfn = np.where((pte & np.uint64(PTE_PRESENT)) != 0, pte >> np.uint64(PAGE_SHIFT),
                           np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)
            try:
                stat = vm.ksm_stat()
            except OSError:
                continue
            out[name] = (pfn, stat)
        return out

    def counters(self) -> dict:
        s = self.m.ksm.stats()
        return {k: int(s[k]) for k in COUNTERS}

    def knobs(self) -> dict:
        return {k: int(self.m.ksm.get(k)) for k in KNOBS}

    def messages(self) -> dict:
        """{"subs": {vm: {sub: {"n", "tail"}}}, "counts": {type: n}, "cow_faults": {vm: n}}, polled
        from the VMs at most every msg_interval seconds (each poll is a control call to each VM)."""
        with self._lock:
            if time.monotonic() - self._msgs_at >= self.msg_interval:
                subs, counts, cow = {}, {}, {}
                for name, vm in list(self.m.vms.items()):
                    if not vm.alive:
                        continue
                    try:
                        subs[name] = vm.msg_tail(TAIL)
                        st = vm.stats()
                    except (OSError, TimeoutError, RuntimeError):
                        continue
                    cow[name] = st["cow_faults"]
                    for k, v in st["msgs"].items():
                        counts[k] = counts.get(k, 0) + v
                self._msgs = {"subs": subs, "counts": counts, "cow_faults": cow}
                self._msgs_at = time.monotonic()
            return self._msgs

    # ------------------------------------------------------------------ controls
    def _vm(self, req: dict):
        name = req.get("vm")
        vm = self.m.vms.get(name) if isinstance(name, str) else None
        if vm is None or not vm.alive:
            raise RequestError(404, f"no running VM named {name!r} (running: {', '.join(self.m.vms) or 'none'})")
        return vm

    @staticmethod
    def _int(req: dict, key: str, lo: int, hi: int, default=None) -> int:
        v = req.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise RequestError(400, f"{key} must be an integer in [{lo}, {hi}], not {v!r}")
        return v

    def control(self, req: dict) -> dict:
        action = req.get("action")
        if action == "knobs":
            knobs = req.get("knobs")
            if not isinstance(knobs, dict) or not knobs:
                raise RequestError(400, "knobs must be an object of knob: value, e.g. {\"run\": 1}")
            bad = [k for k in knobs if k not in KNOBS]
            if bad:
                raise RequestError(400, f"unknown knob(s) {', '.join(map(repr, bad))}; the page sets "
                                        f"{', '.join(KNOBS)}")
            self.m.ksm.set(**knobs)
            self.actions += 1
            return {"ok": True, "knobs": self.knobs()}
        if action == "write":
            vm = self._vm(req)
            page = self._int(req, "page", 0, vm.npages - 1)
            value = self._int(req, "value", 0, 255)
            vm.write(USER_BASE + page * PAGE_SIZE, bytes([value]) * PAGE_SIZE)
            self.actions += 1
            return {"ok": True, "vm": vm.name, "page": page, "pfn": vm.pagemap(USER_BASE + page * PAGE_SIZE, 1)[0]}
        if action == "madvise":
            vm = self._vm(req)
            page = self._int(req, "page", 0, vm.npages - 1)
            npages = self._int(req, "npages", 1, vm.npages - page, 1)
            advice = req.get("advice")
            if advice not in ADVICE:
                raise RequestError(400, f"advice must be one of {', '.join(ADVICE)}, not {advice!r}")
            vm.madvise(USER_BASE + page * PAGE_SIZE, npages * PAGE_SIZE, ADVICE[advice])
            self.actions += 1
            return {"ok": True}
        if action == "fork":
            vm = self._vm(req)
            name = req.get("name")
            if not isinstance(name, str) or not name or name in self.m.vms:
                raise RequestError(400, f"fork needs a new VM name, not {name!r}")
            child = vm.fork(name)
            self.actions += 1
            return {"ok": True, "vm": child.name}
        raise RequestError(400, f"unknown action {action!r}: one of knobs, write, madvise, fork")


class ReplaySource:
    """A merged trace (ksm-proto run --trace FILE) replayed at `speed` times its own pace.

    What a trace holds is less than the shared memory: the messages (each with the PTEs of its first
    page entry) and ksmd's counter samples.  The page tables are rebuilt from the PTEs the messages
    carry (a merge's CHANGE_PTE from ksmd, a COW's FAULT_REPLY), the frames from the page tables
    (a frame mapped from ksmd's messages is drawn KSM, shaded by how many pages map it), so in the
    wrapped and invalidate modes, whose merges carry no PTE, the merges do not show on the frames."""

    kind = "replay"

    def __init__(self, path: str, speed: float = 1.0):
        from workers.tools import tracetool
        doc = tracetool.load(path)
        self.path = path
        self.speed = speed
        self.msgs = [x for x in tracetool.messages(doc) if x["dir"] == "send" or x["actor"] == x["peer"]]
        self.samples = sorted((e["ts"], e["name"], e["args"].get("value", 0)) for e in doc["traceEvents"]
                              if e.get("ph") == "C")
        self.mode = doc["otherData"]["ksm_proto"].get("mode") or self._infer_mode()
        self.end = max([x["ts"] for x in self.msgs] + [s[0] for s in self.samples] + [0.0])
        self.t_start = None
        self._lock = threading.Lock()
        self._reset()

    def _infer_mode(self) -> str:
        """The notifier mode, from what ksmd sent (a trace does not record it)."""
        sent = {x["type"] for x in self.msgs if x["actor"].startswith("ksmd")}
        if "CHANGE_PTE" in sent:
            return "wrapped (inferred)" if "START" in sent else "change_pte (inferred)"
        return "invalidate (inferred)" if "START" in sent else "unknown (no merge in the trace)"

    def _reset(self) -> None:
        self.i_msg = self.i_sample = 0
        self.pages: dict[str, dict[int, tuple[int, bool]]] = {}     # vm -> page -> (pfn, from ksmd)
        self.ctr = {k: 0 for k in COUNTERS}
        self.subs: dict[str, dict[str, dict]] = {}
        self.counts: dict[str, int] = {}
        self.seq = 0
        self.now = 0.0

    def info(self) -> dict:
        return {"source": "replay", "mode": self.mode, "nframes": self.nframes(), "file": os.path.basename(self.path),
                "t_us": round(self.now, 1), "end_us": round(self.end, 1)}

    def advance(self) -> None:
        with self._lock:
            if self.t_start is None:
                self.t_start = time.monotonic()
            t = (time.monotonic() - self.t_start) * 1e6 * self.speed
            while self.i_msg < len(self.msgs) and self.msgs[self.i_msg]["ts"] <= t:
                self._apply(self.msgs[self.i_msg])
                self.i_msg += 1
            while self.i_sample < len(self.samples) and self.samples[self.i_sample][0] <= t:
                _, name, v = self.samples[self.i_sample]
                if name in self.ctr:
                    self.ctr[name] = int(v)
                self.i_sample += 1
            self.now = min(t, self.end)

    def _apply(self, x: dict) -> None:
        actor, peer, typ = x["actor"], x["peer"], x["type"]
        vm = peer if not actor.startswith("vm:") else actor
        vm = vm[3:] if vm.startswith("vm:") else vm
        self.counts[typ] = self.counts.get(typ, 0) + x["n"] if typ not in ("REGISTER", "RELEASE") else \
            self.counts.get(typ, 0) + 1
        lane = self.subs.setdefault(vm, {}).setdefault(actor, {"n": 0, "tail": []})
        lane["n"] += 1
        way = "local" if actor == peer else (f"{actor} -> {vm}" if not actor.startswith("vm:") else f"{vm} -> {peer}")
        lane["tail"] = (lane["tail"] + [f"{typ} x{x['n']} {way}" if x["n"] > 1 else f"{typ} {way}"])[-TAIL:]
        pte = x["new_pte"]
        if x["addr"] >= USER_BASE and pte & PTE_PRESENT and typ in ("CHANGE_PTE", "FAULT_REPLY"):
            page = (x["addr"] - USER_BASE) >> PAGE_SHIFT
            self.pages.setdefault(vm, {})[page] = (pte >> PAGE_SHIFT,
                                                   actor.startswith("ksmd") and not pte & PTE_WRITE)

    def nframes(self) -> int:
        top = max((p for pages in self.pages.values() for p, _ in pages.values()), default=0)
        return max(1024, 1 << int(top + 1).bit_length())

    def frames(self) -> np.ndarray:
        with self._lock:
            cells = np.zeros(self.nframes(), dtype=np.uint8)
            maps = np.zeros(len(cells), dtype=np.int64)
            ksm = np.zeros(len(cells), dtype=bool)
            for pages in self.pages.values():
                for pfn, k in pages.values():
                    maps[pfn] += 1
                    ksm[pfn] |= k
            cells[maps > 0] = CELL_ANON
            cells[ksm] = (2 + np.clip(maps[ksm], 1, 253)).astype(np.uint8)
            cells[0] = CELL_ZERO
            return cells

    def vms(self) -> dict:
        with self._lock:
            out = {}
            for vm, pages in self.pages.items():
                a = np.full(max(pages) + 1 if pages else 0, -1, dtype=np.int32)
                for p, (pfn, _) in pages.items():
                    a[p] = pfn
                out[vm] = (a, {"ksm_merging_pages": int(sum(1 for _, k in pages.values() if k))})
            return out

    def counters(self) -> dict:
        return dict(self.ctr)

    def knobs(self) -> dict:
        return {}

    def messages(self) -> dict:
        with self._lock:
            return {"subs": {vm: {s: dict(v, tail=list(v["tail"])) for s, v in subs.items()}
                             for vm, subs in self.subs.items()},
                    "counts": dict(self.counts), "cow_faults": {}}

    def control(self, req: dict) -> dict:
        raise RequestError(403, "a replayed trace has no controls")


# ============================================================================ snapshots and deltas
class Snapshots:
    """One snapshot of a source at most every `interval` seconds, shared by every open page."""

    def __init__(self, source, interval: float):
        self.source = source
        self.interval = interval
        self.lock = threading.Lock()
        self.snap = None
        self.at = 0.0
        self.taken = 0
        self.t0 = time.monotonic()

    def get(self) -> dict:
        with self.lock:
            if self.snap is None or time.monotonic() - self.at >= 0.8 * self.interval:
                src = self.source
                if hasattr(src, "advance"):
                    src.advance()
                self.snap = {"t": round(time.monotonic() - self.t0, 3), "info": src.info(),
                             "frames": src.frames(), "vms": src.vms(), "counters": src.counters(),
                             "knobs": src.knobs(), "msgs": src.messages()}
                self.at = time.monotonic()
                self.taken += 1
            return self.snap


class Client:
    """What one open page last received; delta() returns only what changed since."""

    def __init__(self, read_only: bool):
        self.read_only = read_only
        self.frames = None
        self.vms: dict[str, np.ndarray] = {}
        self.seen: dict[tuple[str, str], int] = {}
        self.cow: dict[str, int] = {}

    @staticmethod
    def _cells(new: np.ndarray, old, full_at: int):
        if old is None or len(old) != len(new):
            return {"full": _b64(new)}
        idx = np.flatnonzero(new != old)
        if len(idx) > full_at:
            return {"full": _b64(new)}
        return {"idx": idx.tolist(), "val": new[idx].tolist()}

    def delta(self, snap: dict) -> dict:
        cells = snap["frames"]
        out = {"t": snap["t"], "info": snap["info"], "read_only": self.read_only, "counters": snap["counters"],
               "knobs": snap["knobs"]}
        out["frames"] = self._cells(cells, self.frames, max(64, len(cells) // 8))
        self.frames = cells
        vms = {}
        for name, (pfn, stat) in snap["vms"].items():
            d = self._cells(pfn, self.vms.get(name), max(64, len(pfn) // 8))
            d["ksm_stat"] = stat
            d["npages"] = len(pfn)
            vms[name] = d
            self.vms[name] = pfn
        out["vms"] = vms
        out["gone"] = [n for n in list(self.vms) if n not in snap["vms"]]
        for n in out["gone"]:
            del self.vms[n]
        rows = []
        msgs = snap["msgs"]
        for vm, subs in msgs.get("subs", {}).items():
            for sub, lane in subs.items():
                n, tail = lane["n"], lane["tail"]
                new = n - self.seen.get((vm, sub), 0)
                if new < 0:
                    new = len(tail)
                take = tail[len(tail) - min(new, len(tail)):]
                rows += [{"vm": vm, "sub": sub, "seq": n - len(take) + 1 + k, "type": t} for k, t in enumerate(take)]
                self.seen[(vm, sub)] = n
        for vm, n in msgs.get("cow_faults", {}).items():    # COW faults: a FAULT to faultd, its FAULT_REPLY
            new = n - self.cow.get(vm, 0)
            if new > 0 and vm in self.cow:
                rows.append({"vm": vm, "sub": "faultd", "seq": n,
                             "type": "FAULT/REPLY" + (f" x{new}" if new > 1 else "")})
            self.cow[vm] = n
        out["msgs"] = rows
        out["msg_counts"] = dict(msgs.get("counts", {}))
        if msgs.get("cow_faults"):
            out["msg_counts"]["FAULT (COW)"] = sum(msgs["cow_faults"].values())
        out["cow_faults"] = msgs.get("cow_faults", {})
        return out


def full_state(snap: dict, read_only: bool) -> dict:
    """A whole snapshot as plain JSON (GET /api/state): frames and page tables as lists."""
    cells = snap["frames"]
    kinds = {"free": int(np.count_nonzero(cells == CELL_FREE)), "anon": int(np.count_nonzero(cells == CELL_ANON)),
             "zero": int(np.count_nonzero(cells == CELL_ZERO)), "ksm": int(np.count_nonzero(cells >= CELL_KSM))}
    msgs = snap["msgs"]
    return {"t": snap["t"], "info": snap["info"], "read_only": read_only, "counters": snap["counters"],
            "knobs": snap["knobs"], "cells": kinds, "frames": cells.tolist(),
            "vms": {n: {"pfn": [None if p < 0 else int(p) for p in pfn.tolist()], "ksm_stat": st}
                    for n, (pfn, st) in snap["vms"].items()},
            "msgs": msgs.get("subs", {}), "msg_counts": msgs.get("counts", {}),
            "cow_faults": msgs.get("cow_faults", {})}


# ============================================================================ HTTP
class _Handler(BaseHTTPRequestHandler):
    server_version = "ksm-proto-web"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):     # quiet: the terminal shows the run
        pass

    # ---------------------------------------------------------------- replies
    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self.close_connection = True        # (a refused request's body may be left unread)
        self._json(status, {"error": message, "status": status})

    def _authorized(self, query: dict) -> bool:
        web = self.server.web
        given = self.headers.get("X-KSM-Token") or (query.get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), web.token.encode())

    def _guard(self, method):
        try:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if not self._authorized(query):
                raise RequestError(403, "forbidden: this page needs the token that `ksm-proto run --web` printed "
                                        "on its terminal (open the URL it printed, with ?token=...)")
            method(url.path, query)
        except RequestError as e:
            self._error(e.status, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except OSError as e:        # the run refused it (an errno: EINVAL, EFAULT, ESRCH...)
            self._error(400, f"refused: {e.strerror or e}" if e.errno else f"refused: {e}")
        except (ValueError, TypeError, KeyError, TimeoutError, RuntimeError) as e:
            self._error(400, f"refused: {type(e).__name__}: {e}")
        except Exception as e:      # never a traceback to the page
            try:
                self._error(500, f"internal error: {type(e).__name__}: {e}")
            except OSError:
                pass

    def do_GET(self):
        self._guard(self._get)

    def do_HEAD(self):
        self._guard(self._get)

    def do_POST(self):
        self._guard(self._post)

    def do_PUT(self):
        self._guard(self._other)

    def do_DELETE(self):
        self._guard(self._other)

    def _other(self, path, query):
        raise RequestError(405, f"method {self.command} not allowed: GET the page, POST /api/control")

    def _get(self, path: str, query: dict) -> None:
        web = self.server.web
        if path in ("/", "/index.html"):
            with open(os.path.join(STATIC, "index.html")) as f:
                page = f.read().replace("{{TOKEN}}", web.token)
            self._send(200, page.encode(), "text/html; charset=utf-8")
        elif path == "/app.js":
            with open(os.path.join(STATIC, "app.js"), "rb") as f:
                self._send(200, f.read(), "text/javascript; charset=utf-8")
        elif path == "/api/state":
            self._json(200, full_state(web.snapshots.get(), web.read_only))
        elif path == "/api/events":
            if self.command == "HEAD":
                raise RequestError(405, "HEAD of an event stream: GET it")
            self._events()
        else:
            raise RequestError(404, f"no such page {path!r}: GET /, /api/state, /api/events; POST /api/control")

    def _events(self) -> None:
        web = self.server.web
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        client = Client(web.read_only)
        with web.clients_lock:
            web.clients += 1
        last, sent_at = None, 0.0
        try:
            while not web.stopping.is_set():
                t = time.monotonic()
                d = client.delta(web.snapshots.get())
                same = {k: v for k, v in d.items() if k not in ("t", "info")}
                if same != last or t - sent_at >= HEARTBEAT:    # nothing new: the page is left idle
                    self.wfile.write(b"data: " + json.dumps(d, separators=(",", ":")).encode() + b"\n\n")
                    self.wfile.flush()
                    web.events_sent += 1
                    sent_at = t
                last = same
                web.stopping.wait(max(0.0, web.interval - (time.monotonic() - t)))
        finally:
            with web.clients_lock:
                web.clients -= 1

    def _post(self, path: str, query: dict) -> None:
        web = self.server.web
        if path != "/api/control":
            raise RequestError(404, f"no such action {path!r}: POST /api/control")
        if web.read_only:
            raise RequestError(403, "read-only: a replayed trace has no controls" if web.source.kind == "replay"
                               else "read-only: this page was served with --read-only, it has no controls")
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise RequestError(400, "bad Content-Length") from None
        if not 0 < n <= MAX_BODY:
            raise RequestError(400 if n <= 0 else 413, f"the body must be a JSON object of 1 to {MAX_BODY} bytes")
        body = self.rfile.read(n)
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the body is not JSON: {e}") from None
        if not isinstance(req, dict):
            raise RequestError(400, "the body must be a JSON object, e.g. {\"action\": \"knobs\", \"knobs\": {\"run\": 1}}")
        with web.control_lock:
            self._json(200, web.source.control(req))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class WebServer:
    """The web view of one source on 127.0.0.1:port (0: any free port); start() returns the URL."""

    def __init__(self, source, port: int = 8765, read_only: bool = False, interval: float = 0.1,
                 token: str | None = None):
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be 0 to 65535, not {port!r}")
        self.source = source
        self.port = port
        self.read_only = read_only or source.kind == "replay"
        self.interval = interval
        self.token = token or secrets.token_urlsafe(24)
        self.snapshots = Snapshots(source, interval)
        self.stopping = threading.Event()
        self.control_lock = threading.Lock()
        self.clients_lock = threading.Lock()
        self.clients = 0
        self.events_sent = 0
        self.httpd = None
        self.thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/?token={self.token}"

    def start(self) -> str:
        try:
            self.httpd = _Server(("127.0.0.1", self.port), _Handler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise OSError(e.errno, f"port {self.port} on 127.0.0.1 is in use: pass --port N "
                                       f"(or --port 0 for any free one)") from None
            raise
        self.httpd.web = self
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="ksm-proto-web", daemon=True)
        self.thread.start()
        return self.url

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: the event streams end, the socket closes (before the Machine goes)."""
        self.stopping.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            deadline = time.monotonic() + timeout
            while self.clients and time.monotonic() < deadline:
                time.sleep(0.01)
        if self.thread is not None:
            self.thread.join(timeout)

    def __enter__(self) -> "WebServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(source, port: int = 8765, read_only: bool = False, interval: float = 0.1) -> WebServer:
    """Start a WebServer on source; the caller stops it."""
    web = WebServer(source, port, read_only, interval)
    web.start()
    return web
