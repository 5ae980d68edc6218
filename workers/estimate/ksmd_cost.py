"""What one page costs this machine's kernel ksmd, measured once and cached: the estimate's time/CPU input.

This module owns the calibration that `ksm-proto estimate --watch` predicts ksmd's
time and CPU from (workers/estimate/watch.py).  The kernel's ksmd is run on regions
of known pages in this process (kernel_ksm.KernelRegion, MADV_MERGEABLE), and its own
CPU time is read from /proc/<ksmd>/schedstat (the runtime task_sched_runtime() gives,
which the scan-time advisor uses too) at the end of each full scan.  Per page, in
seconds of ksmd CPU:

    first    a page's first visit (an rmap item is made, its checksum recorded)
    volatile a page whose checksum changed since the last visit, being rewritten meanwhile
             (measured in place: pages rewritten every 5 ms, as --verify-kernel's helpers do)
    unique   a page that holds still but matches nothing (checksum, both trees searched,
             the page waits in the unstable tree)
    merge    a page merged on this visit (with the unstable tree's page or a KSM page)
    ksm      a KSM page visited again (its stable tree lookup finds itself)
    batch_cpu  ksmd's CPU per batch beyond its pages' (waking, the mm walk), seconds
    batch    the extra wall time of one batch beyond sleep_millisecs rounded up to
             jiffies (timer and wake-up latency), in seconds
    kappa    wall time per second of ksmd CPU within a batch (above 1 when ksmd has to
             wait for a CPU on a busy machine)
    scan_wall  the wall time each full scan adds (it starts with lru_add_drain_all(),
             which waits for a kworker on every CPU)

The five page costs are first measured hot (sleep_millisecs 0, one batch per scan: their
ratios), then scaled to what a unique page costs in place (beside a stable tree of a few
thousand KSM pages, which its visit searches first), at three batch sizes with
sleep_millisecs 20 (32, 4 and 1 batches a full scan), which also give batch_cpu and,
by least squares, batch, kappa and scan_wall.

Every run has smart_scan=0 (the model assumes it).  The result is kept in
~/.cache/ksm-proto/ksmd-cost-<kernel release>.json with the CPU model and kernel it
was measured on; `--ksmd-cost FILE` or explicit values bypass it.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import time

import numpy as np

from workers.oracle import kernel_ksm

__all__ = ["COST_KEYS", "batch_wall", "ksmd_nice", "ksmd_pid", "ksmd_runtime_ns", "hz", "jiffies_seconds", "cache_path", "load_cost",
           "calibrate", "get_cost"]

COST_KEYS = ("first", "volatile", "unique", "merge", "ksm", "batch", "batch_cpu", "kappa", "scan_wall")
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


def jiffies_seconds(ms: int, hz_: int | None = None) -> float:
    """msecs_to_jiffies(ms) in seconds: the timeout ksmd sleeps between batches, rounded up to a jiffy."""
    h = hz_ or hz()
    return -(-int(ms) * h // 1000) / h


def batch_wall(cpu_s: float, cost: dict) -> float:
    """The wall time of a batch of ksmd that takes cpu_s seconds of CPU, its sleep aside: its wake-up latency
    (batch) and, on a busy machine, the time it waits for a CPU meanwhile (kappa)."""
    return cost.get("batch", 0.0) + cost.get("kappa", 1.0) * cpu_s


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
        raise ValueError(f"{path}: missing or negative {', '.join(bad)} (need {', '.join(COST_KEYS)}, in seconds)")
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


def calibrate(npages: int = 16384, timeout: float = 120, progress=None) -> dict:
    """Measure the per-page costs (see the module docstring) on this machine's ksmd; a few seconds."""
    ok, why = kernel_ksm.available()
    if not ok:
        raise RuntimeError(f"kernel KSM not usable here: {why}")
    pid = ksmd_pid()
    if pid is None or ksmd_runtime_ns(pid) is None:
        raise RuntimeError("no ksmd kernel thread whose /proc/<pid>/schedstat is readable")
    fast = {"pages_to_scan": npages, "sleep_millisecs": 0, "smart_scan": 0, "max_page_sharing": 256,
            "use_zero_pages": 0, "merge_across_nodes": 1}
    out: dict = {}
    deadline = time.monotonic() + timeout
    with kernel_ksm.KernelKSM() as k:
        now = k.stats()
        if now.get("pages_shared") or kernel_ksm.read_knob("run") != "0":
            raise RuntimeError(f"KSM is in use on this machine (run={kernel_ksm.read_knob('run')}, "
                               f"pages_shared={now.get('pages_shared')}): not calibrating")

        def one(pages, scans, knobs, rewrite=0, every=None):
            vm = None
            try:
                kernel_ksm._start(k, knobs, max(1.0, deadline - time.monotonic()))
                if every is not None:               # the --verify-kernel helper: every page rewritten so often
                    from workers.estimate.watch import _Helper
                    vm = _Helper(pages, np.full(len(pages), every), seed=0)
                else:
                    vm = kernel_ksm.KernelVM(pages, rewrite=rewrite)
                return _scan_cpu(k, pid, scans, max(1.0, deadline - time.monotonic()))
            finally:
                kernel_ksm._write("run", 0)
                if vm is not None:
                    vm.close()
                k.unmerge_all(max(10.0, deadline - time.monotonic()))

        if progress:
            progress("ksmd cost: unique pages")
        cpu, _ = one(_pages(npages, 1), 5, fast)
        out["first"] = cpu[0] / 1e9 / npages
        out["unique"] = float(np.median(cpu[2:])) / 1e9 / npages
        if progress:
            progress("ksmd cost: duplicated pages")
        cpu, _ = one(_pages(npages, 2, copies=64), 5, fast)
        out["merge"] = max(0.0, cpu[1] / 1e9 / npages)
        out["ksm"] = float(np.median(cpu[2:])) / 1e9 / npages
        if progress:
            progress("ksmd cost: volatile pages")
        cpu, _ = one(_pages(npages // 4, 3), 6, {**fast, "pages_to_scan": npages // 4}, rewrite=npages // 4)
        out["volatile"] = float(np.median(cpu[2:])) / 1e9 / (npages // 4)
        # In place, batch by batch: ksmd wakes every sleep_millisecs, its caches cold, the machine busy.  On
        # unique pages at three batch sizes (32, 4 and 1 batches a scan), per full scan:
        #   CPU  = batches * batch_cpu + pages * unique'
        #   wall = batches * (jiffies(sleep) + batch) + kappa * CPU + scan_wall
        # scan_wall: each scan starts with lru_add_drain_all(), which waits for a kworker on every CPU.
        # The region: n2 unique pages, then n2 // 4 contents twice each, which become as many KSM pages: a
        # unique page's visit searches the stable tree first, so its cost is taken with one there.
        n2, sleep_ms = npages // 4, 20
        nd = n2 // 2
        region = np.concatenate([_pages(n2, 4), _pages(nd, 6, copies=2)])
        nt = len(region)
        jf = jiffies_seconds(sleep_ms)
        runs = []
        for p in (nt // 32, nt // 4, nt):
            if progress:
                progress(f"ksmd cost: batches of {p} pages, sleep_millisecs {sleep_ms}")
            cpu, wall = one(region, 7, {**fast, "pages_to_scan": p, "sleep_millisecs": sleep_ms})
            runs.append((-(-nt // p), float(np.median(cpu[2:])) / 1e9, float(np.median(wall[2:]))))
        (b1, c1, w1), _, (b3, c3, w3) = runs
        batch_cpu = max(0.0, (c1 - c3) / (b1 - b3))
        per_page = max(1e-9, (c3 - b3 * batch_cpu - nd * out["ksm"]) / n2)
        scale = per_page / out["unique"] if out["unique"] else 1.0
        for key in ("first", "volatile", "unique", "merge", "ksm"):      # (volatile: measured in place below)
            out[f"{key}_hot"] = out[key]
            out[key] = out[key] * scale
        a = np.array([[1.0, b, c] for b, c, _ in runs])
        y = np.array([w - b * jf for b, _, w in runs])
        scan_wall, lat, kappa = np.linalg.lstsq(a, y, rcond=None)[0]
        if kappa < 1 or lat < 0 or scan_wall < 0:              # ksmd did not wait for a CPU: kappa 1
            scan_wall, lat = np.linalg.lstsq(a[:, :2], y - a[:, 2], rcond=None)[0]
            kappa = 1.0
        out["batch_cpu"] = batch_cpu
        out["kappa"] = float(min(max(kappa, 1.0), 20.0))
        out["batch"] = float(max(0.0, lat))
        out["scan_wall"] = float(max(0.0, scan_wall))
        # A page being rewritten, in place: it costs ksmd more than its checksum (measured here, not scaled)
        nv = n2 // 4
        if progress:
            progress(f"ksmd cost: {nv} pages rewritten every 5 ms, one batch a scan")
        cpu, _ = one(_pages(nv, 5), 7, {**fast, "pages_to_scan": nv, "sleep_millisecs": sleep_ms}, every=0.005)
        out["volatile"] = max(1e-9, (float(np.median(cpu[2:])) / 1e9 - batch_cpu) / nv)
        out["runs"] = [{"batches": b, "cpu_s": c, "wall_s": w} for b, c, w in runs]
    out.update({"hz": hz(), "kernel": platform.release(), "cpu_model": _cpu_model(), "npages": npages,
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
