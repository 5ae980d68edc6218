"""Upkeep of the rmap items and the stable tree (mm/ksm.c's remove_rmap_item_from_tree and
friends): an item leaving its tree, items of pages gone, stale stable nodes torn down, chains
pruned, every item dropped at run=2 (unmerge_and_remove_all_rmap_items), an mm leaving at exit
(ksm_exit), and a restarted scanner rebuilding its shard from shared memory (restore).

A mixin of KsmScan (mm.ksm.scan), which holds the state these methods share.
"""
from __future__ import annotations

import numpy as np

from proto.layout import FRAME_KSM, PAGE_SHIFT, PTE_PRESENT, PTE_SPECIAL

from workers.mm.ksm.hashtab import HashIndex
from workers.mm.ksm.stable_tree import HAS, STABLE, UNSTABLE
from workers.mm.effects import FLAGS, PTE, STABLE as STABLE_OF, Checksum, Load
from workers.mm.ksm.shard import Routed
from workers.mm.ksm.mm_slot import U64, MMSlot


class RmapUpkeep:
    """Rmap item and stable tree upkeep (a KsmScan mixin)."""

    def node_alive(self, d: int) -> bool:
        k = int(self.tree.kpfn[d])
        if k < 0:
            return True    # created in this batch, not yet merged
        return bool(self.ft.flags[k] & FRAME_KSM) and int(self.ft.stable[k]) == self.gid(d)

    # ------------------------------------------------------------------ tree removal
    def remove_rmap_item_from_tree(self, slot: MMSlot, idx: np.ndarray, out: list) -> None:
        """remove_rmap_item_from_tree (visitor side): the items leave their trees; a stable node's
        owner hears of each item that left it (out[owner].unlinks) and fixes the counts."""
        it = slot.items
        fl = it.flags[idx]
        m = idx[(fl & UNSTABLE) != 0]
        if len(m):
            it.flags[m] &= ~np.uint8(UNSTABLE)
            self.c["pages_unshared"] -= len(m)
        m = idx[(fl & STABLE) != 0]
        if len(m):
            g = it.sn[m].astype(np.int64)
            it.flags[m] &= ~np.uint8(STABLE)
            it.sn[m] = -1
            if self.nshards == 1:
                out[0].add("unlinks", g)
            else:
                own = g % self.nshards
                for k in np.unique(own).tolist():
                    out[k].add("unlinks", g[own == k])

    def drop_from_nodes(self, g: np.ndarray) -> None:
        """Owner side of unlink: k items left node d: sharing-- while others remain, else shared--."""
        if not len(g):
            return
        nodes, k = np.unique(self.local(g), return_counts=True)
        cnt = self.tree.count[nodes]
        self.c["pages_sharing"] -= int(np.minimum(k, np.maximum(cnt - 1, 0)).sum())
        self.c["pages_shared"] -= int(((k >= cnt) & (cnt > 0)).sum())
        self.tree.count[nodes] = np.maximum(cnt - k, 0)

    def remove_trailing_rmap_items(self, slot: MMSlot, idx: np.ndarray, out: list) -> None:
        """Free rmap items (the cursor passed pages that are no longer candidates)."""
        idx = idx[(slot.items.flags[idx] & HAS) != 0]
        if not len(idx):
            return
        self.remove_rmap_item_from_tree(slot, idx, out)
        slot.items.flags[idx] = 0

    def teardown_stale(self, nodes: list[int]) -> None:
        """A stable node of this shard whose KSM page was freed: unlink every item on it, drop the node."""
        nodes = np.array(sorted(set(nodes)), dtype=np.int64)
        if not len(nodes):
            return
        gs = self.gid(nodes)
        for slot in self.slots.values():
            it = slot.items
            if not len(it.flags):
                continue
            m = np.flatnonzero(((it.flags & STABLE) != 0) & np.isin(it.sn, gs))
            if len(m):
                g = it.sn[m].astype(np.int64)
                it.flags[m] &= ~np.uint8(STABLE)
                it.sn[m] = -1
                self.drop_from_nodes(g)
        for d in nodes.tolist():
            self.tree.release(d)

    def prune(self) -> None:
        """Drop every stable node whose KSM frame is gone (chain_prune, for all chains at once)."""
        live = np.flatnonzero(self.tree.live[:self.tree.top])
        if not len(live):
            return
        k = self.tree.kpfn[live]
        ok = (k < 0) | (((self.ft.flags[np.maximum(k, 0)] & FRAME_KSM) != 0) &
                        (self.ft.stable[np.maximum(k, 0)] == self.gid(live)))
        if (~ok).any():
            self.teardown_stale(live[~ok].tolist())
        dups = live[ok][self.tree.chain[live[ok]] != 0]       # chains left with one dup collapse
        keys, n = np.unique(self.tree.key[dups], return_counts=True)
        for key in keys[n == 1].tolist():
            self.tree.collapse_if_single(key)

    # ------------------------------------------------------------------ run=2 and mm exit
    def _forget_own(self) -> None:
        self.tree.reset()
        self.unstable = HashIndex(1024, value_dtype=np.int64)
        for k in ("pages_shared", "pages_sharing", "pages_unshared", "full_scans"):
            self.c[k] = 0

    def unmerge_and_remove_all_rmap_items(self):
        """The leader, after run=2 unmerged every page: no rmap item, empty trees, counters back to 0."""
        for slot in self.slots.values():
            slot.items.reset()
        self.pos, self.cur = 0, None
        yield from self.control("unmerge_and_remove_all_rmap_items")
        for r in self.reports.values():
            r.update({k: 0 for k in ("pages_shared", "pages_sharing", "pages_unshared")})

    def restore(self):
        """A restarted scanner: rebuild what the dead one knew of merged pages, from shared memory.

        Every KSM frame a PTE maps is the page of stable node ft.stable[pfn] (node ids are
        kept, so get_ksm_page's check still holds), keyed by its content; every PTE mapping
        it gets an rmap item on that node, and pages_shared / pages_sharing follow from the
        counts.  With several scanners each restores the nodes of its own shard (global id
        modulo nshards), into rmap items the supervisor wiped before the restart.  Unstable-tree
        state is not kept: those pages need two scans again.  The reads are advisory, as the
        scan's are (a page COWed meanwhile is an item the cursor drops); the supervisor has
        repaired the frame table before.  Returns the KSM pages found.
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
        found = 0
        for p, key, g in zip(pfns.tolist(), keys.tolist(), owners.tolist()):
            if g < 0 or g % self.nshards != self.shard:
                continue       # no node, or another scanner's
            d = self.local(g)
            maps = frames[p]
            if d < self.tree.top and self.tree.live[d]:
                continue       # one restored already: the cursor sorts it out
            tk = int(self.tree_keys(np.array([key], dtype=np.int64), self.part(maps[0][0]))[0])
            self.tree.restore(d, tk, p, len(maps))
            found += 1
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
                self.stable_tree_append(slot, ix, g)
        return found

    def ksm_exit(self, mm_id: int):
        """The leader: an mm exits; its items leave the trees (their owners fix the counts)."""
        slot = self.slots.get(mm_id)
        if slot is None:
            return None
        out = [Routed() for _ in range(self.nshards)]
        it = slot.items
        if len(it.flags):
            self.remove_trailing_rmap_items(slot, np.flatnonzero(it.flags & HAS), out)
        if slot.id in self.order:
            k = self.order.index(slot.id)
            self.order.remove(slot.id)
            if k < self.pos:
                self.pos -= 1
            elif k == self.pos:
                self.cur = None
        yield from self.control("mm_exit", mm_id, [r.seal().unlinks for r in out])
        return slot
