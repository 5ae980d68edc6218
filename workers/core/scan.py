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

Side-channel defences (the `mitigation` knob, docs/security.md): "domain" keys both trees by
the mm's security domain too (MMH_DOMAIN, as merge_across_nodes=0 keys them by NUMA node), so
pages of VMs of different domains never meet; "zero" makes only zero-filled pages candidates;
"vusion" treats every candidate the batch did not merge as a merged one (`fake_merge`, after
the merges: write-protected, moved to a random frame), so a write to it faults and copies as a
write to a merged page does (core.fault).

The unstable tree is emptied at the start of every full scan.  Both trees are
hash-indexed (ksm_tree.py).  Work is done in batches: `visit` takes each page's
first steps, `plan` takes the decisions for a batch in the kernel's page-by-page
order (vectorized for contents whose decisions are plain: one new pair, or pages
joining a node with room; page by page for the rest), then `core.merge` runs them
(try_to_merge_one_page: trylock, write_protect_page, memcmp, replace_page) and
`commit` does stable_tree_append for the merges that succeeded.

With several scanners (core/shard.py) each KsmScan owns one shard of the trees;
scanner 0 also owns the cursor.  A batch is a *round*: the leader cuts it, every
scanner visits its part and routes pages to the owners of their contents, each
owner plans and merges its shard.  One scanner is the same code with every page
routed to itself.

`ksm_do_scan` is a generator of effects (core/effects.py): the PTEs, frame flags
and page contents it reads are loads the driver (a scanner process, or the
checker) performs.  Frame flags read to tell whether a stable node's KSM page is
still alive (`node_alive`, `prune`) are advisory: get_ksm_page (PinKsm) re-checks
under the frame lock before anything is merged into it.
"""
from __future__ import annotations

import numpy as np

from proto.knobs import DEFAULTS
from proto.knobs import MITIGATIONS
from proto.layout import (FRAME_ANON, FRAME_KSM, MMF_VM_MERGEABLE, MMH_DOMAIN, MMH_FLAGS, MMH_NODE, PAGE_SHIFT,
                          PAGE_SIZE, PTE_PRESENT, PTE_SPECIAL, ZERO_PFN)

from ..hashtab import HashIndex
from ..ksm_tree import HAS, STABLE, UNSTABLE, RmapItems, StableTree, should_skip
from .effects import (FLAGS, MMFLAGS, PTE, STABLE as STABLE_OF, VMAS, ZERO_KEY, Checksum, Load, Lock, ShardRecv,
                      ShardSend, Store, Unlock, ptl)
from .merge import fake_merge, merge_in_groups, try_to_merge_pages
from .pte import mergeable_ranges
from .shard import DONE, GID_SHIFT, LEAD, ROUTED, Ctl, Done, Round, Routed, shard_of

U64 = np.uint64
BATCH = 16384
GID_MASK = (1 << GID_SHIFT) - 1
NODE_MIX = np.int64(-7046029254386353131)   # 0x9E3779B97F4A7C15 as int64: separates per-node trees
COUNTER_NAMES = ("pages_shared", "pages_sharing", "pages_unshared", "pages_scanned", "pages_skipped",
                 "full_scans")
SUMMED = ("pages_shared", "pages_sharing", "pages_unshared", "pages_scanned", "pages_skipped")
STABLE_OP, PAIR_OP, ZERO_OP = 0, 1, 2
VUSION, DOMAIN, ZERO_ONLY = (MITIGATIONS.index(k) for k in ("vusion", "domain", "zero"))


class MMSlot:
    """ksm's mm_slot: one mm known to the scanner and its rmap items."""

    def __init__(self, mm_id: int, mm, items: RmapItems | None = None):
        self.id = mm_id
        self.mm = mm
        self.items = RmapItems() if items is None else items
        self.alive = True
        self.listed = False
        self.node = int(mm.hdr[MMH_NODE])
        self.domain = int(mm.hdr[MMH_DOMAIN])      # security domain (mitigation "domain")


class Ops:
    """The merges a batch plans, one row each: kind (STABLE_OP: page -> KSM page of node d;
    PAIR_OP: page + tree page (tsid, tidx) -> new node d; ZERO_OP), the page (sid, idx, pfn),
    and ok, which the merge clears for those that fail."""
    __slots__ = ("kind", "sid", "idx", "pfn", "d", "tsid", "tidx", "tpfn", "ok")
    FIELDS = ("kind", "sid", "idx", "pfn", "d", "tsid", "tidx", "tpfn")

    def __init__(self, parts: list):
        for k, f in enumerate(self.FIELDS):
            setattr(self, f, np.concatenate([p[k] for p in parts]) if parts else np.empty(0, dtype=np.int64))
        self.ok = np.ones(len(self.kind), dtype=bool)

    def __len__(self) -> int:
        return len(self.kind)

    @staticmethod
    def part(kind, sid, idx, pfn, d=-1, tsid=-1, tidx=-1, tpfn=-1) -> tuple:
        n = len(idx)
        return tuple(np.broadcast_to(np.asarray(v, dtype=np.int64), (n,)).copy()
                     for v in (kind, sid, idx, pfn, d, tsid, tidx, tpfn))

    def select(self, m) -> "Ops":
        o = Ops.__new__(Ops)
        for f in self.FIELDS + ("ok",):
            setattr(o, f, getattr(self, f)[m])
        return o

    def put_back(self, m, sub: "Ops") -> None:
        """Copy the outcome (ok) of a selection back."""
        self.ok[m] = sub.ok


class KsmScan:
    """One scanner's state and steps: shard `shard` of `nshards`; `ft` is the frame table (advisory reads)."""

    def __init__(self, ft, mode: str, clock, brk=frozenset(), shard: int = 0, nshards: int = 1):
        self.ft = ft
        self.mode = mode
        self.clock = clock              # seconds, injected (time.monotonic in ksmd, a step count in the checker)
        self.brk = brk
        self.shard, self.nshards = shard, nshards
        self.leader = shard == 0
        self.others = [k for k in range(nshards) if k != shard]
        self.slots: dict[int, MMSlot] = {}
        self.order: list[int] = []      # the mm_slot list, in scan order (leader)
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
        self.salt = 0                   # mitigation vusion: mixed into where new KSM frames are taken (ksmd: random)
        self.seq = 0                    # round / control sequence (leader)
        self.late = 0                   # (the no-round-barrier break: the round whose DONEs are still out)
        self.reports: dict[int, dict] = {k: {} for k in self.others}   # leader: each follower's last DONE

    # ------------------------------------------------------------------ helpers
    def gid(self, d):
        """Global id of local stable node(s) d: what rmap items and the frame table hold."""
        return d * self.nshards + self.shard

    def local(self, g):
        return g // self.nshards

    def part(self, slot: "MMSlot") -> int:
        """The tree partition of an mm's pages: its NUMA node (merge_across_nodes=0) and its security
        domain (mitigation "domain"); pages of different partitions never merge.  0: the one tree."""
        p = 0 if self.knobs["merge_across_nodes"] else slot.node
        if self.knobs.get("mitigation", 0) == DOMAIN:
            p += (slot.domain + 1) << 8
        return p

    def tree_keys(self, keys: np.ndarray, part: int) -> np.ndarray:
        if part == 0:
            return keys
        mix = (0x9E3779B97F4A7C15 * part) & 0xFFFFFFFFFFFFFFFF      # NODE_MIX * part, wrapped as the arrays wrap
        return keys ^ np.int64(mix - (1 << 64) if mix >> 63 else mix)

    def tree_keys_nodes(self, keys: np.ndarray, parts: np.ndarray) -> np.ndarray:
        if not parts.any():
            return keys
        return np.where(parts == 0, keys, keys ^ (NODE_MIX * parts.astype(np.int64)))

    def node_alive(self, d: int) -> bool:
        k = int(self.tree.kpfn[d])
        if k < 0:
            return True    # created in this batch, not yet merged
        return bool(self.ft.flags[k] & FRAME_KSM) and int(self.ft.stable[k]) == self.gid(d)

    # ------------------------------------------------------------------ tree removal
    def unlink(self, slot: MMSlot, idx: np.ndarray, out: list) -> None:
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

    def free_items(self, slot: MMSlot, idx: np.ndarray, out: list) -> None:
        """Free rmap items (the cursor passed pages that are no longer candidates)."""
        idx = idx[(slot.items.flags[idx] & HAS) != 0]
        if not len(idx):
            return
        self.unlink(slot, idx, out)
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

    # ------------------------------------------------------------------ the mm_slot list and the cursor
    def add_mm(self, mm_id: int, mm, items: RmapItems | None = None) -> MMSlot:
        slot = self.slots.get(mm_id)
        if slot is None:
            slot = self.slots[mm_id] = MMSlot(mm_id, mm, items)
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

    def next_chunk(self, want: int, out: list):
        """The next (slot, first page, end) to visit, or None at the end of a full scan."""
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
                    self.free_items(slot, np.flatnonzero(~keep & ((it.flags & HAS) != 0)), out)
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
                return slot, p, q

    def end_full_scan(self, pruned: bool) -> None:
        """The leader's part of a full scan's end (the owners emptied their unstable trees and pruned)."""
        self.c["full_scans"] += 1
        self.pos = 0
        self.cur = None
        now = self.clock()
        if pruned:
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

    # ------------------------------------------------------------------ one batch (a round)
    def ksm_do_scan(self, budget: int):
        """The leader: visit up to `budget` candidate pages, merge what matched; returns
        (pages scanned, merges planned, full scan ended), every scanner's work summed."""
        self.refresh_slots()
        if not self.order:
            return 0, 0, False
        out = [Routed() for _ in range(self.nshards)]
        new_scan = self.pos == 0 and self.cur is None
        parts, ended = yield from self.take_batch(budget, out)
        prune = ended and (self.clock() - self.last_prune) * 1000 >= self.knobs["stable_node_chains_prune_millisecs"]
        self.seq += 1
        rnd = Round(self.seq, self.knobs, parts, new_scan, ended, prune)
        for k in self.others:
            yield ShardSend(k, LEAD, rnd)
        scanned, nops = yield from self.run_round(rnd, out)
        if "no-round-barrier" in self.brk and self.others:    # (the break: DONEs collected a round late)
            late, self.late = self.late, self.seq
            s, n = (yield from self._collect_now(late)) if late else (0, 0)
        else:
            s, n = yield from self._collect(self.seq)
        scanned, nops = scanned + s, nops + n
        if ended:
            self.end_full_scan(prune)
        return scanned, nops, ended

    def _collect(self, seq: int):
        """Every other scanner's DONE of round (or control request) seq: the barrier."""
        if self.late:           # (the no-round-barrier break's last round first)
            late, self.late = self.late, 0
            yield from self._collect_now(late)
        return (yield from self._collect_now(seq))

    def _collect_now(self, seq: int):
        if not self.others:
            return 0, 0
        scanned = nops = 0
        for k, d in zip(self.others, (yield ShardRecv(DONE, self.others, seq))):
            self.reports[k] = d.report
            scanned, nops = scanned + d.scanned, nops + d.nops
        return scanned, nops

    def take_batch(self, budget: int, out: list):
        """The leader cuts the next batch off the cursor, `budget` candidate pages, and splits it into
        one contiguous part per scanner with about as many candidates each: ([[(mm, a, b)...]...], ended)."""
        chunks, counted, ended = [], 0, False
        while counted < budget:
            chunk = yield from self.next_chunk(max(256, budget - counted), out)
            if chunk is None:
                ended = True
                break
            slot, a, b = chunk
            if self.nshards == 1:
                chunks.append((slot.id, a, b, None))
                counted += b - a      # (an upper bound: visit counts exactly, the caller loops on it)
                continue
            idx = np.arange(a, b, dtype=np.int64)
            pte = yield Load(PTE, slot.id, idx)
            pfn = (pte >> U64(PAGE_SHIFT)).astype(np.int64)
            fl = yield Load(FLAGS, None, pfn)
            cand = candidates(pte, pfn, fl)
            chunks.append((slot.id, a, b, np.cumsum(cand)))
            counted += int(cand.sum())
        parts = [[] for _ in range(self.nshards)]
        if self.nshards == 1:
            parts[0] = [(s, a, b) for s, a, b, _ in chunks]
            return parts, ended
        per = max(1, -(-counted // self.nshards))
        done = 0
        for sid, a, b, cum in chunks:        # page i goes where its candidate's rank falls
            pk = np.minimum(np.maximum(done + cum - 1, 0) // per, self.nshards - 1)
            cut = np.flatnonzero(np.diff(pk)) + 1
            for x, y in zip([0] + cut.tolist(), cut.tolist() + [b - a]):
                parts[int(pk[x])].append((sid, a + x, a + y))
            done += int(cum[-1])
        return parts, ended

    def run_round(self, rnd: Round, out: list):
        """Every scanner's part of a round: visit its pages, route, own: plan, merge, commit."""
        if not self.leader:
            self.knobs.update(rnd.knobs)
        if rnd.new_scan:
            self.unstable.clear()         # a new full scan starts with an empty unstable tree
        scanned = 0
        for sid, a, b in rnd.parts[self.shard]:
            slot = self.slots.get(sid)
            if slot is not None and slot.alive:
                scanned += yield from self.visit(slot, np.arange(a, b, dtype=np.int64), out)
        for r in out:
            r.seq = rnd.seq
            r.seal()
        for k in self.others:
            yield ShardSend(k, ROUTED, out[k])
        got = dict(zip(self.others, (yield ShardRecv(ROUTED, self.others, rnd.seq)))) if self.others else {}
        ins = [out[j] if j == self.shard else got[j] for j in range(self.nshards)]
        nops = yield from self.own(ins)
        if rnd.ended:
            self.unstable.clear()
            if rnd.prune:
                self.prune()
        return scanned, nops

    def own(self, ins: list):
        """The owner's work on what every visitor routed here (in visitor order: the kernel's order)."""
        for r in ins:
            self.drop_from_nodes(r.unlinks)
        for r in ins:
            if len(r.app_gid):
                self.put_back_on_nodes(r.app_gid, r.app_node)
        plan_in = []
        for r in ins:
            if len(r.c_gid):
                plan_in += self.runs(r.c_gid, r.c_pfn, r.c_key)
        ops = yield from self.plan(plan_in)
        if len(ops):
            if self.nshards == 1:
                yield from try_to_merge_pages(self, ops)
            else:
                yield from merge_in_groups(self, ops)
            self.commit(ops)
        if plan_in and self.knobs.get("mitigation", 0) == VUSION:
            yield from fake_merge(self, plan_in, ops)
        if self.tree.stale:
            stale, self.tree.stale = self.tree.stale, []
            self.teardown_stale(stale)
        return len(ops)

    def runs(self, gid, pfn, key) -> list:
        """(slot, idx, pfn, keys) for each run of one mm's pages (dead mms' pages dropped)."""
        sid = gid >> GID_SHIFT
        cut = np.flatnonzero(np.diff(sid)) + 1
        out = []
        for a, b in zip(np.concatenate([[0], cut]).tolist(), np.concatenate([cut, [len(sid)]]).tolist()):
            slot = self.slots.get(int(sid[a]))
            if slot is not None and slot.alive:
                out.append((slot, gid[a:b] & GID_MASK, pfn[a:b], key[a:b]))
        return out

    def put_back_on_nodes(self, gids: np.ndarray, gnodes: np.ndarray) -> None:
        """A KSM page whose item is not on its node (after a node teardown): append it."""
        for gi, g in zip(gids.tolist(), gnodes.tolist()):
            slot = self.slots.get(gi >> GID_SHIFT)
            d = self.local(g)
            if slot is None or not slot.alive or not (0 <= d < self.tree.top and self.tree.live[d]
                                                      and self.node_alive(d)):
                continue
            self.c["pages_sharing" if self.tree.count[d] else "pages_shared"] += 1
            self.tree.count[d] += 1
            self.stable_tree_append(slot, np.array([gi & GID_MASK]), g)

    def visit(self, slot: MMSlot, idx: np.ndarray, out: list):
        """scan_get_next_rmap_item + the first steps of cmp_and_merge_page, vectorized; routes to owners."""
        it = slot.items
        pte = yield Load(PTE, slot.id, idx)
        pfn = (pte >> U64(PAGE_SHIFT)).astype(np.int64)
        fl = yield Load(FLAGS, None, pfn)
        cand = candidates(pte, pfn, fl)
        self.free_items(slot, idx[~cand], out)
        idx, pfn, fl = idx[cand], pfn[cand], fl[cand]
        if not len(idx):
            return 0
        it.new_items(idx)
        ksm = (fl & FRAME_KSM) != 0
        if ksm.any():
            ki, kp = idx[ksm], pfn[ksm]
            owner = self.ft.stable[kp].astype(np.int64)
            mine = ((it.flags[ki] & STABLE) != 0) & (it.sn[ki] == owner)
            if not mine.all():        # a KSM page whose item is not on its node: back on it (its owner)
                ki, owner = ki[~mine], owner[~mine]
                self.unlink(slot, ki, out)
                ok = owner >= 0
                dest = owner % self.nshards
                for k in np.unique(dest[ok]).tolist():
                    m = ok & (dest == k)
                    out[k].add("app_gid", (np.int64(slot.id) << GID_SHIFT) | ki[m])
                    out[k].add("app_node", owner[m])
        idx, pfn = idx[~ksm], pfn[~ksm]
        nscan = int(ksm.sum())
        if len(idx) and self.knobs["smart_scan"]:
            skip = should_skip(it, idx)
            if skip.any():
                self.c["pages_skipped"] += int(skip.sum())
                self.unlink(slot, idx[skip], out)
                idx, pfn = idx[~skip], pfn[~skip]
        nscan += len(idx)
        self.c["pages_scanned"] += nscan
        if not len(idx):
            return nscan
        self.unlink(slot, idx, out)
        keys = yield Checksum(pfn)
        keep = keys == it.cs[idx]          # unchanged since the last visit: not volatile
        it.cs[idx] = keys
        if self.knobs.get("mitigation", 0) == ZERO_ONLY:
            keep &= keys == ZERO_KEY      # (mitigation "zero": only zero-filled pages are candidates)
        if keep.any():
            idx, pfn, keys = idx[keep], pfn[keep], keys[keep]
            gids = (np.int64(slot.id) << GID_SHIFT) | idx
            if self.nshards == 1:
                dest = np.zeros(len(idx), dtype=np.int64)
            elif "no-shard-routing" in self.brk:     # (the break: every visitor plans its own pages)
                dest = np.full(len(idx), self.shard, dtype=np.int64)
            else:
                dest = shard_of(self.tree_keys(keys, self.part(slot)), self.nshards)
                if self.knobs["use_zero_pages"]:
                    dest[keys == ZERO_KEY] = self.shard    # merged with the zero page: no tree, no owner
            for k in np.unique(dest).tolist():
                m = dest == k
                out[k].add("c_gid", gids[m])
                out[k].add("c_pfn", pfn[m])
                out[k].add("c_key", keys[m])
        return nscan

    def stable_tree_append(self, slot: MMSlot, idx: np.ndarray, g) -> None:
        """stable_tree_append (count already includes them when planned); g: global node id(s)."""
        it = slot.items
        it.flags[idx] |= np.uint8(STABLE)
        it.sn[idx] = g

    def plan(self, plan_in: list):
        """cmp_and_merge_page's decisions for each unchanged page, in the kernel's page-by-page order.

        plan_in: [(slot, idx, pfn, keys)] in page order.  Pages of different contents do not
        interact, so the decisions are taken per content: vectorized where they are plain (no
        stable node and room for all: a new pair, then the others join it; a plain stable node
        with room for all: every page joins it), page by page for the rest.  Returns Ops.
        """
        parts: list = []
        if not plan_in:
            return Ops(parts)
        tree, unstable, it_of = self.tree, self.unstable, {s.id: s for s, *_ in plan_in}
        sid = np.concatenate([np.full(len(i), s.id, dtype=np.int64) for s, i, _, _ in plan_in])
        idx = np.concatenate([i for _, i, _, _ in plan_in]).astype(np.int64)
        pfn = np.concatenate([p for _, _, p, _ in plan_in]).astype(np.int64)
        keys = np.concatenate([k for _, _, _, k in plan_in]).astype(np.int64)
        node = np.concatenate([np.full(len(i), self.part(s), dtype=np.int64) for s, i, _, _ in plan_in])
        if self.knobs["use_zero_pages"]:
            z = keys == ZERO_KEY
            if z.any():
                parts.append(Ops.part(ZERO_OP, sid[z], idx[z], pfn[z]))
                sid, idx, pfn, keys, node = sid[~z], idx[~z], pfn[~z], keys[~z], node[~z]
        if not len(sid):
            return Ops(parts)
        maxs = self.knobs["max_page_sharing"]
        tk = self.tree_keys_nodes(keys, node)
        uk, grp, cnt = np.unique(tk, return_inverse=True, return_counts=True)
        grp = grp.reshape(-1)
        order = np.argsort(grp, kind="stable")              # pages grouped by content, page order within
        start = np.zeros(len(uk) + 1, dtype=np.int64)
        np.cumsum(cnt, out=start[1:])
        rank = np.empty(len(tk), dtype=np.int64)
        rank[order] = np.arange(len(tk)) - np.repeat(start[:-1], cnt)
        heads = tree.index.lookup(uk).astype(np.int64)
        uh = unstable.lookup(uk)
        pv = uh >= 0                                         # a partner in the unstable tree, still there
        if pv.any():
            w = np.flatnonzero(pv)
            ps, pi = uh[w] >> GID_SHIFT, uh[w] & GID_MASK
            good = np.zeros(len(w), dtype=bool)
            for s in np.unique(ps).tolist():
                slot = self.slots.get(s)
                if slot is not None and slot.alive:
                    m = ps == s
                    good[m] = (slot.items.flags[pi[m]] & UNSTABLE) != 0
            pv[w] = good
        nohead = heads < 0
        one = nohead & (cnt == 1) & ~pv                      # a unique page: into the unstable tree
        b1 = nohead & pv & (cnt + 1 <= maxs)                 # pairs with its partner, the rest join
        b2 = nohead & ~pv & (cnt >= 2) & (cnt <= maxs)       # first two pair, the rest join
        c1 = np.zeros(len(uk), dtype=bool)                   # a plain node with room for all: all join
        hh = np.flatnonzero(~nohead)
        if len(hh):
            h = heads[hh]
            k = tree.kpfn[h].astype(np.int64)
            k0 = np.maximum(k, 0)
            alive = (k < 0) | (((self.ft.flags[k0] & FRAME_KSM) != 0) & (self.ft.stable[k0] == self.gid(h)))
            c1[hh] = ((tree.next[h] < 0) & (tree.chain[h] == 0) & (tree.live[h] != 0) & alive
                      & (tree.count[h] > 0) & (tree.count[h] + cnt[hh] <= maxs))
        forked = self.ft.mapcount[pfn] > 1      # pages maybe shared with a fork child: decided one by one,
        if forked.any():                        # where a partner that is the very same frame is no partner
            fg = np.zeros(len(uk), dtype=bool)
            fg[grp[forked]] = True
            b1 &= ~fg
            b2 &= ~fg
        g1 = np.flatnonzero(one)
        if len(g1):
            p = order[start[g1]]
            unstable.insert(uk[g1], (sid[p] << GID_SHIFT) | idx[p])
            for s in np.unique(sid[p]).tolist():
                m = p[sid[p] == s]
                it_of[s].items.flags[idx[m]] |= np.uint8(UNSTABLE)
            self.c["pages_unshared"] += len(g1)
        dg = np.full(len(uk), -1, dtype=np.int64)
        newg = np.flatnonzero(b1 | b2)
        if len(newg):
            dg[newg] = tree.insert_many(uk[newg])
            tree.count[dg[newg]] = cnt[newg] + b1[newg]
            unstable.delete(uk[newg])
        g = np.flatnonzero(b1)
        if len(g):
            p = order[start[g]]
            ts, ti = uh[g] >> GID_SHIFT, uh[g] & GID_MASK
            parts.append(Ops.part(PAIR_OP, sid[p], idx[p], pfn[p], dg[g], ts, ti))
            for s in np.unique(ts).tolist():
                self.slots[s].items.flags[ti[ts == s]] &= ~np.uint8(UNSTABLE)
            self.c["pages_unshared"] -= len(g)
            j = np.flatnonzero(b1[grp] & (rank > 0))
            if len(j):
                parts.append(Ops.part(STABLE_OP, sid[j], idx[j], pfn[j], dg[grp[j]]))
        g = np.flatnonzero(b2)
        if len(g):
            t, p = order[start[g]], order[start[g] + 1]
            parts.append(Ops.part(PAIR_OP, sid[p], idx[p], pfn[p], dg[g], sid[t], idx[t]))
            j = np.flatnonzero(b2[grp] & (rank > 1))
            if len(j):
                parts.append(Ops.part(STABLE_OP, sid[j], idx[j], pfn[j], dg[grp[j]]))
        j = np.flatnonzero(c1[grp])
        if len(j):
            parts.append(Ops.part(STABLE_OP, sid[j], idx[j], pfn[j], heads[grp[j]]))
            tree.count[heads[c1]] += cnt[c1].astype(tree.count.dtype)
        rest = np.flatnonzero(~(one | b1 | b2 | c1)[grp])
        if len(rest):
            yield from self._plan_one_by_one(rest, sid, idx, pfn, tk, heads[grp], uh[grp], parts, maxs)
        ops = Ops(parts)
        pr = np.flatnonzero(ops.kind == PAIR_OP)
        for s in np.unique(ops.tsid[pr]).tolist():     # the tree pages' frames, as their PTEs say now
            m = pr[ops.tsid[pr] == s]
            tpte = yield Load(PTE, s, ops.tidx[m])
            ops.tpfn[m] = (np.asarray(tpte) >> U64(PAGE_SHIFT)).astype(np.int64)
        return ops

    def _plan_one_by_one(self, rows, sid, idx, pfn, tk, heads, uhits, parts, maxs):
        """The page-by-page decisions (chains, dead nodes, full nodes, forked pages), as the kernel takes them."""
        tree, unstable = self.tree, self.unstable
        filling: dict[int, int] = {}
        ulocal: dict[int, int] = {}     # unstable-tree changes, applied at the end
        rows_st, rows_pair = [], []
        for r, s, i, p, key, hd, uh in zip(rows.tolist(), sid[rows].tolist(), idx[rows].tolist(),
                                           pfn[rows].tolist(), tk[rows].tolist(), heads[rows].tolist(),
                                           uhits[rows].tolist()):
            slot = self.slots[s]
            count, live = tree.count, tree.live       # (re-read: the arrays grow)
            d = filling.get(key, -1)      # the dup being filled is still the first with room
            if d < 0 or not live[d] or count[d] >= maxs:
                nstale = len(tree.stale)
                d = tree.candidate(key, maxs, self.node_alive, None if key in filling else hd)
                if len(tree.stale) != nstale:
                    filling[key] = -1          # the head moved: look it up afresh next time
            if d >= 0:
                count[d] += 1
                filling[key] = d
                rows_st.append((s, i, p, d))
                continue
            t = ulocal[key] if key in ulocal else uh
            if t >= 0:
                ts = self.slots.get(t >> GID_SHIFT)
                ti = t & GID_MASK
                if ts is not None and ts.alive and (ts.items.flags[ti] & UNSTABLE) and (ts is not slot or ti != i):
                    if self.ft.mapcount[p] > 1:     # mapped twice: maybe shared with a fork child
                        tpte = int((yield Load(PTE, ts.id, ti)))
                        if tpte & PTE_PRESENT and tpte >> PAGE_SHIFT == p:
                            continue    # the tree page is this very frame (fork): no KSM page for a forked page
                    ulocal[key] = -1
                    ts.items.flags[ti] &= ~np.uint8(UNSTABLE)
                    self.c["pages_unshared"] -= 1
                    d = tree.insert(key, None if key in filling else hd)
                    tree.count[d] = 2
                    filling[key] = d
                    rows_pair.append((s, i, p, d, ts.id, ti))
                    continue
            ulocal[key] = (s << GID_SHIFT) | i
            slot.items.flags[i] |= np.uint8(UNSTABLE)
            self.c["pages_unshared"] += 1
        if rows_st:
            a = np.array(rows_st, dtype=np.int64)
            parts.append(Ops.part(STABLE_OP, a[:, 0], a[:, 1], a[:, 2], a[:, 3]))
        if rows_pair:
            a = np.array(rows_pair, dtype=np.int64)
            parts.append(Ops.part(PAIR_OP, a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4], a[:, 5]))
        if ulocal:
            k = np.fromiter(ulocal, dtype=np.int64, count=len(ulocal))
            v = np.fromiter(ulocal.values(), dtype=np.int64, count=len(ulocal))
            unstable.delete(k[v < 0])
            unstable.insert(k[v >= 0], v[v >= 0])

    def commit(self, ops: Ops) -> None:
        """stable_tree_append for every merge that succeeded; undo the plan of those that failed."""
        tree, ok = self.tree, ops.ok
        pair, st = ops.kind == PAIR_OP, ops.kind == STABLE_OP
        good_pair = pair & ok
        live = np.zeros(len(ops), dtype=bool)
        has_d = ops.d >= 0
        live[has_d] = tree.live[ops.d[has_d]] != 0
        good_st = st & ok & live
        n = int(good_pair.sum())
        self.c["pages_shared"] += n
        self.c["pages_sharing"] += n + int(good_st.sum())
        self.merges += 2 * n + int(good_st.sum())
        bad_st = st & ~(ok & live)
        self.merge_failures += int(bad_st.sum()) + int((pair & ~ok).sum())
        m = bad_st & live
        if m.any():
            np.subtract.at(tree.count, ops.d[m], 1)
        for r in np.flatnonzero(pair & ~ok).tolist():
            d = int(ops.d[r])
            if tree.live[d]:
                tree.release(d)
            ts, ti = self.slots.get(int(ops.tsid[r])), int(ops.tidx[r])
            if ts is not None and ts.alive and ts.items.flags[ti] & HAS:   # the tree page stays in the unstable tree
                tk = int(self.tree_keys(np.array([ts.items.cs[ti]]), self.part(ts))[0])
                if self.unstable.get(tk) < 0:
                    self.unstable.put(tk, (ts.id << GID_SHIFT) | ti)
                    ts.items.flags[ti] |= np.uint8(UNSTABLE)
                    self.c["pages_unshared"] += 1
        a_sid = np.concatenate([ops.tsid[good_pair], ops.sid[good_pair], ops.sid[good_st]])
        a_idx = np.concatenate([ops.tidx[good_pair], ops.idx[good_pair], ops.idx[good_st]])
        a_d = np.concatenate([ops.d[good_pair], ops.d[good_pair], ops.d[good_st]])
        for s in np.unique(a_sid).tolist():
            slot = self.slots.get(s)
            if slot is not None and slot.alive:
                m = a_sid == s
                self.stable_tree_append(slot, a_idx[m], self.gid(a_d[m]))

    # ------------------------------------------------------------------ followers and control
    def follow_one(self):
        """A follower: serve the leader's next message; returns (op, mm) ('round', -1), ('mm_exit', mm),
        ('stop', -1)..."""
        [m] = yield ShardRecv(LEAD, [0])
        if isinstance(m, Round):
            out = [Routed() for _ in range(self.nshards)]
            scanned, nops = yield from self.run_round(m, out)
            yield ShardSend(0, DONE, Done(m.seq, scanned, nops, self.report()))
            return "round", -1
        if m.op != "stop":
            self.apply_control(m)
            yield ShardSend(0, DONE, Done(m.seq, 0, 0, self.report()))
        return m.op, m.mm

    def report(self) -> dict:
        """What a follower's DONE carries: its counters and sizes (the leader sums them)."""
        r = {k: self.c[k] for k in SUMMED}
        r.update(chains=self.tree.chains, dups=self.tree.dups, bytes=self.tree.nbytes + self.unstable.nbytes,
                 merges=self.merges, merge_failures=self.merge_failures)
        return r

    def apply_control(self, m: Ctl) -> None:
        """One control request, on this scanner's own state."""
        if m.op == "mm_exit":
            self.drop_from_nodes(m.unlinks)
            slot = self.slots.pop(m.mm, None)
            if slot is not None:
                slot.alive = False
        elif m.op == "forget_all":
            self._forget_own()
        elif m.op == "prune":
            self.prune()
        elif m.op == "reset_tree":
            self.tree.reset()

    def control(self, op: str, mm: int = -1, unlinks: list | None = None):
        """The leader: run control request `op` on every scanner (itself included), wait for all."""
        self.seq += 1
        for k in self.others:
            yield ShardSend(k, LEAD, Ctl(self.seq, op, mm, None if unlinks is None else unlinks[k]))
        self.apply_control(Ctl(self.seq, op, mm, None if unlinks is None else unlinks[self.shard]))
        yield from self._collect(self.seq)

    def stop_followers(self):
        if self.late:
            late, self.late = self.late, 0
            yield from self._collect_now(late)
        self.seq += 1
        for k in self.others:
            yield ShardSend(k, LEAD, Ctl(self.seq, "stop"))

    # ------------------------------------------------------------------ run=2 and mm exit
    def _forget_own(self) -> None:
        self.tree.reset()
        self.unstable = HashIndex(1024, value_dtype=np.int64)
        for k in ("pages_shared", "pages_sharing", "pages_unshared", "full_scans"):
            self.c[k] = 0

    def forget_all(self):
        """The leader, after run=2 unmerged every page: no rmap item, empty trees, counters back to 0."""
        for slot in self.slots.values():
            slot.items.reset()
        self.pos, self.cur = 0, None
        yield from self.control("forget_all")
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

    def mm_exit(self, mm_id: int):
        """The leader: an mm exits; its items leave the trees (their owners fix the counts)."""
        slot = self.slots.get(mm_id)
        if slot is None:
            return None
        out = [Routed() for _ in range(self.nshards)]
        it = slot.items
        if len(it.flags):
            self.free_items(slot, np.flatnonzero(it.flags & HAS), out)
        if slot.id in self.order:
            k = self.order.index(slot.id)
            self.order.remove(slot.id)
            if k < self.pos:
                self.pos -= 1
            elif k == self.pos:
                self.cur = None
        yield from self.control("mm_exit", mm_id, [r.seal().unlinks for r in out])
        return slot

    # ------------------------------------------------------------------ counters
    def metadata_bytes(self) -> int:
        own = sum(s.items.nbytes for s in self.slots.values()) + self.tree.nbytes + self.unstable.nbytes
        return own + sum(r.get("bytes", 0) for r in self.reports.values())

    def total(self, k: str) -> int:
        """Counter k summed over every scanner (the leader's machine-wide view)."""
        return self.c[k] + sum(r.get(k, 0) for r in self.reports.values())

    def counters(self, zero_pages: int) -> dict:
        """The sysfs counters as ksmd publishes them (ksm_zero_pages is kept by whoever maps them)."""
        vals = {k: self.total(k) for k in SUMMED}
        vals["full_scans"] = self.c["full_scans"]
        items = sum(s.items.nr_items for s in self.slots.values())
        vals["ksm_rmap_items"] = items
        vals["pages_volatile"] = max(0, items - vals["pages_shared"] - vals["pages_sharing"] - vals["pages_unshared"])
        vals["stable_node_chains"] = self.tree.chains + sum(r.get("chains", 0) for r in self.reports.values())
        vals["stable_node_dups"] = self.tree.dups + sum(r.get("dups", 0) for r in self.reports.values())
        meta = self.metadata_bytes()
        vals["metadata_bytes"] = meta
        vals["general_profit"] = (vals["pages_sharing"] + zero_pages) * PAGE_SIZE - (meta if items else 0)
        return vals


def candidates(pte: np.ndarray, pfn: np.ndarray, fl: np.ndarray) -> np.ndarray:
    """Present, anonymous (or KSM) pages that are not the zero page: what the scan visits."""
    return (((pte & U64(PTE_PRESENT)) != 0) & ((pte & U64(PTE_SPECIAL)) == 0) & (pfn != ZERO_PFN)
            & ((fl & (FRAME_ANON | FRAME_KSM)) != 0))
