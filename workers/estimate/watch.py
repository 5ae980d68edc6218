"""`ksm-proto estimate --watch`: how much KSM reaches on memory that keeps changing, how soon, at what CPU.

This module owns the estimate over time.  It reads the sources again and again (the
same readers as the snapshot estimate, memsource.py; the same page digest, pagehash.py),
tells the pages that hold still from those that change, predicts what the kernel's
ksmd does with them at given knobs, and can check that prediction against the real
KSM running live on copies of the same pages (--verify-kernel).

The rules it predicts from (mm/ksm.c, smart_scan=0)
---------------------------------------------------
- ksmd visits the pages of every mergeable area in a fixed order (its mm_slot list:
  the order the processes registered, here the sources' order; then address order),
  `pages_to_scan` calls of scan_get_next_rmap_item() per batch, one page each; the call
  after a scan's last page ends the scan and the batch (ksmd_cost.batches_per_scan).
  Between batches it sleeps msecs_to_jiffies(sleep_millisecs) jiffies, which the timer
  wheel stretches to the next tick after that (ksmd_cost.batch_cycle).
- A page's checksum is recorded on its first visit; it is only compared with others
  on a later visit that finds the same checksum.  So a page that changes within one
  full-scan period never merges and stays counted in pages_volatile; a duplicate that
  holds still merges on the second full scan, at its place in the scan order (the
  first copy of each content waits in the unstable tree, the next copy merges with
  it, later copies join the KSM page: max_page_sharing as in content_outcome()).
- With advisor_mode=scan-time, pages_to_scan changes at the end of every full scan
  by workers/mm/ksm/advisor.py (the kernel's scan_time_advisor(), also run by the scanner).
- ksmd's CPU per page is this machine's, measured once (workers/estimate/ksmd_cost.py): a first
  visit, a volatile page, a unique page, a merge, a KSM page visited again; the first
  pages of a batch cost more (ksmd wakes with cold caches: ksmd_cost.cold_factor; a first visit
  by its own measured cold_first), but for a volatile page's visit, which costs the same in any
  batch (measured; ksmd_cost.batch_cpu_s).

Stable or volatile, from the watch
----------------------------------
Samples are `--interval` seconds apart.  For a scan period T the probability that a
page's checksum differs between two visits T apart is read off the samples directly:
the fraction of sample pairs whose digests differ at the two lags on either side of
T / interval, interpolated linearly (for a page rewritten every R seconds it is
min(1, T / R), linear in T).  Below one interval that is T * its change rate, except for
a page that changed in every interval: it may change faster than the samples tell, and
counts volatile at any T.  For a T longer than the watch it is extrapolated from the
page's change rate (changes * T / watch, at most 1).  pages_volatile is the sum of these probabilities; pages whose
probability is below one half count as holding still, and the savings are those of
the snapshot estimate's rules on the contents they hold at the last sample.  A page
that was not there in a sample (not yet touched, freed, or its process gone) counts
as changed.  A source that exits during the watch is reported; its pages are not in
the end state and the rest is counted.

Predicted and measured
----------------------
full_scan_seconds is the mean full scan over the last half of the prediction's horizon
(the --watch length, or --verify-seconds), seconds_to_50 / seconds_to_90 the time from
run=1 until pages_sharing reaches that share of its final value, ksmd_cpu_share
ksmd's CPU time over the horizon divided by the horizon.  --verify-kernel loads each
source's pages (as last read) into a helper process of its own (an anonymous private
mapping, MADV_MERGEABLE, registered in the sources' order) that keeps rewriting every
page at the rate the watch saw it change (a page seen changing in every interval: every
5 ms, since it may change faster than the samples tell), runs the kernel's KSM with the same knobs for
the horizon (smart_scan=0), samples its counters, and puts the same quantities beside
the predicted ones.  The knobs are restored afterwards and run is left 0
(kernel_ksm.KernelKSM); it is refused while KSM is in use (run != 0, pages_shared != 0
or another process registered with KSM).
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from proto.knobs import DEFAULTS, check_knob
from proto.layout import PAGE_SIZE
from workers.mm.ksm import advisor as adv
from workers.estimate import ksmd_cost
from workers.estimate.estimate import EXIT_KERNEL, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, KNOB_NAMES, content_outcome, \
    current_knobs, open_sources
from workers.estimate.memsource import PidSource, Source, SourceError
from workers.mm.ksm.pagehash import ZERO_DIGEST, default_threads, start_page_digests

__all__ = ["Watch", "watch", "classify", "Plan", "plan_pages", "simulate", "predict", "verify_live", "cli",
           "add_watch_arguments", "SCAN_KNOBS"]

SCAN_KNOBS = ("pages_to_scan", "sleep_millisecs", "advisor_mode", "advisor_target_scan_time", "advisor_max_cpu",
              "advisor_min_pages_to_scan", "advisor_max_pages_to_scan")
BUF_PAGES = 1024
CURVE_POINTS = 400


# ---------------------------------------------------------------------------- watching
@dataclass
class _Series:
    """One source's samples: page ids (address or file offset) and their digests, per sample."""
    src: Source
    times: list = field(default_factory=list)
    ids: list = field(default_factory=list)          # per sample: int64 array, sorted
    digs: list = field(default_factory=list)         # per sample: (n, 2) int64
    last_pages: np.ndarray | None = None             # the last sample's bytes (keep=True)
    gone_at: float | None = None


class Watch:
    """Read every source once per sample(); the pages' digests are kept, the bytes only of the last sample."""

    def __init__(self, sources: list[Source], threads: int | None = None, keep_pages: bool = False):
        self.series = [_Series(s) for s in sources]
        self.threads = threads or default_threads()
        self.keep = keep_pages
        self.buf = np.empty(BUF_PAGES * PAGE_SIZE, np.uint8)
        self.t0: float | None = None
        self.problems: list[str] = []

    def _read(self, s: _Series) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        src = s.src
        if isinstance(src, PidSource):
            src.areas = []
            try:
                src.open()                               # the areas as they are now
            except SourceError:
                return None
        src.pages, src.runs, src.skipped = 0, [], {}
        digs, keep, zeros = [], [], 0
        for piece in src.read(lambda: self.buf):
            n = piece.npages
            if piece.kind == "zero":
                digs.append(np.tile(ZERO_DIGEST, (n, 1)))
                if self.keep:
                    keep.append(np.zeros((n, PAGE_SIZE), np.uint8))
                zeros += n
                continue
            mem = self.buf if piece.buf is None else piece.buf
            d, _ = start_page_digests(mem, n, self.threads)()
            digs.append(d)
            if self.keep:
                keep.append(np.frombuffer(mem, np.uint8, n * PAGE_SIZE).reshape(n, PAGE_SIZE).copy())
        if getattr(src, "gone", False):
            return None
        n = sum(len(d) for d in digs)
        if isinstance(src, PidSource):
            ids = np.empty(n, np.int64)
            for i, o, k in src.runs:
                ids[i:i + k] = o + np.arange(k, dtype=np.int64) * PAGE_SIZE
        else:
            ids = np.arange(n, dtype=np.int64) * PAGE_SIZE
        dig = np.concatenate(digs) if digs else np.empty((0, 2), np.int64)
        pages = (np.concatenate(keep) if keep else np.empty((0, PAGE_SIZE), np.uint8)) if self.keep else None
        order = np.argsort(ids, kind="stable")
        if len(order) and np.any(order != np.arange(len(order))):
            ids, dig = ids[order], dig[order]
            pages = pages[order] if pages is not None else None
        return ids, dig, pages

    def sample(self) -> float:
        """Read every source still there once; returns the sample's time (seconds since the first)."""
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
        t = now - self.t0
        for s in self.series:
            if s.gone_at is not None:
                continue
            try:
                got = self._read(s)
            except SourceError as e:
                got = None
                s.src.problems.append(str(e))
            if got is None:
                s.gone_at = t
                self.problems.append(f"{s.src.name}: exited during the watch (at {t:.1f} s, after "
                                     f"{len(s.times)} samples); its pages are left out of the end state, "
                                     f"the rest counted")
                continue
            ids, dig, pages = got
            s.times.append(t)
            s.ids.append(ids)
            s.digs.append(dig)
            if self.keep:
                s.last_pages = pages
        return t

    def alive(self) -> list[_Series]:
        return [s for s in self.series if s.gone_at is None and s.times]


def watch(sources: list[Source], seconds: float, interval: float, threads: int | None = None,
          keep_pages: bool = False, progress=None) -> Watch:
    """Sample the sources every `interval` seconds for `seconds` seconds (at least two samples)."""
    w = Watch(sources, threads, keep_pages)
    start = time.monotonic()
    k = 0
    while True:
        w.sample()
        k += 1
        if progress:
            progress(k)
        if not w.alive():
            break
        nxt = start + k * interval
        if nxt > start + seconds + 1e-9 and k >= 2:
            break
        time.sleep(max(0.0, nxt - time.monotonic()))
    return w


def _matrix(s: _Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids of the last sample, digests (S, n) of those pages in every sample, present mask (S, n))."""
    ids = s.ids[-1]
    S, n = len(s.ids), len(ids)
    d = np.zeros((S, n), np.int64)
    present = np.zeros((S, n), bool)
    for j, (ij, dj) in enumerate(zip(s.ids, s.digs)):
        pos = np.searchsorted(ij, ids)
        ok = pos < len(ij)
        ok[ok] = ij[pos[ok]] == ids[ok]
        d[j, ok] = dj[pos[ok], 0] ^ dj[pos[ok], 1]
        present[j] = ok
    return ids, d, present


def _changed(d: np.ndarray, present: np.ndarray, lag: int) -> np.ndarray:
    """(S - lag, n): whether each page differs between samples j and j + lag (absent counts as changed)."""
    return (d[lag:] != d[:-lag]) | ~present[lag:] | ~present[:-lag]


def classify(w: Watch, scan_seconds: float, upto: int | None = None) -> dict:
    """Per page of the last sample (of each source still there): the probability it changes between two visits
    `scan_seconds` apart (T).  Returns {"p": [per source array], "rate": [...], "saturated": [changed in every
    interval: it may change faster than the samples tell], "lag": m (T / interval, rounded), "dt": interval}.
    p is the fraction of sample pairs that differ at the lags on either side of T / interval, interpolated
    linearly (as min(1, T / R) is for a page rewritten every R seconds); below one interval p = T * rate, or 1 for a
    saturated page; beyond the watch, rate * T (at most 1).
    `upto`: use only the first `upto` samples (for the series over the watch)."""
    out_p, out_rate, out_sat, lags = [], [], [], []
    dt = None
    for s in w.alive():
        ids, d, present = _matrix(s)
        times = np.array(s.times)
        if upto is not None:
            d, present, times = d[:upto], present[:upto], times[:upto]
        S = len(times)
        span = float(times[-1] - times[0]) if S > 1 else 0.0
        dt = span / (S - 1) if S > 1 else float("inf")
        n = d.shape[1]
        if S < 2:
            out_p.append(np.zeros(n))
            out_rate.append(np.zeros(n))
            out_sat.append(np.zeros(n, bool))
            continue
        ch1 = _changed(d, present, 1)
        changes = ch1.sum(axis=0)
        rate = changes / span
        sat = changes == S - 1
        x = max(0.0, float(scan_seconds) / dt)
        m0, f = int(np.floor(x)), x - np.floor(x)
        if m0 + (f > 0) <= S - 1:
            # between the lags m0 and m0 + 1: linear, as a page rewritten every R seconds gives min(1, T / R);
            # below one interval from p(lag 0) = 0, i.e. T * rate, except a page changed in every interval
            # (it may change faster than the samples tell: volatile at any T, as --verify-kernel rewrites it)
            lo = np.where(sat, 1.0, 0.0) if m0 == 0 else _changed(d, present, m0).mean(axis=0)
            p = lo if f == 0 else (1 - f) * lo + f * _changed(d, present, m0 + 1).mean(axis=0)
        else:
            p = np.minimum(1.0, rate * scan_seconds)
        out_p.append(np.asarray(p, float))
        out_rate.append(rate)
        out_sat.append(sat)
        lags.append(max(1, int(round(x))))
    return {"p": out_p, "rate": out_rate, "saturated": out_sat, "lag": max(lags) if lags else 1, "dt": dt}


# ---------------------------------------------------------------------------- what ksmd does with them
@dataclass
class Plan:
    """The pages in ksmd's scan order: expected cost of each per visit, and where the merges are."""
    n: int
    cost_first: np.ndarray       # scan 1
    cost_second: np.ndarray      # scan 2 (the merges)
    cost_steady: np.ndarray      # scans 3 on
    merge_pos: np.ndarray        # sorted positions of the pages that merge on scan 2 (copies 2.. of a content)
    counters: dict               # at stability on the stable part: pages_shared, pages_sharing, pages_unshared,
                                 # pages_volatile (expected), ksm_zero_pages, bytes_saved
    flat: np.ndarray | None = None   # the part of scans 2 on's costs a cold batch does not raise: the volatile
                                     # visits (ksmd_cost.batch_cpu_s); None: none


def plan_pages(w: Watch, cls: dict, cost: dict, knobs: dict) -> Plan:
    """The scan-order plan of the pages at the last sample, given their volatility `cls`."""
    digs, ps = [], []
    for s, p in zip(w.alive(), cls["p"]):
        digs.append(s.digs[-1])
        ps.append(p)
    dig = np.concatenate(digs) if digs else np.empty((0, 2), np.int64)
    p = np.concatenate(ps) if ps else np.empty(0)
    n = len(p)
    stable = p < 0.5
    zero = (dig[:, 0] == ZERO_DIGEST[0]) & (dig[:, 1] == ZERO_DIGEST[1])
    kzero = stable & zero if knobs.get("use_zero_pages") else np.zeros(n, bool)
    cand = np.flatnonzero(stable & ~kzero)
    # contents among the stable pages, in scan order: rank of each copy
    rank = np.zeros(n, np.int64)
    shared = sharing = unshared = 0
    if len(cand):
        keys = dig[cand]
        _, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        order = np.argsort(inv, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        r = np.empty(len(cand), np.int64)
        r[order] = np.arange(len(cand)) - np.repeat(starts, counts)
        rank[cand] = r
        mps = int(knobs.get("max_page_sharing", DEFAULTS["max_page_sharing"]))
        for c, k in zip(*np.unique(counts, return_counts=True)):
            sh, _, _, u = content_outcome(int(c), mps)
            shared += sh * int(k)
            unshared += (1 if u >= 0 else 0) * int(k)
            sharing += (int(c) - sh - (1 if u >= 0 else 0)) * int(k)
    dup = np.zeros(n, bool)
    if len(cand):
        multi = np.zeros(n, bool)
        _, inv, counts = np.unique(dig[cand], axis=0, return_inverse=True, return_counts=True)
        multi[cand] = counts[inv.reshape(-1)] > 1
        dup = multi
    merge_pos = np.flatnonzero(dup & (rank >= 1))
    vol_cost = p * cost["volatile"] + (1 - p) * cost["unique"]
    first = np.full(n, cost["first"])
    second = np.where(dup, np.where(rank >= 1, cost["merge"], cost["unique"]), np.where(stable, cost["unique"], vol_cost))
    steady = np.where(dup, cost["ksm"], np.where(stable, cost["unique"], vol_cost))
    second[kzero] = cost["merge"]
    steady[kzero] = cost["ksm"]
    counters = {"pages_shared": shared, "pages_sharing": sharing, "pages_unshared": unshared,
                "pages_volatile": int(round(float(p.sum()))), "ksm_zero_pages": int(kzero.sum()),
                "pages_stable": int(stable.sum()), "pages": n}
    counters["bytes_saved"] = (sharing + counters["ksm_zero_pages"]) * PAGE_SIZE
    flat = np.where(dup | stable | kzero, 0.0, p * cost["volatile"])
    return Plan(n, first, second, steady, merge_pos, counters, flat)


def simulate(plan: Plan, knobs: dict, cost: dict, horizon: float, runtime0_ns: int = 0) -> dict:
    """ksmd from run=1 for `horizon` seconds on the plan, batch by batch (pure).

    A batch makes pages_to_scan calls of scan_get_next_rmap_item(): one page each, and the call after the last
    page ends the full scan (and the batch; an empty batch when the scan's pages ran out on the batch's last
    call).  Its CPU and wall time: ksmd_cost.batch_cpu_s() and batch_cycle().  Returns the predicted curve
    [(t, pages_sharing, full_scans, pages_to_scan)] (t: the end of each batch's work), the time and ksmd's
    CPU at each full scan's end, the CPU time, and the times to 50% / 90% of the final pages_sharing.
    """
    n = plan.n
    pre = [np.concatenate([[0.0], np.cumsum(c)]) for c in (plan.cost_first, plan.cost_second, plan.cost_steady)]
    pre_flat = None if plan.flat is None else np.concatenate([[0.0], np.cumsum(plan.flat)])
    sleep_ms = int(knobs["sleep_millisecs"])
    cost_first = {**cost, "cold": cost.get("cold_first", cost.get("cold", 0.0))}    # scan 1: first visits only
    advisor_on = int(knobs.get("advisor_mode", 0)) == 1
    if advisor_on:
        ctx, pts = adv.advisor_start_pages(int(knobs["advisor_min_pages_to_scan"]))
    else:
        ctx, pts = None, int(knobs["pages_to_scan"])
    final = plan.counters["pages_sharing"]
    nmerge = len(plan.merge_pos)
    t, cpu, pos, scans, scan_start = 0.0, 0.0, 0, 0, 0.0
    merged = 0
    curve = [(0.0, 0, 0, pts)]
    scan_ends, scan_starts, scan_cpu, pts_seq = [], [], [], [pts]
    t50 = t90 = None
    end = cpu_h = 0.0
    if n == 0 or pts == 0:                           # nothing to scan, or pages_to_scan 0: ksmd sleeps forever
        return {"curve": curve, "scan_ends": [], "scan_starts": [], "scan_cpu": [], "cpu_seconds": 0.0,
                "seconds_to_50": None, "seconds_to_90": None, "pages_to_scan": pts_seq, "elapsed": max(horizon, 0.0),
                "cpu_by_horizon": 0.0}
    while t < horizon:                               # t: this batch's start
        if pos == 0:
            scan_start = t                           # advisor_start_scan(): the scan's first call
            scan_starts.append(t)
        k = min(pts, n - pos)
        ends = pos + k == n and k < pts              # room left in the batch for the call that ends the scan
        dcpu = ksmd_cost.batch_cpu_s(pre[min(scans, 2)], pos, k, cost if scans else cost_first,
                                     pre_flat if scans else None)
        if scans == 1 and nmerge:
            merged = int(np.searchsorted(plan.merge_pos, pos + k))
        work, cycle = ksmd_cost.batch_cycle(dcpu, sleep_ms, cost)
        end = t + work
        cpu_h = cpu + (dcpu if end <= horizon or work <= 0 else dcpu * (horizon - t) / work)   # ksmd's CPU by then
        cpu += dcpu
        pos += k
        sharing = round(final * merged / nmerge) if nmerge else 0
        if final:
            if t50 is None and sharing >= 0.5 * final:
                t50 = end
            if t90 is None and sharing >= 0.9 * final:
                t90 = end
        if ends:
            scans += 1
            pos = 0
            scan_ends.append(end)
            scan_cpu.append(cpu)
            if advisor_on:
                pts, _ = adv.scan_time_advisor(
                    ctx, pts, int((end - scan_start) * 1000), int(runtime0_ns + cpu * 1e9),
                    target_scan_time=int(knobs["advisor_target_scan_time"]), max_cpu=int(knobs["advisor_max_cpu"]),
                    max_pages_to_scan=int(knobs["advisor_max_pages_to_scan"]))
                pts_seq.append(pts)
        curve.append((end, sharing, scans, pts))
        t += cycle
        if pts == 0:                                 # the advisor never sets 0, but a sleeping ksmd stays asleep
            t = max(t, horizon)
            break
    if len(curve) > CURVE_POINTS:
        idx = np.unique(np.linspace(0, len(curve) - 1, CURVE_POINTS).astype(int))
        curve = [curve[i] for i in idx]
    return {"curve": [(round(a, 4), int(b), int(c), int(d)) for a, b, c, d in curve], "scan_ends": scan_ends,
            "scan_starts": scan_starts, "scan_cpu": scan_cpu, "cpu_seconds": cpu, "cpu_by_horizon": cpu_h,
            "seconds_to_50": t50, "seconds_to_90": t90, "pages_to_scan": pts_seq, "elapsed": t}


def _scan_period(sim: dict) -> float | None:
    """The mean full scan over the scans that end in the last half of the run (the last one if only one)."""
    e = sim["scan_ends"]
    if len(e) >= 2:
        late = [t for t in e if t >= e[-1] / 2]
        if len(late) >= 2:
            return (late[-1] - late[0]) / (len(late) - 1)
        return e[-1] - e[-2]
    return e[0] if e else None


def predict(w: Watch, knobs: dict, cost: dict, horizon: float, runtime0_ns: int = 0) -> dict:
    """Classify at the scan period the knobs give (twice: the period depends on the classes), plan, simulate."""
    cls = classify(w, 1e-9)                           # a first plan at the shortest lag
    sim = None
    for _ in range(4):
        plan = plan_pages(w, cls, cost, knobs)
        sim = simulate(plan, knobs, cost, max(horizon, 1e-3), runtime0_ns)
        T = _scan_period(sim)
        if T is None:                                 # not one full scan in the horizon: run it longer
            sim_long = simulate(plan, knobs, cost, max(horizon, 1.0) * 50, runtime0_ns)
            T = _scan_period(sim_long) or max(horizon, 1.0) * 50
        new = classify(w, T)
        if all(np.allclose(a, b, rtol=0, atol=1e-3) for a, b in zip(new["p"], cls["p"])):
            break
        cls = new
    T = _scan_period(sim)
    out = dict(plan.counters)
    out.update({
        "full_scan_seconds": round(T, 4) if T is not None else None,
        "first_full_scan_seconds": round(sim["scan_ends"][0], 4) if sim["scan_ends"] else None,
        "full_scans": len(sim["scan_ends"]),
        "seconds_to_50": None if sim["seconds_to_50"] is None else round(sim["seconds_to_50"], 4),
        "seconds_to_90": None if sim["seconds_to_90"] is None else round(sim["seconds_to_90"], 4),
        "ksmd_cpu_share": round(float(sim["cpu_by_horizon"]) / max(horizon, 1e-9), 5),     # as the kernel's is measured
        "scan_cpu_seconds": [round(float(c), 6) for c in sim["scan_cpu"][:50]],   # ksmd's CPU by each full scan's end
        "horizon_seconds": horizon,
        "pages_to_scan_sequence": sim["pages_to_scan"][:50],
        "curve": [{"t": a, "pages_sharing": b, "bytes_saved": b * PAGE_SIZE, "full_scans": c, "pages_to_scan": d}
                  for a, b, c, d in sim["curve"]],
        "classified_at_lag": cls["lag"],
    })
    return out


# ---------------------------------------------------------------------------- the kernel, live
class _Helper:
    """A forked child: one anonymous private mapping holding `pages`, MADV_MERGEABLE, whose pages it keeps
    rewriting, page i every period[i] seconds (inf: never), until its pipe closes."""

    def __init__(self, pages: np.ndarray, period: np.ndarray, seed: int, ready_timeout: float = 60.0):
        self.pid = None
        self._go = None
        r_ready, w_ready = os.pipe()
        r_go, w_go = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                os.close(r_ready)
                os.close(w_go)
                for fd in _Helper.fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                from workers.oracle.kernel_ksm import _LOCK
                if _LOCK.fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(_LOCK.fd)
                code = self._child(pages, period, seed, w_ready, r_go)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w_ready)
        os.close(r_go)
        self.pid, self._go = pid, w_go
        _Helper.fds.add(w_go)
        try:
            ok = select.select([r_ready], [], [], ready_timeout)[0]
            msg = os.read(r_ready, 4096) if ok else b""
            if not msg.startswith(b"r"):
                raise RuntimeError(f"helper process {pid} not ready: {msg[1:].decode(errors='replace') or 'timeout'}")
        except BaseException:
            self.close()
            raise
        finally:
            os.close(r_ready)

    fds: set = set()
    TICK = 0.005

    @staticmethod
    def _child(pages, period, seed, w_ready, r_go) -> int:
        n = len(pages)
        try:
            m = mmap.mmap(-1, max(1, n) * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
            if hasattr(mmap, "MADV_NOHUGEPAGE"):
                m.madvise(mmap.MADV_NOHUGEPAGE)
            view = np.frombuffer(m, np.uint8)
            if n:
                view[:n * PAGE_SIZE] = pages.reshape(-1)
            m.madvise(mmap.MADV_MERGEABLE)
        except Exception as e:          # noqa: BLE001 - reported to the parent
            os.write(w_ready, b"e" + str(e).encode()[:1000])
            return 1
        os.write(w_ready, b"r")
        os.close(w_ready)
        words = view[:n * PAGE_SIZE].view(np.uint64).reshape(n, PAGE_SIZE // 8) if n else None
        moving = np.flatnonzero(np.isfinite(period))
        rng = np.random.default_rng(seed)
        per = period[moving]
        due = time.monotonic() + rng.random(len(moving)) * per
        stamp = np.uint64(1)
        while not select.select([r_go], [], [], _Helper.TICK if len(moving) else None)[0]:
            if not len(moving):
                continue
            now = time.monotonic()
            hit = np.flatnonzero(due <= now)
            if len(hit):
                rows = moving[hit]
                stamp += np.uint64(1)
                words[rows, 1] = stamp                       # new bytes: a new checksum
                words[rows, 2] = rows.astype(np.uint64)
                due[hit] += per[hit] * np.ceil((now - due[hit]) / per[hit] + 1e-9).clip(1)
        return 0

    def close(self, timeout: float = 10.0) -> None:
        from workers.oracle.kernel_ksm import _reap
        if self._go is not None:
            _Helper.fds.discard(self._go)
            with contextlib.suppress(OSError):
                os.close(self._go)
            self._go = None
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        if not _reap(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _reap(pid, 10.0)


def _kernel_knobs(knobs: dict) -> dict:
    out = {"smart_scan": 0, "max_page_sharing": knobs["max_page_sharing"], "use_zero_pages": knobs["use_zero_pages"],
           "merge_across_nodes": knobs["merge_across_nodes"], "sleep_millisecs": knobs["sleep_millisecs"]}
    if int(knobs.get("advisor_mode", 0)) == 1:
        out = {"advisor_mode": "scan-time", **out}
        for k in ("advisor_target_scan_time", "advisor_max_cpu", "advisor_min_pages_to_scan",
                  "advisor_max_pages_to_scan"):
            out[k] = knobs[k]
    else:
        out["pages_to_scan"] = knobs["pages_to_scan"]
    return out


def in_use_reason() -> str | None:
    """Why the kernel's KSM may not be borrowed now (run != 0, pages merged, another process registered), or None."""
    from workers.oracle import kernel_ksm
    run = kernel_ksm.read_knob("run")
    st = kernel_ksm.KernelKSM.stats()
    if run != "0" or st.get("pages_shared") or st.get("pages_sharing"):
        return (f"KSM is in use on this machine (run={run}, pages_shared={st.get('pages_shared')}, "
                f"pages_sharing={st.get('pages_sharing')}): --verify-kernel would stop and unmerge it; not done")
    others = kernel_ksm.other_ksm_processes()
    if others:
        return (f"{len(others)} other process(es) are registered with KSM (pids {sorted(others)[:8]}): the kernel "
                f"would scan their pages too; not done")
    return None


def verify_live(w: Watch, cls: dict, knobs: dict, cost: dict, horizon: float, sample_s: float = 0.02,
                progress=None) -> dict:
    """The same pages in helper processes, rewritten at the rates seen, merged live by the kernel's KSM for
    `horizon` seconds; the prediction (made just before run=1) and the kernel's counters over time."""
    from workers.oracle import kernel_ksm
    ok, why = kernel_ksm.available()
    if not ok:
        return {"error": f"kernel KSM not usable here: {why}"}
    pid = ksmd_cost.ksmd_pid()
    if pid is None:
        return {"error": "no ksmd kernel thread found"}
    helpers: list[_Helper] = []
    with kernel_ksm.KernelKSM() as k:
        reason = in_use_reason()
        if reason:
            return {"error": reason}
        try:
            kernel_ksm._start(k, _kernel_knobs(knobs), 60)
            for i, (s, rate, sat) in enumerate(zip(w.alive(), cls["rate"], cls["saturated"])):
                period = np.where(rate > 0, 1.0 / np.maximum(rate, 1e-12), np.inf)
                period[sat] = _Helper.TICK                  # seen changing every interval: as fast as it goes
                helpers.append(_Helper(s.last_pages, period, seed=i))
            runtime0 = ksmd_cost.ksmd_runtime_ns(pid) or 0
            pred = predict(w, knobs, cost, horizon, runtime0)
            samples = []
            t0 = time.monotonic()
            k.set(run=1)
            while True:
                t = time.monotonic() - t0
                st = kernel_ksm.KernelKSM.stats()
                st["pages_to_scan"] = int(kernel_ksm.read_knob("pages_to_scan"))
                st["ksmd_runtime_ns"] = (ksmd_cost.ksmd_runtime_ns(pid) or runtime0) - runtime0
                samples.append({"t": round(t, 4), **{c: st.get(c) for c in (
                    "pages_sharing", "pages_shared", "pages_unshared", "pages_volatile", "full_scans",
                    "pages_to_scan", "ksmd_runtime_ns")}})
                if t >= horizon:
                    break
                time.sleep(max(0.0, min(sample_s, horizon - t)))
            kernel_ksm._write("run", 0)
        finally:
            with kernel_ksm._sigint_deferred():
                try:
                    kernel_ksm._write("run", 0)
                finally:
                    for h in helpers:
                        h.close()
                    k.unmerge_all(60)
    meas = measured(samples, horizon)
    return {"predicted": pred, "measured": meas, "samples": samples, "compare": compare(pred, meas),
            "ksmd_runtime0_ns": runtime0}


def measured(samples: list[dict], horizon: float) -> dict:
    """The kernel's values as the prediction gives them, from counters sampled over time."""
    final = samples[-1]["pages_sharing"]
    t50 = next((s["t"] for s in samples if final and s["pages_sharing"] >= 0.5 * final), None)
    t90 = next((s["t"] for s in samples if final and s["pages_sharing"] >= 0.9 * final), None)
    # the mean full scan over the last half of the run (samples 20 ms apart may see several scans end)
    half = [s for s in samples if s["t"] >= samples[-1]["t"] / 2]
    first = next((b for a, b in zip(half, half[1:]) if b["full_scans"] > a["full_scans"]), None)
    last = next((b for a, b in zip(half[::-1][1:], half[::-1]) if b["full_scans"] > a["full_scans"]), None)
    period = None
    if first is not None and last is not None and last["full_scans"] > first["full_scans"]:
        period = (last["t"] - first["t"]) / (last["full_scans"] - first["full_scans"])
    tail = [s["pages_volatile"] for s in samples if s["t"] >= 0.75 * samples[-1]["t"]]
    return {"pages_sharing": final, "pages_shared": samples[-1]["pages_shared"],
            "pages_unshared": samples[-1]["pages_unshared"], "bytes_saved": final * PAGE_SIZE,
            "pages_volatile": int(round(float(np.mean(tail)))) if tail else samples[-1]["pages_volatile"],
            "full_scans": samples[-1]["full_scans"],
            "full_scan_seconds": round(period, 4) if period is not None else None,
            "seconds_to_50": t50, "seconds_to_90": t90,
            "ksmd_cpu_share": round(samples[-1]["ksmd_runtime_ns"] / 1e9 / max(samples[-1]["t"], 1e-9), 5),
            "pages_to_scan_sequence": sorted({s["pages_to_scan"] for s in samples}, key=[
                s["pages_to_scan"] for s in samples].index)[:50]}


TOLERANCES = {"bytes_saved": 0.10, "pages_volatile": 0.20, "seconds_to_90": 0.25, "ksmd_cpu_share": 0.25}


def compare(pred: dict, meas: dict) -> dict:
    """Relative error (predicted - measured) / measured of each compared value, and whether it is within TOLERANCES."""
    out = {}
    for k in ("bytes_saved", "pages_volatile", "seconds_to_50", "seconds_to_90", "full_scan_seconds",
              "ksmd_cpu_share"):
        p, m = pred.get(k), meas.get(k)
        if p is None or m is None:
            out[k] = {"predicted": p, "measured": m, "error": None}
            continue
        err = (p - m) / m if m else (0.0 if p == m else float("inf"))
        row = {"predicted": p, "measured": m, "error": round(err, 4)}
        if k in TOLERANCES:
            row["tolerance"] = TOLERANCES[k]
            row["ok"] = abs(err) <= TOLERANCES[k]
        out[k] = row
    return out


# ---------------------------------------------------------------------------- output
def series(w: Watch, knobs: dict, cost: dict, T: float, every: int = 1) -> list[dict]:
    """How pages_volatile and the savings on the stable part move over the watch (classified at period T)."""
    out = []
    S = max((len(s.times) for s in w.alive()), default=0)
    for j in range(2, S + 1, every):
        cls = classify(w, T, upto=j)
        plan = plan_pages(w, cls, cost, knobs)
        t = max(s.times[min(j, len(s.times)) - 1] for s in w.alive())
        out.append({"t": round(t, 3), "pages_volatile": plan.counters["pages_volatile"],
                    "pages_sharing": plan.counters["pages_sharing"], "bytes_saved": plan.counters["bytes_saved"]})
    return out


def render_plain(res: dict, out=sys.stdout) -> None:
    p = lambda s="": print(s, file=out)  # noqa: E731
    pr = res["predicted"]
    k = res["knobs"]
    mode = (f"advisor_mode=scan-time target={k['advisor_target_scan_time']}s max_cpu={k['advisor_max_cpu']}%"
            if k.get("advisor_mode") else f"pages_to_scan={k['pages_to_scan']} sleep_millisecs={k['sleep_millisecs']}")
    p(f"KSM estimate over {res['watch_seconds']:.1f} s ({res['samples']} samples, {res['interval']} s apart), "
      f"{pr['pages']:,} pages; {mode}; ksmd cost from {res['cost_from']}")
    p(f"  pages_volatile        {pr['pages_volatile']:>12,}   (change within a full scan of {pr['full_scan_seconds']} s)")
    p(f"  pages that hold still {pr['pages_stable']:>12,}")
    p(f"  pages_shared          {pr['pages_shared']:>12,}")
    p(f"  pages_sharing         {pr['pages_sharing']:>12,}   saved {pr['bytes_saved'] / 2**20:,.1f} MiB")
    p(f"  pages_unshared        {pr['pages_unshared']:>12,}")
    p(f"  full scan             {pr['full_scan_seconds']} s (the first {pr['first_full_scan_seconds']} s)")
    p(f"  50% / 90% of savings  {pr['seconds_to_50']} s / {pr['seconds_to_90']} s after run=1")
    p(f"  ksmd CPU              {100 * pr['ksmd_cpu_share']:.1f}% of a CPU over {pr['horizon_seconds']} s")
    if res.get("series"):
        a, b = res["series"][0], res["series"][-1]
        p(f"  over the watch: pages_volatile {a['pages_volatile']:,} -> {b['pages_volatile']:,}, "
          f"pages_sharing {a['pages_sharing']:,} -> {b['pages_sharing']:,}")
    kv = res.get("kernel")
    if kv and "compare" in kv:
        p("  predicted vs the kernel, live:")
        for key, row in kv["compare"].items():
            e = "" if row["error"] is None else f"{100 * row['error']:+.1f}%"
            ok = "" if "ok" not in row else ("  ok" if row["ok"] else f"  OUTSIDE {100 * row['tolerance']:.0f}%")
            p(f"    {key:20s} {str(row['predicted']):>14} {str(row['measured']):>14} {e:>8}{ok}")
        p("    t (s)   predicted pages_sharing   kernel pages_sharing")
        pc = kv["predicted"]["curve"]
        for s in kv["samples"][::max(1, len(kv["samples"]) // 20)]:
            i = max(0, int(np.searchsorted([c["t"] for c in pc], s["t"], side="right")) - 1)
            p(f"    {s['t']:6.2f}  {pc[i]['pages_sharing']:>22,}   {s['pages_sharing']:>20,}")


def plot(res: dict, path: str) -> None:
    """Predicted and (with --verify-kernel) measured pages_sharing and pages_volatile over time, one PNG."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'ksm-proto[bench]' (or pip install matplotlib)") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kv = res.get("kernel") or {}
    pred = kv.get("predicted") or res["predicted"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax1.step([c["t"] for c in pred["curve"]], [c["pages_sharing"] for c in pred["curve"]], where="post",
             label="predicted", color="#2a7")
    if kv.get("samples"):
        ax1.plot([s["t"] for s in kv["samples"]], [s["pages_sharing"] for s in kv["samples"]], label="kernel",
                 color="#c44", alpha=.8)
        ax2.plot([s["t"] for s in kv["samples"]], [s["pages_volatile"] for s in kv["samples"]],
                 label="kernel pages_volatile", color="#c44", alpha=.8)
    ax2.axhline(pred["pages_volatile"], color="#2a7", ls="--", label="predicted pages_volatile")
    if res.get("series"):
        ax2.plot([s["t"] for s in res["series"]], [s["pages_volatile"] for s in res["series"]], color="#27a",
                 label="pages_volatile as the watch went (watch clock)")
    for v, name in ((pred.get("seconds_to_90"), "90% predicted"),):
        if v is not None:
            ax1.axvline(v, color="#2a7", ls=":", label=name)
    ax1.set_xlabel("seconds after run=1")
    ax1.set_ylabel("pages_sharing")
    ax1.set_title("savings over time")
    ax2.set_xlabel("seconds")
    ax2.set_ylabel("pages")
    ax2.set_title("pages_volatile")
    for a in (ax1, ax2):
        a.grid(alpha=.3)
        a.legend(fontsize=8)
    k = res["knobs"]
    mode = (f"advisor scan-time, target {k['advisor_target_scan_time']} s" if k.get("advisor_mode")
            else f"pages_to_scan={k['pages_to_scan']}, sleep_millisecs={k['sleep_millisecs']}")
    fig.suptitle(f"ksm-proto estimate --watch: {mode}; ksmd CPU predicted {100 * pred['ksmd_cpu_share']:.1f}%"
                 + (f", kernel {100 * kv['measured']['ksmd_cpu_share']:.1f}%" if kv.get("measured") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- the command
def add_watch_arguments(p) -> None:
    """The `estimate` subcommand's arguments for --watch (added by estimate.add_arguments)."""
    g = p.add_argument_group("over time (--watch)")
    g.add_argument("--watch", type=float, metavar="SECONDS",
                   help="read the sources repeatedly for SECONDS: pages_volatile, time to the savings, ksmd CPU")
    g.add_argument("--interval", type=float, default=None, metavar="S",
                   help="seconds between two reads of the sources (default: watch/40, at most 1)")
    g.add_argument("--pages-to-scan", type=int, metavar="N", help="ksmd's pages_to_scan (default: this machine's)")
    g.add_argument("--sleep-millisecs", type=int, metavar="M", help="ksmd's sleep_millisecs (default: this machine's)")
    g.add_argument("--advisor-mode", choices=["none", "scan-time"], help="the scan-time advisor sets pages_to_scan")
    g.add_argument("--advisor-target-scan-time", type=int, metavar="S", help="advisor_target_scan_time (200)")
    g.add_argument("--advisor-max-cpu", type=int, metavar="P", help="advisor_max_cpu, percent (70)")
    g.add_argument("--advisor-min-pages-to-scan", type=int, metavar="N", help="advisor_min_pages_to_scan (500)")
    g.add_argument("--advisor-max-pages-to-scan", type=int, metavar="N", help="advisor_max_pages_to_scan (30000)")
    g.add_argument("--ksmd-cost", metavar="FILE.json",
                   help="ksmd's per-page costs (see workers/estimate/ksmd_cost.py); default: measured once, cached in "
                        "~/.cache/ksm-proto/")
    g.add_argument("--recalibrate", action="store_true", help="measure ksmd's per-page costs again now")
    g.add_argument("--verify-seconds", type=float, metavar="S",
                   help="with --verify-kernel: how long the kernel runs (default: the --watch length)")


def scan_knobs(a) -> tuple[dict, list[str]]:
    """The merge knobs (as the snapshot estimate takes them) and the scan knobs: given, else this machine's,
    else the kernel's defaults.  Returns (knobs, problems)."""
    knobs, _ = current_knobs()
    bad = []
    for name in SCAN_KNOBS:
        v = None
        try:
            from workers.oracle import kernel_ksm
            v = kernel_ksm.read_knob(name)
        except (OSError, ImportError):
            pass
        try:
            knobs[name] = check_knob(name, v) if v is not None else DEFAULTS[name]
        except OSError:
            knobs[name] = DEFAULTS[name]
        if name == "pages_to_scan" and knobs.get("advisor_mode"):
            knobs[name] = DEFAULTS[name]
    given_advisor = getattr(a, "advisor_mode", None)
    if given_advisor is not None:
        knobs["advisor_mode"] = check_knob("advisor_mode", given_advisor)
    elif getattr(a, "pages_to_scan", None) is not None:
        knobs["advisor_mode"] = 0
    for name in KNOB_NAMES + SCAN_KNOBS:
        if name == "advisor_mode":
            continue
        v = getattr(a, name, None)
        if v is None:
            continue
        try:
            knobs[name] = check_knob(name, v)
        except OSError as e:
            bad.append(f"--{name.replace('_', '-')}: {e.strerror}")
    if knobs.get("advisor_mode") and getattr(a, "pages_to_scan", None) is not None:
        bad.append("--pages-to-scan and --advisor-mode scan-time: the advisor sets pages_to_scan itself "
                   "(the kernel refuses a write to it, EINVAL); give one")
    return knobs, bad


def cli(a) -> int:
    """`ksm-proto estimate --watch ...`; returns the exit status (as estimate.cli)."""
    err = sys.stderr
    say = lambda m: print(f"ksm-proto estimate: {m}", file=err)  # noqa: E731
    if not a.sources:
        say("nothing to estimate: give --pid, --all-pids, --file or --dir")
        return EXIT_USAGE
    if a.watch <= 0:
        say(f"--watch must be a positive number of seconds, not {a.watch}")
        return EXIT_USAGE
    interval = a.interval if a.interval is not None else min(1.0, a.watch / 40)
    if interval <= 0 or interval > a.watch:
        say(f"--interval must be above 0 and at most the --watch length ({a.watch} s), not {interval}")
        return EXIT_USAGE
    if a.verify_seconds is not None and a.verify_seconds <= 0:
        say(f"--verify-seconds must be a positive number of seconds, not {a.verify_seconds}")
        return EXIT_USAGE
    knobs, bad = scan_knobs(a)
    for b in bad:
        say(b)
    if bad:
        return EXIT_USAGE
    try:
        cost, cost_from = ksmd_cost.get_cost(a.ksmd_cost, a.recalibrate,
                                             progress=(lambda m: say(m)) if err.isatty() else None)
    except (ValueError, RuntimeError, OSError, TimeoutError) as e:
        say(f"ksmd's per-page cost: {e} (give one with --ksmd-cost FILE.json)")
        return EXIT_USAGE
    problems: list[str] = []
    sources = open_sources(a.sources, {**knobs, "all_mappings": a.all_mappings,
                                       "only_mergeable": a.only_mergeable}, problems)
    for p in problems:
        say(p)
    if not sources:
        say("no readable source")
        return EXIT_USAGE
    try:
        w = watch(sources, a.watch, interval, a.threads, keep_pages=a.verify_kernel)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    for p in w.problems:
        say(p)
    problems += w.problems
    if not w.alive():
        say("every source exited during the watch: nothing left to estimate")
        return EXIT_USAGE
    S = max(len(s.times) for s in w.alive())
    horizon = a.verify_seconds or a.watch
    runtime0 = ksmd_cost.ksmd_runtime_ns() or 0
    pred = predict(w, knobs, cost, horizon, runtime0 if knobs.get("advisor_mode") else 0)
    dt = classify(w, 1.0)["dt"]
    notes = []
    if pred["full_scan_seconds"] is not None and dt and pred["full_scan_seconds"] < dt:
        notes.append(f"the full scan ({pred['full_scan_seconds']} s) is shorter than --interval ({dt:.3g} s): pages "
                     f"that change between two samples are all counted volatile; a shorter --interval tells more")
        say(f"note: {notes[-1]}")
    res = {"watch_seconds": round(max(s.times[-1] for s in w.alive()), 3), "samples": S, "interval": interval,
           "knobs": knobs, "cost": {k: cost[k] for k in ksmd_cost.COST_KEYS}, "cost_from": cost_from,
           "sources": [{"name": s.src.name, "pages": int(len(s.ids[-1])) if s.times else 0,
                        "gone_at": s.gone_at} for s in w.series],
           "predicted": pred, "problems": problems, "notes": notes}
    for k in ("pages_volatile", "full_scan_seconds", "seconds_to_50", "seconds_to_90", "ksmd_cpu_share", "curve",
              "pages_shared", "pages_sharing", "pages_unshared", "bytes_saved"):
        res[k] = pred[k]
    res["series"] = series(w, knobs, cost, pred["full_scan_seconds"] or a.watch, every=max(1, S // 40))
    status = EXIT_PARTIAL if problems else EXIT_OK
    if a.verify_kernel:
        if err.isatty():
            say(f"the real KSM runs on the same pages for {horizon} s...")
        try:
            res["kernel"] = verify_live(w, classify(w, pred["full_scan_seconds"] or a.watch), knobs, cost, horizon)
        except (OSError, TimeoutError, RuntimeError) as e:
            res["kernel"] = {"error": str(e)}
        if "error" in res["kernel"]:
            say(f"--verify-kernel: {res['kernel']['error']}")
            status = EXIT_KERNEL
    if a.plot:
        try:
            plot(res, a.plot)
        except (RuntimeError, OSError) as e:
            say(f"--plot: {e}")
            status = status or EXIT_USAGE
    if a.json:
        print(json.dumps(res))
    else:
        render_plain(res)
    return status
