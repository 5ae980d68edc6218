"""ksmd's data structures: rmap items, the stable tree (with chains of dups), smart-scan ageing.

Pure logic, no I/O.  The kernel keeps red-black trees ordered by memcmp; here
both trees are hash-indexed by the page's 64-bit mmh3 digest (`HashIndex`),
and every match is confirmed by comparing bytes after write-protect (ksmd.py).

Everything is stored in numpy arrays so that the scanner's metadata stays small
and honestly countable (`nbytes`): an rmap item is one slot in each of the
per-mm arrays below, indexed by page number; a stable node is one slot in the
StableTree arrays.  With several scanners the rmap items of an mm are one shared
segment (proto.layout.RmapView) that every scanner maps; which scanner may write
which item when is core/shard.py's rule.

    RmapItems (per mm)              StableTree
    flags  u8   HAS|UNSTABLE|STABLE  key   i64  content digest
    cs     i64  oldchecksum          kpfn  i32  the KSM frame (-1: being created)
    sn     i32  stable node          count i32  rmap_hlist_len
    age    u8   smart_scan age       next  i32  next dup in its chain
    skips  u8   remaining_skips      chain u8   1 if a dup of a chain
"""
from __future__ import annotations

import numpy as np

from workers.mm.ksm.hashtab import HashIndex

HAS, UNSTABLE, STABLE = 1, 2, 4
ITEM_BYTES = 15         # flags, age, skips (u8), sn (i32), cs (i64)


def _grow(a: np.ndarray, n: int, fill=0) -> np.ndarray:
    b = np.full(n, fill, dtype=a.dtype)
    b[:len(a)] = a
    return b


class RmapItems:
    """The rmap items of one mm, indexed by page number within the mm.

    Private arrays that grow as needed, or `view`: fixed-size arrays (flags, cs, sn, age,
    skips) of a shared segment, covering the whole mm.
    """

    def __init__(self, view=None):
        self.fixed = view is not None
        self.hwm = 0            # fixed: the highest page index + 1 the scan asked for (ensure)
        if view is None:
            self.flags = np.zeros(0, np.uint8)
            self.cs = np.zeros(0, np.int64)
            self.sn = np.zeros(0, np.int32)
            self.age = np.zeros(0, np.uint8)
            self.skips = np.zeros(0, np.uint8)
        else:
            self.flags, self.cs, self.sn, self.age, self.skips = (view.flags, view.cs, view.sn, view.age,
                                                                  view.skips)

    @classmethod
    def fixed_size(cls, npages: int) -> "RmapItems":
        """Fixed-size private arrays (the checker's stand-in for a shared rmap segment)."""
        class _V:
            pass
        v = _V()
        v.flags, v.cs, v.sn = np.zeros(npages, np.uint8), np.zeros(npages, np.int64), np.full(npages, -1, np.int32)
        v.age, v.skips = np.zeros(npages, np.uint8), np.zeros(npages, np.uint8)
        return cls(v)

    @property
    def nr_items(self) -> int:
        """ksm_rmap_items of this mm."""
        return int(np.count_nonzero(self.flags & HAS))

    @property
    def merging(self) -> int:
        """ksm_merging_pages of this mm."""
        return int(np.count_nonzero(self.flags & STABLE))

    def reset(self) -> None:
        """No rmap item left (run=2)."""
        if self.fixed:
            self.flags[:] = 0
            self.sn[:] = -1
            self.hwm = 0
        else:
            self.__init__()

    def ensure(self, n: int) -> None:
        self.hwm = max(self.hwm, n)
        if n <= len(self.flags):
            return
        if self.fixed:
            raise IndexError(f"rmap items for {n} pages asked of a segment of {len(self.flags)}")
        cap = max(n, 2 * len(self.flags), 1024)
        self.flags = _grow(self.flags, cap)
        self.cs = _grow(self.cs, cap)
        self.sn = _grow(self.sn, cap, -1)
        self.age = _grow(self.age, cap)
        self.skips = _grow(self.skips, cap)

    @property
    def nbytes(self) -> int:
        """Bytes of rmap items: those below the highest page a mergeable area reached (a shared
        segment is mapped for the whole mm, but the kernel allocates rmap items as it scans)."""
        if self.fixed:
            return self.hwm * ITEM_BYTES
        return sum(a.nbytes for a in (self.flags, self.cs, self.sn, self.age, self.skips))

    def new_items(self, idx: np.ndarray) -> None:
        """Allocate zeroed items (oldchecksum 0, age 0) where none exists."""
        fresh = idx[(self.flags[idx] & HAS) == 0]
        if len(fresh):
            self.flags[fresh] = HAS
            self.cs[fresh] = 0
            self.sn[fresh] = -1
            self.age[fresh] = 0
            self.skips[fresh] = 0


def skip_age(age: np.ndarray) -> np.ndarray:
    return np.where(age <= 3, 1, np.where(age <= 5, 2, np.where(age <= 8, 4, 8))).astype(np.uint8)


def should_skip(items: RmapItems, idx: np.ndarray) -> np.ndarray:
    """smart_scan: age the items and say which to skip this time (caller excludes KSM pages)."""
    old = items.age[idx].copy()
    items.age[idx] = np.minimum(old.astype(np.int32) + 1, 255).astype(np.uint8)
    rs = items.skips[idx]
    eligible = old >= 3
    refill = eligible & (rs == 0)
    skip = eligible & (rs > 0)
    rs = np.where(refill, skip_age(old), np.where(skip, rs - 1, rs)).astype(np.uint8)
    items.skips[idx] = rs
    return skip


class StableTree:
    """Stable nodes keyed by content; several dups of one content form a chain.

    Counts follow the kernel: a chain is created with 2 dups when a full node
    gets a sibling (stable_node_chains += 1, stable_node_dups += 2); plain nodes
    are not dups; a chain left with one dup is collapsed when next searched.
    """

    def __init__(self):
        self.index = HashIndex(1024, value_dtype=np.int32)
        n = 1024
        self.key = np.zeros(n, np.int64)
        self.kpfn = np.full(n, -1, np.int32)
        self.count = np.zeros(n, np.int32)
        self.next = np.full(n, -1, np.int32)
        self.chain = np.zeros(n, np.uint8)
        self.live = np.zeros(n, np.uint8)
        self.free: list[int] = []
        self.top = 0
        self.chains = 0
        self.dups = 0
        self.stale: list[int] = []

    @property
    def nbytes(self) -> int:
        return self.index.nbytes + sum(a.nbytes for a in (self.key, self.kpfn, self.count, self.next,
                                                          self.chain, self.live)) + 8 * len(self.free)

    def _alloc(self) -> int:
        if self.free:
            return self.free.pop()
        if self.top == len(self.key):
            self._grow_to(2 * len(self.key))
        d = self.top
        self.top += 1
        return d

    def dups_of(self, key: int) -> list[int]:
        out = []
        d = int(self.index.get(key))
        while d >= 0:
            out.append(d)
            d = int(self.next[d])
        return out

    def insert_many(self, keys: np.ndarray) -> np.ndarray:
        """stable_tree_insert of new KSM pages whose contents have no node yet (distinct keys): plain nodes."""
        n = len(keys)
        reuse = self.free[-n:] if n else []
        del self.free[len(self.free) - len(reuse):]
        fresh = n - len(reuse)
        if self.top + fresh > len(self.key):
            cap = len(self.key)
            while cap < self.top + fresh:
                cap *= 2
            self.key = _grow(self.key, cap)
            self.kpfn = _grow(self.kpfn, cap, -1)
            self.count = _grow(self.count, cap)
            self.next = _grow(self.next, cap, -1)
            self.chain = _grow(self.chain, cap)
            self.live = _grow(self.live, cap)
        d = np.concatenate([np.array(reuse[::-1], dtype=np.int64), np.arange(self.top, self.top + fresh)])
        self.top += fresh
        self.key[d] = keys
        self.kpfn[d] = -1
        self.count[d] = 0
        self.live[d] = 1
        self.chain[d] = 0
        self.next[d] = -1
        self.index.insert(keys, d)
        return d

    def insert(self, key: int, head: int | None = None) -> int:
        """stable_tree_insert of a new KSM page with this content: a new node, or a new dup at the head.

        `head`, when given, is the index's current entry for key (saves a lookup).
        """
        d = self._alloc()
        self._place(d, key, -1, 0, head)
        return d

    def restore(self, d: int, key: int, kpfn: int, count: int) -> None:
        """Re-create stable node d, whose KSM frame kpfn the frame table names (a restarted ksmd)."""
        while d >= len(self.key):
            self._grow_to(2 * len(self.key))
        if d >= self.top:
            self.free.extend(range(self.top, d))
            self.top = d + 1
        elif d in self.free:
            self.free.remove(d)
        elif self.live[d]:
            raise ValueError(f"stable node {d} restored twice")
        self._place(d, key, kpfn, count, None)

    def _grow_to(self, n: int) -> None:
        self.key = _grow(self.key, n)
        self.kpfn = _grow(self.kpfn, n, -1)
        self.count = _grow(self.count, n)
        self.next = _grow(self.next, n, -1)
        self.chain = _grow(self.chain, n)
        self.live = _grow(self.live, n)

    def _place(self, d: int, key: int, kpfn: int, count: int, head: int | None) -> None:
        self.key[d] = key
        self.kpfn[d] = kpfn
        self.count[d] = count
        self.live[d] = 1
        if head is None:
            head = int(self.index.get(key))
        if head >= 0:
            if not self.chain[head]:
                self.chain[head] = 1
                self.chains += 1
                self.dups += 1
            self.chain[d] = 1
            self.dups += 1
            self.next[d] = head
        else:
            self.chain[d] = 0
            self.next[d] = -1
        self.index.put(key, d)

    def remove(self, d: int) -> None:
        """Take node d out of the index (its frame is gone, or its creation failed).

        Its id stays reserved (count kept) until release(d): items may still point at it.
        """
        if not self.live[d]:
            return
        key = int(self.key[d])
        rest = [x for x in self.dups_of(key) if x != d]
        if self.chain[d]:
            self.dups -= 1
        if rest:
            for a, b in zip(rest, rest[1:] + [-1]):
                self.next[a] = b
            self.index.put(key, rest[0])
        else:
            self.index.pop(key)
            if self.chain[d]:
                self.chains -= 1
        self.live[d] = 0
        self.chain[d] = 0
        self.next[d] = -1

    def release(self, d: int) -> None:
        """Free a removed node's id for reuse."""
        self.remove(d)
        self.kpfn[d] = -1
        self.count[d] = 0
        self.free.append(d)

    def collapse_if_single(self, key: int) -> None:
        dups = self.dups_of(key)
        if len(dups) == 1 and self.chain[dups[0]]:
            self.chain[dups[0]] = 0
            self.chains -= 1
            self.dups -= 1

    def candidate(self, key: int, max_sharing: int, alive, head: int | None = None) -> int:
        """stable_node_dup: the first dup (head first) with 0 < count < max_sharing, or -1.

        `alive(d)` says whether d's KSM frame still exists; dead dups met on the way are
        returned through `self.stale` for the caller to tear down.  `head`, when given, is
        the index's current entry for key (saves a lookup).
        """
        if head is None:
            head = int(self.index.get(key))
        if head < 0:
            return -1
        if self.next[head] < 0 and not self.chain[head]:      # a plain node: the common case
            if not alive(head):
                self.stale.append(head)
                self.remove(head)
                return -1
            return head if 0 < self.count[head] < max_sharing else -1
        dups = []
        d = head
        while d >= 0:
            dups.append(d)
            d = int(self.next[d])
        best = -1
        for d in dups:
            if not alive(d):
                self.stale.append(d)
                self.remove(d)
                continue
            if best < 0 and 0 < self.count[d] < max_sharing:
                best = d
        self.collapse_if_single(key)
        return best

    def reset(self) -> None:
        self.__init__()
