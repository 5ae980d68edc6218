"""The supervisor: `Machine` creates the run's shared memory, starts and watches every actor.

It is the only creator and the only unlinker of the run's POSIX segments and
lock file (named after the run, mode 0600).  It starts ksmd, the fault handler
and one worker per VM as separate processes, gives the parent a handle on each
(`VM`, `KSMControl`), notices a worker that dies (its frames are freed, the
others go on), and tears everything down on exit, exception, Ctrl-C or SIGTERM.

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

from proto.channel import BlockingChannel, ChannelClosed
from proto.knobs import DEFAULTS, check_knob
from proto.layout import (COUNTERS, KNOBS, MAX_MMS, MM_STATS, MMF_VM_MERGE_ANY, MMH_FLAGS, MMH_ID, MMH_NODE,
                          MMH_NPAGES, MMH_OWNER_PID, PAGE_SHIFT, PAGE_SIZE, PTE_PRESENT, SHM_DIR, USER_BASE,
                          VM_MERGEABLE, FrameTable, MMView, Segment, StatsView, create_lock_file, new_run_name,
                          run_owner_pid, seg_name, unlink_lock_file)
from proto.messages import Msg, call_payload, decode

from .frames import FrameAllocator, ShmLock
from .notifier import MODES

log = logging.getLogger("ksm_proto.machine")


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

    def __init__(self, name: str, module: str, run: str, args: list[str], env=None):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [sys.executable, "-m", module, "--run", run, "--ctl-fd", str(child.fileno()), *args]
        self.name = name
        self.proc = subprocess.Popen(cmd, pass_fds=[child.fileno()], env=env,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        child.close()
        self.ch = BlockingChannel(parent, name)
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
            self.ch.ready.extend(self.ch.splitter.feed(data))

    def call(self, op: str, timeout: float = 30.0, data: bytes = b"", **kw) -> tuple[dict, bytes]:
        f = self.ch.call(Msg.CALL, call_payload({"op": op, **kw}, data), timeout=timeout)
        rep = f.json()
        if rep.get("errno"):
            raise OSError(rep["errno"], f"{self.name}: {rep.get('error')}")
        return rep, f.data()

    def stop(self, timeout: float = 5.0) -> None:
        self.expected_exit = True
        self.ch.close()
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
        self.node, self.device = 0, False

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
                                     node=self.node, fork_from=self)

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
        self._call("write", data=bytes(data), addr=addr)

    def read(self, addr: int, n: int) -> bytes:
        return self._call("read", addr=addr, length=n)[1]

    def dma_read(self, addr: int, n: int) -> bytes:
        """Read through the device secondary MMU (a subscriber without change_pte)."""
        return self._call("dma_read", addr=addr, length=n)[1]

    def stats(self) -> dict:
        return self._call("stats")[0]

    def msg_log(self, clear: bool = False) -> dict[str, list[str]]:
        """The notifier messages each secondary MMU received, in order (last 4096)."""
        return self._call("msg_log", clear=clear)[0]

    def cow_samples_ns(self) -> list[int]:
        return self._call("cow_samples")[0]["ns"]

    def unregister(self, sub: int) -> None:
        self._call("unregister", sub=sub)

    def writer_start(self, addr: int, npages: int, seed: int, count: int = 0, values: int = 4,
                     period_ms: float = 0) -> int:
        return self._call("writer_start", addr=addr, npages=npages, seed=seed, count=count, values=values,
                          period_ms=period_ms)[0]["id"]

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
        rep, _ = self.m.ksmd.call("set_knobs", timeout=max(60.0, self.m.call_timeout), knobs=knobs)

    def get(self, name: str):
        v = self.m.stats.knob(name)
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
                                   f"wanted +{n} (is run=1?)")
            if self.m.ksmd.proc.poll() is not None:
                raise RuntimeError("ksmd has died")
            time.sleep(0.001)
        return self.stats()

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
                 knobs: dict | None = None, nodes: int = 1):
        if notifier_mode not in MODES:
            raise ValueError(f"notifier_mode {notifier_mode!r} is not one of {', '.join(MODES)}")
        if frames < 16:
            raise ValueError(f"frames={frames}: a machine needs at least 16 frames")
        self.nframes = frames
        self.mode = notifier_mode
        self.trace_path = trace
        self.ksm_enabled = ksm_enabled
        self.ack_timeout = ack_timeout
        self.call_timeout = call_timeout
        self.nodes = nodes
        self.initial_knobs = knobs or {}
        for k, v in self.initial_knobs.items():
            check_knob(k, v)
        self.run = None
        self.vms: dict[str, VM] = {}
        self.mm_segs: dict[int, tuple[Segment, ShmLock]] = {}
        self.next_mm = 0
        self.lock = threading.RLock()
        self.closed = False
        self.dead_vms: list[str] = []
        self.ksm = KSMControl(self)
        self._started = False

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
            create_lock_file(run)
            self.frame_lock = ShmLock.frame_lock(run)
            self.alloc = FrameAllocator(self.ft, self.frames_seg.buf, self.frame_lock)
            self.alloc.format()
            common = ["--mode", self.mode, "--ack-timeout", str(self.ack_timeout)]
            if self.trace_dir:
                common += ["--trace", self.trace_dir]
            self.faultd = ActorProcess("faultd", "workers.faultd", run, common)
            self.ksmd = ActorProcess("ksmd", "workers.ksmd", run, common)
            self.faultd.wait_ready(30)
            self.ksmd.wait_ready(30)
            self._started = True
            if self.initial_knobs:
                self.ksm.set(**self.initial_knobs)
            self.watcher = threading.Thread(target=self._watch, name="ksm-proto-watch", daemon=True)
            self.watcher.start()
            self._install_sigterm()
        except BaseException:
            self.close()
            raise
        return self

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
            [sys.executable, "-m", "workers.reaper", "--run", self.run, "--fd", str(r)],
            pass_fds=[r], start_new_session=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        os.close(r)
        self.reaper_fd = w

    def _watch(self) -> None:
        """Notice actors that die: a dead VM's mm is torn down, the rest keeps running."""
        while not self.closed:
            for vm in list(self.vms.values()):
                if vm.alive and vm.actor.proc.poll() is not None and not vm.actor.expected_exit:
                    log.error("VM %s (pid %d) died with status %s: freeing its frames", vm.name, vm.pid,
                              vm.actor.proc.returncode)
                    try:
                        self._teardown_vm(vm)
                    except Exception:
                        log.exception("tearing down dead VM %s", vm.name)
                    self.dead_vms.append(vm.name)
            for a in (self.ksmd, self.faultd):
                if a.proc.poll() is not None and not a.expected_exit:
                    log.error("%s (pid %d) died with status %s", a.name, a.pid, a.proc.returncode)
                    a.expected_exit = True
            time.sleep(0.05)

    def spawn_vm(self, name: str, pages: int = 16384, device: bool = False, node: int = 0,
                 fork_from: VM | None = None) -> VM:
        """Start a VM worker with an address space of `pages` pages (and a device TLB if asked).

        fork_from: the new mm is first filled by that VM's fork (VM.fork), before its worker starts."""
        if not self._started or self.closed:
            raise RuntimeError("machine is not running")
        with self.lock:
            if name in self.vms:
                raise ValueError(f"a VM named {name!r} already exists")
            if self.next_mm >= MAX_MMS:
                raise OSError(errno.EAGAIN, f"at most {MAX_MMS} VMs per machine")
            if not 0 <= node < max(1, self.nodes):
                raise ValueError(f"node {node} out of range: this machine has {self.nodes} node(s)")
            mm_id = self.next_mm
            self.next_mm += 1
            seg = Segment.create(seg_name(self.run, f"mm.{mm_id}"), MMView.size_for(pages))
            mm = MMView(seg)
            mm.hdr[MMH_ID] = mm_id
            mm.hdr[MMH_NPAGES] = pages
            mm.hdr[MMH_NODE] = node
            ptl = ShmLock.ptl(self.run, mm_id)
            self.mm_segs[mm_id] = (seg, ptl)
        if fork_from is not None:
            try:
                fork_from._call("fork", child=mm_id)
            except BaseException:
                self._free_mm(mm_id)
                raise
        args = ["--mode", self.mode, "--ack-timeout", str(self.ack_timeout), "--mm", str(mm_id), "--name", name,
                "--ksm", str(int(self.ksm_enabled))]
        if device:
            args.append("--device")
        if self.trace_dir:
            args += ["--trace", self.trace_dir]
        actor = ActorProcess(f"vm:{name}", "workers.vm", self.run, args)
        mm.hdr[MMH_OWNER_PID] = actor.pid
        try:
            actor.wait_ready(30)
        except BaseException:
            actor.stop(2)
            self._free_mm(mm_id)
            raise
        vm = VM(self, name, mm_id, actor, pages)
        vm.node, vm.device = node, device
        self.vms[name] = vm
        return vm

    def page_referenced(self, vm: VM, addr: int, npages: int = 1) -> int:
        """page_referenced for a range: primary young bits and clear_flush_young of secondary MMUs."""
        return self.faultd.call("page_referenced", mm=vm.mm_id, addr=addr, npages=npages)[0]["referenced"]

    def check_frames(self) -> list[str]:
        """Frame accounting invariants (call when quiet: run=0, no access in flight).

        Every frame's mapcount equals the number of PTEs mapping it; a frame is free
        exactly when nothing maps it; the free stack holds each free frame once.
        """
        from proto.layout import FRAME_FREE, FTH_FREE_TOP, ZERO_PFN
        ft = self.ft
        maps = np.zeros(self.nframes, dtype=np.int64)
        for mm_id, (seg, _) in list(self.mm_segs.items()):
            pte = MMView(seg).pte
            pfn = (pte[(pte & np.uint64(PTE_PRESENT)) != 0] >> np.uint64(PAGE_SHIFT)).astype(np.int64)
            maps += np.bincount(pfn, minlength=self.nframes)
        maps[ZERO_PFN] = 0
        mc = ft.mapcount.astype(np.int64).copy()
        mc[ZERO_PFN] = 0
        problems = []
        bad = np.flatnonzero(maps != mc)
        if len(bad):
            problems.append(f"{len(bad)} frames whose mapcount is not their number of mappings, e.g. pfn "
                            f"{bad[0]}: mapcount {mc[bad[0]]}, mapped {maps[bad[0]]} times")
        top = int(ft.hdr[FTH_FREE_TOP])
        free = ft.free_stack[:top].astype(np.int64)
        if len(np.unique(free)) != len(free):
            problems.append("a frame is on the free stack twice")
        if (ft.flags[free] != FRAME_FREE).any() or (maps[free] != 0).any():
            problems.append("a frame on the free stack is in use")
        unused = np.flatnonzero((maps == 0) & (ft.flags != FRAME_FREE))
        unused = unused[unused != ZERO_PFN]
        if len(unused):
            problems.append(f"{len(unused)} frames nothing maps are not free, e.g. pfn {unused[0]}")
        if top != int(((ft.flags == FRAME_FREE)).sum()):
            problems.append(f"free stack holds {top} frames, {int((ft.flags == FRAME_FREE).sum())} are flagged free")
        return problems

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
        for a in (self.ksmd, self.faultd):
            if a.proc.poll() is None:
                try:
                    a.call("mm_exit", timeout=self.ack_timeout * 4, mm=vm.mm_id)
                except (OSError, TimeoutError, ChannelClosed) as e:
                    log.error("%s did not drop mm %d: %s", a.name, vm.mm_id, e)
        self._free_mm(vm.mm_id)

    def _free_mm(self, mm_id: int) -> None:
        """exit_mmap: drop every frame the mm maps, then unlink its segment and drop its ptl."""
        seg, ptl = self.mm_segs.pop(mm_id)
        mm = MMView(seg)
        try:     # a fault still finishing on this mm completes (PTE set, old frame dropped) first
            ptl.acquire(self.ack_timeout * 2)
        except TimeoutError as e:
            log.error("mm %d: %s; freeing its frames anyway", mm_id, e)
        pte = mm.pte
        present = (pte & np.uint64(PTE_PRESENT)) != 0
        pfns = (pte[present] >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        try:
            self.alloc.put(pfns)
        except TimeoutError as e:
            log.error("could not free frames of mm %d: %s", mm_id, e)
        zi = MM_STATS.index("ksm_zero_pages")
        try:
            with self.frame_lock:
                self.stats.counters[COUNTERS.index("ksm_zero_pages")] -= self.stats.mm[mm_id, zi]
                self.stats.mm[mm_id] = 0
        except TimeoutError as e:
            log.error("could not update ksm_zero_pages for mm %d: %s", mm_id, e)
        del mm, pte, present
        seg.close()
        Segment.unlink(seg.name)
        ptl.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            for vm in list(self.vms.values()):
                if vm.alive:
                    try:
                        self.exit_vm(vm)
                    except Exception as e:   # keep tearing down
                        log.error("closing VM %s: %s", vm.name, e)
            for a in ("ksmd", "faultd"):
                actor = getattr(self, a, None)
                if actor is not None:
                    actor.stop(5)
        finally:
            self._unlink_all()
            if self.trace_dir:
                self._merge_trace()
            if getattr(self, "_old_term", None) is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, self._old_term)

    def _merge_trace(self) -> None:
        from .tracetool import merge
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
