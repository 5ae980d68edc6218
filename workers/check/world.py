"""The KSM world of `ksm-proto check`: the real protocol cores, in one process, one effect a step.

Nothing here is a second model of the protocol.  ksmd's scan and merges
(core.scan, core.merge), the fault handler's handle_mm_fault (core.fault), the
notifier steps (core.notify) and the VMs' accesses (core.access) run as generators
over the same FrameTable / MMView / FrameAllocator classes the actors use, backed by
plain arrays instead of POSIX shared memory.  The world performs their effects and
moves their messages; workers/check/explore.py decides the order.

With scanners=2 (`SHARDED`, `ksm-proto check --scanners 2`) two scanners run the
round protocol of core/shard.py: the leader `ksmd` and `ksmd1`, each owning the
contents of one shard, on shared rmap items.  Every page holds a content of one
shard or the other, and each content is in both VMs, so in every round each
scanner visits pages whose content the other owns, both owners merge into both mms
at once (their ksm locks and ptl trylocks interleave), and each merges pages the
other visited into its stable node, while the VMs write pages over with the other
shard's content (COW of one node's KSM page, then a merge into the other's).

Scheduling points:
  * each effect a core yields (a load, a store, a trylock, an alloc, a memcmp, one
    notifier message sent, an access through an spte, a wait);
  * each message delivered, one at a time, per channel in FIFO order (ksmd->vm,
    faultd->vm, vm->faultd FAULTs, acks and replies back);
  * with the `pid-takeover-lock` break, each step of the old lock algorithm
    (sem_trywait, each read of the owner field, the owner store);
  * with `kill="ksmd"` or `kill="faultd"`, the supervisor's program: kill -9 of that
    actor at any point (its generators are abandoned mid-step, its locks dropped as the
    kernel drops OFD locks, FAULTs not yet read are lost), ksmd frozen at a batch
    boundary (a fault handler died), each VM's notifier_lost once the dead actor's
    messages are drained, repair_frames (core.repair) under every ptl, the restart (a new
    ksmd rebuilds its state with KsmScan.restore; lost FAULTs are sent again), thaw;
  * with `kill="vm"` (vm0; or "vmN"), kill -9 of that VM's process at any point: its writer
    abandoned, its ptl dropped if it held it, its channels closed (what was sent to it is
    never read, the acks and APPLIEDs ksmd and the fault handler wait on are given up, as
    the real driver's wait_acks and faultd's on_vm_close do; what it sent before is still
    read), then mm/recovery.py's vm_died: ksmd (at a batch boundary) and its fault handler
    (once its tasks of that mm ended) forget the mm, exit_mmap under its ptl (a half-made
    fork child's too), its page table gone.  The other VMs' writers go on.

Scenarios (`SCENARIOS`): "base" (two VMs writing, one MADV_DONTNEED) and "fork" (a VM
forks mid-run and parent and child write the COW-shared pages, discard some and unmerge;
another VM makes a page read-only and writes it, expecting EFAULT; KSM zero pages on).
The VMs' own address-space changes (core.mm: MADV_DONTNEED, mprotect, fork's dup_mmap,
merge-any) run in the VM's writer thread, their START/END local to its secondary MMUs.

Invariants, after every step (`violations`):
  * a read returns the last value this VM wrote to the page (checked by the writer): a
    child of fork reads what its parent had at the fork, whatever the parent writes later;
  * an access the VMA forbids fails with EFAULT, and nothing else does;
  * no PTE maps a frame whose mapcount does not count it; no free frame is mapped by a
    PTE or an spte; no double free (FrameAccountingError in any actor);
  * a secondary MMU never maps a frame (or a write permission) its primary PTE no longer
    gives it, unless a notification for that page is on its way to it (or the death of
    the notifier that would have sent it), nor a page its VMA forbids (PROT_NONE, or
    writable in a read-only area), once the mm's ptl is free;
  * a writable PTE maps a frame no other PTE maps (COW: shared frames are read-only), once
    the mm's ptl is free;
  * each secondary MMU's messages follow the notifier grammar (with a kill: the messages
    of each notifier do; a dead notifier's open START may overlap its successor's or the
    other notifier's until the VM has noticed the death);
  * at ksmd's batch boundaries pages_shared / pages_sharing agree with the stable tree
    (with two scanners: their sums with both trees, when both are between rounds);
  * a page-table lock has at most one holder;
  * with two scanners, a scanner's trylock of a ptl never fails because the other holds
    it (a second scanner must not make merges fail that one scanner would do).
At the end (`final_violations`): every frame's mapcount equals its mappings, the free
stack is exact, every VM reads back its record, and the counters equal what the PTEs show
(pages_shared / pages_sharing; each mm's ksm_merging_pages and ksm_zero_pages, and the
machine's ksm_zero_pages); with two scanners also the merge is complete, as one
scanner's would be: each content that two or more candidate pages hold is one KSM page.

With a side-channel defence (`mitigation`, `ksm-proto check --mitigation M`): "vusion" adds the
invariant "same behaviour": a write to a merge candidate (a page ksmd merged, or one it
considered and fake-merged: core.merge.fake_merge's `Candidates`) causes the same sequence of
effects, in the VM and in the fault handler, whether or not the page was merged (the `same`
scenario writes both kinds; the `vusion-no-fake-protect` break leaves candidates writable);
"domain" puts vm k in domain k % 2 and checks that no KSM frame is mapped by mms of two domains.

With a kill of ksmd and two scanners, both scanners die and are restarted (as the
supervisor does: any scanner's death restarts them all), the followers' shards
restored before the leader's first round.
"""
from __future__ import annotations

import re

import collections

import numpy as np

from proto.knobs import DEFAULTS, MITIGATIONS
from proto.layout import (KNOBS, FRAME_KSM, MMF_VM_MERGEABLE, MMH_DOMAIN, MMH_FLAGS, MMH_ID, MMH_NPAGES, PAGE_SHIFT, PAGE_SIZE,
                          PTE_PRESENT, PTE_WRITE, USER_BASE, VM_MERGEABLE, VM_READ, VM_WRITE,
                          FTH_RESERVE_GEN, FrameTable, MMView, StatsView)

from workers.mm.kvm import FaultCall, Touch, WaitIdle, touch
from workers.mm.effects import (APPLY_MEM, Alloc, Candidates, CopyPages, Lock, Memory, Notify, Reply, ShardReady,
                                ShardRecv, ShardSend, TryLock, Unlock, WaitAcks)
from workers.runtime.interp import BLOCK, Backend, resume
from workers.mm.mmu_notifier import (GRAMMAR, INIT, MODES, LocalNotify, NotifierLink, register)
from workers.mm.recovery import ForgetMM, Freeze, NotifierLost, Respawn, Thaw
from workers.mm.ksm.scan import KsmScan
from workers.runtime.frames import FrameAllocator
from workers.mm.ksm.stable_tree import RmapItems
from workers.mm.breaks import Breaks, check_break
from workers.check.world_common import ArraySegment, BREAKS, BREAK_CONFIG, BREAK_KILLS, BREAK_MITIGATION, BREAK_MODES, BREAK_SCENARIO, KILLS, NullLock, RECOVER, SCENARIOS, SHARDED, SHARD_BREAKS, Thread, VMState, _AwaitForget, _AwaitReply, _AwaitRestore, _AwaitScan, _Boundary, _Kill, _Micro, _READ_ONLY, _lname
from workers.check.programs import Programs
from workers.check.oldlock import OldLock
from workers.check.invariants import Invariants
from workers.check.delivery import Delivery
from workers.check.scheduling import Scheduling



# each fault handler's frame reserve in a world: 2 frames, taken while 4 stay free after it, given back
# below 4 (faultd's: 32, while 256 stay; a world has 16 frames)
WORLD_FRAME_RESERVE, WORLD_RESERVE_MIN_FREE = 2, 4

__all__ = ["KsmWorld", "world_factory", "BREAKS", "BREAK_CONFIG", "BREAK_KILLS", "BREAK_MODES", "BREAK_SCENARIO", "KILLS", "SCENARIOS", "SHARDED", "SHARD_BREAKS", "RECOVER"]

class KsmWorld(Programs, OldLock, Invariants, Delivery, Scheduling):
    """A small machine: nvms VMs of npages pages (all alike at first), one writer each, ksmd, faultd."""

    def __init__(self, mode: str, brk: str | None = None, nvms: int = 2, npages: int = 2,
                 writes: tuple = (((0, 2), (1, 2), (1, -1), (1, 1)), ((1, 2), (1, 1))), device: bool = False, max_page_sharing: int = 256,
                 use_zero_pages: int = 0, settle_scans: int = 2, nframes: int = 16, pace: bool = True,
                 early_reply: bool = True, scanners: int = 1, fill: tuple = (1,), smart_scan: int = 1,
                 complete: bool = False, pages_to_scan: int | None = None, first_scan: int = 2,
                 kill: str | None = None, cow_reply: bool = True, fault_handlers: int = 1,
                 kill2: str | None = None, mitigation: str = "none"):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if fault_handlers not in (1, 2):
            raise ValueError(f"the KSM world runs 1 or 2 fault handlers, not {fault_handlers}")
        self.faultd_names = ["faultd", "faultd1"][:fault_handlers]
        kill, kill2 = ("vm0" if k == "vm" else k for k in (kill, kill2))      # ("vm": the first VM's process)
        vm_names = [f"vm{v}" for v in range(nvms)]
        for k in (kill, kill2):
            if k is not None and k not in ["ksmd"] + self.faultd_names + vm_names:
                raise ValueError(f"--kill {k!r}: this world's actors are {', '.join(['ksmd'] + self.faultd_names + vm_names)}")
        if kill2 and not kill:
            raise ValueError("kill2 is a second kill: it needs kill")
        if mitigation not in MITIGATIONS:
            raise ValueError(f"mitigation {mitigation!r} is not one of {MITIGATIONS}")
        self.mitigation = mitigation
        self.candidates: set[tuple] = set()        # (mm, page) ksmd fake-merged and nobody wrote since
        self.same_ref: tuple | None = None         # (signature, what) of the first write to a candidate
        self.same_pending: list[dict] = []         # watched writes whose fault handler tasks may still run
        self.kill = kill
        self.killed = False
        self.up = {a: True for a in ["ksmd"] + self.faultd_names + vm_names}   # False from the kill to the restart
        self.exits: list[int] = []                  # mms ksmd is to forget (a dead VM's: ksm_exit at a boundary)
        self.teardowns = 0                          # dead VMs not torn down yet (ksmd scans on meanwhile)
        self.links: dict[tuple, NotifierLink] = {}  # (notifier, mm) -> the VM's end of its channel
        self.lost: set[int] = set()                 # FAULT corrs the dead fault handler never answered
        self.frozen = False
        self.restoring = 0                          # restarted followers that have not restored yet
        self.mode, self.brk = mode, Breaks([brk] if brk else [])
        self.nframes = nframes
        ftseg = ArraySegment(FrameTable.size_for(nframes))
        self.ft = FrameTable(ftseg, nframes)
        self.frames = np.zeros(nframes * PAGE_SIZE, dtype=np.uint8)
        self.alloc = FrameAllocator(self.ft, self.frames, NullLock())
        self.alloc.format()
        self.stats = StatsView(ArraySegment(StatsView.size_for()))
        self.mem = Memory(self.alloc, self.stats)
        self.fault_mems: dict[str, Memory] = {}     # each fault handler's allocator, with its frame reserve
        for name in self.faultd_names:
            self._fault_memory(name)
        self.backend = self.world_backend()
        self.cur, self.cur_rec = None, None         # the thread whose effect runs now, and its step's record
        self.vms: list[VMState] = []
        self.threads: list[Thread] = []
        self.queues: dict[tuple, collections.deque] = {}
        self.locks: dict[tuple, str | None] = {RECOVER: None}   # lock key -> holder thread name
        self.old_lock: dict[tuple, list] = {}           # pid-takeover-lock: key -> [sem, owner]
        self.acks: dict[int, list] = {}                 # handle id -> [outstanding, flags...]
        self.next_id = 1
        self.violations_found: list[str] = []
        self.clock_steps = 0
        self.writers_left = nvms
        self.settle_scans = settle_scans
        self.pace = pace
        self.early_reply = early_reply
        self.cow_reply = cow_reply          # a COW's set_pte_at_notify rides on the reply (as faultd runs it)
        self.complete = complete
        self.fill = fill
        self.coverage = collections.Counter()     # what a run exercised (tests look at it)
        self._enabled = None
        self._dirty = True
        clock = lambda: self.clock_steps / 1000.0      # noqa: E731
        self.scans = [KsmScan(self.ft, mode, clock, self.brk, k, scanners) for k in range(scanners)]
        self.scan = self.scans[0]
        self.scanner_names = ["ksmd" if k == 0 else f"ksmd{k}" for k in range(scanners)]
        self.shardq: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
        self.rmaps: dict[int, RmapItems] = {}
        self.first_scan = first_scan
        self.scan.knobs.update(dict(DEFAULTS, run=1, pages_to_scan=pages_to_scan or nvms * npages, sleep_millisecs=0,
                                    max_page_sharing=max_page_sharing, use_zero_pages=use_zero_pages,
                                    smart_scan=smart_scan, scanners=scanners,
                                    mitigation=MITIGATIONS.index(mitigation)))
        for k, v in self.scan.knobs.items():        # (sysfs: where a restarted scanner loads them from)
            self.stats.knobs[KNOBS.index(k)] = v
        for v in range(nvms):
            self._make_vm(v, npages, device and v == 0)
        self.pending_loss = collections.defaultdict(set)   # mm -> dead notifiers its VM has not noticed yet
        self.threads.append(Thread("ksmd", "ksmd", self.ksmd_main()))
        for k in range(1, scanners):
            name = self.scanner_names[k]
            self.threads.append(Thread(name, name, self.follower_main(self.scans[k])))
        for v in self.vms:
            self.threads.append(Thread(f"{v.name}/writer", v.name, self.writer(v, npages, writes[v.id % len(writes)]),
                                       vm=v))
        if kill:
            self.threads.append(Thread("supervisor", "supervisor", self.supervisor(kill)))
        if kill2:       # a second death any time after the first, its recovery included (recovered in turn)
            self.threads.append(Thread("supervisor2", "supervisor2", self.supervisor(kill2)))
        for t in self.threads:
            self._advance(t, None)
        self._warm_up()

    def _warm_up(self) -> None:
        """The scanners alone until the first full scan ends: every page has a checksum, the next scan merges."""
        scanners = [t for t in self.threads if t.actor in self.scanner_names]
        while self.scan.c["full_scans"] < 1:
            for t in scanners:
                if not t.done and self._runnable(t):
                    self._run_thread(t, {})
        self.violations_found += self._frame_violations()

    # ---------------------------------------------------------------- set-up
    def _new_mm(self, mm_id: int, npages: int) -> MMView:
        """An empty mm, its channels and its ptl (ksmd learns of it separately: scan.add_mm)."""
        mm = MMView(ArraySegment(MMView.size_for(npages)))
        mm.hdr[MMH_ID] = mm_id
        mm.hdr[MMH_NPAGES] = npages
        mm.hdr[MMH_DOMAIN] = mm_id % 2 if self.mitigation == "domain" else 0
        self.mem.mms[mm_id] = mm
        fd = self.faultd_of(mm_id)
        for q in ((fd, mm_id), (mm_id, fd), (mm_id, f"{fd}.ack")):
            self.queues[q] = collections.deque()
        for name in self.scanner_names:
            self.queues[(name, mm_id)] = collections.deque()
            self.queues[(mm_id, f"{name}.ack")] = collections.deque()
        self.locks[("ptl", mm_id)] = None
        self.locks[("ksm", mm_id)] = None
        self.old_lock[("ptl", mm_id)] = [1, 0]
        return mm

    def _add_to_scanners(self, mm_id: int, mm: MMView) -> None:
        """Every scanner learns of the mm, on rmap items they share (as the rmap segment is shared)."""
        items = RmapItems.fixed_size(mm.npages)
        self.rmaps[mm_id] = items
        for sc in self.scans:
            sc.add_mm(mm_id, mm, items)

    @staticmethod
    def _register(v: VMState, mm: MMView) -> None:
        register(mm, list(v.subs.values()))
        for s in v.subs:
            v.grammar[s] = GRAMMAR[(INIT, "REGISTER")]

    def _make_vm(self, mm_id: int, npages: int, device: bool) -> None:
        mm = self._new_mm(mm_id, npages)
        start = USER_BASE
        mm.vmas[0] = (start, start + npages * PAGE_SIZE, VM_READ | VM_WRITE | VM_MERGEABLE)
        mm.hdr[MMH_FLAGS] |= MMF_VM_MERGEABLE
        pfns = self.alloc.alloc(npages, 1, zero=True)
        for p in range(npages):
            self.alloc.pages[pfns[p]] = self.fill[p % len(self.fill)]
        mm.pte[:] = (pfns.astype(np.uint64) << np.uint64(PAGE_SHIFT)) | np.uint64(PTE_PRESENT | PTE_WRITE)
        v = VMState(mm_id, f"vm{mm_id}", npages, device)
        self._register(v, mm)
        for p in range(npages):
            v.record[p] = self.fill[p % len(self.fill)]
        self._add_to_scanners(mm_id, mm)
        self.vms.append(v)

    def faultd_of(self, mm: int) -> str:
        """The fault handler serving mm (its number: mm modulo their count, as Machine.faultd_name)."""
        return self.faultd_names[mm % len(self.faultd_names)]

    def _serves(self, actor: str, mm: int) -> bool:
        return actor not in self.faultd_names or self.faultd_of(mm) == actor





    # ---------------------------------------------------------------- running threads
    def _advance(self, t: Thread, result, exc=None) -> None:
        """Resume t's generator with result (or exc) until it yields its next effect."""
        while True:
            gen = t.stack[-1]
            try:
                e, value = resume(gen, result, exc)
            except Exception as x:
                t.stack.pop()
                if not t.stack:     # (a fault handler's errors are replies: serve_fault raises only bugs)
                    t.done, t.pending = True, None
                    self.violations_found.append(f"{t.name} failed: {type(x).__name__}: {x}")
                    return
                result, exc = None, x
                continue
            if e is None:
                t.stack.pop()
                if not t.stack:
                    t.done, t.pending, t.result = True, None, value
                    return
                result, exc = value, None
                continue
            if "pid-takeover-lock" in self.brk and isinstance(e, TryLock) and e.key[0] == "ptl":
                t.stack.append(self._old_lock_algo(t, e))
                result, exc = None, None
                continue
            t.pending = e
            return

    def _hold(self, key, t) -> None:
        if self.locks[key] is not None and self.locks[key] != t.name:
            self.violations_found.append(f"{_lname(key)} has two holders: {self.locks[key]} and {t.name}")
        self.locks[key] = t.name

    def finished(self) -> bool:
        """Every thread ended (a kill that can no longer happen, of a VM once ksmd ended, ends too)."""
        return all(t.done or (t.pending.__class__ is _Kill and not self._runnable(t)) for t in self.threads) and not any(self.queues.values()) and not any(self.shardq.values())

    def state_key(self):
        return None

    def _run_thread(self, t: Thread, rec: dict) -> None:
        """Perform t's pending effect through the world's backend, then advance t to its next effect."""
        e = t.pending
        c = e.__class__
        if t.vm is not None and t.vm.sig is not None:
            t.vm.sig["vm"].append(c.__name__)
        elif getattr(t, "sig", None) is not None:
            t.sig.append(c.__name__)
        if c is Candidates:
            self.candidates.update((e.mm, int(i)) for i in np.atleast_1d(e.idx))
        if c not in _READ_ONLY:
            self._dirty = True
        self.cur, self.cur_rec = t, rec
        result, exc = None, None
        try:
            result = self.backend.perform(e)
        except Exception as x:
            exc = x
        if result is BLOCK:         # (t waits on something else now: t.pending says what)
            return
        self._advance(t, result, exc)

    # ---------------------------------------------------------------- the world's backend
    def world_backend(self) -> Backend:
        """The checker's backend of the one interpreter (runtime/interp.py): in-process arrays for the
        memory, the lock table, the message queues, the kill and the recovery's control effects.  The
        scheduler has already decided that the effect can run (a lock free, a message there)."""
        b = Backend(self.mem, {
            CopyPages: self._w_copy_pages, Alloc: self._w_alloc, Touch: lambda e: touch(e.sub, e, memoryview(self.frames)),
            TryLock: self._w_trylock, Lock: self._w_lock, Unlock: self._w_unlock,
            Notify: lambda e: self._notify(self.cur, e, self.cur_rec),
            LocalNotify: lambda e: self._local_notify(self.vms[e.mm], e),
            WaitAcks: self._w_wait_acks, FaultCall: self._w_fault_call, _AwaitReply: self._w_await_reply,
            WaitIdle: _nothing, _AwaitScan: _nothing, _Boundary: _nothing, _AwaitRestore: _nothing,
            _Kill: lambda e: self._kill(e.target), Freeze: self._w_freeze, Thaw: self._w_thaw,
            NotifierLost: lambda e: self._notifier_lost_one(self.vms[e.mm], e.peer),
            Respawn: lambda e: self._restart(e.group),
            Reply: lambda e: self._reply(self.cur, e.err, e.msg, e.entries),
            _Micro: lambda e: e.run(), ShardSend: self._w_shard_send, ShardRecv: self._w_shard_recv,
            ShardReady: self._w_shard_ready,
            ForgetMM: self._w_forget_mm, _AwaitForget: self._w_await_forget})
        b.name = "the checker"
        return b

    def _fault_memory(self, name: str) -> None:
        """A fault handler's own FrameAllocator over the world's frames, keeping a frame reserve as
        faultd does (`keep_reserve`: its one-frame allocations off the reserve, without the frame lock;
        a repair takes every reserve back).  A new one for each process: a restart starts with none."""
        a = FrameAllocator(self.ft, self.frames, NullLock())
        a.keep_reserve(WORLD_FRAME_RESERVE, min_free=WORLD_RESERVE_MIN_FREE)
        if "reserve-no-gen" in self.brk:        # (the break: a reserve a repair took back is still handed out)
            a._reserve_valid = lambda: True
        self.fault_mems[name] = Memory(a, self.stats, self.mem.mms)

    def _w_alloc(self, e):
        m = self.fault_mems.get(self.cur.actor, self.mem)
        a = m.alloc
        had, gen = len(a.reserve), a._reserve_gen
        out = APPLY_MEM[Alloc](m, e)
        if had:
            if gen != self.ft.hdr.item(FTH_RESERVE_GEN):
                self.coverage["a repair took back a live fault handler's frame reserve"] += 1
            elif len(a.reserve) == had - 1:
                self.coverage["a fault's frame from its handler's reserve"] += 1
            elif not a.reserve:
                self.coverage["a fault handler's reserve given back near out of memory (drain_local_pages)"] += 1
        return out

    def _w_copy_pages(self, e):
        if (self.ft.flags[np.atleast_1d(e.src)] & FRAME_KSM).any():
            self.coverage["cow of a KSM page"] += 1
        return APPLY_MEM[CopyPages](self.mem, e)

    def _w_trylock(self, e):
        t = self.cur
        free = self.locks[e.key] is None
        if free:
            self._hold(e.key, t)
        elif e.key[0] == "ksm":
            self.coverage["the other scanner was merging into the same mm"] += 1
        elif t.actor in self.scanner_names and self.locks[e.key] in self.scanner_names:
            self.violations_found.append(
                f"{t.name}'s trylock of {_lname(e.key)} failed: {self.locks[e.key]} holds it (another "
                f"scanner made merges fail that one scanner would have done)")
        return free

    def _w_lock(self, e):
        t = self.cur
        if e.key[0] == "ksm" and any(h in self.scanner_names and h != t.name
                                     for k, h in self.locks.items() if k[0] == "ksm"):
            self.coverage["merge while the other scanner merges"] += 1
        self._hold(e.key, t)

    def _w_unlock(self, e):
        t = self.cur
        if self.locks[e.key] != t.name:
            self.violations_found.append(f"{t.name} unlocks {_lname(e.key)} held by {self.locks[e.key]}")
        self.locks[e.key] = None

    def _w_wait_acks(self, e):
        flags = []
        for hs in e.handles:
            for h in hs:
                flags += self.acks.pop(h)[1:]
        return flags

    def _w_fault_call(self, e):
        t = self.cur
        self._send_fault(t, e.idx, e.flags)
        return BLOCK

    def _w_await_reply(self, e):
        t = self.cur
        if e.corr not in t.vm.replies:       # lost with the dead fault handler: sent again
            self.lost.discard(e.corr)
            self._send_fault(t, e.idx, e.flags)
            return BLOCK
        err, msg = t.vm.replies.pop(e.corr)
        if err:
            raise OSError(err, msg)

    def _send_fault(self, t: Thread, idx, flags) -> None:
        corr = self._new_id()
        self.queues[(t.vm.id, self.faultd_of(t.vm.id))].append(("FAULT", corr, idx, flags))
        self.cur_rec["flow_out"] = corr
        t.pending = _AwaitReply(corr, idx, flags)

    def _w_freeze(self, e):         # (dead scanners cannot be held: their own recovery repairs)
        self.frozen = self.up["ksmd"]
        return self.frozen

    def _w_forget_mm(self, e):      # (ksmd forgets at its next batch boundary: waited for)
        return BLOCK if self._forget(self.cur, e) else None

    def _w_await_forget(self, e):
        if e.mm in self.exits:      # (ksmd died before it forgot)
            self.exits.remove(e.mm)

    def _w_thaw(self, e):
        self.frozen = False

    def _w_shard_send(self, e):
        self.shardq[(self._scanner_no(self.cur.actor), e.dst, e.kind)].append(e.msg)

    def _w_shard_ready(self, e):
        ready = self._shard_ready(self.cur.actor, e)
        if not ready:
            self.coverage["a scanner hashes ahead while the others' messages are not there"] += 1
        return ready

    def _w_shard_recv(self, e):
        t, result = self.cur, []
        for src in e.srcs:
            self._shard_head(src, t.actor, e)
            result.append(self.shardq[(src, self._scanner_no(t.actor), e.kind)].popleft())
        return result


def _nothing(e):
    return None


def world_factory(mode: str, brk: str | None = None, scenario: str | None = None, scanners: int | None = None,
                  **config):
    """A callable that builds a fresh, identical KsmWorld (the explorer replays by rebuilding).

    scenario: a name of SCENARIOS (default: the break's, else "base"); config overrides it.
    The breaks of the recovery (no-repair, no-spte-flush) need a kill: theirs unless `kill` says.
    scanners=2 is the two-scanner configuration (SHARDED; with a scenario other than "base",
    its scanners, contents and round size under the scenario's program); None: 2 for a break
    of the scanners' protocol (SHARD_BREAKS), else 1."""
    if brk is not None:
        check_break(brk)
    if scanners is None:
        scanners = 2 if brk in SHARD_BREAKS else 1
    if scanners not in (1, 2):
        raise ValueError(f"the KSM world runs 1 or 2 scanners, not {scanners}")
    if brk in SHARD_BREAKS and scanners < 2:
        raise ValueError(f"break {brk} is a step of the scanners' protocol: it needs 2 scanners")
    scenario = scenario or BREAK_SCENARIO.get(brk, "base")
    if brk in BREAK_MITIGATION:
        if config.get("mitigation", BREAK_MITIGATION[brk]) != BREAK_MITIGATION[brk]:
            raise ValueError(f"break {brk} is a step of the mitigation {BREAK_MITIGATION[brk]}: it needs "
                             f"--mitigation {BREAK_MITIGATION[brk]}")
        config["mitigation"] = BREAK_MITIGATION[brk]
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; one of: {', '.join(SCENARIOS)}")
    if brk in BREAK_KILLS and config.get("kill") is None:
        config["kill"] = BREAK_KILLS[brk]
    kills = ["ksmd", "faultd"] + (["faultd1"] if config.get("fault_handlers", 1) == 2 else []) + ["vm"]
    if isinstance(config.get("kill"), str) and "," in config["kill"]:     # "faultd,ksmd": a second kill
        config["kill"], config["kill2"] = config["kill"].split(",", 1)
    for k in (config.get("kill"), config.get("kill2")):
        if k is not None and k not in kills and not re.fullmatch(r"vm[0-9]+", k):   # vmN: KsmWorld checks N
            raise ValueError(f"--kill {k!r}: this world's actors are {', '.join(kills)} (vm: vm0; or vmN)")
    sharded = {}
    if scanners == 2:
        sharded = SHARDED if scenario == "base" else {k: SHARDED[k] for k in ("scanners", "fill", "smart_scan",
                                                                                  "pages_to_scan")}
    config = {**sharded, **SCENARIOS[scenario], **BREAK_CONFIG.get(brk, {}), **config}

    def factory():
        return KsmWorld(mode, brk, **config)
    if any(k is not None and k not in kills for k in (config.get("kill"), config.get("kill2"))):
        factory()                       # a vmN: the world names its VMs (ValueError here, not in a job)
    factory.scenario = scenario
    factory.scanners = scanners
    factory.fault_handlers = config.get("fault_handlers", 1)
    return factory
