"""ksmd's scan, IO-free: the mm_slot cursor, rmap items, both trees, the counters.

Like mm/ksm.c, the scanner walks every mm that has MADV_MERGEABLE areas, page by
page, `pages_to_scan` pages per wake-up.  For each present anonymous page
(cmp_and_merge_page):

  1. a page already merged into its KSM page: nothing to do;
  2. smart_scan may skip pages that keep failing to merge;
  3. the page leaves whatever tree it was in; its checksum (mmh3) is taken: if
     it changed since the previous visit the page is volatile and left alone;
  4. a zero page is merged with the zero page when use_zero_pages is set;
  5. a page equal to a KSM page in the stable tree is merged into it (a dup with
     room, max_page_sharing);
  6. otherwise it is looked up in the unstable tree: a match makes both pages one
     new KSM page (a stable node); no match inserts it.  A match that is the very same
     frame (a page shared with a fork child) is no match and the page goes in no tree
     (unstable_tree_search_insert: "don't substitute a ksm page for a forked page").

The unstable tree is emptied at the start of every full scan.  Both trees are
hash-indexed (ksm_tree.py).  Work is done in batches: `plan` takes the decisions
for a batch in the kernel's page-by-page order, then `core.merge` runs them
(try_to_merge_one_page: trylock, write_protect_page, memcmp, replace_page) and
`commit` does stable_tree_append for the merges that succeeded.

`ksm_do_scan` is a generator of effects (core/effects.py): the PTEs, frame flags
and page contents it reads are loads the driver (the ksmd process, or the
checker) performs.  Frame flags read to tell whether a stable node's KSM page is
still alive (`node_alive`, `prune`) are advisory: get_ksm_page (PinKsm) re-checks
under the frame lock before anything is merged into it.
"""
from __future__ import annotations

import numpy as np

from proto.knobs import DEFAULTS
from proto.layout import (FRAME_ANON, FRAME_KSM, MMF_VM_MERGEABLE, MMH_FLAGS, MMH_NODE, PAGE_SHIFT, PAGE_SIZE,
                          PTE_PRESENT, PTE_SPECIAL, ZERO_PFN)

from ..hashtab import HashIndex
from ..ksm_tree import HAS, STABLE, UNSTABLE, RmapItems, StableTree, should_skip
from .effects import (FLAGS, MMFLAGS, PTE, STABLE as STABLE_OF, VMAS, ZERO_KEY, Checksum, Load, Lock, Store, Unlock,
                      ptl)
from .merge import try_to_merge_pages
from .pte import mergeable_ranges

U64 = np.uint64
BATCH = 16384
GID_SHIFT = 32
NODE_MIX = np.int64(-7046029254386353131)   # 0x9E3779B97F4A7C15 as int64: separates per-node trees
COUNTER_NAMES = ("pages_shared", "pages_sharing", "pages_unshared", "pages_scanned", "pages_skipped",
                 "full_scans")


class MMSlot:
    """ksm's mm_slot: one mm known to the scanner and its rmap items."""

    def __init__(self, mm_id: int, mm):
        self.id = mm_id
        self.mm = mm
        self.items = RmapItems()
        self.alive = True
        self.listed = False
        self.node = int(mm.hdr[MMH_NODE])


class Op:
    """One planned merge: kind 'stable' (page -> KSM page d), 'pair' (page + tree page -> new d), 'zero'."""
    __slots__ = ("kind", "slot", "idx", "pfn", "d", "tslot", "tidx", "tpfn", "ok")

    def __init__(self, kind, slot, idx, pfn, d=-1, tslot=None, tidx=-1, tpfn=-1):
        self.kind, self.slot, self.idx, self.pfn, self.d = kind, slot, idx, pfn, d
        self.tslot, self.tidx, self.tpfn = tslot, tidx, tpfn
        self.ok = True


class KsmScan:
    """The scanner's state and steps.  `ft` is the frame table (advisory reads only)."""

    def __init__(self, ft, mode: str, clock, brk=frozenset()):
        self.ft = ft
        self.mode = mode
        self.clock = clock              # seconds, injected (time.monotonic in ksmd, a step count in the checker)
        self.brk = brk
        self.slots: dict[int, MMSlot] = {}
        self.order: list[int] = []      # the mm_slot list, in scan order
        self.pos = 0                    # cursor: index into order
        self.cur: list | None = None    # [ranges, range_no, next_page] inside order[pos]
        self.tree = StableTree()
        self.unstable = HashIndex(1024, value_dtype=np.int64)
        self.c = {k: 0 for k in COUNTER_NAMES}
        self.knobs = dict(DEFAULTS)
        self.scan_start = clock()
        self.last_prune = clock()
        self.merges = 0
        self.merge_failures = 0

    # ------------------------------------------------------------------ helpers
    def tree_keys(self, keys: np.ndarray, node: int) -> np.ndarray:
        if self.knobs["merge_across_nodes"] or node == 0:
            return keys
        return keys ^ (NODE_MIX * np.int64(node))

    def node_alive(self, d: int) -> bool:
        k = int(self.tree.kpfn[d])
        if k < 0:
            return True    # created in this batch, not yet merged
        return bool(self.ft.flags[k] & FRAME_KSM) and int(self.ft.stable[k]) == d

    # ------------------------------------------------------------------ tree removal
    def unlink_unstable(self, slot: MMSlot, idx: np.ndarray) -> None:
        it = slot.items
        m = idx[(it.flags[idx] & UNSTABLE) != 0]
        if len(m):
            it.flags[m] &= ~np.uint8(UNSTABLE)
            self.c["pages_unshared"] -= len(m)

    def unlink_stable(self, slot: MMSlot, idx: np.ndarray) -> None:
        """remove_rmap_item_from_tree for stable items: sharing-- while others remain, else shared--."""
        it = slot.items
        m = idx[(it.flags[idx] & STABLE) != 0]
        if not len(m):
            return
        nodes, k = np.unique(it.sn[m], return_counts=True)
        cnt = self.tree.count[nodes]
        self.c["pages_sharing"] -= int(np.minimum(k, np.maximum(cnt - 1, 0)).sum())
        self.c["pages_shared"] -= int(((k >= cnt) & (cnt > 0)).sum())
        self.tree.count[nodes] = np.maximum(cnt - k, 0)
        it.flags[m] &= ~np.uint8(STABLE)
        it.sn[m] = -1
        slot.items.merging -= len(m)

    def unlink(self, slot: MMSlot, idx: np.ndarray) -> None:
        self.unlink_unstable(slot, idx)
        self.unlink_stable(slot, idx)

    def free_items(self, slot: MMSlot, idx: np.ndarray) -> None:
        """Free rmap items (the cursor passed pages that are no longer candidates)."""
        idx = idx[(slot.items.flags[idx] & HAS) != 0]
        if not len(idx):
            return
        self.unlink(slot, idx)
        slot.items.flags[idx] = 0
        slot.items.nr_items -= len(idx)

    def teardown_stale(self, nodes: list[int]) -> None:
        """A stable node whose KSM page was freed: unlink every item on it, drop the node."""
        nodes = np.array(sorted(set(nodes)), dtype=np.int32)
        if not len(nodes):
            return
        for slot in self.slots.values():
            it = slot.items
            if not len(it.flags):
                continue
            m = np.flatnonzero(((it.flags & STABLE) != 0) & np.isin(it.sn, nodes))
            if len(m):
                self.unlink_stable(slot, m)
        for d in nodes.tolist():
            self.tree.release(d)

    def prune(self) -> None:
        """Drop every stable node whose KSM frame is gone (chain_prune, for all chains at once)."""
        live = np.flatnonzero(self.tree.live[:self.tree.top])
        if not len(live):
            return
        k = self.tree.kpfn[live]
        ok = (k < 0) | (((self.ft.flags[np.maximum(k, 0)] & FRAME_KSM) != 0) &
                        (self.ft.stable[np.maximum(k, 0)] == live))
        if (~ok).any():
            self.teardown_stale(live[~ok].tolist())
        for key in np.unique(self.tree.key[live[ok]]).tolist():
            self.tree.collapse_if_single(key)

    # ------------------------------------------------------------------ the mm_slot list and the cursor
    def add_mm(self, mm_id: int, mm) -> MMSlot:
        slot = self.slots.get(mm_id)
        if slot is None:
            slot = self.slots[mm_id] = MMSlot(mm_id, mm)
        return slot

    def refresh_slots(self) -> None:
        """ksm_enter: mms that became mergeable join the list just behind the cursor."""
        for slot in self.slots.values():
            if slot.alive and not slot.listed and int(slot.mm.hdr[MMH_FLAGS]) & MMF_VM_MERGEABLE:
                slot.listed = True
                if self.pos == 0 and self.cur is None:
                    self.order.append(slot.id)
                else:
                    self.order.insert(self.pos, slot.id)
                    self.pos += 1

    def ksm_leave(self, slot: MMSlot):
        """The mm has no mergeable area left: clear its MMF_VM_MERGEABLE under its ptl, where the VM
        sets it (mmap, madvise, prctl), after looking again: a VMA made mergeable since the cursor
        read the list keeps the mm listed.  True if the slot left the list."""
        yield Lock(ptl(slot.id))
        try:
            if mergeable_ranges((yield Load(VMAS, slot.id))):
                left = False
            else:
                flags = yield Load(MMFLAGS, slot.id)
                yield Store(MMFLAGS, slot.id, None, flags & ~MMF_VM_MERGEABLE)
                left = True
        except GeneratorExit:           # abandoned (a checker run cut short, a kill): nothing to release
            raise
        except BaseException:
            yield Unlock(ptl(slot.id))
            raise
        yield Unlock(ptl(slot.id))
        if left:
            slot.listed = False
        return left

    def next_chunk(self, want: int):
        """The next (slot, page indices) to visit, or None at the end of a full scan."""
        while True:
            if self.pos >= len(self.order):
                return None
            slot = self.slots[self.order[self.pos]]
            if self.cur is None:
                ranges = mergeable_ranges((yield Load(VMAS, slot.id)))
                it = slot.items
                if len(it.flags):      # items outside mergeable areas: freed as the cursor passes
                    keep = np.zeros(len(it.flags), dtype=bool)
                    for a, b in ranges:
                        keep[a:b] = True
                    self.free_items(slot, np.flatnonzero(~keep & ((it.flags & HAS) != 0)))
                if ranges:
                    slot.items.ensure(max(b for _, b in ranges))
                self.cur = [ranges, 0, ranges[0][0] if ranges else 0]
            ranges, r, p = self.cur
            if r >= len(ranges):
                self.cur = None
                self.pos += 1
                if not ranges and (yield from self.ksm_leave(slot)):
                    self.order.remove(slot.id)      # no mergeable area left: the slot leaves the list
                    self.pos -= 1
                continue
            a, b = ranges[r]
            p = max(p, a)
            q = min(b, p + want)
            if q >= b:
                self.cur[1], self.cur[2] = r + 1, b
            else:
                self.cur[2] = q
            if q > p:
                return slot, np.arange(p, q, dtype=np.int64)

    def end_full_scan(self) -> None:
        self.c["full_scans"] += 1
        self.pos = 0
        self.cur = None
        self.unstable.clear()
        now = self.clock()
        if (now - self.last_prune) * 1000 >= self.knobs["stable_node_chains_prune_millisecs"]:
            self.prune()
            self.last_prune = now
        self.advise(now - self.scan_start)
        self.scan_start = now

    def advise(self, seconds: float) -> None:
        """The scan-time advisor: scale pages_to_scan so a full scan takes advisor_target_scan_time."""
        if self.knobs["advisor_mode"] != 1:
            return
        target = self.knobs["advisor_target_scan_time"]
        pts = self.knobs["pages_to_scan"]
        factor = max(1e-3, seconds) / target
        self.knobs["pages_to_scan"] = int(min(max(pts * factor, self.knobs["advisor_min_pages_to_scan"]),
                                              self.knobs["advisor_max_pages_to_scan"]))

    # ------------------------------------------------------------------ one batch
    def ksm_do_scan(self, budget: int):
        """Visit up to `budget` candidate pages, merge what matched; returns (pages scanned, ops, full scan ended)."""
        self.refresh_slots()
        if not self.order:
            return 0, 0, False
        if self.pos == 0 and self.cur is None:
            self.unstable.clear()           # a new full scan starts with an empty unstable tree
        scanned = 0
        plan_in: list = []
        ended = False
        while scanned < budget:
            chunk = yield from self.next_chunk(max(256, budget - scanned))
            if chunk is None:
                ended = True
                break
            scanned += yield from self.visit(*chunk, plan_in)
        ops = yield from self.plan(plan_in)
        if ops:
            yield from try_to_merge_pages(self, ops)
            self.commit(ops)
        if self.tree.stale:
            stale, self.tree.stale = self.tree.stale, []
            self.teardown_stale(stale)
        if ended:
            self.end_full_scan()
        return scanned, len(ops), ended

    def visit(self, slot: MMSlot, idx: np.ndarray, plan_in: list):
        """scan_get_next_rmap_item + the first steps of cmp_and_merge_page, vectorized."""
        it = slot.items
        pte = yield Load(PTE, slot.id, idx)
        pfn = (pte >> U64(PAGE_SHIFT)).astype(np.int64)
        fl = yield Load(FLAGS, None, pfn)
        cand = (((pte & U64(PTE_PRESENT)) != 0) & ((pte & U64(PTE_SPECIAL)) == 0) & (pfn != ZERO_PFN)
                & ((fl & (FRAME_ANON | FRAME_KSM)) != 0))
        self.free_items(slot, idx[~cand])
        idx, pfn, fl = idx[cand], pfn[cand], fl[cand]
        if not len(idx):
            return 0
        it.new_items(idx)
        ksm = (fl & FRAME_KSM) != 0
        if ksm.any():
            ki, kp = idx[ksm], pfn[ksm]
            owner = self.ft.stable[kp]
            mine = ((it.flags[ki] & STABLE) != 0) & (it.sn[ki] == owner)
            # a KSM page whose item is not on its node (e.g. after a node teardown): append it
            for i, d in zip(ki[~mine].tolist(), owner[~mine].tolist()):
                self.unlink(slot, np.array([i]))
                if 0 <= d < self.tree.top and self.tree.live[d] and self.node_alive(d):
                    self.c["pages_sharing" if self.tree.count[d] else "pages_shared"] += 1
                    self.tree.count[d] += 1
                    self.stable_tree_append(slot, np.array([i]), d)
        idx, pfn = idx[~ksm], pfn[~ksm]
        nscan = int(ksm.sum())
        if len(idx) and self.knobs["smart_scan"]:
            skip = should_skip(it, idx)
            if skip.any():
                self.c["pages_skipped"] += int(skip.sum())
                self.unlink(slot, idx[skip])
                idx, pfn = idx[~skip], pfn[~skip]
        nscan += len(idx)
        self.c["pages_scanned"] += nscan
        if not len(idx):
            return nscan
        self.unlink(slot, idx)
        keys = yield Checksum(pfn)
        changed = keys != it.cs[idx]
        it.cs[idx] = keys
        keep = ~changed
        if keep.any():
            plan_in.append((slot, idx[keep], pfn[keep], keys[keep]))
        return nscan

    def stable_tree_append(self, slot: MMSlot, idx: np.ndarray, d: int) -> None:
        """stable_tree_append (count already includes them when planned)."""
        it = slot.items
        it.flags[idx] |= np.uint8(STABLE)
        it.sn[idx] = d
        it.merging += len(idx)

    def plan(self, plan_in: list):
        """cmp_and_merge_page's decisions for each unchanged page, in the kernel's page-by-page order."""
        ops: list[Op] = []
        use_zero = self.knobs["use_zero_pages"]
        maxs = self.knobs["max_page_sharing"]
        tree, unstable = self.tree, self.unstable
        filling: dict[int, int] = {}
        ulocal: dict[int, int] = {}     # unstable-tree changes made by this plan, not yet applied
        for slot, idx, pfn, keys in plan_in:
            if use_zero:
                z = keys == ZERO_KEY
                for i, p in zip(idx[z].tolist(), pfn[z].tolist()):
                    ops.append(Op("zero", slot, i, p))
                idx, pfn, keys = idx[~z], pfn[~z], keys[~z]
            if not len(idx):
                continue
            tkeys = self.tree_keys(keys, slot.node)
            gids = (np.int64(slot.id) << GID_SHIFT) | idx
            heads = tree.index.lookup(tkeys)
            uhits = unstable.lookup(tkeys)
            _, inv, cnt = np.unique(tkeys, return_inverse=True, return_counts=True)
            busy = (heads >= 0) | (uhits >= 0) | (cnt[inv] > 1)
            if ulocal:
                busy |= np.isin(tkeys, np.fromiter(ulocal, dtype=np.int64, count=len(ulocal)))
            simple = ~busy
            if simple.any():    # the common case: a unique page, inserted in the unstable tree
                unstable.insert(tkeys[simple], gids[simple])
                slot.items.flags[idx[simple]] |= np.uint8(UNSTABLE)
                self.c["pages_unshared"] += int(simple.sum())
            bj = np.flatnonzero(busy)
            for tk, i, p, hd, uh in zip(tkeys[bj].tolist(), idx[bj].tolist(), pfn[bj].tolist(),
                                        heads[bj].tolist(), uhits[bj].tolist()):
                count, live = tree.count, tree.live       # (re-read: the arrays grow)
                d = filling.get(tk, -1)      # the dup this batch is filling is still the first with room
                if d < 0 or not live[d] or count[d] >= maxs:
                    nstale = len(tree.stale)
                    d = tree.candidate(tk, maxs, self.node_alive, None if tk in filling else hd)
                    if len(tree.stale) != nstale:
                        filling[tk] = -1          # the head moved: look it up afresh next time
                if d >= 0:
                    count[d] += 1
                    filling[tk] = d
                    ops.append(Op("stable", slot, i, p, d))
                    continue
                t = ulocal[tk] if tk in ulocal else uh
                if t >= 0:
                    ts = self.slots.get(t >> GID_SHIFT)
                    ti = t & ((1 << GID_SHIFT) - 1)
                    if ts is not None and ts.alive and (ts.items.flags[ti] & UNSTABLE) and (ts is not slot or ti != i):
                        tpte = yield Load(PTE, ts.id, ti)
                        if tpte & PTE_PRESENT and tpte >> PAGE_SHIFT == p:
                            continue    # the tree page is this very frame (fork): no KSM page for a forked page
                        ulocal[tk] = -1
                        ts.items.flags[ti] &= ~np.uint8(UNSTABLE)
                        self.c["pages_unshared"] -= 1
                        d = tree.insert(tk, None if tk in filling else hd)
                        tree.count[d] = 2
                        filling[tk] = d
                        ops.append(Op("pair", slot, i, p, d, ts, ti, tpte >> PAGE_SHIFT))
                        continue
                ulocal[tk] = (slot.id << GID_SHIFT) | i
                slot.items.flags[i] |= np.uint8(UNSTABLE)
                self.c["pages_unshared"] += 1
        if ulocal:      # the unstable tree changes of the loop above, applied in two batch calls
            k = np.fromiter(ulocal, dtype=np.int64, count=len(ulocal))
            v = np.fromiter(ulocal.values(), dtype=np.int64, count=len(ulocal))
            unstable.delete(k[v < 0])
            unstable.insert(k[v >= 0], v[v >= 0])
        return ops

    def commit(self, ops: list[Op]) -> None:
        """stable_tree_append for every merge that succeeded; undo the plan of those that failed."""
        tree = self.tree
        appends: dict[int, tuple[MMSlot, list, list]] = {}

        def add(slot, i, d):
            a = appends.get(slot.id)
            if a is None:
                a = appends[slot.id] = (slot, [], [])
            a[1].append(i)
            a[2].append(d)

        for op in ops:
            if op.kind == "zero":
                continue
            if op.kind == "pair":
                if op.ok:
                    add(op.tslot, op.tidx, op.d)
                    add(op.slot, op.idx, op.d)
                    self.c["pages_shared"] += 1
                    self.c["pages_sharing"] += 1
                    self.merges += 2
                    continue
                self.merge_failures += 1
                if tree.live[op.d]:
                    tree.release(op.d)
                ts, ti = op.tslot, op.tidx
                if ts.alive and ts.items.flags[ti] & HAS:    # the tree page stays in the unstable tree
                    tk = int(self.tree_keys(np.array([ts.items.cs[ti]]), ts.node)[0])
                    if self.unstable.get(tk) < 0:
                        self.unstable.put(tk, (ts.id << GID_SHIFT) | ti)
                        ts.items.flags[ti] |= np.uint8(UNSTABLE)
                        self.c["pages_unshared"] += 1
            elif op.ok and tree.live[op.d]:
                add(op.slot, op.idx, op.d)
                self.c["pages_sharing"] += 1
                self.merges += 1
            else:
                self.merge_failures += 1
                if tree.live[op.d]:
                    tree.count[op.d] -= 1
        for slot, idx, ds in appends.values():
            if slot.alive:
                self.stable_tree_append(slot, np.array(idx, dtype=np.int64), np.array(ds))

    # ------------------------------------------------------------------ run=2 and mm exit
    def forget_all(self) -> None:
        """After run=2 unmerged every page: no rmap item, empty trees, counters back to 0."""
        for slot in self.slots.values():
            slot.items = RmapItems()
        self.tree.reset()
        self.unstable = HashIndex(1024, value_dtype=np.int64)
        for k in ("pages_shared", "pages_sharing", "pages_unshared", "full_scans"):
            self.c[k] = 0
        self.pos, self.cur = 0, None

    def restore(self):
        """A restarted ksmd: rebuild what the dead one knew of merged pages, from shared memory.

        Every KSM frame a PTE maps is the page of stable node ft.stable[pfn] (node ids are
        kept, so get_ksm_page's check still holds), keyed by its content; every PTE mapping
        it gets an rmap item on that node, and pages_shared / pages_sharing follow from the
        counts.  Unstable-tree state is not kept: those pages need two scans again.  The
        reads are advisory, as the scan's are (a page COWed meanwhile is an item the cursor
        drops); the supervisor has repaired the frame table before.  Returns the KSM pages found.
        """
        frames: dict[int, list] = {}
        for slot in list(self.slots.values()):
            pte = yield Load(PTE, slot.id, None)
            idx = np.flatnonzero(((pte & U64(PTE_PRESENT)) != 0) & ((pte & U64(PTE_SPECIAL)) == 0))
            if not len(idx):
                continue
            pfn = (pte[idx] >> U64(PAGE_SHIFT)).astype(np.int64)
            ksm = ((yield Load(FLAGS, None, pfn)) & FRAME_KSM) != 0
            for i, p in zip(idx[ksm].tolist(), pfn[ksm].tolist()):
                frames.setdefault(p, []).append((slot, i))
        if not frames:
            return 0
        pfns = np.array(sorted(frames), dtype=np.int64)
        keys = yield Checksum(pfns)
        owners = yield Load(STABLE_OF, None, pfns)
        for p, key, d in zip(pfns.tolist(), keys.tolist(), owners.tolist()):
            maps = frames[p]
            if d < 0 or (d < self.tree.top and self.tree.live[d]):
                continue       # no node, or one restored already: the cursor sorts it out
            tk = int(self.tree_keys(np.array([key], dtype=np.int64), maps[0][0].node)[0])
            self.tree.restore(d, tk, p, len(maps))
            self.c["pages_shared"] += 1
            self.c["pages_sharing"] += len(maps) - 1
            per: dict[int, list] = {}
            for slot, i in maps:
                per.setdefault(slot.id, []).append(i)
            for sid, lst in per.items():
                slot = self.slots[sid]
                ix = np.array(lst, dtype=np.int64)
                slot.items.ensure(int(ix.max()) + 1)
                slot.items.new_items(ix)
                slot.items.cs[ix] = key
                self.stable_tree_append(slot, ix, d)
        return len(frames)

    def mm_exit(self, mm_id: int) -> MMSlot | None:
        slot = self.slots.pop(mm_id, None)
        if slot is None:
            return None
        slot.alive = False
        it = slot.items
        if len(it.flags):
            self.free_items(slot, np.flatnonzero(it.flags & HAS))
        if slot.id in self.order:
            k = self.order.index(slot.id)
            self.order.remove(slot.id)
            if k < self.pos:
                self.pos -= 1
            elif k == self.pos:
                self.cur = None
        return slot

    # ------------------------------------------------------------------ counters
    def metadata_bytes(self) -> int:
        return sum(s.items.nbytes for s in self.slots.values()) + self.tree.nbytes + self.unstable.nbytes

    def counters(self, zero_pages: int) -> dict:
        """The sysfs counters as ksmd publishes them (ksm_zero_pages is kept by whoever maps them)."""
        c = self.c
        items = sum(s.items.nr_items for s in self.slots.values())
        vals = dict(c)
        vals["ksm_rmap_items"] = items
        vals["pages_volatile"] = max(0, items - c["pages_shared"] - c["pages_sharing"] - c["pages_unshared"])
        vals["stable_node_chains"] = self.tree.chains
        vals["stable_node_dups"] = self.tree.dups
        meta = self.metadata_bytes()
        vals["metadata_bytes"] = meta
        vals["general_profit"] = (c["pages_sharing"] + zero_pages) * PAGE_SIZE - (meta if items else 0)
        return vals
