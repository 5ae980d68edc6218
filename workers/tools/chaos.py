"""Chaos under load: kill -9 ksmd, a fault handler or a VM at random moments while writers run and
ksmd merges, and check after each recovery that nothing was lost (issue 21).

One `Machine`; `nvms` VMs, each with a *counter* writer (VMWorker.writer, counter=True: every
write carries a value of its own and is read back at the next write to its page) over pages
that keep becoming identical (merges, COWs of merged pages).  Each round: let the load run a
random while, kill one actor, wait for its successor to serve (a VM: for the supervisor to
tear it down, then start a new one), let the load go on through the successor, then quiesce
(writers stopped, run=0) and check: every page's bytes equal the last write of its writer
(replayed here from the seed, `counter_sequence`), the writers saw no lost write and no
error, `check_frames` is clean.  Then the writers start again and the next round kills.

What a kill hit is counted from what the recovery found: the repair's fixes (a frame whose
mapcount was not its mappings, a frame nothing mapped: a merge or a COW killed halfway), the
faults the VMs sent again to a new fault handler, the invalidations a lost notifier left
open (`Machine.recoveries`, the VMs' stats): a run of kills at quiet moments shows as
`hit_in_flight` near 0.
"""
from __future__ import annotations

import fcntl
import os
import random
import signal
import struct
import time

import numpy as np

from proto import MADV_MERGEABLE, PAGE_SIZE
from proto.layout import ksm_lock_byte, lock_file, ptl_lock_byte

KINDS = ("ksmd", "faultd", "vm")
STAMP = 16


def counter_sequence(npages: int, seed: int, count: int, values: int):
    """(page, fill byte or None, stamp bytes or None) of each write of a counter writer, in order:
    the same RNG calls as VMWorker._counter_writer."""
    rng = random.Random(seed)
    stamped = [False] * npages
    for k in range(count):
        page = rng.randrange(npages)
        val = rng.randrange(values) + 1
        if stamped[page]:
            yield page, val, None
        else:
            yield page, None, (k + 1).to_bytes(8, "little") + (seed & (2**64 - 1)).to_bytes(8, "little")
        stamped[page] = not stamped[page]


def replay_counter(into: bytearray, npages: int, seed: int, count: int, values: int) -> None:
    """Apply what a counter writer's first `count` writes did to `into` (its pages' bytes)."""
    for page, fill, stamp in counter_sequence(npages, seed, count, values):
        o = page * PAGE_SIZE
        if fill is not None:
            into[o:o + PAGE_SIZE] = bytes([fill]) * PAGE_SIZE
        else:
            into[o:o + STAMP] = stamp


def pct(a, q):
    return float(np.percentile(a, q)) if len(a) else None


class Load:
    """The VMs, their regions, their writers and what their pages must hold."""

    def __init__(self, m, nvms: int, npages: int, values: int, period_ms: float, rng: random.Random):
        self.m, self.npages, self.values, self.period_ms, self.rng = m, npages, values, period_ms, rng
        self.vms: list = []
        self.next_name = 0
        for _ in range(nvms):
            self.add_vm()

    def add_vm(self):
        vm = self.m.spawn_vm(f"c{self.next_name}", pages=max(64, self.npages + 8))
        self.next_name += 1
        size = self.npages * PAGE_SIZE
        x = vm.mmap(size)
        vm.write(x, b"\x01" * size)
        vm.madvise(x, size, MADV_MERGEABLE)
        self.vms.append({"vm": vm, "x": x, "want": bytearray(b"\x01" * size), "wid": None, "seed": None})
        return self.vms[-1]

    def start(self) -> None:
        for v in self.vms:
            v["seed"] = self.rng.randrange(1, 2**31)
            v["wid"] = v["vm"].writer_start(v["x"], self.npages, seed=v["seed"], values=self.values,
                                            period_ms=self.period_ms, counter=True)

    def stop(self) -> dict:
        """Stop every writer and check its pages; {"writes", "errors", "lost", "bad_pages"}."""
        out = {"writes": 0, "errors": [], "lost": 0, "bad_pages": 0}
        for v in self.vms:
            d = v["vm"].writer_stop(v["wid"])
            out["writes"] += d["done"]
            if d["error"]:
                out["errors"].append(f"{v['vm'].name}: {d['error']}")
            out["lost"] += d["lost"]
            if d["lost"]:
                out["errors"].append(f"{v['vm'].name}: {d['lost']} lost writes seen by the writer, e.g. "
                                     f"{d['lost_pages'][:2]}")
            replay_counter(v["want"], self.npages, v["seed"], d["done"], self.values)
        for v in self.vms:
            got = v["vm"].read(v["x"], self.npages * PAGE_SIZE)
            if got != bytes(v["want"]):
                a = np.frombuffer(got, np.uint8).reshape(self.npages, PAGE_SIZE)
                b = np.frombuffer(bytes(v["want"]), np.uint8).reshape(self.npages, PAGE_SIZE)
                bad = np.flatnonzero((a != b).any(axis=1))
                out["bad_pages"] += len(bad)
                out["errors"].append(f"{v['vm'].name}: {len(bad)} pages differ from their last write, "
                                     f"e.g. page {bad[:4].tolist()}")
        return out


_FLOCK = "hhqqi4x"       # struct flock (workers.runtime.frames._flock)


def lock_held(fd: int, byte: int) -> bool:
    """Whether some process holds the OFD lock `byte` of the run's lock file now (F_OFD_GETLK: a test
    that takes nothing)."""
    got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
    return struct.unpack(_FLOCK, got)[0] != fcntl.F_UNLCK


def aim(m, fd: int, timeout: float) -> bool:
    """Wait (spinning, up to `timeout`) for a moment when a page-table lock or a scanners' ksm lock is
    held: a merge or a COW is under way.  True if one came."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for mm in list(m.mm_segs):
            if lock_held(fd, ptl_lock_byte(mm)) or lock_held(fd, ksm_lock_byte(mm)):
                return True
    return False


def wait_successor(m, name: str, old_pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m.actors[name].pid != old_pid and m.ready[name].is_set():
            return True
        time.sleep(0.002)
    return False


def chaos(mode: str = "change_pte", scanners: int = 1, fault_handlers: int = 1, kills: int = 10,
          kinds=KINDS, seed: int = 1, nvms: int = 3, npages: int = 48, values: int = 3, period_ms: float = 1.0,
          settle: tuple[float, float] = (0.3, 1.0), after: float = 0.3, retry_s: float = 5.0, frames: int = 4096,
          progress=None) -> dict:
    """`kills` kills of each kind in `kinds` (in a shuffled order) on one machine; the figures of the run."""
    from workers import Machine
    rng = random.Random(seed)
    order = [k for k in kinds for _ in range(kills)]
    rng.shuffle(order)
    res = {"mode": mode, "scanners": scanners, "fault_handlers": fault_handlers, "seed": seed,
           "kills": {k: 0 for k in kinds}, "recovery_s": {k: [] for k in kinds}, "hit_in_flight": {k: 0 for k in kinds},
           "repairs_fixed": {k: 0 for k in kinds}, "resent_faults": 0, "ended_invalidations": 0, "orphaned_cows": 0,
           "writes": 0, "lost": 0, "bad_pages": 0, "writer_errors": [], "frame_problems": [], "failed_rounds": 0,
           "vm_deaths_torn_down": 0, "aimed": {k: 0 for k in kinds}, "aimed_hit": {k: 0 for k in kinds}}
    t_start = time.monotonic()
    with Machine(frames=frames, notifier_mode=mode, scanners=scanners, fault_handlers=fault_handlers,
                 restart_timeout=retry_s) as m:
        load = Load(m, nvms, npages, values, period_ms, rng)
        m.ksm.set(pages_to_scan=2000, sleep_millisecs=5, run=1)
        load.start()
        lfd = os.open(lock_file(m.run), os.O_RDONLY | os.O_CLOEXEC)
        for n, kind in enumerate(order):
            time.sleep(rng.uniform(*settle))
            before = _vm_counts(load)
            nrec = len(m.recoveries)
            aimed = n % 2 == 1 and aim(m, lfd, 1.0)   # every other kill: when a lock says work is under way
            if kind == "vm":
                v = rng.choice(load.vms)
                vm = v["vm"]
                fname = m.faultd_name(vm.mm_id)
                orphaned0 = _orphaned(m, fname)
                t0 = time.monotonic()
                os.kill(vm.pid, signal.SIGKILL)     # a process this Machine started, by its pid
                deadline = t0 + 30
                while vm.alive and time.monotonic() < deadline:
                    time.sleep(0.002)
                ok = not vm.alive
                dt = time.monotonic() - t0
                res["vm_deaths_torn_down"] += ok
                load.vms.remove(v)
                rec = m.recoveries[-1] if len(m.recoveries) > nrec else None
                orphaned = max(0, _orphaned(m, fname) - orphaned0)     # its COWs the fault handler was holding
                nv = load.add_vm()
                seed_new = rng.randrange(1, 2**31)
                nv["seed"] = seed_new
                nv["wid"] = nv["vm"].writer_start(nv["x"], npages, seed=seed_new, values=values,
                                                  period_ms=period_ms, counter=True)
            else:
                names = m.scanner_names if kind == "ksmd" else m.faultd_names
                name = names[n % len(names)]
                old = m.actors[name].pid
                t0 = time.monotonic()
                os.kill(old, signal.SIGKILL)        # a process this Machine started, by its pid
                ok = wait_successor(m, name, old, 60)
                dt = time.monotonic() - t0
                orphaned = 0
                deadline = time.monotonic() + 5
                while len(m.recoveries) <= nrec and time.monotonic() < deadline:
                    time.sleep(0.002)
                rec = m.recoveries[-1] if len(m.recoveries) > nrec else None
            res["kills"][kind] += 1
            res["recovery_s"][kind].append(rec["serving_s"] if rec and rec.get("serving_s") is not None else dt)
            time.sleep(after)                        # the load goes on through the successor
            st = load.stop()
            m.ksm.set(run=0)
            problems = m.check_frames()
            after_counts = _vm_counts(load)
            resent = sum(max(0, after_counts.get(k, (0, 0))[0] - c[0]) for k, c in before.items())
            ended = sum(max(0, after_counts.get(k, (0, 0))[1] - c[1]) for k, c in before.items())
            fixed = 0
            if rec is not None and rec.get("repair"):
                r = rec["repair"]
                fixed = sum(r.get(k, 0) for k in ("freed", "recounted", "revived", "zero_pages_fixed"))
            res["repairs_fixed"][kind] += fixed
            res["resent_faults"] += resent
            res["ended_invalidations"] += ended
            res["orphaned_cows"] += orphaned
            hit = bool(fixed or resent or ended or orphaned)
            res["hit_in_flight"][kind] += hit
            res["aimed"][kind] += aimed
            res["aimed_hit"][kind] += aimed and hit
            res["writes"] += st["writes"]
            res["lost"] += st["lost"]
            res["bad_pages"] += st["bad_pages"]
            if st["errors"] or problems or not ok:
                res["failed_rounds"] += 1
                res["writer_errors"] += [f"kill {n} ({kind}): {e}" for e in st["errors"]]
                res["frame_problems"] += [f"kill {n} ({kind}): {p}" for p in problems]
                if not ok:
                    res["writer_errors"].append(f"kill {n} ({kind}): no successor within the wait")
            if progress:
                progress(f"{mode} s{scanners}/f{fault_handlers} kill {n + 1}/{len(order)} {kind}"
                         f"{' (aimed)' if aimed else ''}: "
                         f"recovered in {res['recovery_s'][kind][-1]:.3f}s, fixed {fixed}, resent {resent}, "
                         f"ended {ended}, orphaned {orphaned}, {'ok' if not (st['errors'] or problems) else 'FAILED'}")
            m.ksm.set(run=1)
            load.start()
        st = load.stop()
        m.ksm.set(run=0)
        res["writes"] += st["writes"]
        res["lost"] += st["lost"]
        res["bad_pages"] += st["bad_pages"]
        res["frame_problems"] += m.check_frames()
        res["writer_errors"] += st["errors"]
        os.close(lfd)
        res["recoveries"] = list(m.recoveries)
    res["seconds"] = round(time.monotonic() - t_start, 1)
    return res


def _orphaned(m, fname: str) -> int:
    try:
        return m.actor_call(fname, "stats", timeout=10)[0].get("orphaned", 0)
    except (OSError, TimeoutError):
        return 0


def _vm_counts(load) -> dict:
    """name -> (faults sent again to a new fault handler, invalidations ended by a lost notifier)."""
    out = {}
    for v in load.vms:
        try:
            s = v["vm"].stats()
        except OSError:
            continue
        out[v["vm"].name] = (s["fault_retries"], s.get("ended_on_loss", 0))
    return out


def summary(runs: list) -> dict:
    """The runs' figures together: kills, recovery p50/p99 by kind, hits, lost writes, problems."""
    kinds = sorted({k for r in runs for k in r["kills"]})
    out = {"runs": len(runs), "kills": {}, "recovery_p50_s": {}, "recovery_p99_s": {}, "recovery_max_s": {},
           "hit_in_flight": {}, "repairs_fixed": {}}
    for k in kinds:
        rs = [x for r in runs for x in r["recovery_s"].get(k, [])]
        out["kills"][k] = sum(r["kills"].get(k, 0) for r in runs)
        out["recovery_p50_s"][k] = pct(rs, 50)
        out["recovery_p99_s"][k] = pct(rs, 99)
        out["recovery_max_s"][k] = max(rs) if rs else None
        out["hit_in_flight"][k] = sum(r["hit_in_flight"].get(k, 0) for r in runs)
        out["repairs_fixed"][k] = sum(r["repairs_fixed"].get(k, 0) for r in runs)
        out.setdefault("aimed", {})[k] = sum(r["aimed"].get(k, 0) for r in runs)
        out.setdefault("aimed_hit", {})[k] = sum(r["aimed_hit"].get(k, 0) for r in runs)
    for key in ("writes", "lost", "bad_pages", "failed_rounds", "resent_faults", "ended_invalidations",
                "orphaned_cows"):
        out[key] = sum(r[key] for r in runs)
    out["writer_errors"] = [e for r in runs for e in r["writer_errors"]][:20]
    out["frame_problems"] = [e for r in runs for e in r["frame_problems"]][:20]
    return out
