"""Address and VMA arithmetic shared by the cores: range checks, page indices, VMA masks, mergeable
ranges, permissions.

`check_range` is the one place where an address and a length given by a caller are
judged, for every call that takes them (mmap, munmap, madvise, mprotect, and guest
reads and writes), with the kernel's errno rules.  The values are taken as the
kernel takes them: as unsigned 64-bit numbers (a negative Python int is what the C
cast to unsigned long / size_t makes of it; anything that does not fit is EINVAL).
An mm's address space is [USER_BASE, task_size): USER_BASE plays mmap_min_addr and
task_size TASK_SIZE, so a range starting below USER_BASE is outside it.

A VMA list is [(start, end, flags)] in bytes, sorted by start (MMView.vma_list, Load(VMAS)).
`vma_table` normalizes a list before it is stored (neighbours with equal flags merge, as
vma_merge does), `vma_pieces` cuts a range along the VMAs it meets (the walk of madvise,
mprotect and munmap), `vma_flags_at` (`vma_flags_of` for one page) and `may_access` are the
access check a page fault makes (VM_READ / VM_WRITE of the VMA, x86's rule that a writable page
is readable).
"""
from __future__ import annotations

import errno

import numpy as np

from proto.layout import MAX_VMAS, PAGE_SHIFT, PAGE_SIZE, USER_BASE, VM_EXEC, VM_MERGEABLE, VM_READ, VM_WRITE

U64_MAX = (1 << 64) - 1
PAGE_MASK = ~(PAGE_SIZE - 1) & U64_MAX
PROT_BITS = VM_READ | VM_WRITE | VM_EXEC
RANGE_OPS = ("mmap", "munmap", "madvise", "mprotect", "access")


def task_size(npages: int) -> int:
    """The end of an mm's address space (its TASK_SIZE)."""
    return USER_BASE + npages * PAGE_SIZE


def _ulong(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise OSError(errno.EINVAL, f"{name} {v!r} is not an integer")
    v = int(v)
    if not -(1 << 63) <= v <= U64_MAX:
        raise OSError(errno.EINVAL, f"{name} {v:#x} does not fit in 64 bits")
    return v & U64_MAX


def check_range(op: str, addr, length, task: int) -> tuple[int, int] | None:
    """The kernel's checks of (addr, length) for `op` on an mm whose address space ends at `task`.

    Returns (start, end): for mmap (addr ignored) (0, the page-aligned length); for
    munmap / madvise / mprotect the page-aligned range (madvise and mprotect then
    report ENOMEM for whatever part is not mapped, as the VMA walk finds); for
    access (a guest read or write) the exact byte range.  None: nothing to do, the
    call succeeds (length 0 of madvise, mprotect and access).  OSError otherwise:

      mmap      length 0: EINVAL; PAGE_ALIGN overflows, or longer than the address space: ENOMEM
      munmap    start not page aligned, outside [USER_BASE, task], or length past task: EINVAL;
                length 0: EINVAL                                          (do_vmi_munmap)
      madvise   start not page aligned, PAGE_ALIGN(length) overflows, or the end
                wraps: EINVAL                                   (is_valid_madvise)
      mprotect  start not page aligned: EINVAL; the end wraps: ENOMEM     (do_mprotect_pkey)
      access    the range wraps or leaves [USER_BASE, task): EFAULT       (copy_{to,from}_user)
    """
    if op not in RANGE_OPS:
        raise ValueError(f"unknown range op {op!r}")
    start = _ulong("address", addr) if op != "mmap" else 0
    n = _ulong("length", length)
    aligned = (n + PAGE_SIZE - 1) & PAGE_MASK          # PAGE_ALIGN, in 64 bits: 0 when it overflows
    if op == "mmap":
        if n == 0:
            raise OSError(errno.EINVAL, "mmap of length 0")
        if aligned == 0 or aligned > task - USER_BASE:
            raise OSError(errno.ENOMEM, f"no room for {n} bytes in an address space of {task - USER_BASE} bytes")
        return 0, aligned
    if op == "access":
        if n == 0:
            return None
        end = start + n
        if end > U64_MAX or start < USER_BASE or end > task:
            raise OSError(errno.EFAULT, f"bad address: [{start:#x}, +{n:#x}) is outside the address space "
                                        f"[{USER_BASE:#x}, {task:#x})")
        return start, end
    if start & (PAGE_SIZE - 1):
        raise OSError(errno.EINVAL, f"start address {start:#x} is not page aligned")
    if op == "munmap":
        if start < USER_BASE or start > task or n > task - start:
            raise OSError(errno.EINVAL, f"[{start:#x}, +{n:#x}) is outside the address space "
                                        f"[{USER_BASE:#x}, {task:#x})")
        if aligned == 0:
            raise OSError(errno.EINVAL, "munmap of length 0")
        return start, start + aligned
    if op == "madvise":
        if n and not aligned:
            raise OSError(errno.EINVAL, f"length {n:#x} overflows when rounded up to a page")
        end = start + aligned
        if end > U64_MAX:
            raise OSError(errno.EINVAL, f"[{start:#x}, +{aligned:#x}) wraps around the address space")
        return None if end == start else (start, end)
    # mprotect
    if n == 0:
        return None
    end = start + aligned
    if aligned == 0 or end > U64_MAX:
        raise OSError(errno.ENOMEM, f"[{start:#x}, +{n:#x}) wraps around the address space")
    return start, end


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


def vma_flags_of(vmas, i: int) -> int:
    """The flags of the VMA holding page index i (-1: no VMA there); vma_flags_at for one page, in plain ints."""
    addr = USER_BASE + (i << PAGE_SHIFT)
    for start, end, flags in vmas:
        if start <= addr < end:
            return flags
    return -1


def vma_flags_list(vmas, idx: list, lo: int, hi: int) -> list:
    """[vma_flags_of(vmas, i) for i in idx], knowing lo = min(idx) and hi = max(idx): one look-up when
    a single VMA spans [lo, hi] (an area is one interval, so it holds every page in between)."""
    a, b = USER_BASE + (lo << PAGE_SHIFT), USER_BASE + (hi << PAGE_SHIFT)
    for start, end, flags in vmas:
        if start <= a and b < end:
            return [flags] * len(idx)
    return [vma_flags_of(vmas, i) for i in idx]


def may_access(flags, write: bool):
    """The fault's access check: a write needs VM_WRITE, a read any of VM_READ, VM_WRITE, VM_EXEC
    (x86 cannot map a page writable but not readable).  flags -1 (no VMA): never.  An int gives a
    bool (one page, no numpy), an array of flags an array."""
    need = VM_WRITE if write else PROT_BITS
    if flags.__class__ is int:
        return flags >= 0 and flags & need != 0
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
