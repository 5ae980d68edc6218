"""A VM worker's memory accesses: through a secondary MMU (mm.kvm.vm_access), a FAULT round trip to
its fault handler (the fast path waits for the reply on the socket itself), the cores of its own
address-space changes driven with their local notifications.

A mixin of VMWorker (workers.actors.vm), which holds the state these methods share.
"""
from __future__ import annotations

import asyncio
import errno
import time

import numpy as np

from proto.channel import Channel, halt_poll
from proto.layout import (KNOB_FAULT_POLL_US, PAGE_SHIFT, SUB_ACTIVE, USER_BASE)
from proto.messages import MAGIC, RECORD, Frame, Msg, encode

from workers.mm.kvm import FaultCall, Touch, WaitIdle, touch, vm_access
from workers.mm.effects import VMAS, Load
from workers.mm.mmu_notifier import (LocalNotify, SecondaryMMU)
from workers.mm.pte import check_range
from workers.runtime.driver import lock_ptl
from workers.runtime.interp import BLOCK, Backend, run_until_blocked
from workers.actors.vm_common import FAST_WAIT_NS, U64, _FAULT, log


_TCOW_T_REPLY = 24      # (in fault_call's held COW record, `_tcow`: the FAULT_REPLY's arrival, the record's time)


class VMAccess:
    """The VM's accesses and faults (a VMWorker mixin)."""

    # ------------------------------------------------------------------ memory access
    async def fault_call(self, idx: list, flags: int, ncow: int = 0) -> None:
        """FAULT for pages idx (a list); returns once the reply is in (a COW reply applied on arrival, see
        `_on_fault_reply`).  A one-page FAULT is one fixed-size record; the reply is waited for on
        the socket itself while nothing else needs this process (`_reply_now`), else on the loop."""
        t0 = time.monotonic_ns()
        tr = self.tr
        t_sent = 0
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
            if tr:
                t_sent = time.monotonic_ns()      # (the FAULT's record goes with its reply's, below)
            data = RECORD.pack(MAGIC, RECORD.size, _FAULT, 0, flags, self.mm_id, corr, addr0, 1, 0, addr0, 0) \
                if entries is None else encode(Msg.FAULT, flags=flags, mm=self.mm_id, corr=corr, addr=addr0,
                                               entries=entries)
            try:
                fut = ch.request(corr, data)
                rep = self._reply_now(ch, fut)
                if rep is not None:
                    self.fast_replies += 1
                else:
                    rep = await ch.answer(corr, fut, self.args.ack_timeout * 4)
                break
            except ConnectionError:
                if tr:
                    self._trace_fault_sent(t_sent, addr0, n, corr)
                self.notifier_lost(ch)
                self.fault_retries += 1
            except asyncio.TimeoutError as e:
                if tr:
                    self._trace_fault_sent(t_sent, addr0, n, corr)
                raise OSError(errno.EFAULT, f"fault handler did not answer: {e!r}") from None
            except BaseException:
                if tr:
                    self._trace_fault_sent(t_sent, addr0, n, corr)
                raise
        t1 = time.monotonic_ns()
        if tr:      # one record: send FAULT, recv FAULT_REPLY (at t1), the cow_fault span; with a COW
            g = self._trace_groups()     # reply's message applied
            mm = self.mm_id                                                   # and APPLIED (apply_cow_reply)
            new = rep.entries[0][1] if rep.n else 0
            p = self._tapplied
            if ncow and p is not None and p[0] == corr:
                self._tapplied = None
                _, typ, ta, sub, a_addr, a_n, a_pte, tb, rep_addr = p
                if self._tcow is not None:
                    self.trace_cow()
                # (held until the secondary fault ends, `_touch`: its span goes in the same record)
                self._tcow = (typ, (t_sent, mm, -1, addr0, n, 0, 0, corr, ta, mm, sub, a_addr, a_n, 0, a_pte, 0,
                                    tb, mm, -1, rep_addr, 0, 0, 0, corr, t1, mm, -1, addr0, n, 0, new, corr,
                                    t0, t1 - t0, mm, ncow))
            elif ncow:
                tr.emit(g[0], t1, t_sent, mm, -1, addr0, n, 0, 0, corr, t1, mm, -1, addr0, n, 0, new, corr,
                        t0, t1 - t0, mm, ncow)
            else:
                tr.emit(g[1], t1, t_sent, mm, -1, addr0, n, 0, 0, corr, t1, mm, -1, addr0, n, 0, new, corr)
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

    def _trace_groups(self) -> tuple:
        """The trace's compiled groups of this VM's fault path (proto.trace.Tracer.group), per fault
        handler: a COW fault (FAULT, FAULT_REPLY, its span), another fault, a FAULT alone (its reply
        never came), the secondary fault's span, and per message type applied a COW fault with its
        reply applied (FAULT, the message applied, APPLIED, FAULT_REPLY, its span; `_trace_cow_group`)."""
        fp, tr = self.fault_peer, self.tr
        g = self._tgroups.get(fp)
        if g is not None:           # (compiled once per fault handler)
            return g
        msgs = (("send", fp, "FAULT"), ("recv", fp, "FAULT_REPLY"))
        g = self._tgroups[fp] = (tr.group(msgs, ("cow_fault", ("pages",))), tr.group(msgs), tr.group(msgs[:1]),
                                 tr.group((), ("secondary_fault", ("sub", "addr"))), {})
        return g

    def _trace_cow_group(self, typ, secondary: bool):
        """The compiled group of a COW fault with its reply applied (a message of type typ), with or
        without the span of the secondary fault around it."""
        g = self._trace_groups()
        k = (typ, secondary)
        ga = g[4].get(k)
        if ga is None:
            fp = self.fault_peer
            spans = (("cow_fault", ("pages",)),) + ((("secondary_fault", ("sub", "addr")),) if secondary else ())
            ga = g[4][k] = self.tr.group((("send", fp, "FAULT"), ("recv", self.name, typ.name), ("send", fp, "APPLIED"),
                                          ("recv", fp, "FAULT_REPLY")), *spans)
        return ga

    def trace_cow(self) -> None:
        """The held record of the last COW fault (fault_call), that no secondary fault's end took: alone."""
        p, self._tcow = self._tcow, None
        if p is not None:
            self.tr.emit(self._trace_cow_group(p[0], False), p[1][_TCOW_T_REPLY], *p[1])

    def _trace_fault_sent(self, t_sent: int, addr0: int, n: int, corr: int) -> None:
        """A FAULT whose reply did not come (its record alone)."""
        if t_sent:
            g = self._trace_groups()
            self.tr.emit(g[2], t_sent, t_sent, self.mm_id, -1, addr0, n, 0, 0, corr)

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
        acc = [sub, 0]              # this access's secondary MMU, and when its secondary fault began
        send = None
        while True:
            self._acc = acc         # (set again after each wait: another access may have run meanwhile)
            e, _ = run_until_blocked(gen, self.access_path, send)
            if e is None:
                return None if write else buf
            if e.__class__ is WaitIdle:
                try:
                    await asyncio.wait_for(self.idle[sub.sub].wait(), self.args.ack_timeout * 2)
                except asyncio.TimeoutError:
                    raise OSError(errno.EAGAIN, f"invalidation on {self.name} never ended") from None
            else:                   # FaultCall
                await self.fault_call(e.idx, e.flags, e.ncow)
            send = None

    def access_backend(self) -> Backend:
        """The access path's backend of the one interpreter (runtime/interp.py): the secondary MMU's
        lookups and this mm's PTEs and VMAs, read here; a wait for an invalidation's end and a FAULT
        block, and `access` awaits them."""
        b = Backend(None, {Touch: self._touch, Load: self._load_own})
        b.name, b.fallback = "a VM's access path", lambda e: BLOCK
        return b

    def _touch(self, e):
        acc = self._acc
        hit = touch(acc[0], e, self.memory)
        if hit and acc[1]:
            t = time.monotonic_ns()
            p = self._tcow
            if p is None:
                self.tr.emit(self._trace_groups()[3], t, acc[1], t - acc[1],
                             self.mm_id, acc[0].sub, USER_BASE + (e.i << PAGE_SHIFT))
            else:       # the COW fault's record held by fault_call, with this span: one record
                self._tcow = None
                g = self._tgroups[self.fault_peer][4].get((p[0], True)) or self._trace_cow_group(p[0], True)
                self.tr.emit(g, t, *p[1], acc[1], t - acc[1], self.mm_id, acc[0].sub, USER_BASE + (e.i << PAGE_SHIFT))
            acc[1] = 0
        return hit

    def _load_own(self, e):
        if e.region == VMAS:
            return self.vma_list()
        pte, idx = self.mm.pte, e.idx
        if idx.__class__ is int or np.ndim(idx) == 0:     # (a page index: an int, as a rule)
            if self.tr:
                self._acc[1] = time.monotonic_ns()
            return pte.item(idx)
        return pte[idx].tolist() if idx.__class__ is list else pte[idx].copy()

    # ------------------------------------------------------------------ address space
    async def take_ptl(self) -> None:
        await lock_ptl(self.ptl, self.args.ack_timeout * 2)

    def vma_list(self) -> list:
        """This mm's VMAs (only this process writes them: re-read when the table's bytes change)."""
        key = self.mm.vmas.tobytes()
        if key != self._vmas_key:
            self._vmas_key, self._vmas = key, self.mm.vma_list()
        return self._vmas

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
