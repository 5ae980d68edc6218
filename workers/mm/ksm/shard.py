"""Several scanners, IO-free: who owns what, the round protocol's messages and their wire form.

The kernel's ksmd is one thread.  ksm-proto can run `scanners` = N scanner processes
(ksm-proto's own knob, chosen when the machine starts).  Scanner 0, the *leader*, owns
the cursor (the mm_slot list and the position in it), the knobs, full_scans and the
advisor; every scanner k owns *shard* k of both trees: the contents whose tree key
(core.scan.KsmScan.tree_keys) is k modulo N.  A stable node lives in exactly one shard
and only its owner ever reads or changes it; its global id, kept in rmap items and in
the frame table, is local_id * N + k, so anyone can tell its owner.

The scan goes in *rounds*, in lockstep (a round is one batch of the single scanner):

  1. the leader cuts the next batch off the cursor, in the kernel's order, and splits
     it into N contiguous parts of about as many candidate pages (ROUND to everyone);
  2. each scanner *visits* its part (scan_get_next_rmap_item and the first steps of
     cmp_and_merge_page: PTE, rmap item, smart_scan, checksum) and routes what it found
     to the owner of each page's content (ROUTED, one message to every other scanner):
     the pages to merge (cands), items that left a stable node (unlinks: the owner
     fixes the node's count and pages_shared / pages_sharing), KSM pages to put back on
     their node (appends); a zero page goes to the visitor itself (use_zero_pages);
  3. each scanner, as *owner*, takes every visitor's list in visitor order, which is
     the kernel's page order, and runs plan / try_to_merge_pages / commit on its shard:
     the decisions for one content are those the single scanner takes, in its order;
  4. DONE to the leader, with the scanner's counters; the leader waits for all before
     the next round (the barrier: visits of round r+1 never overlap the owners'
     work of round r).

The rounds are pipelined where that rule allows: each ROUND carries the leader's guess at
the next round's parts, and a scanner that would wait at a barrier hashes its guessed part
meanwhile (mm.ksm.ahead); hashing writes nothing shared, and the next visit takes those
checksums for the pages that still map the frame hashed.

Rmap items are shared (one segment per mm, proto.layout.RmapView) and written under
this rule: in a round's visit phase only the visitor of a page writes its item; in
the owner phase only the owner of the page's content (cands, appends), of the node
it is on (teardown) or of the unstable tree holding it (a pair's tree page) does;
the barrier between phases orders them.  Counters are each scanner's own deltas and
the leader publishes their sum, so pages_shared, pages_sharing and pages_unshared
are exact at every round's end.

Two owners may merge pages of the same mm at once: each takes the mm's *ksm lock*
(ksm_lock(mm), one per mm, scanners only) in mm order before it tries the page-table
lock, so a scanner never makes another's merge fail; a page fault still does, as
with one ksmd.  Control requests (mm exit, run=2, EBUSY checks) are CTL rounds.
"""
from __future__ import annotations

import numpy as np

LEAD, ROUTED, DONE = "lead", "routed", "done"
GID_SHIFT = 32
_U64 = np.uint64


def ksm_lock(mm: int) -> tuple:
    """The scanners' per-mm lock, taken before ptl(mm) when several scanners merge."""
    return ("ksm", mm)


def shard_of(tkeys: np.ndarray, n: int) -> np.ndarray:
    """The owner of each tree key."""
    if n == 1:
        return np.zeros(len(tkeys), dtype=np.int64)
    return (np.asarray(tkeys, dtype=np.int64).view(_U64) % _U64(n)).astype(np.int64)


class Routed:
    """What one visitor hands one owner in a round (arrays built from appended parts)."""
    __slots__ = ("seq", "unlinks", "app_gid", "app_node", "c_gid", "c_pfn", "c_key", "_parts")

    def __init__(self, seq: int = 0):
        self.seq = seq
        self._parts = {"unlinks": [], "app_gid": [], "app_node": [], "c_gid": [], "c_pfn": [], "c_key": []}
        self.unlinks = self.app_gid = self.app_node = self.c_gid = self.c_pfn = self.c_key = None

    def add(self, field: str, a) -> None:
        self._parts[field].append(np.asarray(a, dtype=np.int64))

    def seal(self) -> "Routed":
        if self._parts is not None:
            for k, parts in self._parts.items():
                setattr(self, k, np.concatenate(parts) if parts else np.empty(0, dtype=np.int64))
            self._parts = None
        return self

    def __len__(self) -> int:
        self.seal()
        return len(self.unlinks) + len(self.app_gid) + len(self.c_gid)

    def __repr__(self):
        self.seal()
        return f"round {self.seq}: {len(self.c_gid)} pages, {len(self.unlinks)} unlinks, {len(self.app_gid)} appends"


class Round:
    """The leader's ROUND: knobs, each scanner's part [(mm, start, stop)], scan boundaries, and its
    guess at the next round's parts (`ahead`, the pipelined rounds: mm.ksm.ahead; None: no guess)."""
    __slots__ = ("seq", "knobs", "parts", "new_scan", "ended", "prune", "ahead")

    def __init__(self, seq, knobs, parts, new_scan, ended, prune, ahead=None):
        self.seq, self.knobs, self.parts = seq, dict(knobs), parts
        self.new_scan, self.ended, self.prune = new_scan, ended, prune
        self.ahead = ahead

    def __repr__(self):
        return f"round {self.seq}: {[sum(b - a for _, a, b in p) for p in self.parts]} pages"


class Ctl:
    """The leader's control request: op in ('mm_exit', 'unmerge_and_remove_all_rmap_items', 'prune', 'reset_tree', 'stop')."""
    __slots__ = ("seq", "op", "mm", "unlinks")

    def __init__(self, seq, op, mm=-1, unlinks=None):
        self.seq, self.op, self.mm = seq, op, mm
        self.unlinks = np.empty(0, dtype=np.int64) if unlinks is None else np.asarray(unlinks, dtype=np.int64)

    def __repr__(self):
        return f"ctl {self.seq}: {self.op}" + (f" mm {self.mm}" if self.mm >= 0 else "")


class Done:
    """A scanner's DONE for round (or control) seq: what it did and its counters."""
    __slots__ = ("seq", "scanned", "nops", "report")

    def __init__(self, seq, scanned, nops, report):
        self.seq, self.scanned, self.nops, self.report = seq, scanned, nops, report

    def __repr__(self):
        return f"done {self.seq}: {self.scanned} pages, {self.nops} merges"


# ---------------------------------------------------------------------------- wire form
_ROUTED_FIELDS = ("unlinks", "app_gid", "app_node", "c_gid", "c_pfn", "c_key")


def to_wire(msg) -> tuple[dict, bytes]:
    """A message as (JSON-able header, raw bytes) for a channel frame."""
    if isinstance(msg, Routed):
        msg.seal()
        arrs = [getattr(msg, f) for f in _ROUTED_FIELDS]
        return ({"t": "routed", "seq": msg.seq, "n": [len(a) for a in arrs]},
                b"".join(np.ascontiguousarray(a, dtype=np.int64).tobytes() for a in arrs))
    if isinstance(msg, Round):
        return ({"t": "round", "seq": msg.seq, "knobs": msg.knobs, "parts": msg.parts, "new_scan": msg.new_scan,
                 "ended": msg.ended, "prune": msg.prune, "ahead": msg.ahead}, b"")
    if isinstance(msg, Ctl):
        return {"t": "ctl", "seq": msg.seq, "op": msg.op, "mm": msg.mm}, msg.unlinks.astype(np.int64).tobytes()
    if isinstance(msg, Done):
        return {"t": "done", "seq": msg.seq, "scanned": msg.scanned, "nops": msg.nops, "report": msg.report}, b""
    raise TypeError(f"not a scanner message: {msg!r}")


def from_wire(head: dict, data: bytes):
    t = head["t"]
    if t == "routed":
        r = Routed(head["seq"])
        a = np.frombuffer(data, dtype=np.int64)
        off = 0
        for f, n in zip(_ROUTED_FIELDS, head["n"]):
            r.add(f, a[off:off + n])
            off += n
        return r.seal()
    if t == "round":
        ahead = head.get("ahead")
        return Round(head["seq"], head["knobs"], [[tuple(x) for x in p] for p in head["parts"]],
                     head["new_scan"], head["ended"], head["prune"],
                     None if ahead is None else [[tuple(x) for x in p] for p in ahead])
    if t == "ctl":
        return Ctl(head["seq"], head["op"], head["mm"], np.frombuffer(data, dtype=np.int64).copy())
    if t == "done":
        return Done(head["seq"], head["scanned"], head["nops"], head["report"])
    raise ValueError(f"unknown scanner message {t!r}")

