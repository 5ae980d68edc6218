"""The no-lost-writes stress: many writers per VM while ksmd merges, copies and re-merges their pages.

A driver over the public API (no process of its own), run on a started Machine, so once per
notifier mode.  Each VM's region is cut into disjoint slices, one per writer, so every byte
has exactly one writer and the record of it is exact:

  * parent threads (several per VM) write through vm.write(): whole pages (all-zero pages
    among them, merged with the zero page under use_zero_pages) and sub-page ranges that may
    cross into the next page, of few distinct byte values, plus an occasional unique stamp;
    each write is recorded here in an independent bytearray, and every `check_every` writes
    the thread reads a range of its slice back and compares it with its record;
  * in-worker writers (several per VM, VMWorker.writer) fill whole pages from a seeded RNG;
    their writes are replayed here from the same seed (`replay_writer`).

Few distinct values keep pages merging, splitting (COW) and re-merging all the time, and a
small max_page_sharing makes each value a chain of several KSM pages (stable_node_chains /
dups churn).  ksmd runs at full speed all along.  The in-worker writers are paced in rounds:
each writes `round_writes` pages of its slice, then ksmd does `scans_between` full scans
(the parent threads keep writing meanwhile) so that the pages a round wrote are merged again
before the next round writes them; without that pacing the writers starve ksmd of CPU and
most writes hit pages that are already private (a write that does not fault tests little).

Counted exactly, per run: writes by kind; COW faults of merged pages (the fault handler's
copies of KSM frames and of the zero page: nothing else is ever shared here, no fork, no
MADV_UNMERGEABLE); write faults on write-protected pages reused in place; ksmd merges and
full scans; and a lower bound that follows from the record alone: a page seen merged
(read-only, on a KSM frame or the zero page) while no writer runs on it, then written, takes
one COW fault of a merged page; `..._remerged_guaranteed` counts those pages that had been
written before, so were merged again.  At the end every byte of every VM is read back and
compared with the record, m.check_frames() must be clean; then run=2 unmerges everything and
both checks run again, and once the VMs exit no frame may be left in use.

`run_modes` runs it once per notifier mode on a Machine of its own: what `make bench` runs.
"""
from __future__ import annotations

import os
import random
import threading
import time

import numpy as np

from proto import MADV_MERGEABLE, PAGE_SIZE
from proto.layout import FRAME_KSM, MMView, PAGE_SHIFT, PTE_PRESENT, PTE_SPECIAL, PTE_WRITE, USER_BASE

MODES = ("change_pte", "wrapped", "invalidate")


def writer_sequence(npages: int, seed: int, count: int, values: int):
    """(page, byte) of each write of VMWorker.writer (values > 0): the same RNG calls, in order."""
    rng = random.Random(seed)
    for _ in range(count):
        page = rng.randrange(npages)
        yield page, rng.randrange(values) + 1


def replay_writer(npages: int, seed: int, count: int, values: int, into: bytearray, base_page: int) -> np.ndarray:
    """Apply what VMWorker.writer wrote to `into`; returns which of its pages it wrote."""
    written = np.zeros(npages, dtype=bool)
    for page, val in writer_sequence(npages, seed, count, values):
        o = (base_page + page) * PAGE_SIZE
        into[o:o + PAGE_SIZE] = bytes([val]) * PAGE_SIZE
        written[page] = True
    return written


def split(total: int, parts: int) -> list[int]:
    """total cut into `parts` integers that differ by at most one and sum to total."""
    q, r = divmod(total, parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


def merged_now(m, vm, first: int, npages: int) -> np.ndarray:
    """Which of npages pages from page index `first` map a KSM frame or the zero page, read-only.

    Read from the shared page table and frame table.  A page counts only if its PTE is the
    same before and after its frame's flags are read.  Sound while ksmd runs, as long as
    nothing writes these pages: ksmd only ever makes a page merged (or moves it to another
    KSM frame), and only a write makes it unmerged again.
    """
    seg, _ = m.mm_segs[vm.mm_id]
    view = MMView(seg).pte[first:first + npages]
    pte = view.copy()
    pfn = (pte >> np.uint64(PAGE_SHIFT)).astype(np.int64)
    ksm = (m.ft.flags[pfn] & FRAME_KSM) != 0
    same = view == pte
    present = (pte & np.uint64(PTE_PRESENT)) != 0
    ro = (pte & np.uint64(PTE_WRITE)) == 0
    zero = (pte & np.uint64(PTE_SPECIAL)) != 0
    return same & present & ro & (ksm | zero)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (0.0 where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _cpu(m, vms) -> dict:
    return {"ksmd": cpu_seconds(m.ksmd.pid), "faultd": cpu_seconds(m.faultd.pid),
            "vms": sum(cpu_seconds(vm.pid) for vm in vms), "parent": time.process_time()}


def _faultd_stats(m) -> dict:
    return m.faultd.call("stats")[0]


def _ksmd_info(m) -> dict:
    return m.ksmd.call("info")[0]


def _diff(got: bytes, want: bytearray) -> np.ndarray:
    """Indices of the pages that differ."""
    g = np.frombuffer(got, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    w = np.frombuffer(bytes(want), dtype=np.uint8).reshape(-1, PAGE_SIZE)
    return np.flatnonzero((g != w).any(axis=1))


def no_lost_writes(m, nvms: int = 3, threads_per_vm: int = 2, workers_per_vm: int = 2,
                   thread_pages: int = 16, worker_pages: int = 64,
                   thread_writes: int = 300, worker_writes: int = 1000, values: int = 3,
                   whole_page_share: float = 0.4, stamp_share: float = 0.1, check_every: int = 64,
                   round_writes: int = 0, scans_between: int = 3, min_cow_faults: int = 0,
                   max_page_sharing: int = 3, use_zero_pages: int = 1,
                   unmerge_check: bool = True, seed: int = 0, timeout: float = 600.0, progress=None,
                   before_check=None) -> dict:
    """Run the stress on a started Machine (nothing merged yet); returns counts and findings.

    thread_writes / worker_writes are per writer (a list gives one count per VM, each split
    evenly over that VM's writers of that kind); the writes made are exactly the sum asked.
    min_cow_faults > 0: once they are done, more in-worker rounds (`extra_writes`, short ones)
    until that many COW faults of merged pages have happened.
    progress(writes_done, writes_asked, cow_faults_merged), when given, is called about twice a
    second from this thread.  before_check(vms, addrs), when given, runs after the writers and
    before the checks (the tests use it to lose a write on purpose).
    """
    def per_vm(x, n):
        xs = list(x) if isinstance(x, (list, tuple)) else [x * n] * nvms
        if len(xs) != nvms:
            raise ValueError(f"{len(xs)} write counts for {nvms} VMs")
        return [split(v, n) if n else [] for v in xs]

    t_counts = per_vm(thread_writes, threads_per_vm)
    w_counts = per_vm(worker_writes, workers_per_vm)
    total = sum(map(sum, t_counts)) + sum(map(sum, w_counts))
    t_region = threads_per_vm * thread_pages
    pages = t_region + workers_per_vm * worker_pages
    nbytes = pages * PAGE_SIZE
    m.ksm.set(run=0)
    m.ksm.set(pages_to_scan=100000, sleep_millisecs=0, smart_scan=0, max_page_sharing=max_page_sharing,
              use_zero_pages=use_zero_pages)
    vms, addrs, records = [], [], []
    for i in range(nvms):
        vm = m.spawn_vm(f"stress{i}", pages=pages + 16)
        a = vm.mmap(nbytes)
        # start merged: page p of every VM holds the byte p % (values + 1) (0: the zero page)
        rec = bytearray(b"".join(bytes([p % (values + 1)]) * PAGE_SIZE for p in range(pages)))
        vm.write(a, bytes(rec))
        vm.madvise(a, nbytes, MADV_MERGEABLE)
        vms.append(vm)
        addrs.append(a)
        records.append(rec)
    first_page = [(a - USER_BASE) >> PAGE_SHIFT for a in addrs]
    m.ksm.set(run=1)
    m.ksm.wait_stable(120)
    m.ksm.set(run=0)            # a consistent snapshot of what is merged, then go
    merged0 = [merged_now(m, vm, fp, pages) for vm, fp in zip(vms, first_page)]
    ks0, f0, k0 = m.ksm.stats(), _faultd_stats(m), _ksmd_info(m)
    v0 = [vm.stats() for vm in vms]
    cpu0 = _cpu(m, vms)
    m.ksm.set(run=1)

    t0 = time.monotonic()
    deadline = t0 + timeout
    # in-worker writers: one slice each, written in rounds of `round_writes` writes; between two
    # rounds ksmd does `scans_between` full scans (the parent threads keep writing meanwhile), so
    # the pages a round wrote are merged again before the next round writes them
    slices = [(i, t_region + w * worker_pages) for i in range(nvms) for w in range(workers_per_vm)]
    left = [w_counts[i][w] for i in range(nvms) for w in range(workers_per_vm)]
    runs: list[list[tuple[int, int]]] = [[] for _ in slices]     # per slice: (seed, count) in order
    burst = round_writes or 16 * worker_pages
    errors: list[str] = []
    done = {}
    touched = [np.zeros(pages, dtype=bool) for _ in range(nvms)]
    t_threads: dict = {}
    read = {"checks": 0, "mismatches": 0, "examples": []}
    rlock = threading.Lock()

    def thread_writer(i: int, t: int, count: int) -> None:
        rng = random.Random(seed * 7919 + i * 101 + t)
        vm, a, rec = vms[i], addrs[i], records[i]
        lo, hi = t * thread_pages * PAGE_SIZE, (t + 1) * thread_pages * PAGE_SIZE     # this thread's bytes
        try:
            for k in range(count):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"thread {i}.{t} at write {k} of {count}")
                p = rng.randrange(thread_pages)
                v = rng.randrange(values + 1)               # 0 is an all-zero page or range
                if rng.random() < whole_page_share:
                    o, data = lo + p * PAGE_SIZE, bytes([v]) * PAGE_SIZE
                else:                                       # sub-page, maybe into the next page
                    o = lo + p * PAGE_SIZE + rng.randrange(PAGE_SIZE)
                    n = min(rng.randrange(1, 2 * PAGE_SIZE), hi - o)
                    if rng.random() < stamp_share:          # unique bytes: a misplaced write shows
                        data = (((k << 16) | (i << 8) | t).to_bytes(8, "little") * (n // 8 + 1))[:n]
                    else:
                        data = bytes([v]) * n
                vm.write(a + o, data)
                rec[o:o + len(data)] = data
                touched[i][o // PAGE_SIZE:(o + len(data) - 1) // PAGE_SIZE + 1] = True
                done[(i, t)] = k + 1
                t_threads[(i, t)] = time.monotonic() - t0
                if check_every and (k + 1) % check_every == 0:      # read back part of the slice
                    p0 = rng.randrange(thread_pages)
                    n = min(rng.randrange(1, 4) * PAGE_SIZE, hi - (lo + p0 * PAGE_SIZE))
                    ro = lo + p0 * PAGE_SIZE
                    got = vm.read(a + ro, n)
                    with rlock:
                        read["checks"] += 1
                        if got != rec[ro:ro + n]:
                            read["mismatches"] += 1
                            if len(read["examples"]) < 5:
                                bad = [j for j in range(n) if got[j] != rec[ro + j]]
                                read["examples"].append(
                                    f"{vm.name} thread {t} after write {k}: read of pages "
                                    f"{ro // PAGE_SIZE}..{(ro + n - 1) // PAGE_SIZE}: {len(bad)} bytes differ, "
                                    f"first at page {(ro + bad[0]) // PAGE_SIZE} byte {(ro + bad[0]) % PAGE_SIZE}: "
                                    f"got {got[bad[0]]} want {rec[ro + bad[0]]}")
        except BaseException as e:  # reported to the caller
            errors.append(f"thread {vms[i].name}.{t}: {e!r}")

    threads = [threading.Thread(target=thread_writer, args=(i, t, t_counts[i][t]), daemon=True,
                                name=f"stress-{i}.{t}")
               for i in range(nvms) for t in range(threads_per_vm)]
    for th in threads:
        th.start()

    chains_max = dups_max = 0
    t_rounds = None
    t_wait = 0.0
    last_report = 0.0
    guaranteed = remerged = 0
    rounds = extra_writes = 0
    worker_done = 0
    prev_written = [np.zeros(worker_pages, dtype=bool) for _ in slices]

    def tick(extra: str = "") -> None:
        nonlocal chains_max, dups_max, last_report
        ks = m.ksm.stats()
        chains_max = max(chains_max, ks["stable_node_chains"])
        dups_max = max(dups_max, ks["stable_node_dups"])
        now = time.monotonic()
        if progress and now - last_report >= 0.5:
            progress(sum(done.values()) + worker_done, total, cow_now())
            last_report = now
        if now > deadline:
            raise TimeoutError(f"stress still running after {timeout:.0f}s{extra}")

    def cow_now() -> int:
        return _faultd_stats(m)["cow_copies"] - f0["cow_copies"]

    pending: dict[int, tuple[int, int]] = {}      # slice -> (writer id, seed) of a running writer

    def finish(j: int, st: dict, more: bool) -> None:
        nonlocal worker_done, extra_writes
        _wid, s = pending.pop(j)
        done.pop(("w", j), None)
        runs[j].append((s, st["done"]))
        worker_done += st["done"]
        if more:
            left[j] -= st["done"]
        else:
            extra_writes += st["done"]
        if st["error"]:
            raise RuntimeError(f"writer {j} in {vms[slices[j][0]].name}: {st['error']}")

    try:
        while True:
            more = any(left)
            if not more and not (min_cow_faults and cow_now() < min_cow_faults):
                break
            # what is merged now in the worker slices (no writer runs there between rounds)
            snap = [merged_now(m, vm, fp + t_region, pages - t_region) for vm, fp in zip(vms, first_page)]
            for j, (i, base) in enumerate(slices):
                n = min(burst, left[j]) if more else 2 * worker_pages
                if n:
                    s = seed * 1_000_003 + j * 100_003 + len(runs[j])
                    pending[j] = (vms[i].writer_start(addrs[i] + base * PAGE_SIZE, worker_pages, s, n, values), s)
            rounds += 1
            for j in list(pending):
                i, base = slices[j]
                wid, s = pending[j]
                while True:
                    st = vms[i].writer_peek(wid)
                    if st["finished"]:
                        break
                    done[("w", j)] = st["done"]
                    tick(f" (round {rounds})")
                    time.sleep(0.005)
                finish(j, st, more)
                # its pages merged at the snapshot and written now: a COW fault of a merged page
                # each; among them, those written in an earlier round too had been merged again
                written = np.zeros(worker_pages, dtype=bool)
                for page, _v in writer_sequence(worker_pages, s, st["done"], values):
                    written[page] = True
                mg = snap[i][base - t_region:base - t_region + worker_pages]
                guaranteed += int((mg & written).sum())
                remerged += int((mg & written & prev_written[j]).sum())
                prev_written[j] |= written
            c0, tw = m.ksm.stats()["full_scans"], time.monotonic()
            while m.ksm.stats()["full_scans"] < c0 + scans_between:
                tick(" (waiting for ksmd)")
                time.sleep(0.001)
            t_wait += time.monotonic() - tw
        t_rounds = time.monotonic() - t0
        while any(th.is_alive() for th in threads):
            tick(" (parent threads)")
            time.sleep(0.05)
    except (TimeoutError, RuntimeError, OSError) as e:
        msg = str(e) if not isinstance(e, TimeoutError) else \
            f"{e}: {sum(done.values()) + worker_done:,} of {total:,} writes"
        errors.append(msg)
        for j in list(pending):       # stopped, so that what they wrote is known exactly
            i = slices[j][0]
            try:
                finish(j, vms[i].writer_stop(pending[j][0]), bool(left[j]))
            except (RuntimeError, OSError) as e2:
                errors.append(str(e2))
        for th in threads:
            th.join(max(5.0, deadline - time.monotonic()))
    elapsed = time.monotonic() - t0
    if progress:
        progress(sum(done.values()) + worker_done, total, cow_now())
    ks1, f1, k1 = m.ksm.stats(), _faultd_stats(m), _ksmd_info(m)
    cpu1 = _cpu(m, vms)
    counter_problems = [] if errors else ksm_counters_against_ptes(m)
    m.ksm.set(run=0)
    v1 = [vm.stats() for vm in vms]

    for j, (i, base) in enumerate(slices):
        for s, d in runs[j]:
            touched[i][base:base + worker_pages] |= replay_writer(worker_pages, s, d, values, records[i], base)
    thread_done = sum(v for k, v in done.items() if k[0] != "w")

    def verify(phase: str, examples: list) -> int:
        bad_pages = 0
        for i, (vm, a, rec) in enumerate(zip(vms, addrs, records)):
            got = vm.read(a, nbytes)
            for p in _diff(got, rec).tolist():
                bad_pages += 1
                if len(examples) < 8:
                    g = np.frombuffer(got, np.uint8, PAGE_SIZE, p * PAGE_SIZE)
                    w = np.frombuffer(bytes(rec[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]), np.uint8)
                    bad = np.flatnonzero(g != w)
                    who = (f"thread {p // thread_pages}" if p < t_region
                           else f"worker {(p - t_region) // worker_pages}")
                    examples.append(f"{phase}: {vm.name} page {p} ({who} slice): {len(bad)} bytes differ in "
                                    f"[{bad[0]}, {bad[-1]}], got {g[bad[0]]} want {w[bad[0]]}")
        return bad_pages

    if before_check:
        before_check(vms, addrs)
    examples: list[str] = list(read["examples"])
    mismatches = verify("end", examples)
    frame_problems = m.check_frames()
    unmerge = None
    if unmerge_check:           # run=2: every merged page unshared; contents and frames unchanged
        try:
            m.ksm.set(run=2)
            ku = m.ksm.stats()
            unmerge = {"mismatches": verify("after run=2", examples),
                       "frame_problems": m.check_frames(),
                       "pages_shared": ku["pages_shared"], "pages_sharing": ku["pages_sharing"],
                       "ksm_zero_pages": ku["ksm_zero_pages"]}
        except OSError as e:
            errors.append(f"run=2: {e}")
        m.ksm.set(run=0)
    for vm in vms:
        vm.close()
    exit_problems = m.check_frames()        # every frame of the stress VMs freed, none twice

    cow_merged = f1["cow_copies"] - f0["cow_copies"]
    # the parent threads' pages merged when the writers started, written since: one COW each
    guaranteed += int(sum((mg[:t_region] & t[:t_region]).sum() for mg, t in zip(merged0, touched)))
    writes = thread_done + worker_done
    return {
        "mode": m.mode,
        "writes": writes,
        "writes_requested": total,
        "thread_writes": thread_done,
        "worker_writes": worker_done,
        "writers": {"threads": nvms * threads_per_vm, "in_worker": len(slices), "vms": nvms},
        "cow_faults_merged": cow_merged,
        "cow_faults_merged_guaranteed": guaranteed,
        "wp_reuses": f1["reuses"] - f0["reuses"],
        "vm_cow_faults": sum(b["cow_faults"] - a["cow_faults"] for a, b in zip(v0, v1)),
        "secondary_faults": sum(b["secondary_faults"] - a["secondary_faults"] for a, b in zip(v0, v1)),
        "merges": k1["merges"] - k0["merges"],
        "merge_failures": k1["merge_failures"] - k0["merge_failures"],
        "scan_errors": k1["scan_errors"] - k0["scan_errors"],
        "full_scans": ks1["full_scans"] - ks0["full_scans"],
        "cow_faults_remerged_guaranteed": remerged,
        "rounds": rounds,
        "extra_writes": extra_writes,
        "merged_at_start": int(sum(mg.sum() for mg in merged0)),
        "pages": nvms * pages,
        "stable_node_chains_max": chains_max,
        "stable_node_dups_max": dups_max,
        "ksm_zero_pages_end": ks1["ksm_zero_pages"],
        "pages_sharing_end": ks1["pages_sharing"],
        "read_checks": read["checks"],
        "read_mismatches": read["mismatches"],
        "mismatches": mismatches,
        "mismatch_examples": examples,
        "frame_problems": frame_problems,
        "counter_problems": counter_problems,
        "unmerge": unmerge,
        "exit_frame_problems": exit_problems,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "seconds_in_worker": round(t_rounds, 3) if t_rounds is not None else None,
        "cpu_seconds": {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0},
        "seconds_between_rounds": round(t_wait, 3),
        "seconds_threads": round(max(t_threads.values()), 3) if t_threads else None,
        "writes_per_s": round(writes / elapsed, 1) if elapsed else None,
        "cow_faults_merged_per_s": round(cow_merged / elapsed, 1) if elapsed else None,
        "params": {"threads_per_vm": threads_per_vm, "workers_per_vm": workers_per_vm,
                   "thread_pages": thread_pages, "worker_pages": worker_pages, "values": values,
                   "max_page_sharing": max_page_sharing, "use_zero_pages": use_zero_pages,
                   "round_writes": burst, "scans_between": scans_between,
                   "min_cow_faults": min_cow_faults, "check_every": check_every, "seed": seed},
    }


def ksm_counters_against_ptes(m, timeout: float = 60.0) -> list[str]:
    """After the writers: once ksmd's counters have not moved for two full scans, pages_shared and
    pages_sharing must be what the PTEs say (Machine.ksm_pages_mapped); [] when they are."""
    try:
        m.ksm.wait_stable(timeout)
    except TimeoutError as e:
        return [f"ksmd's counters did not settle after the writers: {e}"]
    want = m.ksm_pages_mapped()
    got = m.ksm.stats()
    return [f"ksmd's {k} is {got[k]}, but the PTEs map {want[k]}" for k in want if got[k] != want[k]]


def lost(r: dict) -> int:
    """Everything that counts as a failure of the stress: bytes, frames, counters, errors (0 when clean)."""
    u = r.get("unmerge") or {}
    return (r["mismatches"] + r["read_mismatches"] + len(r["frame_problems"]) + len(r["exit_frame_problems"])
            + len(r.get("counter_problems", []))
            + u.get("mismatches", 0) + len(u.get("frame_problems", [])) + len(r["errors"]) + r["scan_errors"]
            + (r["writes"] != r["writes_requested"] + r["extra_writes"]))


def run_modes(writes: int, min_cow_faults: int = 0, modes=MODES, nvms: int = 4, thread_share: float = 0.05,
              seed: int = 42, timeout: float | None = None, progress=None, **kw) -> dict:
    """The stress in each notifier mode, on a Machine of its own: `writes` and `min_cow_faults` in all.

    Both are split evenly over the modes; in each, `thread_share` of the writes come from the
    parent threads, the rest from the in-worker writers.  progress(mode, done, asked, cow).
    Returns the totals and each mode's result under "modes".
    """
    from workers.actors.supervisor import Machine

    per_mode = dict(zip(modes, split(writes, len(modes))))
    cow_mode = dict(zip(modes, split(min_cow_faults, len(modes))))
    out: dict = {"modes": {}}
    for mode in modes:
        w = per_mode[mode]
        tw = int(w * thread_share)
        t_vm, w_vm = split(tw, nvms), split(w - tw, nvms)
        # generous: about 20x the time this machine needs on 2 busy cores
        limit = timeout or max(600.0, w / 500 + cow_mode[mode] / 50)
        cb = (lambda d, n, c, mode=mode: progress(mode, d, n, c)) if progress else None
        t0 = time.monotonic()
        with Machine(frames=8192, notifier_mode=mode) as m:
            try:
                r = no_lost_writes(m, nvms=nvms, thread_writes=t_vm, worker_writes=w_vm,
                                   min_cow_faults=cow_mode[mode], seed=seed, timeout=limit, progress=cb,
                                   **{"threads_per_vm": 2, "workers_per_vm": 2, "thread_pages": 16,
                                      "worker_pages": 96, **kw})
            except Exception as e:      # a failure of the run itself is a finding, not a crash
                r = {"mode": mode, "errors": [f"{type(e).__name__}: {e}"], "writes": 0, "writes_requested": w,
                     "extra_writes": 0, "mismatches": 0, "read_mismatches": 0, "frame_problems": [],
                     "exit_frame_problems": [], "scan_errors": 0, "cow_faults_merged": 0, "seconds": 0}
        r["lost"] = lost(r)
        r["wall_seconds"] = round(time.monotonic() - t0, 1)     # with start-up, merging and checks
        out["modes"][mode] = r
    rs = list(out["modes"].values())
    for k in ("writes", "extra_writes", "mismatches", "read_mismatches", "cow_faults_merged", "lost"):
        out[k] = sum(r.get(k, 0) for r in rs)
    out["thread_writes"] = sum(r.get("thread_writes", 0) for r in rs)
    out["worker_writes"] = sum(r.get("worker_writes", 0) for r in rs)
    out["frame_problems"] = [f"{r['mode']}: {p}" for r in rs
                             for p in r["frame_problems"] + r["exit_frame_problems"]
                             + (r.get("unmerge") or {}).get("frame_problems", [])]
    out["errors"] = [f"{r['mode']}: {e}" for r in rs for e in r["errors"]]
    out["seconds"] = round(sum(r["seconds"] for r in rs), 1)
    out["wall_seconds"] = round(sum(r["wall_seconds"] for r in rs), 1)
    out["writes_requested"] = writes
    out["min_cow_faults"] = min_cow_faults
    out["cow_goal_met"] = out["cow_faults_merged"] >= min_cow_faults
    return out
