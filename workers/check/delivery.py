"""The world's messages and deaths: notifier messages, FAULTs and their replies queued and delivered
(the VM's side through mm/mmu_notifier.py's cores), a kill -9 (generators abandoned, locks dropped
as the kernel drops OFD locks, unread FAULTs lost; a VM's: its channels closed), a VM's notifier loss,
a restart, a dead VM's mm forgotten.

A mixin of KsmWorld (workers.check.world), which holds the state these methods share.
"""
from __future__ import annotations


import numpy as np

from proto.layout import MMH_RELEASED, SUB_ACTIVE
from proto.messages import Msg

from workers.mm.effects import Notify
from workers.mm.fault import serve_fault
from workers.mm.mmu_notifier import (FAILED, GRAMMAR, INIT, LocalNotify, NotifierLink, apply_cow_reply, notifier_lost, receive_notification)
from workers.mm.recovery import victims
from workers.mm.ksm.knobs import loaded_knobs
from workers.mm.ksm.scan import KsmScan
from workers.check.world_common import RECOVER, Thread, VMState, _AwaitForget


class Delivery:
    """Messages, kills and restarts (a KsmWorld mixin)."""

    def _notify(self, t: Thread, e: Notify, rec: dict) -> list:
        src = t.actor
        hs = []
        if self.vms[e.mm].dead:         # its channel is closed: nothing is sent (MMUNotifierSubscriptions.send)
            return hs
        for s in e.subs:
            h = self._new_id()
            self.acks[h] = [1]
            self.queues[(src, e.mm)].append((e.type.name, h, s, e.entries.copy()))
            hs.append(h)
        if hs:
            rec["flow_out"] = hs[0]
        return hs

    def _local_notify(self, v: VMState, e: LocalNotify) -> None:
        """invalidate_range_start/end from the VM itself: applied to each secondary MMU in this step."""
        for sub in e.subs:
            self._grammar(v, sub.sub, e.type.name)
            sub.apply(e.type, e.entries)

    def _reply(self, t: Thread, err: int, msg: str, entries=None):
        """FAULT_REPLY (serve_fault sends exactly one); one carrying a COW's new PTEs returns the handle of
        the VM's APPLIED."""
        t.replied = True
        if self.vms[t.mm].dead:         # to a closed channel: dropped, no APPLIED to wait for
            return []
        h = None
        if entries is not None:         # [(addr, new pte)], as the VM reads it off the wire: one page is a
            h = self._new_id()          # record (a list of its one pair, decode_record), more an n x 2 array
            self.acks[h] = [1]
            entries = [tuple(entries[0])] if len(entries) == 1 else np.array(entries, dtype=np.uint64).reshape(-1, 2)
        self.queues[(t.actor, t.mm)].append(("FAULT_REPLY", t.corr, err, msg, entries, h))
        return [h] if h is not None else []

    def _deliver(self, q, rec: dict) -> None:
        self._dirty = True
        src, dst = q
        item = self.queues[q].popleft()
        kind = item[0]
        rec["flow_in"] = item[1]
        if kind == "FAULT":          # a new handle_mm_fault task in the fault handler
            _, corr, idx, flags = item
            mm = src
            if not self.up[dst]:            # written to a dead fault handler's channel: lost
                self.lost.add(corr)
                return
            if mm not in self.mem.mms:      # (a dead VM's, its mm torn down: nobody is waiting)
                return
            t = Thread(f"{dst}/{corr}", dst, serve_fault(mm, self.mem.mms[mm].npages, idx, flags, self.mode,
                                                         self.early_reply, self.brk, self.cow_reply,
                                                         self.mitigation == "vusion"))
            t.mm, t.corr = mm, corr
            sig = self.vms[mm].sig
            if sig is not None:         # a watched write's fault: its task's effects too
                t.sig = []
                sig["faultd"].append(t.sig)
                sig["threads"].append(t)
            self.threads.append(t)
            self._advance(t, None)
            return
        if kind == "FAULT_REPLY":       # a COW's reply: set_pte_at_notify applied here, then APPLIED
            _, corr, err, msg, entries, h = item
            v = self.vms[dst]
            if entries is not None:
                for sub, typ in apply_cow_reply(list(v.subs.values()), entries, self.mode):
                    self._grammar(v, sub.sub, typ.name, src)
                self.queues[(dst, f"{src}.ack")].append(("ACK", h, 0))
            v.replies[corr] = (err, msg)
            return
        if kind == "ACK":
            _, h, flags = item
            a = self.acks.get(h)
            if a is not None:
                a[0] -= 1
                a.append(flags)
            return
        v = self.vms[dst]                    # a notifier message to one secondary MMU
        _, h, s, entries = item
        self._grammar(v, s, kind, src)
        flags = receive_notification(v.subs, self._link(src, dst), Msg[kind], s, entries, self.mem.mms[dst].pte)
        self.queues[(dst, f"{src}.ack")].append(("ACK", h, flags))

    def _link(self, src: str, mm: int) -> NotifierLink:
        """VM mm's end of notifier src's channel (a new one once the VM handled src's loss)."""
        link = self.links.get((src, mm))
        if link is None or link.lost:
            link = self.links[(src, mm)] = NotifierLink(src)
        return link

    # ---------------------------------------------------------------- kill -9 and recovery
    def _ksmd_thread(self) -> Thread | None:
        for t in self.threads:
            if t.actor == "ksmd" and not t.done:
                return t
        return None

    def _kill(self, target: str) -> None:
        """The process dies between two steps: generators abandoned, locks dropped by the kernel.
        (Any scanner's death takes the others down: the round protocol has no way to take one back.)"""
        self.up[target], self.killed = False, True
        if self.locks[RECOVER] is not None:
            self.coverage["a kill during a recovery"] += 1
        if target not in self.scanner_names + self.faultd_names:
            self._kill_vm(next(v for v in self.vms if v.name == target))
            return
        members = victims([target], self.scanner_names)
        for t in self.threads:
            if t.actor not in members or t.done:
                continue
            self._abandon(t)
            if target in self.faultd_names and not getattr(t, "replied", False):
                self.lost.add(t.corr)
        if target == "ksmd":
            self.shardq.clear()         # the mesh dies with them
        for v in self.vms:
            if v.dead or not any(self._serves(m, v.id) for m in members):
                continue
            self.pending_loss[v.id].update(members)
            if target == self.faultd_of(v.id):      # FAULTs not read yet die with the socket
                for item in self.queues[(v.id, target)]:
                    self.lost.add(item[1])
                self.queues[(v.id, target)].clear()
            for m in members:
                self.queues[(v.id, f"{m}.ack")].clear()

    def _abandon(self, t: Thread) -> None:
        """t's process died between two of its steps: its generators abandoned, its locks dropped (as the
        kernel drops a dead process's OFD locks)."""
        for gen in reversed(t.stack):
            gen.close()
        t.stack, t.done, t.pending = [], True, None
        t.killed = True
        for key, holder in self.locks.items():
            if holder == t.name:
                self.locks[key] = None

    def _kill_vm(self, v: VMState) -> None:
        """A VM's process dies: its writer abandoned (its ptl, or the recover lock of a fork, dropped), its
        secondary MMUs gone with it, its channels closed: what was sent to it is never read, and each ack
        or APPLIED a notifier waits on from it is given up, its subscriber released (driver.wait_acks,
        faultd's on_vm_close); what it sent before its death is still read."""
        v.dead = True
        self.teardowns += 1
        for t in self.threads:
            if t.vm is v and not t.done:
                self._abandon(t)
        mm = self.mem.mms[v.id]
        for src in self.scanner_names + [self.faultd_of(v.id)]:
            for item in self.queues[(src, v.id)]:
                h = item[5] if item[0] == "FAULT_REPLY" else item[1]
                a = self.acks.get(h)
                if a is not None:
                    a[0] -= 1               # (no flags: the subscriber did not answer)
                    if item[0] == "FAULT_REPLY":
                        mm.subs[:, SUB_ACTIVE] = 0
                    else:
                        mm.subs[item[2], SUB_ACTIVE] = 0
                    mm.hdr[MMH_RELEASED] = 1
            self.queues[(src, v.id)].clear()
        self.coverage["a VM killed"] += 1

    def _forget(self, t: Thread, e) -> bool:
        """vm_died's ForgetMM: ksmd's at its next batch boundary (t waits for it: True; a dead ksmd knew
        nothing and its successor is bound to the live VMs only); a fault handler's
        once its tasks of that mm ended (the supervisor's step waits until then): the FAULTs it has not
        read die with the channel."""
        if e.actor == "ksmd":
            if self.up["ksmd"]:         # (dead: its successor knows live VMs only)
                self.exits.append(e.mm)
                t.pending = _AwaitForget(e.mm)
            return self.up["ksmd"]
        self.queues[(e.mm, e.actor)].clear()
        return False

    def _notifier_lost_one(self, v: VMState, target: str) -> None:
        for s, ended in notifier_lost(v.subs, self._link(target, v.id), self.brk).items():
            gk = (target, s)
            for _ in range(ended):
                v.grammar[gk] = GRAMMAR.get((v.grammar.get(gk, GRAMMAR[(INIT, "REGISTER")]), "END"), FAILED)
        self.pending_loss[v.id].discard(target)

    def _restart(self, target: str) -> None:
        self.up[target] = True
        if target in self.faultd_names:
            self._fault_memory(target)      # (a new process: its own allocator, no reserve yet)
        if target != "ksmd":
            return
        old, n = self.scans, len(self.scans)
        self.scans = [KsmScan(self.ft, self.mode, old[0].clock, self.brk, k, n) for k in range(n)]
        self.scan = self.scans[0]
        for sc in self.scans:       # (the knobs from the stats segment, as ksmd's restart loads them)
            sc.knobs.update(loaded_knobs(self.stats.knob, n))
        for k in ("pages_scanned", "pages_skipped"):      # (the stats segment keeps the published sums)
            self.scan.c[k] = sum(sc.c[k] for sc in old)
        self.scan.c["full_scans"] = old[0].c["full_scans"]
        for v in self.vms:      # the supervisor wiped the shared rmap items; it binds the live VMs
            if not v.dead:
                self._add_to_scanners(v.id, self.mem.mms[v.id])
        self.restoring = n - 1
        new = [Thread(f"{self.scanner_names[k]}'", self.scanner_names[k], self.restarted_follower(self.scans[k]))
               for k in range(1, n)] + [Thread("ksmd'", "ksmd", self.restarted_ksmd())]
        for t in new:
            self.threads.append(t)
            self._advance(t, None)

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id
