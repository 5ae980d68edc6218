"""`ksm-proto estimate`: how much KSM would save on real memory and images, at stability.

This module owns the estimate: it streams the pages of its sources (memsource.py)
through the scanner's page digest (pagehash.py), and computes what ksmd reaches
once every page has been scanned often enough that nothing changes any more,
under the knobs max_page_sharing, use_zero_pages and merge_across_nodes:
the counters under their sysfs names, per source the kernel's
ksm_process_profit, which sources share with which, and the most duplicated
page contents.  It also drives the check against the real kernel
(--verify-kernel, through kernel_ksm.merge_counts).

Same rules as the scanner, not a second algorithm
-------------------------------------------------
Pages of different contents never interact in ksmd's trees, so the state KSM
reaches is, content by content, what ksmd's per-page decisions make of that
content's n copies visited in scan order.  `content_outcome(n, M)` replays
exactly those decisions (ksmd.Ksmd.plan, i.e. mm/ksm.c cmp_and_merge_page)
on the scanner's own StableTree (ksm_tree.py): join the first stable dup with
room (StableTree.candidate under max_page_sharing), else pair with the page
waiting in the unstable tree into a new KSM page (StableTree.insert, which
turns a content with a full node into a chain of dups and counts
stable_node_chains / stable_node_dups), else wait in the unstable tree.  With
use_zero_pages a zero page is merged with the zero page before any tree
(ksm_zero_pages); with merge_across_nodes=0 each NUMA node has its own trees.
Contents are told apart by the full 128-bit digest where ksmd would memcmp.

Counting, and the choices an estimate has to make
--------------------------------------------------
- pages_scanned: the pages read (each once); ksmd's counter grows with every
  full scan, this one does not.
- Scan order is the order of the sources on the command line, then address
  (or file offset) order: it only decides *which* copy of a content is the one
  left unshared when a content has k * max_page_sharing + 1 copies.
- ksm_rmap_items: one rmap item per page KSM would scan, except pages merged
  with the zero page (use_zero_pages=1), whose items the kernel frees; that is
  the count /proc/PID/ksm_stat shows at stability for an mm whose areas are
  all mergeable.  Each costs sizeof(struct ksm_rmap_item), 64 bytes on 64-bit.
- ksm_process_profit (per source), as the kernel defines it:
  (ksm_merging_pages + ksm_zero_pages) * PAGE_SIZE - ksm_rmap_items * 64.
  general_profit is the same sum over all sources.
- bytes_saved: (pages_sharing + ksm_zero_pages) * PAGE_SIZE, the frames KSM
  frees, before the rmap items' cost; saved_share is that over the input.
- sharing: pages of source a that are merged and whose content source b also
  holds (a != b); on the diagonal, merged pages whose content occurs more than
  once in a itself.  Zero pages merged with the zero page are left out.
- A file's holes and zero-filled pages, and a process's written zero pages, are
  ordinary zero pages; a process's pages that map the shared zero page are not
  scanned by ksmd and are not counted (see memsource.py).
- Pages shared by fork (one frame mapped in two processes) are counted once per
  mapping: ksmd's counters do the same once that frame is merged with a third copy,
  but a content held only by one fork-shared frame is left alone by the kernel (it is
  one frame already), which the estimate, keeping no frame numbers, cannot tell.
"""
from __future__ import annotations

import bisect
import functools
import json
import os
import sys
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from proto.knobs import DEFAULTS, check_knob
from proto.layout import PAGE_SIZE

from workers.mm.ksm.merge import MERGE_TWO_PAGES, MERGE_WITH_KSM_PAGE, cmp_and_merge_decision
from workers.mm.ksm.stable_tree import StableTree
from workers.estimate.memsource import FileSource, NodeMap, PidSource, Source, SourceError, all_pids, dir_sources
from workers.mm.ksm.pagehash import _digest, default_threads, start_page_digests

SIZEOF_RMAP_ITEM = 64          # sizeof(struct ksm_rmap_item) on 64-bit Linux
BUF_PAGES = 1024               # pages per read buffer or file window (4 MiB); two in flight
KNOB_NAMES = ("max_page_sharing", "use_zero_pages", "merge_across_nodes")
EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_KERNEL = 0, 1, 2, 3
KERNEL_EXACT = ("pages_shared", "pages_sharing", "pages_unshared", "stable_node_chains", "stable_node_dups",
                "ksm_zero_pages", "general_profit")
PROC_EXACT = ("ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages", "ksm_process_profit")


# ---------------------------------------------------------------------------- the scanner's rules
@functools.lru_cache(maxsize=8192)
def content_outcome(n: int, max_page_sharing: int) -> tuple[int, int, int, int]:
    """What ksmd makes of n pages of one content at stability: (pages_shared, chains, dups, unshared).

    pages_shared: KSM pages (stable dups) of this content; chains: 1 if they form a
    chain (stable_node_chains), dups: stable_node_dups of it; unshared: the scan rank
    (0..n-1) of the page left waiting in the unstable tree, or -1.  Every other copy
    is merged.  The decisions are ksmd's, on its StableTree (see the module docstring);
    consecutive pages that take the same branch are taken together, and beyond three
    dups every further max_page_sharing copies add one full dup to the chain (a full
    dup never has room again), so the replay stays short for any n.
    """
    if n < 1:
        return 0, 0, 0, -1
    m = max_page_sharing
    if n >= 3 * m:
        q = n // m - 2
        s, c, d, u = content_outcome(n - q * m, m)
        return s + q, c, d + q, (u + q * m if u >= 0 else -1)
    tree = StableTree()
    key, waiting, r = 0, -1, 0
    while r < n:
        d = tree.candidate(key, m, lambda _d: True)
        kind = cmp_and_merge_decision(d, waiting >= 0)
        if kind == MERGE_WITH_KSM_PAGE:              # stable tree: a dup with room takes the next pages
            take = min(m - int(tree.count[d]), n - r)
            tree.count[d] += take
            r += take
        elif kind == MERGE_TWO_PAGES:                # unstable tree hit: the two become a new KSM page
            d = tree.insert(key)
            tree.count[d] = 2
            waiting = -1
            r += 1
        else:                                        # no match: wait in the unstable tree
            waiting = r
            r += 1
    shared = int(np.count_nonzero(tree.count[:tree.top] > 0))
    return shared, tree.chains, tree.dups, waiting


def current_knobs() -> tuple[dict, str]:
    """This machine's max_page_sharing / use_zero_pages / merge_across_nodes, or the kernel's defaults."""
    out, where = {}, "/sys/kernel/mm/ksm"
    for k in KNOB_NAMES:
        try:
            with open(f"/sys/kernel/mm/ksm/{k}") as f:
                out[k] = int(f.read().strip())
        except (OSError, ValueError):
            out[k] = DEFAULTS[k]
            where = "kernel defaults"
    return out, where


# ---------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                     # resets VmHWM to the current RSS
    except OSError:
        pass


class _Growable:
    """An int64 array grown by a quarter at a time (sized up front from the expected pages)."""

    def __init__(self, cap: int = 1 << 16):
        self.a = np.empty(max(1024, cap), np.int64)
        self.n = 0

    def extend(self, x: np.ndarray) -> None:
        if self.n + len(x) > len(self.a):
            b = np.empty(max(len(self.a) + len(self.a) // 4, self.n + len(x)), np.int64)
            b[:self.n] = self.a[:self.n]
            self.a = b
        self.a[self.n:self.n + len(x)] = x
        self.n += len(x)

    def view(self) -> np.ndarray:
        return self.a[:self.n]


# ---------------------------------------------------------------------------- the estimator
@dataclass
class _Piece:
    sid: int
    counted: int          # index of its first page among the source's counted pages
    stored: int           # index of its first non-zero page among all stored pages
    npages: int
    zmask: np.ndarray | None      # packed bits: which of its pages are all-zero (None: none)


@dataclass
class _Job:
    sid: int
    counted: int
    npages: int
    nodes: np.ndarray | None
    buf_id: int | None            # which of our buffers it hashes (None: the source's own memory)
    done: object                  # start_page_digests' callable
    mem: object                   # keeps the hashed memory alive until collected


class Estimator:
    """Feed it pages source by source (add_source, then feed each piece read); result() gives the estimate.

    Memory: two read buffers of BUF_PAGES pages; per non-zero page read, its two
    digest halves (16 bytes); per piece read, a bit per page saying which were zero.
    Zero pages are only counted, per source.  result() sorts the digests (8 more
    bytes per page) and walks the duplicated contents a chunk at a time.
    """

    CHUNK = 1 << 16               # pages handled at once in result() (bounds its temporaries)

    def __init__(self, knobs: dict, threads: int | None = None, keep_pages: bool = False,
                 track_nodes: bool = False, expected_pages: int = 0):
        self.knobs = {k: check_knob(k, knobs.get(k, DEFAULTS[k])) for k in KNOB_NAMES}
        self.threads = threads or default_threads()
        self.keep_pages = keep_pages
        self.track_nodes = track_nodes and not self.knobs["merge_across_nodes"]
        self.sources: list[Source] = []
        cap = expected_pages + 4096
        self.k0, self.k1 = _Growable(cap), _Growable(cap)
        self.nodes: list[np.ndarray] = []
        self.zero: dict[tuple[int, int], int] = {}      # (sid, node) -> zero pages
        self.seen: list[int] = []                        # per source: pages fed so far
        self.pieces: list[_Piece] = []
        self.kept: list[list] = []
        self.bufs = [np.empty(BUF_PAGES * PAGE_SIZE, np.uint8) for _ in range(2)]
        self.queue: deque[_Job] = deque()
        self.turn = 0
        self._current = 0

    # -- feeding
    def add_source(self, src: Source) -> int:
        self.sources.append(src)
        self.seen.append(0)
        self.kept.append([])
        return len(self.sources) - 1

    def get_buffer(self) -> np.ndarray:
        """The next read buffer; whatever was hashed from it before is collected first."""
        i = self.turn
        self.turn ^= 1
        while any(j.buf_id == i for j in self.queue):
            self._collect()
        self._current = i
        return self.bufs[i]

    def feed(self, sid: int, piece, progress=None) -> None:
        """A piece just read by source sid (in piece.buf, or in the buffer get_buffer() handed out last)."""
        n = piece.npages
        if piece.kind == "zero":
            self.zero[(sid, 0)] = self.zero.get((sid, 0), 0) + n
            self.seen[sid] += n
            if self.keep_pages:
                self.kept[sid].append(n)
        else:
            own = piece.buf is None
            mem = self.bufs[self._current] if own else piece.buf
            if self.keep_pages:
                self.kept[sid].append(np.frombuffer(mem, np.uint8, n * PAGE_SIZE).reshape(n, PAGE_SIZE).copy())
            self.queue.append(_Job(sid, self.seen[sid], n, piece.nodes, self._current if own else None,
                                   start_page_digests(mem, n, self.threads), mem))
            self.seen[sid] += n
            while len(self.queue) > 2:
                self._collect()
        if progress:
            progress(n)

    def _collect(self) -> None:
        """Store the digests of the oldest piece in flight."""
        job = self.queue.popleft()
        dig, zero = job.done()
        job.mem = job.done = None
        n = job.npages
        nz = ~zero
        nzero = n - int(np.count_nonzero(nz))
        if self.track_nodes and job.nodes is not None:
            zn = job.nodes[zero]
            for node in np.unique(zn).tolist():
                key = (job.sid, int(node))
                self.zero[key] = self.zero.get(key, 0) + int(np.count_nonzero(zn == node))
            self.nodes.append(job.nodes[nz].astype(np.int16))
        else:
            if nzero:
                self.zero[(job.sid, 0)] = self.zero.get((job.sid, 0), 0) + nzero
            if self.track_nodes:
                self.nodes.append(np.zeros(n - nzero, np.int16))
        self.pieces.append(_Piece(job.sid, job.counted, self.k0.n, n, np.packbits(zero) if nzero else None))
        self.k0.extend(dig[nz, 0])
        self.k1.extend(dig[nz, 1])

    def drain(self) -> None:
        while self.queue:
            self._collect()

    # -- locating a stored page again (for describing top contents)
    def locate(self, stored: int) -> tuple[int, int]:
        """(sid, counted index within that source) of stored (non-zero) page number `stored`."""
        j = bisect.bisect_right([p.stored for p in self.pieces], stored) - 1
        p = self.pieces[j]
        off = stored - p.stored
        if p.zmask is None:
            local = off
        else:
            local = int(np.flatnonzero(~np.unpackbits(p.zmask, count=p.npages).astype(bool))[off])
        return p.sid, p.counted + local

    def _groups(self) -> tuple[np.ndarray, np.ndarray]:
        """(order, gstart): stored pages sorted by content (and node), and where each content starts."""
        k0, k1 = self.k0.view(), self.k1.view()
        m = len(k0)
        if self.track_nodes:
            nodes = np.concatenate(self.nodes) if self.nodes else np.zeros(m, np.int16)
            order = np.lexsort((k1, k0, nodes))
            new = np.empty(m, bool)
            new[0] = True
            for i in range(0, m - 1, self.CHUNK):
                o = order[i:i + self.CHUNK + 1]
                new[i + 1:i + len(o)] = ((k0[o][1:] != k0[o][:-1]) | (k1[o][1:] != k1[o][:-1])
                                         | (nodes[o][1:] != nodes[o][:-1]))
            return order, np.flatnonzero(new)
        order = np.argsort(k0)
        new = np.empty(m, bool)
        new[0] = True
        clash = False
        for i in range(0, m - 1, self.CHUNK):                  # a block at a time: no full sorted copy
            o = order[i:i + self.CHUNK + 1]
            a = k0[o]
            d = a[1:] != a[:-1]
            new[i + 1:i + len(o)] = d
            b = k1[o]
            clash = clash or bool(np.any(b[1:][~d] != b[:-1][~d]))
        if clash:                                              # one 64-bit key, two contents: use both halves
            order = np.lexsort((k1, k0))
            for i in range(0, m - 1, self.CHUNK):
                o = order[i:i + self.CHUNK + 1]
                new[i + 1:i + len(o)] = (k0[o][1:] != k0[o][:-1]) | (k1[o][1:] != k1[o][:-1])
        return order, np.flatnonzero(new)

    # -- the answer
    def result(self, top: int = 10) -> dict:
        """The estimate.  Frees the stored digests: call it once."""
        self.drain()
        knobs = self.knobs
        M, use_zero = knobs["max_page_sharing"], knobs["use_zero_pages"]
        nsrc = len(self.sources)
        pages = np.array([s.pages for s in self.sources], np.int64)
        merging = np.zeros(nsrc, np.int64)
        zero_merged = np.zeros(nsrc, np.int64)
        shared = unshared = chains = dups = 0
        acc: dict[int, int] = {}                   # the sharing matrix, sparse: a * nsrc + b -> pages
        tops = []                                  # (copies, merged, pages_shared, sources, what)

        # zero pages: merged with the zero page, or one more content (per node)
        for node in sorted({n for _, n in self.zero}):
            z = np.zeros(nsrc, np.int64)
            for (sid, nd), c in self.zero.items():
                if nd == node:
                    z[sid] += c
            total = int(z.sum())
            if not total:
                continue
            if use_zero:
                zero_merged += z
                tops.append((total, total, 0, int(np.count_nonzero(z)), None))
                continue
            s, c, d, u = content_outcome(total, M)
            zm = z.copy()
            if u >= 0:
                zm[int(np.searchsorted(np.cumsum(z), u, side="right"))] -= 1
                unshared += 1
            shared, chains, dups = shared + s, chains + c, dups + d
            merging += zm
            if total >= 2:
                nz = np.flatnonzero(zm)
                _pairs(acc, nsrc, np.zeros(len(nz), np.int64), nz, zm[nz])
                tops.append((total, int(zm.sum()), s, int(np.count_nonzero(z)), None))

        m = self.k0.n
        if m:
            order, gstart = self._groups()
            gsize = np.diff(np.append(gstart, m))
            unshared += int(np.count_nonzero(gsize == 1))
            dupg = np.flatnonzero(gsize >= 2)
            # the most duplicated contents: where each was first seen, and its digest, before they go
            best = dupg[np.argsort(-gsize[dupg], kind="stable")[:top]]
            firsts = {int(g): int(order[gstart[g]:gstart[g] + gsize[g]].min()) for g in best.tolist()}
            digests = {g: (int(self.k0.a[i]), int(self.k1.a[i])) for g, i in firsts.items()}
            self.k0 = self.k1 = None
            self.nodes = []
            src_of = np.repeat(np.array([p.sid for p in self.pieces], np.int32),
                               np.diff(np.append([p.stored for p in self.pieces], m)))
            sizes = np.unique(gsize[dupg])
            table = np.array([content_outcome(int(n), M) for n in sizes.tolist()], np.int64).reshape(-1, 4)
            top_out = {}
            # the duplicated contents, a chunk of pages at a time
            cum = np.cumsum(gsize[dupg])
            lo = 0
            while lo < len(dupg):
                hi = max(lo + 1, int(np.searchsorted(cum, (cum[lo - 1] if lo else 0) + self.CHUNK, "right")))
                cg = dupg[lo:hi]
                dn = gsize[cg]
                out = table[np.searchsorted(sizes, dn)]
                shared += int(out[:, 0].sum())
                chains += int(out[:, 1].sum())
                dups += int(out[:, 2].sum())
                idx = order[np.repeat(gstart[cg], dn) + _ranges(dn)]     # stored indices, content by content
                gl = np.repeat(np.arange(len(cg), dtype=np.int64), dn)
                merged = np.ones(len(idx), bool)
                left = np.flatnonzero(out[:, 3] >= 0)                     # one copy left unshared
                if len(left):
                    unshared += len(left)
                    merged[_nth_in_scan_order(idx, gl, dn, left, out[left, 3])] = False
                src = src_of[idx]
                merging += np.bincount(src[merged], minlength=nsrc)
                code = gl[merged] * nsrc + src[merged]
                uc, cnt = np.unique(code, return_counts=True)
                _pairs(acc, nsrc, uc // nsrc, uc % nsrc, cnt)
                for j in np.flatnonzero(np.isin(cg, best)).tolist():
                    g = int(cg[j])
                    seg = src[gl == j]
                    top_out[g] = (int(dn[j]), int(dn[j]) - (1 if out[j, 3] >= 0 else 0), int(out[j, 0]),
                                  int(len(np.unique(seg))), (firsts[g], digests[g]))
                del idx, gl, merged, src, code
                lo = hi
            tops += list(top_out.values())
            del order, gstart, gsize, src_of

        sharing_pages = int(merging.sum()) - shared
        zero_pages = int(zero_merged.sum())
        rmap = pages - zero_merged
        profit = (merging + zero_merged) * PAGE_SIZE - rmap * SIZEOF_RMAP_ITEM
        total = int(pages.sum())
        sharing = [[k // nsrc, k % nsrc, v] for k, v in acc.items()]
        sharing.sort(key=lambda x: (-x[2], x[0], x[1]))
        return {
            "knobs": dict(knobs),
            "pages_scanned": total,
            "pages_shared": shared,
            "pages_sharing": sharing_pages,
            "pages_unshared": unshared,
            "pages_volatile": 0,
            "ksm_zero_pages": zero_pages,
            "stable_node_chains": chains,
            "stable_node_dups": dups,
            "ksm_rmap_items": int(rmap.sum()),
            "general_profit": (sharing_pages + zero_pages) * PAGE_SIZE - int(rmap.sum()) * SIZEOF_RMAP_ITEM,
            "bytes_saved": (sharing_pages + zero_pages) * PAGE_SIZE,
            "saved_share": round((sharing_pages + zero_pages) / total, 6) if total else 0.0,
            "sizeof_rmap_item": SIZEOF_RMAP_ITEM,
            "sources": [{
                "name": s.name, "kind": s.kind, "pages": int(pages[i]),
                "ksm_rmap_items": int(rmap[i]), "ksm_merging_pages": int(merging[i]),
                "ksm_zero_pages": int(zero_merged[i]), "ksm_process_profit": int(profit[i]),
                "skipped": dict(s.skipped), "problems": list(s.problems),
            } for i, s in enumerate(self.sources)],
            "sharing": sharing,
            "top_contents": [self._describe(t) for t in sorted(tops, key=lambda t: -t[0])[:top]],
        }

    def _describe(self, t) -> dict:
        copies, merged, shared, nsrc, first = t
        d = {"copies": copies, "merged": merged, "pages_saved": max(0, merged - shared), "sources": nsrc}
        if first is None:
            d.update(kind="zero", description="zero page")
            return d
        stored, digest = first
        sid, counted = self.locate(stored)
        src = self.sources[sid]
        where = src.where(counted)
        d["first_seen"] = f"{src.name} @ {where:#x}" if where is not None else src.name
        page = src.read_page(where) if where is not None else None
        if page is None:
            d.update(kind="unknown", description="(could not be read again)")
        else:
            d.update(describe_page(page))
            if tuple(_digest(page)) != digest:
                d["description"] += " (changed since it was read)"
        return d


def _pairs(acc: dict, nsrc: int, g: np.ndarray, s: np.ndarray, c: np.ndarray) -> None:
    """Add to the sharing matrix the entries (content g, source s, c merged pages), sorted by g.

    Cell (a, b): merged pages of a whose content b has merged too; (a, a): merged pages of a
    whose content a has merged at least twice.
    """
    if not len(g):
        return
    cuts = np.flatnonzero(np.diff(g) != 0) + 1
    gs = np.concatenate(([0], cuts))
    size = np.diff(np.append(gs, len(g)))
    one = gs[size == 1]
    one = one[c[one] >= 2]                               # one source only: its own diagonal
    codes = [s[one].astype(np.int64) * nsrc + s[one]]
    weights = [c[one]]
    multi = np.flatnonzero(size > 1)
    i = 0
    while i < len(multi):                                # every pair within a content, in bounded chunks
        j, budget = i, 0
        while j < len(multi) and (budget == 0 or budget + int(size[multi[j]]) ** 2 <= 1 << 22):
            budget += int(size[multi[j]]) ** 2
            j += 1
        ps, pz = gs[multi[i:j]], size[multi[i:j]]
        a_ent = np.repeat(ps, pz) + _ranges(pz)           # every entry of these contents
        rep = np.repeat(pz, pz)
        a_all = np.repeat(a_ent, rep)
        b_all = np.repeat(np.repeat(ps, pz), rep) + _ranges(rep)
        keep = (a_all != b_all) | (c[a_all] >= 2)
        codes.append(s[a_all[keep]].astype(np.int64) * nsrc + s[b_all[keep]])
        weights.append(c[a_all[keep]])
        i = j
    code = np.concatenate(codes)
    if len(code):
        u, inv = np.unique(code, return_inverse=True)
        tot = np.bincount(inv, weights=np.concatenate(weights))
        for k, v in zip(u.tolist(), tot.tolist()):
            acc[k] = acc.get(k, 0) + int(v)


def _ranges(sizes: np.ndarray) -> np.ndarray:
    """Concatenated arange(s) for every s in sizes."""
    total = int(sizes.sum())
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    return np.arange(total, dtype=np.int64) - np.repeat(starts, sizes)


def _nth_in_scan_order(idx: np.ndarray, gl: np.ndarray, dn: np.ndarray, groups: np.ndarray,
                       ranks: np.ndarray) -> np.ndarray:
    """Positions (into idx) of the page of scan rank ranks[i] within group groups[i]."""
    want = np.zeros(len(dn), bool)
    want[groups] = True
    sel = np.flatnonzero(want[gl])                       # every page of those groups
    o = np.lexsort((idx[sel], gl[sel]))                  # by group, then scan order
    sel = sel[o]
    first = np.searchsorted(gl[sel], groups)             # where each group starts in sel
    return sel[first + ranks]


def describe_page(page: bytes) -> dict:
    """A short description of a page's content: zero page, one repeated byte, text, or other."""
    a = np.frombuffer(page, np.uint8)
    if not a.any():
        return {"kind": "zero", "description": "zero page"}
    if (a == a[0]).all():
        return {"kind": "byte", "description": f"one repeated byte {a[0]:#04x}"}
    body = a[:len(a) - int(np.argmax(a[::-1] != 0))]         # text may be zero-padded at the end
    printable = ((body >= 32) & (body < 127)) | (body == 9) | (body == 10) | (body == 13)
    if len(body) and printable.mean() >= 0.95:
        snippet = " ".join(bytes(body[:160]).decode("ascii", "replace").split())[:48]
        return {"kind": "text", "description": f"text: {snippet!r}"}
    zeros = int(np.count_nonzero(a == 0))
    head = bytes(a[:8]).hex()
    if page[:4] == b"\x7fELF":
        what = "ELF header"
    elif zeros > len(a) // 2:
        what = f"{100 * zeros // len(a)}% zero bytes"
    else:
        what = "binary"
    return {"kind": "other", "description": f"other: {what}, starts {head}"}


# ---------------------------------------------------------------------------- running it
def open_sources(specs: list[tuple[str, str]], opts, problems: list[str]) -> list[Source]:
    """Open every source spec ("pid"|"file"|"dir"|"all-pids", value); problems get a line for each failure."""
    node_map = NodeMap.of_this_machine() if not opts.get("merge_across_nodes", 1) else None
    out: list[Source] = []
    seen_files: dict = {}
    seen_pids: set = set()
    me = os.getpid()

    def add_file(src: FileSource) -> None:
        try:
            src.open()
        except SourceError as e:
            if not (src.in_dir and "empty" in str(e)):
                problems.append(str(e))
            return
        if src.ident in seen_files:
            problems.append(f"{src.name}: the same file as {seen_files[src.ident]}; counted once")
            return
        if src.ident:
            seen_files[src.ident] = src.name
        out.append(src)

    def add_pid(pid: int, quiet: bool) -> None:
        if pid in seen_pids:
            return
        seen_pids.add(pid)
        if pid == me:
            if not quiet:
                problems.append(f"pid:{pid}: this process itself; not counted")
            return
        src = PidSource(pid, all_mappings=opts.get("all_mappings", False),
                        only_mergeable=opts.get("only_mergeable", False), node_map=node_map, quiet_gone=quiet)
        try:
            src.open()
        except SourceError as e:
            if not quiet or not (src.kernel_thread or "gone" in str(e)):
                problems.append(str(e))
            return
        out.append(src)

    for kind, value in specs:
        if kind == "pid":
            if not str(value).isdigit():
                problems.append(f"pid:{value}: not a process id")
                continue
            add_pid(int(value), False)
        elif kind == "all-pids":
            for pid in all_pids():
                add_pid(pid, True)
        elif kind == "file":
            add_file(FileSource(value))
        elif kind == "dir":
            for f in dir_sources(value, problems):
                add_file(f)
    return out


def estimate(sources: list[Source], knobs: dict, threads: int | None = None, progress=None,
             keep_pages: bool = False, top: int = 10) -> tuple[dict, Estimator]:
    """Read every source and compute the estimate; returns (result dict, the Estimator)."""
    _reset_peak()
    rss0 = _status_kb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    est = Estimator(knobs, threads, keep_pages=keep_pages, expected_pages=sum(s.expected for s in sources),
                    track_nodes=any(getattr(s, "node_map", None) is not None for s in sources))
    for s in sources:
        sid = est.add_source(s)
        try:
            for piece in s.read(est.get_buffer):
                est.feed(sid, piece, progress)
        except SourceError as e:
            if not (getattr(s, "quiet_gone", False) and "gone" in str(e)):     # --all-pids: it just ended
                s.problems.append(str(e))
    read_s = time.perf_counter() - t0
    res = est.result(top=top)
    el = time.perf_counter() - t0
    peak = max(0, _status_kb("VmHWM") - rss0) * 1024
    total = res["pages_scanned"]
    res["problems"] = [p for s in sources for p in s.problems]
    res["seconds"] = round(el, 3)
    res["read_seconds"] = round(read_s, 3)
    res["pages_per_s"] = round(total / el) if el > 0 else None
    res["cpu_seconds"] = round(time.process_time() - c0, 3)          # all threads: robust on a busy machine
    res["peak_memory_bytes"] = peak
    res["memory_bytes_per_page"] = round(peak / total, 2) if total else None
    res["hash_threads"] = est.threads
    if keep_pages:
        res["memory_note"] = "peak_memory_bytes includes the copy of every page kept for --verify-kernel"
    return res, est


def verify_kernel(est: Estimator, res: dict, timeout: float = 300) -> dict:
    """The same pages in helper processes, merged by the real KSM; the kernel's counters beside ours."""
    from workers.oracle import kernel_ksm
    ok, why = kernel_ksm.available()
    if not ok:
        return {"error": f"kernel KSM not usable here: {why}"}
    layouts, names, rows = [], [], []
    for i, s in enumerate(est.sources):
        parts = [np.zeros((k, PAGE_SIZE), np.uint8) if isinstance(k, int) else k for k in est.kept[i]]
        est.kept[i] = []                                  # one copy at a time, not two
        if parts:
            layouts.append(np.concatenate(parts))
            names.append(s.name)
            rows.append(i)
        del parts
    if not layouts:
        return {"error": "no pages to load"}
    knobs = {**est.knobs, "smart_scan": 0}
    with kernel_ksm.KernelKSM():
        now = kernel_ksm.KernelKSM.stats()
        busy = now.get("pages_shared", 0) + now.get("pages_sharing", 0) + now.get("ksm_zero_pages", 0)
        if busy or kernel_ksm.read_knob("run") != "0":
            return {"error": f"KSM is in use on this machine (run={kernel_ksm.read_knob('run')}, {busy} pages "
                             f"merged): --verify-kernel would unmerge them all; not done"}
        k = kernel_ksm.merge_counts(layouts, knobs, full_scans=3, timeout=timeout)
    kern = {c: k["ksm"].get(c) for c in KERNEL_EXACT if c in k["ksm"]}
    out = {"ksm": kern, "others": {str(p): v for p, v in k["others"].items()}, "procs": []}
    mism = []
    if not k["others"]:
        for c, v in kern.items():
            if res[c] != v:
                mism.append(f"{c}: estimate {res[c]}, kernel {v}")
    for name, i, st in zip(names, rows, k["procs"]):
        mine = res["sources"][i]
        out["procs"].append({"name": name, **{c: st.get(c) for c in PROC_EXACT}})
        for c in PROC_EXACT:
            if c in st and mine[c] != st[c]:
                mism.append(f"{name}: {c}: estimate {mine[c]}, kernel {st[c]}")
    out["mismatches"] = mism
    out["match"] = not mism
    if k["others"]:
        out["note"] = (f"{len(k['others'])} other process(es) had pages under KSM: the global counters "
                       f"include theirs; only the per-process ones were compared")
    return out


# ---------------------------------------------------------------------------- output
def _mib(b: int) -> str:
    return f"{b / 2**20:,.1f} MiB"


def render(res: dict, console, top_sources: int = 20) -> None:
    """The estimate as rich tables."""
    from rich.table import Table
    k = res["knobs"]
    console.print(f"[bold]KSM estimate[/bold]: {len(res['sources'])} sources, {res['pages_scanned']:,} pages "
                  f"({_mib(res['pages_scanned'] * PAGE_SIZE)}) in {res['seconds']} s "
                  f"({res['pages_per_s'] or 0:,} pages/s), peak memory {_mib(res['peak_memory_bytes'])}; "
                  f"max_page_sharing={k['max_page_sharing']} use_zero_pages={k['use_zero_pages']} "
                  f"merge_across_nodes={k['merge_across_nodes']}")
    t = Table(title="at stability", show_header=True)
    t.add_column("counter")
    t.add_column("estimate", justify="right")
    kern = res.get("kernel", {}).get("ksm")
    if kern:
        t.add_column("kernel", justify="right")
    for c in ("pages_scanned", "pages_shared", "pages_sharing", "pages_unshared", "ksm_zero_pages",
              "stable_node_chains", "stable_node_dups", "ksm_rmap_items", "general_profit", "bytes_saved"):
        row = [c, f"{res[c]:,}"]
        if kern:
            v = kern.get(c)
            row.append("" if v is None else (f"[green]{v:,}" if v == res[c] else f"[red]{v:,}"))
        t.add_row(*row)
    t.add_row("saved", f"{_mib(res['bytes_saved'])} ({100 * res['saved_share']:.1f}%)", *([""] if kern else []))
    console.print(t)
    srcs = sorted(enumerate(res["sources"]), key=lambda x: -x[1]["ksm_process_profit"])
    t = Table(title=f"sources by ksm_process_profit (top {min(top_sources, len(srcs))} of {len(srcs)})")
    for c, j in (("source", "left"), ("pages", "right"), ("merging", "right"), ("zero", "right"),
                 ("rmap items", "right"), ("profit", "right")):
        t.add_column(c, justify=j)
    for i, s in srcs[:top_sources]:
        t.add_row(s["name"], f"{s['pages']:,}", f"{s['ksm_merging_pages']:,}", f"{s['ksm_zero_pages']:,}",
                  f"{s['ksm_rmap_items']:,}", _mib(s["ksm_process_profit"]))
    console.print(t)
    pairs = _pairs_both_ways(res["sharing"])[:10]
    if pairs:
        t = Table(title="who shares with whom: merged pages of one whose content the other holds")
        for c, j in (("A", "left"), ("B", "left"), ("A's pages", "right"), ("B's pages", "right")):
            t.add_column(c, justify=j)
        for a, b, ab, ba in pairs:
            t.add_row(res["sources"][a]["name"], res["sources"][b]["name"], f"{ab:,}", f"{ba:,}")
        console.print(t)
    if res["top_contents"]:
        t = Table(title="most duplicated contents")
        for c, j in (("copies", "right"), ("saved", "right"), ("sources", "right"), ("content", "left")):
            t.add_column(c, justify=j)
        for c in res["top_contents"]:
            t.add_row(f"{c['copies']:,}", f"{c['pages_saved']:,}", str(c["sources"]), c["description"])
        console.print(t)


def _pairs_both_ways(sharing: list) -> list:
    """[(a, b, cell a->b, cell b->a)] for a < b, the most shared first."""
    cell = {(a, b): n for a, b, n in sharing if a != b}
    both = {(min(a, b), max(a, b)) for a, b in cell}
    out = [(a, b, cell.get((a, b), 0), cell.get((b, a), 0)) for a, b in both]
    out.sort(key=lambda x: (-(x[2] + x[3]), x[0], x[1]))
    return out


def render_plain(res: dict, out=sys.stdout) -> None:
    """The same, as plain lines (piped output)."""
    k = res["knobs"]
    p = lambda s="": print(s, file=out)  # noqa: E731
    p(f"KSM estimate: {len(res['sources'])} sources, {res['pages_scanned']} pages in {res['seconds']} s "
      f"({res['pages_per_s']} pages/s), peak memory {res['peak_memory_bytes']} bytes; "
      f"max_page_sharing={k['max_page_sharing']} use_zero_pages={k['use_zero_pages']} "
      f"merge_across_nodes={k['merge_across_nodes']}")
    kern = res.get("kernel", {}).get("ksm") or {}
    for c in ("pages_scanned", "pages_shared", "pages_sharing", "pages_unshared", "ksm_zero_pages",
              "stable_node_chains", "stable_node_dups", "ksm_rmap_items", "general_profit", "bytes_saved"):
        p(f"  {c:20s} {res[c]:>14}" + (f"   kernel {kern[c]}" if c in kern else ""))
    p(f"  saved {_mib(res['bytes_saved'])} ({100 * res['saved_share']:.1f}% of the input)")
    for s in sorted(res["sources"], key=lambda s: -s["ksm_process_profit"])[:20]:
        p(f"  {s['name']}: pages={s['pages']} merging={s['ksm_merging_pages']} zero={s['ksm_zero_pages']} "
          f"rmap_items={s['ksm_rmap_items']} ksm_process_profit={s['ksm_process_profit']}")
    for a, b, ab, ba in _pairs_both_ways(res["sharing"])[:10]:
        p(f"  shared: {res['sources'][a]['name']} ({ab} pages) <-> {res['sources'][b]['name']} ({ba} pages)")
    for c in res["top_contents"]:
        p(f"  {c['copies']} copies, {c['pages_saved']} pages saved, {c['sources']} sources: {c['description']}")


def plot(res: dict, path: str, top_sources: int = 15) -> None:
    """Savings by source (ksm_process_profit) and the sharing matrix as a heat map, in one PNG."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'ksm-proto[bench]' (or pip install matplotlib)") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm, Normalize
    srcs = res["sources"]
    by_profit = sorted(range(len(srcs)), key=lambda i: -srcs[i]["ksm_process_profit"])[:top_sources]
    pick = [i for i in sorted(range(len(srcs)), key=lambda i: -srcs[i]["ksm_merging_pages"])[:top_sources]
            if srcs[i]["ksm_merging_pages"] > 0]
    side = max(4.5, 0.45 * max(len(by_profit), len(pick)) + 2.5)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7 + side, side), gridspec_kw={"width_ratios": [7, side]})
    names = [_short(srcs[i]["name"]) for i in by_profit][::-1]
    vals = [srcs[i]["ksm_process_profit"] / 2**20 for i in by_profit][::-1]
    zero = [srcs[i]["ksm_zero_pages"] * PAGE_SIZE / 2**20 for i in by_profit][::-1]
    ax1.barh(names, vals, color=["#2a7" if v >= 0 else "#c44" for v in vals], label="ksm_process_profit")
    if any(zero):
        ax1.barh(names, zero, color="#9cd", label="of which zero pages")
        ax1.legend(loc="lower right")
    ax1.set_xlabel("ksm_process_profit (MiB)")
    ax1.set_title(f"savings by source (top {len(by_profit)} of {len(srcs)})")
    ax1.grid(axis="x", alpha=.3)
    if pick:
        pos = {s: j for j, s in enumerate(pick)}
        mat = np.zeros((len(pick), len(pick)))
        for a, b, n in res["sharing"]:
            if a in pos and b in pos:
                mat[pos[a], pos[b]] = n
        nz = mat[mat > 0]
        lo, hi = (nz.min(), nz.max()) if len(nz) else (1, 2)
        norm = LogNorm(vmin=max(1, lo), vmax=max(hi, lo + 1)) if hi / max(lo, 1) > 100 else Normalize(0, hi)
        im = ax2.imshow(np.where(mat > 0, mat, np.nan), cmap="viridis", norm=norm)
        if len(pick) <= 12:
            for (r, c), v in np.ndenumerate(mat):
                if v:
                    ax2.text(c, r, f"{v / 1000:.1f}k" if v >= 1000 else f"{int(v)}", ha="center", va="center",
                             fontsize=7, color="w" if norm(v) < 0.6 else "k")
        labels = [_short(srcs[i]["name"], 26) for i in pick]
        ax2.set_xticks(range(len(pick)), labels, rotation=45, ha="right", fontsize=8)
        ax2.set_yticks(range(len(pick)), labels, fontsize=8)
        ax2.set_xlabel("B: also has the content merged")
        ax2.set_ylabel("A: its merged pages")
        fig.colorbar(im, ax=ax2, shrink=0.8, label="pages")
    else:
        ax2.text(0.5, 0.5, "nothing merged", ha="center", va="center")
        ax2.set_axis_off()
    ax2.set_title("who shares with whom (merged pages of A whose content B holds)", fontsize=10)
    fig.suptitle(f"KSM estimate: {_mib(res['bytes_saved'])} of {_mib(res['pages_scanned'] * PAGE_SIZE)} saved "
                 f"({100 * res['saved_share']:.1f}%), max_page_sharing={res['knobs']['max_page_sharing']}, "
                 f"use_zero_pages={res['knobs']['use_zero_pages']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _short(name: str, n: int = 34) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


# ---------------------------------------------------------------------------- the command
class _AddSource:
    """argparse action keeping --pid/--file/--dir in command-line order (the scan order)."""

    @staticmethod
    def make(kind: str):
        import argparse

        class A(argparse.Action):
            def __call__(self, parser, ns, values, option_string=None):
                specs = getattr(ns, "sources", None) or []
                if kind == "all-pids":
                    specs.append(("all-pids", ""))
                else:
                    specs += [(kind, v) for v in values]
                ns.sources = specs
        return A


def add_arguments(p) -> None:
    """The `estimate` subcommand's arguments."""
    p.set_defaults(sources=[])
    p.add_argument("--pid", nargs="+", metavar="PID", action=_AddSource.make("pid"),
                   help="processes: their anonymous private memory (root reads /proc/PID/mem)")
    p.add_argument("--all-pids", nargs=0, action=_AddSource.make("all-pids"),
                   help="every process of this machine (kernel threads and this one aside)")
    p.add_argument("--file", nargs="+", metavar="PATH", action=_AddSource.make("file"),
                   help="files or raw memory images (block devices too), page by page")
    p.add_argument("--dir", nargs="+", metavar="DIR", action=_AddSource.make("dir"),
                   help="every regular file below DIR, one source each")
    p.add_argument("--all-mappings", action="store_true",
                   help="processes: also private file-backed areas (their copied-on-write pages)")
    p.add_argument("--only-mergeable", action="store_true",
                   help="processes: only areas already advised MADV_MERGEABLE (what ksmd would scan now)")
    p.add_argument("--max-page-sharing", type=int, metavar="N", help="default: this machine's, else 256")
    p.add_argument("--use-zero-pages", type=int, choices=[0, 1], help="default: this machine's, else 0")
    p.add_argument("--merge-across-nodes", type=int, choices=[0, 1], help="default: this machine's, else 1")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--plot", metavar="FILE.png", help="savings by source and the sharing matrix")
    p.add_argument("--verify-kernel", action="store_true",
                   help="load the same pages into helper processes, let the real KSM merge them, compare")
    p.add_argument("--top", type=int, default=10, metavar="N", help="most duplicated contents to show (10)")
    p.add_argument("--threads", type=int, metavar="N", help="hashing threads (default: one per CPU)")
    from workers.estimate.watch import add_watch_arguments
    add_watch_arguments(p)


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cli(a) -> int:
    """Run `ksm-proto estimate`; returns the exit status (0 ok, 1 some input unreadable, 2 usage, 3 kernel)."""
    err = sys.stderr
    if getattr(a, "watch", None) is not None:
        from workers.estimate.watch import cli as watch_cli
        return watch_cli(a)
    if not a.sources:
        print("ksm-proto estimate: nothing to estimate: give --pid, --all-pids, --file or --dir", file=err)
        return EXIT_USAGE
    knobs, where = current_knobs()
    for name in KNOB_NAMES:
        v = getattr(a, name)
        if v is not None:
            try:
                knobs[name] = check_knob(name, v)
            except OSError as e:
                print(f"ksm-proto estimate: --{name.replace('_', '-')}: {e.strerror}", file=err)
                return EXIT_USAGE
    if a.threads is not None and a.threads < 1:
        print("ksm-proto estimate: --threads must be at least 1", file=err)
        return EXIT_USAGE
    problems: list[str] = []
    sources = open_sources(a.sources, {**knobs, "all_mappings": a.all_mappings,
                                       "only_mergeable": a.only_mergeable}, problems)
    for p in problems:
        print(f"ksm-proto estimate: {p}", file=err)
    if not sources:
        print("ksm-proto estimate: no readable source", file=err)
        return EXIT_USAGE
    expected = sum(s.expected for s in sources)
    if a.verify_kernel and 2 * expected * PAGE_SIZE > _mem_available() // 2:
        print(f"ksm-proto estimate: --verify-kernel needs the {_mib(expected * PAGE_SIZE)} of input in memory twice "
              f"(here and in the helper processes), more than half of MemAvailable "
              f"({_mib(_mem_available())}); not started", file=err)
        return EXIT_USAGE
    tty = err.isatty()
    prog = None
    if tty:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeRemainingColumn, TransferSpeedColumn
        prog = Progress("[bold]reading pages", BarColumn(), TaskProgressColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    try:
        if prog:
            with prog:
                task = prog.add_task("read", total=max(1, expected) * PAGE_SIZE)
                res, est = estimate(sources, knobs, a.threads, lambda n: prog.advance(task, n * PAGE_SIZE),
                                    keep_pages=a.verify_kernel, top=a.top)
        else:
            res, est = estimate(sources, knobs, a.threads, keep_pages=a.verify_kernel, top=a.top)
    except KeyboardInterrupt:
        print("ksm-proto estimate: interrupted", file=err)
        return 130
    res["knobs_from"] = where if not any(getattr(a, n) is not None for n in KNOB_NAMES) else "command line"
    res["problems"] = problems + res["problems"]
    for p in res["problems"][len(problems):]:
        print(f"ksm-proto estimate: {p}", file=err)
    status = EXIT_PARTIAL if res["problems"] else EXIT_OK
    if a.verify_kernel:
        if tty:
            print("ksm-proto estimate: the real KSM is merging the same pages (a few seconds)...", file=err)
        try:
            res["kernel"] = verify_kernel(est, res)
        except (OSError, TimeoutError, RuntimeError) as e:
            res["kernel"] = {"error": str(e)}
        kv = res["kernel"]
        if "error" in kv:
            print(f"ksm-proto estimate: --verify-kernel: {kv['error']}", file=err)
            status = EXIT_KERNEL
        elif not kv["match"]:
            for m in kv["mismatches"]:
                print(f"ksm-proto estimate: kernel differs: {m}", file=err)
            status = EXIT_KERNEL
    del est
    if a.plot:
        try:
            plot(res, a.plot)
        except (RuntimeError, OSError) as e:
            print(f"ksm-proto estimate: --plot: {e}", file=err)
            status = status or EXIT_USAGE
    if a.json:
        print(json.dumps(res))
    elif sys.stdout.isatty():
        from rich.console import Console
        render(res, Console())
    else:
        render_plain(res)
    if a.verify_kernel and not a.json and "kernel" in res and "error" not in res["kernel"]:
        print("kernel: " + ("every counter equal" if res["kernel"]["match"] else "DIFFERENT: " +
                            "; ".join(res["kernel"]["mismatches"])))
    return status
