"""make bench, small: every part runs and writes the promised keys (no timing is asserted)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick(out, *parts, trace=None):
    """`ksm-proto bench --quick --only PARTS --out OUT`: (the process, its latest.json)."""
    r = subprocess.run([sys.executable, "-m", "workers.tools.cli", "bench", "--quick", "--out", str(out), "--only", *parts,
                        *(["--trace", str(trace)] if trace else [])],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "latest.json").read_text())
    assert [p for p in ("scan", "cow", "modes", "scaling", "trace", "stress", "check", "estimate") if p in res] == \
        [p for p in ("scan", "cow", "modes", "scaling", "trace", "stress", "check", "estimate") if p in parts]
    assert {"cores", "cpu", "kernel"} <= set(res["machine"])
    assert (out / "latest.md").exists() and "| what |" in r.stdout
    dated = [p for p in os.listdir(out) if p.endswith(".json") and p != "latest.json"
             and not p.startswith(("bench", "sidechannel-"))]      # (those parts' own files too)
    assert len(dated) == 1 and dated[0].startswith("chaos-") == ("chaos" in parts), dated   # one copy of the run
    return r, res


# (the bench's parts in two runs, so that the suite's processes run them side by side: the kernel's
# and the others)
@pytest.mark.kernel          # (the scan, COW and estimate parts run the kernel's ksmd beside ours)
def test_bench_quick_scan_cow_and_estimate_write_every_key(tmp_path):
    r, res = quick(tmp_path, "scan", "cow", "estimate")
    for key in ("pages_per_s", "kernel_pages_per_s", "ratio_vs_kernel", "merge_time_ratio_vs_kernel",
                "ratio_vs_kernel_spread", "merge_time_ratio_vs_kernel_spread", "unique_pages_per_s"):
        assert key in res["scan"]
    assert res["scan"]["scanners"] == os.cpu_count() and res["scan"]["reps"] == 2
    if os.cpu_count() > 1:
        assert res["scan"]["one_scanner"]["pages_per_s"] > 0
        w = res["scan"]["waits"]        # the traced run: every scanner's waits, within the leader's scan
        names = ["ksmd"] + [f"ksmd{k}" for k in range(1, os.cpu_count())]
        assert sorted(w["per_scanner"]) == sorted(names) and sorted(w["ksm_lock_share"]) == sorted(names)
        assert all(0 <= v <= 1 for v in list(w["ksm_lock_share"].values()) + list(w["barrier_share"].values()))
        assert "waiting for another's ksm lock" in r.stdout
    assert res["scan"]["detail"]["dup4"]["proto"][0]["pages_shared"] == 2048
    for run in res["scan"]["detail"]["dup4"]["proto"]:      # who used the CPUs (None: a merge too short to tell)
        assert {"scanner_cpu_seconds", "cores_busy", "others_share", "steal_seconds"} <= set(run)
        assert run["cores_busy"] is None or 0 <= run["cores_busy"] <= os.cpu_count() + 0.1
    if os.cpu_count() > 1:
        assert {"merge_speedup_spread", "cores_busy_spread", "cpu_ratio_spread"} <= set(res["scan"]["one_scanner"])
        assert res["scan"]["one_scanner"]["merge_speedup_spread"]["n"] == 2
        pl = res["scan"]["pipelined"]     # N scanners with and without hashing ahead, in the same repetitions
        assert pl["merge_speedup_spread"]["n"] == 2 and 0 <= pl["used_ahead"] <= pl["hashed_ahead"]
        assert all(r["hash_ahead"] for r in res["scan"]["detail"]["dup4"]["proto"])
        assert [(r["hash_ahead"], r["hashed_ahead"]) for r in res["scan"]["detail"]["dup4"]["proto_serial"]] == \
            [(False, 0)] * 2
    assert res["scanner_bytes_per_page"] > 0 and res["cow"]["ratio_vs_pipe_spread"]["n"] == 2
    for key in ("p50_us", "p99_us", "pipe_p50_us", "ratio_vs_pipe", "kernel_us", "asleep_p50_us",
                "pipe_polling_p50_us", "ratio_vs_polling_pipe", "ratio_vs_kernel", "channel_ratio_vs_pipe", "core_p50_us"):
        assert key in res["cow"]
    assert res["cow"]["ratio_vs_polling_pipe_spread"]["n"] == 2
    assert res["cow"]["poll_us"] == 200 and len(res["cow"]["round_p50s_us"]["cow_asleep"]) == 2
    assert res["cow"]["rounds"] == 2        # (--quick; a whole run: at least 5)
    assert len(res["cow"]["round_others_share"]) == 2 and "other processes' CPU in each round" in r.stdout
    assert all(v is None or 0 <= v <= 1.5 for v in res["cow"]["round_others_share"])
    assert "fault_poll_us=0" in r.stdout and "its core and shared-memory effects alone" in r.stdout
    assert (tmp_path / "latency.png").exists()
    e = res["estimate"]
    assert e["same_as_scanner"] and e["dup4"]["pages_per_s"] > 0 and e["scanner_pages_per_s"] > 0
    assert e["dup4"]["memory_bytes_per_page"] > 0 and "ratio_vs_scanner" in e


def test_bench_quick_modes_scaling_trace_stress_and_check_write_every_key(tmp_path):
    r, res = quick(tmp_path, "modes", "scaling", "trace", "stress", "check", trace=tmp_path / "bench.trace.json")
    for part in ("ceiling", "scan", "cow"):
        rows = res["scaling"][part]
        assert [r["procs" if part == "ceiling" else "scanners" if part == "scan" else "vms"] for r in rows] == \
            list(range(1, os.cpu_count() + 1))
        assert rows[0]["speedup"] == 1.0 and all(r["speedup_spread"]["n"] == 2 for r in rows)
    assert (tmp_path / "scaling.png").exists()
    assert res["trace"]["ratio_spread"]["n"] == 2 and res["trace"]["wall_ratio_spread"]["n"] == 2
    assert res["trace"]["one_cpu_ratio_spread"]["n"] == 2 and res["trace"]["cpu"] in os.sched_getaffinity(0)
    det = res["trace"]["reps_detail"]       # each repetition's ratios, and what other processes took meanwhile
    assert len(det) == 2 and all(d["ratio"] > 0 and d["one_cpu_ratio"] > 0 for d in det)
    assert res["trace"]["ratio_spread"]["min"] == min(d["ratio"] for d in det)
    assert res["trace"]["one_cpu_ratio_spread"]["max"] == max(d["one_cpu_ratio"] for d in det)
    assert all(d["others_share_max"] is None or 0 <= d["others_share_max"] <= 1.5 for d in det)
    assert "per repetition: CPU ratio" in r.stdout
    assert res["trace"]["cpu_seconds_on"] > 0 and res["trace_overhead_ratio"] > 0
    rc = res["trace"]["record_cost_us"]
    assert rc["records"] == 20_000 and min(rc["append"], rc["serialize_write"], rc["all_in"]) > 0
    assert "trace cost per record" in r.stdout
    trace = json.loads((tmp_path / "bench.trace.json").read_text())
    assert trace["traceEvents"]
    for mode in ("change_pte", "wrapped", "invalidate"):
        assert "secondary_faults_per_merged_page" in res["modes"][mode]
    assert res["modes"]["change_pte"]["secondary_faults_per_merged_page"] == 0
    assert res["modes"]["wrapped"]["secondary_faults_per_merged_page"] == 1
    assert res["stress"]["writes"] == 20000 and res["stress"]["lost"] == 0
    for mode in ("change_pte", "wrapped", "invalidate"):
        ck = res["check"]["modes"][mode]
        assert ck["violation"] is None and ck["schedules"] == 101 and ck["schedules_per_s"] > 0


@pytest.mark.kernel          # (the side channel part attacks the kernel too)
def test_bench_quick_web_chaos_and_sidechannel_write_every_key(tmp_path):
    r, res = quick(tmp_path, "web", "chaos", "sidechannel")
    assert "skipped" in res["web"] or (res["web"]["ratio_spread"]["n"] == 2 and res["web"]["frames"] == 65536)
    ch = res["chaos"]           # (--quick: 3 kills of each kind, one in each of 3 configurations)
    assert ch["kills"] == {"faultd": 3, "ksmd": 3, "vm": 3}
    assert [(c["mode"], c["scanners"], c["fault_handlers"]) for c in ch["configs"]] == \
        [("change_pte", 1, 1), ("invalidate", 1, 1), ("wrapped", 2, 2)]
    assert (ch["lost"], ch["bad_pages"], ch["failed_rounds"], ch["frame_problems"]) == (0, 0, 0, [])
    assert list(tmp_path.glob("chaos-*.json"))
    sc = res["sidechannel"]["rows"]
    assert sc["proto/none"]["auc"]["n"] == 2 and set(sc) >= {f"proto/{m}" for m in ("none", "vusion", "domain", "zero")}
    assert (tmp_path / res["sidechannel"]["plot"]).exists()


# ---------------------------------------------------------------------------- bench --report
def _table_cells(text: str) -> list[tuple[list[str], list[str]]]:
    """(header, row) of every data row of every table with a `key` column in a markdown page."""
    out, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells
        elif not set(line) <= set("|-"):
            if "key" in header:
                out.append((header, cells))
    return out


def test_report_puts_every_results_file_side_by_side_and_every_figure_comes_from_one(tmp_path):
    from bench import report
    src = os.path.join(ROOT, "bench", "results")
    names = ["20261123-161705-vm.json", "20261125-224841-vm-cow.json", "20261126-052150-vm.json"]
    for n in names:
        shutil.copy(os.path.join(src, n), tmp_path / n)
    shutil.copy(os.path.join(src, "20261126-052150-vm.json"), tmp_path / "latest.json")   # a copy: left out
    page = tmp_path / "docs" / "performance.md"
    r = subprocess.run([sys.executable, "-m", "workers.tools.cli", "bench", "--report", str(page), "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"from 3 results file(s) in {tmp_path}" in r.stdout
    text = page.read_text()
    runs = {n[:-len(".json")]: json.loads((tmp_path / n).read_text()) for n in names}
    # the runs table: one row per file, newest first, each linking to its file
    assert [ln.split("]")[0][3:] for ln in text.splitlines() if ln.startswith("| [")][:3] == sorted(runs, reverse=True)
    assert "latest" not in text
    rows = _table_cells(text)
    assert len(rows) > 60
    seen = set()
    for header, cells in rows:
        key = cells[1].strip("`")
        for col, value in zip(header[3:], cells[3:]):
            name = col[1:col.index("]")]
            assert col == f"[{name}](../{name}.json)"
            assert value == report.cell(report.get(runs[name], key), key), (name, key, value)
            seen.add(name)
    assert seen == set(runs)
    # one figure each way: a ratio over repetitions, an older run's one ratio, a run without the part
    assert ("| scanner / ksmd, pages/s | `scan.ratio_vs_kernel_spread` | >= 2.2x with 2 scanners | "
            "2.41 (2.17-2.55, n=3) | - |") in text
    cow = next(c for h, c in rows if c[1] == "`cow.p50_us`")
    assert cow[3:] == ["73.2", "212.1", "164.1"]          # 052150, 224841-cow, 161705


def test_performance_page_is_the_report_of_the_committed_results():
    """docs/performance.md holds no hand-typed figure: it is what `ksm-proto bench --report` writes now."""
    from bench import report
    with open(report.PAGE) as f:
        assert f.read() == report.render(), "docs/performance.md is stale: run `ksm-proto bench --report`"


def test_report_of_a_broken_results_file_names_it(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    r = subprocess.run([sys.executable, "-m", "workers.tools.cli", "bench", "--report", str(tmp_path / "p.md"), "--out",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(f"ksm-proto bench --report: {tmp_path / 'x.json'}: not JSON")
    assert "Traceback" not in r.stderr and not (tmp_path / "p.md").exists()


def test_readme_headline_is_the_report_of_the_committed_results():
    """The README's headline figures are typed by no one: the block is what `ksm-proto bench --report`
    writes from bench/results, each figure with the file, date and host it comes from."""
    from bench import report
    with open(report.README) as f:
        text = f.read()
    a, b = text.index(report.BEGIN), text.index(report.END) + len(report.END)
    assert text[a:b] == report.headline(), "README.md's headline is stale: run `ksm-proto bench --report`"
    for line in report.headline().splitlines()[4:-2]:
        assert "](bench/results/" in line and "no results file" not in line, line


def test_the_mypyc_trials_source_edits_still_apply_and_leave_the_cow_core_working(tmp_path):
    """bench/mypyc_trial.py compiles an edited copy of the fault path's cores (TRIAL_EDITS, and the
    Backend moved to a module of its own): every edit still finds its text exactly once, and the edited
    copy, as plain Python (no mypy needed), still serves the trial's round: each page a COW copy."""
    from bench import mypyc_trial
    mypyc_trial.copy_and_edit(str(tmp_path))
    assert (tmp_path / "workers/runtime/interp_backend.py").exists()
    try:
        import mypy_extensions  # noqa: F401  (the edited effects.py imports its mypyc_attr)
    except ImportError:         # (not a dependency: interpreted, mypyc_attr is a decorator that does nothing)
        (tmp_path / "mypy_extensions.py").write_text("def mypyc_attr(*attrs, **kwattrs):\n    return lambda x: x\n")
    script = "import workers.runtime.interp_backend\n" + mypyc_trial._ROUND     # (only the edited copy has it)
    r = subprocess.run([sys.executable, "-c", script, "32", "0"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["compiled"] is False and out["core_p50_us"] > 0


def test_the_channel_probe_runs_every_pair_of_ends_and_says_what_each_adds(tmp_path):
    """bench/channel_probe.py (docs/performance-notes.md, "The channel"): the pipe and the four pairs of
    ends (raw uvloop or our Channel, echo/caller), each a real round trip between two processes, and the
    differences it reports are those of its own figures."""
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "bench/channel_probe.py", "--reps", "2", "--n", "300", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    p = res["p50_us"]
    assert list(p) == ["pipe", "raw/raw", "raw/channel", "channel/raw", "channel/channel"]
    assert all(len(v) == 2 and min(v) > 0 for v in p.values())
    both = [y - x for x, y in zip(p["raw/raw"], p["channel/channel"])]
    assert res["added_us"]["both"]["n"] == 2
    assert abs(res["added_us"]["both"]["median"] - (both[0] + both[1]) / 2) < 0.2     # (of rounded p50s)
    assert "added over raw uvloop, our echo end" in r.stdout
    bad = subprocess.run([sys.executable, "bench/channel_probe.py", "--reps", "0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--reps and --n must be at least 1" in bad.stderr


def _spin_cpu(seconds: float) -> None:
    """Burn `seconds` of this process's own CPU time, then exit (a forked child)."""
    import time
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    os._exit(0)


def test_cpu_share_tells_the_scanners_cpu_from_other_processes(tmp_path):
    """bench.run.CpuShare, on real processes: a child of ours that burns 0.6 s of CPU is counted as the
    'scanner' it is named as; a process that is not under us (forked twice, its parent gone) burning
    0.6 s is counted among the other processes' CPU; a stretch shorter than 0.5 s tells nothing."""
    import time
    from bench.run import CpuShare

    class Proc:
        def __init__(self, pid):
            self.pid = pid
    r, w = os.pipe()
    mid = os.fork()
    if mid == 0:                                  # the middle process: forks the outsider and is gone
        os.close(r)
        pid = os.fork()
        if pid == 0:
            time.sleep(0.2)                       # (spins once the share below has started)
            _spin_cpu(0.6)
        os.write(w, str(pid).encode())
        os._exit(0)
    os.close(w)
    outsider = int(os.read(r, 64))
    os.close(r)
    os.waitpid(mid, 0)
    kid = os.fork()
    if kid == 0:
        time.sleep(0.2)
        _spin_cpu(0.6)
    try:
        share = CpuShare([Proc(kid)])
        t0 = time.monotonic()
        assert all(v is None for v in share.since(0.1).values())
        os.waitid(os.P_PID, kid, os.WEXITED | os.WNOWAIT)     # (ended, not reaped: its CPU times still read)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{outsider}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{outsider}"), "the outsider did not end"
        got = share.since(time.monotonic() - t0)
    finally:
        os.waitpid(kid, 0)
    assert 0.55 <= got["scanner_cpu_seconds"] <= 0.7, got
    assert got["others_cpu_seconds"] >= 0.5, got           # (and whatever else ran on the machine)
    assert 0 < got["cores_busy"] <= 1.05 and 0 < got["others_share"] <= 1, got
