"""ksmd: the scanner process.  It finds identical pages in mergeable areas and merges them.

Like mm/ksm.c, ksmd walks every mm that has MADV_MERGEABLE areas, page by page,
`pages_to_scan` pages per wake-up, sleeping `sleep_millisecs` in between.  For
each present anonymous page (cmp_and_merge_page):

  1. a page already merged into its KSM page: nothing to do;
  2. smart_scan may skip pages that keep failing to merge;
  3. the page leaves whatever tree it was in; its checksum (mmh3) is taken: if
     it changed since the previous visit the page is volatile and left alone;
  4. a zero page is merged with the zero page when use_zero_pages is set;
  5. a page equal to a KSM page in the stable tree is merged into it (a dup with
     room, max_page_sharing);
  6. otherwise it is looked up in the unstable tree: a match makes both pages one
     new KSM page (a stable node); no match inserts it.

The unstable tree is emptied at the start of every full scan.  Both trees are
hash-indexed (ksm_tree.py).  Work is done in batches: the decisions for a
batch follow the kernel's page-by-page order, then the merges run as

    trylock ptl  ->  write_protect_page (+ notify, wait for acks)
                 ->  compare bytes  ->  replace_page (+ notify)  ->  unlock

with one notifier message per mm and step, carrying every page of the batch.
Protect first, compare second: a write racing the merge either lands before
the write-protect (and the compare fails) or faults afterwards (COW).
"""
from __future__ import annotations

import asyncio
import bisect
import errno
import logging
import socket
import time

import mmh3
import numpy as np

from proto.channel import Channel, abstract_listener
from proto.knobs import BUSY_WHEN_MERGED, DEFAULTS, check_knob
from proto.layout import (COUNTERS, FRAME_ANON, FRAME_KSM, KNOBS, MM_STATS, MMF_VM_MERGEABLE, MMH_FLAGS,
                          MMH_NODE, PAGE_SHIFT, PAGE_SIZE, PTE_DIRTY, PTE_PRESENT, PTE_SPECIAL, PTE_WRITE,
                          PTE_YOUNG, USER_BASE, VM_MERGEABLE, ZERO_PFN)
from proto.messages import Frame, Msg, call_payload, encode
from proto.trace import Tracer

from .actor import RunMemory, actor_args, run_actor, setup
from .faultd import copy_pages, lock_ptl
from .frames import OutOfFrames, ksm_zero_pages_add
from .hashtab import HashIndex
from .ksm_tree import HAS, STABLE, UNSTABLE, RmapItems, StableTree, should_skip
from .notifier import MMUNotifier

log = logging.getLogger("ksm_proto.ksmd")
U64 = np.uint64
BATCH = 16384
GID_SHIFT = 32
NODE_MIX = np.int64(-7046029254386353131)   # 0x9E3779B97F4A7C15 as int64: separates per-node trees
from .pagehash import ZERO_KEY, _digest  # noqa: E402 - the page digest, shared with the estimate


class MMSlot:
    """ksm's mm_slot: one mm known to ksmd, its rmap items and its notifier."""

    def __init__(self, mm_id: int, mm, ptl):
        self.id = mm_id
        self.mm = mm
        self.ptl = ptl
        self.items = RmapItems()
        self.notifier: MMUNotifier | None = None
        self.alive = True
        self.listed = False
        self.node = int(mm.hdr[MMH_NODE])

    def mergeable_ranges(self) -> list[tuple[int, int]]:
        out = []
        for s, e, f in self.mm.vma_list():
            if f & VM_MERGEABLE:
                out.append(((s - USER_BASE) >> PAGE_SHIFT, (e - USER_BASE) >> PAGE_SHIFT))
        return out


class Op:
    """One planned merge: kind 'stable' (page -> KSM page d), 'pair' (page + tree page -> new d), 'zero'."""
    __slots__ = ("kind", "slot", "idx", "pfn", "d", "tslot", "tidx", "tpfn", "ok")

    def __init__(self, kind, slot, idx, pfn, d=-1, tslot=None, tidx=-1, tpfn=-1):
        self.kind, self.slot, self.idx, self.pfn, self.d = kind, slot, idx, pfn, d
        self.tslot, self.tidx, self.tpfn = tslot, tidx, tpfn
        self.ok = True


class Ksmd:
    name = "ksmd"

    def __init__(self, args):
        self.args = args
        self.mem = RunMemory(args.run)
        self.ft = self.mem.ft
        self.stats = self.mem.stats
        self.alloc = self.mem.alloc
        self.memory = memoryview(self.mem.mem)
        self.tr = Tracer.open(args.trace, self.name)
        self.mode = args.mode
        self.slots: dict[int, MMSlot] = {}
        self.order: list[int] = []          # the mm_slot list, in scan order
        self.pos = 0                        # cursor: index into order
        self.cur: list | None = None        # [ranges, range_no, next_page] inside order[pos]
        self.tree = StableTree()
        self.unstable = HashIndex(1024, value_dtype=np.int64)
        self.c = {k: 0 for k in ("pages_shared", "pages_sharing", "pages_unshared", "pages_scanned",
                                 "pages_skipped", "full_scans")}
        self.knobs = dict(DEFAULTS)
        self.wake = asyncio.Event()
        self.batch_lock = asyncio.Lock()
        self.scan_start = time.monotonic()
        self.last_prune = time.monotonic()
        self.merges = 0
        self.merge_failures = 0
        self.scan_errors = 0

    # ------------------------------------------------------------------ helpers
    def page_bytes(self, pfn: int) -> bytes:
        """A page's bytes (memcmp of two bytes objects is ~8x faster than comparing memoryviews)."""
        o = int(pfn) * PAGE_SIZE
        return self.memory[o:o + PAGE_SIZE].tobytes()

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

    # ------------------------------------------------------------------ the scan cursor
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

    def next_chunk(self, want: int):
        """The next (slot, page indices) to visit, or None at the end of a full scan."""
        while True:
            if self.pos >= len(self.order):
                return None
            slot = self.slots[self.order[self.pos]]
            if self.cur is None:
                ranges = slot.mergeable_ranges()
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
                if not ranges:        # no mergeable area left: the slot leaves the list
                    slot.listed = False
                    slot.mm.hdr[MMH_FLAGS] &= ~MMF_VM_MERGEABLE
                    self.order.remove(slot.id)
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
        now = time.monotonic()
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
        new = int(min(max(pts * factor, self.knobs["advisor_min_pages_to_scan"]),
                      self.knobs["advisor_max_pages_to_scan"]))
        self.set_knob_value("pages_to_scan", new)

    # ------------------------------------------------------------------ one batch
    async def ksm_do_scan(self, budget: int) -> tuple[int, bool]:
        """Visit up to `budget` candidate pages; returns (pages scanned, full scan ended)."""
        self.refresh_slots()
        if not self.order:
            return 0, False
        if self.pos == 0 and self.cur is None:
            self.unstable.clear()           # a new full scan starts with an empty unstable tree
        t0 = time.monotonic_ns()
        scanned = 0
        plan_in: list = []
        ended = False
        while scanned < budget:
            chunk = self.next_chunk(max(256, budget - scanned))
            if chunk is None:
                ended = True
                break
            scanned += self.visit(*chunk, plan_in)
        ops = self.plan(plan_in)
        if ops:
            await self.execute(ops)
        if self.tree.stale:
            stale, self.tree.stale = self.tree.stale, []
            self.teardown_stale(stale)
        if ended:
            self.end_full_scan()
        self.publish()
        if self.tr:
            self.tr.span("scan_batch", t0, time.monotonic_ns(), pages=scanned, merges=len(ops))
        return scanned, ended

    def visit(self, slot: MMSlot, idx: np.ndarray, plan_in: list) -> int:
        """scan_get_next_rmap_item + the first steps of cmp_and_merge_page, vectorized."""
        it = slot.items
        pte = slot.mm.pte[idx]
        pfn = (pte >> U64(PAGE_SHIFT)).astype(np.int64)
        fl = self.ft.flags[pfn]
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
                    self.append(slot, np.array([i]), d)
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
        mem = self.memory
        keys = np.fromiter((_digest(mem[o:o + PAGE_SIZE])[0] for o in (pfn * PAGE_SIZE).tolist()),
                           dtype=np.int64, count=len(pfn))
        changed = keys != it.cs[idx]
        it.cs[idx] = keys
        keep = ~changed
        if keep.any():
            plan_in.append((slot, idx[keep], pfn[keep], keys[keep]))
        return nscan

    def append(self, slot: MMSlot, idx: np.ndarray, d: int) -> None:
        """stable_tree_append (count already includes them when planned)."""
        it = slot.items
        it.flags[idx] |= np.uint8(STABLE)
        it.sn[idx] = d
        it.merging += len(idx)

    def plan(self, plan_in: list) -> list[Op]:
        """Decide each unchanged page's fate in the kernel's page-by-page order."""
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
                    ulocal[tk] = -1
                    ts = self.slots.get(t >> GID_SHIFT)
                    ti = t & ((1 << GID_SHIFT) - 1)
                    if ts is not None and ts.alive and (ts.items.flags[ti] & UNSTABLE) and (ts is not slot or ti != i):
                        tpte = int(ts.mm.pte[ti])
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

    # ------------------------------------------------------------------ merging
    async def execute(self, ops: list[Op]) -> None:
        t0 = time.monotonic_ns()
        involved: dict[int, MMSlot] = {}
        for op in ops:
            involved[op.slot.id] = op.slot
            if op.tslot is not None:
                involved[op.tslot.id] = op.tslot
        locked: list[MMSlot] = []
        for slot in involved.values():
            if slot.alive and slot.ptl.try_acquire():     # ksmd only tries the lock, as in the kernel
                locked.append(slot)
        held = {s.id: self.range_table(s) for s in locked}
        # stable node -> its KSM frame is referenced by us (None: a node this batch creates from
        # a pair; its frame is the pair's own page, held by that page's PTE under our ptl)
        pinned: dict[int, bool | None] = {}
        for op in ops:
            if op.kind == "stable" and op.d not in pinned:
                k = int(self.tree.kpfn[op.d])
                pinned[op.d] = None if k < 0 else self.alloc.pin_ksm(k, op.d)
        try:
            pages: dict[int, set] = {s.id: set() for s in locked}
            for op in ops:
                op.ok = self.validate(op, held) and (op.kind != "stable" or pinned[op.d] is not False)
                if op.ok:
                    pages[op.slot.id].add(op.idx)
                    if op.tslot is not None:
                        pages[op.tslot.id].add(op.tidx)
            await asyncio.gather(*(self.write_protect_page(self.slots[s], sorted(p)) for s, p in pages.items() if p))
            self.compare(ops)
            await self.replace_pages(ops)
        finally:
            for s in locked:
                s.ptl.release()
            held_refs = [d for d, ok in pinned.items() if ok]   # (pending nodes took no reference)
            if held_refs:
                self.alloc.put(self.tree.kpfn[np.array(held_refs)].astype(np.int64))
        self.commit(ops)
        if self.tr:
            self.tr.span("merge", t0, time.monotonic_ns(), ops=len(ops), ok=sum(o.ok for o in ops))

    @staticmethod
    def range_table(slot: MMSlot) -> tuple[list[int], list[int]]:
        r = slot.mergeable_ranges()
        return [a for a, _ in r], [b for _, b in r]

    def validate(self, op: Op, held: dict) -> bool:
        """Under ptl: the PTE still maps the frame we checksummed, in a mergeable area."""
        for slot, i, p in ((op.slot, op.idx, op.pfn), (op.tslot, op.tidx, op.tpfn)):
            if slot is None:
                continue
            if slot.id not in held or not slot.alive:
                return False
            pte = int(slot.mm.pte[i])
            if not pte & PTE_PRESENT or pte & PTE_SPECIAL or (pte >> PAGE_SHIFT) != p:
                return False
            if not self.ft.flags[p] & FRAME_ANON or self.ft.flags[p] & FRAME_KSM:
                return False
            starts, ends = held[slot.id]
            k = bisect.bisect_right(starts, i) - 1
            if k < 0 or i >= ends[k]:
                return False
        return True

    async def write_protect_page(self, slot: MMSlot, idx: list[int]) -> None:
        """Clear WRITE (and DIRTY) and make every secondary MMU drop its writable translation."""
        idx = np.array(idx, dtype=np.int64)
        pte = slot.mm.pte[idx]
        dirty = (pte & U64(PTE_WRITE | PTE_DIRTY)) != 0
        if not dirty.any():
            return
        idx, pte = idx[dirty], pte[dirty]
        await self.notify(slot, idx, pte & ~U64(PTE_WRITE | PTE_DIRTY))

    async def notify(self, slot: MMSlot, idx: np.ndarray, new: np.ndarray) -> None:
        addrs = (USER_BASE + (idx << PAGE_SHIFT)).astype(U64)
        if slot.notifier is None:
            slot.mm.pte[idx] = new
        else:
            await slot.notifier.set_ptes_notify(idx, new, addrs)

    def compare(self, ops: list[Op]) -> None:
        """memcmp after write-protect; a pair's page becomes the KSM page (in place)."""
        tree, ft, page = self.tree, self.ft, self.page_bytes
        zero = bytes(PAGE_SIZE)
        for op in ops:
            if not op.ok:
                continue
            if op.kind == "zero":
                op.ok = page(op.pfn) == zero
            elif op.kind == "pair":
                op.ok = page(op.pfn) == page(op.tpfn)
                if op.ok:
                    ft.flags[op.pfn] = FRAME_KSM
                    ft.stable[op.pfn] = op.d
                    tree.kpfn[op.d] = op.pfn
            else:
                k = int(tree.kpfn[op.d])
                op.ok = k >= 0 and bool(tree.live[op.d]) and page(op.pfn) == page(k)

    async def replace_pages(self, ops: list[Op]) -> None:
        """replace_page: point each PTE at its KSM page (or the zero page), notify, free old frames."""
        per: dict[int, list] = {}
        for op in ops:
            if not op.ok:
                continue
            if op.kind == "zero":
                per.setdefault(op.slot.id, []).append((op.idx, op.pfn, -1))
            elif op.kind == "pair":
                per.setdefault(op.tslot.id, []).append((op.tidx, op.tpfn, op.pfn))
            else:
                per.setdefault(op.slot.id, []).append((op.idx, op.pfn, int(self.tree.kpfn[op.d])))
        jobs = []
        for sid, lst in per.items():
            a = np.array(lst, dtype=np.int64)
            idx, old, kp = a[:, 0], a[:, 1], a[:, 2]
            zero = kp < 0
            new = np.where(zero, (ZERO_PFN << PAGE_SHIFT) | PTE_PRESENT | PTE_SPECIAL | PTE_DIRTY | PTE_YOUNG,
                           (kp << PAGE_SHIFT) | PTE_PRESENT | PTE_YOUNG).astype(U64)
            self.alloc.get(kp[~zero])
            jobs.append((self.slots[sid], idx, old, new, int(zero.sum())))
        await asyncio.gather(*(self.notify(s, idx, new) for s, idx, _, new, _ in jobs))
        for s, _, old, _, nz in jobs:
            self.alloc.put(old)
            ksm_zero_pages_add(self.mem.frame_lock, self.stats, s.id, nz)

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
                it = slot.items
                idx = np.array(idx, dtype=np.int64)
                it.flags[idx] |= np.uint8(STABLE)
                it.sn[idx] = ds
                it.merging += len(idx)

    # ------------------------------------------------------------------ unmerge (run = 2), mm exit
    async def unmerge_all(self) -> None:
        """run=2: every KSM page and KSM zero page becomes a private copy; all rmap items go."""
        for slot in list(self.slots.values()):
            if not slot.alive:
                continue
            await lock_ptl(slot.ptl, self.args.ack_timeout * 2)
            try:
                pte = slot.mm.pte
                pfn = (pte >> U64(PAGE_SHIFT)).astype(np.int64)
                present = (pte & U64(PTE_PRESENT)) != 0
                special = present & ((pte & U64(PTE_SPECIAL)) != 0)
                ksm = present & ((self.ft.flags[pfn] & FRAME_KSM) != 0)
                idx = np.flatnonzero(ksm | special)
                for k in range(0, len(idx), 4096):
                    part = idx[k:k + 4096]
                    await copy_pages(self.mem, slot.notifier, slot.mm, part, pfn[part], special[part], False)
            finally:
                slot.ptl.release()
        for slot in self.slots.values():
            slot.items = RmapItems()
        self.tree.reset()
        self.unstable = HashIndex(1024, value_dtype=np.int64)
        for k in ("pages_shared", "pages_sharing", "pages_unshared", "full_scans"):
            self.c[k] = 0
        self.pos, self.cur = 0, None
        self.publish()

    def mm_exit(self, mm_id: int) -> None:
        slot = self.slots.pop(mm_id, None)
        if slot is None:
            return
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
        slot.ptl.close()
        self.publish()

    # ------------------------------------------------------------------ counters and knobs
    def metadata_bytes(self) -> int:
        return (sum(s.items.nbytes for s in self.slots.values()) + self.tree.nbytes + self.unstable.nbytes)

    def publish(self) -> None:
        c = self.c
        items = sum(s.items.nr_items for s in self.slots.values())
        zero_i = COUNTERS.index("ksm_zero_pages")
        vals = dict(c)
        vals["ksm_rmap_items"] = items
        vals["pages_volatile"] = max(0, items - c["pages_shared"] - c["pages_sharing"] - c["pages_unshared"])
        vals["stable_node_chains"] = self.tree.chains
        vals["stable_node_dups"] = self.tree.dups
        meta = self.metadata_bytes()
        vals["metadata_bytes"] = meta
        zero = int(self.stats.counters[zero_i])
        vals["general_profit"] = (c["pages_sharing"] + zero) * PAGE_SIZE - (meta if items else 0)
        for k, v in vals.items():
            self.stats.counters[COUNTERS.index(k)] = v
        ri, mi = MM_STATS.index("ksm_rmap_items"), MM_STATS.index("ksm_merging_pages")
        for s in self.slots.values():
            self.stats.mm[s.id, ri] = s.items.nr_items
            self.stats.mm[s.id, mi] = s.items.merging
        if self.tr:
            self.tr.counter("pages_shared", c["pages_shared"])
            self.tr.counter("pages_sharing", c["pages_sharing"])
            self.tr.counter("free_frames", self.alloc.nr_free)

    def set_knob_value(self, name: str, v: int) -> None:
        self.knobs[name] = v
        self.stats.knobs[KNOBS.index(name)] = v

    async def set_knobs(self, knobs: dict) -> None:
        for name, value in knobs.items():
            v = check_knob(name, value)
            if name in BUSY_WHEN_MERGED and v != self.knobs[name]:
                self.prune()
                if self.c["pages_shared"]:
                    raise OSError(errno.EBUSY, f"knob {name} cannot change while {self.c['pages_shared']} "
                                  f"KSM pages are shared (write run=2 first): EBUSY")
                self.tree.reset()
            if name == "pages_to_scan" and self.knobs["advisor_mode"] != 0:
                raise OSError(errno.EINVAL, "pages_to_scan is set by the advisor while advisor_mode is scan-time: EINVAL")
            if name == "advisor_mode" and v != self.knobs[name]:
                self.set_knob_value("pages_to_scan", 100 if v == 0 else self.knobs["advisor_min_pages_to_scan"])
            if name == "run" and v == 2 and self.knobs["run"] != 2:
                self.set_knob_value("run", 2)
                try:
                    await self.unmerge_all()
                except (OutOfFrames, TimeoutError) as e:
                    self.set_knob_value("run", 0)
                    raise OSError(errno.ENOMEM, f"run=2 could not unmerge everything: {e}") from None
            self.set_knob_value(name, v)
        self.wake.set()

    # ------------------------------------------------------------------ channels and main loop
    def on_vm_frame(self, ch: Channel, f: Frame) -> None:
        if f.type != Msg.HELLO:
            log.error("ksmd: unexpected %s on a vm channel", Msg(f.type).name)
            return
        slot = self.slots.get(f.mm)
        if slot is None:
            mm, ptl = self.mem.attach_mm(f.mm)
            slot = self.slots[f.mm] = MMSlot(f.mm, mm, ptl)
        peer = f.json().get("name", f"vm:{f.mm}") if f.payload else f"vm:{f.mm}"
        slot.notifier = MMUNotifier(self.name, peer, slot.mm, ch, self.mode, self.tr, self.args.ack_timeout)
        ch.peer = f.mm

    async def on_ctl(self, ch: Channel, f: Frame) -> None:
        reply: dict = {}
        try:
            req = f.json()
            op = req.get("op")
            async with self.batch_lock:
                if op == "set_knobs":
                    await self.set_knobs(req["knobs"])
                elif op == "mm_exit":
                    self.mm_exit(int(req["mm"]))
                elif op == "info":
                    reply = {"metadata_bytes": self.metadata_bytes(), "merges": self.merges,
                             "merge_failures": self.merge_failures, "scan_errors": self.scan_errors, "slots": len(self.slots),
                             "tree_bytes": self.tree.nbytes, "unstable_bytes": self.unstable.nbytes,
                             "rmap_bytes": sum(s.items.nbytes for s in self.slots.values())}
                elif op == "ping":
                    pass
                else:
                    raise OSError(errno.EINVAL, f"unknown ksmd op {op!r}")
        except OSError as e:
            reply = {"errno": e.errno or errno.EINVAL, "error": e.strerror or str(e)}
        except (KeyError, ValueError, TypeError) as e:
            reply = {"errno": errno.EINVAL, "error": f"bad request: {e!r}"}
        ch.send(encode(Msg.REPLY, corr=f.corr, payload=call_payload(reply)))

    async def scan_loop(self) -> None:
        while True:
            if self.knobs["run"] != 1:
                await self.sleep(0.5)
                continue
            budget = self.knobs["pages_to_scan"]
            while budget > 0 and self.knobs["run"] == 1:
                try:
                    async with self.batch_lock:
                        n, ended = await self.ksm_do_scan(min(budget, BATCH))
                except Exception:      # a bug must not stop ksmd silently: log it, go on scanning
                    log.exception("ksmd: scan batch failed")
                    self.scan_errors += 1
                    break
                budget -= n
                if ended or n == 0:
                    break
                await asyncio.sleep(0)
            await self.sleep(self.knobs["sleep_millisecs"] / 1000 if self.order else 0.05)

    async def sleep(self, seconds: float) -> None:
        """Sleep, or less if a knob was written (during the sleep or the batch before it)."""
        try:
            await asyncio.wait_for(self.wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        self.wake.clear()

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        server = await loop.create_unix_server(lambda: Channel("ksmd<-vm", self.on_vm_frame),
                                               sock=abstract_listener(f"{self.args.run}.ksmd"))
        ctl_sock = socket.socket(fileno=self.args.ctl_fd)
        _, ctl = await loop.create_connection(
            lambda: Channel("ksmd<-ctl", lambda ch, f: loop.create_task(self.on_ctl(ch, f)),
                            lambda ch: done.done() or done.set_result(None)), sock=ctl_sock)
        self.publish()
        ctl.send(encode(Msg.REPLY, corr=0, payload=call_payload({"ready": True})))
        scanner = loop.create_task(self.scan_loop())
        await done
        scanner.cancel()
        server.close()
        if self.tr:
            self.tr.close()


def main() -> None:
    setup("ksmd")
    args = actor_args()
    run_actor("ksmd", Ksmd(args).main)


if __name__ == "__main__":
    main()
