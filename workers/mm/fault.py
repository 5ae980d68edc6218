"""handle_mm_fault, IO-free: do_anonymous_page, do_wp_page (reuse or wp_page_copy), break_ksm; and
serve_fault, the fault handler's side of a FAULT (handle_mm_fault and its one FAULT_REPLY).

One fault request names a batch of pages of one mm.  Under the mm's page-table lock:

  * a not-present page gets a new zeroed frame on a write, the shared zero page
    (read-only) on a read (do_anonymous_page);
  * a write to a read-only page breaks COW (do_wp_page): a KSM frame, the zero page
    or a frame with mapcount > 1 is copied into a new frame and the PTE set with
    set_pte_at_notify (every secondary MMU hears of it and acks); an anonymous frame
    with mapcount 1 is made writable in place (wp_page_reuse);
  * with the mitigation "vusion" (VUsion's same behaviour) a write never reuses: every
    write-protected page is copied, whether it is a KSM page or a candidate ksmd only
    write-protected (core.merge.fake_merge), so the two faults are one path;
  * FAULT_UNSHARE copies KSM and zero pages without making them writable (break_ksm,
    for MADV_UNMERGEABLE, prctl PR_SET_MEMORY_MERGE 0 and run=2); a page no longer present
    is left alone (nothing to unshare).

Access rights: a fault outside every VMA, a write to an area without VM_WRITE, or a read of
a PROT_NONE area is EFAULT (the SIGSEGV the VM worker turns into OSError).  FAULT_UNSHARE
ignores the protection, as break_ksm's FAULT_FLAG_UNSHARE | FAULT_FLAG_REMOTE does: a
PROT_NONE page is unmerged too (and stays inaccessible).

The old frame is put only after every secondary MMU acked the new PTE: before that a
secondary MMU may still map it (the checker's `free-before-acks` break shows why).
The lock is dropped only after the acks: messages on the fault handler's channel and
on ksmd's are not ordered with each other, and ptl is what orders them.  The early
reply (FAULT_REPLY sent once the notifications are, before their acks) is safe: it
follows them on the same FIFO channel, and ptl is still held.  Any exception (out of frames, a bad
address) leaves the page table as it was and the lock released.

The pages of a request are plain lists of ints (page indices, PTEs, pfns), and so are the
results of the effects that read them: a fault is most often one page, where a numpy
operation costs a microsecond or more and a list operation a tenth of that, and a batch of a
few thousand pages (a large write to fresh memory, an unmerge) is still a few list passes.
"""
from __future__ import annotations

import errno

import numpy as np

from proto.layout import (FRAME_ANON, FRAME_KSM, FRAME_ZERO, PAGE_SHIFT, PTE_DIRTY, PTE_PRESENT, PTE_SPECIAL,
                          PTE_WRITE, PTE_YOUNG, USER_BASE, ZERO_PFN)
from proto.messages import FAULT_UNSHARE, FAULT_WRITE

from workers.mm.effects import (FLAGS, MAPCOUNT, PTE, VMAS, Alloc, CopyPages, Load, Lock, Put, Reply, Store, Unlock,
                      WaitAcks, ZeroPagesAdd, ptl, under_ptl)
from workers.mm.mmu_notifier import set_pte_at_notify
from workers.mm.pte import may_access, vma_flags_list
from workers.mm.breaks import NONE

ANON_RW = PTE_PRESENT | PTE_WRITE | PTE_DIRTY | PTE_YOUNG
ZERO_RO = (ZERO_PFN << PAGE_SHIFT) | PTE_PRESENT | PTE_YOUNG
SHARED_FRAME = FRAME_KSM | FRAME_ZERO
REUSE_BITS = PTE_WRITE | PTE_DIRTY | PTE_YOUNG


def _ints(v) -> list:
    """Page indices (or pfns) as a list of ints, from a list, an int array or any sequence."""
    if v.__class__ is list:
        return v
    return v.tolist() if isinstance(v, np.ndarray) else [int(x) for x in v]


def serve_fault(mm: int, npages: int | None, idx, flags: int, mode: str, early_reply: bool = False,
                brk=NONE, cow_reply: bool = True, vusion: bool = False):
    """The fault handler's side of one FAULT: handle_mm_fault, and its FAULT_REPLY exactly once (early,
    riding a COW's new PTEs, or at the end; an error's errno from `fault_reply_errno`).  npages None:
    an mm this handler does not know (EFAULT).  Returns (cow copies, reuses), or None after an error
    reply.  An exception that is a bug is answered EIO, then propagates: the fault handler logs it and
    goes on, the checker reports it."""
    replied = []
    try:
        if npages is None:
            raise KeyError(mm)
        result = yield from handle_mm_fault(mm, npages, idx, flags, mode, early_reply, brk, cow_reply, vusion,
                                            replied)
    except Exception as x:
        err = fault_reply_errno(x, mm)
        if not replied:
            yield Reply(*(err or (errno.EIO, f"fault handler error: {x!r}")))
        if err is None:
            raise
        return None
    if not replied:
        yield Reply()
    return result


def handle_mm_fault(mm: int, npages: int, idx, flags: int, mode: str, early_reply: bool = False,
                    brk=NONE, cow_reply: bool = True, vusion: bool = False, replied: list | None = None):
    """Serve one fault request for the page indices idx (a list, or an int array); returns (cow
    copies, reuses).  Raises OSError (EFAULT, ENOMEM).

    cow_reply (the fault handler's default): a COW's set_pte_at_notify rides on the reply, applied
    by the faulting VM on arrival (`wp_page_copy`); off, it is sent as notifier messages.
    vusion: every write to a write-protected page copies (no wp_page_reuse).  replied: a list that
    gets an item when a reply went out (early, or a COW's)."""
    idx = _ints(idx)
    if not idx:
        raise OSError(errno.EINVAL, f"fault request for mm {mm} names no page")
    lo, hi = (idx[0], idx[0]) if len(idx) == 1 else (min(idx), max(idx))
    if lo < 0 or hi >= npages:
        raise OSError(errno.EFAULT, f"fault address outside the address space of mm {mm}")
    yield Lock(ptl(mm))
    abandoned = False
    try:
        vmas = yield Load(VMAS, mm)
        vflags = vma_flags_list(vmas, idx, lo, hi)          # -1: in no VMA
        if min(vflags) < 0:
            bad = USER_BASE + (idx[next(k for k, f in enumerate(vflags) if f < 0)] << PAGE_SHIFT)
            raise OSError(errno.EFAULT, f"segfault: {bad:#x} is not in any VMA of mm {mm}")
        write = bool(flags & FAULT_WRITE)
        unshare = bool(flags & FAULT_UNSHARE)
        if not unshare:
            for i, f in zip(idx, vflags):
                if not may_access(f, write):
                    bad = USER_BASE + (i << PAGE_SHIFT)
                    raise OSError(errno.EFAULT, f"segfault: {'write to' if write else 'read of'} {bad:#x}, "
                                                f"which the VMA of mm {mm} does not allow")
        pte = yield Load(PTE, mm, idx)
        absent = []                 # (plain loops, not comprehensions: a fault is most often one page)
        for i, p in zip(idx, pte):
            if not p & PTE_PRESENT:
                absent.append(i)
        if absent and (write or not unshare):
            yield from do_anonymous_page(mm, absent, write)
        if not (write or unshare) or len(absent) == len(idx):
            return 0, 0
        if absent:
            idx, pte = zip(*[(i, p) for i, p in zip(idx, pte) if p & PTE_PRESENT])
            idx, pte = list(idx), list(pte)
        return (yield from do_wp_page(mm, idx, pte, write, mode, early_reply, brk, cow_reply, vusion, replied))
    except GeneratorExit:           # abandoned (a checker run cut short): nothing to release
        abandoned = True
        raise
    finally:
        if not abandoned:
            yield Unlock(ptl(mm))


def do_anonymous_page(mm: int, idx: list, write: bool):
    if write:
        pfns = yield Alloc(len(idx), FRAME_ANON, True)
        try:
            yield Store(PTE, mm, idx, [(p << PAGE_SHIFT) | ANON_RW for p in pfns])
        except GeneratorExit:
            raise
        except BaseException:
            yield from put_uninstalled(mm, idx, pfns)
            raise
    else:
        yield Store(PTE, mm, idx, [ZERO_RO] * len(idx))


def do_wp_page(mm: int, idx: list, pte: list, write: bool, mode: str, early_reply: bool, brk,
               cow_reply: bool = False, vusion: bool = False, replied: list | None = None):
    """Break COW (write) or unshare KSM pages (no write) for present pages; (copies, reuses).

    The pages' decisions are made in one plain loop over them, which also builds the lists of the
    pages to reuse and to copy (a fault is most often one page: each list comprehension, a function
    call in CPython 3.11, costs about as much as the page's work)."""
    pfn = [pte[0] >> PAGE_SHIFT] if len(pte) == 1 else [p >> PAGE_SHIFT for p in pte]
    fflags = yield Load(FLAGS, None, pfn)
    ri, rp, ci, cpfn, special = [], [], [], [], []
    if write:
        for p in pte:
            if not p & PTE_WRITE:
                break
        else:
            return 0, 0
        mapcount = yield Load(MAPCOUNT, None, pfn)
        for i, pf, p, f, c in zip(idx, pfn, pte, fflags, mapcount):
            if p & PTE_WRITE:
                continue
            if c == 1 and not (f & SHARED_FRAME or p & PTE_SPECIAL) and not vusion:
                ri.append(i)
                rp.append(p | REUSE_BITS)
            else:
                ci.append(i)
                cpfn.append(pf)
                special.append(bool(p & PTE_SPECIAL))
    else:
        for i, pf, p, f in zip(idx, pfn, pte, fflags):
            if f & SHARED_FRAME or p & PTE_SPECIAL:
                ci.append(i)
                cpfn.append(pf)
                special.append(bool(p & PTE_SPECIAL))
    nreuse = len(ri)
    if nreuse:      # wp_page_reuse: writable in place, no notification (no translation was writable)
        yield Store(PTE, mm, ri, rp)
    ncopy = len(ci)
    if not ncopy:
        return 0, nreuse
    if cow_reply:       # (called directly: a generator level less on every step of the fault path)
        yield from wp_page_copy_reply(mm, ci, cpfn, special, write, mode, brk, replied)
    else:
        yield from wp_page_copy(mm, ci, cpfn, special, write, mode, early_reply, brk, replied=replied)
    return ncopy, nreuse


def wp_page_copy(mm: int, idx: list, old: list, special: list, writable: bool, mode: str,
                 early_reply: bool = False, brk=NONE, cow_reply: bool = False, replied: list | None = None):
    """Copy each frame, set the PTEs with notification, put the old frames after the acks.

    The caller holds ptl(mm).  Out of frames: nothing changed.  With cow_reply, see
    `wp_page_copy_reply`.
    """
    if cow_reply:
        return (yield from wp_page_copy_reply(mm, idx, old, special, writable, mode, brk, replied))
    _, handles = yield from copy_and_install(
        mm, idx, old, special, writable,
        lambda ptes: set_pte_at_notify([(mm, idx, ptes)], mode, wait=False, wait_start="free-before-acks" not in brk))
    if "free-before-acks" in brk:
        yield Put(old)
        old = None
    if "cow-reply-before-acks" in brk:      # reply, and let go of ptl, before the acks
        yield Reply()
        if replied is not None:
            replied.append(True)
        yield Unlock(ptl(mm))
        if handles:
            yield WaitAcks(handles)
        yield Put(old)
        yield Lock(ptl(mm))                 # (taken again for handle_mm_fault's unlock)
        return
    if early_reply:
        yield Reply()
        if replied is not None:
            replied.append(True)
    if handles:
        yield WaitAcks(handles)
    if old is not None:
        yield Put(old)


def wp_page_copy_reply(mm: int, idx: list, old: list, special: list, writable: bool, mode: str,
                       brk=NONE, replied: list | None = None):
    """wp_page_copy in one round trip: the reply carries the new PTEs and set_pte_at_notify runs in the VM.

    do_wp_page changes only the faulting mm's PTEs, so set_pte_at_notify reaches only that mm's
    secondary MMUs, and they live in the faulting VM's process.  So: copy, store the new PTEs, and
    `Reply` with them; the VM applies, on the reply's arrival and before the write resumes, the very
    messages set_pte_at_notify would have sent each of its secondary MMUs in `mode`
    (`notify.local_set_pte`: the same order and grammar), then answers APPLIED, which `WaitAcks`
    waits for (with the driver's timeout, like any ack).

    Deferred release: the old frames are put only after APPLIED, and ptl is held until then.  Until
    the VM applied the reply, a secondary MMU of this mm may still map an old frame (read-only) and
    read it; once APPLIED is in, none does (the VM's START/CHANGE_PTE/INVALIDATE_PAGE dropped or
    replaced every such translation, and a secondary fault can only install what the primary PTE,
    now the new frame, says), and no primary PTE of this mm maps it.  Holding ptl until then keeps
    ksmd's messages for this mm (sent only under ptl) behind the reply's, as with the acks of old.
    The checker's `early-release` break puts the old frames right after the reply.
    """
    new_ptes, _ = yield from copy_and_install(mm, idx, old, special, writable, None)
    if brk and "free-before-acks" in brk:       # (brk empty, as in every actor: no break asked about)
        yield Put(old)
        old = None
    h = yield Reply(entries=[(USER_BASE + (idx[0] << PAGE_SHIFT), new_ptes[0])] if len(idx) == 1 else
                    [(USER_BASE + (i << PAGE_SHIFT), p) for i, p in zip(idx, new_ptes)])
    if replied is not None:
        replied.append(True)
    if brk and "early-release" in brk and old is not None:  # deferred release skipped: put before APPLIED
        yield Put(old)
        old = None
    if brk and "cow-reply-before-acks" in brk:      # let go of ptl before the VM applied the reply
        yield Unlock(ptl(mm))
        if h:
            yield WaitAcks([h])
        if old is not None:
            yield Put(old)
        yield Lock(ptl(mm))                 # (taken again for handle_mm_fault's unlock)
        return
    if h:
        yield WaitAcks([h])
    if old is not None:
        yield Put(old)


def copy_and_install(mm: int, idx: list, old: list, special: list, writable: bool, install):
    """wp_page_copy's common part: new frames, the old pages copied in, the new PTEs put in place by
    the generator install(new_ptes) (whose result is returned beside them; install None: they are
    stored as they are, and the result is None), and the KSM zero pages that stopped being mapped
    counted at once.  On a failure the new frames no PTE took are put back and the old mapping stays."""
    new = yield Alloc(len(idx), FRAME_ANON, False)
    try:
        yield CopyPages(new, old)
        bits = PTE_PRESENT | PTE_DIRTY | PTE_YOUNG | (PTE_WRITE if writable else 0)
        new_ptes = [(new[0] << PAGE_SHIFT) | bits] if len(new) == 1 else [(p << PAGE_SHIFT) | bits for p in new]
        if install is None:
            result = yield Store(PTE, mm, idx, new_ptes)
        else:
            result = yield from install(new_ptes)
    except GeneratorExit:
        raise
    except BaseException:
        yield from put_uninstalled(mm, idx, new)
        raise
    nz = sum(special)
    if nz:      # counted as the PTE changes, before the faulting VM hears back
        yield ZeroPagesAdd(mm, -nz)
    return new_ptes, result


def put_uninstalled(mm: int, idx: list, new: list):
    """After a failure: put each new frame that its PTE does not map (the operation did not get that far)."""
    pte = yield Load(PTE, mm, idx)
    lost = [n for p, n in zip(pte, new) if not p & PTE_PRESENT or p >> PAGE_SHIFT != n]
    if lost:
        yield Put(lost)


def unmerge_ksm_pages_of_mm(mm: int, mode: str, chunk: int = 4096):
    """run=2 for one mm: every KSM page and KSM zero page becomes a private copy (break_ksm)."""
    def body():
        pte = yield Load(PTE, mm, None)
        present = (pte & np.uint64(PTE_PRESENT)) != 0
        pfn = (pte >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        special = present & ((pte & np.uint64(PTE_SPECIAL)) != 0)
        fl = yield Load(FLAGS, None, pfn)
        idx = np.flatnonzero((present & ((fl & FRAME_KSM) != 0)) | special)
        for k in range(0, len(idx), chunk):
            part = idx[k:k + chunk]
            yield from wp_page_copy(mm, part.tolist(), pfn[part].tolist(), special[part].tolist(), False, mode)
        return len(idx)
    return (yield from under_ptl(mm, body()))


def fault_reply_errno(exc: BaseException, mm: int) -> tuple[int, str] | None:
    """The FAULT_REPLY's (errno, message) for a handle_mm_fault that raised exc, as the fault handler
    answers it and the checker expects it; None where exc is a bug (the fault handler logs it and
    answers EIO, the checker reports a violation).  A lock or an ack that timed out is EAGAIN (the VM
    may retry), an mm the handler does not know EFAULT."""
    if isinstance(exc, TimeoutError):       # (before OSError, of which it is a subclass)
        return errno.EAGAIN, str(exc) or "timed out"
    if isinstance(exc, OSError):
        return exc.errno or errno.EIO, exc.strerror or str(exc)
    if isinstance(exc, KeyError):
        return errno.EFAULT, f"unknown mm {mm}"
    return None
