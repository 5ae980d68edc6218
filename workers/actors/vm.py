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
import logging
import random
import socket
import time

import numpy as np

from proto.channel import Channel, PollSet, expire_after, halt_poll
from proto.layout import (KNOB_FAULT_POLL_US, MMF_VM_MERGE_ANY, MMH_FLAGS, PAGE_SHIFT, PAGE_SIZE, SUB_ACTIVE,
                          USER_BASE, VM_EXEC, VM_READ, VM_WRITE, MMView, Segment, seg_name)
from proto.messages import HEADER, HEADER_SIZE, MAGIC, MAX_DATA, RECORD, Frame, Msg, NOTIFIER_TYPES, call_payload, encode
from proto import (MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE, PR_GET_MEMORY_MERGE, PR_SET_MEMORY_MERGE,
                   PROT_EXEC, PROT_READ, PROT_WRITE)
from proto.trace import Tracer

from workers.runtime.actor import RunMemory, actor_args, receive_fd, req_int, run_actor, setup
from workers.mm.kvm import FaultCall, Touch, WaitIdle, touch, vm_access
from workers.mm.effects import VMAS, Load, Memory
from workers.mm.vma import (do_mmap, do_mprotect, do_munmap, dup_mmap, ksm_disable_merge_any,
                            ksm_enable_merge_any, ksm_madvise, madvise_dontneed)
from workers.mm.mmu_notifier import (LOG_LEN, LocalNotify, NotifierLink, SecondaryMMU, apply_cow_reply, notifier_lost,
                                     receive_notification, register, unregister)
from workers.mm.pte import check_range, task_size
from workers.runtime.driver import Driver, lock_ptl

log = logging.getLogger("ksm_proto.vm")
U64 = np.uint64
PROT_SEM = 0x8              # accepted and ignored, as on x86
_FAULT, _FAULT_REPLY, _APPLIED = int(Msg.FAULT), int(Msg.FAULT_REPLY), int(Msg.APPLIED)
_RECORDS = frozenset({_FAULT_REPLY})
FAST_WAIT_NS = 5_000_000    # the longest a fault's reply is waited for on its socket before the loop takes over


class VMWorker:
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
        self._polls = PollSet()              # over the fault handler's and the scanners' channels (_reply_now)
        self._vmas_key: bytes | None = None
        self._vmas: list = []

    # ------------------------------------------------------------------ notifier side
    def on_notify(self, ch: Channel, f: Frame) -> None:
        if f.type not in NOTIFIER_TYPES or f.type in (Msg.REGISTER, Msg.RELEASE) or f.mm != self.mm_id:
            self.refused += 1
            log.error("%s: refused %s for mm %d on the %s channel (this is mm %d)", self.name, Msg(f.type).name,
                      f.mm, ch.peer, self.mm_id)
            return
        peer = ch.peer
        if self.tr:
            self.tr.recv(peer, Msg(f.type).name, self.mm_id, f.sub, f.addr, f.n, 0,
                         int(f.entries[0, 1]) if f.n else 0, f.corr)
        flags = 0
        try:
            flags = receive_notification(self.subs, ch.link, f.type, f.sub, f.entries)
        except KeyError:
            log.error("%s: %s for unknown secondary MMU %d", self.name, Msg(f.type).name, f.sub)
        except ValueError as e:       # an address outside the mm, END without START: not applied
            self.refused += 1
            log.error("%s: refused %s from %s: %s", self.name, Msg(f.type).name, peer, e)
        else:
            self._idle_update(self.subs[f.sub])
        if self.tr:
            self.tr.send(peer, "ACK", self.mm_id, f.sub, f.addr, 0, 0, 0, f.corr)
        if not ch.closed:
            ch.send(encode(Msg.ACK, sub=f.sub, flags=flags, mm=self.mm_id, corr=f.corr))

    def notifier_lost(self, ch: Channel) -> None:
        """A notifier's channel is gone (it died, or is being replaced): once per channel, end the
        invalidations it started and drop every secondary translation (core.notify)."""
        if ch.link.lost:
            return
        opened = sum(ch.link.open_starts.values())
        ended = notifier_lost(self.subs, ch.link)
        self.notifier_losses[ch.peer] += 1
        log.warning("%s: lost the %s channel: ended %d open invalidation(s), dropped all translations",
                    self.name, ch.peer, opened)
        for s, n in ended.items():
            self.ended_on_loss += n
            if self.tr:
                for _ in range(n):
                    self.tr.recv(ch.peer, "END", self.mm_id, s, 0, 0, 0, 0, 0)
            self._idle_update(self.subs[s])
        if ch is self.fault_ch:
            self.fault_ready.clear()
        ch.close()

    def _notifier_channel(self, peer: str, fd: int) -> Channel:
        def lost(ch):
            self.notifier_lost(ch)
        ch = Channel(f"{self.name}->{peer}", self.on_notify, lost)
        ch.peer, ch.link = peer, NotifierLink(peer)
        if peer == self.fault_peer:     # a COW reply is applied on arrival, whoever waits for it
            ch.on_reply = self._on_fault_reply
            ch.records = _RECORDS       # (a one-page COW reply: read as a record, proto.messages.decode_record)
        return ch

    def _on_fault_reply(self, ch: Channel, f: Frame) -> None:
        if f.type == _FAULT_REPLY and f.entries is not None and not f.flags:
            if f.mm != self.mm_id:
                self.refused += 1
                log.error("%s: refused a FAULT_REPLY for mm %d", self.name, f.mm)
                return
            self.apply_cow_reply(ch, f)

    async def connect(self, peer: str, fd: int) -> None:
        """Take the channel end the supervisor handed us for `peer` and introduce this mm on it."""
        loop = asyncio.get_running_loop()
        old = self.chans.get(peer)
        if old is not None:
            self.notifier_lost(old)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        _, ch = await loop.create_connection(lambda: self._notifier_channel(peer, fd), sock=sock)
        self.chans[peer] = ch
        ch.fd = fd
        if peer == self.fault_peer:
            self.fault_ch = ch
        elif peer == "ksmd":
            self.ksmd_ch = ch
        corr = ch.next_corr()
        rep = await ch.call(corr, encode(Msg.HELLO, mm=self.mm_id, corr=corr,
                                         payload=call_payload({"name": self.name})), self.args.ack_timeout * 2)
        if rep.type != Msg.ACK:
            raise OSError(errno.EPROTO, f"{peer} refused HELLO: {rep.json().get('error')}")
        if peer == self.fault_peer:
            self.fault_ready.set()

    # ------------------------------------------------------------------ memory access
    async def fault_call(self, idx: list, flags: int, ncow: int = 0) -> None:
        """FAULT for pages idx (a list); returns once the reply is in (a COW reply applied on arrival, see
        `_on_fault_reply`).  A one-page FAULT is one fixed-size record; the reply is waited for on
        the socket itself while nothing else needs this process (`_reply_now`), else on the loop."""
        t0 = time.monotonic_ns()
        n = len(idx)
        addr0 = USER_BASE + (idx[0] << PAGE_SHIFT)
        entries = None
        if n > 1:
            entries = np.zeros((n, 2), dtype=U64)
            entries[:, 0] = [USER_BASE + (i << PAGE_SHIFT) for i in idx]
        while True:      # a fault the dead fault handler did not answer is sent again to its successor
            if not self.fault_ready.is_set():
                try:
                    await asyncio.wait_for(self.fault_ready.wait(), self.args.restart_timeout)
                except asyncio.TimeoutError:
                    raise OSError(errno.EIO, f"the fault handler is gone (not back within "
                                             f"{self.args.restart_timeout:.0f}s)") from None
            ch = self.fault_ch
            corr = Channel.next_corr()
            if self.tr:
                self.tr.send(self.fault_peer, "FAULT", self.mm_id, -1, addr0, len(idx), 0, 0, corr)
            data = RECORD.pack(MAGIC, RECORD.size, _FAULT, 0, flags, self.mm_id, corr, addr0, 1, 0, addr0, 0) \
                if entries is None else encode(Msg.FAULT, flags=flags, mm=self.mm_id, corr=corr, addr=addr0,
                                               entries=entries)
            try:
                fut = ch.request(corr, data)
                rep = self._reply_now(ch, fut)
                if rep is not None:
                    self.fast_replies += 1
                else:
                    timer = expire_after([fut], self.args.ack_timeout * 4,
                                         f"{ch.name}: no answer within {self.args.ack_timeout * 4:.1f}s")
                    try:
                        rep = await fut
                    finally:
                        timer.cancel()
                        ch.pending.pop(corr, None)
                break
            except ConnectionError:
                self.notifier_lost(ch)
                self.fault_retries += 1
            except asyncio.TimeoutError as e:
                raise OSError(errno.EFAULT, f"fault handler did not answer: {e!r}") from None
        if self.tr:
            self.tr.recv(self.fault_peer, "FAULT_REPLY", self.mm_id, -1, addr0, n, 0,
                         int(rep.entries[0][1]) if rep.n else 0, corr)
        t1 = time.monotonic_ns()
        if self.tr:
            if ncow:
                self.tr.span("cow_fault", t0, t1, mm=self.mm_id, pages=ncow)
        self.primary_faults += 1
        if ncow:
            self.cow_faults += ncow
            if len(self.cow_ns) < 200_000:
                self.cow_ns.append((t1 - t0) // ncow)
        if rep.flags:
            raise OSError(rep.flags, rep.json().get("error") or errno.errorcode.get(rep.flags, "fault failed"))

    def _reply_now(self, ch: Channel, fut) -> Frame | None:
        """The fast path of a fault: wait for the reply on the fault handler's socket itself, in this
        thread, with no event-loop turn, and hand what comes to the channel as the loop would (a COW
        reply is applied and APPLIED sent at once; a CLEAR_YOUNG answered).  Only while nothing else
        needs this process: once a scanner's channel has something (it may hold a ptl the fault needs
        and wait for our ack: the lock rule), or after FAST_WAIT_NS, or if the request did not leave at
        once, None: the event loop waits instead (with the call's timeout).  For the first
        `fault_poll_us` of them it polls the sockets without sleeping (halt_poll): the reply usually comes
        sooner than a sleeping process would be woken."""
        tp = ch.transport
        if tp is None or tp.get_write_buffer_size() or ch.closed:
            return None
        poll = self._polls.over(c.fd for c in [ch] + [self.chans.get(p) for p in self.scanner_peers]
                                if c is not None and getattr(c, "fd", None) is not None)
        now = time.monotonic_ns()
        deadline = now + FAST_WAIT_NS
        spin_end = min(deadline, now + int(self.mem.stats.knobs[KNOB_FAULT_POLL_US]) * 1000)   # (fault_poll_us)
        polled = False
        while not fut.done():
            now = time.monotonic_ns()
            if now >= deadline:
                return None
            evs = now < spin_end and halt_poll(poll, spin_end - now)
            polled = bool(evs)
            if not polled:
                left = deadline - time.monotonic_ns()
                evs = left > 0 and poll.poll(left / 1e6)
                if not evs:
                    return None
            for pfd, _ in evs:
                if pfd != ch.fd:
                    return None
            if not ch.read_now() or (ch.closed and not fut.done()):
                return None     # (EOF or an error: the loop's own read sees it too, and closes the channel)
        self.polled_replies += polled
        return fut.result()

    def apply_cow_reply(self, ch: Channel, rep: Frame) -> None:
        """A COW reply carries the new PTEs (core.fault.wp_page_copy_reply): apply set_pte_at_notify's
        messages to this mm's secondary MMUs now, before the write resumes (the same messages, in the
        same order, as the fault handler would have sent each), then tell the fault handler APPLIED:
        it holds ptl and the old frame until then.  Entries outside this mm are refused (logged), and
        APPLIED still goes back, so that the fault handler lets go."""
        try:
            applied = apply_cow_reply(self.subs_list(), rep.entries, self.args.mode)
        except ValueError as e:
            self.refused += 1
            log.error("%s: refused a COW reply from the fault handler: %s", self.name, e)
            applied = ()
        for sub, typ in applied:
            if self.tr:
                self.tr.recv(self.name, typ.name, self.mm_id, sub.sub, int(rep.entries[0][0]), rep.n, 0,
                             int(rep.entries[0][1]), 0)
            self._idle_update(sub)
        if self.tr:
            self.tr.send(self.fault_peer, "APPLIED", self.mm_id, -1, rep.addr, 0, 0, 0, rep.corr)
        if not ch.closed:       # (encode(Msg.APPLIED, mm=, corr=), packed at once)
            ch.send(HEADER.pack(MAGIC, HEADER_SIZE, _APPLIED, 0, 0, self.mm_id, rep.corr, 0, 0, 0))

    async def access(self, addr: int, length: int, write: bool, data=None, sub: SecondaryMMU | None = None):
        """Read or write guest memory through a secondary MMU, faulting as needed (core.access)."""
        sub = sub or self.kvm
        if not sub.released and not self.mm.subs[sub.sub, SUB_ACTIVE]:
            # a notifier gave up waiting for our ack and unregistered us: our translations are stale
            log.error("%s: secondary MMU %s was released by a notifier; dropping its translations",
                      self.name, sub.name)
            sub.release()
        check_range("access", addr, length, self.task_size)     # before a buffer of `length` bytes exists
        buf = data if write else bytearray(length)
        gen = vm_access(self.mm_id, sub, addr, length, write, buf)
        memory, pte, tr = self.memory, self.mm.pte, self.tr
        send = None
        t0 = 0
        while True:
            try:
                e = gen.send(send)
            except StopIteration:
                return None if write else buf
            c = e.__class__
            if c is Touch:
                send = touch(sub, e, memory)
                if send and t0:
                    tr.span("secondary_fault", t0, time.monotonic_ns(), mm=self.mm_id, sub=sub.sub,
                            addr=USER_BASE + (e.i << PAGE_SHIFT))
                    t0 = 0
            elif c is Load:
                if e.region == VMAS:
                    send = self.vma_list()
                elif e.idx.__class__ is int or np.ndim(e.idx) == 0:     # (a page index: an int, as a rule)
                    send = pte.item(e.idx)
                    if tr:
                        t0 = time.monotonic_ns()
                else:
                    send = pte[e.idx].tolist() if e.idx.__class__ is list else pte[e.idx].copy()
            elif c is WaitIdle:
                try:
                    await asyncio.wait_for(self.idle[sub.sub].wait(), self.args.ack_timeout * 2)
                except asyncio.TimeoutError:
                    raise OSError(errno.EAGAIN, f"invalidation on {self.name} never ended") from None
                send = None
            elif c is FaultCall:
                await self.fault_call(e.idx, e.flags, e.ncow)
                send = None

    # ------------------------------------------------------------------ address space
    async def take_ptl(self) -> None:
        await lock_ptl(self.ptl, self.args.ack_timeout * 2)

    def vma_list(self) -> list:
        """This mm's VMAs (only this process writes them: re-read when the table's bytes change)."""
        key = self.mm.vmas.tobytes()
        if key != self._vmas_key:
            self._vmas_key, self._vmas = key, self.mm.vma_list()
        return self._vmas

    def _idle_update(self, sub: SecondaryMMU) -> None:
        """The secondary MMU's idle event follows its in-progress count (WaitIdle waits on it)."""
        if sub.in_progress:
            self.idle[sub.sub].clear()
        else:
            self.idle[sub.sub].set()

    def subs_list(self) -> list[SecondaryMMU]:
        return list(self.subs.values())

    async def drive(self, gen):
        """Run a core/mm.py generator: memory and ptl through the Driver, LocalNotify and FaultCall here."""
        return await self.driver.run(gen, other=self._local_effect)

    async def _local_effect(self, e):
        if e.__class__ is LocalNotify:
            self.local_notify(e)
            return None
        if e.__class__ is FaultCall:
            await self.fault_call(e.idx, e.flags, e.ncow)
            return None
        raise TypeError(f"effect {e!r} has no driver in a VM worker")

    def local_notify(self, e: LocalNotify) -> None:
        """invalidate_range_start/end from this process: each secondary MMU applies it now."""
        name = Msg(e.type).name
        n = len(e.entries)
        addr0, pte0 = (int(e.entries[0, 0]), int(e.entries[0, 1])) if n else (0, 0)
        for sub in e.subs:
            if sub.released:
                continue
            if self.tr:
                self.tr.recv(self.name, name, self.mm_id, sub.sub, addr0, n, 0, pte0, 0)
            sub.apply(e.type, e.entries)
            if sub.in_progress:
                self.idle[sub.sub].clear()
            else:
                self.idle[sub.sub].set()

    async def mmap(self, length: int, vm_flags: int = 0) -> int:
        npages = check_range("mmap", 0, length, self.task_size)[1] >> PAGE_SHIFT
        return await self.drive(do_mmap(self.mm_id, npages, self.mm.npages, vm_flags))

    @property
    def task_size(self) -> int:
        return task_size(self.mm.npages)

    async def munmap(self, addr: int, length: int) -> None:
        addr, end = check_range("munmap", addr, length, self.task_size)
        await self.drive(do_munmap(self.mm_id, self.subs_list(), self.mm.npages, addr, end))

    async def madvise(self, addr: int, length: int, advice: int) -> None:
        """madvise with the kernel's errno rules (see DESIGN.md, KSM semantics): MADV_DONTNEED
        (core.mm.madvise_dontneed), and ksm_madvise for MADV_MERGEABLE / MADV_UNMERGEABLE."""
        if advice not in (MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE):
            raise OSError(errno.EINVAL, f"advice {advice} is not MADV_DONTNEED, MADV_MERGEABLE or MADV_UNMERGEABLE")
        if advice != MADV_DONTNEED and not self.args.ksm:
            raise OSError(errno.EINVAL, "KSM is not enabled in this machine (CONFIG_KSM=n)")
        rng = check_range("madvise", addr, length, self.task_size)
        if rng is None:
            return
        if advice == MADV_DONTNEED:
            await self.drive(madvise_dontneed(self.mm_id, self.subs_list(), *rng))
            return
        await self.drive(ksm_madvise(self.mm_id, *rng, advice == MADV_MERGEABLE))

    async def mprotect(self, addr: int, length: int, prot: int) -> None:
        """mprotect with the kernel's errno rules (do_mprotect_pkey): EINVAL for an unaligned start or
        unknown prot bits, 0 for length 0, ENOMEM for a range that wraps or is not all mapped (the
        part before the hole changed).  The work is core.mm.do_mprotect."""
        rng = check_range("mprotect", addr, length, self.task_size)
        if rng is None:
            return
        addr, end = rng
        if isinstance(prot, bool) or not isinstance(prot, int) or prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC | PROT_SEM):
            raise OSError(errno.EINVAL, f"prot {prot!r} has bits other than PROT_READ|PROT_WRITE|PROT_EXEC")
        vm_prot = ((VM_READ if prot & PROT_READ else 0) | (VM_WRITE if prot & PROT_WRITE else 0)
                   | (VM_EXEC if prot & PROT_EXEC else 0))
        await self.drive(do_mprotect(self.mm_id, self.subs_list(), addr, end, vm_prot))

    async def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
        """PR_SET_MEMORY_MERGE (arg2 non-zero: merge-any on; 0: off, unmerging) and PR_GET_MEMORY_MERGE,
        with the kernel's EINVAL for unused arguments that are not 0, other options, or no KSM."""
        if not self.args.ksm or option not in (PR_SET_MEMORY_MERGE, PR_GET_MEMORY_MERGE):
            raise OSError(errno.EINVAL, f"prctl option {option} is not supported here")
        if option == PR_GET_MEMORY_MERGE:
            if arg2 or arg3 or arg4 or arg5:
                raise OSError(errno.EINVAL, "PR_GET_MEMORY_MERGE takes no arguments")
            return int(bool(int(self.mm.hdr[MMH_FLAGS]) & MMF_VM_MERGE_ANY))
        if arg3 or arg4 or arg5:
            raise OSError(errno.EINVAL, "PR_SET_MEMORY_MERGE takes one argument")
        if arg2:
            await self.drive(ksm_enable_merge_any(self.mm_id))
        else:
            await self.drive(ksm_disable_merge_any(self.mm_id))
        return 0

    async def fork(self, child: int) -> int:
        """Copy this address space into mm `child` (made by the supervisor, known to nobody else yet):
        core.mm.dup_mmap under this mm's ptl.  Returns how many pages the child maps."""
        seg = Segment.attach(seg_name(self.args.run, f"mm.{child}"))
        try:
            cmm = MMView(seg)
            if cmm.npages != self.mm.npages:
                raise OSError(errno.EINVAL, f"fork: mm {child} has {cmm.npages} pages, not {self.mm.npages}")
            self.shared.mms[child] = cmm
            try:
                return await self.drive(dup_mmap(self.mm_id, child, self.subs_list()))
            finally:
                del self.shared.mms[child]
                del cmm
        finally:
            seg.close()

    # ------------------------------------------------------------------ workloads
    async def writer(self, wid: int, addr: int, npages: int, seed: int, count: int, values: int,
                     period_ms: float, counter: bool = False) -> None:
        """Write `count` pages (count 0: until stopped) from a seeded RNG.

        Write k fills page rng.randrange(npages) with the byte rng.randrange(values) + 1 and
        stamps nothing else, so pages keep becoming identical (merge, COW, re-merge).  The parent
        replays the same RNG to know every byte, independently of this process.  values=0
        instead stamps a growing counter into each page in turn: pages that never settle;
        values=-v fills each page in turn with the byte v.

        counter=True (values > 0): every write carries a value of its own, so that no lost write
        can hide behind a later equal one, and pages still keep becoming identical.  The writes to
        a page alternate: a *stamp* (its first 16 bytes: the write's number k+1 and the seed, the
        rest of the page left as it is) then a *fill* (the whole page the byte drawn for write k),
        stamp, fill...: each write changes the page to bytes it never had (a fill follows a stamp,
        which no other write wrote).  Before each write the writer reads the page back
        (`counter_expect`: the page as the writes so far left it, from the first write on) and
        counts a mismatch in st["lost"] (the first few in st["lost_pages"]): a lost write is seen
        at the next write to its page, under load, not only in the final bytes.  The parent replays
        the same sequence (workers.tools.chaos.counter_sequence).
        """
        st = self.writers[wid]
        rng = random.Random(seed)
        k = 0
        if counter:
            return await self._counter_writer(st, rng, addr, npages, seed, count, values, period_ms)
        try:
            while not st["stop"] and (count == 0 or k < count):
                if values < 0:          # fill mode: every page in turn gets the byte -values
                    page = k % npages
                    await self.access(addr + page * PAGE_SIZE, PAGE_SIZE, True, bytes([-values]) * PAGE_SIZE)
                elif values == 0:       # stamp mode: a new counter into every page, in turn (volatile pages)
                    page = k % npages
                    await self.access(addr + page * PAGE_SIZE, 16, True,
                                      (k // npages + 1).to_bytes(8, "little") + page.to_bytes(8, "little"))
                else:
                    page = rng.randrange(npages)
                    val = rng.randrange(values) + 1
                    await self.access(addr + page * PAGE_SIZE, PAGE_SIZE, True, bytes([val]) * PAGE_SIZE)
                k += 1
                st["done"] = k
                if period_ms:
                    await asyncio.sleep(period_ms / 1000)
                elif k % 64 == 0:
                    await asyncio.sleep(0)
        except Exception as e:   # reported by writer_stop
            st["error"] = repr(e)

    async def _counter_writer(self, st: dict, rng, addr: int, npages: int, seed: int, count: int, values: int,
                              period_ms: float) -> None:
        """VMWorker.writer with counter=True (see there)."""
        stamped = [False] * npages          # the page's last write was a stamp (the next is a fill)
        expect: list = [None] * npages      # (fill byte, stamp bytes or None) once the page was written
        tail = 8                            # bytes read back from the page's end (the fill shows there)
        k = 0
        try:
            while not st["stop"] and (count == 0 or k < count):
                page = rng.randrange(npages)
                val = rng.randrange(values) + 1
                pa = addr + page * PAGE_SIZE
                want = expect[page]
                if want is not None:        # read back what the writes so far left there
                    head = bytes(await self.access(pa, 16, False))
                    end = bytes(await self.access(pa + PAGE_SIZE - tail, tail, False))
                    fill, stamp = want
                    if end != bytes([fill]) * tail or head != (stamp or bytes([fill]) * 16):
                        st["lost"] += 1
                        if len(st["lost_pages"]) < 8:
                            st["lost_pages"].append({"page": page, "write": k, "head": head.hex(),
                                                     "expected": (stamp or bytes([fill]) * 16).hex()})
                if stamped[page]:
                    await self.access(pa, PAGE_SIZE, True, bytes([val]) * PAGE_SIZE)
                    expect[page] = (val, None)
                else:
                    stamp = (k + 1).to_bytes(8, "little") + (seed & (2**64 - 1)).to_bytes(8, "little")
                    await self.access(pa, 16, True, stamp)
                    expect[page] = (want[0], stamp) if want is not None else None
                stamped[page] = not stamped[page]
                k += 1
                st["done"] = k
                if period_ms:
                    await asyncio.sleep(period_ms / 1000)
                elif k % 64 == 0:
                    await asyncio.sleep(0)
        except Exception as e:   # reported by writer_stop
            st["error"] = repr(e)

    # ------------------------------------------------------------------ control
    def stats(self) -> dict:
        msgs: dict[str, int] = {}
        for s in self.subs.values():
            for k, v in s.msgs.items():
                msgs[k] = msgs.get(k, 0) + v
        return {
            "secondary_faults": sum(s.faults for s in self.subs.values()),
            "cow_faults": self.cow_faults,
            "primary_faults": self.primary_faults,
            "msgs": msgs,
            "subs": {s.name: {"secondary_faults": s.faults, "msgs": dict(s.msgs), "released": s.released,
                              "change_pte": s.has_change_pte} for s in self.subs.values()},
            "notifier_losses": dict(self.notifier_losses),
            "refused": self.refused,
            "fault_retries": self.fault_retries, "ended_on_loss": self.ended_on_loss,
            "fast_replies": self.fast_replies, "polled_replies": self.polled_replies,
        }

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

    async def register(self) -> None:
        """mmu_notifier_register for each secondary MMU of this VM."""
        await self.take_ptl()
        try:
            register(self.mm, self.subs_list())
            if self.tr:
                for s in self.subs.values():
                    self.tr.recv(self.name, "REGISTER", self.mm_id, s.sub, 0, 0, 0, 0, 0)
        finally:
            self.ptl.release()

    async def unregister(self, sub: int) -> None:
        """mmu_notifier_unregister: ->release, and no callback is in flight once we hold ptl."""
        s = self.subs.get(sub)
        if s is None:
            raise OSError(errno.ENOENT, f"no secondary MMU {sub} on {self.name}")
        await self.take_ptl()
        try:
            released = unregister(self.mm, s)
        finally:
            self.ptl.release()
        if released:
            if self.tr:
                self.tr.recv(self.name, "RELEASE", self.mm_id, sub, 0, 0, 0, 0, 0)
            self.idle[sub].set()

    async def exit_mmap_release(self) -> None:
        """mmu_notifier_release at exit: every secondary MMU is released before frames are freed."""
        for w in self.writers.values():
            w["stop"] = True
        for sub in list(self.subs):
            if not self.subs[sub].released:
                await self.unregister(sub)

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
