"""Predicted against the kernel's KSM running live, on the demo workload: the bench part and the kernel test.

This module owns the comparison `ksm-proto bench --only estimate-live` reports and
tests/test_estimate_watch.py asserts: the demo processes (workers/estimate/watch_demo.py) are
started once; ksmd's per-page cost is measured in the same run (workers/estimate/ksmd_cost.py,
written to a file the runs are given with --ksmd-cost); then for each knob setting
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
from workers.estimate.watch_demo import Demo, DemoShape

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
                 calibrate_pages: int = 16384, ksmd_nice: int | None = -20, progress=None) -> dict:
    """Every setting on one demo workload; per setting the compared values, and `ok` if all are within tolerance.

    ksmd_nice: ksmd's nice value for the whole comparison, calibration included (put back afterwards;
    None leaves it at its own, 5): on a machine shared with other busy jobs that takes most of their
    noise out of ksmd's wall time, the same for the calibration and for the kernel's runs (ksmd uses the
    CPU it uses either way; the others wait instead of it)."""
    settings = settings or SETTINGS
    out = {"tolerances": TOLERANCES, "watch_seconds": watch_s, "interval": interval, "settings": [],
           "ksmd_nice": ksmd_nice}
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
        with Demo(shape) as demo:
            out["workload"] = {"pids": len(demo.pids), **vars(demo.shape)}
            for name, args, verify_s in settings:
                if progress:
                    progress(f"estimate-live: {name}: watch {watch_s} s, then the kernel {verify_s} s")
                res = run_setting(demo.pids, args, verify_s, watch_s, interval, cost_file)
                kv = res.get("kernel") or {}
                row = {"name": name, "args": args, "verify_seconds": verify_s, "exit": res["exit"]}
                if "compare" not in kv:
                    row["error"] = kv.get("error") or res.get("stderr") or "no comparison"
                    row["ok"] = False
                else:
                    row["compare"] = kv["compare"]
                    row["ok"] = all(v.get("ok", True) for v in kv["compare"].values())
                    row["pages"] = res["predicted"]["pages"]
                    row["pages_to_scan_predicted"] = kv["predicted"]["pages_to_scan_sequence"][:12]
                    row["pages_to_scan_measured"] = kv["measured"]["pages_to_scan_sequence"][:12]
                    row["curve_predicted"] = [(c["t"], c["pages_sharing"]) for c in kv["predicted"]["curve"]]
                    row["curve_measured"] = [(s["t"], s["pages_sharing"]) for s in kv["samples"]]
                    row["volatile_measured"] = [(s["t"], s["pages_volatile"]) for s in kv["samples"]]
                out["settings"].append(row)
    out["ok"] = all(r["ok"] for r in out["settings"])
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def table_rows(e: dict) -> list[str]:
    """Rows for bench/run.py's table: per setting, each compared value predicted / kernel (error)."""
    rows = []
    for r in e["settings"]:
        if "compare" not in r:
            rows.append(f"| estimate-live, {r['name']} | error: {r['error'][:120]} | | | |")
            continue
        for key in ("bytes_saved", "pages_volatile", "seconds_to_90", "ksmd_cpu_share"):
            c = r["compare"][key]
            err = "" if c["error"] is None else f"{100 * c['error']:+.1f}%"
            rows.append(f"| estimate-live, {r['name']}: {key} (predicted / kernel) | {c['predicted']} / "
                        f"{c['measured']} | {err} | {'ok' if c.get('ok') else 'OUTSIDE'} | "
                        f"within {100 * c['tolerance']:.0f}% |")
    return rows


def plot(e: dict, path: str) -> None:
    """pages_sharing over time, predicted beside the kernel's, one panel per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in e["settings"] if "compare" in r]
    if not rows:
        return
    fig, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 4.2), squeeze=False)
    for ax, r in zip(axes[0], rows):
        pc, mc = r["curve_predicted"], r["curve_measured"]
        ax.step([t for t, _ in pc], [v for _, v in pc], where="post", color="#2a7", label="predicted")
        ax.plot([t for t, _ in mc], [v for _, v in mc], color="#c44", alpha=.8, label="kernel")
        c = r["compare"]
        ax.set_title(f"{r['name']}\nt90 {c['seconds_to_90']['predicted']} / {c['seconds_to_90']['measured']} s, "
                     f"CPU {100 * c['ksmd_cpu_share']['predicted']:.1f} / {100 * c['ksmd_cpu_share']['measured']:.1f}%",
                     fontsize=9)
        ax.set_xlabel("seconds after run=1")
        ax.set_ylabel("pages_sharing")
        ax.grid(alpha=.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
