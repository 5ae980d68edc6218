"""Pipelined rounds (several scanners): a scanner that would wait at one of the round's barriers
hashes its part of the next round instead, and that round's visit takes the checksums it finds
there.

The leader sends with each round its guess at the next one (`peek_batch`: the pages after the
cursor, cut into parts as `take_batch` would cut them, nothing moved).  Wherever a scanner would
block on the others (their ROUTED, the leader's next LEAD, the followers' DONE: `wait_shard`), it
polls (`ShardReady`) and, while they are not there, hashes `AHEAD_CHUNK` more pages of its guessed
part (`hash_ahead_step`: each page's PTE, frame flags and checksum, nothing written but its own
cache).  The visit of the next round then takes the checksum of a page from that cache when the
page still maps the frame hashed (`keys_hashed_ahead`), and computes the others.

No guess crosses a full scan's end: the first round of a full scan hashes its pages itself, so every
checksum of a full scan is taken after that scan began, and a page whose writes stopped before a
full scan began is seen as it is by that scan, as with the kernel's ksmd (two full scans after the
last write, it is merged; the checker's settle scans show it, and found the case where a guess
crossed the end: a page written after it was hashed went into the new scan with its old checksum
and merged a scan late).

Why a checksum taken before the visit is safe: the checksum only routes a page and keys the trees;
every merge compares the contents themselves after write-protecting them (compare_pairs,
compare_rest), as the kernel's does, so a page written since it was hashed fails its merge, exactly
as one written just after the visit's own checksum does.  A guess that is wrong (an mm joined or
left, a VMA changed) costs the hashing and nothing else.  The checker runs this code: its polls are
scheduling points like any other effect.

A mixin of KsmScan (mm.ksm.scan), which holds the state these methods share.
"""
from __future__ import annotations

import numpy as np

from proto.layout import FRAME_KSM

from workers.mm.effects import VMAS, Checksum, Load, ShardReady, ShardRecv
from workers.mm.pte import mergeable_ranges
from workers.mm.ksm.mm_slot import load_candidates

AHEAD_CHUNK = 512       # pages hashed between two polls (~0.5 ms of mmh3)


class HashAhead:
    """The pipelined rounds' hashing ahead (a KsmScan mixin)."""

    def ahead_init(self, on: bool) -> None:
        self.ahead = on and bool(self.others)     # (one scanner never waits on another)
        self.ahead_todo: list = []      # [(mm, start, stop)] of the next round's guessed part, not hashed yet
        self.ahead_next: list = []      # [(mm, idx, pfn, key)] hashed for the next round
        self.ahead_now: dict = {}       # mm -> (idx sorted, pfn, key): hashed ahead in this scan, not visited yet
        # pages hashed ahead, of them visited with that checksum, polls of the others' messages
        self.ahead_stats = {"hashed_ahead": 0, "used_ahead": 0, "polls": 0}
        self.waiting: str | None = None     # the kind of message wait_shard waits for, if it does

    # ---- the leader's guess
    def peek_batch(self, budget: int, ended: bool = False):
        """The leader's guess at the next round's parts: the pages after the cursor, cut as take_batch
        would cut them; the cursor does not move and nothing is written (an mm not reached yet: its
        VMAs read).  Never past a full scan's end (the caller's rule, see the module docstring; only
        the break ahead-across-scans guesses the next scan's first round: ended)."""
        pos, cur = (0, None) if ended else (self.pos, self.cur)
        chunks, counted = [], 0
        while counted < budget and pos < len(self.order):
            slot = self.slots.get(self.order[pos])
            pos += 1
            if slot is None or not slot.alive:
                cur = None
                continue
            if cur is None:
                ranges, r, p = mergeable_ranges((yield Load(VMAS, slot.id))), 0, 0
            else:
                ranges, r, p = cur
                cur = None
            for a, b in ranges[r:]:
                a = max(a, p)
                while a < b and counted < budget:
                    q = min(b, a + max(256, budget - counted))
                    cum = yield from self.count_candidates(slot.id, a, q)
                    chunks.append((slot.id, a, q, cum))
                    counted += int(cum[-1])
                    a = q
                if counted >= budget:
                    break
        return self.split_parts(chunks, counted)

    # ---- a scanner's waits
    def wait_shard(self, kind: str, srcs: list, seq):
        """ShardRecv(kind, srcs, seq), hashing ahead while the others' messages are not there."""
        self.waiting = kind             # (the checker's round-boundary checks read it)
        while self.ahead_todo:
            self.ahead_stats["polls"] += 1
            if (yield ShardReady(kind, srcs, seq)):
                break
            yield from self.hash_ahead_step()
        got = yield ShardRecv(kind, srcs, seq)
        self.waiting = None
        return got

    def start_round_ahead(self, rnd) -> None:
        """A round begins: what was hashed for it joins what this scan hashed ahead and did not visit yet
        (a guess may cover pages of a later round: the last round before ksmd sleeps is short); its
        guess of the next round is the work.  A page hashed twice keeps its newer checksum."""
        if rnd.new_scan:                # (nothing the last scan hashed ahead serves this one)
            self.ahead_now = {}
        got: dict = {}
        for sid, idx, pfn, key in reversed(self.ahead_next):         # (newest first)
            got.setdefault(sid, []).append((idx, pfn, key))
        for sid, parts in got.items():
            if sid in self.ahead_now:
                parts.append(self.ahead_now[sid])
            idx, pfn, key = (np.concatenate(x) for x in zip(*parts))
            idx, first = np.unique(idx, return_index=True)      # (sorted; each page's first: its newest)
            self.ahead_now[sid] = (idx, pfn[first], key[first])
        self.ahead_next = []
        nxt = rnd.ahead
        self.ahead_todo = list(nxt[self.shard]) if self.ahead and nxt else []

    def drop_visited_ahead(self, part: list) -> None:
        """This round's visits took what they could of the checksums hashed ahead of their pages: those
        pages are not visited again this scan, their entries go (what is left stays small)."""
        for sid, a, b in part:
            got = self.ahead_now.get(sid)
            if got is not None:
                lo, hi = np.searchsorted(got[0], [a, b]).tolist()
                if hi > lo:
                    keep = np.r_[0:lo, hi:len(got[0])]
                    if len(keep):
                        self.ahead_now[sid] = tuple(x[keep] for x in got)
                    else:
                        del self.ahead_now[sid]

    def hash_ahead_step(self):
        """Hash the next AHEAD_CHUNK pages of this scanner's guessed part: the candidates that are not
        KSM pages (the visit hashes only those), each with the frame it maps."""
        sid, a, b = self.ahead_todo[0]
        q = min(b, a + AHEAD_CHUNK)
        if q < b:
            self.ahead_todo[0] = (sid, q, b)
        else:
            self.ahead_todo.pop(0)
        slot = self.slots.get(sid)
        if slot is None or not slot.alive:
            return
        idx = np.arange(a, q, dtype=np.int64)
        pfn, fl, cand = yield from load_candidates(sid, idx)
        m = cand & ((fl & FRAME_KSM) == 0)
        if m.any():
            keys = np.asarray((yield Checksum(pfn[m])), dtype=np.int64)
            self.ahead_next.append((sid, idx[m], pfn[m], keys))
            self.ahead_stats["hashed_ahead"] += int(m.sum())

    def keys_hashed_ahead(self, sid: int, idx: np.ndarray, pfn: np.ndarray):
        """(keys, found): the checksums hashed ahead of pages idx of mm sid that still map the frame
        hashed (found), 0 elsewhere; None if nothing of this mm was hashed ahead."""
        got = self.ahead_now.get(sid)
        if got is None:
            return None
        hidx, hpfn, hkey = got
        at = np.minimum(np.searchsorted(hidx, idx), len(hidx) - 1)
        found = (hidx[at] == idx) & (hpfn[at] == pfn)
        return np.where(found, hkey[at], 0), found
