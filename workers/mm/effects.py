"""Effects: what a protocol core asks its driver to do, as plain data.

A core generator yields one effect at a time and receives its result:

    pte = yield Load(PTE, mm, i)          # read a shared field
    yield Store(PTE, mm, i, new)          # write it
    ok = yield TryLock(ptl(mm))           # page-table lock, as ksmd takes it
    h = yield Notify(mm, Msg.CHANGE_PTE, subs, entries)   # one message per subscriber
    acks = yield WaitAcks(h)              # block until each subscriber acked (or was released)
    yield ShardSend(k, ROUTED, msg)       # to scanner k (several scanners: mm/ksm/shard.py)
    [m] = yield ShardRecv(LEAD, [0], seq) # block until scanner 0's message of round seq is in
    if not (yield ShardReady(LEAD, [0], seq)): ...   # would it block?  (a poll: hash ahead meanwhile)

Every effect is one scheduling point of the interleaving checker, so the core's
granularity *is* the checked granularity: a field loaded twice is two steps.

The memory effects are executed by one function, `apply_mem`, for the real actors
(shared-memory views) and the checker (plain arrays) alike; locks, messages and
waits are the driver's (asyncio in an actor, queues in the checker).  Each effect
names its `footprint` (resources read or written) for the checker's partial-order
reduction.
"""
from __future__ import annotations

import numpy as np

from proto.layout import MMH_FLAGS, PAGE_SIZE

from workers.mm.ksm.pagehash import ZERO_KEY, _digest, page_key  # noqa: F401 - the scanner's content key, one definition

# shared regions a Load/Store can name (MMFLAGS: the mm's MMF_* word; VMAS: the VMA list, stored whole)
PTE, VMAS, SUBS, FLAGS, MAPCOUNT, STABLE = "pte", "vmas", "subs", "flags", "mapcount", "stable"
MMFLAGS = "mmflags"
FRAME_REGIONS = (FLAGS, MAPCOUNT, STABLE)

def ptl(mm: int) -> tuple:
    return ("ptl", mm)


FRAME_LOCK = ("frame",)


class Effect:
    __slots__ = ()

    def footprint(self):      # default: touches nothing shared
        return ()


class Load(Effect):
    """Read region[mm][idx]: idx an int (an int), a list of ints (a list of ints) or an index array (an
    array); mm ignored for frame regions; VMAS: the live list."""
    __slots__ = ("region", "mm", "idx")

    def __init__(self, region, mm, idx=None):
        self.region, self.mm, self.idx = region, mm, idx

    def footprint(self):
        return _keys(self.region, self.mm, self.idx, "r")

    def __repr__(self):
        return f"load {_where(self.region, self.mm, self.idx)}"


class Store(Effect):
    __slots__ = ("region", "mm", "idx", "value")

    def __init__(self, region, mm, idx, value):
        self.region, self.mm, self.idx, self.value = region, mm, idx, value

    def footprint(self):
        return _keys(self.region, self.mm, self.idx, "w")

    def __repr__(self):
        return f"store {_where(self.region, self.mm, self.idx)} <- {_short(self.value)}"


class TryLock(Effect):
    """Take the lock if free; True/False.  (ksmd's trylock of a ptl.)"""
    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def footprint(self):
        return ((self.key, "w"),)

    def __repr__(self):
        return f"trylock {_lname(self.key)}"


class Lock(TryLock):
    """Take the lock, waiting while it is held (the driver bounds the wait: TimeoutError)."""
    __slots__ = ()

    def __repr__(self):
        return f"lock {_lname(self.key)}"


class Unlock(TryLock):
    __slots__ = ()

    def __repr__(self):
        return f"unlock {_lname(self.key)}"


class Alloc(Effect):
    """n new frames (mapcount 1) under the frame lock, a list of pfns (zeroed if zero); OutOfFrames if
    not enough are free.  scatter: one seed per frame, each taken from anywhere in the free frames
    (FrameAllocator.alloc_scattered), not zeroed."""
    __slots__ = ("n", "flags", "zero", "scatter")

    def __init__(self, n, flags, zero, scatter=None):
        self.n, self.flags, self.zero, self.scatter = n, flags, zero, scatter

    def footprint(self):
        return (FT_W, ALL_BYTES_W)

    def __repr__(self):
        return f"alloc {self.n} frame(s)"


class Put(Effect):
    """Drop one mapping of each frame; frames reaching 0 are freed (a free frame: FrameAccountingError)."""
    __slots__ = ("pfns",)

    def __init__(self, pfns):
        self.pfns = pfns

    def footprint(self):
        return (FT_W,)

    def __repr__(self):
        return f"put pfn {_short(self.pfns)}"


class Get(Put):
    """Add one mapping to each frame (a KSM page gaining a sharer)."""
    __slots__ = ()

    def __repr__(self):
        return f"get pfn {_short(self.pfns)}"


class PinKsm(Effect):
    """get_ksm_page: a reference on KSM frame pfn if it is still stable node d's page; True/False.

    pfn and d may be arrays (several pins under one hold of the frame lock): a bool array."""
    __slots__ = ("pfn", "d")

    def __init__(self, pfn, d):
        self.pfn, self.d = pfn, d

    def footprint(self):
        return (FT_W,)

    def __repr__(self):
        return f"pin ksm pfn {_short(self.pfn)} (node {_short(self.d)})"


class ZeroPagesAdd(Effect):
    """ksm_zero_pages += n, machine-wide and for mm (whoever maps or unmaps a KSM zero page)."""
    __slots__ = ("mm", "n")

    def __init__(self, mm, n):
        self.mm, self.n = mm, n

    def footprint(self):
        return (("zero_pages", "w"),)

    def __repr__(self):
        return f"ksm_zero_pages {self.n:+d} (mm {self.mm})"


class Candidates(Effect):
    """ksmd considered pages idx of mm as merge candidates and (mitigation "vusion") treated them as
    merged ones: write-protected.  Changes nothing: the checker's mark for its "same behaviour"
    invariant (a write to a candidate behaves alike whether it was merged or not)."""
    __slots__ = ("mm", "idx")

    def __init__(self, mm, idx):
        self.mm, self.idx = mm, idx

    def footprint(self):
        return _keys(PTE, self.mm, self.idx, "r")

    def __repr__(self):
        return f"candidates mm{self.mm}{_short(self.idx)}"


class SetFrame(Effect):
    """Make frame pfn the KSM page of stable node d (flags KSM, stable d)."""
    __slots__ = ("pfn", "flags", "d")

    def __init__(self, pfn, flags, d):
        self.pfn, self.flags, self.d = pfn, flags, d

    def footprint(self):
        return (FT_W,)

    def __repr__(self):
        return f"frame {self.pfn} <- flags {self.flags} node {self.d}"


class CopyPages(Effect):
    """Copy frame bytes src -> dst (lists or arrays of pfns)."""
    __slots__ = ("dst", "src")

    def __init__(self, dst, src):
        self.dst, self.src = dst, src

    def footprint(self):
        return bytes_footprint(self.src, "r") + bytes_footprint(self.dst, "w")

    def __repr__(self):
        return f"copy {_short(self.src)} -> {_short(self.dst)}"


class Compare(Effect):
    """memcmp of two frames (b None: with a zero page); True when equal.

    a and b may be arrays of pfns (b None: each with a zero page): a bool array."""
    __slots__ = ("a", "b")

    def __init__(self, a, b):
        self.a, self.b = a, b

    def footprint(self):
        a = np.atleast_1d(self.a)
        return bytes_footprint(a if self.b is None else np.concatenate([a, np.atleast_1d(self.b)]), "r")

    def __repr__(self):
        return f"memcmp {self.a} {'zero' if self.b is None else self.b}"


class Checksum(Effect):
    """The content keys of frames (calc_checksum), int64 array."""
    __slots__ = ("pfns",)

    def __init__(self, pfns):
        self.pfns = pfns

    def footprint(self):
        return bytes_footprint(self.pfns, "r")

    def __repr__(self):
        return f"checksum {_short(self.pfns)}"


class Notify(Effect):
    """Send notifier message `type` with `entries` (n x (addr, pte)) to each subscriber in subs of mm.

    Returns a handle for WaitAcks.  Sending never blocks.
    """
    __slots__ = ("mm", "type", "subs", "entries")

    def __init__(self, mm, type, subs, entries):
        self.mm, self.type, self.subs, self.entries = mm, type, subs, entries

    def footprint(self):
        return ((("chan", self.mm), "w"),)

    def __repr__(self):
        return f"send {self.type.name} x{len(self.entries)} to mm {self.mm} subs {list(self.subs)}"


class WaitAcks(Effect):
    """Wait for the acks of the given Notify handles: a list of ack flags (a subscriber that did
    not answer in time is released by the driver and contributes nothing)."""
    __slots__ = ("handles",)

    def __init__(self, handles):
        self.handles = handles

    def __repr__(self):
        return "wait acks"


class ShardSend(Effect):
    """Send msg (a core.shard message) to scanner `dst`; never blocks (several scanners)."""
    __slots__ = ("dst", "kind", "msg")

    def __init__(self, dst, kind, msg):
        self.dst, self.kind, self.msg = dst, kind, msg

    def footprint(self):
        return ((("shardq", self.dst), "w"),)

    def __repr__(self):
        return f"send {self.kind} {self.msg!r} to scanner {self.dst}"


class ShardRecv(Effect):
    """Wait for one `kind` message of round `seq` from each scanner in srcs: their list, in srcs
    order (older rounds' messages are dropped; the driver bounds the wait: TimeoutError)."""
    __slots__ = ("kind", "srcs", "seq")

    def __init__(self, kind, srcs, seq=None):
        self.kind, self.srcs, self.seq = kind, list(srcs), seq

    def __repr__(self):
        return f"wait {self.kind} from scanner(s) {self.srcs}"


class ShardReady(Effect):
    """Would ShardRecv(kind, srcs, seq) be answered now?  True or False, never waits (a poll: what a
    scanner does while the others are not ready, mm/ksm/ahead.py; older rounds' messages dropped)."""
    __slots__ = ("kind", "srcs", "seq")

    def __init__(self, kind, srcs, seq=None):
        self.kind, self.srcs, self.seq = kind, list(srcs), seq

    def __repr__(self):
        return f"poll {self.kind} from scanner(s) {self.srcs}"


class Reply(Effect):
    """The fault handler answers the faulting VM now (before the operation's end: early reply).

    With entries (n x (addr, new pte), wp_page_copy_reply) the reply carries a COW's new PTEs: the VM
    applies set_pte_at_notify's messages to its secondary MMUs on arrival and answers APPLIED; the
    result is then a handle for WaitAcks (that answer), else None."""
    __slots__ = ("err", "msg", "entries")

    def __init__(self, err=0, msg="", entries=None):
        self.err, self.msg, self.entries = err, msg, entries

    def footprint(self):
        return ((("reply",), "w"),)

    def __repr__(self):
        return f"reply err={self.err}"


class Fsck(Effect):
    """Rebuild the frame table from `maps` (PTE mappings per frame) and set each mm's
    ksm_zero_pages to `zero[mm]` (FrameAllocator.rebuild); returns what it changed."""
    __slots__ = ("maps", "zero")

    def __init__(self, maps, zero):
        self.maps, self.zero = maps, zero

    def footprint(self):
        return (FT_W, (("zero_pages",), "w"))

    def __repr__(self):
        return f"fsck frames ({int((self.maps > 0).sum())} mapped)"


# ---------------------------------------------------------------- the shared memory
class Memory:
    """The shared state the memory effects act on: frames, frame table, stats, the mms.

    `alloc` is a workers.runtime.frames.FrameAllocator; `mms` maps mm id -> MMView.  Backed by
    POSIX shared memory in an actor, by plain arrays under the checker.
    """

    def __init__(self, alloc, stats, mms=None):
        self.alloc = alloc
        self.ft = alloc.ft
        self.pages = alloc.pages
        self.stats = stats
        self.mms = {} if mms is None else mms
        self.memory = memoryview(alloc.mem)
        self.words = alloc.pages.view(np.uint64)     # the frames as rows of words (Compare)
        self._vmas: dict = {}           # mm id -> (table bytes, VMA list): a fault reads the list each time

    def vma_list(self, mm_id: int) -> list:
        """The mm's VMA list, parsed again only when its table's bytes changed (a copy: callers may edit it)."""
        key = self.mms[mm_id].vmas.tobytes()
        hit = self._vmas.get(mm_id)
        if hit is None or hit[0] != key:
            hit = self._vmas[mm_id] = (key, self.mms[mm_id].vma_list())
        return list(hit[1])

    def page_bytes(self, pfn: int) -> bytes:
        o = int(pfn) * PAGE_SIZE
        return self.memory[o:o + PAGE_SIZE].tobytes()

    def fsck(self, maps, zero: dict) -> dict:
        """The frame table from the mappings, and ksm_zero_pages from the PTEs (Fsck)."""
        from proto.layout import COUNTERS, MM_STATS
        done = self.alloc.rebuild(maps)
        zi, ci = MM_STATS.index("ksm_zero_pages"), COUNTERS.index("ksm_zero_pages")
        with self.alloc.lock:
            fixed = 0
            for mm_id, n in zero.items():
                fixed += int(self.stats.mm[mm_id, zi]) != n
                self.stats.mm[mm_id, zi] = n
            total = int(self.stats.mm[:, zi].sum())
            fixed += int(self.stats.counters[ci]) != total
            self.stats.counters[ci] = total
        done["zero_pages_fixed"] = fixed
        return done

    def zero_pages_add(self, mm_id: int, n: int) -> None:
        if not n:
            return
        from proto.layout import COUNTERS, MM_STATS
        with self.alloc.lock:
            self.stats.counters[COUNTERS.index("ksm_zero_pages")] += n
            self.stats.mm[mm_id, MM_STATS.index("ksm_zero_pages")] += n


def _load(m: Memory, e):
    r, idx = e.region, e.idx
    if r == PTE:
        a = m.mms[e.mm].pte
    elif r == VMAS:
        return m.vma_list(e.mm)
    elif r == SUBS:
        return [(s, bool(row[1])) for s, row in enumerate(m.mms[e.mm].subs.tolist()) if row[0]]
    elif r == MMFLAGS:
        return int(m.mms[e.mm].hdr[MMH_FLAGS])
    else:
        a = getattr(m.ft, r)
    c = idx.__class__
    if c is list:               # a list of indices: a list of ints (the fault core's pages)
        return [a.item(idx[0])] if len(idx) == 1 else a[idx].tolist()
    if c is int:
        return a.item(idx)
    v = a if idx is None else a[idx]
    return int(v) if np.ndim(v) == 0 else v.copy()


def _store(m: Memory, e):
    r, idx, value = e.region, e.idx, e.value
    if r == PTE:
        a = m.mms[e.mm].pte
        if idx.__class__ is list and len(idx) == 1 and value.__class__ is list:
            a[idx[0]] = value[0]
        else:
            a[idx] = value
    elif r == VMAS:         # a normalized list (core.pte.vma_table): the whole table is rewritten
        table = m.mms[e.mm].vmas
        table[:] = 0
        if value:
            table[:len(value)] = value
    elif r == MMFLAGS:
        m.mms[e.mm].hdr[MMH_FLAGS] = value
    elif r == SUBS:
        m.mms[e.mm].subs[idx] = value
    else:
        getattr(m.ft, r)[idx] = value


def _alloc(m: Memory, e) -> list:
    if e.scatter is not None:
        return m.alloc.alloc_scattered(e.scatter, e.flags).tolist()
    if e.n == 1:
        return [m.alloc.alloc_one(e.flags, e.zero)]
    return m.alloc.alloc(e.n, e.flags, zero=e.zero).tolist()


def _put(m: Memory, e) -> None:
    p = e.pfns
    if p.__class__ is list:
        if len(p) == 1:             # a one-page COW's old frame: no np.unique
            m.alloc.put_one(p[0])
        elif p:
            m.alloc.put(np.asarray(p, dtype=np.int64))
    elif np.ndim(p) == 0:
        m.alloc.put_one(int(p))
    elif len(p) == 1:
        m.alloc.put_one(int(p[0]))
    else:
        m.alloc.put(p)


def _get(m: Memory, e) -> None:
    m.alloc.get(np.atleast_1d(e.pfns))


def _pin_ksm(m: Memory, e):
    if np.ndim(e.pfn):          # several pins under one hold of the frame lock (several scanners)
        return m.alloc.pin_ksm_many(np.asarray(e.pfn, dtype=np.int64), np.asarray(e.d, dtype=np.int64))
    return m.alloc.pin_ksm(int(e.pfn), int(e.d))


def _zero_pages_add(m: Memory, e) -> None:
    m.zero_pages_add(e.mm, e.n)


def _candidates(m: Memory, e) -> None:
    return None


def _set_frame(m: Memory, e) -> None:
    m.ft.flags[e.pfn] = e.flags
    m.ft.stable[e.pfn] = e.d


def _copy_pages(m: Memory, e) -> None:
    dst, src = e.dst, e.src
    if len(dst) <= 8:           # a few pages: memoryview slices (a fancy-indexed copy costs more than the bytes)
        mem = m.memory
        for d, s in zip(dst, src):
            d *= PAGE_SIZE
            s *= PAGE_SIZE
            mem[d:d + PAGE_SIZE] = mem[s:s + PAGE_SIZE]
    else:
        m.pages[dst] = m.pages[src]


def _compare(m: Memory, e):
    if np.ndim(e.a):
        return compare_many(m.words, e.a, e.b)
    a = m.page_bytes(e.a)
    return a == (_ZERO_PAGE if e.b is None else m.page_bytes(e.b))


def _fsck(m: Memory, e) -> dict:
    return m.fsck(e.maps, e.zero)


def _checksum(m: Memory, e):
    mem = m.memory
    pf = np.atleast_1d(e.pfns)
    return np.fromiter((_digest(mem[o:o + PAGE_SIZE])[0] for o in (pf * PAGE_SIZE).tolist()),
                       dtype=np.int64, count=len(pf))


# effect class -> what runs it (one dict lookup per effect, no isinstance chain)
APPLY_MEM = {Load: _load, Store: _store, Alloc: _alloc, Put: _put, Get: _get, PinKsm: _pin_ksm,
             ZeroPagesAdd: _zero_pages_add, SetFrame: _set_frame, CopyPages: _copy_pages, Compare: _compare,
             Checksum: _checksum, Fsck: _fsck, Candidates: _candidates}
MEM_EFFECTS = frozenset(APPLY_MEM)


def apply_mem(m: Memory, e):
    """Run one memory effect against `m`; returns its result."""
    f = APPLY_MEM.get(e.__class__)
    if f is None:
        raise TypeError(f"not a memory effect: {e!r}")
    return f(m, e)


_ZERO_PAGE = bytes(PAGE_SIZE)


_COMPARE_ROWS = 64      # pairs compared at once: their 2 x 4 KiB copies stay in the CPU's cache


def compare_many(words: np.ndarray, a, b) -> np.ndarray:
    """memcmp of frames a[i] and b[i] (b None: with a zero page), as a bool array.  words: the frames
    as rows of uint64 (Memory.words).  Compared with numpy, _COMPARE_ROWS pairs at a time: a loop of
    per-page bytes compares (two copies and a Python step per pair) cost half as much again."""
    a = np.asarray(a, dtype=np.int64)
    out = np.empty(len(a), dtype=bool)
    if b is not None:
        b = np.asarray(b, dtype=np.int64)
    for s in range(0, len(a), _COMPARE_ROWS):
        x = words[a[s:s + _COMPARE_ROWS]]
        out[s:s + _COMPARE_ROWS] = ~x.any(axis=1) if b is None else (x == words[b[s:s + _COMPARE_ROWS]]).all(axis=1)
    return out


def under_ptl(mm: int, body):
    """Run generator body under ptl(mm): the lock is released on every path (not when abandoned: a
    checker run cut short, a killed actor, whose locks the kernel drops)."""
    yield Lock(ptl(mm))
    try:
        result = yield from body
    except GeneratorExit:
        raise
    except BaseException:
        yield Unlock(ptl(mm))
        raise
    yield Unlock(ptl(mm))
    return result


# ---------------------------------------------------------------- footprint helpers
# The frame table (flags, mapcount, stable, the allocator) is one resource; frame bytes are
# one resource per frame, and allocating (which may zero any free frame) conflicts with all.
FT_W = (("ft",), "w")
ALL_BYTES_W = (("bytes*",), "w")
_ALL_BYTES_R = (("bytes*",), "r")


def bytes_footprint(pfns, rw) -> tuple:
    return tuple((("bytes", int(p)), rw) for p in np.atleast_1d(pfns)) + (_ALL_BYTES_R,)


def _keys(region, mm, idx, rw):
    if region in FRAME_REGIONS:
        return ((("ft",), rw),)
    if region in (VMAS, SUBS, MMFLAGS):
        return (((region, mm), rw),)
    if idx is None:
        return (((region, mm, "*"), rw),)
    return tuple(((region, mm, int(i)), rw) for i in np.atleast_1d(idx))


def _short(v) -> str:
    if isinstance(v, np.ndarray):
        v = v.tolist()
    s = repr(v)
    return s if len(s) < 60 else s[:57] + "..."


def _where(region, mm, idx) -> str:
    if region in FRAME_REGIONS:
        return f"{region}[{_short(idx)}]"
    return f"{region} mm{mm}" + ("" if idx is None else f"[{_short(idx)}]")


def _lname(key) -> str:
    return f"{key[0]}(mm{key[1]})" if key[0] in ("ptl", "ksm") else "frame_lock"
