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
    ksmd rebuilds its state with KsmScan.restore; lost FAULTs are sent again), thaw.

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

import collections
import errno
import hashlib

import numpy as np

from proto.knobs import DEFAULTS, MITIGATIONS
from proto.layout import (COUNTERS, FRAME_FREE, FRAME_KSM, MM_STATS, MMF_VM_MERGEABLE, MMH_DOMAIN, MMH_FLAGS, MMH_ID,
                          MMH_NPAGES, PAGE_SHIFT, PAGE_SIZE, PTE_PRESENT, PTE_SPECIAL, PTE_WRITE,
                          USER_BASE, VM_MERGEABLE, VM_READ, VM_WRITE, ZERO_PFN, FrameTable, MMView,
                          StatsView)
from proto.messages import Msg

from workers.mm.kvm import FaultCall, Touch, WaitIdle, touch, vm_access
from workers.mm.effects import (MEM_EFFECTS, Candidates, Checksum, Compare, CopyPages, Effect, Load, Lock, Memory, Notify, Reply,
                           ShardRecv, ShardSend, TryLock, Unlock, WaitAcks, apply_mem)
from workers.mm.fault import fault_reply_errno, handle_mm_fault
from workers.mm.vma import do_mprotect, dup_mmap, ksm_disable_merge_any, ksm_enable_merge_any, madvise_dontneed
from workers.mm.mmu_notifier import (EXPECT, FAILED, GRAMMAR, INIT, MODES, LocalNotify, NotifierLink, SecondaryMMU,
                                     apply_cow_reply, grammar_why, notifier_lost, receive_notification, register)
from workers.mm.pte import may_access, mergeable_ranges, vma_flags_at
from workers.mm.invariants import frame_problems
from workers.mm.recovery import Freeze, NotifierLost, Respawn, Thaw, recover, victims
from workers.mm.ksm.scan import SUMMED, KsmScan
from workers.mm.ksm.shard import LEAD
from workers.runtime.frames import FrameAllocator
from workers.mm.ksm.stable_tree import RmapItems
from workers.mm.breaks import BREAKS as DECLARED, Breaks, check_break

# the declared breaks (workers/mm/breaks.py) as the checker's tables: name -> description, and what each needs
BREAKS = {n: b.what for n, b in DECLARED.items()}
SHARD_BREAKS = tuple(n for n, b in DECLARED.items() if b.scanners == 2)
BREAK_KILLS = {n: b.kill for n, b in DECLARED.items() if b.kill}
BREAK_MODES = {n: b.modes for n, b in DECLARED.items() if b.modes}
BREAK_CONFIG = {n: b.config for n, b in DECLARED.items() if b.config}
BREAK_SCENARIO = {n: b.scenario for n, b in DECLARED.items() if b.scenario != "base"}
BREAK_MITIGATION = {n: b.mitigation for n, b in DECLARED.items() if b.mitigation}
# the two-scanner configuration: page 0 of each VM holds a content of shard 0 (byte 2), page 1 one of
# shard 1 (byte 1).  The first writes race the first merges (vm0 zaps page 1 with MADV_DONTNEED, vm1
# rewrites what its page 1 holds); the next ones copy contents across shards: COW of one owner's KSM
# page, then a merge into the other owner's node.  A round is a full scan (pages_to_scan above the
# pages): the next round's visits follow the merges at once
SHARDED = dict(scanners=2, fill=(2, 1), writes=(((1, -1), (0, 1), (1, 2)), ((1, 1), (1, 2), (0, 1))),
               smart_scan=0, complete=True, pages_to_scan=1000, first_scan=1)
KILLS = ("ksmd", "faultd", "faultd1")
RECOVER = ("recover",)          # the supervisor's recover_lock: a recovery and a VM's spawn (fork) exclude

# The writers' programs.  An op is (page, byte) to write and read back, (page, -1) for
# MADV_DONTNEED (the page reads as zero), ("fork", ops) to fork a child running ops,
# ("prot", page, VM_READ|VM_WRITE bits) for mprotect, ("efault", page, write) for an access
# that must fail with EFAULT, ("merge_any", 0|1) for prctl(PR_SET_MEMORY_MERGE), ("read", page)
# to read it (installing its spte).  "read" and "efault" follow the op before them at once; every
# other op waits for one more full scan of ksmd.
_CHILD = ((0, 5), ("merge_any", 1), ("merge_any", 0), (1, -1))
SCENARIOS = {
    "base": {},
    # a write to a merged page (page 1), then, two scans later, to the same page now an unmerged candidate
    # (its own content, fake-merged under vusion), then to a merged page again (page 0): "same behaviour"
    "same": dict(writes=(((1, 3), ("wait",), ("wait",), (1, 4), (0, 5)), (("wait",),) * 5)),
    "fork": dict(writes=(((0, 0), ("fork", _CHILD), (1, 3), (0, -1)),
                         (("read", 1), ("prot", 1, 0), ("efault", 1, False), ("prot", 1, VM_READ),
                          ("efault", 1, True), ("prot", 1, VM_READ | VM_WRITE), (1, 4))),
                 use_zero_pages=1),
}


class ArraySegment:
    """A Segment lookalike over a bytearray: the checker's stand-in for POSIX shared memory."""

    def __init__(self, size: int):
        self.buf = bytearray(size)
        self.size = size

    def view(self, dtype, offset: int, count: int) -> np.ndarray:
        return np.frombuffer(self.buf, dtype=dtype, count=count, offset=offset)


class NullLock:
    """The frame lock under the checker: allocator effects are single steps already."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Step:
    __slots__ = ("actor", "label", "footprint", "run")

    def __init__(self, actor, label, footprint, run):
        self.actor, self.label, self.footprint, self.run = actor, label, frozenset(footprint), run


class _AwaitReply(Effect):
    __slots__ = ("corr", "idx", "flags")

    def __init__(self, corr, idx=None, flags=0):
        self.corr, self.idx, self.flags = corr, idx, flags

    def __repr__(self):
        return f"wait FAULT_REPLY {self.corr}"


class _AwaitScan(Effect):
    """The world's pacing of a writer: wait until ksmd has ended n full scans."""
    __slots__ = ("n",)

    def __init__(self, n):
        self.n = n

    def __repr__(self):
        return f"wait for full scan {self.n}"


class _Kill(Effect):
    """kill -9 of an actor (the supervisor's first step: the schedule picks when)."""
    __slots__ = ("target",)

    def __init__(self, target):
        self.target = target

    def __repr__(self):
        return f"kill -9 {self.target}"


class _Boundary(Effect):
    """ksmd between two batches (where a freeze holds it)."""
    __slots__ = ()

    def __repr__(self):
        return "batch boundary"


class Thread:
    """One running core generator (a stack of them while the old lock algorithm runs)."""

    def __init__(self, name: str, actor: str, gen, vm=None):
        self.name, self.actor, self.vm = name, actor, vm
        self.stack = [gen]
        self.pending = None
        self.done = False
        self.result = None


class VMState:
    def __init__(self, mm_id: int, name: str, npages: int, device: bool):
        self.id, self.name = mm_id, name
        self.subs = {0: SecondaryMMU(0, "kvm", npages, True)}
        if device:
            self.subs[1] = SecondaryMMU(1, "dev", npages, False)
        self.grammar = {s: INIT for s in self.subs}
        self.record: dict[int, int] = {}
        self.replies: dict[int, tuple] = {}
        self.efault_expected = False
        self.sig: dict | None = None        # the effects of the write being watched ("same behaviour")


class KsmWorld:
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
        for k in (kill, kill2):
            if k is not None and k not in ["ksmd"] + self.faultd_names:
                raise ValueError(f"kill {k!r} is not one of {['ksmd'] + self.faultd_names}")
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
        self.up = {a: True for a in ["ksmd"] + self.faultd_names}   # False from the kill to the restart
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

    # ---------------------------------------------------------------- the programs
    def ksmd_main(self):
        """ksmd (the leader): full scans while any writer runs, then settle_scans more; then the others stop."""
        settle = self.settle_scans
        while self.writers_left or settle > 0:
            if not self.writers_left and not (self.complete and self._faults_running()):
                settle -= 1
            ended = False
            while not ended:
                if self.kill:
                    yield _Boundary()
                _, _, ended = yield from self.scan.ksm_do_scan(self.scan.knobs["pages_to_scan"])
                self._check_counters()
        yield from self.scan.stop_followers()

    def _faults_running(self) -> bool:
        """A fault handler task still at work (an early reply leaves it holding ptl until its acks)."""
        return any(t.actor in self.faultd_names and not t.done for t in self.threads)

    def faultd_of(self, mm: int) -> str:
        """The fault handler serving mm (its number: mm modulo their count, as Machine.faultd_name)."""
        return self.faultd_names[mm % len(self.faultd_names)]

    def _serves(self, actor: str, mm: int) -> bool:
        return actor not in self.faultd_names or self.faultd_of(mm) == actor

    def follower_main(self, scan: KsmScan):
        """Another scanner: the leader's rounds until it says stop."""
        while True:
            op, _ = yield from scan.follow_one()
            if op == "stop":
                return

    def supervisor(self, target: str):
        """kill -9 of `target` at a point the schedule picks, then the supervisor's recovery program."""
        yield _Kill(target)
        yield Lock(RECOVER)     # (the supervisor's recover_lock: no VM is spawned, by fork or not, meanwhile)
        fixed = yield from recover([target], self.scanner_names, lambda: [v.id for v in self.vms],
                                   lambda: list(self.mem.mms), self._serves, self.nframes, self.brk)
        yield Unlock(RECOVER)
        return fixed

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
            self.writers_left -= 1
        for page in range(npages):
            got = bytearray(PAGE_SIZE)
            yield from vm_access(v.id, sub, USER_BASE + page * PAGE_SIZE, PAGE_SIZE, False, got)
            self._check_read(v, page, got, "final read")
        if self.complete:       # the scans that settle start once no VM touches memory any more
            self.writers_left -= 1

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

    def _candidate(self, v: VMState, page: int) -> str | None:
        """Under vusion, what page is as a write to it starts: "merged" (it maps a KSM page), "unmerged
        candidate" (ksmd fake-merged it and nobody wrote it since), else None (not watched)."""
        if self.mitigation != "vusion":
            return None
        pte = int(self.mem.mms[v.id].pte[page])
        if pte & PTE_PRESENT and not pte & PTE_SPECIAL and self.ft.flags[pte >> PAGE_SHIFT] & FRAME_KSM:
            return "merged"
        return "unmerged candidate" if (v.id, page) in self.candidates else None

    def _same_behaviour(self) -> None:
        """VUsion's invariant: every write to a candidate causes the same effects, merged or not: the same
        sequence in the VM up to its first fault's reply, and in the fault handler's task for that fault
        (compared once it ended: interleavings between the two are the schedule's, not the page's).  A
        second fault of the same write (ksmd fake-merged the copy before the write landed on it) is
        the schedule's too, whichever the page was."""
        keep = []
        for sig in self.same_pending:
            if not all(t.done for t in sig["threads"]):
                keep.append(sig)
                continue
            if any(getattr(t, "killed", False) for t in sig["threads"]):
                continue            # its fault handler was killed mid-fault: the schedule's, not the page's
            vm = [e for e in sig["vm"] if e != "WaitIdle"]      # (an invalidation in flight: the schedule's)
            vm = vm[:vm.index("_AwaitReply") + 1] if "_AwaitReply" in vm else vm
            first = [e for k, e in enumerate(vm) if not k or e != vm[k - 1]]     # (a retried touch: one)
            got = (tuple(first), tuple(sig["faultd"][0]) if sig["faultd"] else ())
            if self.same_ref is None:
                self.same_ref = (got, sig["what"])
            elif got != self.same_ref[0]:
                show = lambda g: " ".join(g[0]) + " | fault handler: " + (" ".join(g[1]) or "nothing")  # noqa: E731
                self.violations_found.append(
                    f"same behaviour: the write to {sig['what']} caused {show(got)}, but the write to "
                    f"{self.same_ref[1]} caused {show(self.same_ref[0])}: a timed write tells them apart")
        self.same_pending = keep

    def _check_read(self, v: VMState, page: int, got: bytearray, when: str) -> None:
        want = v.record[page]
        if got != bytes([want]) * PAGE_SIZE:
            bad = next(k for k in range(PAGE_SIZE) if got[k] != want)
            self.violations_found.append(f"lost write: {v.name} page {page} {when}: byte {bad} is {got[bad]}, "
                                         f"the last value written was {want}")

    # ---------------------------------------------------------------- running threads
    def _advance(self, t: Thread, result, exc=None) -> None:
        """Resume t's generator with result (or exc) until it yields its next effect."""
        while True:
            gen = t.stack[-1]
            try:
                e = gen.throw(exc) if exc is not None else gen.send(result)
            except StopIteration as s:
                t.stack.pop()
                if not t.stack:
                    t.done, t.pending, t.result = True, None, s.value
                    return
                result, exc = s.value, None
                continue
            except Exception as x:
                t.stack.pop()
                if not t.stack:
                    t.done, t.pending = True, None
                    err = fault_reply_errno(x, t.mm) if t.actor in self.faultd_names else None
                    if err is not None:         # an error reply, as faultd sends it
                        self._reply(t, *err)
                    else:
                        self.violations_found.append(f"{t.name} failed: {type(x).__name__}: {x}")
                    return
                result, exc = None, x
                continue
            if "pid-takeover-lock" in self.brk and isinstance(e, TryLock) and e.key[0] == "ptl":
                t.stack.append(self._old_lock_algo(t, e))
                result, exc = None, None
                continue
            t.pending = e
            return

    def _old_lock_algo(self, t: Thread, e):
        """The old ShmLock: a semaphore plus an owner pid read without the semaphore (the bug)."""
        st = self.old_lock[e.key]
        me = hash(t.name) & 0xFFFF or 1
        if isinstance(e, Unlock):
            yield _Micro("store owner 0", lambda: st.__setitem__(1, 0), e.key)
            yield _Micro("sem_post", lambda: self._old_post(e.key, t), e.key)
            return None
        blocking = isinstance(e, Lock)
        while True:
            ok = yield _Micro("sem_trywait", lambda: self._old_trywait(e.key, t), e.key,
                              enabled=(lambda: st[0] > 0) if blocking else None)
            if ok:
                yield _Micro("store owner", lambda: st.__setitem__(1, me), e.key)
                return True
            if blocking:
                continue
            o = yield _Micro("read owner", lambda: st[1], e.key)
            if o == 0 or o not in self._live_pids():      # "not alive" (pid 0 is never alive)
                o2 = yield _Micro("read owner again", lambda: st[1], e.key)
                if o2 != 0:
                    yield _Micro("take over: store owner", lambda: self._old_take_over(e.key, t, me), e.key)
                    return True
            return False

    def _live_pids(self):
        return {hash(t.name) & 0xFFFF or 1 for t in self.threads if not t.done}

    def _old_trywait(self, key, t) -> bool:
        st = self.old_lock[key]
        if st[0] > 0:
            st[0] -= 1
            self._hold(key, t)
            return True
        return False

    def _old_post(self, key, t) -> None:
        self.old_lock[key][0] += 1
        if self.locks[key] == t.name:
            self.locks[key] = None

    def _old_take_over(self, key, t, me) -> None:
        self.old_lock[key][1] = me
        self._hold(key, t)

    def _hold(self, key, t) -> None:
        if self.locks[key] is not None and self.locks[key] != t.name:
            self.violations_found.append(f"{_lname(key)} has two holders: {self.locks[key]} and {t.name}")
        self.locks[key] = t.name

    # ---------------------------------------------------------------- the World interface
    def enabled(self) -> list[Step]:
        if self._enabled is not None:
            return self._enabled
        steps = self._enabled = []
        for t in self.threads:
            if t.done or not self._runnable(t):
                continue
            steps.append(Step(t.actor, f"{t.name}: {t.pending!r}", self._footprint(t), t))
        for q, dq in self.queues.items():
            if dq:
                steps.append(Step(self._queue_actor(q), f"deliver {dq[0][0]}", (((("chan",) + q), "w"),)
                                  + self._delivery_footprint(q), q))
        return steps

    def take(self, i: int) -> dict:
        step = self.enabled()[i]
        self._enabled = None
        self.clock_steps += 1
        rec = {"actor": step.actor, "label": step.label, "args": {}}
        if isinstance(step.run, Thread):
            self._run_thread(step.run, rec)
        else:
            self._deliver(step.run, rec)
        return rec

    def violations(self) -> list[str]:
        if self.same_pending:
            self._same_behaviour()
        out = list(self.violations_found)
        self.violations_found.clear()
        if self._dirty:         # a step that only read leaves the frame invariants as they were
            self._dirty = False
            out += self._frame_violations()
        return out

    def finished(self) -> bool:
        return all(t.done for t in self.threads) and not any(self.queues.values()) and not any(self.shardq.values())

    def final_violations(self) -> list[str]:
        out = self._frame_violations() + frame_problems(self.ft, [mm.pte for mm in self.mem.mms.values()],
                                                        self.nframes)
        maps = self._mappings()
        c = self.totals()
        ksm = [p for p in range(1, self.nframes) if self.ft.flags[p] & FRAME_KSM and maps[p]]
        if c["pages_shared"] != len(ksm) or c["pages_shared"] + c["pages_sharing"] != int(sum(maps[p] for p in ksm)):
            out.append(f"counters pages_shared {c['pages_shared']} pages_sharing {c['pages_sharing']}, but "
                       f"{len(ksm)} KSM frames are mapped {int(sum(maps[p] for p in ksm))} times")
        zi = MM_STATS.index("ksm_zero_pages")
        total = 0
        for v in self.vms:
            mm = self.mem.mms[v.id]
            pte = mm.pte
            present = (pte & np.uint64(PTE_PRESENT)) != 0
            nzero = int((present & ((pte & np.uint64(PTE_SPECIAL)) != 0)).sum())
            total += nzero
            if int(self.stats.mm[v.id, zi]) != nzero:
                out.append(f"{v.name}: ksm_zero_pages {int(self.stats.mm[v.id, zi])}, but {nzero} PTEs map the "
                           f"KSM zero page")
            slot = self.scan.slots.get(v.id)
            pfn = (pte >> np.uint64(PAGE_SHIFT)).astype(np.int64)
            inside = np.zeros(len(pte), dtype=bool)
            for a, b in mergeable_ranges(mm.vma_list()):
                inside[a:b] = True
            nksm = int((present & inside & ((self.ft.flags[pfn] & FRAME_KSM) != 0)).sum())
            merging = slot.items.merging if slot is not None else 0
            if merging != nksm:
                out.append(f"{v.name}: ksm_merging_pages {merging}, but {nksm} of its PTEs map KSM pages")
        if int(self.stats.counters[COUNTERS.index("ksm_zero_pages")]) != total:
            out.append(f"ksm_zero_pages {int(self.stats.counters[COUNTERS.index('ksm_zero_pages')])}, but {total} "
                       f"PTEs map the KSM zero page")
        if self.complete:
            out += self._incomplete()
        return out

    def totals(self) -> dict:
        """The counters as the leader publishes them: every scanner's summed."""
        return {k: sum(sc.c[k] for sc in self.scans) for k in SUMMED}

    def _incomplete(self) -> list[str]:
        """The merge one scanner would reach: each content held by two or more candidate pages is one
        KSM page (max_page_sharing is never reached here)."""
        frames_of: dict[bytes, set] = {}
        for mm in self.mem.mms.values():
            for pte in mm.pte.tolist():
                pfn = pte >> PAGE_SHIFT
                if pte & PTE_PRESENT and pfn != ZERO_PFN:
                    frames_of.setdefault(bytes(self.alloc.pages[pfn]), set()).add(pfn)
        out = []
        for data, pfns in frames_of.items():
            mapped = sum(1 for mm in self.mem.mms.values() for pte in mm.pte.tolist()
                         if pte & PTE_PRESENT and (pte >> PAGE_SHIFT) in pfns)
            if mapped >= 2 and len(pfns) > 1:
                out.append(f"merge incomplete: {mapped} pages holding byte {data[0]} are in {len(pfns)} frames "
                           f"{sorted(pfns)}, one scanner merges them into one KSM page")
        return out

    def state_key(self):
        return None

    # ---------------------------------------------------------------- steps
    def _runnable(self, t: Thread) -> bool:
        e = t.pending
        c = e.__class__
        if c is Lock:
            held = self.locks[e.key]
            if e.key[0] == "ksm" and held is not None and held != t.name:
                self.coverage["the other scanner was merging into the same mm"] += 1
            return held is None
        if c is WaitAcks:
            return all(self.acks[h][0] == 0 for hs in e.handles for h in hs)
        if c is WaitIdle:
            return e.sub.in_progress == 0 or e.sub.released
        if c is _AwaitReply:
            fd = self.faultd_of(t.vm.id)
            return e.corr in t.vm.replies or (e.corr in self.lost and self.up[fd]
                                              and fd not in self.pending_loss[t.vm.id])
        if c is _AwaitScan:
            return self.scan.c["full_scans"] >= e.n
        if c is _Micro and e.enabled is not None:
            return e.enabled()
        if c is ShardRecv:
            return all(self._shard_head(src, t.actor, e) is not None for src in e.srcs)
        if c is _Boundary:
            return not self.frozen
        if c is Freeze:
            k = self._ksmd_thread()
            return k is None or k.done or isinstance(k.pending, _Boundary)
        if c is NotifierLost:
            return not self.queues[(e.peer, e.mm)]
        if c is _Kill:          # (the second kill: of a live actor, once the first has died)
            return self.up[e.target] and (t.name == "supervisor" or self.killed)
        if c is _AwaitRestore:
            return self.restoring == 0
        return True

    def _scanner_no(self, name: str) -> int:
        return self.scanner_names.index(name)

    def _shard_head(self, src: int, me: str, e: ShardRecv):
        """The message e would take from scanner src (older rounds' dropped first), or None."""
        q = self.shardq[(src, self._scanner_no(me), e.kind)]
        while q and e.seq is not None and q[0].seq < e.seq:
            q.popleft()
        return q[0] if q else None

    def _footprint(self, t: Thread) -> tuple:
        e = t.pending
        fp = tuple(e.footprint())
        c = e.__class__
        if t.vm is not None:
            fp += ((("vm", t.vm.id), "w"),)
        if t.actor in self.scanner_names:
            fp += ((("ft",), "r"), (("scans",), "w"), (("rmap",), "w"))
        if c is ShardRecv:
            fp += ((("shardq", self._scanner_no(t.actor)), "w"),)
        if c is _AwaitScan:
            fp += ((("scans",), "r"),)
        if c is WaitAcks:
            fp += ((("acks", t.actor), "r"),)
        elif c is Notify:
            fp += (((("chan", t.actor.split("/")[0], e.mm)), "w"),)
        elif c is FaultCall:
            fp += ((("chan", t.vm.id, self.faultd_of(t.vm.id)), "w"),)
        elif c is Reply:
            fp += ((("chan", t.actor, t.mm), "w"),)
        elif c is _AwaitReply:
            fp += ((("chan", t.vm.id, self.faultd_of(t.vm.id)), "w"), (("up",), "r"))
        elif c in (_Kill, Respawn, Freeze, Thaw, _Boundary):    # the kill and restart touch everything
            fp += ((("up",), "w"), (("ft",), "w"), (("scans",), "w"), (("frozen",), "w")) + tuple(
                (k, "w") for k in self.locks) + tuple(((("chan",) + q), "w") for q in self.queues) + tuple(
                (("vm", v.id), "w") for v in self.vms) + tuple((("acks", a), "w")
                                                               for a in self.scanner_names + self.faultd_names)
        return fp

    def _queue_actor(self, q) -> str:
        """Each channel delivers on its own track, so a scheduler can hold one back and not another."""
        src, dst = q
        if isinstance(dst, int):
            return f"{self.vms[dst].name}/from-{src}"
        return f"{dst.split('.')[0]}/from-{self.vms[src].name}"

    def _delivery_footprint(self, q) -> tuple:
        src, dst = q
        if isinstance(dst, int):
            return ((("vm", dst), "w"),)
        if dst.endswith(".ack"):
            return ((("acks", dst.split(".")[0]), "w"),)
        return ()

    def _run_thread(self, t: Thread, rec: dict) -> None:
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
        result, exc = None, None
        try:
            if c in MEM_EFFECTS:
                if c is CopyPages and (self.ft.flags[np.atleast_1d(e.src)] & FRAME_KSM).any():
                    self.coverage["cow of a KSM page"] += 1
                result = apply_mem(self.mem, e)
            elif c is Touch:
                result = touch(e.sub, e, memoryview(self.frames))
            elif c is TryLock:
                result = self.locks[e.key] is None
                if result:
                    self._hold(e.key, t)
                elif e.key[0] == "ksm":
                    self.coverage["the other scanner was merging into the same mm"] += 1
                elif t.actor in self.scanner_names and self.locks[e.key] in self.scanner_names:
                    self.violations_found.append(
                        f"{t.name}'s trylock of {_lname(e.key)} failed: {self.locks[e.key]} holds it (another "
                        f"scanner made merges fail that one scanner would have done)")
            elif c is Lock:
                if e.key[0] == "ksm" and any(h in self.scanner_names and h != t.name
                                             for k, h in self.locks.items() if k[0] == "ksm"):
                    self.coverage["merge while the other scanner merges"] += 1
                self._hold(e.key, t)
            elif c is Unlock:
                if self.locks[e.key] != t.name:
                    self.violations_found.append(f"{t.name} unlocks {_lname(e.key)} held by {self.locks[e.key]}")
                self.locks[e.key] = None
            elif c is Notify:
                result = self._notify(t, e, rec)
            elif c is LocalNotify:
                self._local_notify(self.vms[e.mm], e)
            elif c is WaitAcks:
                flags = []
                for hs in e.handles:
                    for h in hs:
                        flags += self.acks.pop(h)[1:]
                result = flags
            elif c is WaitIdle or c is _AwaitScan:
                result = None
            elif c is FaultCall:
                corr = self._new_id()
                self.queues[(t.vm.id, self.faultd_of(t.vm.id))].append(("FAULT", corr, e.idx, e.flags))
                rec["flow_out"] = corr
                t.pending = _AwaitReply(corr, e.idx, e.flags)
                return
            elif c is _AwaitReply:
                if e.corr not in t.vm.replies:       # lost with the dead fault handler: sent again
                    self.lost.discard(e.corr)
                    corr = self._new_id()
                    self.queues[(t.vm.id, self.faultd_of(t.vm.id))].append(("FAULT", corr, e.idx, e.flags))
                    rec["flow_out"] = corr
                    t.pending = _AwaitReply(corr, e.idx, e.flags)
                    return
                err, msg = t.vm.replies.pop(e.corr)
                if err:
                    exc = OSError(err, msg)
            elif c is _Kill:
                self._kill(e.target)
            elif c is Freeze:
                self.frozen = result = True
            elif c is Thaw:
                self.frozen = False
            elif c is _Boundary or c is _AwaitRestore:
                result = None
            elif c is NotifierLost:
                self._notifier_lost_one(self.vms[e.mm], e.peer)
            elif c is Respawn:
                self._restart(e.group)
            elif c is Reply:
                result = self._reply(t, e.err, e.msg, e.entries)
            elif c is _Micro:
                result = e.run()
            elif c is ShardSend:
                self.shardq[(self._scanner_no(t.actor), e.dst, e.kind)].append(e.msg)
            elif c is ShardRecv:
                result = []
                for src in e.srcs:
                    self._shard_head(src, t.actor, e)
                    result.append(self.shardq[(src, self._scanner_no(t.actor), e.kind)].popleft())
            else:
                exc = TypeError(f"no driver for {e!r}")
        except Exception as x:
            exc = x
        self._advance(t, result, exc)
        if t.done and t.actor in self.faultd_names:
            err = 0
            self._reply(t, err, "")

    def _notify(self, t: Thread, e: Notify, rec: dict) -> list:
        src = t.actor
        hs = []
        for s in e.subs:
            h = self._new_id()
            self.acks[h] = [1]
            self.queues[(src, e.mm)].append((e.type.name, h, s, e.entries.copy()))
            hs.append(h)
        if hs:
            rec["flow_out"] = hs[0]
        return hs

    def _local_notify(self, v: VMState, e: LocalNotify) -> None:
        """invalidate_range_start/end from the VM itself: applied to each secondary MMU in this step."""
        for sub in e.subs:
            self._grammar(v, sub.sub, e.type.name)
            sub.apply(e.type, e.entries)

    def _grammar(self, v: VMState, s: int, kind: str, src="local") -> None:
        """Advance secondary MMU s of v through the notifier grammar by a `kind` message from src
        (with a kill, each notifier's messages, and the VM's own, follow the grammar apart)."""
        gk = (src, s) if self.kill else s
        st = v.grammar.setdefault(gk, GRAMMAR[(INIT, "REGISTER")])
        nxt = GRAMMAR.get((st, kind))
        if nxt is None and st != FAILED:
            self.violations_found.append(f"{v.name} {v.subs[s].name}: {grammar_why(st, kind)}: got {kind}, "
                                         f"expected {EXPECT.get(st)}")
            nxt = FAILED
        v.grammar[gk] = nxt

    def _reply(self, t: Thread, err: int, msg: str, entries=None):
        """FAULT_REPLY, once; one carrying a COW's new PTEs returns the handle of the VM's APPLIED."""
        if getattr(t, "replied", False):
            return None
        t.replied = True
        h = None
        if entries is not None:         # [(addr, new pte)], as the VM reads it off the wire: one page is a
            h = self._new_id()          # record (a list of its one pair, decode_record), more an n x 2 array
            self.acks[h] = [1]
            entries = [tuple(entries[0])] if len(entries) == 1 else np.array(entries, dtype=np.uint64).reshape(-1, 2)
        self.queues[(t.actor, t.mm)].append(("FAULT_REPLY", t.corr, err, msg, entries, h))
        return [h] if h is not None else []

    def _deliver(self, q, rec: dict) -> None:
        self._dirty = True
        src, dst = q
        item = self.queues[q].popleft()
        kind = item[0]
        rec["flow_in"] = item[1]
        if kind == "FAULT":          # a new handle_mm_fault task in the fault handler
            _, corr, idx, flags = item
            mm = src
            if not self.up[dst]:            # written to a dead fault handler's channel: lost
                self.lost.add(corr)
                return
            t = Thread(f"{dst}/{corr}", dst, handle_mm_fault(mm, self.mem.mms[mm].npages, idx, flags,
                                                                     self.mode, self.early_reply, self.brk,
                                                                     self.cow_reply, self.mitigation == "vusion"))
            t.mm, t.corr = mm, corr
            sig = self.vms[mm].sig
            if sig is not None:         # a watched write's fault: its task's effects too
                t.sig = []
                sig["faultd"].append(t.sig)
                sig["threads"].append(t)
            self.threads.append(t)
            self._advance(t, None)
            if t.done:
                self._reply(t, 0, "")
            return
        if kind == "FAULT_REPLY":       # a COW's reply: set_pte_at_notify applied here, then APPLIED
            _, corr, err, msg, entries, h = item
            v = self.vms[dst]
            if entries is not None:
                for sub, typ in apply_cow_reply(list(v.subs.values()), entries, self.mode):
                    self._grammar(v, sub.sub, typ.name, src)
                self.queues[(dst, f"{src}.ack")].append(("ACK", h, 0))
            v.replies[corr] = (err, msg)
            return
        if kind == "ACK":
            _, h, flags = item
            a = self.acks.get(h)
            if a is not None:
                a[0] -= 1
                a.append(flags)
            return
        v = self.vms[dst]                    # a notifier message to one secondary MMU
        _, h, s, entries = item
        self._grammar(v, s, kind, src)
        flags = receive_notification(v.subs, self._link(src, dst), Msg[kind], s, entries)
        self.queues[(dst, f"{src}.ack")].append(("ACK", h, flags))

    def _link(self, src: str, mm: int) -> NotifierLink:
        """VM mm's end of notifier src's channel (a new one once the VM handled src's loss)."""
        link = self.links.get((src, mm))
        if link is None or link.lost:
            link = self.links[(src, mm)] = NotifierLink(src)
        return link

    # ---------------------------------------------------------------- kill -9 and recovery
    def _ksmd_thread(self) -> Thread | None:
        for t in self.threads:
            if t.actor == "ksmd" and not t.done:
                return t
        return None

    def _kill(self, target: str) -> None:
        """The process dies between two steps: generators abandoned, locks dropped by the kernel.
        (Any scanner's death takes the others down: the round protocol has no way to take one back.)"""
        self.up[target], self.killed = False, True
        if self.locks[RECOVER] is not None:
            self.coverage["a kill during a recovery"] += 1
        members = victims([target], self.scanner_names)
        for t in self.threads:
            if t.actor not in members or t.done:
                continue
            for gen in reversed(t.stack):
                gen.close()
            t.stack, t.done, t.pending = [], True, None
            t.killed = True
            if target in self.faultd_names and not getattr(t, "replied", False):
                self.lost.add(t.corr)
            for key, holder in self.locks.items():
                if holder == t.name:
                    self.locks[key] = None
        if target == "ksmd":
            self.shardq.clear()         # the mesh dies with them
        for v in self.vms:
            if not any(self._serves(m, v.id) for m in members):
                continue
            self.pending_loss[v.id].update(members)
            if target == self.faultd_of(v.id):      # FAULTs not read yet die with the socket
                for item in self.queues[(v.id, target)]:
                    self.lost.add(item[1])
                self.queues[(v.id, target)].clear()
            for m in members:
                self.queues[(v.id, f"{m}.ack")].clear()

    def _notifier_lost_one(self, v: VMState, target: str) -> None:
        for s, ended in notifier_lost(v.subs, self._link(target, v.id), self.brk).items():
            gk = (target, s)
            for _ in range(ended):
                v.grammar[gk] = GRAMMAR.get((v.grammar.get(gk, GRAMMAR[(INIT, "REGISTER")]), "END"), FAILED)
        self.pending_loss[v.id].discard(target)

    def _restart(self, target: str) -> None:
        self.up[target] = True
        if target != "ksmd":
            return
        old, n = self.scans, len(self.scans)
        self.scans = [KsmScan(self.ft, self.mode, old[0].clock, self.brk, k, n) for k in range(n)]
        self.scan = self.scans[0]
        for sc in self.scans:
            sc.knobs.update(old[0].knobs)
        for k in ("pages_scanned", "pages_skipped"):      # (the stats segment keeps the published sums)
            self.scan.c[k] = sum(sc.c[k] for sc in old)
        self.scan.c["full_scans"] = old[0].c["full_scans"]
        for v in self.vms:      # the supervisor wiped the shared rmap items
            self._add_to_scanners(v.id, self.mem.mms[v.id])
        self.restoring = n - 1
        new = [Thread(f"{self.scanner_names[k]}'", self.scanner_names[k], self.restarted_follower(self.scans[k]))
               for k in range(1, n)] + [Thread("ksmd'", "ksmd", self.restarted_ksmd())]
        for t in new:
            self.threads.append(t)
            self._advance(t, None)

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    # ---------------------------------------------------------------- invariants
    def _mappings(self) -> list[int]:
        """How many PTEs map each frame (the zero page not counted).  Plain Python: the arrays are tiny."""
        maps = [0] * self.nframes
        for mm in self.mem.mms.values():
            for pte in mm.pte.tolist():
                if pte & PTE_PRESENT:
                    maps[pte >> PAGE_SHIFT] += 1
        maps[ZERO_PFN] = 0
        return maps

    def _in_flight(self, mm: int, s: int, i: int) -> bool:
        addr = USER_BASE + (i << PAGE_SHIFT)
        for src in self.scanner_names + [self.faultd_of(mm)]:
            for item in self.queues[(src, mm)]:
                if item[0] == "FAULT_REPLY":        # a COW's reply carries set_pte_at_notify for every sub
                    e = item[4]                     # (one page: a record's [(addr, pte)]; more: an array)
                    if e is not None and (e[0][0] == addr if e.__class__ is list else (e[:, 0] == addr).any()):
                        return True
                elif item[2] == s and (item[3][:, 0] == addr).any():
                    return True
        return False

    def _frame_violations(self) -> list[str]:
        out = []
        maps = self._mappings()
        if self.mitigation == "domain":     # no KSM page is shared across security domains
            doms: dict[int, set] = {}
            for v in self.vms:
                mm = self.mem.mms[v.id]
                for pte in mm.pte.tolist():
                    if pte & PTE_PRESENT and not pte & PTE_SPECIAL and self.ft.flags[pte >> PAGE_SHIFT] & FRAME_KSM:
                        doms.setdefault(pte >> PAGE_SHIFT, set()).add(int(mm.hdr[MMH_DOMAIN]))
            out += [f"KSM frame {p} is mapped by VMs of domains {sorted(d)}" for p, d in doms.items() if len(d) > 1]
        mc = self.ft.mapcount.tolist()
        flags = self.ft.flags.tolist()
        for p, n in enumerate(maps):
            if n and (n > mc[p] or flags[p] == FRAME_FREE):
                if n > mc[p]:
                    out.append(f"frame {p}: {n} PTEs map it but its mapcount is {mc[p]}")
                if flags[p] == FRAME_FREE:
                    out.append(f"frame {p} is free but a PTE maps it")
        for v in self.vms:
            mm = self.mem.mms[v.id]
            pte = mm.pte.tolist()
            free_ptl = self.locks[("ptl", v.id)] is None
            vflags = vma_flags_at(mm.vma_list(), np.arange(len(pte))).tolist() if free_ptl else None
            if free_ptl:
                for i, pp in enumerate(pte):
                    if pp & PTE_PRESENT and pp & PTE_WRITE and mc[pp >> PAGE_SHIFT] > 1:
                        out.append(f"{v.name} page {i} is writable but its frame {pp >> PAGE_SHIFT} is COW-shared "
                                   f"(mapcount {mc[pp >> PAGE_SHIFT]})")
            for s, sub in v.subs.items():
                for i, sp in enumerate(sub.spte.tolist()):
                    if not sp:
                        continue
                    pp = pte[i]
                    spfn = sp >> PAGE_SHIFT
                    if flags[spfn] == FRAME_FREE and spfn != ZERO_PFN:
                        out.append(f"{v.name} {sub.name} page {i} maps frame {spfn}, which is free")
                        continue
                    if free_ptl and not may_access(vflags[i], bool(sp & PTE_WRITE)):
                        out.append(f"{v.name} {sub.name} page {i} maps frame {spfn}"
                                   f"{' writable' if sp & PTE_WRITE else ''}, which its VMA does not allow")
                        continue
                    stale = (not pp & PTE_PRESENT or (pp >> PAGE_SHIFT) != spfn
                             or (sp & PTE_WRITE and not pp & PTE_WRITE))
                    if stale and self.locks[("ptl", v.id)] is None and not self._in_flight(v.id, s, i) \
                            and not self.pending_loss[v.id]:
                        out.append(f"{v.name} {sub.name} page {i} maps frame {spfn}"
                                   f"{' writable' if sp & PTE_WRITE else ''} but its PTE maps "
                                   f"{pp >> PAGE_SHIFT if pp & PTE_PRESENT else 'nothing'}"
                                   f"{' writable' if pp & PTE_WRITE else ''}, and no notification is on its way")
        return out

    def _check_counters(self) -> None:
        """At a round boundary (every scanner between rounds): the sharing counters agree with the stable trees."""
        for t in self.threads[1:]:
            if t.actor in self.scanner_names and not t.done and not (
                    isinstance(t.pending, ShardRecv) and t.pending.kind == LEAD
                    and not self.shardq[(0, self._scanner_no(t.actor), LEAD)]):
                return          # (that scanner is inside a round: its counters move)
        c = self.totals()
        cnt = np.concatenate([sc.tree.count[np.flatnonzero(sc.tree.live[:sc.tree.top])] for sc in self.scans])
        if c["pages_shared"] != int((cnt > 0).sum()) or c["pages_shared"] + c["pages_sharing"] != int(cnt.sum()):
            self.violations_found.append(f"pages_shared {c['pages_shared']} pages_sharing {c['pages_sharing']} "
                                         f"disagree with the stable tree{'s' if len(self.scans) > 1 else ''} "
                                         f"({int((cnt > 0).sum())} nodes in use, {int(cnt.sum())} rmap items)")

    def digest(self) -> str:
        """A hash of the whole shared state (for tests comparing two runs)."""
        h = hashlib.sha256(self.frames.tobytes())
        h.update(self.ft.seg.buf)
        for mm in self.mem.mms.values():
            h.update(mm.seg.buf)
        return h.hexdigest()


class _AwaitRestore(Effect):
    """The restarted leader waits until every restarted follower has restored its shard."""
    __slots__ = ()

    def footprint(self):
        return ((("scans",), "r"),)

    def __repr__(self):
        return "wait for the other scanners' restore"


class _Micro(Effect):
    """One step of the old lock algorithm (pid-takeover-lock)."""
    __slots__ = ("what", "run", "key", "enabled")

    def __init__(self, what, run, key, enabled=None):
        self.what, self.run, self.key, self.enabled = what, run, key, enabled

    def footprint(self):
        return ((self.key, "w"),)

    def __repr__(self):
        return f"{_lname(self.key)}: {self.what}"


_READ_ONLY = frozenset({Load, Checksum, Compare, WaitAcks, WaitIdle, _AwaitScan, _AwaitReply, Reply, Notify,
                        _AwaitRestore})


def _lname(key) -> str:
    return f"{key[0]}(mm{key[1]})" if key[0] in ("ptl", "ksm") else f"{key[0]}_lock"


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
    kills = ["ksmd", "faultd"] + (["faultd1"] if config.get("fault_handlers", 1) == 2 else [])
    if isinstance(config.get("kill"), str) and "," in config["kill"]:     # "faultd,ksmd": a second kill
        config["kill"], config["kill2"] = config["kill"].split(",", 1)
    for k in (config.get("kill"), config.get("kill2")):
        if k is not None and k not in kills:
            raise ValueError(f"--kill {k!r}: this world's actors are {', '.join(kills)}")
    sharded = {}
    if scanners == 2:
        sharded = SHARDED if scenario == "base" else {k: SHARDED[k] for k in ("scanners", "fill", "smart_scan",
                                                                                  "pages_to_scan")}
    config = {**sharded, **SCENARIOS[scenario], **BREAK_CONFIG.get(brk, {}), **config}

    def factory():
        return KsmWorld(mode, brk, **config)
    factory.scenario = scenario
    factory.scanners = scanners
    factory.fault_handlers = config.get("fault_handlers", 1)
    return factory
