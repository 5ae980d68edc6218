"""The world's steps as the explorer sees them: which steps are enabled (a lock free, acks in, a
reply come, a freeze reached...), each with its footprint (what it reads and writes, for the
partial-order reduction), and taking one.

A mixin of KsmWorld (workers.check.world), which holds the state these methods share.
"""
from __future__ import annotations




from workers.mm.kvm import FaultCall, WaitIdle
from workers.mm.effects import (Lock, Notify, Reply, ShardReady, ShardRecv, WaitAcks)
from workers.mm.recovery import ForgetMM, Freeze, NotifierLost, Respawn, Thaw
from workers.check.world_common import Step, Thread, _AwaitForget, _AwaitReply, _AwaitRestore, _AwaitScan, _Boundary, _Kill, _Micro


class Scheduling:
    """Enabled steps and their footprints (a KsmWorld mixin)."""

    # ---------------------------------------------------------------- the World interface
    def enabled(self) -> list[Step]:
        if self._enabled is not None:
            return self._enabled
        steps = self._enabled = []
        for t in self.threads:
            if t.done or not self._runnable(t):
                continue
            steps.append(Step(t.actor, f"{t.name}: {t.pending!r}", self._footprint(t), t))
        for q, dq in self.queues.items():
            if dq:
                steps.append(Step(self._queue_actor(q), f"deliver {dq[0][0]}", (((("chan",) + q), "w"),)
                                  + self._delivery_footprint(q), q))
        return steps

    def take(self, i: int) -> dict:
        step = self.enabled()[i]
        self._enabled = None
        self.clock_steps += 1
        rec = {"actor": step.actor, "label": step.label, "args": {}}
        if isinstance(step.run, Thread):
            self._run_thread(step.run, rec)
        else:
            self._deliver(step.run, rec)
        return rec

    # ---------------------------------------------------------------- steps
    def _runnable(self, t: Thread) -> bool:
        e = t.pending
        c = e.__class__
        if c is Lock:
            held = self.locks[e.key]
            if e.key[0] == "ksm" and held is not None and held != t.name:
                self.coverage["the other scanner was merging into the same mm"] += 1
            return held is None
        if c is WaitAcks:
            return all(self.acks[h][0] == 0 for hs in e.handles for h in hs)
        if c is WaitIdle:
            return e.sub.in_progress == 0 or e.sub.released
        if c is _AwaitReply:
            fd = self.faultd_of(t.vm.id)
            return e.corr in t.vm.replies or (e.corr in self.lost and self.up[fd]
                                              and fd not in self.pending_loss[t.vm.id])
        if c is _AwaitScan:
            return self.scan.c["full_scans"] >= e.n
        if c is _Micro and e.enabled is not None:
            return e.enabled()
        if c is ShardRecv:
            return self._shard_ready(t.actor, e)
        if c is _Boundary:
            return not self.frozen
        if c is Freeze:
            k = self._ksmd_thread()
            return k is None or k.done or isinstance(k.pending, _Boundary)
        if c is NotifierLost:
            return not self.queues[(e.peer, e.mm)]
        if c is _Kill:          # (the second kill: of a live actor, once the first has died; a VM's while
            k = self._ksmd_thread()     # ksmd runs, which forgets it: the world's run ends with ksmd's)
            return self.up[e.target] and (t.name == "supervisor" or self.killed) and (
                e.target in self.scanner_names + self.faultd_names or (k is not None and not k.done))
        if c is _AwaitRestore:
            return self.restoring == 0
        if c is _AwaitForget:           # (or ksmd died meanwhile: its successor knows live VMs only)
            return e.mm not in self.exits or not self.up["ksmd"]
        if c is ForgetMM and e.actor != "ksmd":     # (the fault handler has ended its tasks of that mm)
            return not any(u.actor == e.actor and getattr(u, "mm", None) == e.mm and not u.done
                           for u in self.threads)
        return True

    def _scanner_no(self, name: str) -> int:
        return self.scanner_names.index(name)

    def _shard_ready(self, me: str, e) -> bool:
        """Would e (a ShardRecv or ShardReady of scanner me) find a message from each of its sources?"""
        return all(self._shard_head(src, me, e) is not None for src in e.srcs)

    def _shard_head(self, src: int, me: str, e: ShardRecv):
        """The message e would take from scanner src (older rounds' dropped first), or None."""
        q = self.shardq[(src, self._scanner_no(me), e.kind)]
        while q and e.seq is not None and q[0].seq < e.seq:
            q.popleft()
        return q[0] if q else None

    def _footprint(self, t: Thread) -> tuple:
        e = t.pending
        fp = tuple(e.footprint())
        c = e.__class__
        if t.vm is not None:
            fp += ((("vm", t.vm.id), "w"),)
        if t.actor in self.scanner_names:
            fp += ((("ft",), "r"), (("scans",), "w"), (("rmap",), "w"))
        if c is ShardRecv or c is ShardReady:
            fp += ((("shardq", self._scanner_no(t.actor)), "w"),)
        if c is _AwaitScan:
            fp += ((("scans",), "r"),)
        if c is WaitAcks:
            fp += ((("acks", t.actor), "r"),)
        elif c is Notify:
            fp += (((("chan", t.actor.split("/")[0], e.mm)), "w"),)
        elif c is FaultCall:
            fp += ((("chan", t.vm.id, self.faultd_of(t.vm.id)), "w"),)
        elif c is Reply:
            fp += ((("chan", t.actor, t.mm), "w"),)
        elif c is _AwaitReply:
            fp += ((("chan", t.vm.id, self.faultd_of(t.vm.id)), "w"), (("up",), "r"))
        elif c in (_Kill, Respawn, Freeze, Thaw, _Boundary, ForgetMM):    # the kill and restart touch everything
            fp += ((("up",), "w"), (("ft",), "w"), (("scans",), "w"), (("frozen",), "w")) + tuple(
                (k, "w") for k in self.locks) + tuple(((("chan",) + q), "w") for q in self.queues) + tuple(
                (("vm", v.id), "w") for v in self.vms) + tuple((("acks", a), "w")
                                                               for a in self.scanner_names + self.faultd_names)
        return fp

    def _queue_actor(self, q) -> str:
        """Each channel delivers on its own track, so a scheduler can hold one back and not another."""
        src, dst = q
        if isinstance(dst, int):
            return f"{self.vms[dst].name}/from-{src}"
        return f"{dst.split('.')[0]}/from-{self.vms[src].name}"

    def _delivery_footprint(self, q) -> tuple:
        src, dst = q
        if isinstance(dst, int):
            return ((("vm", dst), "w"),)
        if dst.endswith(".ack"):
            return ((("acks", dst.split(".")[0]), "w"),)
        return ()
