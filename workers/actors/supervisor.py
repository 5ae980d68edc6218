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

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


from proto.knobs import DEFAULTS, MITIGATIONS, OWN, check_knob
from proto.layout import (COUNTERS, KNOBS, PAGE_SIZE, SHM_DIR, FrameTable, Segment, StatsView, create_lock_file, new_run_name,
                          seg_name, unlink_lock_file)

from workers import ROOT
from workers.actors import REAPER_CLEAN
from workers.runtime.frames import FrameAllocator, ShmLock
from workers.runtime.driver import MODES
from workers.actors.supervisor_common import ActorProcess, stop_all, MAX_FRAMES, MAX_VM_PAGES, VM, check_capacity, check_vm_name, log, machine_bytes, run_entries, shm_capacity, sweep_stale_runs
from workers.actors.supervisor_recovery import Recovery
from workers.actors.supervisor_mm import MMTable



__all__ = ["Machine", "KSMControl", "SHM_DIR", "MAX_FRAMES", "MAX_VM_PAGES", "VM", "ActorProcess", "check_capacity", "check_vm_name", "machine_bytes", "run_entries", "shm_capacity", "sweep_stale_runs"]

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


class Machine(Recovery, MMTable):
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
            stop_all(getattr(self, "scanner_procs", []) + getattr(self, "faultds", []) + self._take_spares(), 5)
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
            for err in merge(self.trace_dir, self.trace_path)["errors"]:
                log.warning("trace: %s", err)       # (a file cut short or damaged: the rest is merged)
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
            try:
                os.write(self.reaper_fd, REAPER_CLEAN)     # (every actor stopped, every entry unlinked: no grace)
            except OSError:
                pass
            os.close(self.reaper_fd)
            self.reaper_fd = None
            try:
                self.reaper.wait(5)
            except subprocess.TimeoutExpired:
                self.reaper.kill()
