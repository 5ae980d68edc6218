"""The mmu_notifier core (mm/mmu_notifier.c of the seeds) as seen from a notifying actor.

ksmd and the fault handler change primary PTEs of an mm; every secondary MMU
registered on that mm (the subscriber table in the mm segment) must hear of it
and acknowledge before the change counts as done: the kernel's callbacks are
synchronous.  `MMUNotifier` sends one frame per subscriber and waits for all
acks, with a timeout; a subscriber that does not answer in time is released
(marked inactive), never waited on forever.

`set_ptes_notify` is the one place that knows the three notifier modes:

    change_pte  (2.6.32-3.6)  set PTEs; CHANGE_PTE (or INVALIDATE_PAGE for a
                              subscriber without change_pte)
    wrapped     (3.7-6.9)     START; set PTEs; CHANGE_PTE; END
    invalidate  (6.10-)       START; set PTEs; END
"""
from __future__ import annotations

import asyncio
import logging

import numpy as np

from proto.layout import MMH_RELEASED, SUB_ACTIVE, SUB_CHANGE_PTE, MMView
from proto.channel import expire_after
from proto.messages import Msg, encode

log = logging.getLogger("ksm_proto.notifier")

MODES = ("change_pte", "wrapped", "invalidate")


class MMUNotifier:
    """Notifies the secondary MMUs of one mm over that mm's channel to this actor."""

    def __init__(self, actor: str, peer: str, mm: MMView, channel, mode: str, tracer=None,
                 timeout: float = 5.0):
        if mode not in MODES:
            raise ValueError(f"notifier mode {mode!r} is not one of {MODES}")
        self.actor = actor
        self.peer = peer
        self.mm = mm
        self.mm_id = mm.id
        self.ch = channel
        self.mode = mode
        self.tr = tracer
        self.timeout = timeout
        self.sent = {m: 0 for m in (Msg.START, Msg.END, Msg.CHANGE_PTE, Msg.INVALIDATE_PAGE, Msg.CLEAR_YOUNG)}

    def subscribers(self) -> list[tuple[int, bool]]:
        return [(s, bool(row[SUB_CHANGE_PTE])) for s, row in enumerate(self.mm.subs.tolist()) if row[SUB_ACTIVE]]

    def _send(self, type: Msg, entries: np.ndarray, subs: list[int]) -> list:
        """Send one frame per subscriber; returns what _wait needs."""
        if not subs or self.ch is None or self.ch.closed:
            return []
        sent = []
        addr0 = int(entries[0, 0]) if len(entries) else 0
        for s in subs:
            corr = self.ch.next_corr()
            if self.tr:
                self.tr.send(self.peer, type.name, self.mm_id, s, addr0, len(entries), 0,
                             int(entries[0, 1]) if len(entries) else 0, corr)
            sent.append((type, s, corr, addr0, self.ch.request(corr, encode(type, sub=s, mm=self.mm_id, corr=corr,
                                                                           addr=addr0, entries=entries))))
        self.sent[type] += len(entries) * len(subs)
        return sent

    async def _wait(self, sent: list) -> list:
        """Wait for the acks of frames sent; a subscriber that does not answer in time is released."""
        if not sent:
            return []
        timer = expire_after([f for *_, f in sent], self.timeout, "no ack")
        acks = []
        try:
            for type, s, corr, addr0, f in sent:
                try:
                    ack = await f
                except (asyncio.TimeoutError, ConnectionError):
                    if self.ch is not None:
                        self.ch.pending.pop(corr, None)
                    self.release(s, f"no ack to {type.name} within {self.timeout:.1f}s")
                    continue
                if self.tr:
                    self.tr.recv(self.peer, "ACK", self.mm_id, s, addr0, 0, 0, 0, corr)
                acks.append(ack)
        finally:
            timer.cancel()
        return acks

    async def _broadcast(self, type: Msg, entries: np.ndarray, subs: list[int]) -> list:
        return await self._wait(self._send(type, entries, subs))

    def release(self, sub: int, why: str) -> None:
        """Unregister a subscriber that stopped answering (the mm's other subscribers go on)."""
        if self.mm.subs[sub, SUB_ACTIVE]:
            log.error("%s: releasing secondary MMU %d of mm %d: %s", self.actor, sub, self.mm_id, why)
            self.mm.subs[sub, SUB_ACTIVE] = 0
            self.mm.hdr[MMH_RELEASED] = 1

    async def invalidate_range_start(self, entries):
        await self._broadcast(Msg.START, entries, [s for s, _ in self.subscribers()])

    async def invalidate_range_end(self, entries):
        await self._broadcast(Msg.END, entries, [s for s, _ in self.subscribers()])

    async def change_pte(self, entries, fallback: bool):
        subs = self.subscribers()
        await self._broadcast(Msg.CHANGE_PTE, entries, [s for s, c in subs if c])
        if fallback:
            await self._broadcast(Msg.INVALIDATE_PAGE, entries, [s for s, c in subs if not c])

    async def clear_flush_young(self, entries) -> bool:
        acks = await self._broadcast(Msg.CLEAR_YOUNG, entries, [s for s, _ in self.subscribers()])
        return any(a.flags for a in acks)

    async def set_ptes_notify(self, idx: np.ndarray, new_ptes: np.ndarray, addrs: np.ndarray,
                              early=None) -> None:
        """Set mm.pte[idx] = new_ptes and tell every secondary MMU, in this Machine's mode.

        The caller holds the mm's page-table lock and keeps it until this returns (all acks
        in).  `early`, if given, is called once the last notification is on its way, before
        the acks: the fault handler sends its FAULT_REPLY there, which reaches the faulting
        VM after the notifications on the same channel.
        """
        entries = np.empty((len(idx), 2), dtype=np.uint64)
        entries[:, 0] = addrs
        entries[:, 1] = new_ptes
        subs = self.subscribers()
        with_cp = [s for s, c in subs if c]
        if self.mode != "change_pte":
            await self._broadcast(Msg.START, entries, [s for s, _ in subs])
            subs = self.subscribers()
        ch = self.ch
        if ch is not None:
            ch.cork()
        try:
            self.mm.pte[idx] = new_ptes
            if self.mode == "change_pte":
                sent = self._send(Msg.CHANGE_PTE, entries, with_cp)
                sent += self._send(Msg.INVALIDATE_PAGE, entries, [s for s, c in subs if not c])
            else:
                sent = self._send(Msg.CHANGE_PTE, entries, with_cp) if self.mode == "wrapped" else []
                sent += self._send(Msg.END, entries, [s for s, _ in subs])
            if early is not None:
                early()
        finally:
            if ch is not None:
                ch.uncork()
        await self._wait(sent)
