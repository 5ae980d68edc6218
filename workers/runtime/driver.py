"""Running protocol cores in an actor: effects against shared memory, locks and notifier channels.

The cores (workers/mm/) yield effects; `Driver` is an actor's backend of the one interpreter
(runtime/interp.py), and `Driver.run` runs a core through it on asyncio/uvloop, awaiting
what cannot be answered at once (`Driver.wait`):

  * memory effects: mm.effects.APPLY_MEM on the run's shared memory;
  * TryLock / Lock / Unlock: the page-table locks (Lock polls with a backoff and
    throws TimeoutError into the core after its timeout, whose finally blocks then
    release what it held);
  * Notify: one frame per subscriber on the mm's channel to this actor (`MMUNotifierSubscriptions`),
    corked until the next wait so back-to-back messages leave in one write;
  * WaitAcks: every ack, with a timeout; a subscriber that does not answer in time is
    released (unregistered), never waited on forever;
  * Reply: the caller's callback (the fault handler's FAULT_REPLY; for a reply carrying a COW's
    PTEs it returns the WaitAcks handle of the VM's APPLIED);
  * ShardSend / ShardRecv: messages to and from the other scanners (`shards`, the
    scanner's mesh: ksmd.py), every wait bounded;
  * anything else: the caller's `other` coroutine, if given (the VM worker's LocalNotify
    and FaultCall).

An exception from a memory effect (out of frames, an accounting error) is thrown into
the core at the effect that caused it, so the core's own cleanup runs.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time

from proto.channel import expire_after
from proto.layout import MMH_RELEASED, SUB_ACTIVE, MMView
from proto.messages import Msg, call_payload, encode

from workers.mm.effects import Lock, Memory, Notify, Reply, ShardReady, ShardRecv, ShardSend, TryLock, Unlock, WaitAcks
from workers.runtime.interp import BLOCK, Backend, run_until_blocked
from workers.mm.mmu_notifier import MODES

log = logging.getLogger("ksm_proto.notifier")

__all__ = ["MODES", "MMUNotifierSubscriptions", "Driver", "lock_ptl"]


async def lock_ptl(ptl, timeout: float) -> None:
    """Take a page-table (or ksm) lock without blocking the event loop: trylock, then back off up to 1 ms."""
    if ptl.try_acquire():
        return
    deadline = time.monotonic() + timeout
    delay = 0.00002
    while not ptl.try_acquire():
        if time.monotonic() > deadline:
            raise TimeoutError(f"page-table lock {ptl.name} busy for {timeout:.1f}s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.001)


class MMUNotifierSubscriptions:
    """The channel from this actor to one mm's secondary MMUs (they live in the VM worker)."""

    def __init__(self, actor: str, peer: str, mm: MMView, channel, tracer=None, timeout: float = 5.0):
        self.actor = actor
        self.peer = peer
        self.mm = mm
        self.mm_id = mm.id
        self.ch = channel
        self.tr = tracer
        self.timeout = timeout
        self.sent = {m: 0 for m in (Msg.START, Msg.END, Msg.CHANGE_PTE, Msg.INVALIDATE_PAGE, Msg.CLEAR_YOUNG)}

    def send(self, type: Msg, entries, subs) -> list:
        """One frame per subscriber; returns the handles WaitAcks needs."""
        ch = self.ch
        if not subs or ch is None or ch.closed:
            return []
        ch.cork()
        sent = []
        addr0 = int(entries[0, 0]) if len(entries) else 0
        for s in subs:
            corr = ch.next_corr()
            if self.tr:
                self.tr.send(self.peer, type.name, self.mm_id, s, addr0, len(entries), 0,
                             int(entries[0, 1]) if len(entries) else 0, corr)
            sent.append((self, type, s, corr, addr0, ch.request(corr, encode(type, sub=s, mm=self.mm_id, corr=corr,
                                                                               addr=addr0, entries=entries))))
        self.sent[type] += len(entries) * len(subs)
        return sent

    def release_all(self, why: str) -> None:
        for sub in range(len(self.mm.subs)):
            self.release(sub, why)

    def release(self, sub: int, why: str) -> None:
        """Unregister a subscriber that stopped answering (the mm's other subscribers go on)."""
        if self.mm.subs[sub, SUB_ACTIVE]:
            log.error("%s: releasing secondary MMU %d of mm %d: %s", self.actor, sub, self.mm_id, why)
            self.mm.subs[sub, SUB_ACTIVE] = 0
            self.mm.hdr[MMH_RELEASED] = 1


async def wait_acks(sent: list) -> list[int]:
    """The ack flags of every frame sent; a subscriber that does not answer in time is released."""
    if not sent:
        return []
    for n in {h[0] for h in sent}:
        if n.ch is not None:
            n.ch.uncork()
    timer = expire_after([h[-1] for h in sent], max(h[0].timeout for h in sent), "no ack")
    acks = []
    try:
        for n, type, s, corr, addr0, f in sent:
            try:
                ack = await f
            except (asyncio.TimeoutError, ConnectionError):
                if n.ch is not None:
                    n.ch.pending.pop(corr, None)
                if s is None:       # a COW reply the VM did not say it applied: all its secondary MMUs
                    n.release_all(f"no APPLIED for the COW reply {corr} within {n.timeout:.1f}s")
                else:
                    n.release(s, f"no ack to {type.name} within {n.timeout:.1f}s")
                continue
            if n.tr:
                n.tr.recv(n.peer, "ACK" if s is not None else "APPLIED", n.mm_id, -1 if s is None else s, addr0,
                          0, 0, 0, corr)
            acks.append(ack.flags)
    finally:
        timer.cancel()
    return acks


class Driver(Backend):
    """An actor's backend of the one interpreter (runtime/interp.py), and its waits on the event loop
    (see the module docstring)."""

    name = "an actor"

    def __init__(self, mem: Memory, ptls: dict, notifiers: dict, lock_timeout: float, ksm_locks: dict | None = None,
                 shards=None):
        super().__init__(mem, {TryLock: self._trylock, Lock: self._lock, Unlock: self._unlock,
                               Notify: self._notify, ShardSend: self._shard_send, ShardReady: self._shard_ready})
        self.ptls = ptls                # mm id -> page-table lock
        self.notifiers = notifiers      # mm id -> MMUNotifierSubscriptions (absent: nobody to notify yet)
        self.lock_timeout = lock_timeout
        self.ksm_locks = {} if ksm_locks is None else ksm_locks    # mm id -> the scanners' ksm lock
        self.shards = shards            # the scanner mesh: send(dst, kind, msg), async recv(kind, srcs, seq)
        self.corked: set = set()        # channels whose notifier messages wait for the next wait
        self.tr = None                  # a proto.trace.Tracer: the waits below become spans

    def lock(self, key):
        return self.ptls[key[1]] if key[0] == "ptl" else self.ksm_locks[key[1]]

    # ---- the ops answered at once (anything else, WaitAcks and ShardRecv included, waits: `fallback`)
    def fallback(self, e):
        return BLOCK

    def _trylock(self, e):
        return self.lock(e.key).try_acquire()

    def _lock(self, e):
        return None if self.lock(e.key).try_acquire() else BLOCK

    def _unlock(self, e):
        self.lock(e.key).release()

    def _notify(self, e):
        n = self.notifiers.get(e.mm)
        if n is None:
            return []
        if n.ch is not None:
            self.corked.add(n.ch)
        return n.send(e.type, e.entries, e.subs)

    def _shard_send(self, e):
        self.shards.send(e.dst, e.kind, e.msg)

    def _shard_ready(self, e):
        self.uncork()           # (a scanner that polls is as good as waiting: its messages go now)
        return self.shards.ready(e.kind, e.srcs, e.seq)

    def uncork(self) -> None:
        """The notifier messages sent since the last wait leave (back-to-back ones in one write)."""
        for ch in self.corked:
            ch.uncork()
        self.corked.clear()

    # ---- running a core
    async def run(self, gen, reply=None, observe=None, other=None, first=None):
        """Drive gen to its end; returns its value (its exception propagates).  observe(effect), if
        given, sees each effect before it runs (tracing).  reply(effect): the Reply effect's answer.
        other: an async callable for effects this driver does not know (its result is sent back, its
        exception thrown into the core).  first: the effect gen already yielded (a core another
        runner started and handed over here: faultd's fast path)."""
        send, exc = None, None
        try:
            if first is not None:
                if observe is not None:
                    observe(first)
                send, exc = await self.wait(first, reply, other)
            while True:
                e, value = run_until_blocked(gen, self, send, exc, observe)
                if e is None:
                    return value
                send, exc = await self.wait(e, reply, other)
        finally:
            self.uncork()

    async def wait(self, e, reply=None, other=None):
        """An effect the ops could not answer at once: (its result, None), or (None, the exception to
        throw into the core)."""
        c = e.__class__
        if c is Reply:
            return (reply(e) if reply is not None else []), None
        self.uncork()
        if c is WaitAcks:
            return await wait_acks([h for hs in e.handles for h in hs]), None
        if c is Lock:
            t0 = time.monotonic_ns()
            try:
                await lock_ptl(self.lock(e.key), self.lock_timeout)
                return None, None
            except TimeoutError as x:
                return None, x
            finally:
                if self.tr is not None:       # (a lock another actor held: who waited how long, on what)
                    self.tr.span(f"wait_{e.key[0]}_lock", t0, time.monotonic_ns(), mm=e.key[1])
        if c is ShardRecv:
            t0 = time.monotonic_ns()
            try:
                return await self.shards.recv(e.kind, e.srcs, e.seq), None
            except TimeoutError as x:
                return None, x
            finally:
                if self.tr is not None:       # (the scanners' barriers: waiting for the others' part)
                    self.tr.span(f"wait_{e.kind}", t0, time.monotonic_ns())
        if other is not None:
            try:
                return await other(e), None
            except Exception as x:      # thrown into the core: its cleanup runs
                return None, x
        return None, TypeError(f"effect {e!r} has no driver here")


async def bind_vm_channel(actor, mm_id: int, name: str, fd: int, protocol_factory, attach_more=None):
    """Bind the channel end `fd` the supervisor passed to mm mm_id, for a notifier actor (ksmd, faultd):
    once, ever (mm ids are never reused; a second end is refused, counted and closed), attaching the
    mm's memory and ptl first if the actor does not have them.  Returns (channel, whether the mm was
    new to the actor).  `actor` has name, bound, memory, mem, ptls and refuse().  attach_more(mm_id, mm),
    if given, attaches what else the actor keeps per mm (ksmd: its rmap items and ksm lock); if it
    fails, nothing of the mm is kept."""
    if mm_id in actor.bound:
        os.close(fd)
        actor.refuse(f"a second channel for mm {mm_id} ({name})")
        raise OSError(errno.EBUSY, f"mm {mm_id} already has a channel to {actor.name}")
    new = mm_id not in actor.memory.mms
    if new:
        try:
            mm, ptl = actor.mem.attach_mm(mm_id)
        except BaseException:
            os.close(fd)
            raise
        if attach_more is not None:
            try:
                attach_more(mm_id, mm)
            except BaseException:
                os.close(fd)
                ptl.close()
                raise
        actor.memory.mms[mm_id] = mm
        actor.ptls[mm_id] = ptl
    actor.bound.add(mm_id)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    _, ch = await asyncio.get_running_loop().create_connection(protocol_factory, sock=sock)
    return ch, new


def answer_hello(actor, ch, f) -> None:
    """A VM's HELLO on the channel of its mm, for a notifier actor (ksmd, faultd): ACK, once (the VM
    registers its secondary MMUs after it); a second HELLO, or one naming another mm, is refused,
    counted (actor.refuse) and answered EPERM."""
    if ch.hello or f.mm != ch.peer:
        why = "a second HELLO" if ch.hello else f"HELLO for mm {f.mm}"
        actor.refuse(f"{why} on the channel of mm {ch.peer}")
        ch.send(encode(Msg.REPLY, mm=f.mm, corr=f.corr, payload=call_payload(
            {"errno": errno.EPERM, "error": f"{why} on the channel of mm {ch.peer}: refused"})))
        return
    ch.hello = True
    ch.send(encode(Msg.ACK, mm=f.mm, corr=f.corr))
