"""Physical frames: the allocator, mapcounts, and the locks that guard shared state.

The locks (`ShmLock`): the frame lock, one page-table lock (ptl) per mm and one
scanners' ksm lock per mm, each one byte of the run's lock file, taken with an OFD
record lock.  The kernel gives
the exclusion and drops a lock when its holder dies (kill -9 included); nobody
reads a pid to decide who holds a lock.  Any actor may allocate or free frames
while holding the frame lock for a few microseconds; nobody holds it across a
wait for an ack, so blocking on it (with a timeout) cannot deadlock.

The allocator (`FrameAllocator`) validates before it modifies: freeing a free
frame, dropping more references than a frame has, mapping a free frame, or a
free-stack entry that is not free raises `FrameAccountingError` and leaves the
frame table as it was.

A fault handler's free-frame reserve (`keep_reserve`): its one-frame allocations (a COW's copy, a
one-page write fault) come from frames it took off the free stack in a batch, under one hold of the
frame lock, instead of one frame-lock hold (two OFD-lock system calls) each.  A reserved frame is
flagged FRAME_RESERVED, mapcount 0, on no stack: free, and counted in `nr_free`.  The handler takes one
out of its reserve, without the frame lock, only while it holds a page-table lock (every allocation of
a fault is under its ptl), so no repair (`rebuild`, under every ptl) runs meanwhile; the frame's table
entries are then written by no one else.  It gives its reserve back on exit (`release_reserve`) and
before an allocation that would otherwise fail (OutOfFrames); a repair takes every reserve back (a dead
handler's included: nobody else knows its frames) and bumps FTH_RESERVE_GEN, from which a live handler
learns that the frames it holds are gone.  Near out of memory no reserve stays aside: a reserve is
taken only while the free stack keeps `reserve_min_free` frames after it, and once the stack holds fewer
each holder gives its reserve back (`drain_local_pages`, as the kernel drains its per-CPU page lists):
at its next allocation, or, idle, at its next tick (the fault handler's timer), so that another
allocation finds those frames.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
import weakref

import numpy as np

from proto.layout import (FRAME_ANON, FRAME_FREE, FRAME_KSM, FRAME_LOCK_BYTE, FRAME_RESERVED, FRAME_ZERO, FTH_FREE_TOP,
                          FTH_RESERVE_GEN, PAGE_SIZE, ZERO_PFN, FrameTable, ksm_lock_byte, lock_file, ptl_lock_byte)


class OutOfFrames(OSError):
    def __init__(self, want: int, free: int):
        super().__init__(errno.ENOMEM, f"out of frames: wanted {want}, {free} free")


class FrameAccountingError(RuntimeError):
    """A put, get or alloc that would corrupt the frame table (double free, negative mapcount...)."""


def _flock(l_type: int, start: int) -> bytes:
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0: OFD locks require it), padding
    return struct.pack("hhqqi4x", l_type, os.SEEK_SET, start, 1, 0)


_BUSY = (errno.EAGAIN, errno.EACCES)
_F_OFD_SETLK = fcntl.F_OFD_SETLK
_BACKOFF_MIN, _BACKOFF_MAX = 20e-6, 2e-3     # seconds between two tries of a blocking acquire
_live: "weakref.WeakSet[ShmLock]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lk in list(_live):
        lk._reopen()


os.register_at_fork(after_in_child=_after_fork_in_child)


class ShmLock:
    """A mutex across processes and threads: one byte of the run's lock file, OFD-locked.

    OFD record locks (fcntl F_OFD_SETLK) belong to an open file description and the
    kernel drops them when its last fd closes, so a holder killed with SIGKILL
    releases its locks and no second holder ever exists.  Each lock object opens the
    file itself: two objects never share a lock, even in one process, and a forked
    child reopens it (an inherited fd would share its parent's locks).  An OFD lock
    never conflicts with itself, so a threading.Lock makes the threads that share
    one object exclude each other too.  Not reentrant.
    """

    def __init__(self, path: str, byte: int, name: str):
        self.path = path
        self.byte = byte
        self.name = name
        self._lock = _flock(fcntl.F_WRLCK, byte)
        self._unlock = _flock(fcntl.F_UNLCK, byte)
        self._threads = threading.Lock()
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        _live.add(self)

    @classmethod
    def frame_lock(cls, run: str) -> "ShmLock":
        return cls(lock_file(run), FRAME_LOCK_BYTE, "frame_lock")

    @classmethod
    def ptl(cls, run: str, mm_id: int) -> "ShmLock":
        return cls(lock_file(run), ptl_lock_byte(mm_id), f"ptl.{mm_id}")

    @classmethod
    def ksm(cls, run: str, mm_id: int) -> "ShmLock":
        """The scanners' lock of mm mm_id (core/shard.py): taken before its ptl when several merge."""
        return cls(lock_file(run), ksm_lock_byte(mm_id), f"ksm.{mm_id}")

    def _try_record(self) -> bool:
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, self._lock)
        except OSError as e:
            if e.errno in _BUSY:
                return False
            raise
        return True

    def try_acquire(self) -> bool:
        # (_try_record inlined: this is every fault's ptl and frame lock, a Python call less each)
        if not self._threads.acquire(False):
            return False
        try:
            fcntl.fcntl(self.fd, _F_OFD_SETLK, self._lock)
            return True
        except OSError as e:
            self._threads.release()
            if e.errno in _BUSY:
                return False
            raise
        except BaseException:
            self._threads.release()
            raise

    def acquire(self, timeout: float = 5.0) -> None:
        """Take the lock, polling with a growing backoff; TimeoutError after `timeout` seconds."""
        if self.try_acquire():
            return
        deadline = time.monotonic() + timeout
        if not self._threads.acquire(timeout=max(0.0, timeout)):
            raise self._timeout(timeout)
        try:
            delay = _BACKOFF_MIN
            while not self._try_record():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._timeout(timeout)
                time.sleep(min(delay, left))
                delay = min(2 * delay, _BACKOFF_MAX)
        except BaseException:
            self._threads.release()
            raise

    def _timeout(self, timeout: float) -> TimeoutError:
        return TimeoutError(f"lock {self.name} (byte {self.byte} of {self.path}) busy for over {timeout:.1f}s")

    def release(self) -> None:
        fcntl.fcntl(self.fd, _F_OFD_SETLK, self._unlock)
        self._threads.release()

    def __enter__(self):
        if not self.try_acquire():
            self.acquire()
        return self

    def __exit__(self, *exc):
        fcntl.fcntl(self.fd, _F_OFD_SETLK, self._unlock)
        self._threads.release()

    def close(self) -> None:
        """Close the file (which drops the lock if this object holds it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        _live.discard(self)

    def _reopen(self) -> None:
        # In a forked child: the inherited fd shares the parent's open file description, so
        # its locks; closing it leaves them to the parent.  The child holds nothing.
        self._threads = threading.Lock()
        if self.fd < 0:
            return
        os.close(self.fd)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            self.fd = -1      # the run is gone: using this lock in the child fails with EBADF


_FREE_FLAGS = (FRAME_FREE, FRAME_RESERVED)
RESERVE_MIN_FREE_BATCHES = 8       # a reserve is taken only while this many batches' worth of frames are free


class FrameAllocator:
    """Allocate, copy, reference and free frames of the shared physical memory."""

    def __init__(self, ft: FrameTable, mem: np.ndarray, lock: ShmLock):
        self.ft = ft
        self.mem = mem                      # uint8 view of all frames
        self.pages = mem.reshape(ft.nframes, PAGE_SIZE)
        self.lock = lock
        self.reserve: list[int] = []        # this process's reserved frames, the next to hand out last
        self.reserve_batch = 0              # 0: no reserve (keep_reserve)
        self.reserve_min_free = 0           # the free stack keeps this many frames: below, no reserve is held
        self._reserve_gen = 0               # FTH_RESERVE_GEN when the reserve was taken

    # -- a fault handler's reserve --
    def keep_reserve(self, batch: int, min_free: int | None = None) -> None:
        """One-frame allocations (alloc_one) come from a reserve of up to `batch` frames, taken off the
        free stack together only while at least `min_free` frames stay on it (default
        RESERVE_MIN_FREE_BATCHES batches' worth), and given back once fewer are there (drain_local_pages;
        below that, one at a time: near out of memory nobody holds frames aside).  The
        caller must allocate only under a page-table lock (the fault handler does) and call
        release_reserve on exit.  (The checker's worlds, of a few frames, pass a smaller min_free.)"""
        if batch < 0:
            raise ValueError(f"reserve batch {batch} < 0")
        if min_free is not None and min_free < batch:
            raise ValueError(f"a reserve of {batch} frames taken while only {min_free} are free")
        self.reserve_batch = batch
        self.reserve_min_free = RESERVE_MIN_FREE_BATCHES * batch if min_free is None else min_free

    def _reserve_valid(self) -> bool:
        """The reserve still ours (no repair took it back since); else it is forgotten."""
        if self.ft.hdr.item(FTH_RESERVE_GEN) == self._reserve_gen:
            return True
        self.reserve = []
        return False

    def _return_reserve_locked(self) -> int:
        """The reserve back on the free stack (the caller holds the frame lock); how many frames."""
        r = self.reserve
        if not r or not self._reserve_valid():
            return 0
        ft = self.ft
        pfns = np.array(r, dtype=np.int64)         # (pushed so that the stack pops them in reserve order)
        self._out_of_range(pfns, ZERO_PFN + 1)
        bad = (ft.flags[pfns] != FRAME_RESERVED) | (ft.mapcount[pfns] != 0)
        if bad.any():
            raise FrameAccountingError(f"the reserve holds frames not reserved: {self._frames(pfns[bad])}")
        top = int(ft.hdr[FTH_FREE_TOP])
        if top + len(pfns) > ft.nframes:
            raise FrameAccountingError(f"returning a reserve of {len(pfns)}: the free stack holds {top}")
        ft.flags[pfns] = FRAME_FREE
        ft.free_stack[top:top + len(pfns)] = pfns
        ft.hdr[FTH_FREE_TOP] = top + len(pfns)
        self.reserve = []
        return len(pfns)

    def release_reserve(self) -> int:
        """Give the reserve back to the free stack (a fault handler's exit); how many frames."""
        if not self.reserve:
            return 0
        with self.lock:
            return self._return_reserve_locked()

    def drain_local_pages(self) -> int:
        """Give the reserve back if the free stack runs low (fewer than reserve_min_free frames on it): near
        out of memory, the frames one handler holds aside go where another's allocation finds them.  The
        fault handler calls it on a timer while idle (its allocations call it themselves); the kernel's
        drain_local_pages for a CPU's page lists.  How many frames went back."""
        if self.reserve and self.ft.hdr.item(FTH_FREE_TOP) < self.reserve_min_free:
            return self.release_reserve()
        return 0

    def _take_reserve_locked(self, top: int) -> None:
        """Refill the reserve from the free stack (the caller holds the frame lock; top: the stack's top)."""
        n = self.reserve_batch
        if n < 2 or top - n < self.reserve_min_free:      # (the stack keeps min_free: drain_local_pages)
            return
        ft = self.ft
        pfns = ft.free_stack[top - n:top][::-1].astype(np.int64)     # pfns[0]: the stack's next
        self._check_popped(pfns)
        ft.hdr[FTH_FREE_TOP] = top - n
        ft.flags[pfns] = FRAME_RESERVED
        self.reserve = pfns[::-1].tolist()          # pop() hands them out in the stack's own order
        self._reserve_gen = ft.hdr.item(FTH_RESERVE_GEN)

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
        """Free frames: on the free stack, and in fault handlers' reserves."""
        return int(self.ft.hdr[FTH_FREE_TOP]) + int(np.count_nonzero(self.ft.flags == FRAME_RESERVED))

    def _out_of_range(self, pfns: np.ndarray, lowest: int) -> None:
        bad = pfns[(pfns < lowest) | (pfns >= self.ft.nframes)]
        if len(bad):
            raise FrameAccountingError(f"pfn(s) {bad[:5].tolist()} out of range [{lowest}, {self.ft.nframes})")

    def _frames(self, pfns) -> str:
        """pfn, mapcount and flags of (up to 5 of) pfns, for an error message."""
        ft = self.ft
        return ", ".join(f"pfn {p} (mapcount {ft.mapcount[p]}, flags {ft.flags[p]:#x})" for p in list(pfns)[:5])

    def _check_popped(self, pfns: np.ndarray) -> None:
        """Frames taken off the free stack must be free, and each there once."""
        self._out_of_range(pfns, ZERO_PFN + 1)
        ft = self.ft
        used = (ft.flags[pfns] != FRAME_FREE) | (ft.mapcount[pfns] != 0)
        if used.any():
            raise FrameAccountingError(f"free stack holds frames in use: {self._frames(pfns[used])}")
        if len(pfns) > 1 and len(np.unique(pfns)) != len(pfns):
            u, k = np.unique(pfns, return_counts=True)
            raise FrameAccountingError(f"free stack holds pfn(s) {u[k > 1][:5].tolist()} more than once")

    def alloc(self, n: int, flags: int = FRAME_ANON, zero: bool = True) -> np.ndarray:
        """n new frames with mapcount 1; OutOfFrames (ENOMEM) if not enough are free."""
        if n == 0:
            return np.empty(0, dtype=np.int64)
        ft = self.ft
        with self.lock:
            top = int(ft.hdr[FTH_FREE_TOP])
            if self.reserve and top - n < self.reserve_min_free:    # (too few, or running low: drain_local_pages)
                top += self._return_reserve_locked()
            if top < n:
                raise OutOfFrames(n, top)
            pfns = ft.free_stack[top - n:top][::-1].astype(np.int64)
            self._check_popped(pfns)
            ft.hdr[FTH_FREE_TOP] = top - n
            ft.mapcount[pfns] = 1
            ft.flags[pfns] = flags
        if zero:
            self.pages[pfns] = 0
        return pfns

    def alloc_scattered(self, seeds, flags: int = FRAME_ANON) -> np.ndarray:
        """One new frame (mapcount 1, not zeroed) per seed, each taken from anywhere in the free stack (the
        entry at seed modulo the free count), not from its top: VUsion's merged frames "at random from
        the free frames" (the seeds are the caller's randomness)."""
        seeds = [int(s) & (2**63 - 1) for s in np.atleast_1d(seeds).tolist()]
        ft = self.ft
        out = []
        with self.lock:
            top = int(ft.hdr[FTH_FREE_TOP])
            if top < len(seeds) and self.reserve:
                top += self._return_reserve_locked()
            if top < len(seeds):
                raise OutOfFrames(len(seeds), top)
            for s in seeds:
                j = s % top
                pfn = int(ft.free_stack[j])
                ft.free_stack[j] = ft.free_stack[top - 1]
                ft.free_stack[top - 1] = pfn
                self._check_popped(np.array([pfn], dtype=np.int64))
                top -= 1
                ft.hdr[FTH_FREE_TOP] = top
                ft.mapcount[pfn] = 1
                ft.flags[pfn] = flags
                out.append(pfn)
        return np.array(out, dtype=np.int64)

    def alloc_one(self, flags: int = FRAME_ANON, zero: bool = False) -> int:
        """One new frame (mapcount 1; zeroed if zero): the single-page fault path, in plain ints (an
        element of a numpy array read as .item(), written as a scalar, no array built).  From the
        reserve, if this allocator keeps one (keep_reserve): then without the frame lock."""
        ft = self.ft
        if self.reserve and self._reserve_valid():
            self.drain_local_pages()        # (running low: the reserve goes back, the frame comes off the stack)
        if self.reserve:
            pfn = self.reserve[-1]
            if ft.flags.item(pfn) != FRAME_RESERVED or ft.mapcount.item(pfn) != 0:
                raise FrameAccountingError(f"the reserve holds a frame not reserved: {self._frames([pfn])}")
            self.reserve.pop()
            ft.mapcount[pfn] = 1
            ft.flags[pfn] = flags
            if zero:
                self.pages[pfn] = 0
            return pfn
        with self.lock:
            top = ft.hdr.item(FTH_FREE_TOP)
            if top < 1:
                raise OutOfFrames(1, 0)
            pfn = ft.free_stack.item(top - 1)
            if not ZERO_PFN < pfn < ft.nframes:
                raise FrameAccountingError(f"pfn(s) {[pfn]} out of range [{ZERO_PFN + 1}, {ft.nframes})")
            if ft.flags.item(pfn) != FRAME_FREE or ft.mapcount.item(pfn) != 0:
                raise FrameAccountingError(f"free stack holds a frame in use: {self._frames([pfn])}")
            ft.hdr[FTH_FREE_TOP] = top - 1
            ft.mapcount[pfn] = 1
            ft.flags[pfn] = flags
            if self.reserve_batch:
                self._take_reserve_locked(top - 1)
        if zero:
            self.pages[pfn] = 0
        return pfn

    def put_one(self, pfn: int) -> None:
        """Drop one mapping of frame pfn; free it when none is left."""
        if pfn == ZERO_PFN:
            return
        ft = self.ft
        if not ZERO_PFN < pfn < ft.nframes:
            raise FrameAccountingError(f"put of pfn {pfn}, out of range [1, {ft.nframes})")
        with self.lock:
            c = ft.mapcount.item(pfn) - 1
            if c < 0 or ft.flags.item(pfn) in _FREE_FLAGS:
                raise FrameAccountingError(f"put of a frame with no mapping left: {self._frames([pfn])}")
            if c > 0:
                ft.mapcount[pfn] = c
                return
            top = ft.hdr.item(FTH_FREE_TOP)
            if top >= ft.nframes:
                raise FrameAccountingError(f"freeing {self._frames([pfn])}: the free stack is full")
            ft.mapcount[pfn] = 0
            ft.flags[pfn] = FRAME_FREE
            ft.free_stack[top] = pfn
            ft.hdr[FTH_FREE_TOP] = top + 1

    def put(self, pfns: np.ndarray) -> int:
        """Drop one mapping of each frame; frames reaching mapcount 0 are freed. Returns how many.

        All or nothing: if any frame has fewer mappings than are dropped (a free frame
        included), FrameAccountingError and the table is left as it was.
        """
        pfns = np.asarray(pfns, dtype=np.int64)
        pfns = pfns[pfns != ZERO_PFN]
        if not len(pfns):
            return 0
        u, k = np.unique(pfns, return_counts=True)
        self._out_of_range(u, ZERO_PFN + 1)
        ft = self.ft
        with self.lock:
            left = ft.mapcount[u] - k
            bad = (left < 0) | (ft.flags[u] == FRAME_FREE) | (ft.flags[u] == FRAME_RESERVED)
            if bad.any():
                raise FrameAccountingError(
                    "put drops more mappings than frames have: " + ", ".join(
                        f"{self._frames([p])} dropped {n}x" for p, n in zip(u[bad][:5].tolist(), k[bad][:5].tolist())))
            dead = u[left == 0]
            top = int(ft.hdr[FTH_FREE_TOP])
            if top + len(dead) > ft.nframes:
                raise FrameAccountingError(f"freeing {len(dead)} frames: the free stack holds {top} of {ft.nframes}")
            ft.mapcount[u] = left
            if len(dead):
                ft.flags[dead] = FRAME_FREE
                ft.free_stack[top:top + len(dead)] = dead
                ft.hdr[FTH_FREE_TOP] = top + len(dead)
        return len(dead)

    def get(self, pfns: np.ndarray) -> None:
        """Add one mapping to each frame (KSM frames gaining a sharer); a free frame cannot gain one."""
        pfns = np.asarray(pfns, dtype=np.int64)
        self._out_of_range(pfns, ZERO_PFN)
        with self.lock:
            fl = self.ft.flags[pfns]
            free = (fl == FRAME_FREE) | (fl == FRAME_RESERVED)
            if free.any():
                raise FrameAccountingError(f"get of free frame(s): {self._frames(pfns[free])}")
            np.add.at(self.ft.mapcount, pfns, 1)

    def rebuild(self, maps: np.ndarray) -> dict:
        """Make the frame table agree with `maps`, the number of PTEs mapping each frame.

        The supervisor's repair after an actor died halfway through changing frames (its
        OFD locks are gone, its half-done work is not): the caller holds every page-table
        lock and no live actor holds a reference outside one.  Every frame's mapcount
        becomes its mappings; frames nothing maps are freed (a pinned or replaced frame the
        dead actor never put), a mapped frame flagged free becomes anonymous again, and
        the free stack is rebuilt.  Returns counts of what changed (all 0: nothing to fix).
        """
        ft = self.ft
        maps = np.asarray(maps, dtype=np.int64).copy()
        maps[ZERO_PFN] = 1
        with self.lock:
            mc = ft.mapcount.astype(np.int64)
            fl = ft.flags
            old_fl = fl.copy()
            reserved = fl == FRAME_RESERVED         # every reserve, a dead handler's included, taken back
            returned = int(np.count_nonzero(reserved & (maps == 0)))
            if reserved.any():
                fl[reserved & (maps == 0)] = FRAME_FREE
                ft.hdr[FTH_RESERVE_GEN] = ft.hdr.item(FTH_RESERVE_GEN) + 1
            leaked = (maps == 0) & (fl != FRAME_FREE)
            revived = (maps > 0) & ((fl == FRAME_FREE) | reserved)
            recount = (maps > 0) & (mc != maps)
            top = int(ft.hdr[FTH_FREE_TOP])
            old_stack = np.sort(ft.free_stack[:max(0, min(top, ft.nframes))].astype(np.int64))
            fl[leaked] = FRAME_FREE
            fl[revived] = FRAME_ANON
            ft.mapcount[:] = maps
            ft.mapcount[leaked] = 0
            free = np.flatnonzero(fl == FRAME_FREE)[::-1].astype(np.int32)   # pop order: low pfns first
            ft.free_stack[:len(free)] = free
            ft.hdr[FTH_FREE_TOP] = len(free)
            stack_changed = not np.array_equal(old_stack, np.sort(free.astype(np.int64)))
            fixed = np.flatnonzero(leaked | revived | recount)
            # what the dead actor left, frame by frame (the first 8): the frame, its mapcount and flags
            # before, and the mappings the PTEs have (a pinned KSM frame: one over; a new frame no PTE
            # took, or an old one never put: mapped 0 times)
            fixes = [{"pfn": int(p), "mapcount": int(mc[p]), "mapped": int(maps[p]), "flags": int(old_fl[p])}
                     for p in fixed[:8]]
        done = {"freed": int(leaked.sum()), "recounted": int((recount & ~revived).sum()),
                "revived": int(revived.sum()), "free_stack_changed": int(stack_changed), "fixes": fixes}
        if returned:        # (a frame of a reserve is free: no fix, and the stack changed only by them)
            done["reserves_returned"] = returned
            if not (leaked.any() or revived.any()):
                done["free_stack_changed"] = int(not np.array_equal(
                    np.sort(np.concatenate([old_stack, np.flatnonzero(reserved & (maps == 0))])),
                    np.sort(free.astype(np.int64))))
        return done

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

    def pin_ksm_many(self, pfns: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        """pin_ksm for distinct frames under one hold of the frame lock; which were pinned."""
        ft = self.ft
        pfns = np.asarray(pfns, dtype=np.int64)
        self._out_of_range(pfns, ZERO_PFN)
        with self.lock:
            ok = (((ft.flags[pfns] & FRAME_KSM) != 0) & (ft.stable[pfns] == nodes) & (ft.mapcount[pfns] > 0))
            ft.mapcount[pfns[ok]] += 1
        return ok


def ksm_zero_pages_add(lock: ShmLock, stats, mm_id: int, n: int) -> None:
    """ksm_zero_pages is changed by whoever maps or unmaps a KSM zero page: keep it exact."""
    if not n:
        return
    from proto.layout import COUNTERS, MM_STATS
    with lock:
        stats.counters[COUNTERS.index("ksm_zero_pages")] += n
        stats.mm[mm_id, MM_STATS.index("ksm_zero_pages")] += n
