"""try_to_merge_one_page for a batch of planned merges, IO-free.

    trylock ptl  ->  validate (the PTE still maps the page we checksummed)
                 ->  write_protect_page (+ notify, wait for every ack)
                 ->  memcmp  ->  replace_page (+ notify, acks)  ->  put old frames  ->  unlock

Protect first, compare second: a write racing the merge either lands before the
write-protect (and the compare fails) or faults afterwards (COW).  One notifier
message per mm and step carries every page of the batch.  ksmd only *tries* each
ptl, as the kernel's ksmd does; a busy mm is skipped this time.

Pins (get_ksm_page) and locks taken here are released on every path, exceptions
included.  Each `brk` name removes one step, for the checker to show why it exists:
`no-write-protect`, `no-recheck-pte`, `free-before-acks`.
"""
from __future__ import annotations

import bisect

import numpy as np

from proto.layout import (FRAME_ANON, FRAME_KSM, PAGE_SHIFT, PTE_DIRTY, PTE_PRESENT, PTE_SPECIAL, PTE_WRITE,
                          PTE_YOUNG, ZERO_PFN)

from .effects import (FLAGS, PTE, VMAS, Compare, Get, Load, PinKsm, Put, SetFrame, TryLock, Unlock, WaitAcks,
                      ZeroPagesAdd, ptl)
from .notify import set_pte_at_notify
from .pte import mergeable_ranges

U64 = np.uint64
KSM_ZERO_PTE = (ZERO_PFN << PAGE_SHIFT) | PTE_PRESENT | PTE_SPECIAL | PTE_DIRTY | PTE_YOUNG


def try_to_merge_pages(scan, ops):
    """Run the planned merges `ops` (core.scan.Op); sets op.ok on each."""
    involved = {}
    for op in ops:
        involved[op.slot.id] = op.slot
        if op.tslot is not None:
            involved[op.tslot.id] = op.tslot
    locked = []
    # stable node -> its KSM frame is referenced by us (None: a node this batch creates from
    # a pair; its frame is the pair's own page, held by that page's PTE under our ptl)
    pinned: dict[int, bool | None] = {}
    try:
        for slot in involved.values():
            if slot.alive and (yield TryLock(ptl(slot.id))):     # ksmd only tries the lock
                locked.append(slot)
        for op in ops:
            if op.kind == "stable" and op.d not in pinned:
                k = int(scan.tree.kpfn[op.d])
                pinned[op.d] = None
                if k >= 0:
                    pinned[op.d] = False
                    pinned[op.d] = yield PinKsm(k, op.d)
        pages = yield from validate(scan, ops, locked, pinned)
        if "no-write-protect" not in scan.brk:
            yield from write_protect_page(scan, pages)
        yield from compare(scan, ops)
        yield from replace_page(scan, ops)
    except GeneratorExit:           # abandoned (a checker run cut short): nothing to release
        raise
    except BaseException:
        yield from _unlock_unpin(scan, locked, pinned)
        raise
    yield from _unlock_unpin(scan, locked, pinned)


def _unlock_unpin(scan, locked, pinned):
    for s in locked:
        yield Unlock(ptl(s.id))
    held = [d for d, ok in pinned.items() if ok]     # (pending nodes took no reference)
    if held:
        yield Put(scan.tree.kpfn[np.array(held)].astype(np.int64))


def validate(scan, ops, locked, pinned):
    """Under ptl: each PTE still maps the frame we checksummed, anonymous, in a mergeable area.

    Returns {mm: sorted page indices} of the pages to write-protect.
    """
    held = {s.id: s for s in locked}
    ranges = {}
    for s in locked:
        r = mergeable_ranges((yield Load(VMAS, s.id)))
        ranges[s.id] = ([a for a, _ in r], [b for _, b in r])
    want: dict[int, list] = {s.id: [] for s in locked}
    for op in ops:
        for slot, i in ((op.slot, op.idx), (op.tslot, op.tidx)):
            if slot is not None and slot.id in want:
                want[slot.id].append(i)
    ptes = {}
    for sid, lst in want.items():
        if lst:
            idx = np.array(sorted(set(lst)), dtype=np.int64)
            ptes[sid] = dict(zip(idx.tolist(), (yield Load(PTE, sid, idx)).tolist()))
    pfns = sorted({int(p) for op in ops for p in (op.pfn, op.tpfn) if p >= 0})
    flags = dict(zip(pfns, (yield Load(FLAGS, None, np.array(pfns, dtype=np.int64))).tolist())) if pfns else {}
    pages: dict[int, set] = {s.id: set() for s in locked}
    recheck = "no-recheck-pte" not in scan.brk
    for op in ops:
        ok = op.kind != "stable" or pinned[op.d] is not False
        for slot, i, p in ((op.slot, op.idx, op.pfn), (op.tslot, op.tidx, op.tpfn)):
            if not ok or slot is None:
                continue
            if slot.id not in held or not slot.alive:
                ok = False
            elif recheck:
                pte = ptes[slot.id][i]
                f = flags[p]
                starts, ends = ranges[slot.id]
                k = bisect.bisect_right(starts, i) - 1
                ok = (bool(pte & PTE_PRESENT) and not pte & PTE_SPECIAL and (pte >> PAGE_SHIFT) == p
                      and bool(f & FRAME_ANON) and not f & FRAME_KSM and k >= 0 and i < ends[k])
        op.ok = ok
        if ok:
            pages[op.slot.id].add(op.idx)
            if op.tslot is not None:
                pages[op.tslot.id].add(op.tidx)
    return {sid: sorted(p) for sid, p in pages.items() if p}


def write_protect_page(scan, pages: dict):
    """Clear WRITE (and DIRTY) and make every secondary MMU drop its writable translation."""
    jobs = []
    for sid, idx in pages.items():
        idx = np.array(idx, dtype=np.int64)
        pte = yield Load(PTE, sid, idx)
        dirty = (pte & U64(PTE_WRITE | PTE_DIRTY)) != 0
        if dirty.any():
            jobs.append((sid, idx[dirty], pte[dirty] & ~U64(PTE_WRITE | PTE_DIRTY)))
    if jobs:
        yield from set_pte_at_notify(jobs, scan.mode)


def compare(scan, ops):
    """memcmp after write-protect; a pair's page becomes the KSM page (in place)."""
    tree = scan.tree
    for op in ops:
        if not op.ok:
            continue
        if op.kind == "zero":
            op.ok = yield Compare(op.pfn, None)
        elif op.kind == "pair":
            op.ok = yield Compare(op.pfn, op.tpfn)
            if op.ok:
                yield SetFrame(op.pfn, FRAME_KSM, op.d)
                tree.kpfn[op.d] = op.pfn
        else:
            k = int(tree.kpfn[op.d])
            op.ok = k >= 0 and bool(tree.live[op.d]) and (yield Compare(op.pfn, k))


def replace_page(scan, ops):
    """Point each PTE at its KSM page (or the zero page), notify, put the old frames after the acks."""
    per: dict[int, list] = {}
    for op in ops:
        if not op.ok:
            continue
        if op.kind == "zero":
            per.setdefault(op.slot.id, []).append((op.idx, op.pfn, -1))
        elif op.kind == "pair":
            per.setdefault(op.tslot.id, []).append((op.tidx, op.tpfn, op.pfn))
        else:
            per.setdefault(op.slot.id, []).append((op.idx, op.pfn, int(scan.tree.kpfn[op.d])))
    if not per:
        return
    jobs, olds, zeros = [], [], []
    for sid, lst in per.items():
        a = np.array(lst, dtype=np.int64)
        idx, old, kp = a[:, 0], a[:, 1], a[:, 2]
        zero = kp < 0
        new = np.where(zero, KSM_ZERO_PTE, (kp << PAGE_SHIFT) | PTE_PRESENT | PTE_YOUNG).astype(U64)
        jobs.append((sid, idx, new))
        olds.append(old)
        zeros.append((sid, int(zero.sum())))
    early_free = "free-before-acks" in scan.brk
    got = []            # the jobs whose KSM pages we took a reference on
    try:
        for job in jobs:
            ksm = (job[2] >> U64(PAGE_SHIFT)) != ZERO_PFN
            if ksm.any():
                yield Get((job[2][ksm] >> U64(PAGE_SHIFT)).astype(np.int64))
            got.append(job)
        handles = yield from set_pte_at_notify(jobs, scan.mode, wait=False, wait_start=not early_free)
    except GeneratorExit:
        raise
    except BaseException:     # the KSM references no PTE took are put back; the old pages stay mapped
        for sid, idx, new in got:
            pte = yield Load(PTE, sid, idx)
            back = (pte != new) & ((new >> U64(PAGE_SHIFT)) != ZERO_PFN)
            if back.any():
                yield Put((new[back] >> U64(PAGE_SHIFT)).astype(np.int64))
        raise
    if early_free:
        yield Put(np.concatenate(olds))
    if handles:
        yield WaitAcks(handles)
    if not early_free:
        yield Put(np.concatenate(olds))
    for sid, nz in zeros:
        if nz:
            yield ZeroPagesAdd(sid, nz)
