"""The supervisor's watch and recovery: a dead VM torn down (mm/recovery.py's vm_died, through
supervisor_mm's _exit_mm); a dead scanner or fault handler replaced by
the recovery program of mm/recovery.py, whose effects are control calls here (freeze, each VM's
notifier_lost, thaw, respawn from a spare started beforehand), the repair and exit_mmap run under
every ptl; calls on a dead actor wait for its successor.

A mixin of Machine (workers.actors.supervisor), which holds the state these methods share.
"""
from __future__ import annotations

import errno
import time


from proto.channel import ChannelClosed
from proto.layout import (MMView, RmapView, Segment, seg_name)

from workers.mm.effects import APPLY_MEM, Lock, Memory, Unlock
from workers.runtime.interp import Backend, run_sync
from workers.mm.recovery import Freeze, NotifierLost, Respawn, Thaw, recover
from workers.mm.repair import repair_frames
from workers.actors.supervisor_common import ActorProcess, MAX_RESTARTS, RESTART_WINDOW, log


class Recovery:
    """Watch and recovery (a Machine mixin)."""

    def _watch(self) -> None:
        """Notice actors that die: a dead VM's mm is torn down, a dead ksmd or fault handler replaced.

        (It lives until close() has stopped every actor: the actors it restarted die with the
        thread that started them, PR_SET_PDEATHSIG.)
        """
        while not self.watch_stop.wait(0.05):
            if self.closed:
                continue
            for vm in list(self.vms.values()):
                if vm.alive and vm.actor.proc.poll() is not None and not vm.actor.expected_exit:
                    log.error("VM %s (pid %d) died with status %s: freeing its frames", vm.name, vm.pid,
                              vm.actor.proc.returncode)
                    t0 = time.monotonic()
                    rec = {"dead": [f"vm:{vm.name}"], "seen": time.time(), "phases": {}, "serving_s": None,
                           "repair": None}
                    try:        # (mm/recovery.py's vm_died: ksmd and its fault handler forget it, exit_mmap)
                        rec["repair"] = self._teardown_vm(vm, died=True)
                        rec["serving_s"] = round(time.monotonic() - t0, 4)     # (its frames are free again)
                    except Exception:
                        log.exception("tearing down dead VM %s", vm.name)
                    self.recoveries.append(rec)
                    self.dead_vms.append(vm.name)
            dead = [n for n, a in list(self.actors.items()) if a.proc.poll() is not None and not a.expected_exit]
            if dead and not self.closed:
                try:
                    self._recover(dead)
                except Exception:
                    log.exception("recovering from the death of %s", " and ".join(dead))

    def _group(self, name: str) -> str:
        """What restarts together with actor `name`: every scanner ("ksmd"), or that fault handler."""
        return "ksmd" if name in self.scanner_names else name

    def actor_call(self, name: str, op: str, timeout: float | None = None, **kw) -> tuple[dict, bytes]:
        """A control call on ksmd or a fault handler that outlives their deaths.

        A call that finds the actor dead waits for the supervisor to replace it and is sent
        again to the successor (every such call is idempotent); OSError(EIO) once the actor
        is really gone, TimeoutError if it is not back within the timeout.
        """
        timeout = timeout or self.call_timeout
        deadline = time.monotonic() + timeout
        group = self._group(name)
        while True:
            if group in self.gone:
                raise OSError(errno.EIO, f"{name} is gone: {self.gone[group]}")
            if self.closed and not self.ready[name].is_set():
                raise OSError(errno.ESRCH, "machine is closed")
            left = deadline - time.monotonic()
            if left <= 0 or not self.ready[name].wait(left):
                raise TimeoutError(f"{name} was not back within {timeout:.0f}s")
            actor = self.actors[name]
            try:
                return actor.call(op, max(0.1, deadline - time.monotonic()), **kw)
            except ChannelClosed:
                if self.closed:
                    raise OSError(errno.ESRCH, "machine is closed") from None
                log.warning("%s died during %s: waiting for its successor", name, op)
                while self.actors[name] is actor and self.ready[name].is_set() and time.monotonic() < deadline \
                        and group not in self.gone and not self.closed:
                    time.sleep(0.01)        # until the watcher has seen the death

    def _recover(self, dead: list[str]) -> None:
        """Replace dead scanners / fault handlers, repairing what they left half done.

        The scanners are restarted together: a dead scanner takes the others down with it (the
        round protocol has no way to take one back into a mesh, and each owns a shard of the
        trees the others' rmap items point into).  A fault handler is restarted alone."""
        seen = time.monotonic()
        rec = {"dead": list(dead), "pids": [self.actors[n].pid for n in dead], "seen": time.time(), "phases": {},
               "serving_s": None, "repair": None}
        last = [seen]

        def mark(what):     # (a phase's seconds, summed over its steps: the freeze and its renewal, say)
            now = time.monotonic()
            rec["phases"][what] = round(rec["phases"].get(what, 0) + now - last[0], 4)
            last[0] = now
        with self.recover_lock:
            now = time.monotonic()
            groups = list(dict.fromkeys(self._group(n) for n in dead))
            victims = [n for g in groups for n in (self.scanner_names if g == "ksmd" else [g])]
            for name in victims:
                self.ready[name].clear()
                a = self.actors[name]
                a.expected_exit = True
                if name in dead:
                    log.error("%s (pid %d) died with status %s: replacing it", name, a.pid, a.proc.returncode)
                else:       # (killed, not asked: it may be waiting on the dead one; the repair follows)
                    log.error("%s (pid %d) stopped: the scanners restart together", name, a.pid)
                    if a.proc.poll() is None:
                        a.proc.kill()       # by its Popen: a process this Machine started
                a.stop(1)
            for g in groups:
                recent = [t for t in self.restarts.get(g, []) if now - t < RESTART_WINDOW] + [now]
                self.restarts[g] = recent
                if len(recent) > MAX_RESTARTS:
                    self.gone[g] = f"died {len(recent)} times within {RESTART_WINDOW:.0f}s; not restarted"
                    log.error("%s %s", g, self.gone[g])
            mark("stop")
            program = recover(groups, self.scanner_names,
                              lambda: [vm.mm_id for vm in list(self.vms.values()) if vm.alive],
                              lambda: list(self.mm_segs), self._serves, self.nframes)
            done = None
            try:
                done = self._run_with_ptls(program, lambda e: self._recovery_effect(e, mark))
                rec["serving_s"] = round(time.monotonic() - seen, 4)
            except Exception:          # e.g. a ptl held by a hung actor: logged; the run goes on
                log.exception("recovery after the death of %s failed", " and ".join(dead))
            finally:
                rec["repair"] = done
                self.recoveries.append(rec)
            self.repairs.append(done or {})
            if done and any(done.values()):
                log.warning("repair after an actor's death: %s", done)
            for g in groups:            # the next death's successor
                self._start_spare(g)

    def _serves(self, actor: str, mm_id: int) -> bool:
        """Whether `actor` notifies mm mm_id: every scanner does, a fault handler the mms it serves."""
        return actor not in self.faultd_names or self.faultd_name(mm_id) == actor

    def freeze_scanners(self) -> None:
        """Hold the scanners between two rounds (ksmd's freeze: no ptl, no pinned frame held), for at
        most a few ack timeouts if nobody thaws them."""
        self.ksmd.call("freeze", self.ack_timeout * 4, for_s=int(self.ack_timeout * 6) + 1)

    def thaw_scanners(self) -> None:
        self.ksmd.call("thaw", self.ack_timeout * 2)

    def _recovery_effect(self, e, mark=lambda what: None):
        """The recovery program's own effects (mm/recovery.py), as control calls to the processes;
        mark(phase) closes each phase of Machine.recoveries' record (the repair: up to the thaw)."""
        c = e.__class__
        if c is Freeze:             # the scanners between two rounds: no ptl, no pinned frame held
            if "ksmd" in self.gone:
                return None         # (no live scanner to hold)
            try:                    # (again before the repair: ksmd restarts the freeze's timeout)
                self.freeze_scanners()
                return True
            except (OSError, TimeoutError, ChannelClosed) as x:
                log.error("could not freeze ksmd for the repair: %s", x)
                return False
            finally:
                mark("freeze")
        if c is NotifierLost:       # nothing a dead notifier may have changed stays mapped by a secondary MMU
            vm = next((v for v in list(self.vms.values()) if v.mm_id == e.mm and v.alive), None)
            if vm is not None:
                try:
                    vm.actor.call("notifier_lost", self.ack_timeout * 2, peer=e.peer)
                except (OSError, TimeoutError, ChannelClosed) as x:
                    log.error("VM %s did not drop what %s had mapped: %s", vm.name, e.peer, x)
            mark("notifier_lost")
            return None
        if c is Thaw:               # the repair was all ksmd had to wait for
            try:
                self.thaw_scanners()
            except (OSError, TimeoutError, ChannelClosed) as x:
                log.error("could not thaw ksmd: %s", x)
            mark("repair")
            return None
        if c is Respawn:
            mark("repair")          # (up to here: the repair, where no thaw closed it)
            if e.group not in self.gone and not self.closed:
                self._respawn(e.group, mark)
            return None
        raise TypeError(f"effect {e!r} has no driver in the supervisor")

    def _faultd_args(self, k: int) -> list[str]:
        return self.common_args + ["--shard", str(k), "--handlers", str(self.fault_handlers)]

    def _new_group(self, group: str) -> dict[str, ActorProcess]:
        """New processes for `group`, by name (not waited for): every scanner, restarted (they rebuild
        their shards at `restore`), or one fault handler."""
        if group == "ksmd":
            return self._start_scanners(self.run, self.common_args, restarted=True)
        return {group: ActorProcess(group, "workers.actors.faultd", self.run,
                                    self._faultd_args(self.faultd_names.index(group)))}

    def _start_spare(self, group: str) -> None:
        """Start the successor of `group` now, before anything died: a Python interpreter and its imports
        take 0.4 to 2 s on a busy 2-core machine, which would otherwise be most of a recovery (the
        repair itself takes milliseconds).  A spare attaches the run's memory and waits: a fault
        handler serves no mm until attach_mm, a restarted scanner neither scans nor publishes until
        `restore` (which reloads the knobs and counters from the stats segment first)."""
        if not self.use_spares or self.closed or group in self.gone or group in self.spares:
            return
        try:
            self.spares[group] = self._new_group(group)
        except Exception as e:          # no spare: the recovery starts a process as before
            log.error("could not start a spare for %s: %s", group, e)

    def _take_spare(self, group: str) -> dict[str, ActorProcess] | None:
        spare = self.spares.pop(group, None)
        if spare is not None and any(a.proc.poll() is not None for a in spare.values()):
            for a in spare.values():    # (one of them died while waiting: not used)
                a.expected_exit = True
                a.stop(1)
            return None
        return spare

    def _take_spares(self) -> list[ActorProcess]:
        """Every spare, no longer kept (the run's end: they are stopped with the rest)."""
        return [a for group in list(self.spares) for a in self.spares.pop(group).values()]

    def _respawn(self, group: str, mark=lambda what: None) -> None:
        """Start `group` again: every scanner ("ksmd"), or one fault handler; bind every VM it serves.
        Its spare (started beforehand, `_start_spare`) if it has one, else new processes."""
        if group == "ksmd":
            self._wipe_rmaps()          # the new scanners rebuild their items (restore)
        new = self._take_spare(group) or self._new_group(group)
        try:
            for a in new.values():
                a.wait_ready(30)
            mark("start")
        except Exception as e:
            for a in new.values():
                a.stop(1)
            log.error("%s did not restart: %s", group, e)
            self.actors[group].expected_exit = False    # the watcher sees it dead: tries again (or gives up)
            return
        self.actors.update(new)
        for vm in [vm for vm in list(self.vms.values()) if vm.alive]:
            for name in new:
                if name in self.faultd_names and self.faultd_name(vm.mm_id) != name:
                    continue
                try:
                    theirs = self._bind(name, vm.mm_id, vm.name)
                    try:
                        vm.actor.hand_fd("reconnect", theirs.fileno(), self.ack_timeout * 4, peer=name)
                    finally:
                        theirs.close()
                except (OSError, TimeoutError, ChannelClosed) as e:
                    log.error("VM %s could not reconnect to the new %s: %s", vm.name, name, e)
        mark("reconnect")
        if group == "ksmd":         # each its own shard; the followers first: the leader then starts the rounds
            for name in self.scanner_names[1:] + self.scanner_names[:1]:
                try:
                    new[name].call("restore", max(60.0, self.call_timeout))
                except (OSError, TimeoutError, ChannelClosed) as e:
                    log.error("the new %s could not restore its state: %s", name, e)
        mark("restore")
        for name, a in new.items():
            log.warning("%s restarted as pid %d", name, a.pid)
            self.ready[name].set()

    def _wipe_rmaps(self) -> None:
        """The scanners' shared rmap items back to none (they are restarted, and restore rebuilds them)."""
        with self.mm_lock:
            for mm_id, (seg, _) in list(self.mm_segs.items()):
                try:
                    rseg = Segment.attach(seg_name(self.run, f"rmap.{mm_id}"))
                except Exception as e:
                    log.error("mm %d: no rmap segment to wipe: %s", mm_id, e)
                    continue
                try:
                    RmapView(rseg, MMView(seg).npages).format()
                finally:
                    rseg.close()

    def repair(self) -> dict:
        """Make the frame table and zero-page counters agree with the PTEs (core.repair).

        Safe only while no actor holds a frame reference outside a page-table lock (the
        recovery freezes ksmd first); callable on a quiet machine to check nothing is off.
        """
        done = self._run_with_ptls(repair_frames(list(self.mm_segs), self.nframes), None) or {}
        self.repairs.append(done)
        if any(done.values()):
            log.warning("repair: %s", done)
        return done

    def _run_with_ptls(self, gen, other):
        """Run a core generator here, through the supervisor's backend of the one interpreter
        (runtime/interp.py `run_sync`): its ptl locks (each taken with its timeout, in this thread)
        and memory effects over the run's shared memory, any other effect through other(e).  The mms
        are taken as they are at its first lock or memory effect, and none is freed until it let go
        of its last ptl (or ended): mm_lock is held meanwhile, not across what it does between (a
        restart's wait, say)."""
        held = []
        st = {}

        def begin():
            if not st:
                self.mm_lock.acquire()
                mms = {mm_id: MMView(seg) for mm_id, (seg, _) in self.mm_segs.items()}
                st.update(mms=mms, mem=Memory(self.alloc, self.stats, mms),
                          ptls={mm_id: ptl for mm_id, (_, ptl) in self.mm_segs.items()})

        def end():
            if st and not held:
                st.clear()
                self.mm_lock.release()

        def lock(e):
            begin()
            try:
                st["ptls"][e.key[1]].acquire(self.ack_timeout * 4)
            except BaseException:
                end()
                raise
            held.append(e.key)

        def unlock(e):
            st["ptls"][e.key[1]].release()
            held.remove(e.key)
            end()

        def memory(f):
            def op(e):
                begin()
                return f(st["mem"], e)
            return op

        def elsewhere(e):
            end()
            if other is None:
                raise TypeError(f"effect {e!r} has no driver in the supervisor")
            return other(e)

        backend = Backend(None, {Lock: lock, Unlock: unlock, **{c: memory(f) for c, f in APPLY_MEM.items()}})
        backend.name, backend.fallback = "the supervisor", elsewhere
        try:
            return run_sync(gen, backend)
        finally:
            for key in held:        # (a generator that ended holding ptls: let go of them)
                st["ptls"][key[1]].release()
            held.clear()
            end()
