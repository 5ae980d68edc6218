"""The mm's own changes to its address space, IO-free: MADV_DONTNEED, munmap, mprotect, fork, merge-any.

ksmd and the fault handler change other processes' page tables; these run in the process
that owns the mm (its VM worker), as mm/madvise.c, mm/mprotect.c and kernel/fork.c run in
the calling task.  Each takes the mm's ptl, changes VMAs and PTEs, and drops it.

Secondary MMUs.  An mm's secondary MMUs live in that same process, so the kernel's
mmu_notifier_invalidate_range_start/end around each change are local calls
(`LocalNotify`): every secondary MMU applies START (drops its translations of the range,
in_progress + 1) before the first PTE of the range changes and END (in_progress - 1,
sequence + 1) after the last.  No message crosses a channel and no ack is awaited, but a
secondary MMU's log (VM.msg_log) shows the pair like any other, and the notifier grammar
holds: the VM holds ptl from START to END, and ksmd and the fault handler notify only
under that ptl and release it after their END acks, so no other START..END is open on
these secondary MMUs meanwhile.  In every notifier mode they are START/END pairs: the
kernel has always used invalidate_range_start/end, never change_pte, for zap, mprotect
and fork (copy_page_range).  The pairs:

    zap_page_range          MADV_DONTNEED: one pair per VMA of the range; munmap: one pair for
                            the whole range (unmap_vmas), if any VMA was in it
    do_mprotect             one pair per VMA whose flags change and that maps a page
    dup_mmap (fork)         one pair per parent VMA that maps a page (copy_page_range of a COW
                            mapping); the child's secondary MMUs are new and hear nothing

Counters move as the kernel moves them: a zapped KSM zero page leaves ksm_zero_pages at
once (ksm_might_unmap_zero_page); the child of a fork inherits the parent's KSM zero pages
(ksm_fork adds them to the global count) but none of its rmap items or merging pages: those
are ksmd's, and change when ksmd next walks the mm.

Whatever effect fails (a lock timeout, the allocator), ptl is released, an open START gets its
END and references a child did not take go back (tests/test_cores.py).  Each `brk` name removes
one step, for the checker to show why it is there:
`fork-no-write-protect`, `dontneed-no-notify`, `mprotect-no-notify`.
"""
from __future__ import annotations

import errno

import numpy as np

from proto.layout import (FRAME_ANON, FRAME_KSM, FRAME_ZERO, MMF_VM_MERGE_ANY, MMF_VM_MERGEABLE, PAGE_SHIFT, PAGE_SIZE,
                          PTE_PRESENT, PTE_SPECIAL, PTE_WRITE, PTE_YOUNG, VM_KSM_IGNORED, VM_MERGEABLE,
                          USER_BASE, VM_PFNMAP, VM_READ, VM_WRITE, ZERO_PFN)
from proto.messages import FAULT_UNSHARE, Msg

from workers.mm.kvm import FAULT_BATCH, FaultCall
from workers.mm.effects import FLAGS, MAPCOUNT, MMFLAGS, PTE, VMAS, Get, Load, Put, Store, ZeroPagesAdd, under_ptl
from workers.mm.mmu_notifier import LocalNotify, entries_for
from workers.mm.pte import PROT_BITS, page_range, vma_mask, vma_pieces, vma_table, vmas_with, vmas_without
from workers.mm.breaks import NONE

U64 = np.uint64
_FORK_FLAGS = MMF_VM_MERGEABLE | MMF_VM_MERGE_ANY     # what a child's mm inherits (ksm_fork, MMF_INIT_MASK)


def _store(region, mm, idx, value):
    yield Store(region, mm, idx, value)


def _invalidated(mm: int, subs, entries, body, notify: bool = True):
    """Run generator body between invalidate_range_start and _end to subs: END comes on every path
    (a secondary MMU left 'in progress' would make the VM wait on it forever)."""
    if notify:
        yield LocalNotify(mm, Msg.START, subs, entries)
    try:
        result = yield from body
    except GeneratorExit:           # abandoned (a checker run cut short)
        raise
    except BaseException:
        if notify:
            yield LocalNotify(mm, Msg.END, subs, entries)
        raise
    if notify:
        yield LocalNotify(mm, Msg.END, subs, entries)
    return result


# ---------------------------------------------------------------- zap: MADV_DONTNEED, munmap
def zap_page_range(mm: int, subs, i0: int, i1: int, brk=NONE):
    """Clear the PTEs of pages [i0, i1) and put their frames, inside START..END.  Caller holds ptl(mm).

    Anonymous pages read as zero afterwards (a new fault maps the zero page or a new frame); a KSM
    page loses one mapping (freed with its last); a KSM zero page leaves ksm_zero_pages now.
    """
    idx = np.arange(i0, i1, dtype=np.int64)
    if not len(idx):
        return

    def body():
        pte = yield Load(PTE, mm, idx)
        present = (pte & U64(PTE_PRESENT)) != 0
        if present.any():
            yield Store(PTE, mm, idx[present], np.zeros(int(present.sum()), dtype=U64))
            yield Put((pte[present] >> U64(PAGE_SHIFT)).astype(np.int64))
            nzero = int((present & ((pte & U64(PTE_SPECIAL)) != 0)).sum())
            if nzero:
                yield ZeroPagesAdd(mm, -nzero)
    yield from _invalidated(mm, subs, entries_for(idx, np.zeros(len(idx), dtype=U64)), body(),
                            "dontneed-no-notify" not in brk)


def madvise_dontneed(mm: int, subs, start: int, end: int, brk=NONE):
    """MADV_DONTNEED on [start, end): each VMA's part zapped in turn; EINVAL at a VM_PFNMAP area
    (the areas before it stay zapped), ENOMEM if part of the range is unmapped (after the rest)."""
    def body():
        vmas = yield Load(VMAS, mm)
        pieces, holes = vma_pieces(vmas, start, end)
        for lo, hi, f in pieces:
            if f & VM_PFNMAP:
                return OSError(errno.EINVAL, f"MADV_DONTNEED on the VM_PFNMAP area at {lo:#x}")
            yield from zap_page_range(mm, subs, *page_range(lo, hi), brk)
        if holes:
            return OSError(errno.ENOMEM, f"part of [{start:#x}, {end:#x}) is not mapped (from {holes[0]:#x}; "
                                         f"the rest was discarded)")
        return None
    err = yield from under_ptl(mm, body())
    if err is not None:
        raise err


def do_munmap(mm: int, subs, npages: int, start: int, end: int, brk=NONE):
    """munmap [start, end): the VMAs lose the range, its PTEs are zapped (one START..END)."""
    def body():
        vmas = yield Load(VMAS, mm)
        pieces, _ = vma_pieces(vmas, start, end)
        if not pieces:
            return
        yield Store(VMAS, mm, None, vma_table(vmas_without(vmas, start, end)))
        i0, i1 = page_range(start, end)
        yield from zap_page_range(mm, subs, max(0, i0), min(npages, i1), brk)
    yield from under_ptl(mm, body())


# ---------------------------------------------------------------- mprotect
def do_mprotect(mm: int, subs, start: int, end: int, prot_flags: int, brk=NONE):
    """mprotect [start, end) to the VM_READ/VM_WRITE/VM_EXEC bits prot_flags.

    The range is walked VMA by VMA from start; a hole ends the walk with ENOMEM, the VMAs before
    it changed (start itself unmapped: ENOMEM, nothing changed).  For each VMA whose flags change
    and that maps a page: START; PTEs lose WRITE when VM_WRITE goes, or gain it when VM_WRITE
    comes for exclusive anonymous pages (mapcount 1, not KSM, not the zero page), as
    change_pte_range does; END.  A PROT_NONE page keeps its frame (PTE present, not writable):
    the VMA's flags forbid every access, and its secondary translations are gone with START.
    """
    def body():
        vmas = yield Load(VMAS, mm)
        pieces, holes = vma_pieces(vmas, start, end)
        if not pieces or pieces[0][0] != start:
            return OSError(errno.ENOMEM, f"mprotect: {start:#x} is not mapped")
        stop = holes[0] if holes else end
        pieces = [p for p in pieces if p[1] <= stop]
        changed = [(lo, hi, f, (f & ~PROT_BITS) | prot_flags) for lo, hi, f in pieces
                   if (f & ~PROT_BITS) | prot_flags != f]
        if changed:
            yield Store(VMAS, mm, None, vma_table(vmas_with(vmas, start, stop,
                                                            lambda f: (f & ~PROT_BITS) | prot_flags)))
        for lo, hi, old, new in changed:
            yield from change_protection(mm, subs, *page_range(lo, hi), old, new, brk)
        if holes:
            return OSError(errno.ENOMEM, f"mprotect: {holes[0]:#x} is not mapped (the range before it changed)")
        return None
    err = yield from under_ptl(mm, body())
    if err is not None:
        raise err


def change_protection(mm: int, subs, i0: int, i1: int, old: int, new: int, brk=NONE):
    """The PTEs of one VMA [i0, i1) after its flags went old -> new.  Caller holds ptl(mm)."""
    idx = np.arange(i0, i1, dtype=np.int64)
    pte = yield Load(PTE, mm, idx)
    present = (pte & U64(PTE_PRESENT)) != 0
    if not present.any():
        return                      # an unpopulated range: no PTE, no secondary translation, no notifier
    want = pte.copy()
    if not new & VM_WRITE:
        want[present] &= ~U64(PTE_WRITE)
    elif not old & VM_WRITE:        # write comes back: exclusive anonymous pages are writable at once
        pfn = (pte >> U64(PAGE_SHIFT)).astype(np.int64)
        fl = yield Load(FLAGS, None, pfn)
        mc = yield Load(MAPCOUNT, None, pfn)
        up = (present & ((pte & U64(PTE_SPECIAL)) == 0) & (pfn != ZERO_PFN) & ((fl & FRAME_ANON) != 0)
              & ((fl & (FRAME_KSM | FRAME_ZERO)) == 0) & (mc == 1))
        want[up] |= U64(PTE_WRITE)
    diff = want != pte

    def body():
        if diff.any():
            yield Store(PTE, mm, idx[diff], want[diff])
    yield from _invalidated(mm, subs, entries_for(idx, want), body(), "mprotect-no-notify" not in brk)


# ---------------------------------------------------------------- fork
def dup_mmap(parent: int, child: int, subs, brk=NONE):
    """fork's copy of the parent's address space into the (new, still unknown) child mm.

    Under the parent's ptl: for each parent VMA that maps a page, START to the parent's
    secondary MMUs, its writable PTEs lose WRITE, END (copy_page_range).  Then every mapped
    frame gains a mapping (the zero page excepted), and the child gets the VMAs with their
    flags, MMF_VM_MERGEABLE / MMF_VM_MERGE_ANY, and the same PTEs, read-only and old.  Both
    sides now write through do_wp_page: a copy while the frame is shared, reuse once its
    mapcount is back to 1.  KSM pages stay KSM pages (one more mapping; the child's rmap
    items come when ksmd scans it); the child's KSM zero pages count in ksm_zero_pages now.
    """
    def body():
        vmas = yield Load(VMAS, parent)
        mmflags = yield Load(MMFLAGS, parent)
        pte = yield Load(PTE, parent, None)
        present = ((pte & U64(PTE_PRESENT)) != 0) & vma_mask(vmas, np.arange(len(pte), dtype=np.int64))
        writable = present & ((pte & U64(PTE_WRITE)) != 0)
        wp = "fork-no-write-protect" not in brk
        new = pte.copy()
        if wp:
            new[writable] &= ~U64(PTE_WRITE)
        for s, e, _ in vmas:
            i0, i1 = page_range(s, e)
            if not present[i0:i1].any():
                continue            # never faulted in (no anon_vma): nothing to copy, nothing to notify
            if not wp:
                continue
            idx = np.arange(i0, i1, dtype=np.int64)
            ch = writable[i0:i1]        # (none writable: the range is notified all the same, as in the kernel)
            body = _store(PTE, parent, idx[ch], new[i0:i1][ch]) if ch.any() else iter(())
            yield from _invalidated(parent, subs, entries_for(idx, new[i0:i1]), body)
        cidx = np.flatnonzero(present)
        pfn = (new[cidx] >> U64(PAGE_SHIFT)).astype(np.int64)
        got = pfn[pfn != ZERO_PFN]
        if len(got):
            yield Get(got)
        try:
            yield Store(VMAS, child, None, vma_table(vmas))
            yield Store(MMFLAGS, child, None, mmflags & _FORK_FLAGS)
            if len(cidx):
                yield Store(PTE, child, cidx, new[cidx] & ~U64(PTE_WRITE | PTE_YOUNG))
        except GeneratorExit:
            raise
        except BaseException:       # the child maps nothing: the references it took go back
            if len(got):
                yield Put(got)
            raise
        nzero = int(((new[cidx] & U64(PTE_SPECIAL)) != 0).sum())
        if nzero:
            yield ZeroPagesAdd(child, nzero)
        return len(cidx)
    return (yield from under_ptl(parent, body()))


# ---------------------------------------------------------------- merge-any (prctl PR_SET_MEMORY_MERGE)
def ksm_enable_merge_any(mm: int):
    """MMF_VM_MERGE_ANY: every KSM-compatible VMA becomes VM_MERGEABLE now (ksm_add_vmas), and
    every one mapped later (mmap); the mm joins ksmd's list (MMF_VM_MERGEABLE)."""
    def body():
        mmflags = yield Load(MMFLAGS, mm)
        if mmflags & MMF_VM_MERGE_ANY:
            return
        vmas = yield Load(VMAS, mm)
        yield Store(VMAS, mm, None, vma_table([(s, e, f if f & VM_KSM_IGNORED else f | VM_MERGEABLE)
                                               for s, e, f in vmas]))
        yield Store(MMFLAGS, mm, None, mmflags | MMF_VM_MERGE_ANY | MMF_VM_MERGEABLE)
    yield from under_ptl(mm, body())


def ksm_disable_merge_any(mm: int):
    """MMF_VM_MERGE_ANY off: every VMA loses VM_MERGEABLE (madvised ones too, as ksm_del_vmas does)
    and their KSM pages are unmerged.  The flags go first, under ptl: ksmd merges nothing into an
    area that is no longer mergeable, so the unmerge that follows leaves no KSM page behind.  If
    unmerging fails (out of frames), merge-any is set again and the error raised (ENOMEM)."""
    def body():
        mmflags = yield Load(MMFLAGS, mm)
        if not mmflags & MMF_VM_MERGE_ANY:
            return []
        vmas = yield Load(VMAS, mm)
        yield Store(VMAS, mm, None, vma_table([(s, e, f & ~VM_MERGEABLE) for s, e, f in vmas]))
        yield Store(MMFLAGS, mm, None, mmflags & ~MMF_VM_MERGE_ANY)
        return [page_range(s, e) for s, e, f in vmas if f & VM_MERGEABLE]
    ranges = yield from under_ptl(mm, body())
    try:
        for i0, i1 in ranges:
            yield from unmerge_ksm_pages(mm, i0, i1)
    except OSError:
        yield from ksm_enable_merge_any(mm)
        raise


def unmerge_ksm_pages(mm: int, i0: int, i1: int):
    """unmerge_ksm_pages: FAULT_UNSHARE every KSM page and KSM zero page of [i0, i1) into a private
    copy (break_ksm; the fault handler ignores the VMA's protection for it, as the kernel does)."""
    idx = np.arange(i0, i1, dtype=np.int64)
    if not len(idx):
        return 0
    pte = yield Load(PTE, mm, idx)
    present = (pte & U64(PTE_PRESENT)) != 0
    pfn = (pte >> U64(PAGE_SHIFT)).astype(np.int64)
    fl = yield Load(FLAGS, None, pfn)
    ksm = present & (((fl & FRAME_KSM) != 0) | ((pte & U64(PTE_SPECIAL)) != 0))
    todo = idx[ksm]
    for k in range(0, len(todo), FAULT_BATCH):
        yield FaultCall(todo[k:k + FAULT_BATCH].tolist(), FAULT_UNSHARE, 0)
    return len(todo)


def mmap_flags(mmflags: int, vm_flags: int) -> int:
    """The flags of a new VMA: VM_MERGEABLE too under merge-any, when KSM-compatible (ksm_vma_flags)."""
    if mmflags & MMF_VM_MERGE_ANY and not vm_flags & VM_KSM_IGNORED:
        return vm_flags | VM_MERGEABLE
    return vm_flags



# ---------------------------------------------------------------- mmap, ksm_madvise, exit_mmap
def get_unmapped_area(vmas, npages: int, mm_pages: int) -> int:
    """The address a new area of npages goes to: first fit from USER_BASE, one guard page between
    areas; ENOMEM when the address space (mm_pages pages) has no such room."""
    start = USER_BASE
    for s, e, _ in vmas:
        if start + npages * PAGE_SIZE <= s:
            break
        start = max(start, e + PAGE_SIZE)
    if start + npages * PAGE_SIZE > USER_BASE + mm_pages * PAGE_SIZE:
        raise OSError(errno.ENOMEM, f"no room for {npages} pages in the address space")
    return start


def do_mmap(mm: int, npages: int, mm_pages: int, vm_flags: int):
    """mmap of an anonymous area of npages (VM_READ | VM_WRITE | vm_flags): its place, its flags
    (merge-any makes it VM_MERGEABLE, and then the mm joins ksmd's list: ksm_enter); returns its start."""
    def body():
        vmas = yield Load(VMAS, mm)
        start = get_unmapped_area(vmas, npages, mm_pages)
        mmflags = yield Load(MMFLAGS, mm)
        flags = mmap_flags(mmflags, VM_READ | VM_WRITE | vm_flags)
        yield Store(VMAS, mm, None, vma_table(vmas + [(start, start + npages * PAGE_SIZE, flags)]))
        if flags & VM_MERGEABLE and not mmflags & MMF_VM_MERGEABLE:
            yield Store(MMFLAGS, mm, None, mmflags | MMF_VM_MERGEABLE)
        return start
    return (yield from under_ptl(mm, body()))


def ksm_madvise(mm: int, start: int, end: int, mergeable: bool):
    """MADV_MERGEABLE / MADV_UNMERGEABLE of [start, end) (page-aligned, checked by the caller).

    Under ptl: each VMA the range touches is split at its bounds and the part inside gains (or
    loses) VM_MERGEABLE, unless KSM cannot work on it (VM_KSM_IGNORED: shared, hugetlb, PFN or IO
    maps are silently left alone); MADV_MERGEABLE puts the mm on ksmd's list (ksm_enter).  Then
    MADV_UNMERGEABLE breaks COW of every merged page of what lost the flag (unmerge_ksm_pages:
    break_ksm of each page): out of memory there is EAGAIN.  A range not wholly mapped is ENOMEM, raised
    after the mapped part got the advice, as the kernel does."""
    def body():
        vmas = yield Load(VMAS, mm)
        out, unshare, covered, unmapped = [], [], start, False
        for s, e, f in vmas:
            if e <= start or s >= end:
                out.append((s, e, f))
                continue
            unmapped |= s > covered
            covered = max(covered, e)
            lo, hi = max(s, start), min(e, end)
            nf = f
            if not f & VM_KSM_IGNORED:
                if mergeable:
                    nf = f | VM_MERGEABLE
                elif f & VM_MERGEABLE:
                    nf = f & ~VM_MERGEABLE
                    unshare.append((lo, hi))
            out += [(s, lo, f), (lo, hi, nf), (hi, e, f)]
        yield Store(VMAS, mm, None, vma_table(out))
        if mergeable:
            mmflags = yield Load(MMFLAGS, mm)
            if not mmflags & MMF_VM_MERGEABLE:
                yield Store(MMFLAGS, mm, None, mmflags | MMF_VM_MERGEABLE)
        return unshare, unmapped or covered < end
    unshare, unmapped = yield from under_ptl(mm, body())
    for lo, hi in unshare:
        try:
            yield from unmerge_ksm_pages(mm, *page_range(lo, hi))
        except OSError as e:
            if e.errno == errno.ENOMEM:
                raise OSError(errno.EAGAIN, f"out of memory while unmerging: {e.strerror}") from None
            raise
    if unmapped:
        raise OSError(errno.ENOMEM, f"part of [{start:#x}, {end:#x}) is not mapped (advice applied to the rest)")


def exit_mmap(mm: int, lock: bool = True):
    """The mm is gone (its VM exited or died): every frame its PTEs map loses that mapping (freed
    when it was the last), its KSM zero pages leave ksm_zero_pages, its PTEs are cleared.  Its
    secondary MMUs were released (or died with it) and ksmd and its fault handler forgot it before.
    lock=False: without ptl (a hung actor holds it and the mm must go all the same)."""
    def body():
        pte = yield Load(PTE, mm, None)
        present = np.flatnonzero((pte & U64(PTE_PRESENT)) != 0)
        if not len(present):
            return 0
        live = pte[present]
        zero = int(((live & U64(PTE_SPECIAL)) != 0).sum())
        yield Store(PTE, mm, present, np.zeros(len(present), dtype=U64))    # (no PTE maps a frame it put)
        yield Put((live >> U64(PAGE_SHIFT)).astype(np.int64))
        if zero:
            yield ZeroPagesAdd(mm, -zero)
        return len(present)
    return (yield from (under_ptl(mm, body()) if lock else body()))
