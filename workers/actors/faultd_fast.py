"""The fault handler's fault path: handle_mm_fault (mm.fault) for one FAULT, driven in the callback that
read it as far as it goes without waiting, parked on the VM's APPLIED, handed to the event loop's
driver when it must wait; the reply, once.

A mixin of FaultHandler (workers.actors.faultd), which holds the state these methods share.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import time

import numpy as np

from proto.channel import Channel
from proto.layout import KNOB_MITIGATION, PAGE_SHIFT, USER_BASE
from proto.messages import MAGIC, RECORD, Frame, Msg, call_payload, encode

from workers.mm.effects import Lock, Reply, Unlock, WaitAcks
from workers.runtime.interp import BLOCK, Backend, run_until_blocked
from workers.mm.fault import serve_fault
from workers.actors.faultd_common import COW_REPLY, EARLY_REPLY, VUSION, _FAULT_REPLY, _Fault, log


class FaultPath:
    """The fault path (a FaultHandler mixin)."""

    # ---- faults: a fast path driven in the frame's own callback, the event loop's driver when it must wait
    def start_fault(self, ch: Channel, f: Frame) -> None:
        """serve_fault (mm.fault: handle_mm_fault and its reply, once) for one FAULT, driven right here,
        in the callback that read it (no task, no event-loop turn) as far as it goes without waiting:
        to its end, or to the wait for the VM's APPLIED, where it is parked until that record comes
        (or the sweep's timeout).  A busy ptl, or notifier messages and their acks
        (KSM_PROTO_COW_REPLY=0), hand it to the event loop's Driver."""
        st = _Fault(ch, f)
        st.t0 = time.monotonic_ns()
        mm = self.memory.mms.get(f.mm)
        # (an address below USER_BASE or far above the mm becomes an index the core refuses: EFAULT)
        e = f.entries
        if e.__class__ is list:         # (a record: one (addr, 0) pair)
            idx = [(e[0][0] - USER_BASE) >> PAGE_SHIFT]
        elif f.n == 1:
            idx = [(e.item(0) - USER_BASE) >> PAGE_SHIFT]
        else:
            idx = [] if f.entries is None else [(a - USER_BASE) >> PAGE_SHIFT for a in f.entries[:, 0].tolist()]
        self.faults += 1
        self._step(st, serve_fault(f.mm, None if mm is None else mm.npages, idx, f.flags, self.mode, EARLY_REPLY,
                                   cow_reply=COW_REPLY,
                                   vusion=self.mem.stats.knobs.item(KNOB_MITIGATION) == VUSION), None, None)

    def fast_backend(self) -> Backend:
        """The fast path's backend of the one interpreter (runtime/interp.py): memory, a ptl free now,
        the unlock (and the next FAULT in line), the reply; anything else (a busy ptl, the APPLIED,
        notifier messages) blocks, and `_step` decides where the fault waits."""
        b = Backend(self.memory, {Lock: self._fast_lock, Unlock: self._fast_unlock, Reply: self._fast_reply})
        b.name, b.fallback = "the fault handler's fast path", lambda e: BLOCK
        return b

    def _fast_lock(self, e):
        mm = e.key[1]
        if self.ptls[mm].try_acquire():
            self.holder[mm] = self.cur
            return None
        return BLOCK

    def _fast_unlock(self, e):
        mm = e.key[1]
        self.ptls[mm].release()
        cur = self.cur
        if self.holder.get(mm) is cur:
            self.holder[mm] = None
        q = self.queued.get(mm)
        if q:
            self._relock(mm, *q.popleft())
            self.cur = cur

    def _fast_reply(self, e):
        return self._reply(self.cur, e, True)

    def _step(self, st: "_Fault", gen, send, exc) -> None:
        """Run st's core through the fast path's backend until it ends or blocks, then park or hand it on."""
        self.cur = st
        try:
            e, value = run_until_blocked(gen, self.fast, send, exc)
        except Exception as x:
            self._finish(st, None, x)
            return
        if e is None:
            self._finish(st, value, None)
            return
        c = e.__class__
        if c is Lock and self.holder.get(e.key[1]) is not None:
            # another FAULT of this mm holds its ptl here (parked on APPLIED): wait behind it, and
            # run right after its unlock, in the same callback (several writers faulting at once)
            self.queued.setdefault(e.key[1], collections.deque()).append((st, gen, e))
            self.batched += 1
        elif c is WaitAcks and len(e.handles) == 1 and e.handles[0] == [st]:
            st.gen = gen                # parked until APPLIED (`on_vm_frame`) or its deadline (`_sweep`)
            st.deadline = time.monotonic() + self.args.ack_timeout
            st.ch.applied[st.f.corr] = st
            if not self._sweeping:
                self._sweeping = True
                asyncio.get_running_loop().call_later(min(1.0, self.args.ack_timeout / 4), self._sweep)
        else:       # ksmd or the VM holds the ptl, or notifier messages and their acks: the event loop's driver
            asyncio.get_running_loop().create_task(self._slow(st, gen, e))

    def _relock(self, mm: int, st: "_Fault", gen, e) -> None:
        """A FAULT queued behind another of its mm takes the ptl that one just let go (or waits again)."""
        if self.ptls[mm].try_acquire():
            self.holder[mm] = st
            self._step(st, gen, None, None)
        elif self.holder.get(mm) is not None:
            self.queued[mm].appendleft((st, gen, e))
        else:
            asyncio.get_running_loop().create_task(self._slow(st, gen, e))

    async def _slow(self, st: "_Fault", gen, first) -> None:
        try:
            value = await self.driver.run(gen, lambda e: self._reply(st, e, False), first=first)
        except Exception as x:
            self._finish(st, None, x)
            return
        finally:        # it took ptl on the fast path and let go of it here: the next in line goes
            mm = st.f.mm
            if self.holder.get(mm) is st:
                self.holder[mm] = None
                q = self.queued.get(mm)
                if q:
                    self._relock(mm, *q.popleft())
        self._finish(st, value, None)

    def _applied(self, st: "_Fault", why: str | None) -> None:
        """A parked COW goes on: its APPLIED came (why None), or it never will (why: its subscribers
        are released, as for a missing ack)."""
        if why is not None:
            n = self.notifiers.get(st.f.mm)
            if n is not None:
                n.release_all(why)
        gen, st.gen = st.gen, None
        if gen is not None:
            self._step(st, gen, [0] if why is None else [], None)

    def _sweep(self) -> None:
        now = time.monotonic()
        left = False
        for n in list(self.notifiers.values()):
            ch = n.ch
            if ch is None:
                continue
            for corr, st in list(ch.applied.items()):
                if st.__class__ is _Fault:
                    if st.deadline < now:
                        del ch.applied[corr]
                        self._applied(st, f"no APPLIED for the COW reply {corr} within "
                                          f"{self.args.ack_timeout:.1f}s")
                    else:
                        left = True
        self._sweeping = left
        if left:
            asyncio.get_running_loop().call_later(min(1.0, self.args.ack_timeout / 4), self._sweep)

    def _reply(self, st: "_Fault", e: Reply, fast: bool) -> list:
        """The core's Reply (serve_fault sends exactly one): FAULT_REPLY on the VM's channel.  One
        carrying a COW's new PTEs (entries) returns the WaitAcks handle of the VM's APPLIED: [st] on
        the fast path (the fault parks on it), a future's on the event loop's."""
        f, ch, entries, err = st.f, st.ch, e.entries, e.err
        if self.tr:         # (its record goes with the FAULT's, at the end: _trace_fault)
            st.t_reply = time.monotonic_ns()
            st.pte = entries[0][1] if entries else 0
        if ch.closed:
            return []
        self.reply_ns += time.monotonic_ns() - st.t0
        if entries is not None and len(entries) == 1 and not err:     # entries: [(addr, new pte)]
            ch.send(RECORD.pack(MAGIC, RECORD.size, _FAULT_REPLY, 0, 0, f.mm, f.corr, f.addr, 1, 0, *entries[0]))
        else:       # (many entries: into an n x 2 array in one pass, not from a list of tuples)
            ch.send(encode(Msg.FAULT_REPLY, flags=err, mm=f.mm, corr=f.corr, addr=f.addr,
                           entries=None if entries is None else np.fromiter(
                               itertools.chain.from_iterable(entries), np.uint64, 2 * len(entries)).reshape(-1, 2),
                           payload=call_payload({"error": e.msg}) if err else b""))
        if entries is None:
            return []
        if fast:
            return [st]
        fut = asyncio.get_running_loop().create_future()
        ch.applied[f.corr] = fut
        return [(self.notifiers[f.mm], Msg.FAULT_REPLY, None, f.corr, f.addr, fut)]

    def _finish(self, st: "_Fault", value, exc) -> None:
        """The core ended (it has replied): count it, or log the bug it answered EIO."""
        f = st.f
        st.ch.applied.pop(f.corr, None)
        if exc is not None:
            log.error("%s: fault on mm %d failed", self.name, f.mm, exc_info=exc)
        elif value is not None:
            copies, reuses = value
            self.cow_copies += copies
            self.reuses += reuses
        if self.tr:
            self._trace_fault(st)

    def _trace_fault(self, st: "_Fault") -> None:
        """A fault's records as one (proto.trace.Tracer.group): recv FAULT (at its start), send
        FAULT_REPLY, recv APPLIED (those it had), the handle_mm_fault span."""
        t1 = time.monotonic_ns()
        f = st.f
        mm, addr, n, corr, t0 = f.mm, f.addr, f.n, f.corr, st.t0
        kind = (2 if st.t_applied else 1) if st.t_reply else 0
        gs = self._tgroups.get(mm)
        if gs is None:
            gs = self._tgroups[mm] = self._trace_groups(mm)
        g = gs[kind]
        if kind == 2:
            self.tr.emit(g, t1, t0, mm, -1, addr, n, 0, 0, corr, st.t_reply, mm, -1, addr, n, 0, st.pte, corr,
                         st.t_applied, mm, -1, st.applied_addr, 0, 0, 0, corr, t0, t1 - t0, mm, n, f.flags & 1)
        elif kind == 1:
            self.tr.emit(g, t1, t0, mm, -1, addr, n, 0, 0, corr, st.t_reply, mm, -1, addr, n, 0, st.pte, corr,
                         t0, t1 - t0, mm, n, f.flags & 1)
        else:
            self.tr.emit(g, t1, t0, mm, -1, addr, n, 0, 0, corr, t0, t1 - t0, mm, n, f.flags & 1)

    def _trace_groups(self, mm: int) -> tuple:
        """The compiled groups of a fault of mm (its VM's name the peer): without a reply, with one, with
        its APPLIED too."""
        peer = self.peers.get(mm) or f"vm:{mm}"
        span = ("handle_mm_fault", ("pages", "write"))
        msgs = (("recv", peer, "FAULT"), ("send", peer, "FAULT_REPLY"), ("recv", peer, "APPLIED"))
        return tuple(self.tr.group(msgs[:k], span) for k in (1, 2, 3))
