"""`ksm-proto estimate --watch`: volatility read off the samples, ksmd's timeline, the command, and (kernel-marked)
the prediction against the kernel's KSM running live on the demo workload."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from proto.layout import PAGE_SIZE
from workers.oracle import kernel_ksm
from workers.estimate import ksmd_cost
from workers.estimate.watch import Plan, Watch, _Series, classify, plan_pages, predict, simulate, watch
from workers.estimate.memsource import PidSource, Source
from workers.estimate.watch_demo import WORKLOADS, Demo, DemoShape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KOK, KWHY = kernel_ksm.available()
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="reading other processes' memory needs root")
COST = {"first": 0.001, "volatile": 0.001, "unique": 0.002, "merge": 0.003, "ksm": 0.0005, "batch": 0.0,
        "kappa": 1.0, "cold": 0.0, "cold_pages": 0, "cold_first": 0.0, "hz": 250}


def synthetic(rows: list[list[int | None]]) -> Watch:
    """A watch of one source, a sample per row (1 s apart), a digest per page (None: the page was not there)."""
    w = Watch([])
    s = _Series(Source(name="synthetic"))
    for j, row in enumerate(rows):
        ids = np.array([i for i, v in enumerate(row) if v is not None], np.int64) * PAGE_SIZE
        d = np.array([[v, 7] for v in row if v is not None], np.int64).reshape(-1, 2)
        s.times.append(float(j))
        s.ids.append(ids)
        s.digs.append(d)
    w.series = [s]
    return w


# pages: A still, B new bytes every sample, C changes at samples 4 and 8, D absent from sample 0,
# E and F the same bytes, still
ROWS = [[1, 100 + j, 50 + (j >= 4) + (j >= 8), None if j == 0 else 60, 9, 9] for j in range(9)]


def test_classify_reads_the_probability_off_the_samples():
    w = synthetic(ROWS)
    c1 = classify(w, 1.0)                      # lag 1: 8 pairs of samples
    assert c1["lag"] == 1 and c1["dt"] == 1.0
    assert c1["p"][0].tolist() == [0.0, 1.0, 2 / 8, 1 / 8, 0.0, 0.0]
    c2 = classify(w, 2.0)                      # lag 2: 7 pairs; C differs across 4 at j=2,3 and across 8 at j=6
    assert c2["lag"] == 2
    assert c2["p"][0].tolist() == [0.0, 1.0, 3 / 7, 1 / 7, 0.0, 0.0]
    c3 = classify(w, 20.0)                     # longer than the watch: from the change rate, at most 1
    assert c3["p"][0].tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert c1["rate"][0].tolist() == [0.0, 1.0, 0.25, 0.125, 0.0, 0.0]
    assert c1["saturated"][0].tolist() == [False, True, False, False, False, False]


def test_classify_between_lags_and_below_one_interval():
    """T between two lags: linear between them (a page rewritten every R s changes between two visits T apart with
    probability min(1, T / R)); T below the interval: T * rate, a page changed in every interval (B) stays 1 (it may
    change faster than the samples tell, and --verify-kernel's helper rewrites it every 5 ms)."""
    w = synthetic(ROWS)
    c = classify(w, 1.5)
    assert c["p"][0].tolist() == pytest.approx([0.0, 1.0, (2 / 8 + 3 / 7) / 2, (1 / 8 + 1 / 7) / 2, 0.0, 0.0])
    c = classify(w, 0.25)
    assert c["p"][0].tolist() == pytest.approx([0.0, 1.0, 0.25 * 2 / 8, 0.25 * 1 / 8, 0.0, 0.0])
    assert c["lag"] == 1
    assert classify(w, 0.0)["p"][0].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_plan_counts_the_stable_part_only():
    w = synthetic(ROWS)
    knobs = {"max_page_sharing": 256, "use_zero_pages": 0}
    plan = plan_pages(w, classify(w, 2.0), COST, knobs)
    # stable: A, C (3/7 < 1/2), D (1/7), E, F; E and F merge: one KSM page, one sharing
    assert plan.counters["pages_volatile"] == round(1 + 3 / 7 + 1 / 7)
    assert (plan.counters["pages_shared"], plan.counters["pages_sharing"], plan.counters["pages_unshared"]) == (1, 1, 3)
    assert plan.counters["pages_stable"] == 5 and plan.merge_pos.tolist() == [5]
    assert plan.counters["bytes_saved"] == PAGE_SIZE


def test_batch_arithmetic():
    """The timer wheel fires a sleep of J jiffies on the (J + 1)th tick; a scan takes ceil((pages + 1) / pts) batches;
    the first pages of a batch cost more (cold_factor)."""
    c = {"hz": 250, "kappa": 1.0, "batch": 0.0}
    assert ksmd_cost.msecs_to_jiffies(20, 250) == 5 and ksmd_cost.msecs_to_jiffies(1, 250) == 1
    assert ksmd_cost.batch_cycle(0.001, 20, c) == pytest.approx((0.001, 0.024))        # 6 ticks of 4 ms
    assert ksmd_cost.batch_cycle(0.010, 20, c) == pytest.approx((0.010, 0.032))        # + (10 - 2) ms
    assert ksmd_cost.batch_cycle(0.010, 20, {**c, "kappa": 1.5, "batch": 0.001}) == pytest.approx((0.015, 0.038))
    assert ksmd_cost.batch_cycle(0.010, 20, {**c, "hz": 1000}) == pytest.approx((0.010, 0.0305))
    assert ksmd_cost.batch_cycle(0.010, 0, c) == (0.010, 0.010)                        # no sleep at all
    assert [ksmd_cost.batches_per_scan(10, 4), ksmd_cost.batches_per_scan(8, 4), ksmd_cost.batches_per_scan(8, 100)] \
        == [3, 3, 1]
    cold = {"cold": 1.0, "cold_pages": 100}
    assert ksmd_cost.cold_factor(100, cold) == pytest.approx(1 + (1 - np.exp(-1)))
    assert ksmd_cost.cold_factor(1000, cold) == pytest.approx(1 + 0.1 * (1 - np.exp(-10)))
    assert ksmd_cost.cold_factor(100, {"cold": 0.0, "cold_pages": 0}) == 1.0
    pre = np.concatenate([[0.0], np.cumsum(np.full(300, 1e-6))])
    assert ksmd_cost.batch_cpu_s(pre, 100, 100, cold) == pytest.approx(1e-4 * (2 - np.exp(-1)))
    assert ksmd_cost.batch_cpu_s(pre, 0, 10, {"batch_cpu": 1e-3}) == pytest.approx(1e-3 + 1e-5)
    # a volatile visit is not raised by a cold batch: here 40 of the 100 pages' 1 us, counted once
    flat = np.concatenate([[0.0], np.cumsum(np.where(np.arange(300) % 5 < 2, 1e-6, 0.0))])
    assert ksmd_cost.batch_cpu_s(pre, 100, 100, cold, flat) == pytest.approx(6e-5 * (2 - np.exp(-1)) + 4e-5)


def test_fit_in_place_recovers_the_model():
    """Runs made by the model itself (scale 1.2, cold 0.6, cold_pages 300, batch 0.5 ms): the fit gives them back."""
    from workers.estimate.ksmd_cost import _batches, fit_in_place
    n = 2048
    hot = np.concatenate([np.full(1024, 4e-6), np.full(1024, 2.5e-7)])
    pre = np.concatenate([[0.0], np.cumsum(hot)])
    want = {"hz": 250, "kappa": 1.0, "batch": 0.0005, "cold": 0.6, "cold_pages": 300}
    runs = []
    for pts in (100, 400, 1000, n + 1):
        cs = [1.2 * float(pre[p + k] - pre[p]) * ksmd_cost.cold_factor(k, want) for p, k in _batches(n, pts)]
        runs.append((pts, sum(cs), sum(ksmd_cost.batch_cycle(c, 20, want)[1] for c in cs)))
    assert [len(_batches(n, p)) for p in (100, 1024, n + 1)] == [21, 3, 1]
    fit = fit_in_place(hot, runs, 20, 250)
    assert fit["cold_pages"] == 300
    assert fit["scale"] == pytest.approx(1.2) and fit["cold"] == pytest.approx(0.6)
    assert fit["batch"] == pytest.approx(0.0005)
    # cold_pages stays at most a sixth of the region (here 341: the grid's 300), so that the one-batch run pins
    # the warm cost, even where the runs were made with 1000
    made = {**want, "cold_pages": 1000}
    runs = [(pts, sum(cs), 0.1) for pts in (100, 400, 1000, n + 1) for cs in [[
        1.2 * float(pre[p + k] - pre[p]) * ksmd_cost.cold_factor(k, made) for p, k in _batches(n, pts)]]]
    assert fit_in_place(hot, runs, 20, 250)["cold_pages"] == 300


def test_the_first_scan_is_priced_by_cold_first_the_rest_by_cold():
    """Batches of 4 pages, cold_pages 4: w(4) = 1 - 1/e.  Scan 1 (first visits, 1 ms hot) costs 1 + cold_first * w
    times its hot cost, scans 2 on 1 + cold * w times theirs."""
    plan = Plan(8, np.full(8, 0.001), np.full(8, 0.002), np.full(8, 0.0005), np.array([], np.int64),
                {"pages_sharing": 0})
    w = 1 - np.exp(-1)
    cost = {**COST, "cold": 1.0, "cold_pages": 4, "cold_first": 0.25}
    sim = simulate(plan, {"pages_to_scan": 4, "sleep_millisecs": 20}, cost, horizon=1.0)
    s1 = 2 * 4 * 0.001 * (1 + 0.25 * w)                 # two full batches, then the empty one that ends the scan
    s2 = 2 * 4 * 0.002 * (1 + w)
    assert sim["scan_cpu"][:2] == pytest.approx([s1, s1 + s2])
    old = simulate(plan, {"pages_to_scan": 4, "sleep_millisecs": 20}, {**cost, "cold_first": 1.0}, horizon=1.0)
    assert old["scan_cpu"][0] == pytest.approx(2 * 4 * 0.001 * (1 + w))


def test_fit_in_place_takes_the_median_of_repeats():
    """A run repeated three times, one of them 24% slow (seen on a busy machine): the fit is that of the median."""
    from workers.estimate.ksmd_cost import median_runs
    runs = [(100, 1.0, 2.0), (6145, 0.6, 0.1), (100, 1.1, 2.2), (6145, 0.744, 0.12), (100, 0.9, 1.9),
            (6145, 0.61, 0.11)]
    assert median_runs(runs) == [(100, 1.0, 2.0), (6145, 0.61, 0.11)]


def test_simulate_batch_by_batch():
    """pages_to_scan 4 over 10 pages, sleep 20 ms (5 jiffies at HZ 250, so 6 ticks, 24 ms, from a short batch's
    start to the next): scan ends and the merge, by hand."""
    plan = Plan(10, np.full(10, 0.001), np.full(10, 0.002), np.full(10, 0.0005), np.array([7]),
                {"pages_sharing": 1})
    sim = simulate(plan, {"pages_to_scan": 4, "sleep_millisecs": 20}, COST, horizon=0.25)
    # a batch of w seconds' work starts the next one .024 + max(0, w - .002) later.  Scan 1 (1 ms a page):
    # 4 pages at 0 (next at .026), 4 at .026 (next .052), 2 pages and the scan's end at .052 + .002 = .054 (next .076).
    # Scan 2 (2 ms a page): .076 (8 ms, next .106), .106 + .008 = .114 (page 7 merges: 50% and 90%; next .136),
    # .136 + .004 = .140 (next .162).  Scan 3 (0.5 ms): .162 (next .186), .186 (next .210), .210 + .001 = .211.
    # Scan 4 starts at .234, its first batch ends at .236, the next would start at .258.
    assert sim["scan_ends"] == pytest.approx([0.054, 0.140, 0.211])
    assert sim["scan_starts"] == pytest.approx([0.0, 0.076, 0.162, 0.234])
    assert sim["seconds_to_50"] == pytest.approx(0.114) and sim["seconds_to_90"] == pytest.approx(0.114)
    assert sim["cpu_seconds"] == pytest.approx(0.010 + 0.020 + 0.005 + 0.002)
    assert sim["cpu_by_horizon"] == pytest.approx(0.037) and sim["elapsed"] == pytest.approx(0.258)
    assert sim["pages_to_scan"] == [4]
    # ksmd's CPU by the horizon, as the kernel's is measured: half of the batch from .026 to .030 by .028
    short = simulate(plan, {"pages_to_scan": 4, "sleep_millisecs": 20}, COST, horizon=0.028)
    assert short["cpu_by_horizon"] == pytest.approx(0.004 + 0.002) and short["cpu_seconds"] == pytest.approx(0.008)
    # 8 pages, pages_to_scan 4: the call after page 8 is a batch of its own (an empty one): the scan ends at .052
    even = Plan(8, np.full(8, 0.001), np.full(8, 0.001), np.full(8, 0.001), np.array([], np.int64),
                {"pages_sharing": 0})
    assert simulate(even, {"pages_to_scan": 4, "sleep_millisecs": 20}, COST, horizon=0.06)["scan_ends"] == \
        pytest.approx([0.052])


def test_simulate_runs_the_kernels_advisor():
    """With advisor_mode=scan-time the pages_to_scan sequence is workers/mm/ksm/advisor.py's on the simulated scans."""
    from workers.mm.ksm.advisor import advisor_start_pages, scan_time_advisor
    n = 3000
    plan = Plan(n, np.full(n, 1e-4), np.full(n, 1e-4), np.full(n, 1e-4), np.array([], np.int64), {"pages_sharing": 0})
    knobs = {"advisor_mode": 1, "sleep_millisecs": 100, "advisor_min_pages_to_scan": 500, "advisor_target_scan_time": 2,
             "advisor_max_cpu": 70, "advisor_max_pages_to_scan": 30000}
    sim = simulate(plan, knobs, COST, horizon=30, runtime0_ns=3_000_000_000)
    ctx, pts = advisor_start_pages(500)
    want = [pts]
    for start, end in zip(sim["scan_starts"], sim["scan_ends"]):
        cpu = 3.0 + n * 1e-4 * (len(want))
        pts, _ = scan_time_advisor(ctx, pts, int((end - start) * 1000), int(cpu * 1e9), target_scan_time=2,
                                   max_cpu=70, max_pages_to_scan=30000)
        want.append(pts)
    assert sim["pages_to_scan"] == want and len(want) > 3
    # the first scan: 500 pages a batch, 7 batches (the 7th only ends the scan), 26 ticks between short batches
    assert sim["scan_ends"][0] == pytest.approx(6 * (0.104 + 0.050 - 0.002))


def _estimate(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "workers.tools.cli", "estimate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_watch_a_file_exact(tmp_path):
    """A still file: nothing volatile; 8 copies of A and 4 of B merge (7 + 3 sharing), 4 unique pages wait; the
    times follow the given per-page costs exactly (one batch a scan)."""
    pages = [b"A" * PAGE_SIZE] * 8 + [b"B" * PAGE_SIZE] * 4 + [bytes([i]) * PAGE_SIZE for i in range(1, 5)]
    f = tmp_path / "img"
    f.write_bytes(b"".join(pages))
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps(COST))
    r = _estimate("--file", str(f), "--watch", "1", "--interval", "0.25", "--pages-to-scan", "100",
                  "--sleep-millisecs", "20", "--ksmd-cost", str(cost), "--max-page-sharing", "256",
                  "--use-zero-pages", "0", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["samples"] == 5
    assert (res["pages_volatile"], res["pages_shared"], res["pages_sharing"], res["pages_unshared"]) == (0, 2, 10, 4)
    assert res["bytes_saved"] == 10 * PAGE_SIZE
    # one batch a scan; a batch of w s starts the next .024 + (w - .002) later (sleep 20 ms: 6 ticks at HZ 250).
    # scan 1: 16 pages at 1 ms = .016 (next at .038); scan 2: A's first copy .002, 7 merges .003, B: .002 + 3 * .003,
    # 4 unique .002 = .042 -> .080 (every merge in its one batch); then 12 KSM pages * .0005 + 4 * .002 = .014, a
    # scan every .024 + .012
    assert res["seconds_to_50"] == res["seconds_to_90"] == 0.080
    assert res["full_scan_seconds"] == 0.036
    assert res["curve"][0]["t"] == 0.0 and res["curve"][-1]["pages_sharing"] == 10
    assert 0 < res["ksmd_cpu_share"] < 1


def test_watch_bad_input(tmp_path):
    f = tmp_path / "img"
    f.write_bytes(b"x" * PAGE_SIZE)
    r = _estimate("--file", str(f), "--watch", "0")
    assert r.returncode == 2 and "--watch must be a positive number of seconds, not 0.0" in r.stderr
    r = _estimate("--file", str(f), "--watch", "1", "--interval", "2")
    assert r.returncode == 2 and "--interval must be above 0 and at most the --watch length" in r.stderr
    r = _estimate("--file", str(f), "--watch", "1", "--pages-to-scan", "5", "--advisor-mode", "scan-time")
    assert r.returncode == 2 and "the advisor sets pages_to_scan itself" in r.stderr
    r = _estimate("--file", str(f), "--watch", "1", "--advisor-target-scan-time", "0")
    assert r.returncode == 2 and "advisor_target_scan_time=0 out of range" in r.stderr
    bad = tmp_path / "cost.json"
    bad.write_text(json.dumps({"first": 1}))
    r = _estimate("--file", str(f), "--watch", "1", "--ksmd-cost", str(bad))
    assert r.returncode == 2 and "missing or negative volatile" in r.stderr
    assert "Traceback" not in r.stderr


@root_only
def test_a_source_that_exits_is_reported_and_the_rest_counted():
    shape = DemoShape(procs=2, dup=64, uniq=32, slow=0, fast=16)
    with Demo(shape) as d:
        srcs = [PidSource(p).open() for p in d.pids]
        timer = threading.Timer(1.0, d.end, args=(1,))
        timer.start()
        try:
            w = watch(srcs, 2.5, 0.25)
        finally:
            timer.join()
        assert len(w.problems) == 1
        assert w.problems[0].startswith(f"pid:{d.pids[1]} (demo-2): exited during the watch")
        assert [s.src.pid for s in w.alive()] == [d.pids[0]]
        assert w.series[1].gone_at is not None and len(w.series[0].times) > len(w.series[1].times)
        pred = predict(w, {"pages_to_scan": 1000, "sleep_millisecs": 20, "max_page_sharing": 256,
                           "use_zero_pages": 0}, COST, 2.0)
        assert pred["pages"] == len(w.series[0].ids[-1])
        assert pred["pages_volatile"] >= 16                     # the survivor's fast pages


def _demo_pages(pid: int, npages: int) -> list[bytes]:
    """The pages of a demo process's one area (the anonymous mapping of npages pages), read now."""
    with open(f"/proc/{pid}/maps") as f:
        spans = [[int(x, 16) for x in ln.split()[0].split("-")] for ln in f if len(ln.split()) == 5]
    (start, _), = [(a, b) for a, b in spans if b - a == npages * PAGE_SIZE]
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        b = os.pread(fd, npages * PAGE_SIZE, start)
    finally:
        os.close(fd)
    return [b[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(npages)]


@root_only
def test_the_volatile_workload_is_built_as_its_shape_says():
    """The second workload of the live check: six processes; per process 384 pages the same in all, 256
    of its own that hold still, 768 rewritten every 2.5 s and 512 every 0.15 s (all of them rewritten
    over two slow periods; the still ones never)."""
    (n0, demo), (name, s) = WORKLOADS
    assert (n0, name) == ("demo", "volatile") and demo == DemoShape()
    assert s.procs > demo.procs and s.dup < s.slow + s.fast and s.slow_s < demo.slow_s and s.fast_s > demo.fast_s
    n = s.dup + s.uniq + s.slow + s.fast
    with Demo(s) as d:
        assert len(d.pids) == 6
        assert [open(f"/proc/{p}/comm").read().strip() for p in d.pids] == [f"demo-{i}" for i in range(1, 7)]
        before = [_demo_pages(p, n) for p in d.pids]
        time.sleep(2 * s.slow_s)
        after = [_demo_pages(p, n) for p in d.pids]
    same_in_all = [i for i in range(n) if len({pages[i] for pages in before}) == 1]
    assert same_in_all == list(range(s.dup))
    own = [pages[i] for pages in before for i in range(s.dup, n)]
    assert len(set(own)) == len(own) == 6 * (s.uniq + s.slow + s.fast)
    for b, a in zip(before, after):
        assert [i for i in range(n) if a[i] != b[i]] == list(range(s.dup + s.uniq, n))


def test_the_doc_holds_the_committed_live_results():
    """docs/estimate.md's tables of the live check are live.markdown() of bench/results/estimate-live.json,
    which holds every workload, the first also under the keys it had before there were several."""
    from workers.estimate import live
    with open(os.path.join(ROOT, "bench", "results", "estimate-live.json")) as f:
        e = json.load(f)
    assert [w["name"] for w in e["workloads"]] == [n for n, _ in WORKLOADS]
    assert e["settings"] == e["workloads"][0]["settings"] and e["workload"] == e["workloads"][0]["workload"]
    assert e["ok"] == all(w["ok"] for w in e["workloads"])
    assert [len(w["settings"]) for w in e["workloads"]] == [len(live.SETTINGS)] * len(WORKLOADS)
    with open(os.path.join(ROOT, "docs", "estimate.md")) as f:
        assert live.markdown(e) in f.read(), "docs/estimate.md: the live check's tables are not the results file's"


@root_only
@pytest.mark.kernel
@pytest.mark.skipif(not KOK, reason=f"kernel KSM not usable here (/sys/kernel/mm/ksm not writable?): {KWHY}")
def test_predicted_against_the_kernel_live():
    """Short: ksmd's cost measured now, the demo watched 5 s, the kernel running 9 s at pages_to_scan 100,
    sleep 20 ms; savings within 10%, pages_volatile within 20%, time to 90% and ksmd CPU within 25%."""
    from workers.estimate.live import compare_live
    out = compare_live(settings=[("pages_to_scan=100", ["--pages-to-scan", "100", "--sleep-millisecs", "20"], 9.0)],
                       shape=DemoShape(procs=3), watch_s=5.0, interval=0.25, calibrate_pages=8192)
    row = out["settings"][0]
    assert "compare" in row, row.get("error")
    bad = {k: v for k, v in row["compare"].items() if v.get("ok") is False}
    assert not bad, bad
    assert row["compare"]["bytes_saved"]["measured"] >= 2 * 1024 * PAGE_SIZE     # the dup pages of 3 processes
    assert kernel_ksm.read_knob("run") == "0"
