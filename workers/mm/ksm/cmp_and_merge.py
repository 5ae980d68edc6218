"""cmp_and_merge_page for a batch (mm/ksm.c): each page's first steps (`visit`: checksum,
volatile or not, routed to the owner of its content), the decisions in the kernel's page-by-page
order (`cmp_and_merge_page`: the batch forms of stable_tree_search and
unstable_tree_search_insert), and stable_tree_append for the merges that succeeded.

A mixin of KsmScan (mm.ksm.scan), which holds the state these methods share.
"""
from __future__ import annotations

import numpy as np

from proto.layout import FRAME_KSM, PAGE_SHIFT, PTE_PRESENT

from workers.mm.ksm.stable_tree import HAS, STABLE, UNSTABLE, should_skip
from workers.mm.effects import PTE, ZERO_KEY, Checksum, Load
from workers.mm.ksm.merge import (MERGE_TWO_PAGES, MERGE_WITH_KSM_PAGE, MERGE_WITH_ZERO_PAGE, cmp_and_merge_decision,
                                  fake_merge, merge_in_groups, try_to_merge_pages)
from workers.mm.ksm.shard import GID_SHIFT, shard_of
from workers.mm.ksm.mm_slot import GID_MASK, U64, VUSION, ZERO_ONLY, MMSlot, Ops, load_candidates


class CmpAndMerge:
    """cmp_and_merge_page for a batch (a KsmScan mixin)."""

    def visit(self, slot: MMSlot, idx: np.ndarray, out: list):
        """scan_get_next_rmap_item + the first steps of cmp_and_merge_page, vectorized; routes to owners."""
        it = slot.items
        pfn, fl, cand = yield from load_candidates(slot.id, idx)
        self.remove_trailing_rmap_items(slot, idx[~cand], out)
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
                self.remove_rmap_item_from_tree(slot, ki, out)
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
                self.remove_rmap_item_from_tree(slot, idx[skip], out)
                idx, pfn = idx[~skip], pfn[~skip]
        nscan += len(idx)
        self.c["pages_scanned"] += nscan
        if not len(idx):
            return nscan
        self.remove_rmap_item_from_tree(slot, idx, out)
        got = self.keys_hashed_ahead(slot.id, idx, pfn) if self.ahead_now else None
        if got is None:
            keys = yield Checksum(pfn)
        else:       # (the pipelined rounds: checksums taken while this scanner waited, mm.ksm.ahead)
            keys, found = got
            if not found.all():
                keys[~found] = yield Checksum(pfn[~found])
            self.ahead_stats["used_ahead"] += int(found.sum())
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
        ops = yield from self.cmp_and_merge_page(plan_in)
        if len(ops):
            if self.nshards == 1:
                yield from try_to_merge_pages(self, ops)
            else:
                yield from merge_in_groups(self, ops)
            self.stable_tree_append_merged(ops)
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

    def stable_tree_append(self, slot: MMSlot, idx: np.ndarray, g) -> None:
        """stable_tree_append (count already includes them when planned); g: global node id(s)."""
        it = slot.items
        it.flags[idx] |= np.uint8(STABLE)
        it.sn[idx] = g

    def cmp_and_merge_page(self, plan_in: list):
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
                parts.append(Ops.part(MERGE_WITH_ZERO_PAGE, sid[z], idx[z], pfn[z]))
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
            parts.append(Ops.part(MERGE_TWO_PAGES, sid[p], idx[p], pfn[p], dg[g], ts, ti))
            for s in np.unique(ts).tolist():
                self.slots[s].items.flags[ti[ts == s]] &= ~np.uint8(UNSTABLE)
            self.c["pages_unshared"] -= len(g)
            j = np.flatnonzero(b1[grp] & (rank > 0))
            if len(j):
                parts.append(Ops.part(MERGE_WITH_KSM_PAGE, sid[j], idx[j], pfn[j], dg[grp[j]]))
        g = np.flatnonzero(b2)
        if len(g):
            t, p = order[start[g]], order[start[g] + 1]
            parts.append(Ops.part(MERGE_TWO_PAGES, sid[p], idx[p], pfn[p], dg[g], sid[t], idx[t]))
            j = np.flatnonzero(b2[grp] & (rank > 1))
            if len(j):
                parts.append(Ops.part(MERGE_WITH_KSM_PAGE, sid[j], idx[j], pfn[j], dg[grp[j]]))
        j = np.flatnonzero(c1[grp])
        if len(j):
            parts.append(Ops.part(MERGE_WITH_KSM_PAGE, sid[j], idx[j], pfn[j], heads[grp[j]]))
            tree.count[heads[c1]] += cnt[c1].astype(tree.count.dtype)
        rest = np.flatnonzero(~(one | b1 | b2 | c1)[grp])
        if len(rest):
            yield from self._cmp_and_merge_one_by_one(rest, sid, idx, pfn, tk, heads[grp], uh[grp], parts, maxs)
        ops = Ops(parts)
        pr = np.flatnonzero(ops.kind == MERGE_TWO_PAGES)
        for s in np.unique(ops.tsid[pr]).tolist():     # the tree pages' frames, as their PTEs say now
            m = pr[ops.tsid[pr] == s]
            tpte = yield Load(PTE, s, ops.tidx[m])
            ops.tpfn[m] = (np.asarray(tpte) >> U64(PAGE_SHIFT)).astype(np.int64)
        return ops

    def _cmp_and_merge_one_by_one(self, rows, sid, idx, pfn, tk, heads, uhits, parts, maxs):
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
            t = ulocal[key] if key in ulocal else uh
            ts = self.slots.get(t >> GID_SHIFT) if t >= 0 and d < 0 else None
            ti = t & GID_MASK
            match = (ts is not None and ts.alive and bool(ts.items.flags[ti] & UNSTABLE)
                     and (ts is not slot or ti != i))
            if match and self.ft.mapcount[p] > 1:     # mapped twice: maybe shared with a fork child
                tpte = int((yield Load(PTE, ts.id, ti)))
                if tpte & PTE_PRESENT and tpte >> PAGE_SHIFT == p:
                    continue    # the tree page is this very frame (fork): no KSM page for a forked page
            kind = cmp_and_merge_decision(d, match)
            if kind == MERGE_WITH_KSM_PAGE:
                count[d] += 1
                filling[key] = d
                rows_st.append((s, i, p, d))
                continue
            if kind == MERGE_TWO_PAGES:
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
            parts.append(Ops.part(MERGE_WITH_KSM_PAGE, a[:, 0], a[:, 1], a[:, 2], a[:, 3]))
        if rows_pair:
            a = np.array(rows_pair, dtype=np.int64)
            parts.append(Ops.part(MERGE_TWO_PAGES, a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4], a[:, 5]))
        if ulocal:
            k = np.fromiter(ulocal, dtype=np.int64, count=len(ulocal))
            v = np.fromiter(ulocal.values(), dtype=np.int64, count=len(ulocal))
            unstable.delete(k[v < 0])
            unstable.insert(k[v >= 0], v[v >= 0])

    def stable_tree_append_merged(self, ops: Ops) -> None:
        """stable_tree_append for every merge that succeeded; undo the plan of those that failed."""
        tree, ok = self.tree, ops.ok
        pair, st = ops.kind == MERGE_TWO_PAGES, ops.kind == MERGE_WITH_KSM_PAGE
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
        if bad_st.any():    # (a node gone stale meanwhile included: not released yet, it is torn down by
            np.subtract.at(tree.count, ops.d[bad_st], 1)    # its items, and its count must be theirs)
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
