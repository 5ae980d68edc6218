"""Physical frames: the allocator, mapcounts, and the locks that guard shared state.

Pure logic over the shared frame table (no I/O besides the semaphores).  Any
actor may allocate or free frames while holding the frame lock for a few
microseconds; nobody holds it across a wait for an ack, so blocking on it (with
a timeout) cannot deadlock.  A lock whose holder died (kill -9) is taken over
after its timeout: the owner pid is kept in shared memory next to it.
"""
from __future__ import annotations

import errno
import os
import time

import numpy as np
import posix_ipc

from proto.layout import FRAME_ANON, FRAME_FREE, FRAME_KSM, FRAME_ZERO, FTH_FREE_TOP, PAGE_SIZE, ZERO_PFN, FrameTable


class OutOfFrames(OSError):
    def __init__(self, want: int, free: int):
        super().__init__(errno.ENOMEM, f"out of frames: wanted {want}, {free} free")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShmLock:
    """A posix semaphore used as a mutex, with its owner pid in shared memory.

    `owner` is a 1-element int64 view.  acquire() blocks up to `timeout`; if
    the recorded owner is dead, the lock is taken over (the semaphore stays at 0,
    which is right: it is still held, now by us).
    """

    def __init__(self, name: str, owner: np.ndarray, create: bool = False):
        flags = posix_ipc.O_CREX if create else 0
        self.sem = posix_ipc.Semaphore(name, flags, mode=0o600, initial_value=1) if create else posix_ipc.Semaphore(name)
        self.name = name
        self.owner = owner
        self.pid = os.getpid()

    def try_acquire(self) -> bool:
        try:
            self.sem.acquire(0)
        except posix_ipc.BusyError:
            if not _alive(int(self.owner[0])) and int(self.owner[0]) != 0:
                self.owner[0] = self.pid  # holder died with it held: take it over
                return True
            return False
        self.owner[0] = self.pid
        return True

    def acquire(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sem.acquire(min(0.05, max(0.0, deadline - time.monotonic())))
                self.owner[0] = self.pid
                return
            except posix_ipc.BusyError:
                owner = int(self.owner[0])
                if owner and not _alive(owner):
                    self.owner[0] = self.pid
                    return
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"lock {self.name} held by pid {owner} for over {timeout:.1f}s")

    def release(self) -> None:
        self.owner[0] = 0
        self.sem.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def close(self) -> None:
        try:
            self.sem.close()
        except posix_ipc.ExistentialError:
            pass


class FrameAllocator:
    """Allocate, copy, reference and free frames of the shared physical memory."""

    def __init__(self, ft: FrameTable, mem: np.ndarray, lock: ShmLock):
        self.ft = ft
        self.mem = mem                      # uint8 view of all frames
        self.pages = mem.reshape(ft.nframes, PAGE_SIZE)
        self.lock = lock

    # -- set-up (supervisor only) --
    def format(self) -> None:
        ft = self.ft
        ft.mapcount[:] = 0
        ft.flags[:] = FRAME_FREE
        ft.flags[ZERO_PFN] = FRAME_ZERO
        ft.mapcount[ZERO_PFN] = 1
        free = np.arange(ft.nframes - 1, 0, -1, dtype=np.int32)   # pop order: 1, 2, 3, ...
        ft.free_stack[:len(free)] = free
        ft.hdr[FTH_FREE_TOP] = len(free)

    @property
    def nr_free(self) -> int:
        return int(self.ft.hdr[FTH_FREE_TOP])

    def alloc(self, n: int, flags: int = FRAME_ANON, zero: bool = True) -> np.ndarray:
        """n new frames with mapcount 1; OutOfFrames (ENOMEM) if not enough are free."""
        if n == 0:
            return np.empty(0, dtype=np.int64)
        ft = self.ft
        with self.lock:
            top = int(ft.hdr[FTH_FREE_TOP])
            if top < n:
                raise OutOfFrames(n, top)
            pfns = ft.free_stack[top - n:top][::-1].astype(np.int64)
            ft.hdr[FTH_FREE_TOP] = top - n
            ft.mapcount[pfns] = 1
            ft.flags[pfns] = flags
        if zero:
            self.pages[pfns] = 0
        return pfns

    def alloc_one(self, flags: int = FRAME_ANON) -> int:
        """One new frame (mapcount 1), not zeroed: the single-page fault path, without numpy batches."""
        ft = self.ft
        with self.lock:
            top = int(ft.hdr[FTH_FREE_TOP])
            if top < 1:
                raise OutOfFrames(1, 0)
            pfn = int(ft.free_stack[top - 1])
            ft.hdr[FTH_FREE_TOP] = top - 1
            ft.mapcount[pfn] = 1
            ft.flags[pfn] = flags
        return pfn

    def put_one(self, pfn: int) -> None:
        if pfn == ZERO_PFN:
            return
        ft = self.ft
        with self.lock:
            c = int(ft.mapcount[pfn]) - 1
            if c > 0:
                ft.mapcount[pfn] = c
                return
            ft.mapcount[pfn] = 0
            ft.flags[pfn] = FRAME_FREE
            top = int(ft.hdr[FTH_FREE_TOP])
            ft.free_stack[top] = pfn
            ft.hdr[FTH_FREE_TOP] = top + 1

    def put(self, pfns: np.ndarray) -> int:
        """Drop one mapping of each frame; frames reaching mapcount 0 are freed. Returns how many."""
        pfns = np.asarray(pfns, dtype=np.int64)
        pfns = pfns[pfns != ZERO_PFN]
        if not len(pfns):
            return 0
        ft = self.ft
        with self.lock:
            np.subtract.at(ft.mapcount, pfns, 1)
            dead = np.unique(pfns[ft.mapcount[pfns] <= 0])
            if len(dead):
                if (ft.flags[dead] == FRAME_FREE).any():
                    raise RuntimeError(f"frame accounting broken: freeing free frame(s) {dead[ft.flags[dead] == FRAME_FREE][:5]}")
                ft.mapcount[dead] = 0
                ft.flags[dead] = FRAME_FREE
                top = int(ft.hdr[FTH_FREE_TOP])
                ft.free_stack[top:top + len(dead)] = dead
                ft.hdr[FTH_FREE_TOP] = top + len(dead)
        return len(dead)

    def get(self, pfns: np.ndarray) -> None:
        """Add one mapping to each frame (KSM frames gaining a sharer)."""
        with self.lock:
            np.add.at(self.ft.mapcount, np.asarray(pfns, dtype=np.int64), 1)

    def pin_ksm(self, pfn: int, node: int) -> bool:
        """Take a reference on KSM frame pfn if it is still the KSM page of stable node `node`.

        (get_ksm_page: a KSM page can lose its last mapping, and be freed and reused, at
        any moment; ksmd merges into it only while holding a reference.)  Drop with put().
        """
        ft = self.ft
        with self.lock:
            if ft.flags[pfn] & FRAME_KSM and int(ft.stable[pfn]) == node and ft.mapcount[pfn] > 0:
                ft.mapcount[pfn] += 1
                return True
        return False


def ksm_zero_pages_add(lock: ShmLock, stats, mm_id: int, n: int) -> None:
    """ksm_zero_pages is changed by whoever maps or unmaps a KSM zero page: keep it exact."""
    if not n:
        return
    from proto.layout import COUNTERS, MM_STATS
    with lock:
        stats.counters[COUNTERS.index("ksm_zero_pages")] += n
        stats.mm[mm_id, MM_STATS.index("ksm_zero_pages")] += n
