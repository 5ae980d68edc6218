"""ksmd's control side: the knobs (the sysfs rules of mm/ksm/knobs.py, run here), attaching an mm and its rmap items, the
supervisor's calls (freeze, thaw, restore, mm_exit, info).

A mixin of Ksmd (workers.actors.ksmd), which holds the state these methods share.
"""
from __future__ import annotations

import asyncio
import errno


from proto.channel import Channel
from proto.layout import KNOBS, MAX_MMS
from proto.messages import Frame, Msg, call_payload, encode

from workers.runtime.actor import receive_fd, req_int
from workers.runtime.frames import OutOfFrames, ShmLock
from workers.mm.ksm.knobs import SetKnob, UnmergeAll, set_knobs
from workers.mm.ksm.stable_tree import RmapItems
from workers.runtime.driver import MMUNotifierSubscriptions, answer_hello, bind_vm_channel
from workers.actors.ksmd_common import FOLLOWER_OPS, log


class KsmdControl:
    """ksmd's knobs and control calls (a Ksmd mixin)."""

    def set_knob_value(self, name: str, v: int) -> None:
        self.knobs[name] = v
        self.stats.knobs[KNOBS.index(name)] = v

    async def set_knobs(self, knobs: dict) -> None:
        """The knob rules of mm/ksm/knobs.py, their effects performed here."""
        await self.driver.run(set_knobs(self.scan, knobs), other=self._knob_effect)
        self.wake.set()

    async def _knob_effect(self, e) -> None:
        if e.__class__ is SetKnob:
            self.set_knob_value(e.name, e.value)
        elif e.__class__ is UnmergeAll:
            await self.unmerge_all()
        else:
            raise TypeError(f"effect {e!r} has no driver in ksmd's knobs")

    # ------------------------------------------------------------------ channels and main loop
    def attach_rmap(self, mm_id: int, mm) -> None:
        """What ksmd keeps per mm beside its memory and ptl: the mm's rmap items and ksm lock."""
        self.rmaps[mm_id] = self.mem.attach_rmap(mm_id, mm.npages)
        self.ksm_locks[mm_id] = ShmLock.ksm(self.args.run, mm_id)

    async def attach_mm(self, mm_id: int, name: str, fd: int) -> None:
        """Bind a channel end the supervisor passed to mm mm_id: once, ever (mm ids are not reused)."""
        ch, new = await bind_vm_channel(self, mm_id, name, fd, lambda: Channel(f"{self.name}<-{name}", self.on_vm_frame),
                                        self.attach_rmap)
        if new:
            self.scan.add_mm(mm_id, self.memory.mms[mm_id], RmapItems(self.rmaps[mm_id]))
        ch.peer, ch.hello = mm_id, False
        self.notifiers[mm_id] = MMUNotifierSubscriptions(self.name, name, self.memory.mms[mm_id], ch, self.tr,
                                            self.args.ack_timeout)

    def refuse(self, what: str) -> None:
        self.refused += 1
        log.error("%s: refused %s", self.name, what)

    def on_vm_frame(self, ch: Channel, f: Frame) -> None:
        if f.type != Msg.HELLO:         # (the acks are read by the channel: nothing else comes from a VM)
            self.refuse(f"message type {f.type} on the channel of mm {ch.peer}")
            return
        answer_hello(self, ch, f)       # the VM registers its secondary MMUs after the ACK

    def info(self) -> dict:
        sc = self.scan
        rs = sc.reports.values()
        return {"metadata_bytes": sc.metadata_bytes(), "merges": sc.merges + sum(r.get("merges", 0) for r in rs),
                "merge_failures": sc.merge_failures + sum(r.get("merge_failures", 0) for r in rs),
                "scan_errors": self.scan_errors, "scanners": self.nshards,
                "slots": len(sc.slots), "tree_bytes": sc.tree.nbytes, "unstable_bytes": sc.unstable.nbytes,
                "rmap_bytes": sum(s.items.nbytes for s in sc.slots.values()), "refused": self.refused,
                "hash_ahead": sc.ahead, **{k: v + sum(r.get(k, 0) for r in rs) for k, v in sc.ahead_stats.items()}}

    def _thaw(self, why: str) -> None:
        if self.frozen is not None:
            if why:
                log.error("%s: %s", self.name, why)
            self.frozen.cancel()
            self.frozen = None
            self.batch_lock.release()

    async def restore(self) -> None:
        """After a restart: this scanner's shard of the stable tree and the rmap items of its merged
        pages, from shared memory (the supervisor restores the followers before the leader)."""
        async with self.batch_lock:
            self.load_stats()
            n = await self.driver.run(self.scan.restore())
            log.warning("%s: restarted; %d KSM pages and their rmap items rebuilt from shared memory", self.name, n)
            if self.shard == 0:
                if self.knobs["run"] == 2:      # the dead ksmd may have been unmerging: finish it
                    try:
                        await self.unmerge_all()
                    except (OutOfFrames, TimeoutError) as e:
                        log.error("ksmd: run=2 could not unmerge everything after the restart: %s", e)
                self.publish()
        self.restored.set()
        self.wake.set()

    async def on_ctl(self, ch: Channel, f: Frame) -> None:
        reply: dict = {}
        try:
            req = f.json()
            op = req.get("op")
            if self.shard != 0 and op not in FOLLOWER_OPS:
                raise OSError(errno.EINVAL, f"{self.name} serves the leader; ask ksmd (scanner 0)")
            if op == "freeze":        # outside batch_lock: freeze takes it and keeps it until thaw
                for_s = float(req_int(req, "for_s", 60, 1, 3600))
                if self.frozen is None:
                    await self.batch_lock.acquire()
                else:                 # frozen already: the timeout starts again (the supervisor renews it
                    self.frozen.cancel()    # right before its repair, which must not meet a thawed ksmd)
                self.frozen = asyncio.get_running_loop().call_later(
                    for_s, self._thaw, "thawed: the supervisor did not thaw within the freeze timeout")
            elif op == "thaw":
                self._thaw("")
            elif op == "restore":
                await self.restore()
            else:
                await self.on_ctl_locked(req, op, reply)
        except OSError as e:
            reply = {"errno": e.errno or errno.EINVAL, "error": e.strerror or str(e)}
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            reply = {"errno": errno.EINVAL, "error": f"bad request: {e!r}"}
        except Exception as e:      # a bug: the supervisor hears of it, ksmd goes on
            log.exception("%s: control request failed", self.name)
            reply = {"errno": errno.EIO, "error": f"{self.name}: internal error: {e!r}"}
        if not ch.closed:
            ch.send(encode(Msg.REPLY, corr=f.corr, payload=call_payload(reply)))

    async def on_ctl_locked(self, req: dict, op, reply: dict) -> None:
        async with self.batch_lock:
            if op == "attach_mm":
                mm_id = req_int(req, "mm", None, 0, MAX_MMS - 1)
                name = str(req.get("name", f"vm:{mm_id}"))
                await self.attach_mm(mm_id, name, receive_fd(self.fd_sock, req_int(req, "seq"), f"mm {mm_id}"))
            elif op == "set_knobs":
                knobs = req["knobs"]
                if not isinstance(knobs, dict):
                    raise OSError(errno.EINVAL, f"knobs must be an object, not {knobs!r}")
                await self.set_knobs(knobs)
            elif op == "mm_exit":
                await self.ksm_exit(req_int(req, "mm"))
            elif op == "info":
                reply.update(self.info())
            elif op == "ping":
                pass
            else:
                raise OSError(errno.EINVAL, f"unknown ksmd op {op!r}")
