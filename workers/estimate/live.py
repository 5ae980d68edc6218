"""Predicted against the kernel's KSM running live, on the demo workloads: the bench part and the kernel test.

This module owns the comparison `ksm-proto bench --only estimate-live` reports and
tests/test_estimate_watch.py asserts: ksmd's per-page cost is measured in the same run
(workers/estimate/ksmd_cost.py, written to a file the runs are given with --ksmd-cost); the processes
of each workload (workers/estimate/watch_demo.py, WORKLOADS) are started once, one workload after
the other, and on each, for each knob setting
`ksm-proto estimate --pid ... --watch W --verify-kernel --json` runs in a process of
its own, and its predicted and measured values are collected beside the tolerances
(estimate_watch.TOLERANCES).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from workers.estimate import ksmd_cost
from workers.estimate.watch import TOLERANCES
from workers.estimate.watch_demo import WORKLOADS, Demo, DemoShape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, estimate arguments, seconds the kernel runs)
SETTINGS = [
    ("pages_to_scan=1000, sleep_millisecs=20", ["--pages-to-scan", "1000", "--sleep-millisecs", "20"], 8.0),
    ("pages_to_scan=100, sleep_millisecs=20", ["--pages-to-scan", "100", "--sleep-millisecs", "20"], 16.0),
    ("advisor scan-time, target 3 s", ["--advisor-mode", "scan-time", "--advisor-target-scan-time", "3",
                                       "--sleep-millisecs", "20"], 20.0),
    ("advisor scan-time, target 3 s, max 2000 pages", ["--advisor-mode", "scan-time", "--advisor-target-scan-time",
                                                       "3", "--advisor-max-pages-to-scan", "2000",
                                                       "--sleep-millisecs", "20"], 20.0),
]


def _nice_up() -> None:
    """In the child before exec: nice -10 where allowed (root), so that its samples, 20 ms apart, are on
    time on a busy machine (the watch's reads and the kernel's counters); else as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except OSError:
        pass


def run_setting(pids: list[int], args: list[str], verify_s: float, watch_s: float, interval: float,
                cost_file: str, timeout: float = 300) -> dict:
    """One `estimate --watch --verify-kernel --json` run; its JSON (with "exit" added)."""
    cmd = [sys.executable, "-m", "workers.tools.cli", "estimate", "--pid", *map(str, pids), "--watch", str(watch_s),
           "--interval", str(interval), "--verify-kernel", "--verify-seconds", str(verify_s), "--ksmd-cost",
           cost_file, "--json", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, preexec_fn=_nice_up)
    try:
        res = json.loads(r.stdout)
    except ValueError:
        raise RuntimeError(f"estimate exited {r.returncode} without JSON: {r.stderr.strip()[-800:]}") from None
    res["exit"] = r.returncode
    res["stderr"] = r.stderr.strip()[-800:]
    return res


def compare_live(settings=None, shape: DemoShape | None = None, watch_s: float = 8.0, interval: float = 0.25,
                 calibrate_pages: int = 16384, ksmd_nice: int | None = -20, progress=None,
                 workloads: list[tuple[str, DemoShape]] | None = None) -> dict:
    """Every setting on every workload; per setting the compared values, and `ok` if all are within tolerance.

    workloads: (name, shape) pairs, run one after the other with the same calibration (default
    watch_demo.WORKLOADS; `shape` alone: that one, named "demo"). The result keeps the first
    workload's `workload` and `settings` at the top level (as before there was more than one) and
    lists every workload, the first included, under `workloads` ({name, workload, settings, ok});
    `ok` is the AND over all of them.

    ksmd_nice: ksmd's nice value for the whole comparison, calibration included (put back afterwards;
    None leaves it at its own, 5): on a machine shared with other busy jobs that takes most of their
    noise out of ksmd's wall time, the same for the calibration and for the kernel's runs (ksmd uses the
    CPU it uses either way; the others wait instead of it)."""
    settings = settings or SETTINGS
    if workloads is None:
        workloads = [("demo", shape)] if shape is not None else WORKLOADS
    out = {"tolerances": TOLERANCES, "watch_seconds": watch_s, "interval": interval, "settings": [],
           "ksmd_nice": ksmd_nice, "workloads": []}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ksmp-live-") as d, ksmd_cost.ksmd_nice(ksmd_nice) as was:
        out["ksmd_nice_before"] = was
        if progress:
            progress("estimate-live: ksmd's per-page cost, measured now")
        cost = ksmd_cost.calibrate(npages=calibrate_pages)
        out["cost"] = cost
        cost_file = os.path.join(d, "cost.json")
        with open(cost_file, "w") as f:
            json.dump(cost, f)
        for wname, wshape in workloads:
            w = {"name": wname, "settings": []}
            with Demo(wshape) as demo:
                w["workload"] = {"pids": len(demo.pids), **vars(demo.shape)}
                for name, args, verify_s in settings:
                    if progress:
                        progress(f"estimate-live: {wname}, {name}: watch {watch_s} s, then the kernel {verify_s} s")
                    w["settings"].append(_compare_one(demo.pids, name, args, verify_s, watch_s, interval, cost_file))
            w["ok"] = all(r["ok"] for r in w["settings"])
            w["worst"] = worst_errors(w["settings"])
            out["workloads"].append(w)
    out["workload"], out["settings"] = out["workloads"][0]["workload"], out["workloads"][0]["settings"]
    out["ok"] = all(w["ok"] for w in out["workloads"])
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def _compare_one(pids: list[int], name: str, args: list[str], verify_s: float, watch_s: float, interval: float,
                 cost_file: str) -> dict:
    """One setting on the running workload: its row of the results (compare, ok, curves) or its error."""
    res = run_setting(pids, args, verify_s, watch_s, interval, cost_file)
    kv = res.get("kernel") or {}
    row = {"name": name, "args": args, "verify_seconds": verify_s, "exit": res["exit"]}
    if "compare" not in kv:
        row["error"] = kv.get("error") or res.get("stderr") or "no comparison"
        row["ok"] = False
        return row
    row["compare"] = kv["compare"]
    row["ok"] = all(v.get("ok", True) for v in kv["compare"].values())
    row["pages"] = res["predicted"]["pages"]
    row["pages_to_scan_predicted"] = kv["predicted"]["pages_to_scan_sequence"][:12]
    row["pages_to_scan_measured"] = kv["measured"]["pages_to_scan_sequence"][:12]
    row["curve_predicted"] = [(c["t"], c["pages_sharing"]) for c in kv["predicted"]["curve"]]
    row["curve_measured"] = [(s["t"], s["pages_sharing"]) for s in kv["samples"]]
    row["volatile_measured"] = [(s["t"], s["pages_volatile"]) for s in kv["samples"]]
    return row


CHECKED = ("bytes_saved", "pages_volatile", "seconds_to_90", "ksmd_cpu_share")


def worst_errors(rows: list[dict]) -> dict:
    """Per checked value, the largest relative error (by size, sign kept) over the settings that compared;
    None where none did."""
    out = {}
    for key in CHECKED:
        errs = [r["compare"][key]["error"] for r in rows if "compare" in r and r["compare"][key]["error"] is not None]
        out[key] = max(errs, key=abs) if errs else None
    return out


def _workloads(e: dict) -> list[dict]:
    """The workloads of a result, also one written before there were several (its settings, named "demo")."""
    return e.get("workloads") or [{"name": "demo", "workload": e.get("workload"), "settings": e["settings"],
                                   "ok": e.get("ok")}]


def table_rows(e: dict) -> list[str]:
    """Rows for bench/run.py's table: per workload and setting, each compared value predicted / kernel (error)."""
    rows = []
    ws = _workloads(e)
    for w in ws:
        label = "estimate-live" if len(ws) == 1 else f"estimate-live, {w['name']}"
        for r in w["settings"]:
            if "compare" not in r:
                rows.append(f"| {label}, {r['name']} | error: {r['error'][:120]} | | | |")
                continue
            for key in CHECKED:
                c = r["compare"][key]
                err = "" if c["error"] is None else f"{100 * c['error']:+.1f}%"
                rows.append(f"| {label}, {r['name']}: {key} (predicted / kernel) | {c['predicted']} / "
                            f"{c['measured']} | {err} | {'ok' if c.get('ok') else 'OUTSIDE'} | "
                            f"within {100 * c['tolerance']:.0f}% |")
    return rows


def outside(e: dict) -> list[str]:
    """"workload, setting: value" for every value outside its tolerance (or setting that did not compare)."""
    return [f"{w['name']}, {r['name']}: {k}" for w in _workloads(e) for r in w["settings"]
            for k, c in (r.get("compare") or {"error": {"ok": False}}).items() if c.get("ok") is False]


def _runs(seq: list[int]) -> str:
    """A pages_to_scan sequence with its repeats dropped: 500 49 490 2000 2000 -> "500 49 490 2000"."""
    return " ".join(str(v) for i, v in enumerate(seq) if i == 0 or v != seq[i - 1])


def markdown(e: dict) -> str:
    """docs/estimate.md's tables of a result: per workload its shape, then per setting predicted / kernel
    (relative error) for every compared value (tests/test_estimate_watch.py checks the page holds them)."""
    def rel(c: dict, fmt) -> str:
        err = "" if c["error"] is None else f" ({100 * c['error']:+.0f}%)"
        return f"{fmt(c['predicted'])} / {fmt(c['measured'])}{err}"
    out = []
    for w in _workloads(e):
        s = w.get("workload") or {}
        out += [f"**{w['name']}**: {s.get('procs')} processes, each {s.get('dup')} duplicate pages, {s.get('uniq')} "
                f"of its own, {s.get('slow')} rewritten every {s.get('slow_s')} s, {s.get('fast')} every "
                f"{s.get('fast_s')} s; {'every value within its tolerance' if w['ok'] else 'OUTSIDE a tolerance'}",
                "", "| setting | bytes_saved | pages_volatile | seconds_to_90 | full scan | ksmd_cpu_share | "
                "pages_to_scan sequence |", "|---|---|---|---|---|---|---|"]
        for r in w["settings"]:
            if "compare" not in r:
                out.append(f"| {r['name']} | error: {r['error'][:120]} | | | | | |")
                continue
            c = r["compare"]
            out.append(f"| {r['name']} | {rel(c['bytes_saved'], lambda v: f'{v / 2**20:.2f} MiB')} | "
                       f"{rel(c['pages_volatile'], lambda v: f'{v}')} | "
                       f"{rel(c['seconds_to_90'], lambda v: f'{v:.2f} s')} | "
                       f"{rel(c['full_scan_seconds'], lambda v: f'{v:.3f} s')} | "
                       f"{rel(c['ksmd_cpu_share'], lambda v: f'{100 * v:.1f}%')} | "
                       f"{_runs(r['pages_to_scan_predicted'])} / {_runs(r['pages_to_scan_measured'])} |")
        out.append("")
    return "\n".join(out)


def plot(e: dict, path: str) -> None:
    """pages_sharing over time, predicted beside the kernel's: one row of panels per workload, one panel per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = [(w, [r for r in w["settings"] if "compare" in r]) for w in _workloads(e)]
    grid = [(w, rows) for w, rows in grid if rows]
    if not grid:
        return
    ncol = max(len(rows) for _, rows in grid)
    fig, axes = plt.subplots(len(grid), ncol, figsize=(5.5 * ncol, 4.2 * len(grid)), squeeze=False)
    for (w, rows), line in zip(grid, axes):
        for ax in line[len(rows):]:
            ax.set_visible(False)
        for ax, r in zip(line, rows):
            pc, mc = r["curve_predicted"], r["curve_measured"]
            ax.step([t for t, _ in pc], [v for _, v in pc], where="post", color="#2a7", label="predicted")
            ax.plot([t for t, _ in mc], [v for _, v in mc], color="#c44", alpha=.8, label="kernel")
            c = r["compare"]
            ax.set_title(f"{w['name']}: {r['name']}\nt90 {c['seconds_to_90']['predicted']} / "
                         f"{c['seconds_to_90']['measured']} s, CPU {100 * c['ksmd_cpu_share']['predicted']:.1f} / "
                         f"{100 * c['ksmd_cpu_share']['measured']:.1f}%", fontsize=9)
            ax.set_xlabel("seconds after run=1")
            ax.set_ylabel("pages_sharing")
            ax.grid(alpha=.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
