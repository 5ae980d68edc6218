"""`ksm-proto bench --report`: docs/performance.md, written from bench/results/*.json and nothing else.

Every results file of the directory is one column (newest first), named after the file, so each
figure in the page can be traced to the file it was read from and, by the row's key, to the place
in that file (`scan.pages_per_s` is res["scan"]["pages_per_s"]). A run that did not measure a row
(an older file, a run with --only) shows "-" there. latest.json is left out when it is a copy of a
dated file (bench/run.py writes both); otherwise it is a column of its own. No figure in the page is
typed by hand: change a row here, run `ksm-proto bench --report`, commit the page.
"""
from __future__ import annotations

import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
PAGE = os.path.join(ROOT, "docs", "performance.md")
MODES = ("change_pte", "wrapped", "invalidate")

# (part, label, key, goal): key is a dotted path into one results file; "[k=v]" picks the element of a
# list whose k is v (scaling.scan[scanners=2].speedup_spread); a spread ({median, min, max, n}) is shown
# as "median (min-max)".
ROWS = [
    ("scan", "pages of 4x duplicates scanned", "scan.pages", ""),
    ("scan", "scanners (as many as cores)", "scan.scanners", ""),
    ("scan", "scanner, 4x duplicates (pages/s)", "scan.pages_per_s", ""),
    ("scan", "ksmd, the same bytes (pages/s)", "scan.kernel_pages_per_s", ""),
    ("scan", "scanner / ksmd, pages/s", "scan.ratio_vs_kernel_spread", ">= 2.2x with 2 scanners"),
    ("scan", "scanner / ksmd, pages/s (one ratio, older runs)", "scan.ratio_vs_kernel", ""),
    ("scan", "time to merge them all (s)", "scan.merge_seconds", ""),
    ("scan", "ksmd's time to merge them all (s)", "scan.kernel_merge_seconds", ""),
    ("scan", "merge time / ksmd's", "scan.merge_time_ratio_vs_kernel_spread", "<= 0.45x"),
    ("scan", "1 scanner (pages/s)", "scan.one_scanner.pages_per_s", ""),
    ("scan", "all scanners / 1 scanner, pages/s", "scan.one_scanner.speedup_spread", ">= 1.6x with 2"),
    ("scan", "1 scanner's time to merge / all scanners'", "scan.one_scanner.merge_speedup_spread", ""),
    ("scan", "all scanners: cores busy while merging", "scan.one_scanner.cores_busy_spread", ""),
    ("scan", "all scanners' CPU seconds / 1 scanner's, the same merge", "scan.one_scanner.cpu_ratio_spread", ""),
    ("scan", "pipelined rounds: merge time without / with them, all scanners", "scan.pipelined.merge_speedup_spread",
     ""),
    ("scan", "pipelined rounds: pages hashed ahead while waiting", "scan.pipelined.hashed_ahead", ""),
    ("scan", "pipelined rounds: of them, used by the next visit", "scan.pipelined.used_ahead", ""),
    ("scan", "other processes' CPU while ksm-proto merged: share of the machine, most in a run",
     "scan.others_share_max", ""),
    ("scan", "traced run of all scanners: scan seconds", "scan.waits.scan_seconds", ""),
    *[("scan", f"traced run: {who}'s share of the scan waiting for {what}", f"scan.waits.{key}.{who}", "")
      for who in ("ksmd", "ksmd1") for what, key in (("another's ksm lock", "ksm_lock_share"),
                                                      ("the round's barriers", "barrier_share"))],
    ("scan", "scanner, unique pages (pages/s)", "scan.unique_pages_per_s", ""),
    ("scan", "ksmd, unique pages (pages/s)", "scan.kernel_unique_pages_per_s", ""),
    ("scan", "scanner / ksmd, unique pages", "scan.unique_ratio_vs_kernel_spread", ""),
    ("scan", "scanner metadata (bytes/page; the kernel's rmap_item: 64)", "scanner_bytes_per_page", "<= 64"),
    ("cow", "rounds", "cow.rounds", ""),
    ("cow", "fault_poll_us", "cow.poll_us", ""),
    ("cow", "COW fault round trip p50 (us)", "cow.p50_us", ""),
    ("cow", "COW fault round trip p99 (us)", "cow.p99_us", ""),
    ("cow", "pipe ping-pong across two CPUs p50 (us)", "cow.pipe_p50_us", ""),
    ("cow", "pipe ping-pong p99 (us)", "cow.pipe_p99_us", ""),
    ("cow", "COW p50 / pipe p50, over rounds", "cow.ratio_vs_pipe_spread", "<= 3x"),
    ("cow", "COW p50 / polling pipe p50, over rounds", "cow.ratio_vs_polling_pipe_spread", "<= 6x"),
    ("cow", "COW p50 / pipe p50 (one ratio)", "cow.ratio_vs_pipe", ""),
    ("cow", "COW p99 / pipe p99", "cow.p99_ratio_vs_pipe", "<= 3x"),
    ("cow", "COW p50 with fault_poll_us=0, both ends asleep (us)", "cow.asleep_p50_us", ""),
    ("cow", "of a COW: the fault handler, FAULT read to reply sent, mean (us)", "cow.handler_mean_us", "<= 20"),
    ("cow", "of a COW: its core and shared-memory effects alone, no transport, p50 (us)", "cow.core_p50_us", ""),
    ("cow", "pipe ping-pong, both ends polling (us)", "cow.pipe_polling_p50_us", ""),
    ("cow", "pipe ping-pong, both ends on one CPU (us)", "cow.pipe_same_cpu_p50_us", ""),
    ("cow", "channel ping-pong p50 (us), the transport floor", "cow.channel_p50_us", ""),
    ("cow", "channel / pipe, over rounds", "cow.channel_ratio_spread", "<= 1.5x"),
    ("cow", "kernel COW of a KSM page (us)", "cow.kernel_us", ""),
    ("cow", "COW samples", "cow.samples", ""),
    ("cow", "other processes' CPU in each round: share of the machine", "cow.round_others_share", ""),
    *[("modes", f"{m}: {what}", f"modes.{m}.{key}", "")
      for m in MODES for what, key in (("secondary faults per merged page", "secondary_faults_per_merged_page"),
                                       ("messages per merged page", "messages_per_merged_page"),
                                       ("re-read (us/page)", "reread_us_per_page"))],
    *[("scaling", f"the machine's ceiling, {k} process(es) hashing: {what}", f"scaling.ceiling[procs={k}].{key}", "")
      for k in (1, 2, 4, 8, 16) for what, key in (("digests/s", "digests_per_s"), ("speedup", "speedup_spread"))],
    *[("scaling", f"unique pages scanned/s, {k} scanner(s): {what}", f"scaling.scan[scanners={k}].{key}",
       ">= 0.7 of linear on 16 cores" if k == 16 and key == "efficiency_spread" else "")
      for k in (1, 2, 4, 8, 16) for what, key in (("pages/s", "pages_per_s"), ("speedup", "speedup_spread"),
                                                  ("efficiency", "efficiency_spread"), ("cores busy", "cores_busy"))],
    *[("scaling", f"COW faults/s, {k} VM(s): {what}", f"scaling.cow[vms={k}].{key}", "")
      for k in (1, 2, 4, 8, 16) for what, key in (("faults/s", "cow_faults_per_s"), ("speedup", "speedup_spread"),
                                                  ("cores busy", "cores_busy"))],
    ("trace", "the work", "trace.work", ""),
    ("trace", "tracing on / off, CPU seconds of the run's processes", "trace.ratio_spread", "<= 1.10x"),
    ("trace", "the same, the processes all on one CPU", "trace.one_cpu_ratio_spread", "<= 1.10x"),
    ("trace", "tracing on / off, wall seconds", "trace.wall_ratio_spread", ""),
    ("trace", "other processes' CPU during the runs: share of the machine, most in a run", "trace.others_share_max",
     ""),
    ("trace", "CPU seconds off", "trace.cpu_seconds_off", ""),
    ("trace", "CPU seconds on", "trace.cpu_seconds_on", ""),
    ("trace", "trace file (bytes)", "trace.trace_bytes", ""),
    ("trace", "cost per record, append (us)", "trace.record_cost_us.append", ""),
    ("trace", "cost per record, serialize and write (us)", "trace.record_cost_us.serialize_write", ""),
    ("trace", "cost per record, all in (us)", "trace.record_cost_us.all_in", ""),
    *[("check", f"{m}: random schedules, schedules/s, violation", f"check.modes.{m}", "none") for m in MODES],
    ("check", "--break caught (in every mode it breaks)", "check.breaks", "all"),
    *[("check", f"{sc}: random schedules per mode, violations", f"check.{sc}", "none")
      for sc in ("fork", "two_scanners", "two_scanners_pipelined", "kill")],
    ("stress", "writes (all modes)", "stress.writes", ">= writes asked"),
    ("stress", "writes asked", "stress.writes_requested", ""),
    ("stress", "COW faults of merged pages", "stress.cow_faults_merged", ">= COW asked"),
    ("stress", "COW faults asked", "stress.min_cow_faults", ""),
    ("stress", "lost (pages, frame problems, counters, errors)", "stress.lost", "0"),
    ("stress", "seconds", "stress.seconds", ""),
    *[("stress", f"{m}: writes/s", f"stress.modes.{m}.writes_per_s", "") for m in MODES],
    *[("stress", f"{m}: COW faults of merged pages/s", f"stress.modes.{m}.cow_faults_merged_per_s", "") for m in MODES],
    ("estimate", "pages of 4x duplicates", "estimate.pages", ""),
    ("estimate", "estimate, 4x duplicates (pages/s)", "estimate.dup4.pages_per_s", ""),
    ("estimate", "estimate / scanner, pages/s", "estimate.ratio_vs_scanner", ">= 1.0x"),
    ("estimate", "estimate / ksmd, pages/s", "estimate.ratio_vs_ksmd", ""),
    ("estimate", "estimate, unique pages (pages/s)", "estimate.unique.pages_per_s", ""),
    ("estimate", "peak memory, 4x duplicates (bytes per input page)", "estimate.dup4.memory_bytes_per_page", ""),
    ("estimate", "peak memory, unique pages (bytes per input page)", "estimate.unique.memory_bytes_per_page", ""),
    ("estimate", "same counters as the scanner at stability", "estimate.same_as_scanner", "yes"),
    *[("chaos", f"kill -9 {k}: {what}", f"chaos.{key}.{k}", goal)
      for k in ("ksmd", "faultd", "vm") for what, key, goal in (
          ("kills", "kills", ">= 50"), ("death seen to successor serving p50 (s)", "recovery_p50_s", ""),
          ("death seen to successor serving p99 (s)", "recovery_p99_s", "< 2"),
          ("kills that hit a merge or COW in flight", "hit_in_flight", ""))],
    ("chaos", "counter writes", "chaos.writes", ""),
    ("chaos", "writes lost", "chaos.lost", "0"),
    ("chaos", "rounds with a frame problem or a writer error", "chaos.failed_rounds", "0"),
    *[("estimate-live", f"{w}: {what}", f"estimate-live.workloads[name={w}].{key}", goal)
      for w in ("demo", "volatile") for what, key, goal in (
          ("every value within its tolerance, every setting", "ok", "yes"),
          ("savings at the end, largest error over the settings", "worst.bytes_saved", "within 10%"),
          ("pages_volatile, largest error over the settings", "worst.pages_volatile", "within 20%"),
          ("time to 90% of the savings, largest error over the settings", "worst.seconds_to_90", "within 25%"),
          ("ksmd CPU share, largest error over the settings", "worst.ksmd_cpu_share", "within 25%"))],
    ("web", "run with the page open / closed, wall seconds", "web.ratio_spread", "<= 1.05x"),
    ("web", "the same, CPU seconds of the run's processes", "web.cpu_ratio_spread", ""),
    ("web", "page updates per second at 65,536 frames", "web.updates_per_s_spread", ""),
]
PARTS = {
    "scan": "Scanner beside ksmd on the same bytes",
    "cow": "COW fault round trip",
    "modes": "Notifier modes: after merging, what a re-read costs",
    "scaling": "Scaling with cores",
    "trace": "Tracing on against off",
    "check": "ksm-proto check at bench size",
    "stress": "No lost writes (the stress)",
    "estimate": "ksm-proto estimate",
    "chaos": "kill -9 under load (the chaos part)",
    "web": "The web view's cost",
    "estimate-live": "ksm-proto estimate --watch against the kernel's KSM running live",
}
_STEP = re.compile(r"([^.\[]+)(?:\[([^=\]]+)=([^\]]+)\])?")


def get(res: dict, key: str):
    """The value at a dotted key (see ROWS), or None where the file has no such value."""
    x = res
    for part in key.split("."):
        m = _STEP.fullmatch(part)
        if not m or not isinstance(x, dict) or m.group(1) not in x:
            return None
        x = x[m.group(1)]
        if m.group(2):
            if not isinstance(x, list):
                return None
            x = next((e for e in x if isinstance(e, dict) and str(e.get(m.group(2))) == m.group(3)), None)
    return x


def cell(v, key: str = "") -> str:
    """One figure as the page shows it."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, dict) and {"median", "min", "max"} <= set(v):
        if v["median"] is None:
            return "-"
        return f"{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f}, n={v.get('n', '?')})"
    if key.startswith("check.modes."):
        return (f"{v['schedules']:,}, {v['schedules_per_s']:,}/s, "
                f"{'no violation' if not v.get('violation') else 'VIOLATION'}")
    if key == "check.breaks":
        caught = [b for b, ms in v.items() if all(x is not None for x in ms.values())]
        missed = [b for b in v if b not in caught]
        return f"{len(caught)} of {len(v)}" + (f" (missed: {', '.join(missed)})" if missed else "")
    if key.startswith("check.") and isinstance(v, dict):        # the extra scenarios: {runs, violations}
        return f"{v.get('schedules', '?'):,}, {'no violation' if not v.get('violations') else 'VIOLATION'}"
    if key.startswith("estimate-live.") and ".worst." in key:       # a relative error
        return f"{100 * v:+.1f}%"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.3g}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list) and all(x is None or isinstance(x, (int, float)) for x in v):
        return ", ".join(cell(x) for x in v)
    return str(v).replace("|", "\\|")


def load(results_dir: str) -> list[tuple[str, dict]]:
    """(file name, results) of every results file, newest first; latest.json only where it is no copy."""
    names = sorted((n for n in os.listdir(results_dir) if n.endswith(".json")), reverse=True)
    runs, texts = [], {}
    for n in names:
        with open(os.path.join(results_dir, n)) as f:
            text = f.read()
        try:
            res = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{os.path.join(results_dir, n)}: not JSON ({e})") from None
        if not isinstance(res, dict) or "machine" not in res:
            continue                                  # (not a bench results file)
        if "tolerances" in res and "settings" in res and "estimate-live" not in res:
            # estimate-live.json, the part's own file (bench/run.py): its values as a run's estimate-live
            res = {"date": res.get("date"), "machine": res["machine"], "estimate-live": res}
        texts[n] = text
        runs.append((n, res))
    if "latest.json" in texts and any(t == texts["latest.json"] for n, t in texts.items() if n != "latest.json"):
        runs = [(n, r) for n, r in runs if n != "latest.json"]
    # newest first by the run's own date (a name's prefix, chaos- or none, says nothing of its age)
    return sorted(runs, key=lambda x: (str(x[1].get("date") or ""), x[0]), reverse=True)


def render(results_dir: str = RESULTS, page: str = PAGE) -> str:
    runs = load(results_dir)
    rel = os.path.relpath(results_dir, os.path.dirname(os.path.abspath(page)))
    col = [f"[{os.path.splitext(n)[0]}]({rel}/{n})" for n, _ in runs]
    out = ["# Performance: every `make bench` run, side by side", "",
           "Written by `ksm-proto bench --report` from the results files in "
           f"[`{os.path.relpath(results_dir, ROOT)}/`]({rel}/); do not edit it by hand. Each column is one "
           "results file (newest first), each row one key in it (`scan.pages_per_s` is "
           "`res[\"scan\"][\"pages_per_s\"]`); \"-\" where that run did not measure it. A ratio over "
           "repetitions reads `median (min-max, n=repetitions)`. Compare ratios within a column: the "
           "machines, and one machine's speed from hour to hour, differ by more than the spreads inside one "
           "run. What each part measures: `ksm-proto bench --help` and the top of `bench/run.py`.", "",
           "## The runs", "",
           "| results file | date | host | cores | CPU | Linux | Python | quick | parts |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c, (n, res) in zip(col, runs):
        mach = res.get("machine", {})
        parts = [p for p in PARTS if p in res]
        out.append(f"| {c} | {res.get('date', '-')} | {mach.get('host', '-')} | {mach.get('cores', '-')} | "
                   f"{mach.get('cpu', '-')} | {mach.get('kernel', '-')} | {mach.get('python', '-')} | "
                   f"{'yes' if res.get('quick') else 'no'} | {', '.join(parts)} |")
    for part, title in PARTS.items():
        rows = [(label, key, goal) for p, label, key, goal in ROWS if p == part]
        have = [i for i, (_, res) in enumerate(runs) if part in res]
        rows = [r for r in rows if any(get(runs[i][1], r[1]) is not None for i in have)]
        if not have or not rows:
            continue
        out += ["", f"## {title}", "", "| what | key | goal | " + " | ".join(col[i] for i in have) + " |",
                "|---|---|---|" + "---|" * len(have)]
        for label, key, goal in rows:
            out.append(f"| {label} | `{key}` | {goal} | " + " | ".join(cell(get(runs[i][1], key), key)
                                                                   for i in have) + " |")
    plots = sorted(n for n in os.listdir(results_dir) if n.endswith(".png"))
    if plots:
        out += ["", "## Plots kept with the results", ""]
        out += [f"- [{n}]({rel}/{n})" for n in plots]
    out += [""]
    return "\n".join(out)


def write(results_dir: str = RESULTS, page: str = PAGE) -> str:
    """Write the page; from the project's own results into its own page, the README's headline too."""
    text = render(results_dir, page)
    os.makedirs(os.path.dirname(os.path.abspath(page)), exist_ok=True)
    with open(page, "w") as f:
        f.write(text)
    if os.path.realpath(results_dir) == os.path.realpath(RESULTS) and os.path.realpath(page) == os.path.realpath(PAGE):
        write_headline()
    return page


# ---------------------------------------------------------------------------- the README's headline figures
README = os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- headline: written by `ksm-proto bench --report` -->", "<!-- /headline -->"


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1000:,.0f} ms"


# (what, the keys it reads, how it reads): each figure from the newest results file that has all its keys
HEADLINE = [
    ("Scanning: pages/s against the kernel's ksmd on the same bytes (1 GiB of 4x duplicates; the two newest runs: "
     "hours differ)",
     ("scan.ratio_vs_kernel_spread", "scan.scanners"),
     lambda r: f"{cell(get(r, 'scan.ratio_vs_kernel_spread'))}x with {get(r, 'scan.scanners')} scanners"
               + (f" ({cell(get(r, 'scan.one_scanner.speedup_spread'))}x one scanner)"
                  if get(r, "scan.one_scanner.speedup_spread") is not None else "")
               + (f"; merging, against one scanner: {cell(get(r, 'scan.one_scanner.merge_speedup_spread'))}x as fast, "
                  f"{cell(get(r, 'scan.one_scanner.cores_busy_spread'))} cores busy, "
                  f"{cell(get(r, 'scan.one_scanner.cpu_ratio_spread'))}x its CPU seconds"
                  if get(r, "scan.one_scanner.cpu_ratio_spread") is not None else "")
               + (f"; the pipelined rounds: {cell(get(r, 'scan.pipelined.merge_speedup_spread'))}x as fast as "
                  f"{get(r, 'scan.scanners')} scanners without"
                  if get(r, "scan.pipelined.merge_speedup_spread") is not None else ""), 2),
    ("A COW fault of a merged page, p50, against a pipe ping-pong between two processes sleeping and "
     "polling, and the kernel's COW (the two newest runs: hosts and hours differ)",
     ("cow.p50_us", "cow.ratio_vs_pipe_spread", "cow.ratio_vs_polling_pipe_spread"),
     lambda r: f"{cell(get(r, 'cow.p50_us'))} us: {cell(get(r, 'cow.ratio_vs_pipe_spread'))}x the sleeping pipe, "
               f"{cell(get(r, 'cow.ratio_vs_polling_pipe_spread'))}x the polling pipe, "
               f"{cell(get(r, 'cow.ratio_vs_kernel'))}x the kernel", 2),
    ("Tracing every message and fault: CPU seconds on / off, the run's processes free on every CPU, and all on one "
     "CPU (tracing's own work, without the cross-CPU wake-ups that move the first by +-10 %; the two newest runs)",
     ("trace.ratio_spread", "trace.one_cpu_ratio_spread"),
     lambda r: f"{cell(get(r, 'trace.ratio_spread'))}x; {cell(get(r, 'trace.one_cpu_ratio_spread'))}x on one CPU", 2),
    ("No lost write: racing writes and COW faults of merged pages over the three notifier modes",
     ("stress.writes", "stress.cow_faults_merged", "stress.lost"),
     lambda r: f"{cell(get(r, 'stress.writes'))} writes, {cell(get(r, 'stress.cow_faults_merged'))} COW faults, "
               f"{cell(get(r, 'stress.lost'))} lost"),
    ("kill -9 under load: kills of ksmd / fault handlers / VMs, writes lost, recovery p99",
     ("chaos.kills", "chaos.lost", "chaos.recovery_p99_s"),
     lambda r: " / ".join(f"{get(r, 'chaos.kills.' + k)}" for k in ("ksmd", "faultd", "vm"))
               + f" kills, {get(r, 'chaos.lost')} lost, p99 "
               + " / ".join(_ms(get(r, 'chaos.recovery_p99_s.' + k)) for k in ("ksmd", "faultd", "vm"))),
    ("The interleaving checker: random schedules per notifier mode, and the `--break`s it catches",
     ("check.modes.change_pte", "check.breaks"),
     lambda r: f"{cell(get(r, 'check.modes.change_pte'), 'check.modes.change_pte')} (change_pte); "
               f"{cell(get(r, 'check.breaks'), 'check.breaks')} breaks caught in every mode"),
]


def headline(results_dir: str = RESULTS) -> str:
    """The README's table of headline figures, each with the results file, date and host it comes from."""
    runs = load(results_dir)
    rel = os.path.relpath(results_dir, ROOT)
    out = [BEGIN, "", "| what | figure | from (date, host) |", "|---|---|---|"]
    for what, keys, fmt, *many in HEADLINE:        # (many: that many of the newest runs, one row each)
        srcs = [(n, r) for n, r in runs if all(get(r, k) is not None for k in keys)][:(many or [1])[0]]
        if not srcs:
            out.append(f"| {what} | - | no results file has it |")
        for j, (n, r) in enumerate(srcs):
            mach = r.get("machine", {})
            out.append(f"| {what if j == 0 else '(the same, the run before)'} | {fmt(r)} | [{n}]({rel}/{n}) "
                       f"({str(r.get('date', '-'))[:16].replace('T', ' ')}, {mach.get('host', '-')}, "
                       f"{mach.get('cores', '?')} cores) |")
    out += ["", END]
    return "\n".join(out)


def write_headline(readme: str = README, results_dir: str = RESULTS) -> bool:
    """Rewrite the block between the markers in the README; False where it has no such block."""
    with open(readme) as f:
        text = f.read()
    a, b = text.find(BEGIN), text.find(END)
    if a < 0 or b < a:
        return False
    new = text[:a] + headline(results_dir) + text[b + len(END):]
    if new != text:
        with open(readme, "w") as f:
            f.write(new)
    return True
