"""make bench: ksm-proto beside its anchors, measured in one run, reported as ratios.

    ksm-proto bench [--quick] [--cores N] [--out DIR] [--gib G] [--only PART ...]
                    [--stress-writes W] [--stress-cow C] [--stress-modes MODE ...]

Parts (each measured beside its anchor in the same run):
  scan     scanner pages/s and time to merge ~1 GiB of 4x duplicates and of unique pages,
           beside the kernel's ksmd on the same bytes (pages_to_scan 100000, sleep 0)
  cow      COW fault round trip p50/p99 (inside the VM), beside a pipe ping-pong between two
           processes and the kernel's own COW of a KSM page
  modes    after merging N mapped pages: re-read time, secondary faults and messages per page
  scaling  1, 2, 4 ... --cores VM workers doing COW-heavy work with ksmd running
  trace    the same workload with tracing on beside off
  check    `ksm-proto check` at bench size: 5000 random schedules per mode, schedules/s, and
           each --break caught in every mode (the exit status is 1 otherwise)
  stress   no lost writes: 10M writes and >= 1M COW faults of merged pages across the three
           notifier modes (workers/stress.py), every byte checked, frames checked; the exit
           status is 1 on any lost write, frame problem or stress error
  estimate `ksm-proto estimate` on the scan part's bytes (as a file): pages/s beside the scanner's
           and ksmd's on the same bytes, its peak memory per input page, and its counters beside
           the scanner's at stability

Results: bench/results/latest.json, a dated copy named after the host, latest.md (the
table printed at the end) and PNG plots.  Where /sys/kernel/mm/ksm is not writable the
kernel columns say why they are empty; every kernel knob is restored and run left at 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from proto import MADV_MERGEABLE, PAGE_SIZE  # noqa: E402
from workers import kernel_ksm  # noqa: E402
from workers.machine import Machine  # noqa: E402
from workers.stress import run_modes  # noqa: E402

PARTS = ("scan", "cow", "modes", "scaling", "trace", "stress", "estimate", "check")
MODES = ("change_pte", "wrapped", "invalidate")


def pct(a, q) -> float:
    return float(np.percentile(np.asarray(a, dtype=np.float64), q)) if len(a) else float("nan")


def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"host": socket.gethostname(), "cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version()}


# ---------------------------------------------------------------------------- contents
def dup_pages(npages: int, dup: int, seed: int = 1) -> np.ndarray:
    """npages pages: npages/dup distinct random pages, each present dup times, shuffled."""
    rng = np.random.default_rng(seed)
    uniq = rng.integers(0, 256, (max(1, npages // dup), PAGE_SIZE), dtype=np.uint8)
    pages = np.repeat(uniq, dup, axis=0)[:npages]
    rng.shuffle(pages, axis=0)
    return pages


def load_machine(m: Machine, pages: np.ndarray, nvms: int = 4) -> list:
    per = -(-len(pages) // nvms)
    vms = []
    for i in range(nvms):
        part = pages[i * per:(i + 1) * per]
        if not len(part):
            break
        vm = m.spawn_vm(f"v{i}", pages=len(part) + 64)
        data = part.tobytes()
        a = vm.mmap(len(data))
        for off in range(0, len(data), 4 << 20):
            vm.write(a + off, data[off:off + (4 << 20)])
        vm.madvise(a, len(data), MADV_MERGEABLE)
        vms.append((vm, a, len(data)))
    return vms


# ---------------------------------------------------------------------------- 1. scan
def proto_scan(pages: np.ndarray, timeout: float = 600) -> dict:
    """ksm-proto's ksmd at full speed on these pages: time to merge, pages/s over whole full scans."""
    n = len(pages)
    with Machine(frames=n + 8192) as m:
        load_machine(m, pages)
        m.ksm.set(pages_to_scan=100000, sleep_millisecs=0)
        t0 = time.monotonic()
        m.ksm.set(run=1)
        last, same, s = None, 0, None
        deadline = t0 + timeout
        t_merged = None
        while time.monotonic() < deadline:
            s = m.ksm.wait_full_scans(1, max(1.0, deadline - time.monotonic()))
            cur = (s["pages_shared"], s["pages_sharing"])
            if cur != last:
                t_merged = time.monotonic()
            same = same + 1 if cur == last else 0
            last = cur
            if same >= 2 and s["full_scans"] >= 2:
                break
        elapsed = time.monotonic() - t0
        m.ksm.set(run=0)
        merge_s = t_merged - t0 if t_merged else elapsed
        return {"pages": n, "merge_seconds": round(merge_s, 3), "pages_per_s": round(s["pages_scanned"] / elapsed),
                "full_scans": s["full_scans"], "pages_shared": s["pages_shared"], "pages_sharing": s["pages_sharing"],
                "bytes_per_page": round(s["metadata_bytes"] / max(1, s["ksm_rmap_items"]), 2)}


def bench_scan(npages: int, kernel_ok: bool, why: str, prog) -> dict:
    out = {}
    for name, dup in (("dup4", 4), ("unique", 1)):
        pages = dup_pages(npages, dup)
        prog(f"scan {name}: ksm-proto")
        p = proto_scan(pages)
        k = {"skipped": why}
        if kernel_ok:
            prog(f"scan {name}: kernel ksmd")
            k = kernel_ksm.ksmd_throughput(pages, timeout=600)
        out[name] = {"proto": p, "kernel": k}
    d = out["dup4"]
    res = {
        "pages": npages,
        "pages_per_s": d["proto"]["pages_per_s"],
        "merge_seconds": d["proto"]["merge_seconds"],
        "kernel_pages_per_s": d["kernel"].get("pages_per_s"),
        "kernel_merge_seconds": d["kernel"].get("merge_seconds"),
        "unique_pages_per_s": out["unique"]["proto"]["pages_per_s"],
        "kernel_unique_pages_per_s": out["unique"]["kernel"].get("pages_per_s"),
        "detail": out,
    }
    res["ratio_vs_kernel"] = round(res["pages_per_s"] / res["kernel_pages_per_s"], 3) if res["kernel_pages_per_s"] else None
    res["merge_time_ratio_vs_kernel"] = (round(res["kernel_merge_seconds"] / res["merge_seconds"], 3)
                                         if res["kernel_merge_seconds"] else None)
    if not kernel_ok:
        res["kernel_note"] = why
    return res


# ---------------------------------------------------------------------------- 2. cow
def pipe_pingpong(n: int = 20000, cpus: tuple[int, int] | None = None) -> list[float]:
    """One byte back and forth over two pipes between two processes; cpus pins (parent, child)."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    saved = os.sched_getaffinity(0)
    pid = os.fork()
    if pid == 0:
        try:
            if cpus:
                os.sched_setaffinity(0, {cpus[1]})
            for _ in range(n):
                os.read(r1, 1)
                os.write(w2, b"x")
        finally:
            os._exit(0)
    ts = []
    try:
        if cpus:
            os.sched_setaffinity(0, {cpus[0]})
        for _ in range(n):
            t = time.perf_counter_ns()
            os.write(w1, b"x")
            os.read(r2, 1)
            ts.append((time.perf_counter_ns() - t) / 1000)
    finally:
        os.sched_setaffinity(0, saved)
        os.waitpid(pid, 0)
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    return ts


def merged_vm(m: Machine, npages: int, name: str = "a", value: int = 5):
    vm = m.spawn_vm(name, pages=npages + 64)
    a = vm.mmap(npages * PAGE_SIZE)
    vm.write(a, bytes([value]) * npages * PAGE_SIZE)
    vm.madvise(a, npages * PAGE_SIZE, MADV_MERGEABLE)
    return vm, a


def cow_samples(mode: str, npages: int, handler: list | None = None) -> list[float]:
    """Every write of a merged page takes one COW fault; the VM times each from FAULT to completion.
    handler, if given, gets the fault handler's mean share per fault (FAULT read to FAULT_REPLY sent, us)."""
    with Machine(frames=3 * npages + 1024, notifier_mode=mode) as m:
        vm, a = merged_vm(m, npages)
        m.ksm.set(pages_to_scan=100000, sleep_millisecs=0, run=1)
        m.ksm.wait_stable(60)
        m.ksm.set(run=0)
        vm.cow_samples_ns()
        wid = vm.writer_start(a, npages, seed=1, count=npages, values=250)
        while not vm.writer_peek(wid)["finished"]:
            time.sleep(0.01)
        vm.writer_stop(wid)
        if handler is not None:
            st = m.faultd.call("stats")[0]
            handler.append(st["reply_ns"] / max(1, st["faults"]) / 1000)
        return [x / 1000 for x in vm.cow_samples_ns()]


def channel_pingpong(n: int) -> list[float]:
    """Our own channel (asyncio on uvloop, framed messages) between two processes: the transport floor."""
    import asyncio
    import uvloop
    from proto.channel import Channel
    from proto.messages import Msg, encode
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            a.close()

            async def child():
                loop = asyncio.get_running_loop()
                done = loop.create_future()
                await loop.create_connection(
                    lambda: Channel("echo", lambda ch, f: ch.send(encode(Msg.ACK, corr=f.corr)),
                                    lambda ch: done.done() or done.set_result(None)), sock=b)
                await done
            uvloop.run(child())
        finally:
            os._exit(0)
    b.close()
    ts: list[float] = []

    async def parent():
        loop = asyncio.get_running_loop()
        _, ch = await loop.create_connection(lambda: Channel("ping", lambda c, f: None), sock=a)
        for i in range(1, n + 1):
            t = time.perf_counter_ns()
            await ch.call(i, encode(Msg.START, corr=i), 5)
            ts.append((time.perf_counter_ns() - t) / 1000)
        ch.close()
    uvloop.run(parent())
    os.waitpid(pid, 0)
    return ts


def bench_cow(npages: int, kernel_ok: bool, why: str, prog, rounds: int = 3) -> dict:
    """COW samples, the pipe ping-pong, our bare channel ping-pong and the kernel's COW of a KSM page,
    in interleaved rounds (CPU state drifts during a run, and the machine may be shared): each round
    runs all four; the figures pool every round, the spread is the range of the per-round p50s."""
    pipe, same, s, chan, kern, handler = [], [], [], [], [], []
    rs: dict[str, list] = {"cow": [], "pipe": [], "channel": [], "kernel": []}
    ncpu = os.cpu_count() or 1
    k = {"skipped": why}
    for r in range(rounds):
        prog(f"cow: round {r + 1} of {rounds}: pipe ping-pong, ksm-proto COW faults, channel ping-pong"
             + (", kernel COW" if kernel_ok else ""))
        npp = 10000 if npages >= 2000 else 2000
        p = pipe_pingpong(npp, (0, 1) if ncpu > 1 else None)     # across CPUs, as our actors run
        same += pipe_pingpong(npp // 2, (0, 0))
        c = cow_samples("change_pte", npages, handler)
        h = channel_pingpong(5000 if npages >= 2000 else 1000)
        pipe += p
        s += c
        chan += h
        rs["pipe"].append(pct(p, 50))
        rs["cow"].append(pct(c, 50))
        rs["channel"].append(pct(h, 50))
        if kernel_ok:
            k = kernel_ksm.kernel_cow_us(min(npages, 4096))
            kern += k.pop("_samples", [])
            rs["kernel"].append(k["cow_p50_us"])
    res = {"p50_us": round(pct(s, 50), 1), "p99_us": round(pct(s, 99), 1), "samples": len(s), "rounds": rounds,
           "pipe_p50_us": round(pct(pipe, 50), 1), "pipe_p99_us": round(pct(pipe, 99), 1),
           "pipe_same_cpu_p50_us": round(pct(same, 50), 1),
           "channel_p50_us": round(pct(chan, 50), 1), "channel_p99_us": round(pct(chan, 99), 1),
           "kernel_us": round(pct(kern, 50), 2) if kern else None,
           "kernel_p99_us": round(pct(kern, 99), 2) if kern else None,
           "kernel_unmerged_us": k.get("unmerged_p50_us"),
           "round_p50s_us": {n: [round(x, 1) for x in v] for n, v in rs.items()},
           "handler_mean_us": round(float(np.mean(handler)), 1) if handler else None}
    res["ratio_vs_pipe"] = round(res["p50_us"] / res["pipe_p50_us"], 2)
    res["p99_ratio_vs_pipe"] = round(res["p99_us"] / res["pipe_p99_us"], 2)
    res["goal_p50_met"] = res["ratio_vs_pipe"] <= 1.5
    res["goal_p99_met"] = res["p99_ratio_vs_pipe"] <= 3.0
    if not kernel_ok:
        res["kernel_note"] = why
    res["_samples"] = s
    res["_pipe"] = pipe
    res["_channel"] = chan
    res["_kernel"] = kern
    return res


# ---------------------------------------------------------------------------- 3. modes
def bench_modes(npages: int, prog) -> dict:
    out = {}
    for mode in MODES:
        prog(f"modes: {mode}")
        with Machine(frames=4 * npages + 1024, notifier_mode=mode) as m:
            m.ksm.set(pages_to_scan=100000, sleep_millisecs=0)
            data = dup_pages(npages, 1, seed=3).tobytes()
            vms = []
            for name in ("a", "b"):
                vm = m.spawn_vm(name, pages=npages + 64)
                x = vm.mmap(len(data))
                vm.write(x, data)
                vm.madvise(x, len(data), MADV_MERGEABLE)
                vm.read(x, len(data))              # mapped in the secondary MMU
                vms.append((vm, x))
            m.ksm.set(run=1)
            s = m.ksm.wait_stable(120)
            m.ksm.set(run=0)
            merged = s["pages_sharing"] + s["pages_shared"]
            faults, msgs, secs = 0, {}, 0.0
            for vm, x in vms:
                f0 = vm.stats()["secondary_faults"]
                t = time.perf_counter()
                vm.read(x, len(data))
                secs += time.perf_counter() - t
                st = vm.stats()
                faults += st["secondary_faults"] - f0
                for k2, v in st["msgs"].items():
                    if k2 not in ("REGISTER", "RELEASE"):
                        msgs[k2] = msgs.get(k2, 0) + v
            out[mode] = {"merged_pages": merged,
                         "secondary_faults_per_merged_page": round(faults / merged, 3),
                         "messages_per_merged_page": round(sum(msgs.values()) / merged, 3),
                         "messages": msgs,
                         "reread_us_per_page": round(secs / merged * 1e6, 2)}
    return out


# ---------------------------------------------------------------------------- 4. scaling
def cow_workload(nvms: int, seconds: float, pages: int = 64, trace: str | None = None) -> dict:
    """nvms VMs writing pages that keep becoming identical, ksmd merging them all the time."""
    with Machine(frames=nvms * pages * 4 + 2048, trace=trace) as m:
        m.ksm.set(pages_to_scan=100000, sleep_millisecs=0, smart_scan=0)
        vms = [merged_vm(m, pages, f"w{i}", value=1) for i in range(nvms)]
        m.ksm.set(run=1)
        m.ksm.wait_full_scans(3, 60)
        c0 = [vm.stats()["cow_faults"] for vm, _ in vms]
        t0 = time.monotonic()
        wids = [vm.writer_start(a, pages, seed=i, count=0, values=2) for i, (vm, a) in enumerate(vms)]
        time.sleep(seconds)
        done = [vm.writer_stop(w)["done"] for (vm, _), w in zip(vms, wids)]
        el = time.monotonic() - t0
        cow = sum(vm.stats()["cow_faults"] - c for (vm, _), c in zip(vms, c0))
        m.ksm.set(run=0)
    return {"vms": nvms, "writes_per_s": round(sum(done) / el, 1), "cow_faults_per_s": round(cow / el, 1),
            "writes": sum(done)}


def bench_scaling(max_cores: int, seconds: float, prog) -> list:
    ks, k = [], 1
    while k <= max_cores:
        ks.append(k)
        k *= 2
    if ks[-1] != max_cores:
        ks.append(max_cores)
    out = []
    for k in ks:
        prog(f"scaling: {k} VM(s)")
        out.append(cow_workload(k, seconds))
    base = out[0]["cow_faults_per_s"] or 1
    for r in out:
        r["speedup"] = round(r["cow_faults_per_s"] / base, 2)
    return out


# ---------------------------------------------------------------------------- 5. trace
def merge_cow_rounds(npages: int, rounds: int, trace: str | None = None) -> float:
    """Fixed work: two VMs' pages merged, then every page written (a COW each), `rounds` times."""
    with Machine(frames=4 * npages + 2048, trace=trace) as m:
        m.ksm.set(pages_to_scan=100000, sleep_millisecs=0, max_page_sharing=2 * npages + 1)
        vms = [merged_vm(m, npages, f"r{i}", value=1) for i in range(2)]
        t0 = time.monotonic()
        for r in range(rounds):
            m.ksm.set(run=1)
            deadline = time.monotonic() + 120
            while m.ksm.stats()["pages_sharing"] < 2 * npages - 1:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"round {r}: not merged: {m.ksm.stats()}")
                time.sleep(0.0005)
            m.ksm.set(run=0)
            wids = [vm.writer_start(a, npages, seed=0, count=npages, values=-(r + 2)) for vm, a in vms]
            for (vm, _), w in zip(vms, wids):
                while not vm.writer_peek(w)["finished"]:
                    time.sleep(0.0005)
                vm.writer_stop(w)
        return time.monotonic() - t0


def bench_trace(npages: int, prog, rounds: int = 3, keep: str | None = None) -> dict:
    """The same fixed work with tracing off and on, interleaved; the ratio of medians."""
    offs, ons = [], []
    with tempfile.TemporaryDirectory() as d:
        for r in range(rounds):
            prog(f"trace: off/on round {r + 1}")
            offs.append(merge_cow_rounds(npages, 3))
            path = keep if (keep and r == 0) else os.path.join(d, f"t{r}.json")
            ons.append(merge_cow_rounds(npages, 3, trace=path))
            if r == 0:
                size = os.path.getsize(path)
    off, on = statistics.median(offs), statistics.median(ons)
    return {"seconds_off": round(off, 3), "seconds_on": round(on, 3), "ratio": round(on / off, 3),
            "work": f"3 rounds x (merge {2 * npages} pages + {2 * npages} COW faults)", "trace_bytes": size}


# ---------------------------------------------------------------------------- 7. estimate
def estimate_run(path: str) -> dict:
    """`ksm-proto estimate --file path --json` in a process of its own (its peak memory is its own)."""
    import subprocess
    r = subprocess.run([sys.executable, "-m", "workers.cli", "estimate", "--file", path, "--json",
                        "--max-page-sharing", "256", "--use-zero-pages", "0"], cwd=ROOT, capture_output=True,
                       text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"ksm-proto estimate failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout)


def bench_estimate(npages: int, kernel_ok: bool, why: str, prog, scan: dict | None, rounds: int = 3) -> dict:
    """The estimate on the scan part's bytes, written to a file; the scanner and ksmd on the same bytes.

    The scanner's and ksmd's figures come from the scan part when it ran in this invocation on
    the same pages, else they are measured here (4x duplicates only).  The estimate's pages/s
    and CPU seconds are the median of `rounds` runs, interleaved over both contents.
    """
    out: dict = {"pages": npages}
    with tempfile.TemporaryDirectory(prefix="ksmp-estimate-") as d:
        paths = {}
        for name, dup in (("dup4", 4), ("unique", 1)):
            paths[name] = os.path.join(d, f"{name}.img")
            dup_pages(npages, dup).tofile(paths[name])
        runs: dict = {name: [] for name in paths}
        for r in range(rounds):
            for name, path in paths.items():
                prog(f"estimate: {name}, round {r + 1}")
                runs[name].append(estimate_run(path))
    for name, rs in runs.items():
        mid = sorted(rs, key=lambda x: x["pages_per_s"])[len(rs) // 2]
        out[name] = {"pages_per_s": mid["pages_per_s"], "seconds": mid["seconds"],
                     "cpu_seconds": statistics.median(x["cpu_seconds"] for x in rs),
                     "peak_memory_bytes": max(x["peak_memory_bytes"] for x in rs),
                     "memory_bytes_per_page": max(x["memory_bytes_per_page"] for x in rs),
                     "pages_shared": mid["pages_shared"], "pages_sharing": mid["pages_sharing"],
                     "hash_threads": mid["hash_threads"]}
    if scan and scan.get("pages") == npages:
        det = scan["detail"]
        anchors = {"proto": det["dup4"]["proto"], "kernel": det["dup4"]["kernel"], "from": "scan part"}
    else:
        pages = dup_pages(npages, 4)
        prog("estimate: the scanner on the same bytes")
        anchors = {"proto": proto_scan(pages), "kernel": {"skipped": why}, "from": "measured here"}
        if kernel_ok:
            prog("estimate: kernel ksmd on the same bytes")
            anchors["kernel"] = kernel_ksm.ksmd_throughput(pages, timeout=600)
        del pages
    out["scanner_pages_per_s"] = anchors["proto"]["pages_per_s"]
    out["ksmd_pages_per_s"] = anchors["kernel"].get("pages_per_s")
    out["anchors_from"] = anchors["from"]
    out["ratio_vs_scanner"] = round(out["dup4"]["pages_per_s"] / out["scanner_pages_per_s"], 2)
    out["ratio_vs_ksmd"] = (round(out["dup4"]["pages_per_s"] / out["ksmd_pages_per_s"], 2)
                            if out["ksmd_pages_per_s"] else None)
    # the estimate's answer beside the scanner's at stability, on the same bytes
    out["same_as_scanner"] = (out["dup4"]["pages_shared"], out["dup4"]["pages_sharing"]) == \
        (anchors["proto"]["pages_shared"], anchors["proto"]["pages_sharing"])
    if not kernel_ok:
        out["kernel_note"] = why
    return out


# ---------------------------------------------------------------------------- report
def bench_check(runs: int, prog, jobs: int, breaks: bool = True) -> dict:
    """`ksm-proto check` at bench size: random schedules in each mode, and every --break caught
    (tests/test_check.py catches them too; --quick leaves them to it)."""
    from workers import explore
    from workers.check_world import BREAKS, world_factory
    out = {"runs": runs, "jobs": jobs, "modes": {}, "breaks": {}}
    for mode in MODES:
        prog(f"check: {runs:,} schedules, {mode}")
        r = explore.parallel_random_runs(world_factory(mode), seed=20261125, runs=runs, max_steps=4000, jobs=jobs)
        out["modes"][mode] = {"schedules": r.schedules, "steps": r.steps, "seconds": round(r.seconds, 2),
                              "schedules_per_s": round(r.schedules / r.seconds, 1),
                              "steps_per_s": round(r.steps / r.seconds), "violation": r.found and r.found.violations}
        for brk in BREAKS if breaks else ():
            b = explore.parallel_random_runs(world_factory(mode, brk), seed=0, runs=2000, max_steps=4000,
                                             shrink=False, jobs=jobs)
            out["breaks"].setdefault(brk, {})[mode] = b.found.found_by.get("run") if b.found else None
    return out


def table(res: dict) -> str:
    def f(v, unit=""):
        return "n/a" if v is None else (f"{v:,.1f}{unit}" if isinstance(v, float) else f"{v:,}{unit}")
    rows = ["| what | ksm-proto | anchor | ratio | goal |", "|---|---|---|---|---|"]
    sc = res.get("scan")
    if sc:
        rows.append(f"| scanner, {sc['pages']:,} pages of 4x duplicates (pages/s) | {f(sc['pages_per_s'])} | "
                    f"ksmd {f(sc['kernel_pages_per_s'])} | {f(sc['ratio_vs_kernel'])}x | >= 1.0x |")
        rows.append(f"| time to merge them all (s) | {f(sc['merge_seconds'])} | ksmd {f(sc['kernel_merge_seconds'])} | "
                    f"{f(sc['merge_time_ratio_vs_kernel'])}x faster | |")
        rows.append(f"| scanner, unique pages (pages/s) | {f(sc['unique_pages_per_s'])} | "
                    f"ksmd {f(sc['kernel_unique_pages_per_s'])} | | |")
    if "scanner_bytes_per_page" in res:
        rows.append(f"| scanner metadata (bytes/page) | {res['scanner_bytes_per_page']} | kernel rmap_item 64 | "
                    f"{res['scanner_bytes_per_page'] / 64:.2f}x | <= 64 B |")
    c = res.get("cow")
    if c:
        def spread(n):
            v = c.get("round_p50s_us", {}).get(n) or []
            return f" (rounds {min(v):.1f}-{max(v):.1f})" if len(v) > 1 else ""
        rows.append(f"| COW fault round trip p50 (us) | {c['p50_us']}{spread('cow')} | pipe ping-pong "
                    f"{c['pipe_p50_us']}{spread('pipe')} | {c['ratio_vs_pipe']}x | <= 1.5x |")
        rows.append(f"| COW fault round trip p99 (us) | {c['p99_us']} | pipe p99 {c['pipe_p99_us']} | "
                    f"{c.get('p99_ratio_vs_pipe', 'n/a')}x | <= 3x |")
        rows.append(f"| pipe ping-pong with both ends on one CPU (us) | | {c['pipe_same_cpu_p50_us']} | | |")
        if c.get("handler_mean_us") is not None:
            rows.append(f"| of a COW: the fault handler, FAULT read to FAULT_REPLY sent, mean (us) | "
                        f"{c['handler_mean_us']} | | | |")
        rows.append(f"| our channel ping-pong p50 (us), the transport floor | {c['channel_p50_us']} | "
                    f"pipe {c['pipe_p50_us']} | {c['channel_p50_us'] / c['pipe_p50_us']:.2f}x | |")
        rows.append(f"| kernel COW of a KSM page (us) | | {f(c['kernel_us'])} (unmerged {f(c['kernel_unmerged_us'])}) | | |")
    for mode, v in res.get("modes", {}).items():
        rows.append(f"| {mode}: secondary faults / messages per merged page, re-read us/page | "
                    f"{v['secondary_faults_per_merged_page']} / {v['messages_per_merged_page']}, "
                    f"{v['reread_us_per_page']} | | | |")
    for r in res.get("scaling", []):
        rows.append(f"| scaling: {r['vms']} VM(s), COW faults/s (writes/s) | {f(r['cow_faults_per_s'])} "
                    f"({f(r['writes_per_s'])}) | 1 VM | {r['speedup']}x | |")
    if "trace" in res:
        t = res["trace"]
        rows.append(f"| tracing on vs off: {t['work']} (s) | {f(t['seconds_on'])} | off {f(t['seconds_off'])} | "
                    f"{f(t['ratio'])}x slower | <= 1.10x |")
    ck = res.get("check")
    if ck:
        for mode, r in ck["modes"].items():
            rows.append(f"| check, {mode}: {r['schedules']:,} random schedules ({ck['jobs']} jobs) | "
                        f"{'VIOLATION' if r['violation'] else 'no violation'}, {f(r['schedules_per_s'])} schedules/s, "
                        f"{r['steps_per_s']:,} steps/s | | | none |")
        caught = {b: all(v is not None for v in m.values()) for b, m in ck["breaks"].items()}
        if caught:
            rows.append(f"| check --break caught in every mode | "
                        f"{', '.join(b + ('' if c else ' (MISSED)') for b, c in caught.items())} | | | all |")
    st = res.get("stress")
    if st:
        for mode, r in st["modes"].items():
            if not r.get("seconds"):
                rows.append(f"| stress, {mode}: failed | {'; '.join(r['errors'])[:200]} | | | |")
                continue
            rows.append(f"| stress, {mode}: writes (thread / in-worker), COW faults of merged pages, s | "
                        f"{r['writes']:,} ({r['thread_writes']:,} / {r['worker_writes']:,}), "
                        f"{r['cow_faults_merged']:,}, {r['seconds']:,.0f} | | | |")
            rows.append(f"| stress, {mode}: writes/s, COW faults of merged pages/s | {f(r['writes_per_s'])}, "
                        f"{f(r['cow_faults_merged_per_s'])} | | | |")
        rows.append(f"| no lost writes: writes / COW faults of merged pages / lost (pages, frame problems, "
                    f"errors) | {st['writes']:,} / {st['cow_faults_merged']:,} / {st['lost']} | | | "
                    f">= {st['writes_requested']:,} / >= {st['min_cow_faults']:,} / 0 |")
    e = res.get("estimate")
    if e:
        rows.append(f"| estimate, {e['pages']:,} pages of 4x duplicates (pages/s) | {f(e['dup4']['pages_per_s'])} | "
                    f"scanner {f(e['scanner_pages_per_s'])}, ksmd {f(e['ksmd_pages_per_s'])} | "
                    f"{f(e['ratio_vs_scanner'])}x | >= 1.0x |")
        rows.append(f"| estimate, unique pages (pages/s; CPU s) | {f(e['unique']['pages_per_s'])}; "
                    f"{e['unique']['cpu_seconds']} | | | |")
        rows.append(f"| estimate peak memory (bytes per input page) | {e['dup4']['memory_bytes_per_page']} / "
                    f"{e['unique']['memory_bytes_per_page']} (dup4 / unique) | kernel rmap_item 64 | | |")
        rows.append(f"| estimate = scanner at stability (pages_shared, pages_sharing) | "
                    f"{e['dup4']['pages_shared']:,}, {e['dup4']['pages_sharing']:,} | "
                    f"{'same' if e['same_as_scanner'] else 'DIFFERENT'} | | |")
    return "\n".join(rows)


def plots(res: dict, outdir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    if res.get("scaling"):
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["vms"] for r in res["scaling"]]
        ax.plot(xs, [r["writes_per_s"] for r in res["scaling"]], "o-", label="writes/s")
        ax.plot(xs, [r["cow_faults_per_s"] for r in res["scaling"]], "s--", label="COW faults/s")
        ax.set_xlabel("VM workers")
        ax.set_ylabel("per second (all VMs)")
        ax.set_title(f"COW-heavy work with ksmd running ({res['machine']['cores']} cores)")
        ax.legend()
        ax.grid(alpha=.3)
        p = os.path.join(outdir, "scaling.png")
        fig.savefig(p, dpi=100, bbox_inches="tight")
        plt.close(fig)
        made.append(p)
    c = res.get("cow")
    if c and c.get("_samples"):
        fig, ax = plt.subplots(figsize=(6, 4))
        hi = max(pct(x, 99.5) for x in (c["_samples"], c["_pipe"], c.get("_channel") or [1]))
        lo = max(0.1, min(pct(x, 0.5) for x in (c["_samples"], c["_pipe"], c.get("_channel") or [1],
                                                      c.get("_kernel") or [1])))
        bins = np.geomspace(lo, max(hi, lo * 10), 90)
        for key, label in (("_samples", "ksm-proto COW fault"), ("_pipe", "pipe ping-pong"),
                           ("_channel", "bare channel ping-pong"), ("_kernel", "kernel COW of a KSM page")):
            x = c.get(key)
            if x:
                ax.hist(np.clip(x, lo, bins[-1]), bins=bins, alpha=.55, weights=np.full(len(x), 1 / len(x)),
                        label=f"{label} (p50 {pct(x, 50):.1f} us, n={len(x):,})")
        ax.set_xscale("log")
        ax.set_xlabel("microseconds (log)")
        ax.set_ylabel("fraction of samples")
        ax.set_title("latency distributions, same run")
        ax.legend()
        p = os.path.join(outdir, "latency.png")
        fig.savefig(p, dpi=100, bbox_inches="tight")
        plt.close(fig)
        made.append(p)
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ksm-proto bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run of every part)")
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="most VM workers in the scaling part")
    ap.add_argument("--gib", type=float, default=1.0, help="size of the 4x-duplicates scan, GiB (default 1)")
    ap.add_argument("--stress-writes", type=int, default=10_000_000,
                    help="stress: writes in all, split over the modes (default 10,000,000)")
    ap.add_argument("--stress-cow", type=int, default=1_000_000,
                    help="stress: at least this many COW faults of merged pages in all (default 1,000,000)")
    ap.add_argument("--stress-modes", nargs="+", choices=MODES, default=list(MODES),
                    help="stress: the notifier modes to run (default all three)")
    ap.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--trace", metavar="FILE", help="keep the trace of the traced run of the trace part here")
    a = ap.parse_args(argv)
    if a.cores < 1:
        ap.error(f"--cores must be >= 1, not {a.cores}")
    if a.stress_writes < 1 or a.stress_cow < 0:
        ap.error("--stress-writes must be >= 1 and --stress-cow >= 0")
    parts = a.only or list(PARTS)
    q = a.quick
    scan_pages = 8192 if q else int(a.gib * (1 << 30) / PAGE_SIZE)
    cow_pages = 1000 if q else 8000
    mode_pages = 256 if q else 4096
    seconds = 1.0 if q else 4.0
    stress_writes = 20_000 if q else a.stress_writes
    stress_cow = 0 if q else a.stress_cow
    kernel_ok, why = kernel_ksm.available()
    if not kernel_ok:
        why = f"kernel KSM not measured: {why}"

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    console = Console(stderr=True)
    res: dict = {"machine": machine_info(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "quick": q, "argv": argv or []}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task("bench", total=len(parts))

        def prog(msg):
            progress.update(task, description=msg)
            if not console.is_terminal:
                print(f"bench: {msg}", file=sys.stderr, flush=True)

        for part in parts:
            if part == "scan":
                res["scan"] = bench_scan(scan_pages, kernel_ok, why, prog)
                res["scanner_bytes_per_page"] = res["scan"]["detail"]["unique"]["proto"]["bytes_per_page"]
            elif part == "cow":
                res["cow"] = bench_cow(cow_pages, kernel_ok, why, prog)
            elif part == "modes":
                res["modes"] = bench_modes(mode_pages, prog)
            elif part == "scaling":
                res["scaling"] = bench_scaling(a.cores, seconds, prog)
            elif part == "trace":
                res["trace"] = bench_trace(256 if q else 1024, prog, keep=a.trace)
                res["trace_overhead_ratio"] = res["trace"]["ratio"]
            elif part == "stress":
                prog(f"stress: {stress_writes:,} writes, >= {stress_cow:,} COW faults of merged pages")
                bar = progress.add_task("stress", total=stress_writes)
                base, shown = {"mode": None, "off": 0, "last": 0}, [0.0]

                def sprog(mode, done, asked, cow):
                    if base["mode"] != mode:
                        base["off"] += base["last"]
                        base["mode"] = mode
                    base["last"] = done
                    progress.update(bar, completed=base["off"] + done,
                                    description=f"stress {mode}: {done:,}/{asked:,} writes, {cow:,} COW")
                    if not console.is_terminal and time.monotonic() - shown[0] > 30:
                        shown[0] = time.monotonic()
                        print(f"bench: stress {mode}: {done:,}/{asked:,} writes, {cow:,} COW faults of "
                              f"merged pages", file=sys.stderr, flush=True)

                res["stress"] = run_modes(stress_writes, stress_cow, modes=a.stress_modes, progress=sprog)
                progress.remove_task(bar)
            elif part == "check":
                res["check"] = bench_check(100 if q else 5000, prog, a.cores, breaks=not q)
            elif part == "estimate":
                res["estimate"] = bench_estimate(scan_pages, kernel_ok, why, prog, res.get("scan"),
                                                 rounds=1 if q else 3)
            progress.advance(task)
    os.makedirs(a.out, exist_ok=True)
    made = plots(res, a.out)
    res["plots"] = [os.path.basename(p) for p in made]
    for key in ("cow",):
        if key in res:
            res[key] = {k: v for k, v in res[key].items() if not k.startswith("_")}
    md = table(res)
    text = json.dumps(res, indent=2)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in ("latest.json", f"{stamp}-{res['machine']['host']}.json"):
        with open(os.path.join(a.out, name), "w") as f:
            f.write(text)
    with open(os.path.join(a.out, "latest.md"), "w") as f:
        f.write(f"ksm-proto bench, {res['date']}, {res['machine']['cores']} cores, {res['machine']['cpu']}, "
                f"Linux {res['machine']['kernel']}\n\n{md}\n")
    print(md)
    print(f"\nresults: {os.path.join(a.out, 'latest.json')} (+ latest.md, {', '.join(res['plots'])})")
    st = res.get("stress")
    if st and st["lost"]:
        for r in st["modes"].values():
            if r["lost"]:
                print(f"stress, {r['mode']}: {r['lost']} problem(s): {r['mismatches']} pages lost writes, "
                      f"{r.get('read_mismatches', 0)} bad read-backs", file=sys.stderr)
                for line in (r.get("mismatch_examples", []) + r["frame_problems"] + r["exit_frame_problems"]
                             + (r.get("unmerge") or {}).get("frame_problems", []) + r["errors"]):
                    print(f"  {line}", file=sys.stderr)
        return 1
    if st and not st["cow_goal_met"]:
        print(f"stress: only {st['cow_faults_merged']:,} COW faults of merged pages, "
              f"wanted {st['min_cow_faults']:,}", file=sys.stderr)
    ck = res.get("check")
    if ck:
        bad = [f"{m}: {r['violation']}" for m, r in ck["modes"].items() if r["violation"]]
        bad += [f"--break {b} missed in {m}" for b, ms in ck["breaks"].items() for m, v in ms.items() if v is None]
        if bad:
            print("check: " + "; ".join(bad), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
