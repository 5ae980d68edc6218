"""A VM worker's side of the mmu_notifier: its channels to the notifiers (ksmd, its fault handler),
the messages applied to its secondary MMUs and acked, a COW reply applied and APPLIED sent, a
notifier's loss, register / unregister (the decisions: mm.mmu_notifier).

A mixin of VMWorker (workers.actors.vm), which holds the state these methods share.
"""
from __future__ import annotations

import asyncio
import errno
import socket
import time


from proto.channel import Channel
from proto.messages import HEADER, HEADER_SIZE, MAGIC, Frame, Msg, NOTIFIER_TYPES, call_payload, encode

from workers.mm.mmu_notifier import (LocalNotify, NotifierLink, SecondaryMMU, apply_cow_reply, notifier_lost, receive_notification,
                                     register, unregister)
from workers.actors.vm_common import _APPLIED, _FAULT_REPLY, _RECORDS, log


class VMNotifierSide:
    """The VM's notifier side (a VMWorker mixin)."""

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
            flags = receive_notification(self.subs, ch.link, f.type, f.sub, f.entries, self.mm.pte)
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
        tr = self.tr
        if tr and len(applied) == 1:        # (as a rule: its records go with its fault's, fault_call)
            sub, typ = applied[0]
            t = time.monotonic_ns()
            self._idle_update(sub)
            t1 = time.monotonic_ns()
            if self._tapplied is not None:
                self.trace_applied()
            self._tapplied = (rep.corr, typ, t, sub.sub, rep.entries[0][0], rep.n, rep.entries[0][1], t1, rep.addr)
        else:
            for sub, typ in applied:
                if tr:
                    tr.recv(self.name, typ.name, self.mm_id, sub.sub, int(rep.entries[0][0]), rep.n, 0,
                            int(rep.entries[0][1]), 0)
                self._idle_update(sub)
            if tr:
                tr.send(self.fault_peer, "APPLIED", self.mm_id, -1, rep.addr, 0, 0, 0, rep.corr)
        if not ch.closed:       # (encode(Msg.APPLIED, mm=, corr=), packed at once)
            ch.send(HEADER.pack(MAGIC, HEADER_SIZE, _APPLIED, 0, 0, self.mm_id, rep.corr, 0, 0, 0))

    def trace_applied(self) -> None:
        """The records of a COW reply applied (the message applied, APPLIED sent) that its fault's record
        did not take (fault_call): as one record of their own."""
        p, self._tapplied = self._tapplied, None
        if p is None:
            return
        corr, typ, t, sub, addr, n, pte, t1, rep_addr = p
        g = self._tgroups.get(typ)
        if g is None:
            g = self._tgroups[typ] = self.tr.group((("recv", self.name, typ.name),
                                                    ("send", self.fault_peer, "APPLIED")))
        mm = self.mm_id
        self.tr.emit(g, t1, t, mm, sub, addr, n, 0, pte, 0, t1, mm, -1, rep_addr, 0, 0, 0, corr)

    def _idle_update(self, sub: SecondaryMMU) -> None:
        """The secondary MMU's idle event follows its in-progress count (WaitIdle waits on it)."""
        if sub.in_progress:
            self.idle[sub.sub].clear()
        else:
            self.idle[sub.sub].set()

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
