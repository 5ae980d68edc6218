"""What one page costs this machine's kernel ksmd, measured once and cached: the estimate's time/CPU input.

This module owns the calibration that `ksm-proto estimate --watch` predicts ksmd's
time and CPU from (workers/estimate/watch.py), and the arithmetic of one batch's CPU and
wall time that the prediction and the calibration share (batch_cpu_s, batch_cycle).
The kernel's ksmd is run on regions of known pages in this process
(kernel_ksm.KernelVM, MADV_MERGEABLE), and its own CPU time is read from
/proc/<ksmd>/schedstat (the runtime task_sched_runtime() gives, which the scan-time
advisor uses too, in ns) at the end of each full scan.  Per page, in seconds of ksmd CPU:

    first    a page's first visit (an rmap item is made, its checksum recorded)
    volatile a page whose checksum changed since the last visit, being rewritten meanwhile
             (measured in place: pages rewritten every 5 ms, as --verify-kernel's helpers do)
    unique   a page that holds still but matches nothing (checksum, both trees searched,
             the page waits in the unstable tree)
    merge    a page merged on this visit (with the unstable tree's page or a KSM page)
    ksm      a KSM page visited again (its stable tree lookup finds itself)

and how a batch adds to that (measured in place, sleep_millisecs 20, on a region of unique
and KSM pages whose steady state is known, at pages_to_scan 100 to 2000 and one batch a scan,
twice each):

    cold, cold_pages  page i of a batch costs (1 + cold * exp(-i / cold_pages)) times its warm
             cost (cold_factor), a volatile page excepted (batch_cpu_s): between two batches
             ksmd sleeps and the rest of the machine runs, so what it walks (trees, rmap items,
             page tables) is out of the caches when it wakes, and it warms them as it goes.
             On this 2-core VM a full scan in batches of 100 pages costs some 1.3 to 1.7
             times the same scan in one batch, in batches of 1000 some 1.0 to 1.5 times: a fixed CPU cost per batch (the optional
             batch_cpu), which made 100-page batches too dear, does not fit that.
    cold_first  the same for a page's first visit (its rmap item made, its checksum taken), measured
             on its own: a fresh region's first scan in batches of 100 (first visits warm less than
             a unique page's tree searches: on the demo 1.2-1.35 times hot, not 1.6-1.7)
    kappa    ksmd's wall time per second of its CPU within a batch (above 1 when it has to
             wait for a CPU on a busy machine)
    batch    ksmd's wake-up latency after its timer's tick, in seconds

The wall time between two batches follows the kernel's timer arithmetic (batch_cycle):
ksmd sleeps with schedule_timeout(msecs_to_jiffies(sleep_millisecs)), and the timer
wheel fires a timer of J jiffies on the (J + 1)th tick after the one it was armed in
(kernel/time/timer.c, calc_index(): a timer must never fire early, so it rounds up by
one granule).  So at HZ 250 a batch shorter than a tick starts every 6 ticks, 24 ms, at
sleep_millisecs 20, not every 20 ms.  A full scan ends on the call after its last page
(scan_get_next_rmap_item() returns NULL), so a scan takes ceil((pages + 1) / pages_to_scan)
batches: one more, empty, when pages_to_scan divides the pages.

The page costs are first measured hot (sleep_millisecs 0, one batch per scan: their
ratios), then scaled, with cold and cold_pages, by least squares to the in-place runs.
Every run has smart_scan=0 (the model assumes it).  The result is kept in
~/.cache/ksm-proto/ksmd-cost-<kernel release>.json with the CPU model and kernel it
was measured on; `--ksmd-cost FILE` or explicit values bypass it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time

import numpy as np

from workers.oracle import kernel_ksm

__all__ = ["COST_KEYS", "batch_cpu_s", "batch_cycle", "batches_per_scan", "ksmd_nice", "ksmd_pid", "ksmd_runtime_ns",
           "hz", "msecs_to_jiffies", "cold_factor", "fit_in_place", "cache_path", "load_cost", "calibrate", "get_cost"]

COST_KEYS = ("first", "volatile", "unique", "merge", "ksm", "batch", "kappa", "cold", "cold_pages", "cold_first")
PAGE = kernel_ksm.PAGE


def ksmd_pid() -> int | None:
    """The pid of the kernel thread ksmd (a child of kthreadd), or None."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/comm") as f:
                if f.read().strip() != "ksmd":
                    continue
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == 2:
            return int(d)
    return None


def ksmd_runtime_ns(pid: int | None = None) -> int | None:
    """ksmd's total CPU time in ns (/proc/<ksmd>/schedstat, first field), or None where unreadable."""
    pid = pid or ksmd_pid()
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def ksmd_nice(nice: int | None):
    """Run ksmd at this nice value inside the block (None: leave it); the value it had is put back, by its pid.

    ksmd runs at nice 5: on a machine busy with other work its batches wait for a CPU, and
    how long depends on that other work from one second to the next.  A measurement that
    compares a prediction with the kernel can take that noise out by running it higher."""
    pid = ksmd_pid() if nice is not None else None
    if pid is None:
        yield None
        return
    old = os.getpriority(os.PRIO_PROCESS, pid)
    os.setpriority(os.PRIO_PROCESS, pid, int(nice))
    try:
        yield old
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, pid, old)


def hz() -> int:
    """CONFIG_HZ of the running kernel (from /proc/config.gz or /boot/config-*), else 250."""
    import gzip
    rel = platform.release()
    for path, opener in (("/proc/config.gz", gzip.open), (f"/boot/config-{rel}", open)):
        try:
            with opener(path, "rt") as f:
                for line in f:
                    if line.startswith("CONFIG_HZ="):
                        return int(line.split("=")[1])
        except (OSError, ValueError):
            continue
    return 250


def msecs_to_jiffies(ms: int, hz_: int | None = None) -> int:
    """The kernel's msecs_to_jiffies(): milliseconds rounded up to whole ticks."""
    h = hz_ or hz()
    return -(-int(ms) * h // 1000)


def batches_per_scan(pages: int, pages_to_scan: int) -> int:
    """Batches in one full scan of `pages` pages: ksm_do_scan() makes pages_to_scan calls of
    scan_get_next_rmap_item(), and the scan ends on the call after its last page (it returns NULL)."""
    return -(-(int(pages) + 1) // max(1, int(pages_to_scan)))


def cold_factor(k: int, cost: dict) -> float:
    """How much more a batch of k pages costs than the same pages in the middle of a long batch: 1 + cold * w(k),
    w(k) = (m / k) * (1 - exp(-k / m)), m = cold_pages: the page i of a batch costs (1 + cold * exp(-i / m))
    times its warm cost (ksmd wakes with what it walks out of the caches, and warms them as it goes)."""
    m, g = float(cost.get("cold_pages", 0) or 0), float(cost.get("cold", 0.0) or 0.0)
    if k <= 0 or m <= 0 or g <= 0:
        return 1.0
    return 1.0 + g * (m / k) * -math.expm1(-k / m)


def batch_cpu_s(prefix: np.ndarray, pos: int, k: int, cost: dict, flat: np.ndarray | None = None) -> float:
    """ksmd's CPU for the batch of the k pages from position pos (prefix: the cumulative per-page costs, from 0):
    the pages' costs times cold_factor(k), and batch_cpu if given.  flat (cumulative, as prefix): the part of
    those costs that a cold batch does not raise, counted once: a volatile page's visit (its checksum of a page
    its writer has just written, then back) cost ksmd the same per page in batches of 100 as of 1000 (measured:
    1.54 / 1.57 and 1.84 / 1.83 us, while unique pages cost 1.08-1.36 times as much in the 100-page batches)."""
    c = float(prefix[pos + k] - prefix[pos])
    f = 0.0 if flat is None else float(flat[pos + k] - flat[pos])
    return (c - f) * cold_factor(k, cost) + f + cost.get("batch_cpu", 0.0)


def batch_cycle(cpu_s: float, sleep_ms: int, cost: dict) -> tuple[float, float]:
    """(work, cycle) of a batch of ksmd that takes cpu_s seconds of CPU: the wall time from its start to its last
    page (kappa * cpu_s), and to the start of the next batch.

    ksmd starts a batch on the tick its timer fires on, works, and sleeps msecs_to_jiffies(sleep_millisecs) = J
    jiffies counted from the tick it is in then; the timer wheel fires that timer on the (J + 1)th tick (it rounds
    up, never early).  So the cycle is (J + 1 + floor((batch + work) / tick)) ticks; over batches whose end falls
    anywhere within a tick, (J + 1) ticks + max(0, batch + work - tick / 2) on average.  sleep_millisecs 0: no
    sleep at all (wait_event_freezable_timeout() with 0 returns at once), the cycle is the work."""
    h = cost.get("hz") or hz()
    work = cost.get("kappa", 1.0) * cpu_s
    j = msecs_to_jiffies(sleep_ms, h)
    if j == 0:
        return work, work
    tick = 1.0 / h
    return work, (j + 1) * tick + max(0.0, cost.get("batch", 0.0) + work - tick / 2)


def cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ksm-proto", f"ksmd-cost-{platform.release()}.json")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def load_cost(path: str | None = None) -> dict | None:
    """A cached (or given) cost, checked: every key of COST_KEYS a positive number; None if absent."""
    path = path or cache_path()
    try:
        with open(path) as f:
            c = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a ksmd cost file ({e})") from None
    bad = [k for k in COST_KEYS if not isinstance(c.get(k), (int, float)) or c[k] < 0]
    if bad:
        raise ValueError(f"{path}: missing or negative {', '.join(bad)} (need {', '.join(COST_KEYS)}: seconds, "
                         f"except kappa, cold and cold_first, ratios, and cold_pages, pages)")
    return c


def _pages(n: int, seed: int, copies: int = 1) -> np.ndarray:
    """n pages of random bytes (n // copies contents, each `copies` times, interleaved)."""
    rng = np.random.default_rng(seed)
    distinct = rng.integers(0, 256, (max(1, n // copies), PAGE), dtype=np.uint8)
    return distinct[np.arange(n) % len(distinct)]


def _scan_cpu(k: kernel_ksm.KernelKSM, pid: int, scans: int, timeout: float) -> tuple[list[int], list[float]]:
    """ksmd's CPU ns per full scan and the wall time of each, for `scans` full scans from run=1."""
    cpu, wall = [], []
    c0, t0 = ksmd_runtime_ns(pid), time.perf_counter()
    prev = int(kernel_ksm.read_knob("full_scans"))
    k.set(run=1)
    deadline = time.monotonic() + timeout
    while len(cpu) < scans:
        if time.monotonic() > deadline:
            raise TimeoutError(f"ksmd calibration: {len(cpu)} of {scans} full scans in {timeout}s")
        time.sleep(0.0005)
        cur = int(kernel_ksm.read_knob("full_scans"))
        if cur != prev:
            c1, t1 = ksmd_runtime_ns(pid), time.perf_counter()
            for _ in range(cur - prev):
                cpu.append((c1 - c0) / (cur - prev))
                wall.append((t1 - t0) / (cur - prev))
            c0, t0, prev = c1, t1, cur
    k.set(run=0)
    return cpu, wall


def _steady(k: kernel_ksm.KernelKSM, pid: int, pts: int, scans: int, deadline: float) -> tuple[float, float]:
    """With ksmd running: set pages_to_scan, then ksmd's CPU and the wall time per full scan over `scans` whole
    scans (timed from one full_scans change to another), in seconds."""
    k.set(pages_to_scan=pts)

    def next_scan(after: int) -> tuple[int, int, float]:
        while True:
            cur = int(kernel_ksm.read_knob("full_scans"))
            if cur > after:
                return cur, ksmd_runtime_ns(pid), time.perf_counter()
            if time.monotonic() > deadline:
                raise TimeoutError(f"ksmd calibration: no full scan at pages_to_scan {pts} in time")
            time.sleep(0.001)

    f0, _, _ = next_scan(int(kernel_ksm.read_knob("full_scans")))          # the scan under way ends (old pts)
    f1, c1, t1 = next_scan(f0)
    f2, c2, t2 = next_scan(f1 + scans - 1)
    return (c2 - c1) / 1e9 / (f2 - f1), (t2 - t1) / (f2 - f1)


def _batches(n: int, pts: int) -> list[tuple[int, int]]:
    """(first page, pages) of each batch of one full scan of n pages (an empty last one when pts divides n)."""
    return [(p, min(pts, n - p)) for p in range(0, n + 1, pts)][:batches_per_scan(n, pts)]


def median_runs(runs: list[tuple[int, float, float]]) -> list[tuple[int, float, float]]:
    """One run per pages_to_scan: the median CPU and wall of its repeats (in first-seen order).  One slow scan
    (a one-batch scan measured 24% over its repeats on a busy machine) moved the fit's warm scale, and with it
    the cold factor of every batch size, by that much; the median of three does not move."""
    by: dict[int, list[tuple[float, float]]] = {}
    for pts, c, w in runs:
        by.setdefault(int(pts), []).append((float(c), float(w)))
    return [(pts, float(np.median([c for c, _ in v])), float(np.median([w for _, w in v]))) for pts, v in by.items()]


def fit_in_place(hot: np.ndarray, runs: list[tuple[int, float, float]], sleep_ms: int, hz_: int,
                 kappa: float = 1.0) -> dict:
    """The in-place scale of the hot per-page costs, cold and cold_pages, and batch, by least squares (pure).

    hot: each page's cost in one batch a scan with no sleep, in scan order, at steady state; runs:
    (pages_to_scan, ksmd CPU per full scan, wall per full scan) at sleep_ms, steady state, several at a
    pages_to_scan allowed (their medians are fitted: median_runs).  Model: a batch's CPU = scale * its pages' hot costs * cold_factor(its pages), its
    wall as batch_cycle() gives.  cold_pages on a grid up to n / 6, cold and scale (linear) by least squares
    on the relative errors.  Returns {"scale", "cold", "cold_pages", "batch", "kappa"}."""
    n = len(hot)
    pre = np.concatenate([[0.0], np.cumsum(hot)])
    runs = median_runs(runs)
    cpu = np.array([c for _, c, _ in runs])
    best = None
    # cold_pages at most a sixth of the region: the one-batch runs must be mostly warm to pin the warm cost (a fit
    # that let it reach 3000 of 6144 pages put half the one-batch scan down to cold, and then priced an 11,302-page
    # batch 35% below the kernel's)
    for m in [m for m in (25, 50, 100, 150, 200, 300, 400, 500, 700, 1000) if m <= n // 6] or [max(1, n // 6)]:
        c1 = {"cold": 1.0, "cold_pages": m}
        h = np.array([sum(float(pre[p + kb] - pre[p]) for p, kb in _batches(n, pts)) for pts, _, _ in runs])
        x = np.array([sum(float(pre[p + kb] - pre[p]) * (cold_factor(kb, c1) - 1) for p, kb in _batches(n, pts))
                      for pts, _, _ in runs])
        a = np.stack([h, x], axis=1) / cpu[:, None]                 # scale * h + scale * cold * x = cpu, relative
        (s, sg), *_ = np.linalg.lstsq(a, np.ones(len(runs)), rcond=None)
        if sg < 0 or s <= 0:
            s, sg = float(np.sum(a[:, 0]) / np.sum(a[:, 0] ** 2)), 0.0
        res = float(np.sum((a @ np.array([s, sg]) - 1) ** 2))
        if best is None or res < best[0] - 1e-12:
            best = (res, float(s), float(sg / s), m)
    _, scale, cold, m = best
    out = {"scale": scale, "cold": cold, "cold_pages": m, "kappa": kappa}
    costs = [[scale * float(pre[p + kb] - pre[p]) * cold_factor(kb, out) for p, kb in _batches(n, pts)]
             for pts, _, _ in runs]
    wall = np.array([w for _, _, w in runs])
    tick = 1.0 / hz_
    best_b = None
    for lat in np.arange(0, tick + 1e-12, tick / 80):
        c = {"hz": hz_, "kappa": kappa, "batch": float(lat)}
        model = np.array([sum(batch_cycle(cb, sleep_ms, c)[1] for cb in cs) for cs in costs])
        res = float(np.sum(np.log(model / wall) ** 2))
        if best_b is None or res < best_b[0] - 1e-12:
            best_b = (res, float(lat))
    out["batch"] = best_b[1]
    return out


def calibrate(npages: int = 16384, timeout: float = 180, progress=None) -> dict:
    """Measure the per-page costs and the batch model (see the module docstring) on this machine's ksmd; 30-40 s."""
    ok, why = kernel_ksm.available()
    if not ok:
        raise RuntimeError(f"kernel KSM not usable here: {why}")
    pid = ksmd_pid()
    if pid is None or ksmd_runtime_ns(pid) is None:
        raise RuntimeError("no ksmd kernel thread whose /proc/<pid>/schedstat is readable")
    fast = {"pages_to_scan": npages + 1, "sleep_millisecs": 0, "smart_scan": 0, "max_page_sharing": 256,
            "use_zero_pages": 0, "merge_across_nodes": 1}
    out: dict = {}
    h = hz()
    deadline = time.monotonic() + timeout
    with kernel_ksm.KernelKSM() as k:
        now = k.stats()
        if now.get("pages_shared") or kernel_ksm.read_knob("run") != "0":
            raise RuntimeError(f"KSM is in use on this machine (run={kernel_ksm.read_knob('run')}, "
                               f"pages_shared={now.get('pages_shared')}): not calibrating")

        @contextlib.contextmanager
        def region(pages, knobs, rewrite=0, every=None):
            vm = None
            try:
                kernel_ksm._start(k, knobs, max(1.0, deadline - time.monotonic()))
                if every is not None:               # the --verify-kernel helper: every page rewritten so often
                    from workers.estimate.watch import _Helper
                    vm = _Helper(pages, np.full(len(pages), every), seed=0)
                else:
                    vm = kernel_ksm.KernelVM(pages, rewrite=rewrite)
                yield
            finally:
                kernel_ksm._write("run", 0)
                if vm is not None:
                    vm.close()
                k.unmerge_all(max(10.0, deadline - time.monotonic()))

        def one(pages, scans, knobs, rewrite=0, every=None):
            with region(pages, knobs, rewrite, every):
                return _scan_cpu(k, pid, scans, max(1.0, deadline - time.monotonic()))

        if progress:
            progress("ksmd cost: unique pages")
        cpu, wall = one(_pages(npages, 1), 5, fast)
        firsts = [cpu[0] / 1e9 / npages]
        out["unique"] = float(np.median(cpu[2:])) / 1e9 / npages
        kappas = [w * 1e9 / c for c, w in zip(cpu[2:], wall[2:]) if c > 0]
        if progress:
            progress("ksmd cost: duplicated pages")
        cpu, wall = one(_pages(npages, 2, copies=64), 5, fast)
        firsts.append(cpu[0] / 1e9 / npages)            # a first visit costs the same whatever the page holds
        # the lower: a first scan now and then costs twice as much or more (measured 0.7-3.0 us a page on this
        # machine, most runs near 1); one such outlier made the first scan of a 100-page-batch run weigh 11%
        # of ksmd's CPU over 16 s
        out["first"] = min(firsts)
        out["first_runs"] = firsts
        out["merge"] = max(0.0, cpu[1] / 1e9 / npages)
        out["ksm"] = float(np.median(cpu[2:])) / 1e9 / npages
        kappas += [w * 1e9 / c for c, w in zip(cpu[2:], wall[2:]) if c > 0]
        # with no sleep ksmd is always runnable: its wall time per CPU second is how much it has to share a CPU
        kappa = float(min(max(np.median(kappas), 1.0), 3.0)) if kappas else 1.0
        # In place, batch by batch, steady state: n2 unique pages, then n2 // 4 contents twice each, which become
        # as many KSM pages (a unique page's visit searches the stable tree first, so its cost is taken with one
        # there); full scans at pages_to_scan 100, 400, 1000 and in one batch, sleep_millisecs 20.
        n2, sleep_ms = npages // 4, 20
        nd = n2 // 2
        reg = np.concatenate([_pages(n2, 4), _pages(nd, 6, copies=2)])
        nt = len(reg)
        hot = np.concatenate([np.full(n2, out["unique"]), np.full(nd, out["ksm"])])
        runs = []
        with region(reg, {**fast, "pages_to_scan": nt + 1, "sleep_millisecs": sleep_ms}):
            k.set(run=1)
            k.wait_full_scans(3, max(1.0, deadline - time.monotonic()))
            for p, scans in ((nt + 1, 8), (100, 2), (200, 2), (400, 3), (1000, 4), (2000, 6)) * 3:
                if progress:
                    progress(f"ksmd cost: {nt} pages in batches of {min(p, nt)}, sleep_millisecs {sleep_ms}")
                c, w = _steady(k, pid, p, scans, deadline)
                runs.append((p, c, w))
        fit = fit_in_place(hot, runs, sleep_ms, h, kappa)
        for key in ("first", "unique", "merge", "ksm"):
            out[f"{key}_hot"] = out[key]
            out[key] = out[key] * fit["scale"]
        out.update({key: fit[key] for key in ("cold", "cold_pages", "batch", "kappa")})
        # A first visit in place: a fresh region's first scan in batches of 100 (sleep_millisecs 20), twice.  Its
        # cold part is not a unique page's: on the demo a first scan in batches of 100 cost ksmd 1.2-1.35 times the
        # hot first visits, where the cold factor fitted above (1.6-1.7) priced it 31% over the kernel's.
        nf = n2
        fcpu = []
        for seed in (7, 8):
            if progress:
                progress(f"ksmd cost: a first scan of {nf} new pages in batches of 100, sleep_millisecs {sleep_ms}")
            c, _ = one(_pages(nf, seed), 1, {**fast, "pages_to_scan": 100, "sleep_millisecs": sleep_ms})
            fcpu.append(c[0] / 1e9 / nf)
        w100 = cold_factor(100, {"cold": 1.0, "cold_pages": out["cold_pages"]}) - 1.0
        out["first_in_place"] = fcpu
        out["cold_first"] = max(0.0, (float(np.median(fcpu)) / out["first"] - 1.0) / w100) if w100 > 0 else 0.0
        # A page being rewritten, in place: it costs ksmd more than its checksum (measured here, not scaled); one
        # batch a scan.  Not divided by cold_factor(): a volatile visit costs the same in a cold batch (batch_cpu_s)
        nv = n2 // 4
        if progress:
            progress(f"ksmd cost: {nv} pages rewritten every 5 ms, one batch a scan")
        cpu, _ = one(_pages(nv, 5), 7, {**fast, "pages_to_scan": nv + 1, "sleep_millisecs": sleep_ms}, every=0.005)
        out["volatile"] = max(1e-9, float(np.median(cpu[2:])) / 1e9 / nv)
        out["runs"] = [{"pages_to_scan": p, "cpu_s": c, "wall_s": w, "batches": batches_per_scan(nt, p)}
                       for p, c, w in runs]
    out.update({"hz": h, "kernel": platform.release(), "cpu_model": _cpu_model(), "npages": npages,
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return out


def get_cost(path: str | None = None, recalibrate: bool = False, progress=None) -> tuple[dict, str]:
    """(cost, where it came from): the file given, else the cache, else a calibration now (then cached)."""
    if path:
        c = load_cost(path)
        if c is None:
            raise ValueError(f"{path}: no such file")
        return c, path
    if not recalibrate:
        try:
            c = load_cost()
        except ValueError:                  # a cache from an older ksm-proto: measured again
            c = None
        if c is not None:
            return c, cache_path()
    c = calibrate(progress=progress)
    p = cache_path()
    try:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = p + f".{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(c, f, indent=1)
        os.replace(tmp, p)
        return c, f"measured now (cached in {p})"
    except OSError:
        return c, "measured now (not cached: cache directory not writable)"
