"""Repair after an actor died halfway, IO-free: the frame table made to agree with the PTEs again.

ksmd and the fault handler change frames in several steps under a page-table lock:
pin a KSM page, take a new frame, point a PTE at it, put the old frame after every
secondary MMU acked.  Killed between two steps (kill -9, the OOM killer), an actor
leaves its locks to the kernel (OFD locks are dropped with the process) but its half
done work in shared memory: a pinned frame nobody will put, a new frame no PTE maps,
an old frame a PTE no longer maps, ksm_zero_pages counted for a PTE never set.

`repair_frames` is what the supervisor runs before it trusts the mms again (DESIGN.md,
"Locks"): with every ptl held, in mm order (nobody else ever waits for two), and no
live actor holding a frame reference outside a ptl (ksmd frozen between batches, or
dead), the PTEs are the truth: each frame's mapcount becomes the number of PTEs that
map it, frames nothing maps are freed, the free stack is rebuilt, and ksm_zero_pages
is recounted from the PTE_SPECIAL entries.  The secondary MMUs were told to drop their
translations before (SecondaryMMU.notifier_lost), so no spte maps a frame freed here.
"""
from __future__ import annotations

import numpy as np

from proto.layout import PAGE_SHIFT, PTE_PRESENT, PTE_SPECIAL

from workers.mm.effects import PTE, Fsck, Load, Lock, Unlock, ptl

U64 = np.uint64


def under_every_ptl(mm_ids, body):
    """Take every ptl of mm_ids in mm order (nobody else ever waits for two), load each mm's PTEs,
    and run the generator body(ptes by mm) while they are held; returns its value.  The repair, and
    `Machine.check_frames`, which must not see a fault or merge halfway (a COW's PTE changed and its
    old frame's put still to come, under the ptl the fault handler holds until the VM's APPLIED)."""
    held = []
    try:
        for mm in sorted(mm_ids):
            yield Lock(ptl(mm))
            held.append(mm)
        ptes = {}
        for mm in held:
            ptes[mm] = yield Load(PTE, mm, None)
        return (yield from body(ptes))
    except GeneratorExit:           # abandoned (a checker run cut short): nothing to release
        held = []
        raise
    finally:
        for mm in reversed(held):
            yield Unlock(ptl(mm))


def repair_frames(mm_ids, nframes: int):
    """Fix the frame table and zero-page counters from the PTEs of mm_ids; returns what changed."""
    return (yield from under_every_ptl(mm_ids, lambda ptes: _fsck(ptes, nframes)))


def _fsck(ptes: dict, nframes: int):
    maps = np.zeros(nframes, dtype=np.int64)
    zero = {}
    for mm, pte in ptes.items():
        present = (pte & U64(PTE_PRESENT)) != 0
        maps += np.bincount((pte[present] >> U64(PAGE_SHIFT)).astype(np.int64), minlength=nframes)
        zero[mm] = int((present & ((pte & U64(PTE_SPECIAL)) != 0)).sum())
    return (yield Fsck(maps, zero))
