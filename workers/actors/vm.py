"""A VM worker: one address space (mm), its secondary MMUs, and the workload using them.

This process owns an mm: its VMAs (mmap, munmap, madvise) and the secondary
MMUs registered on it.  Guest memory is touched only through a secondary MMU:
`kvm`, a shadow page table with a change_pte callback, and optionally `dev`, a
device-like TLB without one.  A miss is a *secondary fault*: the primary PTE is
read without the page-table lock and the translation is installed only if no
invalidation is in progress or happened meanwhile (KVM's mmu_invalidate_seq /
in_progress scheme).  A miss the primary PTE cannot serve (not present, or a
write to a read-only page) is sent to the fault handler as a FAULT.

Notifier messages from ksmd and the fault handler are applied to the named
secondary MMU and acknowledged at once; the event loop never blocks, so an ack
is never held up by this process waiting for a lock (DESIGN.md, "Locks").

Its channels to ksmd and the fault handler are socketpair ends the supervisor
handed it (at spawn, and again when it restarts one of them): only frames for
this mm are accepted on them.  When a notifier dies (its channel closes, or the
supervisor says so), the invalidations it had started are ended and every
secondary translation is dropped, since it may have changed PTEs it never told
us about (`SecondaryMMU.notifier_lost`); a fault in flight is sent again once the
supervisor has handed over the restarted fault handler's channel.

The worker's own changes to its address space (MADV_DONTNEED, munmap, mprotect,
fork, prctl PR_SET_MEMORY_MERGE) are the core generators of core/mm.py, driven here:
memory and the ptl through notifier.Driver, their invalidate_range_start/end to this
process's secondary MMUs as local calls (`LocalNotify`), unmerge faults as FAULTs.
"""
from __future__ import annotations

import asyncio
import errno
import socket
import time


from proto.channel import Channel, PollSet
from proto.layout import PAGE_SIZE
from proto.messages import MAX_DATA, Frame, Msg, call_payload, encode
from proto.trace import Tracer

from workers.runtime.actor import RunMemory, actor_args, receive_fd, req_int, run_actor, setup
from workers.mm.effects import Memory
from workers.mm.mmu_notifier import (LOG_LEN, SecondaryMMU)
from workers.mm.pte import check_range
from workers.runtime.driver import Driver
from workers.actors.vm_common import log
from workers.actors.vm_notifier import VMNotifierSide
from workers.actors.vm_access import VMAccess
from workers.actors.vm_mm import VMAddressSpace



class VMWorker(VMNotifierSide, VMAccess, VMAddressSpace):
    def __init__(self, args):
        self.args = args
        self.name = f"vm:{args.name}"
        self.mem = RunMemory(args.run)
        self.mm, self.ptl = self.mem.attach_mm(args.mm)
        self.mm_id = args.mm
        self.tr = Tracer.open(args.trace, self.name)
        self.memory = memoryview(self.mem.mem)   # all frames, as bytes (Touch)
        self.kvm = SecondaryMMU(0, "kvm", self.mm.npages, True)
        self.subs: dict[int, SecondaryMMU] = {0: self.kvm}
        if args.device:
            self.subs[1] = SecondaryMMU(1, "dev", self.mm.npages, False)
        self.idle = {s: asyncio.Event() for s in self.subs}
        for ev in self.idle.values():
            ev.set()
        self.cow_faults = 0
        self.primary_faults = 0
        self.cow_ns: list[int] = []
        self.fault_ch: Channel | None = None
        self.ksmd_ch: Channel | None = None
        self.fault_peer = args.fault_peer      # the fault handler serving this mm ("faultd", "faultd1"...)
        self.scanner_peers = ["ksmd" if k == 0 else f"ksmd{k}" for k in range(len(args.ksmd_fd))]
        self.chans: dict[str, Channel] = {}     # every notifier's channel, by the actor at its other end
        self.fault_ready = asyncio.Event()   # set while fault_ch is a live channel to the fault handler
        self.notifier_losses = {p: 0 for p in [self.fault_peer] + self.scanner_peers}
        self.refused = 0                     # frames refused on a notifier channel (wrong mm or type)
        self.fault_retries = 0               # faults sent again to a restarted fault handler
        self.ended_on_loss = 0               # invalidations a lost notifier had started, ended here
        self.fast_replies = 0                # fault replies read on the socket itself (_reply_now)
        self.polled_replies = 0              # of which came while it polled (fault_poll_us), before sleeping
        self.writers: dict[int, dict] = {}
        self.exiting = False
        self.shared = Memory(self.mem.alloc, self.mem.stats, {self.mm_id: self.mm})
        self.driver = Driver(self.shared, {self.mm_id: self.ptl}, {}, args.ack_timeout * 2)
        self.driver.tr = self.tr          # (its page-table lock waits as spans)
        self._acc = None            # the access the access path runs now: [secondary MMU, secondary fault start]
        self._tgroups: dict = {}    # the trace's compiled groups, per fault handler (vm_access._trace_groups)
        self._tapplied = None       # traced: the COW reply applied last, its records not yet written (trace_applied)
        self._tcow = None           # traced: the last COW fault's record, held for its secondary fault's span (trace_cow)
        self.access_path = self.access_backend()
        self._polls = PollSet()              # over the fault handler's and the scanners' channels (_reply_now)
        self._vmas_key: bytes | None = None
        self._vmas: list = []


    async def on_call(self, ch: Channel, f: Frame) -> None:
        """One control request from the supervisor; always answered (an errno for a bad one)."""
        data = b""
        try:
            req = f.json()
            op = req.get("op")
            reply: dict = {}
            if op in ("read", "dma_read"):
                n = req_int(req, "length")
                if n > MAX_DATA:
                    raise OSError(errno.EINVAL, f"a read of {n} bytes is more than one reply carries "
                                                f"({MAX_DATA}); VM.read splits larger reads")
                sub = self.kvm
                if op == "dma_read":
                    if 1 not in self.subs:
                        raise OSError(errno.ENODEV, f"{self.name} has no device secondary MMU")
                    sub = self.subs[1]
                data = bytes(await self.access(req_int(req, "addr"), n, False, sub=sub) or b"")
            elif op == "write":
                payload = f.data()
                await self.access(req_int(req, "addr"), len(payload), True, memoryview(payload))
            elif op == "mmap":
                reply["addr"] = await self.mmap(req_int(req, "length"), req_int(req, "vm_flags", 0, 0, 2**63 - 1))
            elif op == "munmap":
                await self.munmap(req_int(req, "addr"), req_int(req, "length"))
            elif op == "madvise":
                await self.madvise(req_int(req, "addr"), req_int(req, "length"), req_int(req, "advice"))
            elif op == "mprotect":
                await self.mprotect(req_int(req, "addr"), req_int(req, "length"), req_int(req, "prot"))
            elif op == "prctl":
                args = req["args"]
                if (not isinstance(args, list) or not 1 <= len(args) <= 5
                        or any(isinstance(a, bool) or not isinstance(a, int) for a in args)):
                    raise OSError(errno.EINVAL, f"prctl args must be 1 to 5 integers, not {args!r}")
                reply["ret"] = await self.prctl(*args)
            elif op == "fork":
                reply["pages"] = await self.fork(req_int(req, "child", lo=0))
            elif op == "stats":
                reply = self.stats()
            elif op == "msg_log" and req.get("tail") is not None:     # the web view: count and last entries
                k = req_int(req, "tail", 64, 0, LOG_LEN)
                reply = {s.name: {"n": s.logged, "tail": list(s.log)[len(s.log) - min(k, len(s.log)):]}
                         for s in self.subs.values()}
            elif op == "msg_log":
                reply = {s.name: list(s.log) for s in self.subs.values()}
                if req.get("clear"):
                    for s in self.subs.values():
                        s.log.clear()
            elif op == "timed_writes":       # the side channel's probe: one timed write per page
                addr, n = req_int(req, "addr"), req_int(req, "npages", None, 1, self.mm.npages)
                check_range("access", addr, n * PAGE_SIZE, self.task_size)
                val = bytes([req_int(req, "value", 0xA5, 0, 255)])
                ns = []
                clock = time.perf_counter_ns
                for k in range(n):
                    t0 = clock()
                    await self.access(addr + k * PAGE_SIZE, 1, True, val)
                    ns.append(clock() - t0)
                reply["ns"] = ns
            elif op == "cow_samples":
                reply["ns"] = self.cow_ns
                self.cow_ns = []
            elif op == "writer_start":
                addr, npages = req_int(req, "addr"), req_int(req, "npages", None, 1, self.mm.npages)
                check_range("access", addr, npages * PAGE_SIZE, self.task_size)
                seed, count = req_int(req, "seed"), req_int(req, "count", 0, 0, 2**63 - 1)
                values = req_int(req, "values", 4, -255, 255)
                counter = bool(req.get("counter", False))
                if counter and values <= 0:
                    raise OSError(errno.EINVAL, f"a counter writer draws its fills from values > 0, not {values}")
                period = req.get("period_ms", 0)
                if isinstance(period, bool) or not isinstance(period, (int, float)) or not 0 <= period <= 3.6e6:
                    raise OSError(errno.EINVAL, f"period_ms must be a number in [0, 3600000], not {period!r}")
                wid = len(self.writers)
                self.writers[wid] = {"stop": False, "done": 0, "error": None, "lost": 0, "lost_pages": []}
                self.writers[wid]["task"] = asyncio.get_running_loop().create_task(self.writer(
                    wid, addr, npages, seed, count, values, float(period), counter))
                reply["id"] = wid
            elif op == "writer_peek":
                st = self.writers[req_int(req, "id")]
                reply = {"done": st["done"], "finished": st["task"].done(), "error": st["error"],
                         "lost": st["lost"], "lost_pages": st["lost_pages"]}
            elif op == "writer_stop":
                st = self.writers[req_int(req, "id")]
                st["stop"] = True
                await asyncio.wait_for(st["task"], self.args.ack_timeout * 4)
                reply = {"done": st["done"], "error": st["error"], "lost": st["lost"], "lost_pages": st["lost_pages"]}
            elif op == "unregister":
                await self.unregister(req_int(req, "sub"))
            elif op == "reconnect":          # the supervisor restarted a notifier: its new channel end
                peer = req.get("peer")
                if peer not in self.notifier_losses:
                    raise OSError(errno.EINVAL, f"reconnect to {peer!r}: not one of this VM's notifiers "
                                                f"({', '.join(self.notifier_losses)})")
                await self.connect(peer, receive_fd(self.fd_sock, req_int(req, "seq"), peer))
            elif op == "notifier_lost":      # the supervisor saw a notifier die: nothing of it stays mapped
                peer = req.get("peer")
                if peer not in self.notifier_losses:
                    raise OSError(errno.EINVAL, f"notifier_lost of {peer!r}: not one of this VM's notifiers "
                                                f"({', '.join(self.notifier_losses)})")
                gone = self.chans.get(peer)
                if gone is not None:
                    self.notifier_lost(gone)
            elif op == "exit":
                await self.exit_mmap_release()
                reply["bye"] = True
            elif op == "ping":
                pass
            else:
                raise OSError(errno.EINVAL, f"unknown vm op {op!r}")
        except OSError as e:
            reply, data = {"errno": e.errno or errno.EIO, "error": e.strerror or str(e)}, b""
        except (KeyError, ValueError, TypeError) as e:
            reply, data = {"errno": errno.EINVAL, "error": f"bad request: {e!r}"}, b""
        except asyncio.TimeoutError:
            reply, data = {"errno": errno.ETIMEDOUT, "error": "timed out"}, b""
        except Exception as e:          # a bug: the caller hears of it, this VM goes on
            log.exception("%s: control request failed", self.name)
            reply, data = {"errno": errno.EIO, "error": f"{self.name}: internal error: {e!r}"}, b""
        if not ch.closed:
            ch.send(encode(Msg.REPLY, corr=f.corr, payload=call_payload(reply, data)))
        if reply.get("bye"):
            self.done.set_result(None)


    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        self.fd_sock = socket.socket(fileno=self.args.fd_sock)

        def lost(ch):
            if not self.done.done():
                self.done.set_result(None)

        # all know this mm (the supervisor bound our channel ends to it) before any subscriber registers
        await self.connect(self.fault_peer, self.args.fault_fd)
        for peer, fd in zip(self.scanner_peers, self.args.ksmd_fd):     # every scanner may notify us
            await self.connect(peer, fd)
        await self.register()
        ctl_sock = socket.socket(fileno=self.args.ctl_fd)
        _, ctl = await loop.create_connection(
            lambda: Channel(f"{self.name}<-ctl", lambda ch, f: loop.create_task(self.on_call(ch, f)), lost),
            sock=ctl_sock)
        ctl.send(encode(Msg.REPLY, corr=0, payload=call_payload({"ready": True})))
        await self.done
        if self.tr:
            self.trace_cow()
            self.trace_applied()
            self.tr.close()


def main() -> None:
    def extra(p):
        p.add_argument("--mm", type=int, required=True)
        p.add_argument("--fault-fd", type=int, required=True)
        p.add_argument("--fault-peer", default="faultd", help="the name of the fault handler serving this mm")
        p.add_argument("--ksmd-fd", type=int, action="append", required=True,
                       help="the channel end to each scanner, scanner 0 (ksmd) first")
        p.add_argument("--name", required=True)
        p.add_argument("--device", action="store_true")
        p.add_argument("--ksm", type=int, default=1)
    args = actor_args(extra)
    setup(f"vm:{args.name}")
    run_actor("vm", VMWorker(args).main)


if __name__ == "__main__":
    main()
