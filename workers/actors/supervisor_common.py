"""The names supervisor.py and its parts share (constants, the logger)."""
from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from proto.channel import BlockingChannel, ChannelClosed, send_fd
from proto.layout import (MM_STATS, MMF_VM_MERGE_ANY, MMH_FLAGS, PAGE_SHIFT, PAGE_SIZE, PTE_PRESENT, SHM_DIR, USER_BASE, VM_MERGEABLE,
                          FrameTable, MMView, Segment, StatsView, run_owner_pid)
from proto.messages import MAX_DATA, Msg, call_payload, decode

from workers import ROOT
from workers.mm.pte import check_range, task_size

log = logging.getLogger("ksm_proto.machine")


MAX_FRAMES = 1 << 32            # pfns are int32 in the frame table


MAX_VM_PAGES = 1 << 32          # 16 TiB of address space per VM


MAX_RESTARTS, RESTART_WINDOW = 20, 60.0


VM_NAME_MAX = 64


def shm_capacity() -> tuple[int, int]:
    """(bytes /dev/shm can still hold, bytes of memory the machine has available)."""
    try:
        st = os.statvfs(SHM_DIR)
        shm = st.f_bavail * st.f_frsize
    except OSError:
        shm = 0
    avail = shm
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return shm, avail


def check_capacity(what: str, nbytes: int) -> None:
    """OSError(ENOMEM) naming `what` if nbytes of shared memory cannot be had now."""
    shm, avail = shm_capacity()
    room = min(shm, avail)
    if nbytes > room:
        raise OSError(errno.ENOMEM, f"{what} needs {_size(nbytes)} of shared memory, but {SHM_DIR} has "
                                    f"{_size(shm)} free and the machine {_size(avail)} available")


def _size(n: int) -> str:
    for unit, k in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k:
            return f"{n / (1 << k):.1f} {unit}"
    return f"{n} bytes"


def machine_bytes(frames: int) -> int:
    """The shared memory a machine of `frames` frames maps (frames, frame table, stats)."""
    return frames * PAGE_SIZE + FrameTable.size_for(frames) + StatsView.size_for()


def check_vm_name(name) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= VM_NAME_MAX or not name.isprintable():
        raise ValueError(f"VM name {name!r} must be 1 to {VM_NAME_MAX} printable characters")
    return name


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


def sweep_stale_runs() -> list[str]:
    """Unlink /dev/shm entries of runs whose supervisor is no longer alive."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        pid = run_owner_pid(name)
        if pid is None or _alive(pid):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def run_entries(run: str) -> list[str]:
    try:
        return [n for n in os.listdir(SHM_DIR) if n.startswith(run + ".")]
    except OSError:
        return []


class ActorProcess:
    """One child actor: its Popen and its control channel."""

    def __init__(self, name: str, module: str, run: str, args: list[str], env=None, pass_fds=()):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd_parent, fd_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [sys.executable, "-m", module, "--run", run, "--ctl-fd", str(child.fileno()),
               "--fd-sock", str(fd_child.fileno()), *args]
        self.name = name
        try:
            # (a session of its own: a terminal's Ctrl-C goes to the supervisor alone, which stops the actors
            # in order; an actor still importing, a spare say, would otherwise die of it with a traceback)
            self.proc = subprocess.Popen(cmd, pass_fds=[child.fileno(), fd_child.fileno(), *pass_fds], env=env,
                                         cwd=ROOT, start_new_session=True)
        except BaseException:
            for sk in (parent, fd_parent):
                sk.close()
            raise
        finally:
            child.close()
            fd_child.close()
        self.ch = BlockingChannel(parent, name)
        self.fd_sock = fd_parent
        self.fd_seq = 0
        self.fd_lock = threading.Lock()
        self.expected_exit = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float) -> None:
        sock = self.ch.sock
        sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            if self.ch.ready:
                f = decode(self.ch.ready.pop(0))
                if f.json().get("ready"):
                    return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} did not start (exit code {self.proc.poll()})")
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise RuntimeError(f"{self.name} exited during start-up (exit code {self.proc.wait(5)})")
            try:
                self.ch.feed(data)
            except ChannelClosed as e:
                raise RuntimeError(f"{self.name} did not start: {e}") from None

    def hand_fd(self, op: str, fd: int, timeout: float = 30.0, **kw) -> tuple[dict, bytes]:
        """Pass fd over the actor's fd socket, then the control request `op` that takes it."""
        with self.fd_lock:
            self.fd_seq += 1
            try:
                send_fd(self.fd_sock, fd, {"seq": self.fd_seq})
            except OSError as e:
                raise ChannelClosed(f"{self.name}: cannot pass an fd: {e.strerror}") from None
            return self.call(op, timeout, seq=self.fd_seq, **kw)

    def call(self, op: str, timeout: float = 30.0, data: bytes = b"", **kw) -> tuple[dict, bytes]:
        f = self.ch.call(Msg.CALL, call_payload({"op": op, **kw}, data), timeout=timeout)
        rep = f.json()
        if rep.get("errno"):
            raise OSError(rep["errno"], f"{self.name}: {rep.get('error')}")
        return rep, f.data()

    def stop(self, timeout: float = 5.0) -> None:
        stop_all([self], timeout)

    def _ask_stop(self) -> None:
        """Close its channels: the actor sees the end of its control stream and exits."""
        self.expected_exit = True
        self.ch.close()
        self.fd_sock.close()

    def _wait_stopped(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()   # by its pid: one we started
            self.proc.wait(timeout)


def stop_all(actors: list[ActorProcess], timeout: float = 5.0) -> None:
    """Stop actors together: each is asked first, then each waited for (killed, by its pid, after
    `timeout`), so that their exits overlap instead of following one another."""
    for a in actors:
        a._ask_stop()
    for a in actors:
        a._wait_stopped(timeout)


class VM:
    """The parent's handle on one VM worker (safe to use from its own thread)."""

    def __init__(self, machine, name: str, mm_id: int, actor: ActorProcess, npages: int):
        self.machine = machine
        self.name = name
        self.mm_id = mm_id
        self.actor = actor
        self.npages = npages
        self.alive = True
        self.node, self.device, self.domain = 0, False, 0

    @property
    def pid(self) -> int:
        return self.actor.pid

    def _call(self, op, timeout=None, data=b"", **kw):
        if not self.alive:
            raise OSError(errno.ESRCH, f"VM {self.name} is not running")
        try:
            return self.actor.call(op, timeout or self.machine.call_timeout, data, **kw)
        except ChannelClosed:
            raise OSError(errno.ESRCH, f"VM {self.name} exited") from None

    def mmap(self, length: int, vm_flags: int = 0) -> int:
        return self._call("mmap", length=length, vm_flags=vm_flags)[0]["addr"]

    def munmap(self, addr: int, length: int) -> None:
        self._call("munmap", addr=addr, length=length)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        """MADV_DONTNEED, MADV_MERGEABLE or MADV_UNMERGEABLE; OSError with the kernel's errno."""
        self._call("madvise", addr=addr, length=length, advice=advice)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        """PROT_NONE, PROT_READ, PROT_READ | PROT_WRITE (PROT_EXEC accepted); OSError with the kernel's errno."""
        self._call("mprotect", addr=addr, length=length, prot=prot)

    def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
        """PR_SET_MEMORY_MERGE (1: merge-any, 0: off and unmerge) or PR_GET_MEMORY_MERGE; EINVAL otherwise."""
        return self._call("prctl", args=[option, arg2, arg3, arg4, arg5])[0]["ret"]

    def fork(self, name: str, device: bool | None = None) -> "VM":
        """fork(2): a new VM worker whose address space is a COW copy of this one (device: like the parent)."""
        return self.machine.spawn_vm(name, pages=self.npages, device=self.device if device is None else device,
                                     node=self.node, domain=self.domain, fork_from=self)

    def timed_writes(self, addr: int, npages: int, value: int = 0xA5) -> list[int]:
        """Write byte `value` at the start of each of npages pages from addr, one access each, timed by
        the VM worker itself around each access (monotonic ns, a COW fault included): the attacker's
        probe of the dedup side channel (workers/tools/sidechannel.py)."""
        return self._call("timed_writes", addr=addr, npages=npages, value=value)[0]["ns"]

    def pagemap(self, addr: int, npages: int) -> list[int | None]:
        """/proc/<pid>/pagemap: the frame number each page from addr maps (None: nothing present there;
        the shared zero page is frame 0).  A snapshot read without the page-table lock, as the kernel's."""
        if addr & (PAGE_SIZE - 1) or npages < 0:
            raise OSError(errno.EINVAL, f"pagemap({addr:#x}, {npages}): unaligned address or negative count")
        seg = self._segment()
        pte = MMView(seg).pte
        i0 = (addr - USER_BASE) >> PAGE_SHIFT
        out: list[int | None] = [None] * npages
        lo, hi = max(i0, 0), min(i0 + npages, len(pte))
        if lo < hi:
            p = pte[lo:hi].copy()
            present = (p & np.uint64(PTE_PRESENT)) != 0
            pfn = (p >> np.uint64(PAGE_SHIFT)).astype(np.int64).tolist()
            for k, (ok, f) in enumerate(zip(present.tolist(), pfn)):
                if ok:
                    out[lo - i0 + k] = f
        return out

    def _segment(self) -> Segment:
        if not self.alive or self.mm_id not in self.machine.mm_segs:
            raise OSError(errno.ESRCH, f"VM {self.name} is not running")
        return self.machine.mm_segs[self.mm_id][0]

    def write(self, addr: int, data) -> None:
        """Write data at addr, in frames of at most MAX_DATA bytes (a write of any size works)."""
        mv = memoryview(data).cast("B")
        if len(mv) <= MAX_DATA:
            self._call("write", data=bytes(mv), addr=addr)
            return
        check_range("access", addr, len(mv), task_size(self.npages))
        for off in range(0, len(mv), MAX_DATA):
            self._call("write", data=bytes(mv[off:off + MAX_DATA]), addr=addr + off)

    def read(self, addr: int, n: int) -> bytes:
        """Read n bytes at addr, in frames of at most MAX_DATA bytes (a read of any size works)."""
        return self._read("read", addr, n)

    def dma_read(self, addr: int, n: int) -> bytes:
        """Read through the device secondary MMU (a subscriber without change_pte)."""
        return self._read("dma_read", addr, n)

    def _read(self, op: str, addr: int, n: int) -> bytes:
        if not isinstance(n, int) or n <= MAX_DATA:
            return self._call(op, addr=addr, length=n)[1]
        check_range("access", addr, n, task_size(self.npages))
        out = bytearray()
        for off in range(0, n, MAX_DATA):
            out += self._call(op, addr=addr + off, length=min(MAX_DATA, n - off))[1]
        return bytes(out)

    def stats(self) -> dict:
        return self._call("stats")[0]

    def msg_log(self, clear: bool = False) -> dict[str, list[str]]:
        """The notifier messages each secondary MMU received, in order (last 4096)."""
        return self._call("msg_log", clear=clear)[0]

    def msg_tail(self, n: int = 64) -> dict[str, dict]:
        """Each secondary MMU's count of messages ever logged and its last n (the web view's sequence)."""
        return self._call("msg_log", tail=n)[0]

    def cow_samples_ns(self) -> list[int]:
        return self._call("cow_samples")[0]["ns"]

    def unregister(self, sub: int) -> None:
        self._call("unregister", sub=sub)

    def writer_start(self, addr: int, npages: int, seed: int, count: int = 0, values: int = 4,
                     period_ms: float = 0, counter: bool = False) -> int:
        """Start a writer in the VM (VMWorker.writer); counter=True: every write its own value, each
        checked at the next write to its page (writer_peek/writer_stop report "lost")."""
        return self._call("writer_start", addr=addr, npages=npages, seed=seed, count=count, values=values,
                          period_ms=period_ms, counter=counter)[0]["id"]

    def writer_peek(self, wid: int) -> dict:
        return self._call("writer_peek", id=wid)[0]

    def writer_stop(self, wid: int) -> dict:
        return self._call("writer_stop", id=wid)[0]

    def ksm_stat(self) -> dict:
        """/proc/<pid>/ksm_stat of this mm: the counters as ints, ksm_merge_any (prctl merge-any) and
        ksm_mergeable (some VMA is VM_MERGEABLE) as bools, as this machine's kernel prints them."""
        mm = MMView(self._segment())
        row = self.machine.stats.mm[self.mm_id]
        d = {k: int(v) for k, v in zip(MM_STATS, row.tolist())}
        d["ksm_process_profit"] = (d["ksm_merging_pages"] + d["ksm_zero_pages"]) * PAGE_SIZE \
            - d["ksm_rmap_items"] * self.machine.rmap_item_bytes()
        d["ksm_merge_any"] = bool(int(mm.hdr[MMH_FLAGS]) & MMF_VM_MERGE_ANY)
        d["ksm_mergeable"] = any(f & VM_MERGEABLE for _, _, f in mm.vma_list())
        return d

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)

    def close(self) -> None:
        self.machine.exit_vm(self)
