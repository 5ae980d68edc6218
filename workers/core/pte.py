"""Address and VMA arithmetic shared by the cores: page indices, VMA masks, mergeable ranges, permissions.

A VMA list is [(start, end, flags)] in bytes, sorted by start (MMView.vma_list, Load(VMAS)).
`vma_table` normalizes a list before it is stored (neighbours with equal flags merge, as
vma_merge does), `vma_pieces` cuts a range along the VMAs it meets (the walk of madvise,
mprotect and munmap), `vma_flags_at` and `may_access` are the access check a page fault
makes (VM_READ / VM_WRITE of the VMA, x86's rule that a writable page is readable).
"""
from __future__ import annotations

import errno

import numpy as np

from proto.layout import MAX_VMAS, PAGE_SHIFT, USER_BASE, VM_EXEC, VM_MERGEABLE, VM_READ, VM_WRITE

PROT_BITS = VM_READ | VM_WRITE | VM_EXEC


def vma_mask(vmas, idx: np.ndarray) -> np.ndarray:
    """Which page indices fall inside a VMA of the list vmas [(start, end, flags)]."""
    ok = np.zeros(len(idx), dtype=bool)
    addrs = USER_BASE + (idx.astype(np.int64) << PAGE_SHIFT)
    for start, end, _ in vmas:
        ok |= (addrs >= start) & (addrs < end)
    return ok


def mergeable_ranges(vmas) -> list[tuple[int, int]]:
    """Page-index ranges [a, b) of the VM_MERGEABLE areas of a VMA list."""
    return [((s - USER_BASE) >> PAGE_SHIFT, (e - USER_BASE) >> PAGE_SHIFT) for s, e, f in vmas if f & VM_MERGEABLE]


def page_range(start: int, end: int) -> tuple[int, int]:
    """The page indices [i0, i1) of the byte range [start, end)."""
    return (start - USER_BASE) >> PAGE_SHIFT, (end - USER_BASE) >> PAGE_SHIFT


def vma_flags_at(vmas, idx: np.ndarray) -> np.ndarray:
    """The flags of the VMA holding each page index (-1: no VMA there)."""
    idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
    out = np.full(len(idx), -1, dtype=np.int64)
    addrs = USER_BASE + (idx << PAGE_SHIFT)
    for start, end, flags in vmas:
        out[(addrs >= start) & (addrs < end)] = flags
    return out


def may_access(flags, write: bool):
    """The fault's access check: a write needs VM_WRITE, a read any of VM_READ, VM_WRITE, VM_EXEC
    (x86 cannot map a page writable but not readable).  flags -1 (no VMA): never."""
    need = VM_WRITE if write else PROT_BITS
    return (np.asarray(flags) >= 0) & ((np.asarray(flags) & need) != 0)


def vma_table(vmas) -> list[tuple[int, int, int]]:
    """A VMA list as it is stored: sorted, empty areas dropped, neighbours with equal flags merged.

    OSError(ENOMEM) if it needs more than MAX_VMAS slots (the kernel's max_map_count).
    """
    merged: list[list[int]] = []
    for s, e, f in sorted(v for v in vmas if v[1] > v[0]):
        if merged and merged[-1][1] == s and merged[-1][2] == f:
            merged[-1][1] = e
        else:
            merged.append([s, e, f])
    if len(merged) > MAX_VMAS:
        raise OSError(errno.ENOMEM, f"more than {MAX_VMAS} VMAs")
    return [tuple(v) for v in merged]


def vma_pieces(vmas, start: int, end: int):
    """Cut [start, end) along the VMAs it meets: ([(lo, hi, flags)] in address order, holes).

    holes: the byte offsets where a part of the range no VMA covers begins (empty if none).
    """
    pieces, holes = [], []
    at = start
    for s, e, f in vmas:
        if e <= start or s >= end:
            continue
        lo, hi = max(s, start), min(e, end)
        if lo > at:
            holes.append(at)
        pieces.append((lo, hi, f))
        at = hi
    if at < end:
        holes.append(at)
    return pieces, holes


def vmas_with(vmas, start: int, end: int, change) -> list[tuple[int, int, int]]:
    """The VMA list with the parts inside [start, end) given flags change(flags) (split as needed)."""
    out = []
    for s, e, f in vmas:
        if e <= start or s >= end:
            out.append((s, e, f))
            continue
        lo, hi = max(s, start), min(e, end)
        out += [(s, lo, f), (lo, hi, change(f)), (hi, e, f)]
    return out


def vmas_without(vmas, start: int, end: int) -> list[tuple[int, int, int]]:
    """The VMA list with [start, end) unmapped (split as needed)."""
    out = []
    for s, e, f in vmas:
        if e <= start or s >= end:
            out.append((s, e, f))
            continue
        if s < start:
            out.append((s, start, f))
        if e > end:
            out.append((end, e, f))
    return out
