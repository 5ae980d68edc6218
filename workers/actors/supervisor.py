"""The supervisor: `Machine` creates the run's shared memory, starts and watches every actor.

It is the only creator and the only unlinker of the run's POSIX segments and
lock file (named after the run, mode 0600).  It starts the scanners (ksmd:
`scanners` of them, joined by socketpairs), the fault handlers (`fault_handlers`
of them) and one worker per VM as separate processes, gives the parent a handle on
each (`VM`, `KSMControl`), notices a worker that dies (its frames are freed, the
others go on), and tears everything down on exit, exception, Ctrl-C or SIGTERM.

Every channel between two actors is a socketpair it makes and hands out: a VM gets
its ends at spawn (one to its fault handler, `faultd_name(mm)`, and one to each
scanner), each scanner and the fault handler get theirs passed over their fd socket,
bound to that VM's mm (`attach_mm`); the scanners' mesh is socketpairs too, inherited
at spawn.  Nothing listens on a name, so no other process, of this uid or another,
can reach a channel.

When a scanner or a fault handler dies (kill -9 included), the supervisor replaces it
(`_recover`): the leader ksmd is frozen between rounds if the scanners still run,
every VM ends what the dead notifier had started and drops its secondary
translations, the frame table is repaired from the PTEs under every page-table lock
(core.repair), a new process is started and handed fresh channels to every VM it
serves.  A dead scanner takes every scanner down with it: they are restarted
together on a new mesh, over rmap items wiped to none, and each rebuilds its shard
of the stable tree from shared memory, the followers before the leader.  Faults in flight are sent again by the VMs; calls on the
dead actor wait for its successor, and fail with a clear error only once it is
really gone (it kept dying: more than MAX_RESTARTS restarts within RESTART_WINDOW s).

Sizes are checked before anything is allocated: a machine or a VM that needs more
shared memory than /dev/shm has free (or the machine has available) is refused.

A small reaper process (started in its own session) holds a pipe to the
supervisor: if the supervisor itself is killed with SIGKILL, the reaper unlinks
what the run left in /dev/shm.  Each actor dies with its parent
(PR_SET_PDEATHSIG).  A new Machine also sweeps segments of runs whose
supervisor pid is dead.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from proto.channel import BlockingChannel, ChannelClosed, send_fd
from proto.knobs import DEFAULTS, MITIGATIONS, OWN, check_knob
from proto.layout import (COUNTERS, KNOBS, MAX_MMS, MM_STATS, MMF_VM_MERGE_ANY, MMH_FLAGS, MMH_ID, MMH_NODE, MMH_DOMAIN,
                          MMH_NPAGES, MMH_OWNER_PID, PAGE_SHIFT, PAGE_SIZE, PTE_PRESENT, SHM_DIR, USER_BASE,
                          VM_MERGEABLE, FrameTable, MMView, RmapView, Segment, StatsView, create_lock_file,
                          new_run_name, run_owner_pid, seg_name, unlink_lock_file)
from proto.messages import MAX_DATA, Msg, call_payload, decode

from workers import ROOT
from workers.mm.effects import MEM_EFFECTS, Lock, Memory, Unlock, apply_mem, run_effects
from workers.mm.pte import check_range, task_size
from workers.mm.invariants import frame_problems
from workers.mm.recovery import Freeze, NotifierLost, Respawn, Thaw, recover
from workers.mm.repair import repair_frames
from workers.mm.vma import exit_mmap
from workers.runtime.frames import FrameAllocator, ShmLock
from workers.runtime.driver import MODES

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
            self.proc = subprocess.Popen(cmd, pass_fds=[child.fileno(), fd_child.fileno(), *pass_fds], env=env,
                                         cwd=ROOT)
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
        self.expected_exit = True
        self.ch.close()
        self.fd_sock.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()   # by its pid: one we started
            self.proc.wait(timeout)


class VM:
    """The parent's handle on one VM worker (safe to use from its own thread)."""

    def __init__(self, machine: "Machine", name: str, mm_id: int, actor: ActorProcess, npages: int):
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


class KSMControl:
    """m.ksm: the /sys/kernel/mm/ksm of this machine."""

    def __init__(self, machine: "Machine"):
        self.m = machine

    def set(self, **knobs) -> None:
        for k, v in knobs.items():
            check_knob(k, v)        # EINVAL early, naming the knob
        # (setting knobs is idempotent: if ksmd dies meanwhile, its successor gets the same call)
        self.m.actor_call("ksmd", "set_knobs", timeout=max(60.0, self.m.call_timeout), knobs=knobs)

    def get(self, name: str):
        v = self.m.stats.knob(name)
        if name == "mitigation":
            return MITIGATIONS[v]
        return ("none", "scan-time")[v] if name == "advisor_mode" else v

    def knobs(self) -> dict:
        return {k: self.get(k) for k in KNOBS}

    def stats(self) -> dict:
        return self.m.stats.counter_dict()

    def wait_full_scans(self, n: int = 1, timeout: float = 30.0, at_least: int | None = None) -> dict:
        """Wait until full_scans has advanced by n (or reached at_least); returns the counters.

        TimeoutError otherwise.
        """
        i = COUNTERS.index("full_scans")
        start = int(self.m.stats.counters[i])
        target = start + n if at_least is None else at_least
        deadline = time.monotonic() + timeout
        while int(self.m.stats.counters[i]) < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"full_scans went {start} -> {int(self.m.stats.counters[i])} in {timeout}s, "
                                   f"wanted +{n}{self._why_no_scan()}")
            if "ksmd" in self.m.gone:
                raise RuntimeError(f"ksmd is gone: {self.m.gone['ksmd']}")
            time.sleep(0.001)
        return self.stats()

    def _why_no_scan(self) -> str:
        run, pts = self.get("run"), self.get("pages_to_scan")
        if run != 1:
            return f" (run is {run}, not 1)"
        if pts == 0:
            return " (pages_to_scan is 0)"
        return ""

    def wait_stable(self, timeout: float = 60.0, scans: int = 2) -> dict:
        """Wait until the counters have not moved for `scans` full scans."""
        keys = ("pages_shared", "pages_sharing", "pages_unshared", "ksm_zero_pages", "stable_node_dups")
        deadline = time.monotonic() + timeout
        last, same = None, 0
        while True:
            s = self.wait_full_scans(1, max(0.1, deadline - time.monotonic()))
            cur = tuple(s[k] for k in keys)
            same = same + 1 if cur == last else 0
            last = cur
            if same >= scans:
                return s


class Machine:
    """A run of ksm-proto: shared memory, ksmd, the fault handler and VM workers."""

    def __init__(self, frames: int = 65536, notifier_mode: str = "change_pte", trace: str | None = None,
                 ksm_enabled: bool = True, ack_timeout: float = 10.0, call_timeout: float = 60.0,
                 knobs: dict | None = None, nodes: int = 1, scanners: int | None = None,
                 fault_handlers: int | None = None, restart_timeout: float = 30.0, spares: bool = True,
                 mitigation: str | None = None):
        if notifier_mode not in MODES:
            raise ValueError(f"notifier_mode {notifier_mode!r} is not one of {', '.join(MODES)}")
        if isinstance(frames, bool) or not isinstance(frames, int) or not 16 <= frames <= MAX_FRAMES:
            raise ValueError(f"frames={frames!r}: a machine has 16 to {MAX_FRAMES} frames")
        for name, v in (("ack_timeout", ack_timeout), ("call_timeout", call_timeout),
                        ("restart_timeout", restart_timeout)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3600:
                raise ValueError(f"{name}={v!r} must be a number of seconds in (0, 3600]")
        check_capacity(f"a machine of {frames} frames", machine_bytes(frames))
        self.nframes = frames
        self.mode = notifier_mode
        self.trace_path = trace
        self.ksm_enabled = ksm_enabled
        self.ack_timeout = ack_timeout
        self.call_timeout = call_timeout
        self.restart_timeout = restart_timeout  # how long a VM's fault waits for a restarted fault handler
        self.nodes = nodes
        self.initial_knobs = dict(knobs or {})
        if mitigation is not None:          # the side-channel defence (proto/knobs.py MITIGATIONS)
            self.initial_knobs["mitigation"] = mitigation
        for k, v in self.initial_knobs.items():
            check_knob(k, v)
        own = {"scanners": scanners, "fault_handlers": fault_handlers}
        for k in OWN:       # ksm-proto's own knobs: how many processes to start
            v = own[k] if own[k] is not None else self.initial_knobs.get(k, DEFAULTS[k])
            own[k] = check_knob(k, v)
            self.initial_knobs.pop(k, None)
        self.scanners, self.fault_handlers = own["scanners"], own["fault_handlers"]
        self.run = None
        self.vms: dict[str, VM] = {}
        self.mm_segs: dict[int, tuple[Segment, ShmLock]] = {}
        self.next_mm = 0
        self.lock = threading.RLock()
        self.closed = False
        self.dead_vms: list[str] = []
        self.ksm = KSMControl(self)
        self._started = False
        self.scanner_names = ["ksmd" if k == 0 else f"ksmd{k}" for k in range(self.scanners)]
        self.faultd_names = ["faultd" if k == 0 else f"faultd{k}" for k in range(self.fault_handlers)]
        self.actors: dict[str, ActorProcess] = {}   # every scanner and fault handler, by name
        self.ready = {n: threading.Event() for n in self.scanner_names + self.faultd_names}  # set while it is up
        self.gone: dict[str, str] = {}          # "ksmd" (the scanners) or a fault handler that kept dying: why
        self.restarts: dict[str, list[float]] = {}  # the same keys: when each was restarted
        self.repairs: list[dict] = []           # what each repair after a death found and fixed
        self.recoveries: list[dict] = []        # each death: who, the phases' seconds, serving_s, the repair
        self.use_spares = spares
        self.spares: dict[str, dict[str, ActorProcess]] = {}   # group -> its successor, started and waiting
        self.recover_lock = threading.RLock()   # one recovery at a time; spawn_vm waits for it
        self.watch_stop = threading.Event()
        self.mm_lock = threading.RLock()        # the mm table: repair vs. tearing an mm down

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Machine":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "Machine":
        sweep_stale_runs()
        self.run = run = new_run_name()
        self.trace_dir = tempfile.mkdtemp(prefix=f"{run}.trace.") if self.trace_path else None
        self._start_reaper()
        try:
            self.frames_seg = Segment.create(seg_name(run, "frames"), self.nframes * PAGE_SIZE)
            self.ft_seg = Segment.create(seg_name(run, "frametab"), FrameTable.size_for(self.nframes))
            self.stats_seg = Segment.create(seg_name(run, "stats"), StatsView.size_for())
            self.ft = FrameTable(self.ft_seg, self.nframes)
            self.stats = StatsView(self.stats_seg)
            for k, v in DEFAULTS.items():
                self.stats.knobs[KNOBS.index(k)] = v
            self.stats.knobs[KNOBS.index("scanners")] = self.scanners
            self.stats.knobs[KNOBS.index("fault_handlers")] = self.fault_handlers
            create_lock_file(run)
            self.frame_lock = ShmLock.frame_lock(run)
            self.alloc = FrameAllocator(self.ft, self.frames_seg.buf, self.frame_lock)
            self.alloc.format()
            common = ["--mode", self.mode, "--ack-timeout", str(self.ack_timeout)]
            if self.trace_dir:
                common += ["--trace", self.trace_dir]
            self.common_args = common
            for k in range(self.fault_handlers):
                name = self.faultd_names[k]
                self.actors[name] = ActorProcess(name, "workers.actors.faultd", run, self._faultd_args(k))
            self.actors.update(self._start_scanners(run, common))
            for a in list(self.actors.values()):
                a.wait_ready(30)
            for ev in self.ready.values():
                ev.set()
            self._started = True
            for g in ["ksmd"] + self.faultd_names:
                self._start_spare(g)
            if self.initial_knobs:
                self.ksm.set(**self.initial_knobs)
            self.watcher = threading.Thread(target=self._watch, name="ksm-proto-watch", daemon=True)
            self.watcher.start()
            self._install_sigterm()
        except BaseException:
            self.close()
            raise
        return self

    def _start_scanners(self, run: str, common: list, restarted: bool = False) -> dict:
        """N scanner processes, each pair joined by a socketpair (the mesh of workers/mm/ksm/shard.py), by
        name.  restarted: they rebuild their shards from shared memory when told to (`restore`)."""
        n = self.scanners
        ends: dict[int, dict[int, socket.socket]] = {k: {} for k in range(n)}
        for a in range(n):
            for b in range(a + 1, n):
                x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                ends[a][b], ends[b][a] = x, y
        procs: dict[str, ActorProcess] = {}
        try:
            for k in range(n):
                peers = [f"--peer={j}:{s.fileno()}" for j, s in ends[k].items()]
                name = self.scanner_names[k]
                procs[name] = ActorProcess(name, "workers.actors.ksmd", run,
                                           common + ["--shard", str(k), "--scanners", str(n), *peers]
                                           + (["--restarted"] if restarted else []),
                                           pass_fds=tuple(s.fileno() for s in ends[k].values()))
        except BaseException:
            for a in procs.values():
                a.stop(1)
            raise
        finally:
            for d in ends.values():
                for s in d.values():
                    s.close()
        return procs

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._old_term = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):
            raise SystemExit(128 + signum)   # unwinds through `with Machine()`: close() runs
        signal.signal(signal.SIGTERM, on_term)

    def _start_reaper(self) -> None:
        r, w = os.pipe()
        self.reaper = subprocess.Popen(
            [sys.executable, "-m", "workers.actors.reaper", "--run", self.run, "--fd", str(r)],
            pass_fds=[r], start_new_session=True,
            cwd=ROOT)
        os.close(r)
        self.reaper_fd = w

    def _watch(self) -> None:
        """Notice actors that die: a dead VM's mm is torn down, a dead ksmd or fault handler replaced.

        (It lives until close() has stopped every actor: the actors it restarted die with the
        thread that started them, PR_SET_PDEATHSIG.)
        """
        while not self.watch_stop.wait(0.05):
            if self.closed:
                continue
            for vm in list(self.vms.values()):
                if vm.alive and vm.actor.proc.poll() is not None and not vm.actor.expected_exit:
                    log.error("VM %s (pid %d) died with status %s: freeing its frames", vm.name, vm.pid,
                              vm.actor.proc.returncode)
                    t0 = time.monotonic()
                    rec = {"dead": [f"vm:{vm.name}"], "seen": time.time(), "phases": {}, "serving_s": None,
                           "repair": None}
                    try:
                        self._teardown_vm(vm)
                        rec["serving_s"] = round(time.monotonic() - t0, 4)     # (its frames are free again)
                    except Exception:
                        log.exception("tearing down dead VM %s", vm.name)
                    self.recoveries.append(rec)
                    self.dead_vms.append(vm.name)
            dead = [n for n, a in list(self.actors.items()) if a.proc.poll() is not None and not a.expected_exit]
            if dead and not self.closed:
                try:
                    self._recover(dead)
                except Exception:
                    log.exception("recovering from the death of %s", " and ".join(dead))

    # ------------------------------------------------------------------ dying actors
    def faultd_name(self, mm_id: int) -> str:
        """The fault handler that serves mm mm_id (its actor name: faultd, faultd1...)."""
        return self.faultd_names[mm_id % len(self.faultd_names)]

    def faultd_of(self, mm_id: int) -> ActorProcess:
        """The fault handler that serves mm mm_id."""
        return self.actors[self.faultd_name(mm_id)]

    @property
    def ksmd(self) -> ActorProcess:
        """Scanner 0, the leader: ksmd as the control calls know it."""
        return self.actors["ksmd"]

    @property
    def faultd(self) -> ActorProcess:
        return self.actors["faultd"]

    @property
    def scanner_procs(self) -> list[ActorProcess]:
        return [self.actors[n] for n in self.scanner_names if n in self.actors]

    @property
    def faultds(self) -> list[ActorProcess]:
        return [self.actors[n] for n in self.faultd_names if n in self.actors]

    def _group(self, name: str) -> str:
        """What restarts together with actor `name`: every scanner ("ksmd"), or that fault handler."""
        return "ksmd" if name in self.scanner_names else name

    def actor_call(self, name: str, op: str, timeout: float | None = None, **kw) -> tuple[dict, bytes]:
        """A control call on ksmd or a fault handler that outlives their deaths.

        A call that finds the actor dead waits for the supervisor to replace it and is sent
        again to the successor (every such call is idempotent); OSError(EIO) once the actor
        is really gone, TimeoutError if it is not back within the timeout.
        """
        timeout = timeout or self.call_timeout
        deadline = time.monotonic() + timeout
        group = self._group(name)
        while True:
            if group in self.gone:
                raise OSError(errno.EIO, f"{name} is gone: {self.gone[group]}")
            if self.closed and not self.ready[name].is_set():
                raise OSError(errno.ESRCH, "machine is closed")
            left = deadline - time.monotonic()
            if left <= 0 or not self.ready[name].wait(left):
                raise TimeoutError(f"{name} was not back within {timeout:.0f}s")
            actor = self.actors[name]
            try:
                return actor.call(op, max(0.1, deadline - time.monotonic()), **kw)
            except ChannelClosed:
                if self.closed:
                    raise OSError(errno.ESRCH, "machine is closed") from None
                log.warning("%s died during %s: waiting for its successor", name, op)
                while self.actors[name] is actor and self.ready[name].is_set() and time.monotonic() < deadline \
                        and group not in self.gone and not self.closed:
                    time.sleep(0.01)        # until the watcher has seen the death

    def _recover(self, dead: list[str]) -> None:
        """Replace dead scanners / fault handlers, repairing what they left half done.

        The scanners are restarted together: a dead scanner takes the others down with it (the
        round protocol has no way to take one back into a mesh, and each owns a shard of the
        trees the others' rmap items point into).  A fault handler is restarted alone."""
        seen = time.monotonic()
        rec = {"dead": list(dead), "pids": [self.actors[n].pid for n in dead], "seen": time.time(), "phases": {},
               "serving_s": None, "repair": None}
        last = [seen]

        def mark(what):     # (a phase's seconds, summed over its steps: the freeze and its renewal, say)
            now = time.monotonic()
            rec["phases"][what] = round(rec["phases"].get(what, 0) + now - last[0], 4)
            last[0] = now
        with self.recover_lock:
            now = time.monotonic()
            groups = list(dict.fromkeys(self._group(n) for n in dead))
            victims = [n for g in groups for n in (self.scanner_names if g == "ksmd" else [g])]
            for name in victims:
                self.ready[name].clear()
                a = self.actors[name]
                a.expected_exit = True
                if name in dead:
                    log.error("%s (pid %d) died with status %s: replacing it", name, a.pid, a.proc.returncode)
                else:       # (killed, not asked: it may be waiting on the dead one; the repair follows)
                    log.error("%s (pid %d) stopped: the scanners restart together", name, a.pid)
                    if a.proc.poll() is None:
                        a.proc.kill()       # by its Popen: a process this Machine started
                a.stop(1)
            for g in groups:
                recent = [t for t in self.restarts.get(g, []) if now - t < RESTART_WINDOW] + [now]
                self.restarts[g] = recent
                if len(recent) > MAX_RESTARTS:
                    self.gone[g] = f"died {len(recent)} times within {RESTART_WINDOW:.0f}s; not restarted"
                    log.error("%s %s", g, self.gone[g])
            mark("stop")
            program = recover(groups, self.scanner_names,
                              lambda: [vm.mm_id for vm in list(self.vms.values()) if vm.alive],
                              lambda: list(self.mm_segs), self._serves, self.nframes)
            done = None
            try:
                done = self._run_with_ptls(program, lambda e: self._recovery_effect(e, mark))
                rec["serving_s"] = round(time.monotonic() - seen, 4)
            except Exception:          # e.g. a ptl held by a hung actor: logged; the run goes on
                log.exception("recovery after the death of %s failed", " and ".join(dead))
            finally:
                rec["repair"] = done
                self.recoveries.append(rec)
            self.repairs.append(done or {})
            if done and any(done.values()):
                log.warning("repair after an actor's death: %s", done)
            for g in groups:            # the next death's successor
                self._start_spare(g)

    def _serves(self, actor: str, mm_id: int) -> bool:
        """Whether `actor` notifies mm mm_id: every scanner does, a fault handler the mms it serves."""
        return actor not in self.faultd_names or self.faultd_name(mm_id) == actor

    def _recovery_effect(self, e, mark=lambda what: None):
        """The recovery program's own effects (mm/recovery.py), as control calls to the processes;
        mark(phase) closes each phase of Machine.recoveries' record (the repair: up to the thaw)."""
        c = e.__class__
        if c is Freeze:             # the scanners between two rounds: no ptl, no pinned frame held
            if "ksmd" in self.gone:
                return None         # (no live scanner to hold)
            try:                    # (again before the repair: ksmd restarts the freeze's timeout)
                self.ksmd.call("freeze", self.ack_timeout * 4, for_s=int(self.ack_timeout * 6) + 1)
                return True
            except (OSError, TimeoutError, ChannelClosed) as x:
                log.error("could not freeze ksmd for the repair: %s", x)
                return False
            finally:
                mark("freeze")
        if c is NotifierLost:       # nothing a dead notifier may have changed stays mapped by a secondary MMU
            vm = next((v for v in list(self.vms.values()) if v.mm_id == e.mm and v.alive), None)
            if vm is not None:
                try:
                    vm.actor.call("notifier_lost", self.ack_timeout * 2, peer=e.peer)
                except (OSError, TimeoutError, ChannelClosed) as x:
                    log.error("VM %s did not drop what %s had mapped: %s", vm.name, e.peer, x)
            mark("notifier_lost")
            return None
        if c is Thaw:               # the repair was all ksmd had to wait for
            try:
                self.ksmd.call("thaw", self.ack_timeout * 2)
            except (OSError, TimeoutError, ChannelClosed) as x:
                log.error("could not thaw ksmd: %s", x)
            mark("repair")
            return None
        if c is Respawn:
            mark("repair")          # (up to here: the repair, where no thaw closed it)
            if e.group not in self.gone and not self.closed:
                self._respawn(e.group, mark)
            return None
        raise TypeError(f"effect {e!r} has no driver in the supervisor")

    def _faultd_args(self, k: int) -> list[str]:
        return self.common_args + ["--shard", str(k), "--handlers", str(self.fault_handlers)]

    def _new_group(self, group: str) -> dict[str, ActorProcess]:
        """New processes for `group`, by name (not waited for): every scanner, restarted (they rebuild
        their shards at `restore`), or one fault handler."""
        if group == "ksmd":
            return self._start_scanners(self.run, self.common_args, restarted=True)
        return {group: ActorProcess(group, "workers.actors.faultd", self.run,
                                    self._faultd_args(self.faultd_names.index(group)))}

    def _start_spare(self, group: str) -> None:
        """Start the successor of `group` now, before anything died: a Python interpreter and its imports
        take 0.4 to 2 s on a busy 2-core machine, which would otherwise be most of a recovery (the
        repair itself takes milliseconds).  A spare attaches the run's memory and waits: a fault
        handler serves no mm until attach_mm, a restarted scanner neither scans nor publishes until
        `restore` (which reloads the knobs and counters from the stats segment first)."""
        if not self.use_spares or self.closed or group in self.gone or group in self.spares:
            return
        try:
            self.spares[group] = self._new_group(group)
        except Exception as e:          # no spare: the recovery starts a process as before
            log.error("could not start a spare for %s: %s", group, e)

    def _take_spare(self, group: str) -> dict[str, ActorProcess] | None:
        spare = self.spares.pop(group, None)
        if spare is not None and any(a.proc.poll() is not None for a in spare.values()):
            for a in spare.values():    # (one of them died while waiting: not used)
                a.expected_exit = True
                a.stop(1)
            return None
        return spare

    def _stop_spares(self) -> None:
        for group in list(self.spares):
            for a in self.spares.pop(group).values():
                a.expected_exit = True
                a.stop(2)

    def _respawn(self, group: str, mark=lambda what: None) -> None:
        """Start `group` again: every scanner ("ksmd"), or one fault handler; bind every VM it serves.
        Its spare (started beforehand, `_start_spare`) if it has one, else new processes."""
        if group == "ksmd":
            self._wipe_rmaps()          # the new scanners rebuild their items (restore)
        new = self._take_spare(group) or self._new_group(group)
        try:
            for a in new.values():
                a.wait_ready(30)
            mark("start")
        except Exception as e:
            for a in new.values():
                a.stop(1)
            log.error("%s did not restart: %s", group, e)
            self.actors[group].expected_exit = False    # the watcher sees it dead: tries again (or gives up)
            return
        self.actors.update(new)
        for vm in [vm for vm in list(self.vms.values()) if vm.alive]:
            for name in new:
                if name in self.faultd_names and self.faultd_name(vm.mm_id) != name:
                    continue
                try:
                    theirs = self._bind(name, vm.mm_id, vm.name)
                    try:
                        vm.actor.hand_fd("reconnect", theirs.fileno(), self.ack_timeout * 4, peer=name)
                    finally:
                        theirs.close()
                except (OSError, TimeoutError, ChannelClosed) as e:
                    log.error("VM %s could not reconnect to the new %s: %s", vm.name, name, e)
        mark("reconnect")
        if group == "ksmd":         # each its own shard; the followers first: the leader then starts the rounds
            for name in self.scanner_names[1:] + self.scanner_names[:1]:
                try:
                    new[name].call("restore", max(60.0, self.call_timeout))
                except (OSError, TimeoutError, ChannelClosed) as e:
                    log.error("the new %s could not restore its state: %s", name, e)
        mark("restore")
        for name, a in new.items():
            log.warning("%s restarted as pid %d", name, a.pid)
            self.ready[name].set()

    def _wipe_rmaps(self) -> None:
        """The scanners' shared rmap items back to none (they are restarted, and restore rebuilds them)."""
        with self.mm_lock:
            for mm_id, (seg, _) in list(self.mm_segs.items()):
                try:
                    rseg = Segment.attach(seg_name(self.run, f"rmap.{mm_id}"))
                except Exception as e:
                    log.error("mm %d: no rmap segment to wipe: %s", mm_id, e)
                    continue
                try:
                    RmapView(rseg, MMView(seg).npages).format()
                finally:
                    rseg.close()

    def _bind(self, name: str, mm_id: int, vm_name: str) -> socket.socket:
        """A new channel between actor `name` and mm mm_id: its end is passed to the actor and bound
        there to the mm; the other end is returned (for the VM)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.actors[name].hand_fd("attach_mm", ours.fileno(), self.ack_timeout * 4, mm=mm_id,
                                      name=f"vm:{vm_name}")
        except BaseException:
            theirs.close()
            raise
        finally:
            ours.close()
        return theirs

    def repair(self) -> dict:
        """Make the frame table and zero-page counters agree with the PTEs (core.repair).

        Safe only while no actor holds a frame reference outside a page-table lock (the
        recovery freezes ksmd first); callable on a quiet machine to check nothing is off.
        """
        done = self._run_with_ptls(repair_frames(list(self.mm_segs), self.nframes), None) or {}
        self.repairs.append(done)
        if any(done.values()):
            log.warning("repair: %s", done)
        return done

    def _run_with_ptls(self, gen, other):
        """Run a core generator here (mm.effects.run_effects): its ptl locks and memory effects over the
        run's shared memory, any other effect through other(e).  The mms are taken as they are at its
        first lock or memory effect, and none is freed until it let go of its last ptl (or ended):
        mm_lock is held meanwhile, not across what it does between (a restart's wait, say)."""
        held = []
        st = {}

        def begin():
            if not st:
                self.mm_lock.acquire()
                mms = {mm_id: MMView(seg) for mm_id, (seg, _) in self.mm_segs.items()}
                st.update(mms=mms, mem=Memory(self.alloc, self.stats, mms),
                          ptls={mm_id: ptl for mm_id, (_, ptl) in self.mm_segs.items()})

        def end():
            if st and not held:
                st.clear()
                self.mm_lock.release()

        def perform(e):
            c = e.__class__
            if c is Lock:
                begin()
                try:
                    st["ptls"][e.key[1]].acquire(self.ack_timeout * 4)
                except BaseException:
                    end()
                    raise
                held.append(e.key)
                return None
            if c is Unlock:
                st["ptls"][e.key[1]].release()
                held.remove(e.key)
                end()
                return None
            if c in MEM_EFFECTS:
                begin()
                return apply_mem(st["mem"], e)
            end()
            if other is None:
                raise TypeError(f"effect {e!r} has no driver in the supervisor")
            return other(e)
        try:
            return run_effects(gen, perform)
        finally:
            for key in held:        # (a generator that ended holding ptls: let go of them)
                st["ptls"][key[1]].release()
            held.clear()
            end()

    def spawn_vm(self, name: str, pages: int = 16384, device: bool = False, node: int = 0,
                 fork_from: VM | None = None, domain: int = 0) -> VM:
        """Start a VM worker with an address space of `pages` pages (and a device TLB if asked).

        domain: its security domain (0..2**31-1); with the mitigation "domain" ksmd merges its pages
        only with pages of VMs of the same domain.  A fork is in its parent's domain.

        fork_from: the new mm is first filled by that VM's fork (VM.fork), before its worker starts."""
        if not self._started or self.closed:
            raise RuntimeError("machine is not running")
        check_vm_name(name)
        if isinstance(pages, bool) or not isinstance(pages, int) or not 1 <= pages <= MAX_VM_PAGES:
            raise ValueError(f"pages={pages!r}: a VM has 1 to {MAX_VM_PAGES} pages")
        if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < max(1, self.nodes):
            raise ValueError(f"node {node!r} out of range: this machine has {self.nodes} node(s)")
        if isinstance(domain, bool) or not isinstance(domain, int) or not 0 <= domain < 2**31:
            raise ValueError(f"domain {domain!r} must be an integer in [0, 2**31)")
        if fork_from is not None and domain != fork_from.domain:
            raise ValueError(f"domain {domain}: a fork is in its parent's domain ({fork_from.domain})")
        check_capacity(f"VM {name!r} of {pages} pages", MMView.size_for(pages))
        with self.recover_lock:      # not while the scanners or a fault handler are being replaced
            if "ksmd" in self.gone:
                raise OSError(errno.EIO, f"ksmd is gone: {self.gone['ksmd']}")
            with self.lock:
                if name in self.vms:
                    raise ValueError(f"a VM named {name!r} already exists")
                fname = self.faultd_name(self.next_mm)
                if fname in self.gone:
                    raise OSError(errno.EIO, f"{fname} is gone: {self.gone[fname]}")
                mm_id, mm = self._new_mm(pages, node, domain)
            if fork_from is not None:       # dup_mmap fills the new mm before its worker starts
                try:
                    fork_from._call("fork", child=mm_id)
                except BaseException:
                    self._free_mm(mm_id)
                    raise
            ends = []
            actor = None
            try:
                for a in [fname] + self.scanner_names:     # its fault handler, then every scanner
                    ends.append(self._bind(a, mm_id, name))
                args = ["--mode", self.mode, "--ack-timeout", str(self.ack_timeout), "--mm", str(mm_id),
                        "--restart-timeout", str(self.restart_timeout),
                        f"--name={name}", "--ksm", str(int(self.ksm_enabled)),
                        "--fault-fd", str(ends[0].fileno()), f"--fault-peer={fname}"]
                for e in ends[1:]:
                    args += ["--ksmd-fd", str(e.fileno())]
                if device:
                    args.append("--device")
                if self.trace_dir:
                    args += ["--trace", self.trace_dir]
                actor = ActorProcess(f"vm:{name}", "workers.actors.vm", self.run, args,
                                     pass_fds=[e.fileno() for e in ends])
                for e in ends:
                    e.close()
                mm.hdr[MMH_OWNER_PID] = actor.pid
                actor.wait_ready(30)
            except BaseException:
                for e in ends:
                    e.close()
                if actor is not None:
                    actor.stop(2)
                self._drop_mm(mm_id)
                self._free_mm(mm_id)
                raise
            vm = VM(self, name, mm_id, actor, pages)
            vm.node, vm.device, vm.domain = node, device, domain
            self.vms[name] = vm
        return vm

    def _new_mm(self, pages: int, node: int = 0, domain: int = 0) -> tuple[int, MMView]:
        """A new mm segment and its ptl (ids are never reused)."""
        with self.lock:
            if self.next_mm >= MAX_MMS:
                raise OSError(errno.EAGAIN, f"at most {MAX_MMS} VMs per machine")
            mm_id = self.next_mm
            self.next_mm += 1
            with self.mm_lock:
                seg = Segment.create(seg_name(self.run, f"mm.{mm_id}"), MMView.size_for(pages))
                mm = MMView(seg)
                mm.hdr[MMH_ID] = mm_id
                mm.hdr[MMH_NPAGES] = pages
                mm.hdr[MMH_NODE] = node
                mm.hdr[MMH_DOMAIN] = domain
                try:
                    self._create_rmap(mm_id, mm.npages)
                except BaseException:
                    mm = None           # (its views of the segment go before it is closed)
                    seg.close()
                    Segment.unlink(seg.name)
                    raise
                ptl = ShmLock.ptl(self.run, mm_id)
                self.mm_segs[mm_id] = (seg, ptl)
        return mm_id, mm

    def _create_rmap(self, mm_id: int, npages: int) -> None:
        """The scanners' rmap items of a new mm: one segment all of them map (core/shard.py)."""
        seg = Segment.create(seg_name(self.run, f"rmap.{mm_id}"), RmapView.size_for(npages))
        RmapView(seg, npages).format()
        seg.close()

    def page_referenced(self, vm: VM, addr: int, npages: int = 1) -> int:
        """page_referenced for a range: primary young bits and clear_flush_young of secondary MMUs."""
        return self.actor_call(self.faultd_name(vm.mm_id), "page_referenced", mm=vm.mm_id, addr=addr,
                               npages=npages)[0]["referenced"]

    def check_frames(self) -> list[str]:
        """Frame accounting invariants (call when quiet: run=0, no access in flight).

        Every frame's mapcount equals the number of PTEs mapping it; a frame is free
        exactly when nothing maps it; the free stack holds each free frame once.
        """
        with self.mm_lock:
            return frame_problems(self.ft, [MMView(seg).pte for seg, _ in self.mm_segs.values()], self.nframes)

    def rmap_item_bytes(self) -> int:
        """ksmd's measured metadata bytes per rmap item (the kernel's sizeof(struct ksm_rmap_item))."""
        c = self.stats.counter_dict()
        return -(-c["metadata_bytes"] // c["ksm_rmap_items"]) if c["ksm_rmap_items"] else 0

    def exit_vm(self, vm: VM) -> None:
        """A VM exits: mmu_notifier_release, then exit_mmap (ksmd forgets it, frames freed)."""
        if not vm.alive:
            return
        vm.actor.expected_exit = True
        try:
            vm.actor.call("exit", timeout=self.ack_timeout * 2)
        except (OSError, TimeoutError, ChannelClosed) as e:
            log.warning("VM %s did not exit cleanly: %s", vm.name, e)
        vm.actor.stop(5)
        self._teardown_vm(vm)

    def _teardown_vm(self, vm: VM) -> None:
        with self.lock:
            if not vm.alive:
                return
            vm.alive = False
        self._drop_mm(vm.mm_id)
        self._free_mm(vm.mm_id)

    def _drop_mm(self, mm_id: int) -> None:
        """The scanners (the leader has every scanner drop it) and the mm's fault handler forget mm
        mm_id (a restarting one never knew it)."""
        for a in ("ksmd", self.faultd_name(mm_id)):
            if a in self.gone:
                continue
            try:
                self.actor_call(a, "mm_exit", timeout=self.ack_timeout * 4, mm=mm_id)
            except (OSError, TimeoutError, ChannelClosed) as e:
                log.error("%s did not drop mm %d: %s", a, mm_id, e)

    def _free_mm(self, mm_id: int) -> None:
        """exit_mmap: drop every frame the mm maps, then unlink its segment and drop its ptl."""
        with self.mm_lock:
            self._free_mm_locked(mm_id)

    def _free_mm_locked(self, mm_id: int) -> None:
        """exit_mmap (mm.vma.exit_mmap) under its ptl, so a fault still finishing on this mm completes
        (PTE set, old frame dropped) first; then the mm's segments go."""
        try:
            self._run_with_ptls(exit_mmap(mm_id), None)
        except TimeoutError as e:       # a ptl a hung actor holds: the frames are freed all the same
            log.error("mm %d: %s; freeing its frames anyway", mm_id, e)
            try:
                self._run_with_ptls(exit_mmap(mm_id, lock=False), None)
            except TimeoutError as e2:
                log.error("could not free frames of mm %d: %s", mm_id, e2)
        seg, ptl = self.mm_segs.pop(mm_id)
        try:
            with self.frame_lock:
                self.stats.mm[mm_id] = 0
        except TimeoutError as e:
            log.error("could not reset the counters of mm %d: %s", mm_id, e)
        seg.close()
        Segment.unlink(seg.name)
        Segment.unlink(seg_name(self.run, f"rmap.{mm_id}"))
        ptl.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        main = threading.current_thread() is threading.main_thread()
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None   # a 2nd Ctrl-C waits for us
        try:
            if self.recover_lock.acquire(timeout=max(60.0, self.ack_timeout * 8)):   # a recovery finishes first
                self.recover_lock.release()
            for vm in list(self.vms.values()):
                if vm.alive:
                    try:
                        self.exit_vm(vm)
                    except Exception as e:   # keep tearing down
                        log.error("closing VM %s: %s", vm.name, e)
            for actor in getattr(self, "scanner_procs", [])[::-1] + getattr(self, "faultds", []):
                actor.stop(5)       # (the leader last: the others serve it)
            self._stop_spares()
        finally:
            self.watch_stop.set()
            self._unlink_all()
            if self.trace_dir:
                self._merge_trace()
            if getattr(self, "_old_term", None) is not None and main:
                signal.signal(signal.SIGTERM, self._old_term)
            if old_int is not None:
                signal.signal(signal.SIGINT, old_int)

    def _merge_trace(self) -> None:
        from workers.tools.tracetool import merge
        try:
            merge(self.trace_dir, self.trace_path)
        finally:
            shutil.rmtree(self.trace_dir, ignore_errors=True)

    def _unlink_all(self) -> None:
        for mm_id in list(self.mm_segs):
            try:
                self._free_mm(mm_id)
            except Exception:
                pass
        for attr in ("frames_seg", "ft_seg", "stats_seg"):
            seg = getattr(self, attr, None)
            if seg is not None:
                Segment.unlink(seg.name)
        if getattr(self, "frame_lock", None) is not None:
            self.frame_lock.close()
        if self.run:
            unlink_lock_file(self.run)
            for name in run_entries(self.run):   # anything an actor left behind
                try:
                    os.unlink(os.path.join(SHM_DIR, name))
                except OSError:
                    pass
        if getattr(self, "reaper_fd", None) is not None:
            os.close(self.reaper_fd)
            self.reaper_fd = None
            try:
                self.reaper.wait(5)
            except subprocess.TimeoutExpired:
                self.reaper.kill()
