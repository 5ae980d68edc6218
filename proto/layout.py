"""The shared-memory layout of one run: segment names, PTE bits, frame and VMA flags.

Everything an actor needs to find and read another actor's memory is defined
here, and only here.  The supervisor creates every segment and the lock file
(mode 0600) and is the only one to unlink them; the other actors attach and close.

    /dev/shm/<run>.frames      the "physical memory"
    +--------+--------+--------+----     ----+------------+
    | pfn 0  | pfn 1  | pfn 2  |    ...      | pfn N-1    |   N x 4096 bytes
    +--------+--------+--------+----     ----+------------+
      ^ ZERO_PFN: the shared zero page, never written

    /dev/shm/<run>.frametab    one row per frame, plus the allocator
    +----------+-------------------+-------------+-------------+------------------+
    | header   | mapcount int32[N] | flags u8[N] | node u8[N]  | free stack i32[N]| stable i32[N] |
    | 8 x i64  |                   | FREE|ANON|  | NUMA node   | (top in header)  | owning stable |
    |          |                   | KSM|ZERO    |             |                  | node of a KSM |
    +----------+-------------------+-------------+-------------+------------------+---------------+

    /dev/shm/<run>.mm.<id>     one address space (mm)
    +----------+--------------------+----------------------+-------------------+
    | header   | VMA table          | subscriber table     | PTEs u64[npages]  |
    | 16 x i64 | MAX_VMAS x         | MAX_SUBS x (active,  | pfn<<12 | bits    |
    |          | (start,end,flags)  |  has_change_pte)     |                   |
    +----------+--------------------+----------------------+-------------------+

    /dev/shm/<run>.rmap.<id>   the scanners' rmap items of mm <id>, shared by every scanner
    +----------------+-------------+-------------+--------------+----------------+
    | flags u8[n]    | age u8[n]   | skips u8[n] | sn i32[n]    | cs i64[n]      |   n = the mm's pages
    | HAS|UNSTABLE|  | smart_scan  | smart_scan  | stable node  | oldchecksum    |
    | STABLE         |             |             | (global id)  |                |
    +----------------+-------------+-------------+--------------+----------------+

    /dev/shm/<run>.stats       KSM knobs, KSM counters, per-mm ksm_stat rows

    /dev/shm/<run>.locks       one byte per lock, taken with OFD record locks
    +------------+----------+-----     -----+--------------+---------------+-----     -----+
    | byte 0     | byte 1   |     ...       | byte MAX_MMS | MAX_MMS + 1   |     ...       |   (never written:
    | frame lock | ptl mm 0 |               | ptl mm 255   | ksm lock mm 0 |  ksm lock 255 |    the file stays
    +------------+----------+-----     -----+--------------+---------------+-----     -----+    empty)
    (a ksm lock: the scanners' per-mm lock, taken before ptl when several scanners merge)

Virtual addresses of every mm start at USER_BASE; page index i of an mm is at
USER_BASE + i * PAGE_SIZE.
"""
from __future__ import annotations

import mmap
import os
import secrets

import numpy as np
import posix_ipc

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
USER_BASE = 0x7F00_0000_0000

# --- primary PTE bits (x86-like low bits; the pfn lives above PAGE_SHIFT) ---
PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_DIRTY = 1 << 2
PTE_YOUNG = 1 << 3
PTE_SPECIAL = 1 << 4  # a KSM-merged zero page (use_zero_pages), like pte_mkspecial
PTE_FLAGS_MASK = PAGE_SIZE - 1

# --- frame table flags ---
FRAME_FREE = 0
FRAME_ANON = 1 << 0
FRAME_KSM = 1 << 1
FRAME_ZERO = 1 << 2
FRAME_RESERVED = 1 << 3    # off the free stack, in a fault handler's reserve (runtime/frames.py): free, not on it
ZERO_PFN = 0

# --- VMA flags (the kernel's names) ---
VM_READ = 1 << 0
VM_WRITE = 1 << 1
VM_EXEC = 1 << 2
VM_SHARED = 1 << 3
VM_MAYSHARE = 1 << 7
VM_PFNMAP = 1 << 10
VM_IO = 1 << 14
VM_DONTEXPAND = 1 << 18
VM_HUGETLB = 1 << 22
VM_MIXEDMAP = 1 << 28
VM_MERGEABLE = 1 << 31
VM_KSM_IGNORED = VM_SHARED | VM_MAYSHARE | VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_HUGETLB | VM_MIXEDMAP

MMF_VM_MERGEABLE = 1 << 16
MMF_VM_MERGE_ANY = 1 << 30     # prctl(PR_SET_MEMORY_MERGE): every compatible VMA, now and later, is mergeable

# --- mm segment geometry ---
MAX_VMAS = 64
MAX_SUBS = 4
MM_HDR = 16
# header slots of an mm segment
MMH_ID, MMH_NPAGES, MMH_FLAGS, MMH_NODE, MMH_OWNER_PID, MMH_RELEASED, MMH_DOMAIN = range(7)   # domain: mitigation "domain"
SUB_ACTIVE, SUB_CHANGE_PTE = 0, 1

# --- frametab header slots ---
FTH_NFRAMES, FTH_FREE_TOP, FTH_NODES, FTH_RESERVE_GEN = range(4)   # reserve gen: bumped when a repair takes every reserve back

# --- stats segment: knobs, counters, per-mm rows ---
MAX_MMS = 256
KNOBS = (
    "run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages",
    "merge_across_nodes", "smart_scan", "stable_node_chains_prune_millisecs",
    "advisor_mode", "advisor_max_cpu", "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan", "advisor_target_scan_time",
    "scanners", "fault_handlers",       # ksm-proto's own (proto/knobs.py), fixed when the machine starts
    "fault_poll_us",                    # ksm-proto's own, any time: how long a fault's ends poll before sleeping
    "mitigation",                       # ksm-proto's own: the side-channel defence (proto/knobs.py MITIGATIONS)
)
KNOB_FAULT_POLL_US = KNOBS.index("fault_poll_us")
KNOB_MITIGATION = KNOBS.index("mitigation")
COUNTERS = (
    "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "pages_scanned",
    "pages_skipped", "full_scans", "general_profit", "stable_node_chains",
    "stable_node_dups", "ksm_zero_pages", "ksm_rmap_items",
    "metadata_bytes",   # ksmd's own: bytes of rmap items, trees and stable nodes
)
MM_STATS = ("ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages")

RUN_PREFIX = "ksmp"
SHM_DIR = "/dev/shm"


def new_run_name() -> str:
    """An unpredictable, unique run name that carries the supervisor's pid (for sweeping)."""
    return f"{RUN_PREFIX}.{os.getpid()}.{secrets.token_hex(6)}"


def run_owner_pid(name: str) -> int | None:
    """The supervisor pid encoded in a /dev/shm entry of a run, or None if not ours."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != RUN_PREFIX or not parts[1].isdigit():
        return None
    return int(parts[1])


def seg_name(run: str, what: str) -> str:
    return f"/{run}.{what}"


class Segment:
    """One POSIX shared-memory segment, mapped; create() or attach(), then close()."""

    def __init__(self, name: str, size: int | None, create: bool):
        if create:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        else:
            shm = posix_ipc.SharedMemory(name)
        self.name = name
        self.size = shm.size
        self.map = mmap.mmap(shm.fd, shm.size)
        shm.close_fd()
        self.buf = np.frombuffer(self.map, dtype=np.uint8)

    @classmethod
    def create(cls, name: str, size: int) -> "Segment":
        return cls(name, size, True)

    @classmethod
    def attach(cls, name: str) -> "Segment":
        return cls(name, None, False)

    def view(self, dtype, offset: int, count: int) -> np.ndarray:
        return np.frombuffer(self.map, dtype=dtype, count=count, offset=offset)

    def close(self) -> None:
        self.buf = None
        try:
            self.map.close()
        except BufferError:
            pass  # a numpy view is still alive; the mapping goes with the process

    @staticmethod
    def unlink(name: str) -> None:
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass


class FrameTable:
    """Views of <run>.frametab: mapcount, flags, node and the free-frame stack."""

    HDR = 8

    @staticmethod
    def size_for(nframes: int) -> int:
        return 8 * FrameTable.HDR + nframes * (4 + 1 + 1 + 4 + 4) + 64

    def __init__(self, seg: Segment, nframes: int | None = None):
        self.seg = seg
        hdr = seg.view(np.int64, 0, self.HDR)
        if nframes is not None:
            hdr[FTH_NFRAMES] = nframes
        n = int(hdr[FTH_NFRAMES])
        off = 8 * self.HDR
        self.hdr = hdr
        self.nframes = n
        self.mapcount = seg.view(np.int32, off, n); off += 4 * n
        self.flags = seg.view(np.uint8, off, n); off += n
        self.node = seg.view(np.uint8, off, n); off += n
        off = (off + 7) & ~7
        self.free_stack = seg.view(np.int32, off, n); off += 4 * n
        self.stable = seg.view(np.int32, off, n)


class MMView:
    """Views of <run>.mm.<id>: header, VMA table, subscriber table, PTE array."""

    @staticmethod
    def size_for(npages: int) -> int:
        return 8 * (MM_HDR + 3 * MAX_VMAS + 2 * MAX_SUBS) + 8 * npages

    def __init__(self, seg: Segment):
        self.seg = seg
        self.hdr = seg.view(np.int64, 0, MM_HDR)
        off = 8 * MM_HDR
        self.vmas = seg.view(np.int64, off, 3 * MAX_VMAS).reshape(MAX_VMAS, 3); off += 24 * MAX_VMAS
        self.subs = seg.view(np.int64, off, 2 * MAX_SUBS).reshape(MAX_SUBS, 2); off += 16 * MAX_SUBS
        self.npages = (seg.size - off) // 8
        self.pte = seg.view(np.uint64, off, self.npages)

    @property
    def id(self) -> int:
        return int(self.hdr[MMH_ID])

    def vma_list(self) -> list[tuple[int, int, int]]:
        """Live VMAs as (start, end, flags), sorted by start (end == 0 marks a free slot)."""
        v = self.vmas
        return sorted(map(tuple, v[v[:, 1] != 0].tolist()))


class RmapView:
    """Views of <run>.rmap.<id>: the rmap items of one mm (workers/ksm_tree.RmapItems)."""

    @staticmethod
    def size_for(npages: int) -> int:
        return 15 * npages + 16

    def __init__(self, seg: Segment, npages: int):
        self.seg = seg
        n = npages
        self.flags = seg.view(np.uint8, 0, n)
        self.age = seg.view(np.uint8, n, n)
        self.skips = seg.view(np.uint8, 2 * n, n)
        off = (3 * n + 3) & ~3
        self.sn = seg.view(np.int32, off, n)
        off = (off + 4 * n + 7) & ~7
        self.cs = seg.view(np.int64, off, n)

    def format(self) -> None:
        self.flags[:] = 0
        self.age[:] = 0
        self.skips[:] = 0
        self.sn[:] = -1
        self.cs[:] = 0


class StatsView:
    """Views of <run>.stats: knobs (written by ksmd), counters, per-mm ksm_stat rows."""

    @staticmethod
    def size_for() -> int:
        return 8 * (len(KNOBS) + len(COUNTERS) + MAX_MMS * len(MM_STATS))

    def __init__(self, seg: Segment):
        self.seg = seg
        nk, nc = len(KNOBS), len(COUNTERS)
        self.knobs = seg.view(np.int64, 0, nk)
        self.counters = seg.view(np.int64, 8 * nk, nc)
        self.mm = seg.view(np.int64, 8 * (nk + nc), MAX_MMS * len(MM_STATS)).reshape(MAX_MMS, len(MM_STATS))

    def knob(self, name: str) -> int:
        return int(self.knobs[KNOBS.index(name)])

    def counter_dict(self) -> dict[str, int]:
        return {n: int(v) for n, v in zip(COUNTERS, self.counters.tolist())}


FRAME_LOCK_BYTE = 0


def lock_file(run: str) -> str:
    """The run's lock file: one byte per lock (workers.runtime.frames.ShmLock)."""
    return os.path.join(SHM_DIR, f"{run}.locks")


def create_lock_file(run: str) -> None:
    os.close(os.open(lock_file(run), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


def unlink_lock_file(run: str) -> None:
    try:
        os.unlink(lock_file(run))
    except FileNotFoundError:
        pass


def ptl_lock_byte(mm_id: int) -> int:
    """The byte of the lock file that is the page-table lock of mm mm_id."""
    return FRAME_LOCK_BYTE + 1 + mm_id


def ksm_lock_byte(mm_id: int) -> int:
    """The byte of the lock file that is the scanners' ksm lock of mm mm_id."""
    return FRAME_LOCK_BYTE + 1 + MAX_MMS + mm_id


def vaddr(index):
    return USER_BASE + index * PAGE_SIZE


def page_index(addr: int) -> int:
    return (addr - USER_BASE) >> PAGE_SHIFT
