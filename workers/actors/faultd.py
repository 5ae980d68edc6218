"""The fault handler process: handle_mm_fault for every VM (do_anonymous_page, do_wp_page).

A VM worker whose access cannot be served by its secondary MMU or by the primary PTE
sends a FAULT for a batch of pages of its mm.  Each FAULT runs the core
`core.fault.handle_mm_fault` (do_anonymous_page, wp_page_reuse, wp_page_copy with
set_pte_at_notify, break_ksm), driven against the run's shared memory and the VM's
notifier channel (workers/runtime/driver.py) in the callback that read it as far as it
goes without waiting; the FAULT_REPLY follows.  A COW's reply carries the new PTEs
and the fault stays parked (ptl and the old frame held) until the VM's APPLIED.
FAULTs of an mm whose ptl another FAULT holds here wait behind it, in order, and run
right after its unlock (several writers faulting at once).  This process also
answers page_referenced calls with clear_flush_young.

There may be several fault handlers (`--handlers`): fault handler k (named faultd,
faultd1, ...) serves the mms whose id modulo the count is k (`--shard`) and refuses
to bind any other; a VM's FAULT and APPLIED both travel on its one channel to the
handler of its mm, so a parked fault always hears its APPLIED.

Each VM's channel is a socketpair end the supervisor passes (`attach_mm`) and binds
to that VM's mm: a second channel for a live mm is refused, a HELLO or FAULT naming
another mm is refused and logged, and nothing is done for it.  Every FAULT is
answered, a malformed one (no page, an address outside the mm) with its errno.

Out of frames, the fault fails with ENOMEM to the writer; nothing is changed.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import os
import socket
import time

import numpy as np

from proto.channel import Channel, PollSet, halt_poll
from proto.layout import KNOB_FAULT_POLL_US, MAX_MMS, PAGE_SHIFT, PAGE_SIZE, USER_BASE
from proto.messages import Frame, Msg, call_payload, encode
from proto.trace import Tracer

from workers.runtime.actor import RunMemory, actor_args, receive_fd, req_int, run_actor, setup
from workers.mm.effects import Memory
from workers.mm.mmu_notifier import page_referenced
from workers.mm.pte import check_range, task_size
from workers.runtime.driver import Driver, MMUNotifierSubscriptions, answer_hello, bind_vm_channel
from workers.actors.faultd_common import _APPLIED, _FAULT, _Fault, _RECORDS, FRAME_RESERVE, RESERVE_DRAIN_S, log
from workers.actors.faultd_fast import FaultPath



class FaultHandler(FaultPath):
    def __init__(self, args):
        self.args = args
        self.name = "faultd" if args.shard == 0 else f"faultd{args.shard}"
        self.mem = RunMemory(args.run)
        self.mem.alloc.keep_reserve(FRAME_RESERVE)     # (every allocation of a fault is under its ptl)
        self.memory = Memory(self.mem.alloc, self.mem.stats)
        self.ptls: dict = {}
        self.notifiers: dict[int, MMUNotifierSubscriptions] = {}
        self.peers: dict[int, str] = {}
        self._tgroups: dict = {}        # mm -> the trace's compiled groups of its faults (FaultPath._trace_groups)
        self.driver = Driver(self.memory, self.ptls, self.notifiers, args.ack_timeout * 2)
        self.mode = args.mode
        self.tr = Tracer.open(args.trace, self.name)
        self.driver.tr = self.tr          # (its lock and barrier waits as spans)
        self.faults = 0
        self.cow_copies = 0
        self.reuses = 0
        self.refused = 0
        self.orphaned = 0           # COWs parked on an APPLIED whose VM's channel closed first (it died)
        self.bound: set[int] = set()
        self._sweeping = False
        self.batched = 0            # FAULTs that waited behind another of their mm (run right after its unlock)
        self.holder: dict[int, _Fault | None] = {}     # mm -> the fast-path FAULT holding its ptl
        self.queued: dict[int, collections.deque] = {}  # mm -> FAULTs waiting behind it (st, gen, Lock)
        self.reply_ns = 0           # FAULT read to FAULT_REPLY sent, summed (stats: the handler's share)
        self._polls = PollSet()     # over the VMs' channels (_poll_vms)
        self._polling = False       # a _poll_vms is scheduled
        self.polled = 0             # reads made by _poll_vms (frames that came while it polled)
        self.cur = None             # the FAULT the fast path runs now
        self.fast = self.fast_backend()

    def _drain_tick(self) -> None:
        """Every RESERVE_DRAIN_S: the frame reserve back to the free stack if it runs low (drain_local_pages;
        a handler with no faults to serve makes no allocation that would do it)."""
        try:
            self.mem.alloc.drain_local_pages()
        except Exception:       # (the run is going away, or a bug: logged, and the next tick tries again)
            log.exception("%s: could not give back its frame reserve", self.name)
        asyncio.get_running_loop().call_later(RESERVE_DRAIN_S, self._drain_tick)

    # ---- channels ----
    async def attach_mm(self, mm_id: int, name: str, fd: int) -> None:
        """Bind a channel end the supervisor passed to mm mm_id: once, while the mm lives."""
        if mm_id % self.args.handlers != self.args.shard:    # (the supervisor's faultd_of)
            os.close(fd)
            raise OSError(errno.EINVAL, f"mm {mm_id} is served by fault handler {mm_id % self.args.handlers}, "
                                        f"not {self.name}")
        ch, _ = await bind_vm_channel(self, mm_id, name, fd, lambda: Channel(
            f"{self.name}<-{name}", self.on_vm_frame, self.on_vm_close))
        ch.peer, ch.hello, ch.applied = mm_id, False, {}
        ch.fd = fd
        ch.records = _RECORDS
        self.peers[mm_id] = name
        self._tgroups.pop(mm_id, None)
        self.notifiers[mm_id] = MMUNotifierSubscriptions(self.name, name, self.memory.mms[mm_id], ch, self.tr,
                                            self.args.ack_timeout)

    def refuse(self, what: str) -> None:
        self.refused += 1
        log.error("%s: refused %s", self.name, what)

    def on_vm_frame(self, ch: Channel, f: Frame) -> None:
        t = f.type
        if not self._polling:
            self._polling = True
            asyncio.get_running_loop().call_soon(self._poll_vms)
        if t == _FAULT:         # (traced: its record goes with the reply's, FaultPath._trace_fault)
            if not ch.hello or f.mm != ch.peer:
                if self.tr:
                    self.tr.recv((self.peers.get(ch.peer) or f"vm:{ch.peer}"), "FAULT", f.mm, -1, f.addr, f.n, 0, 0,
                                 f.corr)
                self.refuse(f"FAULT for mm {f.mm} on the channel of mm {ch.peer}"
                            f"{'' if ch.hello else ' before HELLO'}")
                ch.send(encode(Msg.FAULT_REPLY, flags=errno.EPERM, mm=f.mm, corr=f.corr, addr=f.addr,
                               payload=call_payload({"error": f"mm {f.mm} is not this channel's mm"})))
                return
            self.start_fault(ch, f)
        elif t == _APPLIED:
            w = ch.applied.pop(f.corr, None) if f.mm == ch.peer else None
            if self.tr:
                if w.__class__ is _Fault:       # (its record goes with its fault's, FaultPath._trace_fault)
                    w.t_applied, w.applied_addr = time.monotonic_ns(), f.addr
                else:
                    self.tr.recv((self.peers.get(ch.peer) or f"vm:{ch.peer}"), "APPLIED", f.mm, -1, f.addr, 0, 0, 0,
                                 f.corr)
            if w is None:
                self.refuse(f"APPLIED {f.corr} for mm {f.mm} on the channel of mm {ch.peer}: no such COW reply")
            elif w.__class__ is _Fault:
                self._applied(w, None)
            elif not w.done():
                w.set_result(f)
        elif t == Msg.HELLO:
            answer_hello(self, ch, f)
        else:
            self.refuse(f"{_tname(f.type)} on the channel of mm {ch.peer}")

    def _poll_vms(self) -> None:
        """After a VM's frame: poll the VMs' sockets for `fault_poll_us` before the event loop sleeps
        (halt_poll), and handle what comes right here: a VM's next FAULT, or the APPLIED of the COW
        just answered, usually follows within tens of microseconds, sooner than this process would
        be woken.  At most one read per call, then the loop takes a turn (the control channel, the
        timers, the slow path's tasks) and the next frame polls again."""
        self._polling = False
        spin_ns = int(self.mem.stats.knobs[KNOB_FAULT_POLL_US]) * 1000
        if not spin_ns:
            return
        chans = {ch.fd: ch for ch in (n.ch for n in self.notifiers.values()) if ch is not None and not ch.closed}
        for fd, _ in halt_poll(self._polls.over(chans), spin_ns):
            self.polled += 1
            chans[fd].read_now()

    def on_vm_close(self, ch: Channel) -> None:
        # COWs waiting for this VM's APPLIED go on: the VM, losing the channel, drops every secondary
        # translation (notifier_lost), or is gone
        for corr, w in list(ch.applied.items()):
            del ch.applied[corr]
            self.orphaned += 1
            if w.__class__ is _Fault:
                self._applied(w, f"channel of mm {ch.peer} closed before APPLIED {corr}")
            elif not w.done():
                w.set_exception(ConnectionError(f"channel of mm {ch.peer} closed"))
        n = self.notifiers.get(ch.peer)
        if n is not None and n.ch is ch:
            n.ch = None


    async def page_referenced(self, mm_id: int, addr: int, npages: int) -> int:
        """Test and clear the young bit of each page, primary and secondary (mmu_notifier.page_referenced,
        clear_flush_young)."""
        mm = self.memory.mms[mm_id]
        check_range("access", addr, npages * PAGE_SIZE, task_size(mm.npages))
        idx = np.arange(npages, dtype=np.int64) + ((addr - USER_BASE) >> PAGE_SHIFT)
        return await self.driver.run(page_referenced(mm_id, idx))

    # ---- control ----
    async def on_ctl(self, ch: Channel, f: Frame) -> None:
        reply: dict = {}
        try:
            req = f.json()
            op = req.get("op")
            if op == "attach_mm":
                mm_id = req_int(req, "mm", None, 0, MAX_MMS - 1)
                name = str(req.get("name", f"vm:{mm_id}"))
                await self.attach_mm(mm_id, name, receive_fd(self.fd_sock, req_int(req, "seq"), f"mm {mm_id}"))
            elif op == "mm_exit":
                mm_id = req_int(req, "mm")
                n = self.notifiers.pop(mm_id, None)
                if n is not None and n.ch is not None:
                    n.ch.close()
                ptl = self.ptls.pop(mm_id, None)
                mm = self.memory.mms.pop(mm_id, None)
                if ptl is not None:
                    ptl.close()
                if mm is not None:
                    mm.seg.close()
            elif op == "page_referenced":
                reply["referenced"] = await self.page_referenced(req_int(req, "mm"), req_int(req, "addr"),
                                                                 req_int(req, "npages", None, 1))
            elif op == "stats":
                reply = {"faults": self.faults, "cow_copies": self.cow_copies, "reuses": self.reuses,
                         "refused": self.refused, "reply_ns": self.reply_ns,
                         "batched": self.batched, "polled": self.polled, "orphaned": self.orphaned}
            elif op == "ping":
                pass
            else:
                raise OSError(errno.EINVAL, f"unknown faultd op {op!r}")
        except OSError as e:
            reply = {"errno": e.errno or errno.EINVAL, "error": e.strerror or str(e)}
        except (KeyError, ValueError, TypeError) as e:
            reply = {"errno": errno.EINVAL, "error": f"bad request: {e!r}"}
        except Exception as e:          # a bug: the supervisor hears of it, this process goes on
            log.exception("%s: control request failed", self.name)
            reply = {"errno": errno.EIO, "error": f"{self.name}: internal error: {e!r}"}
        if not ch.closed:
            ch.send(encode(Msg.REPLY, corr=f.corr, payload=call_payload(reply)))

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.fd_sock = socket.socket(fileno=self.args.fd_sock)
        ctl_sock = socket.socket(fileno=self.args.ctl_fd)
        _, ctl = await loop.create_connection(
            lambda: Channel(f"{self.name}<-ctl", lambda ch, f: loop.create_task(self.on_ctl(ch, f)),
                            lambda ch: done.done() or done.set_result(None)), sock=ctl_sock)
        ctl.send(encode(Msg.REPLY, corr=0, payload=call_payload({"ready": True})))
        self._drain_tick()
        await done
        try:
            self.mem.alloc.release_reserve()        # the frames it held aside, back to the free stack
        except Exception:       # (a repair took them back meanwhile, or the run is gone: nothing held)
            log.exception("%s: could not give back its frame reserve", self.name)
        if self.tr:
            self.tr.close()


def _tname(t: int) -> str:
    try:
        return Msg(t).name
    except ValueError:
        return f"message type {t}"


def main() -> None:
    def extra(p):
        p.add_argument("--shard", type=int, default=0, help="this fault handler's number")
        p.add_argument("--handlers", type=int, default=1, help="how many fault handlers share the VMs")
    args = actor_args(extra)
    setup("faultd" if args.shard == 0 else f"faultd{args.shard}")
    run_actor("faultd", FaultHandler(args).main)


if __name__ == "__main__":
    main()
