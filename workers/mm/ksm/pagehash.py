"""The page digest: how ksm-proto turns 4 KiB of page content into its tree key.

This module owns the one hash every part of ksm-proto uses for page contents,
so that the scanner (ksmd.py) and the estimate (estimate.py) agree bit for bit:
mmh3 x64-128 of the page's 4096 bytes, read as two little-endian int64 halves.
The first half is the key the stable and unstable trees are indexed by (the
kernel's checksum plays that role for its unstable tree); the second half is
what the estimate uses in place of ksmd's memcmp, since it keeps no pages.

    page_key(buf) -> int                 the scanner's key of one page
    page_digests(buf, n) -> (n, 2) i64   both halves for n consecutive pages
    start_page_digests(buf, n, threads)  the same, started on a thread pool,
                                         all-zero pages found in bulk with numpy and
                                         not hashed (their digest is ZERO_DIGEST);
                                         mmh3 releases the GIL, so threads > 1 hashes
                                         in parallel
Pure computation, no I/O.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import mmh3
import numpy as np

from proto.layout import PAGE_SIZE

__all__ = ["PAGE_SIZE", "ZERO_KEY", "ZERO_DIGEST", "page_key", "page_digests", "start_page_digests", "zero_pages",
           "default_threads"]

_digest = mmh3.mmh3_x64_128_stupledigest          # (int64, int64): the scanner's form
_digest_bytes = mmh3.mmh3_x64_128_digest           # the same 16 bytes, little-endian
ZERO_KEY: int = _digest(bytes(PAGE_SIZE))[0]
ZERO_DIGEST = np.array(_digest(bytes(PAGE_SIZE)), dtype=np.int64)
_WORDS = PAGE_SIZE // 8

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def page_key(buf) -> int:
    """The scanner's key of one page (any buffer of PAGE_SIZE bytes)."""
    return _digest(buf)[0]


def zero_pages(buf, npages: int) -> np.ndarray:
    """Boolean mask of the all-zero pages among the first npages pages of buf."""
    w = np.frombuffer(buf, dtype=np.uint64, count=npages * _WORDS).reshape(npages, _WORDS)
    cand = np.flatnonzero(w[:, 0] == 0)               # cheap first look: one word per page
    out = np.zeros(npages, dtype=bool)
    if len(cand):
        out[cand] = ~w[cand].any(axis=1)
    return out


def _hash_rows(pages: np.ndarray) -> bytes:
    """The 16-byte digests of the rows of a (n, PAGE_SIZE) uint8 array, concatenated."""
    return b"".join(map(_digest_bytes, pages))


def _runs(idx: np.ndarray, parts: int) -> list[list[tuple[int, int]]]:
    """Split sorted page indices into `parts` lists of contiguous (start, end) runs of about equal pages."""
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.concatenate(([0], cuts))]
    ends = idx[np.concatenate((cuts - 1, [len(idx) - 1]))] + 1
    out: list[list[tuple[int, int]]] = [[] for _ in range(parts)]
    per = -(-len(idx) // parts)
    k, have = 0, 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        while s < e:
            take = min(e - s, per - have) if k < parts - 1 else e - s
            out[k].append((s, s + take))
            s += take
            have += take
            if have >= per and k < parts - 1:
                k, have = k + 1, 0
    return [o for o in out if o]


def _hash_runs(pages: np.ndarray, runs: list[tuple[int, int]]) -> bytes:
    return b"".join([_hash_rows(pages[s:e]) for s, e in runs])


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < n:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="pagehash")
        return _pool


def default_threads() -> int:
    """One hashing thread per CPU this process may run on (at most 8)."""
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except (AttributeError, OSError):
        return max(1, min(8, os.cpu_count() or 1))


def start_page_digests(buf, npages: int, threads: int = 1):
    """Start hashing the first npages pages of buf on `threads` threads; returns a callable.

    Calling it waits and gives (digests (npages, 2) int64, zero mask).  The caller must
    not change buf until then.  Zero pages are found here, at once, and not hashed.
    """
    pages = np.frombuffer(buf, dtype=np.uint8, count=npages * PAGE_SIZE).reshape(npages, PAGE_SIZE)
    zero = zero_pages(buf, npages)
    todo = np.flatnonzero(~zero)
    futs = parts = None
    if len(todo):
        split = _runs(todo, threads if threads > 1 and len(todo) >= 512 else 1)
        if len(split) == 1:
            parts = [_hash_runs(pages, split[0])]
        else:
            ex = _executor(len(split))
            futs = [ex.submit(_hash_runs, pages, r) for r in split]

    def result():
        out = np.empty((npages, 2), dtype=np.int64)
        out[zero] = ZERO_DIGEST
        if len(todo):
            blob = b"".join(parts if futs is None else [f.result() for f in futs])
            out[todo] = np.frombuffer(blob, dtype="<i8").reshape(-1, 2)
        return out, zero
    return result


def page_digests(buf, npages: int, threads: int = 1) -> np.ndarray:
    """Both int64 halves of the digest of each of the first npages pages of buf, shape (npages, 2).

    Column 0 is page_key() of each page.  Zero pages get ZERO_DIGEST without being hashed.
    """
    return start_page_digests(buf, npages, threads)()[0]
