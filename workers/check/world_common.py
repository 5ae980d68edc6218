"""The names world.py and its parts share (constants, the logger)."""
from __future__ import annotations


import numpy as np

from proto.layout import (VM_READ, VM_WRITE)

from workers.mm.kvm import WaitIdle
from workers.mm.effects import (Checksum, Compare, Effect, Load, Notify, Reply, WaitAcks)
from workers.mm.mmu_notifier import (INIT, SecondaryMMU)
from workers.mm.breaks import BREAKS as DECLARED

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


KILLS = ("ksmd", "faultd", "faultd1", "vm")      # "vm": vm0's process


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
    # the two-scanner writes with a full scan in three rounds (pages_to_scan 2: vm0's pages, vm1's, the empty
    # round that ends the scan): with two scanners the pipelined rounds run, each scanner hashing its part of
    # vm1's pages ahead while it waits at the first round's barriers (mm.ksm.ahead)
    "pipelined": dict(writes=SHARDED["writes"], complete=True, first_scan=1, pages_to_scan=2),
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
        self.dead = False                   # its process was killed (its secondary MMUs died with it)
        self.left = False                   # its writer is no longer counted in writers_left


class _AwaitForget(Effect):
    """The supervisor waits until ksmd has forgotten mm `mm` (ksm_exit at its next batch boundary)."""
    __slots__ = ("mm",)

    def __init__(self, mm):
        self.mm = mm

    def footprint(self):
        return ((("scans",), "r"),)

    def __repr__(self):
        return f"wait for ksmd to forget mm {self.mm}"


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
                        _AwaitRestore, _AwaitForget})


def _lname(key) -> str:
    return f"{key[0]}(mm{key[1]})" if key[0] in ("ptl", "ksm") else f"{key[0]}_lock"
