"""try_to_merge_one_page for a batch of planned merges, IO-free.

    trylock ptl  ->  validate (the PTE still maps the page we checksummed)
                 ->  write_protect_page (+ notify, wait for every ack)
                 ->  memcmp  ->  replace_page (+ notify, acks)  ->  put old frames  ->  unlock

Protect first, compare second: a write racing the merge either lands before the
write-protect (and the compare fails) or faults afterwards (COW).  With several
scanners the memcmp runs out of every lock (try_to_merge_pages' `ksm`): pin, unlock,
compare, lock, validate again (the PTE still maps the pinned page write-protected),
replace_page.  A pair also has
its checksum taken again once protected: both pages may have changed alike since
they were checksummed, and a stable node must hold what its key says (the kernel's
trees are ordered by the content itself; ours are indexed by its hash).  One notifier
message per mm and step carries every page of the batch.  ksmd only *tries* each
ptl, as the kernel's ksmd does; a busy mm is skipped this time.

The batch is mm.ksm.mm_slot.Ops (arrays, one row per merge).  Pairs are compared first:
a pair's page becomes the KSM page (in place) that later merges of the batch into
the same node compare with.  With several scanners (`merge_in_groups`) an owner
merges its batch one set of mms at a time, pairs first, holding the scanners' ksm
lock of each mm of the set (taken in mm order) around the trylock of its ptl: two
scanners never fail each other's trylock.

Pins (get_ksm_page) and locks taken here are released on every path, exceptions
included.  Each `brk` name removes one step, for the checker to show why it exists:
`no-write-protect`, `no-recheck-pte`, `free-before-acks`, `no-ksm-lock`,
`vusion-no-fake-protect` (fake_merge leaves unmerged candidates writable).

`fake_merge` is VUsion's fake merging (Oliverio et al., SOSP 2017; mitigation "vusion"):
after the batch's merges every candidate page that did not merge is write-protected and moved to
a frame taken at random too, as if it had merged, so its next write faults and copies like a write
to a merged page; new KSM pages are copies in frames taken at random (`compare`).
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np

from proto.layout import (FRAME_ANON, FRAME_KSM, PAGE_SHIFT, PTE_DIRTY, PTE_PRESENT, PTE_SPECIAL, PTE_WRITE,
                          PTE_YOUNG, ZERO_PFN)

from workers.mm.effects import (FLAGS, PTE, VMAS, Alloc, Candidates, Checksum, Compare, CopyPages, Get, Load, Lock,
                                PinKsm, Put, SetFrame, TryLock, Unlock, WaitAcks, ZeroPagesAdd, ptl)
from workers.mm.mmu_notifier import set_pte_at_notify
from workers.mm.pte import mergeable_ranges
from workers.mm.ksm.shard import ksm_lock

U64 = np.uint64
KSM_ZERO_PTE = (ZERO_PFN << PAGE_SHIFT) | PTE_PRESENT | PTE_SPECIAL | PTE_DIRTY | PTE_YOUNG


class MergeKind(IntEnum):
    """The ways cmp_and_merge_page merges a page, named after mm/ksm.c's functions."""
    TRY_TO_MERGE_WITH_KSM_PAGE = 0      # into the KSM page of a stable node (stable_tree_search found it)
    TRY_TO_MERGE_TWO_PAGES = 1          # with an unstable tree page: a new KSM page, a new stable node
    TRY_TO_MERGE_WITH_ZERO_PAGE = 2     # use_zero_pages: onto the zero page (try_to_merge_with_zero_page)


# (plain ints, for the numpy arrays of a batch's merges: Ops.kind)
MERGE_WITH_KSM_PAGE, MERGE_TWO_PAGES, MERGE_WITH_ZERO_PAGE = (int(k) for k in MergeKind)
WAIT_IN_UNSTABLE_TREE = -1
VUSION = 1          # proto.knobs.MITIGATIONS.index("vusion")


def cmp_and_merge_decision(stable_dup: int, unstable_match: bool) -> int:
    """cmp_and_merge_page's rule for a page of a content (its checksum unchanged since the last scan):
    a stable dup of the content with room (stable_dup >= 0: stable_tree_search found it) takes the
    page; else an unstable tree page of the content (unstable_tree_search_insert) makes the two a new
    KSM page; else the page waits in the unstable tree.  The scanner (page by page, and in its batch
    form) and `ksm-proto estimate` (its replay of a content's copies) both decide so."""
    if stable_dup >= 0:
        return MERGE_WITH_KSM_PAGE
    if unstable_match:
        return MERGE_TWO_PAGES
    return WAIT_IN_UNSTABLE_TREE


def try_to_merge_pages(scan, ops, ksm: list | None = None):
    """Run the planned merges `ops` (mm.ksm.mm_slot.Ops); clears ops.ok of those that fail.

    ksm (several scanners): the mms whose scanners' ksm locks the caller holds.  Then the pages are
    compared out of every lock, as mm/ksm.c compares between write_protect_page and replace_page: each
    page to compare is pinned (a reference: do_wp_page reuses a page only at mapcount 1, so a write
    to it copies and its PTE moves; and it cannot be freed and reused meanwhile), the ptls and ksm
    locks are let go for the memcmp (`compare_pairs`, `compare_rest`), taken again, and a merge goes
    on only where the PTE still maps the pinned page write-protected (`recheck_pte`).  `ksm` is kept
    up to date (the locks held now), for the caller to let go."""
    sids = np.unique(np.concatenate([ops.sid, ops.tsid[ops.tsid >= 0]])).tolist()
    locked = []
    held = np.empty(0, dtype=np.int64)      # KSM frames we took a reference on (get_ksm_page)
    pinned = np.empty(0, dtype=np.int64)    # pages we took a reference on for a compare out of the locks
    try:
        locked = yield from _trylock_ptls(scan, sids)
        # stable node -> its KSM frame is referenced by us; a node this batch creates from a pair
        # has no frame yet (kpfn -1): its frame is the pair's own page, held by its PTE under our ptl
        st = np.flatnonzero(ops.kind == MERGE_WITH_KSM_PAGE)
        nodes = np.unique(ops.d[st])
        k = scan.tree.kpfn[nodes].astype(np.int64)
        need = k >= 0
        node_ok = np.ones(len(nodes), dtype=bool)
        if need.any():
            got = np.asarray((yield PinKsm(k[need], scan.gid(nodes[need]))), dtype=bool)
            held = k[need][got]
            node_ok[np.flatnonzero(need)[~got]] = False
        ops.ok[st] &= node_ok[np.searchsorted(nodes, ops.d[st])]
        pages = yield from validate(scan, ops, locked)
        if "no-write-protect" not in scan.brk:
            yield from write_protect_page(scan, pages)
        if ksm is None:
            keys = yield from compare_pairs(scan, ops)
            moved = yield from make_ksm_pages(scan, ops, keys)
            yield from compare_rest(scan, ops)
        else:                       # the memcmp out of the locks
            pages_read = _pages_to_compare(ops)
            if len(pages_read):
                yield Get(pages_read)
                pinned = pages_read
            yield from _unlock_unpin(locked, ())
            locked = []
            for mm in reversed(ksm):
                yield Unlock(ksm_lock(mm))
            mms, ksm[:] = list(ksm), []
            keys = yield from compare_pairs(scan, ops)
            yield from compare_rest(scan, ops)
            for mm in mms:
                yield Lock(ksm_lock(mm))
                ksm.append(mm)
            locked = yield from _trylock_ptls(scan, sids)
            yield from recheck_pte(scan, ops, locked)
            moved = yield from make_ksm_pages(scan, ops, keys)
        if len(moved):              # (vusion: new KSM frames, held by us until the end, as pinned ones)
            held = np.concatenate([held, scan.tree.kpfn[ops.d[moved]].astype(np.int64)])
        yield from replace_page(scan, ops, moved)
    except GeneratorExit:           # abandoned (a checker run cut short): nothing to release
        raise
    except BaseException:
        yield from _unlock_unpin(locked, np.concatenate([held, pinned]))
        raise
    yield from _unlock_unpin(locked, np.concatenate([held, pinned]))


def _trylock_ptls(scan, sids):
    """Try the ptl of each live mm of sids (ksmd only tries a ptl, as the kernel's); the ones taken."""
    locked = []
    for sid in sids:
        slot = scan.slots.get(sid)
        if slot is not None and slot.alive and (yield TryLock(ptl(sid))):
            locked.append(sid)
    return locked


def _pages_to_compare(ops) -> np.ndarray:
    """The frames a compare reads that no lock of ours will keep: each page to merge, a pair's both."""
    pr = ops.ok & (ops.kind == MERGE_TWO_PAGES)
    return np.concatenate([ops.pfn[ops.ok], ops.tpfn[pr]]).astype(np.int64)


def recheck_pte(scan, ops, locked):
    """After a compare out of the locks (ptls held again): `validate` again (the PTE still maps the
    page, in a mergeable area: an madvise or a munmap may have run meanwhile) and each PTE still
    write-protected (the pin made a write copy the page: its PTE maps the copy then; a pinned page
    is never made writable again in place); a merge into the KSM page of a pair that failed fails too."""
    pr0 = ops.ok & (ops.kind == MERGE_TWO_PAGES)
    yield from validate(scan, ops, locked, again=True)
    lost = pr0 & ~ops.ok                    # (their nodes' KSM page will not be)
    if lost.any():
        nodes = ops.d[lost]
        scan.tree.kpfn[nodes] = -1
        ops.ok[(ops.kind == MERGE_WITH_KSM_PAGE) & np.isin(ops.d, nodes)] = False


def _unlock_unpin(locked, held):
    for s in locked:
        yield Unlock(ptl(s))
    if len(held):
        yield Put(held)


def merge_in_groups(scan, ops):
    """Several scanners: the batch one set of mms at a time (pairs first: later merges compare with the
    KSM pages they make), each under the ksm lock of its mms.  A set another scanner is merging into
    (a ksm lock busy) waits at the back while others go; when only such sets are left, the first is
    waited for, its locks taken in mm order holding none.  A lock not had in time fails the set."""
    pair = ops.kind == MERGE_TWO_PAGES
    for first in (True, False):
        rows = np.flatnonzero(pair == first)
        if not len(rows):
            continue
        a, b = ops.sid[rows], np.where(ops.tsid[rows] >= 0, ops.tsid[rows], ops.sid[rows])
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        width = int(hi.max()) + 1                 # one int key per (lo, hi): np.unique on 1-D is far cheaper
        keys, which = np.unique(lo * width + hi, return_inverse=True)
        which = which.reshape(-1)
        sets = np.stack([keys // width, keys % width], axis=1)
        n = len(sets)
        start = scan.shard * n // max(1, scan.nshards)           # owners start apart
        queue = [(start + x) % n for x in range(n)]
        deferred: set = set()
        while queue:
            j = queue.pop(0)
            m = rows[which == j]
            mms = sorted({int(sets[j][0]), int(sets[j][1])})
            sub = ops.select(m)
            taken = []
            try:
                if "no-ksm-lock" not in scan.brk:
                    wait = j in deferred or not queue
                    for mm in mms:
                        if wait:
                            yield Lock(ksm_lock(mm))
                        elif not (yield TryLock(ksm_lock(mm))):
                            break
                        taken.append(mm)
                    if len(taken) < len(mms):          # busy: the other sets first
                        for mm in reversed(taken):
                            yield Unlock(ksm_lock(mm))
                        deferred.add(j)
                        queue.append(j)
                        continue
                yield from try_to_merge_pages(scan, sub, taken if "no-ksm-lock" not in scan.brk else None)
            except TimeoutError:         # another scanner held an mm too long: these merges wait a scan
                sub.ok[:] = False
            except GeneratorExit:        # abandoned (a checker run cut short): nothing to release
                raise
            except BaseException:
                for mm in reversed(taken):
                    yield Unlock(ksm_lock(mm))
                raise
            for mm in reversed(taken):
                yield Unlock(ksm_lock(mm))
            ops.put_back(m, sub)


def validate(scan, ops, locked, again: bool = False):
    """Under ptl: each PTE still maps the frame we checksummed, anonymous, in a mergeable area.

    again (after a compare out of the locks, `recheck_pte`): each PTE also still write-protected; the
    frames' flags are not read again (a pinned page is neither freed nor merged by anyone else).
    Clears ops.ok where not; returns {mm: sorted page indices} of the pages to write-protect.
    """
    held = np.array(sorted(s for s in locked if scan.slots.get(s) is not None and scan.slots[s].alive),
                    dtype=np.int64)
    sides = [(ops.sid, ops.idx, ops.pfn, np.ones(len(ops), dtype=bool)), (ops.tsid, ops.tidx, ops.tpfn, ops.tsid >= 0)]
    for sid, _, _, used in sides:
        ops.ok &= ~used | np.isin(sid, held)
    if "no-recheck-pte" not in scan.brk and len(held):
        if not again:
            pfns = np.unique(np.concatenate([ops.pfn, ops.tpfn[ops.tpfn >= 0]]))
            flags = np.asarray((yield Load(FLAGS, None, pfns)))
        bad = U64(PTE_SPECIAL | (PTE_WRITE if again else 0))
        for s in held.tolist():
            r = mergeable_ranges((yield Load(VMAS, s)))
            starts = np.array([a for a, _ in r], dtype=np.int64)
            ends = np.array([b for _, b in r], dtype=np.int64)
            want = [(sid == s) & used & ops.ok for sid, _, _, used in sides]
            idx = np.unique(np.concatenate([i[w] for (_, i, _, _), w in zip(sides, want)]))
            if not len(idx):
                continue
            pte = np.asarray((yield Load(PTE, s, idx)))
            for (sid, i, p, _), w in zip(sides, want):
                rows = np.flatnonzero(w)
                if not len(rows):
                    continue
                e = pte[np.searchsorted(idx, i[rows])]
                k = np.searchsorted(starts, i[rows], side="right") - 1
                inside = (k >= 0) & (i[rows] < ends[np.maximum(k, 0)]) if len(starts) else np.zeros(len(rows), bool)
                ok = (((e & U64(PTE_PRESENT)) != 0) & ((e & bad) == 0)
                      & ((e >> U64(PAGE_SHIFT)).astype(np.int64) == p[rows]) & inside)
                if not again:
                    f = flags[np.searchsorted(pfns, p[rows])]
                    ok &= ((f & FRAME_ANON) != 0) & ((f & FRAME_KSM) == 0)
                ops.ok[rows[~ok]] = False
    pages = {}
    for sid, i, _, used in sides:
        m = used & ops.ok
        for s in np.unique(sid[m]).tolist():
            pages.setdefault(s, []).append(i[m & (sid == s)])
    return {s: np.unique(np.concatenate(v)) for s, v in pages.items()}


def fake_merge(scan, plan_in: list, ops):
    """VUsion's fake merging: every candidate of the batch (plan_in: [(slot, idx, pfn, keys)]) that is
    still an anonymous, non-KSM page mapping the frame it was checksummed in is treated as a merged
    one, under its ptl (tried, as for a merge; with several scanners under the mm's ksm lock): a
    writable one is write-protected, copied into a frame taken at random from the free frames (as a
    new KSM page is) and mapped there read-only (`fake_move`); then all are marked (`Candidates`).
    Merged pages are KSM pages, write-protected already."""
    per: dict = {}
    for slot, idx, pfn, keys in plan_in:
        per.setdefault(slot.id, []).append((np.asarray(idx, dtype=np.int64), np.asarray(pfn, dtype=np.int64),
                                            np.asarray(keys, dtype=np.int64)))
    for sid in sorted(per):
        slot = scan.slots.get(sid)
        if slot is None or not slot.alive:
            continue
        idx, first = np.unique(np.concatenate([i for i, _, _ in per[sid]]), return_index=True)
        pfn = np.concatenate([p for _, p, _ in per[sid]])[first]
        keys = np.concatenate([k for _, _, k in per[sid]])[first]
        shared = scan.nshards > 1 and "no-ksm-lock" not in scan.brk
        if shared:
            yield Lock(ksm_lock(sid))
        locked = False
        try:
            locked = yield TryLock(ptl(sid))
            if locked:
                pte = np.asarray((yield Load(PTE, sid, idx)))
                flags = np.asarray((yield Load(FLAGS, None, pfn)))
                ok = (((pte & U64(PTE_PRESENT)) != 0) & ((pte & U64(PTE_SPECIAL)) == 0)
                      & ((pte >> U64(PAGE_SHIFT)).astype(np.int64) == pfn)
                      & ((flags & FRAME_ANON) != 0) & ((flags & FRAME_KSM) == 0))
                w = ok & ((pte & U64(PTE_WRITE)) != 0)
                if w.any() and "vusion-no-fake-protect" not in scan.brk:
                    yield from fake_move(scan, sid, idx[w], pfn[w], keys[w])
                if ok.any():
                    yield Candidates(sid, idx[ok])
        except GeneratorExit:
            raise
        except BaseException:
            if locked:
                yield Unlock(ptl(sid))
            if shared:
                yield Unlock(ksm_lock(sid))
            raise
        if locked:
            yield Unlock(ptl(sid))
        if shared:
            yield Unlock(ksm_lock(sid))


def fake_move(scan, sid: int, idx, pfn, keys):
    """A fake merge of writable pages idx of mm sid (ptl held): write-protect them (so no write lands
    while they are copied), copy each into a frame taken at random from the free frames, map the copies
    read-only in their place (notified), put the old frames after the acks."""
    yield from write_protect_page(scan, {sid: idx})
    new = np.asarray((yield Alloc(len(idx), FRAME_ANON, False, scatter=keys ^ np.int64(scan.salt ^ 0x5A5A))),
                     dtype=np.int64)
    try:
        yield CopyPages(new, pfn)
        ptes = ((new.astype(U64) << U64(PAGE_SHIFT)) | U64(PTE_PRESENT | PTE_YOUNG)).astype(U64)
        yield from set_pte_at_notify([(sid, idx, ptes)], scan.mode)
    except GeneratorExit:
        raise
    except BaseException:       # the new frames no PTE took go back; the old pages stay mapped
        pte = np.asarray((yield Load(PTE, sid, idx)))
        lost = new[(pte >> U64(PAGE_SHIFT)).astype(np.int64) != new]
        if len(lost):
            yield Put(lost)
        raise
    yield Put(pfn)


def write_protect_page(scan, pages: dict):
    """Clear WRITE (and DIRTY) and make every secondary MMU drop its writable translation."""
    jobs = []
    for sid, idx in pages.items():
        idx = np.asarray(idx, dtype=np.int64)
        pte = yield Load(PTE, sid, idx)
        dirty = (pte & U64(PTE_WRITE | PTE_DIRTY)) != 0
        if dirty.any():
            jobs.append((sid, idx[dirty], pte[dirty] & ~U64(PTE_WRITE | PTE_DIRTY)))
    if jobs:
        yield from set_pte_at_notify(jobs, scan.mode)


def compare_pairs(scan, ops) -> np.ndarray:
    """memcmp of each pair after write-protect; a pair's page has its checksum taken again, and must
    still hold what its new node is keyed by; it is its node's KSM page from now on for the merges of
    the batch into the node (tree.kpfn: make_ksm_pages marks the frame).  Returns the checksums (by
    row; 0 where none)."""
    tree = scan.tree
    keys = np.zeros(len(ops), dtype=np.int64)
    r = np.flatnonzero(ops.ok & (ops.kind == MERGE_TWO_PAGES))
    if len(r):
        eq = np.asarray((yield Compare(ops.pfn[r], ops.tpfn[r])), dtype=bool)
        ops.ok[r] = eq
        r = r[eq]
        if len(r):      # the new KSM page's content is the one its node is keyed by
            keys[r] = np.asarray((yield Checksum(ops.pfn[r])), dtype=np.int64)
            nodes = np.array([scan.part(scan.slots[s]) for s in ops.sid[r].tolist()], dtype=np.int64)
            same = scan.tree_keys_nodes(keys[r], nodes) == tree.key[ops.d[r]]
            ops.ok[r[~same]] = False
            tree.kpfn[ops.d[r[same]]] = ops.pfn[r[same]]
    return keys


def compare_rest(scan, ops):
    """memcmp of each merge into the zero page or a KSM page (a pair's of this batch included)."""
    tree = scan.tree
    r = np.flatnonzero(ops.ok & (ops.kind == MERGE_WITH_ZERO_PAGE))
    if len(r):
        ops.ok[r] = np.asarray((yield Compare(ops.pfn[r], None)), dtype=bool)
    r = np.flatnonzero(ops.ok & (ops.kind == MERGE_WITH_KSM_PAGE))
    if len(r):
        k = tree.kpfn[ops.d[r]].astype(np.int64)
        there = (k >= 0) & (tree.live[ops.d[r]] != 0)
        ops.ok[r[~there]] = False
        r, k = r[there], k[there]
        if len(r):
            ops.ok[r] = np.asarray((yield Compare(ops.pfn[r], k)), dtype=bool)


def make_ksm_pages(scan, ops, keys):
    """Each pair that compared equal: its page becomes the KSM page of its new node (in place), or,
    with the mitigation vusion, a copy of it in a frame taken at random from the free frames (VUsion:
    where the KSM page lands tells nothing of which page it came from; keys: the pairs' checksums).
    Returns the rows of the pairs whose KSM page is such a new frame (its reference ours: put by the
    caller at the end)."""
    tree = scan.tree
    r = np.flatnonzero(ops.ok & (ops.kind == MERGE_TWO_PAGES))
    if not len(r):
        return np.empty(0, dtype=np.int64)
    if scan.knobs.get("mitigation", 0) == VUSION:
        new = np.asarray((yield Alloc(len(r), FRAME_ANON, False, scatter=keys[r] ^ np.int64(scan.salt))),
                         dtype=np.int64)
        yield CopyPages(new, ops.pfn[r])
        yield SetFrame(new, FRAME_KSM, scan.gid(ops.d[r]))
        tree.kpfn[ops.d[r]] = new
        return r
    yield SetFrame(ops.pfn[r], FRAME_KSM, scan.gid(ops.d[r]))
    tree.kpfn[ops.d[r]] = ops.pfn[r]
    return np.empty(0, dtype=np.int64)


def replace_page(scan, ops, moved=()):
    """Point each PTE at its KSM page (or the zero page), notify, put the old frames after the acks.
    A pair whose KSM page is a new frame (`moved`, vusion) has both its pages pointed there."""
    ok = ops.ok
    st, zr, pr = ok & (ops.kind == MERGE_WITH_KSM_PAGE), ok & (ops.kind == MERGE_WITH_ZERO_PAGE), ok & (ops.kind == MERGE_TWO_PAGES)
    mv = np.zeros(len(ops), dtype=bool)
    mv[np.asarray(moved, dtype=np.int64)] = True
    mv &= pr
    sid = np.concatenate([ops.sid[st], ops.sid[zr], ops.tsid[pr], ops.sid[mv]])
    if not len(sid):
        return
    idx = np.concatenate([ops.idx[st], ops.idx[zr], ops.tidx[pr], ops.idx[mv]])
    old = np.concatenate([ops.pfn[st], ops.pfn[zr], ops.tpfn[pr], ops.pfn[mv]])
    kp = np.concatenate([scan.tree.kpfn[ops.d[st]].astype(np.int64), np.full(int(zr.sum()), -1, np.int64),
                         np.where(mv[pr], scan.tree.kpfn[ops.d[pr]].astype(np.int64), ops.pfn[pr]),
                         scan.tree.kpfn[ops.d[mv]].astype(np.int64)])
    jobs, olds, zeros = [], [], []
    for s in np.unique(sid).tolist():
        m = sid == s
        i, o, k = idx[m], old[m], kp[m]
        zero = k < 0
        new = np.where(zero, KSM_ZERO_PTE, (k << PAGE_SHIFT) | PTE_PRESENT | PTE_YOUNG).astype(U64)
        jobs.append((s, i, new))
        olds.append(o)
        zeros.append((s, int(zero.sum())))
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
    for s, nz in zeros:
        if nz:
            yield ZeroPagesAdd(s, nz)
