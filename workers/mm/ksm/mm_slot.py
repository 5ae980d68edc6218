"""ksm's mm_slot (an mm known to the scanner, its rmap items), the merges a batch plans (Ops), and
the scan's constants: what the scanner's parts (cursor, rmap, cmp_and_merge, rounds) share."""
from __future__ import annotations

import numpy as np

from proto.knobs import MITIGATIONS
from proto.layout import FRAME_ANON, FRAME_KSM, MMH_DOMAIN, MMH_NODE, PAGE_SHIFT, PTE_PRESENT, PTE_SPECIAL, ZERO_PFN

from workers.mm.effects import FLAGS, PTE, Load

from workers.mm.ksm.stable_tree import RmapItems
from workers.mm.ksm.shard import GID_SHIFT

U64 = np.uint64
BATCH = 16384
GID_MASK = (1 << GID_SHIFT) - 1
NODE_MIX = np.int64(-7046029254386353131)   # 0x9E3779B97F4A7C15 as int64: separates per-node trees
COUNTER_NAMES = ("pages_shared", "pages_sharing", "pages_unshared", "pages_scanned", "pages_skipped",
                 "full_scans")
VUSION, DOMAIN, ZERO_ONLY = (MITIGATIONS.index(k) for k in ("vusion", "domain", "zero"))
SUMMED = ("pages_shared", "pages_sharing", "pages_unshared", "pages_scanned", "pages_skipped")


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
    """The merges a batch plans, one row each: kind (MERGE_WITH_KSM_PAGE: page -> KSM page of node d;
    MERGE_TWO_PAGES: page + tree page (tsid, tidx) -> new node d; MERGE_WITH_ZERO_PAGE), the page (sid, idx, pfn),
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


def load_candidates(sid: int, idx: np.ndarray):
    """Pages idx of mm sid: (the frame each maps, its flags, whether it is a candidate); two loads."""
    pte = yield Load(PTE, sid, idx)
    pfn = (pte >> U64(PAGE_SHIFT)).astype(np.int64)
    fl = yield Load(FLAGS, None, pfn)
    return pfn, fl, candidates(pte, pfn, fl)


def candidates(pte: np.ndarray, pfn: np.ndarray, fl: np.ndarray) -> np.ndarray:
    """Present, anonymous (or KSM) pages that are not the zero page: what the scan visits."""
    return (((pte & U64(PTE_PRESENT)) != 0) & ((pte & U64(PTE_SPECIAL)) == 0) & (pfn != ZERO_PFN)
            & ((fl & (FRAME_ANON | FRAME_KSM)) != 0))
