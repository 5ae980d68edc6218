"""The supervisor's mms: a VM spawned (its mm segment, ptl, rmap items, its channels to its fault
handler and every scanner), exited or dead (mm/recovery.py's vm_died: ksmd and its fault handler
forget it, exit_mmap),
and the frame invariants checked over every mm.

A mixin of Machine (workers.actors.supervisor), which holds the state these methods share.
"""
from __future__ import annotations

import errno
import socket


from proto.channel import ChannelClosed
from proto.layout import (MAX_MMS, MMH_ID, MMH_NODE, MMH_DOMAIN, MMH_NPAGES, MMH_OWNER_PID, MMView, RmapView, Segment,
                          seg_name)

from workers.mm.invariants import frame_problems, ksm_pages_mapped
from workers.mm.recovery import ForgetMM, vm_died
from workers.mm.repair import under_every_ptl
from workers.runtime.frames import ShmLock
from workers.actors.supervisor_common import ActorProcess, MAX_VM_PAGES, VM, check_capacity, check_vm_name, log


class MMTable:
    """The mm table (a Machine mixin)."""

    def spawn_vm(self, name: str, pages: int = 16384, device: bool = False, node: int = 0,
                 fork_from: VM | None = None, domain: int = 0) -> VM:
        """Start a VM worker with an address space of `pages` pages (and a device TLB if asked).

        domain: its security domain (0..2**31-1); with the mitigation "domain" ksmd merges its pages
        only with pages of VMs of the same domain.  A fork is in its parent's domain.

        fork_from: the new mm is first filled by that VM's fork (VM.fork), before its worker starts."""
        if not self._started or self.closed:
            raise RuntimeError("machine is not running")
        check_vm_name(name)
        if isinstance(pages, bool) or not isinstance(pages, int) or not 1 <= pages <= MAX_VM_PAGES:
            raise ValueError(f"pages={pages!r}: a VM has 1 to {MAX_VM_PAGES} pages")
        if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < max(1, self.nodes):
            raise ValueError(f"node {node!r} out of range: this machine has {self.nodes} node(s)")
        if isinstance(domain, bool) or not isinstance(domain, int) or not 0 <= domain < 2**31:
            raise ValueError(f"domain {domain!r} must be an integer in [0, 2**31)")
        if fork_from is not None and domain != fork_from.domain:
            raise ValueError(f"domain {domain}: a fork is in its parent's domain ({fork_from.domain})")
        check_capacity(f"VM {name!r} of {pages} pages",   # its page table and the scanners' rmap items
                       MMView.size_for(pages) + RmapView.size_for(pages))
        with self.recover_lock:      # not while the scanners or a fault handler are being replaced
            if "ksmd" in self.gone:
                raise OSError(errno.EIO, f"ksmd is gone: {self.gone['ksmd']}")
            with self.lock:
                if name in self.vms:
                    raise ValueError(f"a VM named {name!r} already exists")
                fname = self.faultd_name(self.next_mm)
                if fname in self.gone:
                    raise OSError(errno.EIO, f"{fname} is gone: {self.gone[fname]}")
                mm_id, mm = self._new_mm(pages, node, domain)
            if fork_from is not None:       # dup_mmap fills the new mm before its worker starts
                try:
                    fork_from._call("fork", child=mm_id)
                except BaseException:
                    self._free_mm(mm_id)
                    raise
            ends = []
            actor = None
            try:
                for a in [fname] + self.scanner_names:     # its fault handler, then every scanner
                    ends.append(self._bind(a, mm_id, name))
                args = ["--mode", self.mode, "--ack-timeout", str(self.ack_timeout), "--mm", str(mm_id),
                        "--restart-timeout", str(self.restart_timeout),
                        f"--name={name}", "--ksm", str(int(self.ksm_enabled)),
                        "--fault-fd", str(ends[0].fileno()), f"--fault-peer={fname}"]
                for e in ends[1:]:
                    args += ["--ksmd-fd", str(e.fileno())]
                if device:
                    args.append("--device")
                if self.trace_dir:
                    args += ["--trace", self.trace_dir]
                actor = ActorProcess(f"vm:{name}", "workers.actors.vm", self.run, args,
                                     pass_fds=[e.fileno() for e in ends])
                for e in ends:
                    e.close()
                mm.hdr[MMH_OWNER_PID] = actor.pid
                actor.wait_ready(30)
            except BaseException:
                for e in ends:
                    e.close()
                if actor is not None:
                    actor.stop(2)
                self._exit_mm(mm_id)
                raise
            vm = VM(self, name, mm_id, actor, pages)
            vm.node, vm.device, vm.domain = node, device, domain
            self.vms[name] = vm
        return vm

    def _new_mm(self, pages: int, node: int = 0, domain: int = 0) -> tuple[int, MMView]:
        """A new mm segment and its ptl (ids are never reused)."""
        with self.lock:
            if self.next_mm >= MAX_MMS:
                raise OSError(errno.EAGAIN, f"at most {MAX_MMS} VMs per machine")
            mm_id = self.next_mm
            self.next_mm += 1
            with self.mm_lock:
                seg = Segment.create(seg_name(self.run, f"mm.{mm_id}"), MMView.size_for(pages))
                mm = MMView(seg)
                mm.hdr[MMH_ID] = mm_id
                mm.hdr[MMH_NPAGES] = pages
                mm.hdr[MMH_NODE] = node
                mm.hdr[MMH_DOMAIN] = domain
                try:
                    self._create_rmap(mm_id, mm.npages)
                except BaseException:
                    mm = None           # (its views of the segment go before it is closed)
                    seg.close()
                    Segment.unlink(seg.name)
                    raise
                ptl = ShmLock.ptl(self.run, mm_id)
                self.mm_segs[mm_id] = (seg, ptl)
        return mm_id, mm

    def _create_rmap(self, mm_id: int, npages: int) -> None:
        """The scanners' rmap items of a new mm: one segment all of them map (core/shard.py)."""
        seg = Segment.create(seg_name(self.run, f"rmap.{mm_id}"), RmapView.size_for(npages))
        RmapView(seg, npages).format()
        seg.close()

    def _bind(self, name: str, mm_id: int, vm_name: str) -> socket.socket:
        """A new channel between actor `name` and mm mm_id: its end is passed to the actor and bound
        there to the mm; the other end is returned (for the VM)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.actors[name].hand_fd("attach_mm", ours.fileno(), self.ack_timeout * 4, mm=mm_id,
                                      name=f"vm:{vm_name}")
        except BaseException:
            theirs.close()
            raise
        finally:
            ours.close()
        return theirs

    def page_referenced(self, vm: VM, addr: int, npages: int = 1) -> int:
        """page_referenced for a range: primary young bits and clear_flush_young of secondary MMUs."""
        return self.actor_call(self.faultd_name(vm.mm_id), "page_referenced", mm=vm.mm_id, addr=addr,
                               npages=npages)[0]["referenced"]

    def check_frames(self) -> list[str]:
        """Frame accounting invariants (call when quiet: run=0, no access in flight).

        Every frame's mapcount equals the number of PTEs mapping it; a frame is free
        exactly when nothing maps it; the free stack holds each free frame once.  Read under
        every ptl: a COW whose write has returned may still hold its ptl until the fault
        handler has read the VM's APPLIED and put the old frame, and is waited for.
        """
        return self._read_quiet(frame_problems)

    def ksm_pages_mapped(self) -> dict:
        """pages_shared and pages_sharing as the PTEs say (mm.invariants.ksm_pages_mapped), read as
        check_frames reads: what ksmd's counters must be once its scans have seen every page."""
        return self._read_quiet(ksm_pages_mapped)

    def _read_quiet(self, fn):
        """fn(frame table, every mm's PTEs, nframes), read under every ptl and the frame lock."""
        def body(ptes):             # (read while every ptl is held: no fault or merge is halfway)
            with self.frame_lock:   # (and the frame lock: a fault handler gives its reserve back under it alone)
                return fn(self.ft, list(ptes.values()), self.nframes)
            yield                   # (a generator: under_every_ptl's body)
        # several scanners compare pages out of the locks, each pinned (a reference): held between two
        # rounds (Recovery.freeze_scanners), as for the repair, they have none out
        frozen = self.scanners > 1 and "ksmd" not in self.gone
        if frozen:
            self.freeze_scanners()
        try:
            return self._run_with_ptls(under_every_ptl(list(self.mm_segs), body), None)
        finally:
            if frozen:
                self.thaw_scanners()

    def rmap_item_bytes(self) -> int:
        """ksmd's measured metadata bytes per rmap item (the kernel's sizeof(struct ksm_rmap_item))."""
        c = self.stats.counter_dict()
        return -(-c["metadata_bytes"] // c["ksm_rmap_items"]) if c["ksm_rmap_items"] else 0

    def exit_vm(self, vm: VM) -> None:
        """A VM exits: mmu_notifier_release, then exit_mmap (ksmd forgets it, frames freed)."""
        if not vm.alive:
            return
        vm.actor.expected_exit = True
        try:
            vm.actor.call("exit", timeout=self.ack_timeout * 2)
        except (OSError, TimeoutError, ChannelClosed) as e:
            log.warning("VM %s did not exit cleanly: %s", vm.name, e)
        vm.actor.stop(5)
        self._teardown_vm(vm)

    def _teardown_vm(self, vm: VM, died: bool = False) -> dict | None:
        """A VM exited or died: mm/recovery.py's vm_died (ksmd and its fault handler forget its mm, then
        exit_mmap under its ptl; after a death, the frame table repaired with ksmd frozen), then its
        segments go.  Returns the program's counts."""
        with self.lock:
            if not vm.alive:
                return None
            vm.alive = False
        return self._exit_mm(vm.mm_id, repair=died)

    def _exit_mm(self, mm_id: int, forget: bool = True, repair: bool = False) -> dict | None:
        """Run vm_died for mm mm_id (forget: the actors bound to it forget it first; False: none knew it,
        or none runs any more; repair: its VM died, and may have left its own page table half changed),
        its ForgetMM effects as mm_exit calls, Freeze and Thaw as the recovery's; then unlink its segments
        and drop its ptl.  Whatever fails is logged: the mm goes all the same."""
        notifiers = [a for a in ("ksmd", self.faultd_name(mm_id)) if a not in self.gone] if forget else []
        program = vm_died(mm_id, notifiers, (lambda: list(self.mm_segs)) if repair else None, self.nframes)
        done = None
        try:            # (mm_lock only while it holds a ptl: a forget may wait for a restarting successor)
            done = self._run_with_ptls(program, self._forget_mm)
        except Exception as e:
            log.error("could not free the frames of mm %d: %s", mm_id, e)
        if done and done.get("unlocked"):
            log.error("mm %d: its ptl stayed busy; its frames were freed without it", mm_id)
        if repair and done:
            self.repairs.append({k: v for k, v in done.items() if k not in ("unmapped", "unlocked")})
        with self.mm_lock:
            self._unlink_mm(mm_id)
        return done

    def _forget_mm(self, e):
        """vm_died's ForgetMM: the scanners (the leader has every scanner drop it) or the mm's fault handler
        forget the mm (a restarting one waits for its successor, which never knew it)."""
        if e.__class__ is not ForgetMM:
            return self._recovery_effect(e)         # (Freeze, Thaw around the repair)
        a = self.actors.get(e.actor)
        if a is None or a.proc.poll() is not None:  # dead: it knew nothing, and its successor binds live VMs only
            return None
        try:
            self.actor_call(e.actor, "mm_exit", timeout=self.ack_timeout * 4, mm=e.mm)
        except (OSError, TimeoutError, ChannelClosed) as x:
            log.error("%s did not drop mm %d: %s", e.actor, e.mm, x)

    def _free_mm(self, mm_id: int) -> None:
        """exit_mmap of an mm no actor knows (a spawn that failed before its binds, or at close)."""
        self._exit_mm(mm_id, forget=False)

    def _unlink_mm(self, mm_id: int) -> None:
        """The mm's segments and ptl go (its frames were freed by exit_mmap)."""
        seg, ptl = self.mm_segs.pop(mm_id)
        try:
            with self.frame_lock:
                self.stats.mm[mm_id] = 0
        except TimeoutError as e:
            log.error("could not reset the counters of mm %d: %s", mm_id, e)
        seg.close()
        Segment.unlink(seg.name)
        Segment.unlink(seg_name(self.run, f"rmap.{mm_id}"))
        ptl.close()
