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
hash-indexed (stable_tree.py, hashtab.py).  Work is done in batches: `visit` takes each
page's first steps, `cmp_and_merge_page` takes the decisions for a batch in the kernel's
page-by-page order (vectorized for contents whose decisions are plain: one new pair, or
pages joining a node with room; page by page for the rest), then mm.ksm.merge runs them
(try_to_merge_one_page: trylock, write_protect_page, memcmp, replace_page) and
`stable_tree_append_merged` does stable_tree_append for the merges that succeeded.

KsmScan is split along mm/ksm.c's lines: cursor.py (the mm_slot cursor,
scan_get_next_rmap_item), rmap.py (remove_rmap_item_from_tree and the tree upkeep, ksm_exit,
restore), cmp_and_merge.py (cmp_and_merge_page for a batch), rounds.py (ksm_do_scan's rounds
with one scanner or several), ahead.py (the pipelined rounds: hashing the next round's pages while
waiting at a barrier); this module holds their shared state and the counters.

Side-channel defences (the `mitigation` knob, docs/security.md): "domain" keys both trees by
the mm's security domain too (MMH_DOMAIN, as merge_across_nodes=0 keys them by NUMA node), so
pages of VMs of different domains never meet; "zero" makes only zero-filled pages candidates;
"vusion" treats every candidate the batch did not merge as a merged one (`fake_merge`, after
the merges: write-protected, moved to a random frame), so a write to it faults and copies as a
write to a merged page does (mm.fault).

With several scanners (mm/ksm/shard.py) each KsmScan owns one shard of the trees;
scanner 0 also owns the cursor.  A batch is a *round*: the leader cuts it, every
scanner visits its part and routes pages to the owners of their contents, each
owner plans and merges its shard.  One scanner is the same code with every page
routed to itself.

`ksm_do_scan` is a generator of effects (mm/effects.py): the PTEs, frame flags
and page contents it reads are loads the driver (a scanner process, or the
checker) performs.  Frame flags read to tell whether a stable node's KSM page is
still alive (`node_alive`, `prune`) are advisory: get_ksm_page (PinKsm) re-checks
under the frame lock before anything is merged into it.
"""
from __future__ import annotations

import time

import numpy as np

from proto.knobs import DEFAULTS
from proto.layout import PAGE_SIZE

from workers.mm.ksm.advisor import AdvisorCtx
from workers.mm.ksm.ahead import HashAhead
from workers.mm.ksm.hashtab import HashIndex
from workers.mm.ksm.stable_tree import StableTree
from workers.mm.breaks import NONE
from workers.mm.ksm.cmp_and_merge import CmpAndMerge
from workers.mm.ksm.cursor import ScanCursor
from workers.mm.ksm.mm_slot import BATCH, COUNTER_NAMES, DOMAIN, NODE_MIX, SUMMED, MMSlot
from workers.mm.ksm.rmap import RmapUpkeep
from workers.mm.ksm.rounds import Rounds

__all__ = ["BATCH", "SUMMED", "KsmScan", "MMSlot"]


class KsmScan(ScanCursor, RmapUpkeep, CmpAndMerge, Rounds, HashAhead):
    """One scanner's state and steps: shard `shard` of `nshards`; `ft` is the frame table (advisory reads)."""

    def __init__(self, ft, mode: str, clock, brk=NONE, shard: int = 0, nshards: int = 1, ahead: bool = True):
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
        self.cpu_clock = time.process_time_ns   # ksmd's CPU time, for the advisor (task_sched_runtime)
        self.advisor_ctx = AdvisorCtx()         # zeroed whenever advisor_mode is written (ksmd.set_knobs)
        self.last_prune = clock()
        self.merges = 0
        self.merge_failures = 0
        self.salt = 0                   # mitigation vusion: mixed into where new KSM frames are taken (ksmd: random)
        self.seq = 0                    # round / control sequence (leader)
        self.late = 0                   # (the no-round-barrier break: the round whose DONEs are still out)
        self.reports: dict[int, dict] = {k: {} for k in self.others}   # leader: each follower's last DONE
        self.ahead_init(ahead)          # the pipelined rounds (several scanners): hashing ahead while waiting

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


