"""make bench, small: every part runs and writes the promised keys (no timing is asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_writes_every_key(tmp_path):
    r = subprocess.run([sys.executable, "-m", "workers.cli", "bench", "--quick", "--out", str(tmp_path),
                        "--trace", str(tmp_path / "bench.trace.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "latest.json").read_text())
    for key in ("pages_per_s", "kernel_pages_per_s", "ratio_vs_kernel", "merge_time_ratio_vs_kernel",
                "ratio_vs_kernel_spread", "merge_time_ratio_vs_kernel_spread", "unique_pages_per_s"):
        assert key in res["scan"]
    assert res["scan"]["scanners"] == os.cpu_count() and res["scan"]["reps"] == 2
    if os.cpu_count() > 1:
        assert res["scan"]["one_scanner"]["pages_per_s"] > 0
    assert res["scan"]["detail"]["dup4"]["proto"][0]["pages_shared"] == 2048
    for part in ("ceiling", "scan", "cow"):
        rows = res["scaling"][part]
        assert [r["procs" if part == "ceiling" else "scanners" if part == "scan" else "vms"] for r in rows] == \
            list(range(1, os.cpu_count() + 1))
        assert rows[0]["speedup"] == 1.0 and all(r["speedup_spread"]["n"] == 2 for r in rows)
    assert res["trace"]["ratio_spread"]["n"] == 2 and res["trace"]["wall_ratio_spread"]["n"] == 2
    assert res["trace"]["cpu_seconds_on"] > 0 and res["cow"]["ratio_vs_pipe_spread"]["n"] == 2
    for key in ("p50_us", "p99_us", "pipe_p50_us", "ratio_vs_pipe", "kernel_us", "asleep_p50_us",
                "pipe_polling_p50_us"):
        assert key in res["cow"]
    assert res["cow"]["poll_us"] == 200 and len(res["cow"]["round_p50s_us"]["cow_asleep"]) == 2
    assert res["cow"]["rounds"] == 2        # (--quick; a whole run: at least 5)
    assert "fault_poll_us=0" in r.stdout and (tmp_path / "latency.png").exists()
    for mode in ("change_pte", "wrapped", "invalidate"):
        assert "secondary_faults_per_merged_page" in res["modes"][mode]
    assert res["modes"]["change_pte"]["secondary_faults_per_merged_page"] == 0
    sc = res["sidechannel"]["rows"]
    assert sc["proto/none"]["auc"]["n"] == 2 and set(sc) >= {f"proto/{m}" for m in ("none", "vusion", "domain", "zero")}
    assert (tmp_path / res["sidechannel"]["plot"]).exists()
    assert res["modes"]["wrapped"]["secondary_faults_per_merged_page"] == 1
    assert res["trace_overhead_ratio"] > 0 and res["scanner_bytes_per_page"] > 0
    assert res["stress"]["writes"] == 20000 and res["stress"]["lost"] == 0
    for mode in ("change_pte", "wrapped", "invalidate"):
        ck = res["check"]["modes"][mode]
        assert ck["violation"] is None and ck["schedules"] == 101 and ck["schedules_per_s"] > 0
    e = res["estimate"]
    assert e["same_as_scanner"] and e["dup4"]["pages_per_s"] > 0 and e["scanner_pages_per_s"] > 0
    assert e["dup4"]["memory_bytes_per_page"] > 0 and "ratio_vs_scanner" in e
    assert {"cores", "cpu", "kernel"} <= set(res["machine"])
    assert (tmp_path / "latest.md").exists() and (tmp_path / "scaling.png").exists()
    assert len([p for p in os.listdir(tmp_path) if p.endswith(".json") and p != "latest.json"
                and not p.startswith(("bench", "sidechannel"))]) == 1
    assert "| what |" in r.stdout
    trace = json.loads((tmp_path / "bench.trace.json").read_text())
    assert trace["traceEvents"]
