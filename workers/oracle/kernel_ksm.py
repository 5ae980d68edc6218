"""The real kernel's KSM, driven through sysfs and madvise: the oracle ksm-proto is compared with.

This module owns everything that touches the host kernel's KSM: the knobs and
counters of /sys/kernel/mm/ksm (`KernelKSM`), anonymous private mappings advised
MADV_MERGEABLE (`KernelRegion`), one child process per "VM" (`KernelVM`), and the
three measurements built on them: `merge_counts` (the oracle's counters),
`ksmd_throughput` (the real ksmd at full speed) and `kernel_cow_us` (the kernel's
own COW fault on a KSM page).  `KernelProc` is a child process driven call by call
with the VM handle's API (mmap, write, read, madvise, mprotect, prctl, fork,
ksm_stat, pagemap), so one test can run against ksm-proto and against the kernel.

Rules it keeps: `KernelKSM` saves every writable knob on entry and puts each back
on exit (also on an exception or Ctrl-C), always leaving run=0; every wait has a
timeout; children are ended by their pid, always.  KSM is global to the machine,
so `KernelKSM` also takes an exclusive lock (a file in /run/lock) that other
ksm-proto processes honour: two of them never drive sysfs at the same time.
Python stdlib + numpy only.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback

import numpy as np

__all__ = ["KSM_SYSFS", "PAGE", "COUNTERS", "available", "read_knob", "read_knobs", "writable_knobs",
           "KernelKSM", "KernelRegion", "KernelVM", "KernelProc", "ksm_stat", "pagemap", "other_ksm_processes",
           "merge_counts", "ksmd_throughput", "kernel_cow_us"]

KSM_SYSFS = "/sys/kernel/mm/ksm"
PAGE = 4096
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "pages_scanned",
            "pages_skipped", "full_scans", "general_profit", "stable_node_chains", "stable_node_dups",
            "ksm_zero_pages")
KSM_STAT_KEYS = ("ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit")
# Only writable while nothing is merged (the kernel answers EBUSY otherwise).
NEED_UNMERGED = ("max_page_sharing", "merge_across_nodes")
# What wait_stable() compares between two consecutive full scans.
STABLE_KEYS = ("pages_shared", "pages_sharing", "pages_unshared", "stable_node_chains", "stable_node_dups",
               "ksm_zero_pages")
POLL_S = 0.002

_LOCK_NAME = "ksm-proto-kernel-ksm.lock"


# ---------------------------------------------------------------------------- sysfs
def _path(name: str) -> str:
    return os.path.join(KSM_SYSFS, name)


def read_knob(name: str) -> str:
    """One sysfs file's value; a choice list like "[none] scan-time" reads as its bracketed value."""
    with open(_path(name)) as f:
        v = f.read().strip()
    if "[" in v and "]" in v:
        v = v[v.index("[") + 1:v.index("]")]
    return v


def _write(name: str, value) -> None:
    """Write one knob with a single write(2), so the kernel's errno comes back as OSError."""
    if isinstance(value, bool):
        value = int(value)
    data = str(value).encode()
    path = _path(name)
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        raise OSError(e.errno, f"cannot open {path} for writing: {e.strerror}", path) from None
    try:
        os.write(fd, data)
    except OSError as e:
        hint = ""
        if e.errno == errno.EBUSY and name in NEED_UNMERGED:
            hint = " (only changeable while no page is merged: unmerge first)"
        elif e.errno == errno.EINVAL and name == "pages_to_scan" and os.path.exists(_path("advisor_mode")) \
                and read_knob("advisor_mode") != "none":
            hint = " (pages_to_scan is read-only while advisor_mode is not none)"
        raise OSError(e.errno, f"writing {data.decode()!r} to {path}: {e.strerror}{hint}", path) from None
    finally:
        os.close(fd)


def writable_knobs() -> list[str]:
    """Names of the writable files of /sys/kernel/mm/ksm, by their mode bits (root may write anything)."""
    out = []
    for name in sorted(os.listdir(KSM_SYSFS)):
        st = os.stat(_path(name))
        if st.st_mode & 0o222:
            out.append(name)
    return out


def read_knobs() -> dict[str, str]:
    """Every writable knob and its current value (as read_knob gives it)."""
    return {k: read_knob(k) for k in writable_knobs()}


def _counters() -> dict[str, int]:
    out = {}
    for k in COUNTERS:
        try:
            out[k] = int(read_knob(k))
        except FileNotFoundError:          # an older kernel without this counter
            pass
    return out


def available() -> tuple[bool, str]:
    """(True, "") if this process may drive the kernel's KSM, else (False, why).  Changes nothing."""
    if not sys.platform.startswith("linux"):
        return False, f"not Linux ({sys.platform}): no kernel KSM"
    if not os.path.isdir(KSM_SYSFS):
        return False, f"{KSM_SYSFS} does not exist (kernel built without CONFIG_KSM?)"
    if not hasattr(mmap, "MADV_MERGEABLE"):
        return False, "this Python's mmap module has no MADV_MERGEABLE"
    run = _path("run")
    try:
        cur = read_knob("run")
    except OSError as e:
        return False, f"{run} is not readable ({e.strerror})"
    try:
        fd = os.open(run, os.O_WRONLY)
    except OSError as e:
        why = "not root?" if e.errno in (errno.EACCES, errno.EPERM) else e.strerror
        return False, f"{run} is not writable ({why})"
    try:
        os.write(fd, cur.encode())          # the value it has: the kernel changes nothing
    except OSError as e:
        return False, f"writing the current value {cur!r} back to {run} failed ({e.strerror})"
    finally:
        os.close(fd)
    if not os.path.exists("/proc/self/ksm_stat"):
        return False, "/proc/<pid>/ksm_stat is missing (kernel older than 6.1?): no per-process counters"
    return True, ""


def ksm_stat(pid: int | str = "self") -> dict:
    """/proc/<pid>/ksm_stat: the counters (ksm_rmap_items, ksm_zero_pages, ksm_merging_pages,
    ksm_process_profit) as ints, the yes/no lines (ksm_merge_any, ksm_mergeable) as bools."""
    out: dict = {}
    with open(f"/proc/{pid}/ksm_stat") as f:
        for line in f:
            k, _, v = line.partition(" ")
            k, v = k.rstrip(":"), v.strip()
            if v.lstrip("-").isdigit():
                out[k] = int(v)
            elif v in ("yes", "no"):
                out[k] = v == "yes"
    return out


PM_PRESENT, PM_SWAP, PM_PFN_MASK = 1 << 63, 1 << 62, (1 << 55) - 1


def pagemap(pid: int | str, addr: int, npages: int) -> list[int | None]:
    """The frame number each of npages pages from addr maps, from /proc/<pid>/pagemap (None: not
    present).  Frame numbers need CAP_SYS_ADMIN; without it the kernel reports 0 for every page."""
    if addr % PAGE or npages < 0:
        raise OSError(errno.EINVAL, f"pagemap({addr:#x}, {npages}): unaligned address or negative count")
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = os.pread(fd, 8 * npages, (addr // PAGE) * 8)
    finally:
        os.close(fd)
    ents = np.frombuffer(raw, dtype=np.uint64).tolist() + [0] * (npages - len(raw) // 8)
    return [e & PM_PFN_MASK if e & PM_PRESENT else None for e in ents]


def other_ksm_processes(exclude=()) -> dict[int, dict[str, int]]:
    """Processes (other than `exclude` and this one) that ksmd is tracking: they share the global counters."""
    skip = {os.getpid(), *exclude}
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in skip:
            continue
        try:
            with open(f"/proc/{d}/ksm_stat") as f:
                text = f.read()
        except OSError:
            continue
        st = {}
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if v.strip().lstrip("-").isdigit():
                st[k.rstrip(":")] = int(v)
        if st.get("ksm_rmap_items") or st.get("ksm_merging_pages") or st.get("ksm_zero_pages") \
                or "ksm_mergeable: yes" in text:
            out[int(d)] = st
    return out


# ---------------------------------------------------------------------------- the lock
class _MachineLock:
    """One driver of /sys/kernel/mm/ksm on this machine at a time: flock, re-entrant inside a process."""

    def __init__(self):
        self._rlock = threading.RLock()
        self._depth = 0
        self.fd: int | None = None

    @staticmethod
    def path() -> str:
        d = "/run/lock" if os.path.isdir("/run/lock") and os.access("/run/lock", os.W_OK) else tempfile.gettempdir()
        return os.path.join(d, _LOCK_NAME)

    def acquire(self, timeout: float) -> None:
        if not self._rlock.acquire(timeout=max(0.0, timeout)):
            raise TimeoutError(f"another thread of this process drives kernel KSM; waited {timeout}s")
        if self._depth:
            self._depth += 1
            return
        try:
            path = self.path()
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                        os.close(fd)
                        raise TimeoutError(f"kernel KSM is being driven by another process (pid {holder or '?'}, "
                                           f"lock {path}); waited {timeout}s") from None
                    time.sleep(0.05)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            self._depth = 1
        except BaseException:
            self._rlock.release()
            raise

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        self._rlock.release()


_LOCK = _MachineLock()


@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C while knobs are being put back; re-deliver it afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    try:
        old = signal.signal(signal.SIGINT, lambda s, f: got.append(s))
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            if callable(old):
                old(signal.SIGINT, None)
            elif old != signal.SIG_IGN:
                raise KeyboardInterrupt


# ---------------------------------------------------------------------------- KernelKSM
class KernelKSM:
    """Drive /sys/kernel/mm/ksm.  On exit every knob is put back and run is left at 0.

        with KernelKSM() as k:
            k.set(pages_to_scan=100000, sleep_millisecs=0, run=1)
            k.wait_full_scans(3, timeout=10)
            print(k.stats())
    """

    def __init__(self, lock_timeout: float = 300.0, restore_timeout: float = 60.0):
        self.lock_timeout = lock_timeout
        self.restore_timeout = restore_timeout
        self.saved: dict[str, str] | None = None

    # -- context
    def __enter__(self) -> "KernelKSM":
        _LOCK.acquire(self.lock_timeout)
        try:
            self.saved = read_knobs()
        except BaseException:
            _LOCK.release()
            raise
        return self

    def __exit__(self, et, ev, tb) -> bool:
        try:
            with _sigint_deferred():
                problems = self.restore()
        finally:
            self.saved = None
            _LOCK.release()
        if problems:
            msg = "kernel KSM knobs not restored: " + "; ".join(problems)
            if ev is None:
                raise RuntimeError(msg)
            if hasattr(ev, "add_note"):
                ev.add_note(msg)
            else:
                print(msg, file=sys.stderr)
        return False

    def restore(self) -> list[str]:
        """Put every saved knob back, in an order the kernel accepts; run ends 0.  Returns the failures."""
        if self.saved is None:
            raise RuntimeError("KernelKSM.restore() outside its with block")
        saved = self.saved
        problems: list[str] = []

        def put(name, value):
            try:
                if read_knob(name) != value:
                    _write(name, value)
            except OSError as e:
                problems.append(f"{name}={value!r}: {e}")

        put("run", "0")                                  # first: ksmd stops
        if "advisor_mode" in saved:
            put("advisor_mode", "none")                  # pages_to_scan is EINVAL while the advisor runs
        busy = []
        for k in NEED_UNMERGED:
            try:
                if k in saved and read_knob(k) != saved[k]:
                    busy.append(k)
            except OSError as e:
                problems.append(f"{k}={saved[k]!r}: {e}")
        if busy:
            deadline = time.monotonic() + self.restore_timeout
            while True:
                try:
                    if _counters().get("pages_shared"):
                        self.unmerge_all(max(1.0, deadline - time.monotonic()))
                    for k in busy:
                        if read_knob(k) != saved[k]:
                            _write(k, saved[k])
                    break
                except (OSError, TimeoutError) as e:
                    if time.monotonic() > deadline:
                        problems.append(f"{busy}: {e}")
                        break
                    time.sleep(0.01)
        for k, v in saved.items():
            if k not in ("run", "advisor_mode", *NEED_UNMERGED):
                put(k, v)
        if saved.get("advisor_mode", "none") != "none":
            put("advisor_mode", saved["advisor_mode"])   # last: it sets pages_to_scan itself
        try:
            _write("run", 0)                             # always: never left merging
        except OSError as e:
            problems.append(f"run=0: {e}")
        for k, v in saved.items():                       # check
            if k == "run" or (k == "pages_to_scan" and saved.get("advisor_mode", "none") != "none"):
                continue
            try:
                now = read_knob(k)
            except OSError as e:
                now = f"unreadable ({e})"
            if now != v and not any(p.startswith(f"{k}=") for p in problems):
                problems.append(f"{k} is {now!r}, was {v!r}")
        return problems

    # -- knobs and counters
    def set(self, **knobs) -> None:
        """Write knobs in the order given; OSError (with the kernel's errno) on the first failure."""
        if self.saved is None:
            raise RuntimeError("KernelKSM.set() outside its with block: nothing would put the knobs back")
        for k, v in knobs.items():
            if k not in self.saved:
                raise OSError(errno.ENOENT, f"{_path(k)} is not a writable KSM knob "
                                            f"(writable: {', '.join(self.saved)})", _path(k))
            _write(k, v)

    def get(self, name: str) -> str:
        return read_knob(name)

    @staticmethod
    def stats() -> dict[str, int]:
        """Every KSM counter file as an int."""
        return _counters()

    def wait_full_scans(self, n: int, timeout: float) -> dict[str, int]:
        """Wait until full_scans has advanced by at least n from now; returns stats() then."""
        prev = int(read_knob("full_scans"))
        advanced = 0
        deadline = time.monotonic() + timeout
        while advanced < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"kernel ksmd did {advanced} of {n} full scans in {timeout:.3g}s "
                                   f"(run={read_knob('run')}): {self.stats()}")
            time.sleep(POLL_S)
            cur = int(read_knob("full_scans"))
            advanced += cur - prev if cur >= prev else cur      # run=2 resets it to 0
            prev = cur
        return self.stats()

    def wait_stable(self, timeout: float, keys=STABLE_KEYS) -> dict[str, int]:
        """Wait a full scan at a time until `keys` are equal after two consecutive full scans."""
        deadline = time.monotonic() + timeout
        last = None
        history = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"kernel KSM counters did not settle in {timeout:.3g}s; "
                                   f"last values of {keys}: {history[-5:]}")
            s = self.wait_full_scans(1, left)
            cur = tuple(s[k] for k in keys if k in s)
            history.append(cur)
            if cur == last:
                return s
            last = cur

    def unmerge_all(self, timeout: float = 60) -> None:
        """run=2 (break every KSM page, drop every rmap item), wait for the counters to be 0, then run=0."""
        _write("run", 2)
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if not (s.get("pages_shared") or s.get("pages_sharing") or s.get("ksm_zero_pages")):
                break
            if time.monotonic() > deadline:
                _write("run", 0)
                raise TimeoutError(f"run=2 did not unmerge everything within {timeout}s: {s}")
            time.sleep(POLL_S)
        _write("run", 0)


# ---------------------------------------------------------------------------- memory
def _as_pages(pages: np.ndarray, npages: int | None = None) -> np.ndarray:
    a = np.asarray(pages)
    if a.dtype != np.uint8 or a.ndim != 2 or a.shape[1] != PAGE:
        raise ValueError(f"pages must be a numpy uint8 array shaped (npages, {PAGE}), not {a.dtype} {a.shape}")
    if npages is not None and a.shape[0] != npages:
        raise ValueError(f"expected {npages} pages, got {a.shape[0]}")
    return np.ascontiguousarray(a)


class KernelRegion:
    """One anonymous private mapping of `npages` pages of this process (no THP unless huge=True)."""

    def __init__(self, npages: int, huge: bool = False):
        if npages < 1:
            raise ValueError(f"a region needs at least one page, not {npages}")
        self.npages = int(npages)
        self.nbytes = self.npages * PAGE
        self.mmap = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        if not huge and hasattr(mmap, "MADV_NOHUGEPAGE"):
            self.mmap.madvise(mmap.MADV_NOHUGEPAGE)    # 4 KiB pages, as ksm-proto models them

    def fill(self, pages: np.ndarray) -> None:
        src = _as_pages(pages, self.npages).reshape(-1)
        with memoryview(self.mmap) as mv:
            mv[:] = src

    def madvise_mergeable(self) -> None:
        self.mmap.madvise(mmap.MADV_MERGEABLE)

    def madvise_unmergeable(self) -> None:
        self.mmap.madvise(mmap.MADV_UNMERGEABLE)

    def close(self) -> None:
        if not self.mmap.closed:
            self.mmap.close()

    def __enter__(self) -> "KernelRegion":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class KernelVM:
    """A forked child process that maps one KernelRegion, fills it, advises it mergeable, then waits.

    The parent keeps the write end of a pipe; closing it (or the parent dying) makes
    the child exit.  `rewrite` > 0: the child keeps stamping a new counter into its
    first `rewrite` pages (pages that never stay the same for a scan).
    """

    _go_fds: set[int] = set()          # write ends held for live children: a new child closes them all

    def __init__(self, pages: np.ndarray, rewrite: int = 0, ready_timeout: float = 60.0):
        pages = _as_pages(pages)
        self.npages = len(pages)
        self.pid: int | None = None
        self._go: int | None = None
        r_ready, w_ready = os.pipe()
        r_go, w_go = os.pipe()
        try:
            pid = os.fork()
        except BaseException:
            for fd in (r_ready, w_ready, r_go, w_go):
                os.close(fd)
            raise
        if pid == 0:
            self._child(pages, rewrite, r_ready, w_ready, r_go, w_go)      # never returns
        os.close(w_ready)
        os.close(r_go)
        self.pid = pid
        self._go = w_go
        KernelVM._go_fds.add(w_go)
        try:
            msg = b""
            deadline = time.monotonic() + ready_timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"kernel VM child {pid} ({self.npages} pages) not ready in {ready_timeout}s")
                if select.select([r_ready], [], [], left)[0]:
                    chunk = os.read(r_ready, 65536)
                    msg += chunk
                    if not chunk or msg.startswith(b"r"):
                        break
            if not msg.startswith(b"r"):
                why = msg[1:].decode(errors="replace").strip() or "exited without a word"
                raise RuntimeError(f"kernel VM child {pid} failed: {why}")
        except BaseException:
            self.close()
            raise
        finally:
            os.close(r_ready)

    @staticmethod
    def _child(pages, rewrite, r_ready, w_ready, r_go, w_go) -> None:
        code = 1
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)       # the parent decides when we go
            os.close(r_ready)
            os.close(w_go)
            for fd in list(KernelVM._go_fds) + ([_LOCK.fd] if _LOCK.fd is not None else []):
                with contextlib.suppress(OSError):
                    os.close(fd)                                # else a sibling never sees its EOF
            try:
                region = KernelRegion(len(pages))
                region.fill(pages)
                region.madvise_mergeable()
            except BaseException:
                os.write(w_ready, b"e" + traceback.format_exc(limit=3).encode()[-4000:])
                raise
            os.write(w_ready, b"r")
            os.close(w_ready)
            n = 0
            with memoryview(region.mmap) as mv:
                while rewrite and not select.select([r_go], [], [], 0.0005)[0]:
                    n += 1
                    stamp = n.to_bytes(8, "little")
                    for i in range(rewrite):                    # new bytes all the time
                        mv[i * PAGE:i * PAGE + 16] = stamp + i.to_bytes(8, "little")
            os.read(r_go, 1)                                    # b"" when the parent closes its end
            code = 0
        except BaseException:
            code = 1
        finally:
            os._exit(code)

    def tell_exit(self) -> None:
        """Close our end of the child's pipe: it exits (close() then reaps it)."""
        if self._go is not None:
            fd, self._go = self._go, None
            KernelVM._go_fds.discard(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def ksm_stat(self) -> dict[str, int]:
        if self.pid is None:
            raise RuntimeError("kernel VM child already ended")
        return ksm_stat(self.pid)

    def close(self, timeout: float = 10.0) -> None:
        """End the child: EOF on its pipe, then SIGKILL (by its pid) if it has not exited in `timeout`."""
        if self.pid is None:
            return
        self.tell_exit()
        pid, self.pid = self.pid, None
        if _reap(pid, timeout):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _reap(pid, 10.0):
            raise RuntimeError(f"kernel VM child {pid} survived SIGKILL for 10s")

    def __enter__(self) -> "KernelVM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reap(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)


# ---------------------------------------------------------------------------- a process driven call by call
PR_SET_PDEATHSIG = 1
PR_GET_MEMORY_MERGE = 68
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _libc():
    """libc with the prototypes the helper needs (lengths as size_t: a negative length wraps, as in C)."""
    lib = ctypes.CDLL(None, use_errno=True)
    vp, sz, i, ul = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_ulong
    lib.mmap.restype, lib.mmap.argtypes = vp, [vp, sz, i, i, i, ctypes.c_long]
    for name in ("madvise", "mprotect"):
        getattr(lib, name).argtypes = [vp, sz, i]
    lib.munmap.argtypes = [vp, sz]
    lib.prctl.argtypes = [i, ul, ul, ul, ul]
    for name in ("process_vm_readv", "process_vm_writev"):
        f = getattr(lib, name)
        f.restype = ctypes.c_ssize_t
        f.argtypes = [i, ctypes.POINTER(_IOVec), ul, ctypes.POINTER(_IOVec), ul, ul]
    return lib


def _check(ret: int, what: str) -> int:
    if ret == -1 or (what == "mmap" and ret in (None, ctypes.c_void_p(-1).value)):
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


class _Helper:
    """The child side of KernelProc: executes one request at a time on its own address space.

    Memory is touched with process_vm_readv/writev on itself: the kernel's own user-access
    rules (GUP without FOLL_FORCE) apply, and an access the CPU would SIGSEGV on (a hole,
    PROT_NONE, a write to a read-only page) returns EFAULT instead of killing the helper.
    """

    def __init__(self, sock: socket.socket, regions: list):
        self.sock = sock
        self.lib = _libc()
        self.pid = os.getpid()
        self.regions = list(regions)         # [(start, end)] of the areas the test mapped

    def _vm(self, write: bool, addr: int, buf) -> int:
        local = _IOVec(ctypes.cast(buf, ctypes.c_void_p), len(buf))
        remote = _IOVec(addr, len(buf))
        f = self.lib.process_vm_writev if write else self.lib.process_vm_readv
        n = _check(f(self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0),
                   "process_vm_writev" if write else "process_vm_readv")
        if n != len(buf):
            raise OSError(errno.EFAULT, f"{'write' if write else 'read'} of {len(buf)} bytes at {addr:#x}: "
                                        f"only {n} done (Bad address)")
        return n

    def op(self, op: str, a: dict):
        lib = self.lib
        if op == "mmap":
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            addr = _check(lib.mmap(None, a["length"], a.get("prot", _PROT_RW), flags, -1, 0), "mmap")
            if hasattr(mmap, "MADV_NOHUGEPAGE"):       # 4 KiB pages, as ksm-proto models them
                lib.madvise(addr, a["length"], mmap.MADV_NOHUGEPAGE)
            self.regions.append((addr, addr + a["length"]))
            return addr
        if op == "munmap":
            return _check(lib.munmap(a["addr"], a["length"]), "munmap")
        if op == "madvise":
            return _check(lib.madvise(a["addr"], a["length"], a["advice"]), "madvise")
        if op == "mprotect":
            return _check(lib.mprotect(a["addr"], a["length"], a["prot"]), "mprotect")
        if op == "prctl":
            return _check(lib.prctl(*a["args"]), "prctl")
        if op == "write":
            data = ctypes.create_string_buffer(a["data"], len(a["data"]))
            return self._vm(True, a["addr"], data)
        if op == "read":
            buf = ctypes.create_string_buffer(a["n"])
            self._vm(False, a["addr"], buf)
            return buf.raw
        if op == "fork":
            _, fds, _, _ = socket.recv_fds(self.sock, 1, 1)
            if not fds:
                raise OSError(errno.EINVAL, "fork: no channel for the child")
            pid = os.fork()
            if pid == 0:
                self.sock.close()
                _Helper.start(socket.socket(fileno=fds[0]), self.regions)      # never returns
            os.close(fds[0])
            return pid
        raise OSError(errno.EINVAL, f"unknown op {op!r}")

    def interpreter_unmergeable(self) -> None:
        """Under prctl merge-any every area of this process is VM_MERGEABLE, the interpreter's
        heap and buffers included (copies of the test's pages among them): MADV_UNMERGEABLE on
        everything outside the areas the test mapped keeps them out of the kernel's counters."""
        if self.lib.prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) != 1:
            return
        with open("/proc/self/maps") as f:
            areas = [tuple(int(v, 16) for v in line.split()[0].split("-")) for line in f]
        ours = sorted(self.regions)
        for lo, hi in areas:
            for a, b in ours:               # the pieces of [lo, hi) outside every test area
                if b <= lo or a >= hi:
                    continue
                if a > lo:
                    self.lib.madvise(lo, a - lo, mmap.MADV_UNMERGEABLE)
                lo = max(lo, b)
            if lo < hi:
                self.lib.madvise(lo, hi - lo, mmap.MADV_UNMERGEABLE)

    def serve(self) -> None:
        while True:
            req = _recv_msg(self.sock)
            if req is None:
                return
            op, args = req
            try:
                rep = ("ok", self.op(op, args))
                self.interpreter_unmergeable()
            except OSError as e:
                rep = ("err", e.errno or errno.EIO, e.strerror or str(e))
            except Exception as e:       # noqa: BLE001 - the caller hears of it
                rep = ("err", errno.EIO, repr(e))
            _send_msg(self.sock, rep)

    @staticmethod
    def start(sock: socket.socket, regions=()) -> None:
        """The child's life: die with the parent, close every other fd, serve, exit."""
        code = 1
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)       # forked children are reaped by the kernel
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            fd = sock.fileno()
            os.closerange(3, fd)                                 # other children's pipes, locks, sockets
            os.closerange(fd + 1, 65536)
            _Helper(sock, regions).serve()
            code = 0
        except BaseException:
            code = 1
        finally:
            os._exit(code)


def _send_msg(sock: socket.socket, obj) -> None:
    b = pickle.dumps(obj)
    sock.sendall(struct.pack("<I", len(b)) + b)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            return None
        out += chunk
    return bytes(out)


def _recv_msg(sock: socket.socket):
    h = _recv_exact(sock, 4)
    if h is None:
        return None
    b = _recv_exact(sock, struct.unpack("<I", h)[0])
    return None if b is None else pickle.loads(b)


class KernelProc:
    """A helper process of the real kernel, driven call by call with ksm-proto's VM handle API.

        p = KernelProc("a")
        x = p.mmap(16 * PAGE); p.write(x, data); p.madvise(x, 16 * PAGE, MADV_MERGEABLE)
        c = p.fork("b")                     # a child of the helper: the same address space, COW
        p.ksm_stat(), p.pagemap(x, 16)      # /proc/<pid>/ksm_stat and /proc/<pid>/pagemap

    Every call answers within `timeout` or raises TimeoutError; an error is the kernel's
    errno as OSError and the helper keeps running.  Under prctl PR_SET_MEMORY_MERGE the
    helper takes its own interpreter memory out of KSM after every call, so the kernel's
    counters hold only the areas the test mapped.  close() ends it (EOF on its socket,
    SIGKILL by pid after a timeout); a helper also dies with its parent.
    """

    _socks: set[int] = set()

    def __init__(self, name: str = "k", timeout: float = 30.0, _sock: socket.socket | None = None,
                 _pid: int | None = None):
        self.name = name
        self.timeout = timeout
        self.own_child = _sock is None
        if _sock is None:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            pid = os.fork()
            if pid == 0:
                mine.close()
                _Helper.start(theirs)            # never returns
            theirs.close()
            _sock, _pid = mine, pid
        self.sock = _sock
        self.pid = _pid
        KernelProc._socks.add(self.sock.fileno())

    # -- the calls
    def _call(self, op: str, **args):
        if self.sock is None:
            raise OSError(errno.ESRCH, f"kernel helper {self.name} has ended")
        _send_msg(self.sock, (op, args))
        return self._reply(op)

    def _reply(self, op: str):
        if not select.select([self.sock], [], [], self.timeout)[0]:
            raise TimeoutError(f"kernel helper {self.name} (pid {self.pid}) did not answer {op} in {self.timeout}s")
        rep = _recv_msg(self.sock)
        if rep is None:
            raise OSError(errno.ESRCH, f"kernel helper {self.name} (pid {self.pid}) exited during {op}")
        if rep[0] == "err":
            raise OSError(rep[1], f"{self.name}: {rep[2]}")
        return rep[1]

    def mmap(self, length: int, prot: int = _PROT_RW) -> int:
        return self._call("mmap", length=length, prot=prot)

    def munmap(self, addr: int, length: int) -> None:
        self._call("munmap", addr=addr, length=length)

    def write(self, addr: int, data) -> None:
        self._call("write", addr=addr, data=bytes(data))

    def read(self, addr: int, n: int) -> bytes:
        return self._call("read", addr=addr, n=n)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        self._call("madvise", addr=addr, length=length, advice=advice)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        self._call("mprotect", addr=addr, length=length, prot=prot)

    def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
        return self._call("prctl", args=[option, arg2, arg3, arg4, arg5])

    def fork(self, name: str) -> "KernelProc":
        """fork(2) in the helper: the child is a helper too, served on a channel of its own."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _send_msg(self.sock, ("fork", {}))
            socket.send_fds(self.sock, [b"F"], [theirs.fileno()])
            pid = self._reply("fork")
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        return KernelProc(name, self.timeout, _sock=mine, _pid=pid)

    def ksm_stat(self) -> dict:
        return ksm_stat(self.pid)

    def pagemap(self, addr: int, npages: int) -> list[int | None]:
        return pagemap(self.pid, addr, npages)

    # -- the end
    def close(self, timeout: float = 10.0) -> None:
        """EOF on the helper's socket: it exits; SIGKILL (by its pid) if it has not after `timeout`."""
        if self.sock is None:
            return
        KernelProc._socks.discard(self.sock.fileno())
        self.sock.close()
        self.sock = None
        pid, self.pid = self.pid, None
        if self.own_child:
            if not _reap(pid, timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _reap(pid, 10.0)
            return
        deadline = time.monotonic() + timeout     # a grandchild: its parent reaps it (SIGCHLD ignored)
        while _exists(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10.0
            time.sleep(POLL_S)

    def __enter__(self) -> "KernelProc":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def _end_all(vms: list[KernelVM]) -> list[str]:
    problems = []
    for vm in vms:                  # EOF to all first, so they exit in parallel
        vm.tell_exit()
    for vm in vms:
        try:
            vm.close()
        except Exception as e:      # noqa: BLE001 - every child gets its turn
            problems.append(str(e))
    return problems


def _start(k: KernelKSM, knobs: dict, timeout: float) -> None:
    """Stop ksmd, unmerge everything (counters from 0, EBUSY knobs writable), then set knobs."""
    k.set(run=0)
    k.unmerge_all(timeout)
    knobs = dict(knobs)
    if "advisor_mode" in knobs:                         # it resets pages_to_scan: write it first
        k.set(advisor_mode=knobs.pop("advisor_mode"))
    elif "advisor_mode" in (k.saved or {}) and read_knob("advisor_mode") != "none":
        k.set(advisor_mode="none")
    k.set(**knobs)


# ---------------------------------------------------------------------------- measurements
def merge_counts(layouts: list[np.ndarray], knobs: dict, full_scans: int = 3, timeout: float = 60,
                 rewrite: list[int] | None = None) -> dict:
    """The oracle: each layout in a process of its own, ksmd merges, the counters come back.

    layouts: one uint8 array (npages, 4096) per "VM".  knobs: any /sys/kernel/mm/ksm
    knob except run (pages_to_scan defaults to 100000, sleep_millisecs to 0).
    rewrite[i]: that many leading pages of layout i keep changing.  Waits `full_scans`
    full scans after every region is advised, then one more at a time until the
    counters are the same after two consecutive scans.  Returns {"ksm": stats(),
    "procs": [ksm_stat of each child], "others": {pid: ksm_stat} of any other process
    ksmd tracks (their pages count in "ksm" too)}.
    """
    if "run" in knobs:
        raise ValueError("merge_counts drives run itself; do not pass it in knobs")
    rewrite = list(rewrite or [0] * len(layouts))
    if len(rewrite) != len(layouts):
        raise ValueError(f"rewrite has {len(rewrite)} entries for {len(layouts)} layouts")
    layouts = [_as_pages(a) for a in layouts]
    knobs = {"pages_to_scan": 100000, "sleep_millisecs": 0, **knobs}
    deadline = time.monotonic() + timeout

    def left() -> float:
        t = deadline - time.monotonic()
        if t <= 0:
            raise TimeoutError(f"merge_counts ran out of its {timeout}s")
        return t

    vms: list[KernelVM] = []
    with KernelKSM() as k:
        try:
            _start(k, knobs, left())
            for lay, rw in zip(layouts, rewrite):
                vms.append(KernelVM(lay, rw, ready_timeout=left()))
            k.set(run=1)
            k.wait_full_scans(full_scans, left())
            k.wait_stable(left())
            k.set(run=0)                                # a still snapshot: ksmd stops between batches
            stats = k.stats()
            procs = [vm.ksm_stat() for vm in vms]
            others = other_ksm_processes(exclude=[vm.pid for vm in vms])
            return {"ksm": stats, "procs": procs, "others": others}
        finally:
            with _sigint_deferred():
                try:
                    _write("run", 0)
                finally:
                    problems = _end_all(vms)            # their pages go with them: nothing to copy
                    k.unmerge_all(max(10.0, deadline - time.monotonic()))
            if problems:
                raise RuntimeError("; ".join(problems))


def ksmd_throughput(pages: np.ndarray, timeout: float = 600, knobs: dict | None = None) -> dict:
    """The real ksmd at full speed (pages_to_scan 100000, sleep_millisecs 0) on these bytes, in one region.

    `knobs`: more knobs to set first (smart_scan, max_page_sharing, ...).
    merge_seconds: from run=1 until pages_shared + pages_sharing reached the value it
    then kept for two more full scans.  pages_per_s: pages_scanned delta over the time
    from run=1 to the end of the last full scan seen.
    """
    pages = _as_pages(pages)
    deadline = time.monotonic() + timeout
    with KernelKSM() as k:
        region = None
        try:
            _start(k, {"pages_to_scan": 100000, "sleep_millisecs": 0, **(knobs or {})}, timeout)
            region = KernelRegion(len(pages))
            region.fill(pages)
            region.madvise_mergeable()
            s0 = k.stats()
            t0 = time.perf_counter()
            k.set(run=1)
            merged0 = s0["pages_shared"] + s0["pages_sharing"]
            last, t_change, scans_at_change = merged0, t0, 0
            while True:
                time.sleep(POLL_S)
                now = time.perf_counter()
                s = k.stats()
                scans = s["full_scans"] - s0["full_scans"]
                merged = s["pages_shared"] + s["pages_sharing"]
                if merged != last:
                    last, t_change, scans_at_change = merged, now, scans
                if scans >= 2 and scans - scans_at_change >= 2:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ksmd_throughput: {scans} full scans of {len(pages)} pages, not settled "
                                       f"in {timeout}s: {s}")
            k.set(run=0)
            elapsed = now - t0
            return {"pages_per_s": round((s["pages_scanned"] - s0["pages_scanned"]) / elapsed),
                    "merge_seconds": round(t_change - t0, 4), "full_scans": scans,
                    "pages_shared": s["pages_shared"], "pages_sharing": s["pages_sharing"],
                    "pages": len(pages), "seconds": round(elapsed, 4)}
        finally:
            _stop_close_unmerge(k, region, deadline)


def _stop_close_unmerge(k: "KernelKSM", region, deadline: float) -> None:
    """Cleanup shared by the measurements: run=0, drop the region, unmerge what is left (Ctrl-C held)."""
    with _sigint_deferred():
        try:
            _write("run", 0)
        finally:
            if region is not None:
                region.close()
            k.unmerge_all(max(10.0, deadline - time.monotonic()))


def kernel_cow_us(npages: int = 4096, timeout: float = 60) -> dict:
    """The kernel's own COW of a KSM page: write one byte into each of npages merged pages.

    All pages hold the same bytes; ksmd merges them all (with max_page_sharing M that
    is ceil(npages/M) KSM pages), is stopped (run=0 keeps them merged), then each page
    takes one write fault, timed alone.  The same writes again, to the now private
    pages, are the "unmerged" baseline.
    """
    deadline = time.monotonic() + timeout
    with KernelKSM() as k:
        region = None
        try:
            _start(k, {"pages_to_scan": 100000, "sleep_millisecs": 0}, timeout)
            region = KernelRegion(npages)
            region.fill(np.full((npages, PAGE), 0x5A, dtype=np.uint8))
            region.madvise_mergeable()
            k.set(run=1)
            while ksm_stat()["ksm_merging_pages"] < npages:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"kernel_cow_us: ksmd merged {ksm_stat()['ksm_merging_pages']} of "
                                       f"{npages} pages in {timeout}s: {k.stats()}")
                time.sleep(POLL_S)
            k.set(run=0)                                 # stopped; the pages stay merged
            merged = k.stats()
            pc = time.perf_counter_ns
            cow = [0] * npages
            plain = [0] * npages
            with memoryview(region.mmap) as mv:
                for i in range(npages):
                    off = i * PAGE
                    t = pc()
                    mv[off] = 6                          # write fault on a KSM page: copy it
                    cow[i] = pc() - t
                for i in range(npages):
                    off = i * PAGE
                    t = pc()
                    mv[off] = 7                          # private and writable now
                    plain[i] = pc() - t
            c, p = np.array(cow) / 1000.0, np.array(plain) / 1000.0
            return {"cow_p50_us": round(float(np.median(c)), 3), "cow_mean_us": round(float(c.mean()), 3),
                    "cow_p99_us": round(float(np.percentile(c, 99)), 3),
                    "unmerged_p50_us": round(float(np.median(p)), 3), "pages": npages,
                    "pages_shared": merged["pages_shared"], "pages_sharing": merged["pages_sharing"],
                    "_samples": c.tolist()}
        finally:
            _stop_close_unmerge(k, region, deadline)
