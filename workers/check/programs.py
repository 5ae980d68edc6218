"""The programs the checker's world runs as threads: ksmd (and the other scanners), restarted ones,
the supervisor (a kill -9, then mm/recovery.py's programs), the VMs' writers and their ops (writes,
MADV_DONTNEED, fork, mprotect, merge-any), each checking what it reads back.

A mixin of KsmWorld (workers.check.world), which holds the state these methods share.
"""
from __future__ import annotations

import errno


from proto.layout import (PAGE_SIZE, USER_BASE)

from workers.mm.kvm import vm_access
from workers.mm.effects import (Lock, Unlock)
from workers.mm.vma import do_mprotect, dup_mmap, ksm_disable_merge_any, ksm_enable_merge_any, madvise_dontneed
from workers.mm.recovery import recover, vm_died
from workers.mm.ksm.scan import KsmScan
from workers.check.world_common import RECOVER, Thread, VMState, _AwaitRestore, _AwaitScan, _Boundary, _Kill


class Programs:
    """The world's programs (a KsmWorld mixin)."""

    # ---------------------------------------------------------------- the programs
    def ksmd_main(self):
        """ksmd (the leader): full scans while any writer runs, then settle_scans more; then the others stop."""
        settle = self.settle_scans
        while self.writers_left or settle > 0 or self.teardowns:
            if not self.writers_left and not (self.complete and self._faults_running()):
                settle -= 1
            ended = False
            while not ended:
                if self.kill:
                    yield _Boundary()
                    while self.exits:       # a dead VM's mm: ksm_exit between two batches
                        yield from self.scan.ksm_exit(self.exits[0])
                        self.exits.pop(0)
                _, _, ended = yield from self.scan.ksm_do_scan(self.scan.knobs["pages_to_scan"])
                self._check_counters()
        yield from self.scan.stop_followers()

    def _faults_running(self) -> bool:
        """A fault handler task still at work (an early reply leaves it holding ptl until its acks)."""
        return any(t.actor in self.faultd_names and not t.done for t in self.threads)

    def follower_main(self, scan: KsmScan):
        """Another scanner: the leader's rounds until it says stop."""
        while True:
            op, _ = yield from scan.follow_one()
            if op == "stop":
                return

    def supervisor(self, target: str):
        """kill -9 of `target` at a point the schedule picks, then the supervisor's recovery program (a VM's:
        vm_died, for its mm and for a fork child it was filling)."""
        yield _Kill(target)
        yield Lock(RECOVER)     # (the supervisor's recover_lock: no VM is spawned, by fork or not, meanwhile)
        v = next((v for v in self.vms if v.name == target), None)
        if v is None:
            fixed = yield from recover([target], self.scanner_names, lambda: [v.id for v in self.vms if not v.dead],
                                       lambda: list(self.mem.mms), self._serves, self.nframes, self.brk)
        else:
            for child in [m for m in self.mem.mms if m >= len(self.vms)]:      # (spawn_vm's failed fork)
                yield from vm_died(child)
                self._unlink_mm(child)
            fixed = yield from vm_died(v.id, ["ksmd", self.faultd_of(v.id)], lambda: list(self.mem.mms),
                                       self.nframes, self.brk)
            self._unlink_mm(v.id)
            self._writer_left(v)
            self.teardowns -= 1
        yield Unlock(RECOVER)
        return fixed

    def _unlink_mm(self, mm: int) -> None:
        """The mm's page table goes (the supervisor unlinks its segment)."""
        del self.mem.mms[mm]
        self.stats.mm[mm] = 0

    def _writer_left(self, v: VMState) -> None:
        if not v.left:
            v.left = True
            self.writers_left -= 1

    def restarted_ksmd(self):
        """A new ksmd: its state from shared memory (KsmScan.restore), then the scan goes on.  With two
        scanners the leader restores once the other has (the supervisor restores the followers first)."""
        if len(self.scans) > 1:
            yield _AwaitRestore()
        yield from self.scan.restore()
        self._check_counters()
        yield from self.ksmd_main()

    def restarted_follower(self, scan: KsmScan):
        """A new follower: its shard from shared memory, then the leader's rounds."""
        yield from scan.restore()
        self.restoring -= 1
        yield from self.follower_main(scan)

    def writer(self, v: VMState, npages: int, ops, first_scan: int | None = None):
        """Read every page (installing sptes), then run each op of the program, op k once ksmd has ended
        first_scan + k full scans (see SCENARIOS; default: the world's first_scan), reading back what it
        wrote; at the end read every page back."""
        sub = v.subs[0]
        if first_scan is None:
            first_scan = self.first_scan
        for page in range(npages):
            got = bytearray(8)
            yield from vm_access(v.id, sub, USER_BASE + page * PAGE_SIZE, 8, False, got)
            self._check_read(v, page, got + bytes([v.record[page]]) * (PAGE_SIZE - 8), "first read")
        k = 0
        for op in ops:
            if self.pace and op[0] not in ("read", "efault"):   # ksmd has scanned (and merged) since
                yield _AwaitScan(first_scan + k)
                k += 1
            yield from self._op(v, npages, op)
        if not self.complete:
            self._writer_left(v)
        for page in range(npages):
            got = bytearray(PAGE_SIZE)
            yield from vm_access(v.id, sub, USER_BASE + page * PAGE_SIZE, PAGE_SIZE, False, got)
            self._check_read(v, page, got, "final read")
        if self.complete:       # the scans that settle start once no VM touches memory any more
            self._writer_left(v)

    def _op(self, v: VMState, npages: int, op):
        sub, subs = v.subs[0], list(v.subs.values())
        kind = op[0] if isinstance(op[0], str) else "write"
        if kind == "fork":
            yield from self._fork(v, npages, op[1])
            return
        if kind == "merge_any":
            yield from (ksm_enable_merge_any(v.id) if op[1] else ksm_disable_merge_any(v.id))
            return
        if kind == "wait":          # one more full scan, nothing else
            return
        page = op[1] % npages if kind != "write" else op[0] % npages
        addr = USER_BASE + page * PAGE_SIZE
        if kind == "read":
            got = bytearray(PAGE_SIZE)
            yield from vm_access(v.id, sub, addr, PAGE_SIZE, False, got)
            self._check_read(v, page, got, "read")
            return
        if kind == "prot":
            yield from do_mprotect(v.id, subs, addr, addr + PAGE_SIZE, op[2], self.brk)
            return
        if kind == "efault":
            try:
                yield from vm_access(v.id, sub, addr, 8, op[2], bytearray(8))
            except OSError as e:
                if e.errno != errno.EFAULT:
                    self.violations_found.append(f"{v.name} page {page}: a forbidden access failed with "
                                                 f"{errno.errorcode.get(e.errno)}, not EFAULT")
                return
            self.violations_found.append(f"{v.name} page {page}: a {'write' if op[2] else 'read'} its VMA "
                                         f"forbids succeeded")
            return
        val = op[1]
        if val < 0:
            yield from madvise_dontneed(v.id, subs, addr, addr + PAGE_SIZE, self.brk)
            val = 0
        else:
            what = self._candidate(v, page)
            if what:
                v.sig = {"vm": [], "faultd": [], "threads": [], "what": f"{v.name} page {page} ({what})"}
            yield from vm_access(v.id, sub, addr, PAGE_SIZE, True, bytes([val]) * PAGE_SIZE)
            if what:
                self.same_pending.append(v.sig)
                self.coverage[f"write to a {what} page"] += 1
                v.sig = None
        self.candidates.discard((v.id, page))
        v.record[page] = val
        got = bytearray(PAGE_SIZE)
        yield from vm_access(v.id, sub, addr, PAGE_SIZE, False, got)
        self._check_read(v, page, got, "read back after its write")

    def _fork(self, v: VMState, npages: int, ops):
        """fork: dup_mmap into a new mm, then the child (its own secondary MMU, its record a copy of the
        parent's) is known to ksmd (ksm_fork) and starts its program."""
        yield Lock(RECOVER)     # (the supervisor's spawn of the child, which no recovery interleaves)
        cid = len(self.vms)
        mm = self._new_mm(cid, npages)
        yield from dup_mmap(v.id, cid, list(v.subs.values()), self.brk)
        child = VMState(cid, f"vm{cid}", npages, False)
        self._register(child, mm)
        child.record = dict(v.record)
        self.vms.append(child)
        self._add_to_scanners(cid, mm)
        yield Unlock(RECOVER)
        self.writers_left += 1
        t = Thread(f"{child.name}/writer", child.name, self.writer(child, npages, ops, self.scan.c["full_scans"] + 1),
                   vm=child)
        self.threads.append(t)
        self._advance(t, None)

    def _check_read(self, v: VMState, page: int, got: bytearray, when: str) -> None:
        want = v.record[page]
        if got != bytes([want]) * PAGE_SIZE:
            bad = next(k for k in range(PAGE_SIZE) if got[k] != want)
            self.violations_found.append(f"lost write: {v.name} page {page} {when}: byte {bad} is {got[bad]}, "
                                         f"the last value written was {want}")
