"""The `ksm-proto` command: run a scenario (or the demo), trace tools, and the benchmark.

    ksm-proto run [SCENARIO.toml] [--json] [--trace FILE] [--until-stable] [--notifier-mode M]
                  [--web [--port N] [--read-only]]
    ksm-proto trace summary FILE | trace check FILE | trace view FILE [--port N] [--speed X]
    ksm-proto bench [--quick] [--cores N] [--trace-overhead] ...
    ksm-proto check [--mode M|all] [--scenario S|all] [--seed S] [--runs N] [--exhaustive [--depth D]] [--break STEP]
                    [--scanners 2] [--list-breaks] [--trace FILE] [--replay SCHEDULE.json] [--save-schedule FILE]
                    [--max-steps N] [--world ksm|toy] [--kill ksmd|faultd|faultd1|vm|vmN [--sweep]] [--fault-handlers 2]
    ksm-proto estimate [--pid PID...] [--all-pids] [--file PATH...] [--dir DIR...] [--json] [--plot FILE]
                       [--max-page-sharing N] [--use-zero-pages 0|1] [--merge-across-nodes 0|1] [--verify-kernel]

On a terminal `run` shows a progress bar while loading and live counters
(rich); piped, it prints plain lines; with --json exactly one JSON object goes
to stdout.
"""
from __future__ import annotations

import argparse
import importlib
import dataclasses
import json
import math
import os
import sys
import time

from proto import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE, PR_SET_MEMORY_MERGE, PROT_NONE, PROT_READ
from proto.knobs import OWN
from workers.mm.breaks import BREAKS
from proto.layout import COUNTERS
from proto.trace import open_private

from workers.tools.scenario import Scenario, ScenarioError, check_fits, demo, load

SYSFS_COUNTERS = [c for c in COUNTERS if c not in ("ksm_rmap_items", "metadata_bytes")]
CHUNK = 1 << 20


class Reporter:
    """Progress and counters: rich on a terminal, plain lines when piped, silent with --json."""

    def __init__(self, mode: str):
        self.mode = mode           # "rich" | "plain" | "quiet"
        self.console = None
        if mode == "rich":
            from rich.console import Console
            self.console = Console(stderr=True)

    def loading(self, total_pages: int):
        if self.mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
            prog = Progress("[bold]loading VMs", BarColumn(), MofNCompleteColumn(), "pages", TimeRemainingColumn(),
                            console=self.console, transient=True)
            return prog, prog.add_task("load", total=total_pages)
        return None, None

    def line(self, text: str) -> None:
        if self.mode == "plain":
            print(text, flush=True)
        elif self.mode == "rich":
            self.console.print(text)

    def table(self, stats: dict):
        from rich.table import Table
        t = Table(title="ksm counters", show_header=True)
        t.add_column("counter")
        t.add_column("value", justify="right")
        for k in SYSFS_COUNTERS:
            t.add_row(k, f"{stats[k]:,}")
        return t


def load_vms(m, sc: Scenario, rep: Reporter) -> dict:
    """Spawn (or fork) each VM, map and fill its regions, mprotect and madvise them as asked.
    Returns what was written: {name: (vm, [(addr, region, bytes)])}."""
    layout = {}
    prog, task = rep.loading(sc.pages)
    ctx = prog if prog is not None else _null()
    with ctx:
        for spec in sc.vms:
            if spec.fork_of:
                parent, inherited = layout[spec.fork_of]
                vm = parent.fork(spec.name, device=spec.device)
                regions = [(addr, dataclasses.replace(r, writer=None), data) for addr, r, data in inherited]
            else:
                vm = m.spawn_vm(spec.name, pages=sc.address_space(spec), device=spec.device, node=spec.node,
                               domain=spec.domain)
                regions = []
            if spec.merge_any:
                vm.prctl(PR_SET_MEMORY_MERGE, 1)
            for r in spec.regions:
                data = r.content()
                addr = vm.mmap(len(data))
                for off in range(0, len(data), CHUNK):
                    vm.write(addr + off, data[off:off + CHUNK])
                    if prog is not None:
                        prog.advance(task, min(CHUNK, len(data) - off) // PAGE_SIZE)
                if r.prot != "rw":
                    vm.mprotect(addr, len(data), PROT_READ if r.prot == "r" else PROT_NONE)
                if r.mergeable:
                    vm.madvise(addr, len(data), MADV_MERGEABLE)
                elif spec.merge_any:
                    vm.madvise(addr, len(data), MADV_UNMERGEABLE)
                regions.append((addr, r, data))
            layout[spec.name] = (vm, regions)
            how = f"fork of {spec.fork_of}, " if spec.fork_of else ""
            rep.line(f"loaded {spec.name}: {how}{spec.pages} pages in {len(spec.regions)} regions")
    return layout


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def scenario_frames(sc: Scenario) -> int:
    """The machine's frames for a scenario: its own [machine] frames, or room for its pages and a margin."""
    return sc.frames or int(sc.pages * 1.25) + 4096


def start_web(m, port: int, read_only: bool):
    """The web view of a running machine (workers/tools/web): started, its URL with the token on stderr."""
    from workers.tools.web import LiveSource, WebServer
    web = WebServer(LiveSource(m), port=port, read_only=read_only)
    url = web.start()
    print(f"web view: {url}\n  (127.0.0.1 only; the token is this run's: whoever has it can "
          f"{'watch' if read_only else 'watch and drive'} the run)", file=sys.stderr, flush=True)
    return web


def run_scenario(sc: Scenario, mode: str | None, trace: str | None, until_stable: bool, scans: int,
                 rep: Reporter, timeout: float, web_port: int | None = None, read_only: bool = False) -> dict:
    """Load the scenario, run KSM, check every byte read back.  With web_port, serve the web view from
    the start (the loading shows) and, once loaded, until Ctrl-C instead of a number of scans."""
    from workers.actors.supervisor import Machine
    mode = mode or sc.notifier_mode or "change_pte"
    frames = scenario_frames(sc)
    t0 = time.monotonic()
    own = {k: v for k, v in sc.ksm.items() if k in OWN}     # scanners, fault_handlers: chosen at start
    with Machine(frames=frames, notifier_mode=mode, trace=trace, nodes=1 + max(v.node for v in sc.vms), **own) as m:
        web = start_web(m, web_port, read_only) if web_port is not None else None
        try:
            return _run_loaded(m, sc, mode, frames, t0, until_stable, scans, rep, timeout, web)
        finally:
            if web is not None:
                web.stop()


def _run_loaded(m, sc, mode, frames, t0, until_stable, scans, rep, timeout, web) -> dict:
    layout = load_vms(m, sc, rep)
    loaded = time.monotonic()
    writers = []
    for name, (vm, regions) in layout.items():
        for addr, r, _ in regions:
            if r.writer:
                w = r.writer
                writers.append((vm, vm.writer_start(addr, w.pages, w.seed, 0, w.values, w.period_ms), addr, r))
    knobs = {"pages_to_scan": 100000, "sleep_millisecs": 0, **{k: v for k, v in sc.ksm.items() if k not in OWN}}
    knobs.setdefault("run", 1)
    m.ksm.set(**{k: v for k, v in knobs.items() if k != "run"})
    m.ksm.set(run=knobs["run"])
    deadline = time.monotonic() + timeout
    live = None
    if rep.mode == "rich":
        from rich.live import Live
        live = Live(rep.table(m.ksm.stats()), console=rep.console, refresh_per_second=8, transient=False)
        live.start()

    def show(s):
        if live:
            live.update(rep.table(s))
        else:
            rep.line(f"full_scans={s['full_scans']} pages_shared={s['pages_shared']} "
                     f"pages_sharing={s['pages_sharing']} pages_unshared={s['pages_unshared']} "
                     f"pages_volatile={s['pages_volatile']} ksm_zero_pages={s['ksm_zero_pages']}")
    try:
        keys = ("pages_shared", "pages_sharing", "ksm_zero_pages", "stable_node_chains", "stable_node_dups")
        last, same, n = None, 0, 0
        if web is not None:
            print("serving the web view until Ctrl-C", file=sys.stderr, flush=True)
            try:
                while True:             # the page may stop ksmd (run=0): then the counters only stay put
                    try:
                        s = m.ksm.wait_full_scans(1, 1.0)
                    except TimeoutError:
                        s = m.ksm.stats()
                    cur = tuple(s[k] for k in keys + ("full_scans",))
                    if cur != last:
                        show(s)
                    last = cur
            except KeyboardInterrupt:
                pass
        while web is None and knobs["run"] == 1:
            s = m.ksm.wait_full_scans(1, max(1.0, deadline - time.monotonic()))
            n += 1
            cur = tuple(s[k] for k in keys)
            same = same + 1 if cur == last else 0
            last = cur
            show(s)
            if (until_stable and same >= 2) or (not until_stable and n >= scans):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"counters did not settle within {timeout:.0f}s")
    finally:
        if live:
            live.stop()
    merged = time.monotonic()
    stats = m.ksm.stats()
    wstats = {}
    for vm, wid, addr, r in writers:
        wstats.setdefault(vm.name, []).append(vm.writer_stop(wid))
    # every byte that no writer touched must read back as loaded (unless the web page wrote or madvised)
    mismatches = 0
    checked = web is None or web.source.actions == 0
    for name, (vm, regions) in layout.items() if checked else ():
        for addr, r, data in regions:
            skip = r.writer.pages * PAGE_SIZE if r.writer else 0
            if r.prot == "none":
                continue              # no access at all (EFAULT), as in a PROT_NONE mapping
            for off in range(skip, len(data), CHUNK):
                got = vm.read(addr + off, min(CHUNK, len(data) - off))
                if got != data[off:off + len(got)]:
                    mismatches += 1
    vms = {name: {**vm.stats(), "ksm_stat": vm.ksm_stat(), "writers": wstats.get(name, [])}
           for name, (vm, _) in layout.items() if vm.alive}
    res = {
        "scenario": sc.name,
        "notifier_mode": mode,
        "ksm": {k: stats[k] for k in SYSFS_COUNTERS},
        "scanner_bytes_per_page": round(stats["metadata_bytes"] / max(1, stats["ksm_rmap_items"]), 2),
        "vms": vms,
        "pages_loaded": sc.pages,
        "frames": frames,
        "readback_mismatches": mismatches,
        "seconds": {"load": round(loaded - t0, 3), "merge": round(merged - loaded, 3),
                    "total": round(time.monotonic() - t0, 3)},
    }
    if not checked:
        res["readback_checked"] = False
        res["web_actions"] = web.source.actions
    return res


def cmd_run(a) -> int:
    try:
        sc = load(a.scenario) if a.scenario else demo()
        check_fits(sc, scenario_frames(sc))
    except ScenarioError as e:
        print(f"ksm-proto: bad scenario: {e}", file=sys.stderr)
        return 2
    rep = Reporter("quiet" if a.json else ("rich" if sys.stderr.isatty() and sys.stdout.isatty() else "plain"))
    try:
        res = run_scenario(sc, a.notifier_mode, a.trace, a.until_stable, a.scans, rep, a.timeout,
                           web_port=a.port if a.web else None, read_only=a.read_only)
    except (OSError, TimeoutError, RuntimeError, ValueError) as e:
        print(f"ksm-proto: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(res))
        return 0 if res["readback_mismatches"] == 0 else 1
    k = res["ksm"]
    rep.line("")
    rep.line(f"scenario {res['scenario']}: {res['pages_loaded']} pages in {len(res['vms'])} VMs, "
             f"notifier mode {res['notifier_mode']}")
    for name in SYSFS_COUNTERS:
        print(f"  {name:20s} {k[name]:>12,}")
    print(f"  saved {k['pages_sharing'] * PAGE_SIZE / 2**20:.1f} MiB; scanner metadata "
          f"{res['scanner_bytes_per_page']} bytes/page; load {res['seconds']['load']}s, "
          f"merge {res['seconds']['merge']}s; read-back mismatches {res['readback_mismatches']}")
    for name, v in res["vms"].items():
        print(f"  {name}: secondary_faults={v['secondary_faults']} cow_faults={v['cow_faults']} "
              f"msgs={v['msgs']} ksm_merging_pages={v['ksm_stat']['ksm_merging_pages']}")
    if a.trace:
        print(f"  trace written to {a.trace} (open it in ui.perfetto.dev)")
    return 0 if res["readback_mismatches"] == 0 else 1


def cmd_trace(a) -> int:
    if not os.path.exists(a.file):
        print(f"ksm-proto: no such trace file: {a.file}", file=sys.stderr)
        return 2
    from workers.tools import tracetool
    if a.what == "view":
        return cmd_trace_view(a)
    if a.port is not None or a.speed is not None:
        print(f"ksm-proto: --port and --speed go with `trace view`, not `trace {a.what}`", file=sys.stderr)
        return 2
    try:
        if a.what == "summary":
            print(tracetool.format_summary(tracetool.summary(a.file)))
            return 0
        violations = tracetool.check(a.file)
    except ValueError as e:
        print(f"ksm-proto: {a.file}: not a ksm-proto trace: {e}", file=sys.stderr)
        return 2
    if violations:
        print(f"FAIL: {violations[0]}")
        print(f"({len(violations)} violation(s) in all)")
        return 1
    print("OK: every secondary MMU's messages follow REGISTER ( START [CHANGE_PTE] END | CHANGE_PTE | "
          "INVALIDATE_PAGE | CLEAR_YOUNG )* RELEASE")
    return 0


def cmd_trace_view(a) -> int:
    """Replay a merged trace on the web page until Ctrl-C (workers/tools/web: ReplaySource)."""
    from workers.tools.web import ReplaySource, WebServer
    try:
        src = ReplaySource(a.file, speed=a.speed if a.speed is not None else 1.0)
    except (ValueError, KeyError, TypeError) as e:
        print(f"ksm-proto: {a.file}: not a ksm-proto trace: {e}", file=sys.stderr)
        return 2
    web = WebServer(src, port=8765 if a.port is None else a.port, read_only=True)
    try:
        url = web.start()
    except OSError as e:
        print(f"ksm-proto: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"web view of {a.file}: {url}\n  ({len(src.msgs)} messages over {src.end / 1e6:.3f} s, replayed at "
          f"{src.speed}x; 127.0.0.1 only; Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        web.stop()
    return 0


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 (any free port) to 65535, not {n}")
    return n


def _number_in(text: str, hi: float, what: str) -> float:
    """A finite number in (0, hi], or argparse's error naming what it must be."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v) or not 0 < v <= hi:
        raise argparse.ArgumentTypeError(f"must be {what} in (0, {hi:.0f}], not {text}")
    return v


def _speed(text: str) -> float:
    return _number_in(text, 1e6, "a number")


CHECK_MODES = ("change_pte", "wrapped", "invalidate")


def _check_world(name: str):
    """(world_factory, BREAKS, scenario names) of a check world."""
    if name == "toy":
        from workers.check import toyworld
        return (lambda mode, brk, scenario=None: toyworld.world_factory(mode, brk)), toyworld.BREAKS, ("toy",)
    from workers.check.world import BREAKS, SCENARIOS, world_factory
    return world_factory, BREAKS, tuple(SCENARIOS)


def cmd_check(a) -> int:
    """Explore interleavings (workers/check/explore.py); 0 nothing found, 1 a violation, 2 a usage error."""
    from workers.check import explore
    doc = None
    if a.replay:
        try:
            with open(a.replay) as f:
                doc = explore.load_schedule(f.read())
            if doc.get("world") not in ("ksm", "toy"):
                raise ValueError(f"unknown world {doc.get('world')!r}")
        except (OSError, ValueError) as e:
            print(f"ksm-proto: {a.replay}: not a schedule: {e}", file=sys.stderr)
            return 2
        a.world, a.mode, a.brk, a.max_steps = doc["world"], doc.get("mode"), doc.get("break"), doc.get("max_steps")
        a.scanners = doc.get("scanners")
        a.kill = doc.get("kill")
        a.fault_handlers = doc.get("fault_handlers")
        a.scenario = doc.get("scenario")
        a.mitigation = doc.get("mitigation")
    world_factory, breaks, scenarios = _check_world(a.world)
    if a.list_breaks:
        print("\n".join(breaks))
        return 0
    if a.brk is not None and a.brk not in breaks:
        names = "".join(f"\n  {n:24s} {d}" for n, d in breaks.items())
        print(f"ksm-proto check: unknown --break {a.brk!r}; the {a.world} world has:{names}", file=sys.stderr)
        return 2
    if a.kill and a.world != "ksm":
        print("ksm-proto check: --kill needs the ksm world", file=sys.stderr)
        return 2
    if a.scenario not in (None, "all") and a.scenario not in scenarios:
        print(f"ksm-proto check: unknown --scenario {a.scenario!r}; the {a.world} world has: "
              f"{', '.join(scenarios)}", file=sys.stderr)
        return 2
    if a.scenario == "all" or (a.scenario is None and a.brk is None and doc is None):
        runs = tuple(sc for sc in scenarios         # every scenario (a break alone: the one it shows in);
                     if (sc != "same" or a.mitigation == "vusion")  # "same": vusion's own;
                     and (sc != "pipelined" or a.scanners == 2))    # "pipelined": the two scanners' rounds
    else:
        runs = (a.scenario,)
    for mode, scenario in [(m, sc) for m in (CHECK_MODES if a.mode == "all" else (a.mode,)) for sc in runs]:
        try:
            factory = world_factory(mode, a.brk, scenario=scenario, **({"kill": a.kill} if a.kill else {}),
                                    **({"mitigation": a.mitigation} if a.mitigation else {}),
                                    **({"scanners": a.scanners} if a.world == "ksm" else {}),
                                    **({"fault_handlers": a.fault_handlers} if a.fault_handlers else {}))
        except ValueError as e:
            print(f"ksm-proto check: {e}", file=sys.stderr)
            return 2
        scenario = getattr(factory, "scenario", scenario)
        name = mode if len(scenarios) == 1 else f"{mode} {scenario}"
        if doc is None and a.sweep:
            kill = (a.kill or BREAKS[a.brk].kill).split(",")[0]
            sw = explore.kill_sweep(factory, a.max_steps, victims=("vm0" if kill == "vm" else kill,))
            what = ", ".join(f"{k} {n}" for k, n in sw.covered.most_common())
            verdict = "no violation" if sw.found is None else f"VIOLATION: {sw.found[1][0]}"
            print(f"{name}: kill sweep of {kill}: {sw.points} kill points, {sw.seconds:.2f} s; "
                  f"{kill} was at: {what}: {verdict}", flush=True)
            if sw.found is None:
                continue
            schedule, found_by = sw.found[2], {"search": f"kill sweep, kill at step {sw.found[0]}"}
        elif doc is None:
            if a.exhaustive:
                res = explore.exhaustive(factory, a.depth, a.max_steps)
            else:
                res = explore.parallel_random_runs(factory, a.seed, a.runs, a.max_steps, jobs=a.jobs)
            print(explore.summary(name, res), flush=True)
            if res.found is None:
                continue
            schedule, found_by = res.found.schedule, res.found.found_by
        else:
            schedule, found_by = doc["steps"], doc.get("found_by", {})
        try:
            tr = explore.replay(factory, schedule)
        except explore.ReplayError as e:
            print(f"ksm-proto: {a.replay}: does not replay on this code: {e}", file=sys.stderr)
            return 2
        meta = {"world": a.world, "mode": mode, "break": a.brk, "scenario": scenario, "max_steps": a.max_steps,
                "scanners": a.scanners}
        if a.kill:
            meta["kill"] = a.kill
        if a.fault_handlers:
            meta["fault_handlers"] = a.fault_handlers
        if a.mitigation:
            meta["mitigation"] = a.mitigation
        return _check_report(explore, tr, meta, found_by, a)
    return 0


def _check_report(explore, tr, meta: dict, found_by: dict, a) -> int:
    """Print a replayed schedule, write its trace and schedule files: 1 if it violates, else 0."""
    if tr.violations:
        print(f"schedule, {len(tr.steps)} steps ({explore.describe(found_by)}):")
        print(explore.format_steps(tr))
    else:
        print(f"replayed {len(tr.steps)} steps: no violation")
    if a.trace:
        with open_private(a.trace) as f:
            f.write(explore.trace_json(tr, meta))
        print(f"trace written to {a.trace} (open it in ui.perfetto.dev)")
    if a.save_schedule and tr.violations:
        with open_private(a.save_schedule) as f:
            f.write(explore.schedule_json(tr, meta, found_by))
        print(f"schedule saved to {a.save_schedule} (ksm-proto check --replay {a.save_schedule})")
    return 1 if tr.violations else 0


def cmd_bench(a, rest) -> int:
    from workers import ROOT
    if ROOT not in sys.path:                # bench/ lives beside workers/ in the checkout, found by name
        sys.path.insert(0, ROOT)
    bench_run = importlib.import_module("bench.run")
    return bench_run.main(rest)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _break_kill(name: str) -> str | None:
    b = BREAKS.get(name)
    return b.kill if b else None


def _depth(text: str) -> int:
    from workers.check.explore import MAX_DEPTH
    n = _positive(text)
    if n > MAX_DEPTH:
        raise argparse.ArgumentTypeError(f"at most {MAX_DEPTH} (one level of recursion per choice), not {n}")
    return n


def _seconds(text: str) -> float:
    return _number_in(text, 86400, "a number of seconds")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ksm-proto", description="A multiprocess prototype of Linux KSM and mmu_notifiers")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a scenario (default: the built-in demo)")
    r.add_argument("scenario", nargs="?")
    r.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    r.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace of every message")
    r.add_argument("--until-stable", action="store_true", help="stop once counters stay put for two full scans")
    r.add_argument("--notifier-mode", choices=["change_pte", "wrapped", "invalidate"])
    r.add_argument("--scans", type=_positive, default=4, help="full scans to run without --until-stable (default 4)")
    r.add_argument("--timeout", type=_seconds, default=120.0, help="give up after this many seconds")
    r.add_argument("--web", action="store_true",
                   help="serve a live view on 127.0.0.1 (URL with its token on stderr) until Ctrl-C (docs/web.md)")
    r.add_argument("--port", type=_port, default=8765, help="the web view's port (default 8765; 0: any free one)")
    r.add_argument("--read-only", action="store_true", help="the web view shows the run but serves no controls")
    t = sub.add_parser("trace", help="look at a trace file")
    t.add_argument("what", choices=["summary", "check", "view"], help="view: replay it on the web page")
    t.add_argument("file")
    t.add_argument("--port", type=_port, help="trace view: the page's port (default 8765; 0: any free one)")
    t.add_argument("--speed", type=_speed, help="trace view: replay speed, times the trace's own (default 1)")
    sub.add_parser("bench", help="measure the project beside its anchors (see bench/)", add_help=False)
    c = sub.add_parser("check", help="explore interleavings of the protocol and check its invariants")
    c.add_argument("--mode", choices=[*CHECK_MODES, "all"], default="all", help="notifier mode (default: all)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random schedules (default 0)")
    c.add_argument("--runs", type=_positive, default=1000, help="random schedules per mode (default 1000)")
    c.add_argument("--exhaustive", action="store_true", help="search every schedule up to --depth choices")
    c.add_argument("--depth", type=_depth, help="exhaustive search depth (default 20, at most 200)")
    c.add_argument("--scenario", metavar="S", help="ksm world: base, fork, pipelined (two scanners) or all (default: all; with --break, "
                                                   "the break's own)")
    c.add_argument("--break", dest="brk", metavar="STEP", help="remove one protocol step (see --list-breaks)")
    c.add_argument("--list-breaks", action="store_true", help="print the --break names, one per line")
    c.add_argument("--trace", metavar="FILE", help="write the violating schedule as a Perfetto trace")
    c.add_argument("--replay", metavar="SCHEDULE.json", help="replay a schedule saved by --save-schedule")
    c.add_argument("--save-schedule", metavar="FILE", help="save the violating schedule as JSON")
    c.add_argument("--max-steps", type=_positive, default=10_000, help="step budget of one run (default 10000)")
    c.add_argument("--jobs", type=_positive, default=os.cpu_count() or 1,
                   help="processes sharing the random runs (default: every core); same verdict as one")
    c.add_argument("--world", choices=["ksm", "toy"], default="ksm", help="ksm (default), or the explorer's toy")
    c.add_argument("--scanners", type=int, choices=[1, 2],
                   help="scanners in the KSM world (default 1; 2 for a break of the scanners' protocol): 2 runs "
                        "two scanners merging into each other's stable nodes while the VMs write")
    from workers.estimate import estimate
    estimate.add_arguments(sub.add_parser(
        "estimate", help="how much KSM would save on processes, files or images (see workers/estimate/estimate.py)",
        description="What KSM would reach at stability on real pages, with the scanner's hashing and tree rules. "
                    "Exit status: 0 done, 1 some input could not be read (the rest counted), 2 bad usage or "
                    "nothing readable, 3 --verify-kernel failed or the kernel's counters differ."))
    from workers.tools import sidechannel
    sidechannel.add_arguments(sub.add_parser(
        "sidechannel", help="the dedup timing side channel: attack ksm-proto (or --kernel) and its defences",
        description="A victim holds a secret page or not; an attacker times a write to its guess after the "
                    "scanner ran. Prints AUC, accuracy, the write latencies and the memory the defence keeps "
                    "saved (see docs/security.md). Exit status: 0 done, 1 the kernel's KSM cannot be used, "
                    "2 bad usage."))
    c.add_argument("--mitigation", choices=["none", "vusion", "domain", "zero"],
                   help="the side-channel defence ksmd and the fault handler run (vusion adds the scenario "
                        "'same' and the invariant 'same behaviour')")
    c.add_argument("--sweep", action="store_true",
                   help="with --kill: kill at each step of one fixed schedule (every kill point of it), not at random")
    c.add_argument("--kill", metavar="ACTOR[,ACTOR]",
                   help="kill -9 that actor (ksmd, faultd, faultd1, vm, vmN) at a point the schedule picks, then recover "
                        "as the supervisor does (ksmd: every scanner; faultd1: with --fault-handlers 2; vm: the first "
                        "VM's process (vm0; vm1 the second), torn down while the others write on); a second one after "
                        "a comma dies any time after the first, during its recovery too")
    c.add_argument("--fault-handlers", type=int, choices=[1, 2],
                   help="fault handlers in the checked world (2: each serves every other VM)")
    args, rest = p.parse_known_args(argv)
    try:
        return _main(p, c, args, rest)
    except KeyboardInterrupt:       # the Machine has torn itself down on the way out
        print("ksm-proto: interrupted", file=sys.stderr)
        return 130


def _main(p, c, args, rest) -> int:
    if args.cmd == "bench":
        return cmd_bench(args, rest)
    if args.cmd == "estimate" and not rest:
        from workers.estimate import estimate
        return estimate.cli(args)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "run" and not args.web and (args.read_only or args.port != 8765):
        p.error("--port and --read-only go with --web")
    if args.cmd == "sidechannel":
        from workers.tools import sidechannel
        return sidechannel.cli(args)
    if args.cmd == "check":
        if args.depth is not None and not args.exhaustive:
            c.error("--depth needs --exhaustive")
        if args.sweep and (args.exhaustive or not (args.kill or args.brk and _break_kill(args.brk))):
            c.error("--sweep needs --kill (or a --break of the recovery), and no --exhaustive")
        args.depth = args.depth or 20
        return cmd_check(args)
    return cmd_run(args) if args.cmd == "run" else cmd_trace(args)


if __name__ == "__main__":
    sys.exit(main())
