"""ksmd: a scanner process.  It finds identical pages in mergeable areas and merges them.

This module is the process around the scan (workers/mm/ksm/scan.py: cmp_and_merge_page,
the trees, the counters) and the merge (workers/mm/ksm/merge.py: try_to_merge_one_page):
it drives their effects against the run's shared memory, the VMs' notifier channels
(workers/runtime/driver.py) and the other scanners.

With `scanners` = N (ksm-proto's own knob) the supervisor starts N of these,
connected to each other by socketpairs (the mesh); each owns one shard of the trees
(workers/mm/ksm/shard.py).  Scanner 0, the leader, is ksmd as the supervisor knows it:
it wakes every `sleep_millisecs` to scan `pages_to_scan` pages (in rounds every
scanner works on), applies knobs (run=2 unmerges everything), publishes the
machine-wide counters in the stats segment and serves the supervisor's control calls.
The others serve the leader's rounds.  Every VM has a notifier channel to each scanner.
Scanners run at nice 5, as the kernel's ksmd does (ksm_scan_thread: set_user_nice(current, 5)):
on a busy machine they yield to the VMs as ksmd yields to applications.

Each VM's channel is a socketpair end the supervisor passes (`attach_mm`), bound to
that VM's mm once; a HELLO naming another mm, a second HELLO, or any other frame a VM
sends is refused and logged.  ksmd keeps its knobs and cumulative counters in the
stats segment, so a ksmd the supervisor restarted after a crash starts from them and
rebuilds its stable tree and the rmap items of merged pages from the frame table and
the PTEs (`restore`, core.scan.KsmScan.restore).  With several scanners, the death of
any one restarts them all (a new mesh; the supervisor wipes the shared rmap items
first), and each rebuilds its own shard, the followers before the leader, which
then starts the rounds again.  `freeze` holds the scanner between two batches (no
lock, no pinned frame held: the leader's barrier keeps the followers idle too) while
the supervisor repairs what a dead fault handler left; `thaw` lets it go on.
"""
from __future__ import annotations

import asyncio
import collections
import os
import socket
import time


from proto.channel import Channel, ChannelClosed
from proto.layout import COUNTERS, KNOBS, MM_STATS
from proto.messages import Frame, Msg, call_payload, encode
from proto.trace import Tracer

from workers.runtime.actor import RunMemory, actor_args, run_actor, setup
from workers.mm.effects import Memory, TryLock
from workers.mm.fault import unmerge_ksm_pages_of_mm
from workers.mm.ksm.knobs import loaded_knobs
from workers.mm.ksm.scan import BATCH, KsmScan
from workers.mm.ksm.shard import DONE, LEAD, ROUTED, Done, Routed, from_wire, to_wire
from workers.runtime.driver import Driver, MMUNotifierSubscriptions
from workers.actors.ksmd_common import KSMD_NICE, hash_ahead_enabled, log
from workers.actors.ksmd_control import KsmdControl



class PeerGone(TimeoutError):
    """Another scanner closed its end (it exited): nobody will answer."""


class Mesh:
    """This scanner's channels to the other scanners: messages of core/shard.py, by kind and sender."""

    def __init__(self, name: str, timeout: float):
        self.name = name
        self.timeout = timeout
        self.peers: dict[int, Channel] = {}
        self.queues: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
        self.arrived = asyncio.Event()

    async def connect(self, peer_fds: dict[int, int]) -> None:
        loop = asyncio.get_running_loop()
        for k, fd in peer_fds.items():
            _, ch = await loop.create_connection(
                lambda k=k: Channel(f"{self.name}<->scanner{k}", self.on_frame, lambda ch: self.arrived.set()),
                sock=socket.socket(fileno=fd))
            ch.peer, ch.fd = k, fd
            self.peers[k] = ch

    def on_frame(self, ch: Channel, f: Frame) -> None:
        if f.type != Msg.SHARD:
            log.error("%s: unexpected %s from scanner %s", self.name, Msg(f.type).name, ch.peer)
            return
        msg = from_wire(f.json(), f.data())
        kind = ROUTED if isinstance(msg, Routed) else DONE if isinstance(msg, Done) else LEAD
        self.queues[(ch.peer, kind)].append(msg)
        self.arrived.set()

    def send(self, dst: int, kind: str, msg) -> None:
        self.peers[dst].send(encode(Msg.SHARD, payload=call_payload(*to_wire(msg))))

    def ready(self, kind: str, srcs: list, seq) -> bool:
        """Would `recv(kind, srcs, seq)` return at once?  What the peers' sockets hold is read first,
        here, outside the event loop (the core polls between two steps of its own: mm.ksm.ahead).
        A peer that is gone: True (recv then fails at once, nothing is worth hashing); so is a message
        of ours that did not all leave (only the event loop's turn, in recv, sends the rest)."""
        if any(ch.transport is not None and ch.transport.get_write_buffer_size() for ch in self.peers.values()):
            return True
        for src in srcs:
            ch = self.peers.get(src)
            if not self._head(src, kind, seq) and ch is not None and not ch.closed:
                self._read_now(ch)
                if not self._head(src, kind, seq):
                    return False
        return True

    def _head(self, src: int, kind: str, seq):
        """The `kind` queue of src, its messages of rounds before seq dropped (and said so)."""
        q = self.queues[(src, kind)]
        while q and seq is not None and q[0].seq < seq:
            log.warning("%s: dropped a late %s from scanner %d (round %d, now %d)", self.name, kind, src, q[0].seq, seq)
            q.popleft()
        return q

    @staticmethod
    def _read_now(ch: Channel) -> None:
        while not ch.closed:
            try:
                data = os.read(ch.fd, 1 << 20)
            except OSError:         # (nothing there now, or an error the loop's own read sees too)
                return
            if not data:
                return
            ch.data_received(data)

    async def recv(self, kind: str, srcs: list, seq, timeout: float | None = None) -> list:
        """One `kind` message from each src (of round seq: older ones are dropped); TimeoutError."""
        deadline = None if timeout is None and seq is None else time.monotonic() + (timeout or self.timeout)
        out = []
        for src in srcs:
            while True:
                q = self._head(src, kind, seq)
                if q:
                    out.append(q.popleft())
                    break
                if src in self.peers and self.peers[src].closed:
                    raise PeerGone(f"{self.name}: scanner {src} is gone")
                self.arrived.clear()
                try:
                    if deadline is None:
                        await self.arrived.wait()
                    else:
                        await asyncio.wait_for(self.arrived.wait(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise TimeoutError(f"{self.name}: no {kind} from scanner {src} within "
                                       f"{timeout or self.timeout:.1f}s") from None
        return out


class Ksmd(KsmdControl):
    def __init__(self, args):
        self.args = args
        self.shard, self.nshards = args.shard, args.scanners
        self.name = "ksmd" if self.shard == 0 else f"ksmd{self.shard}"
        self.mem = RunMemory(args.run)
        self.stats = self.mem.stats
        self.alloc = self.mem.alloc
        self.memory = Memory(self.alloc, self.stats)
        self.ptls: dict = {}
        self.ksm_locks: dict = {}
        self.rmaps: dict = {}
        self.notifiers: dict[int, MMUNotifierSubscriptions] = {}
        self.mesh = Mesh(self.name, args.ack_timeout * 4)
        self.driver = Driver(self.memory, self.ptls, self.notifiers, args.ack_timeout * 2, self.ksm_locks, self.mesh)
        self.tr = Tracer.open(args.trace, self.name)
        self.driver.tr = self.tr          # (its lock and barrier waits as spans)
        self.scan = KsmScan(self.mem.ft, args.mode, time.monotonic, shard=self.shard, nshards=self.nshards,
                            ahead=hash_ahead_enabled())
        self.scan.salt = int.from_bytes(os.urandom(8), "little") >> 1      # (vusion: random KSM frames)
        self.knobs = self.scan.knobs
        self.knobs["scanners"] = self.nshards
        self.knobs["fault_handlers"] = int(self.stats.knobs[KNOBS.index("fault_handlers")])
        self.wake = asyncio.Event()
        self.batch_lock = asyncio.Lock()
        self.scan_errors = 0
        self.refused = 0
        self.bound: set[int] = set()
        self.frozen = None             # the timer that thaws a freeze the supervisor forgot
        self.restored = asyncio.Event()
        self.load_stats()
        if not args.restarted:
            self.restored.set()

    def load_stats(self) -> None:
        """Knobs and cumulative counters live in the stats segment: a restarted ksmd goes on from them.
        Read at start and again at `restore`: a restarted scanner may have been started long before
        (the supervisor's spare, waiting to replace a dead one), while ksmd went on changing them."""
        self.knobs.update(loaded_knobs(self.stats.knob, self.nshards))
        if self.shard == 0:     # (the published counters are the leader's plus the followers' reports)
            for k in ("pages_scanned", "pages_skipped", "full_scans"):
                self.scan.c[k] = int(self.stats.counters[COUNTERS.index(k)])

    async def ksm_do_scan(self, budget: int) -> tuple[int, bool]:
        """One round of the scan, its merges included; returns (pages scanned, full scan ended)."""
        t0 = time.monotonic_ns()
        pts = self.knobs["pages_to_scan"]
        merge_t0 = []

        def observe(e):     # this scanner's merge starts with its first trylock
            if not merge_t0 and e.__class__ is TryLock:
                merge_t0.append(time.monotonic_ns())

        scanned, nops, ended = await self.driver.run(self.scan.ksm_do_scan(budget),
                                                     observe=observe if self.tr else None)
        if self.knobs["pages_to_scan"] != pts:      # the advisor changed it
            self.stats.knobs[KNOBS.index("pages_to_scan")] = self.knobs["pages_to_scan"]
        self.publish()
        if self.tr:
            t1 = time.monotonic_ns()
            if merge_t0:
                self.tr.span("merge", merge_t0[0], t1, ops=nops)
            self.tr.span("scan_batch", t0, t1, pages=scanned, merges=nops)
        return scanned, ended

    # ------------------------------------------------------------------ unmerge (run = 2), mm exit
    async def unmerge_all(self) -> None:
        """run=2: every KSM page and KSM zero page becomes a private copy; all rmap items go."""
        for slot in list(self.scan.slots.values()):
            if slot.alive:
                await self.driver.run(unmerge_ksm_pages_of_mm(slot.id, self.args.mode))
        await self.driver.run(self.scan.unmerge_and_remove_all_rmap_items())
        self.publish()

    async def ksm_exit(self, mm_id: int) -> None:
        """The leader: every scanner forgets the mm (its items leave the trees) before the reply."""
        if await self.driver.run(self.scan.ksm_exit(mm_id)) is None:
            return
        self.drop_mm(mm_id)
        self.publish()

    def drop_mm(self, mm_id: int) -> None:
        self.scan.slots.pop(mm_id, None)
        self.notifiers.pop(mm_id, None)
        self.memory.mms.pop(mm_id, None)
        for table in (self.ptls, self.ksm_locks):
            lk = table.pop(mm_id, None)
            if lk is not None:
                lk.close()
        rm = self.rmaps.pop(mm_id, None)
        if rm is not None:
            rm.seg.close()

    # ------------------------------------------------------------------ counters and knobs
    def publish(self) -> None:
        """Write the counters to shared memory, full_scans last: a reader that sees a full scan end
        (tests and tools wait on it) sees every counter and every mm's ksm_stat of that scan (the
        stores are in program order; x86 keeps them so)."""
        vals = self.scan.counters(int(self.stats.counters[COUNTERS.index("ksm_zero_pages")]))
        ri, mi = MM_STATS.index("ksm_rmap_items"), MM_STATS.index("ksm_merging_pages")
        for s in self.scan.slots.values():
            self.stats.mm[s.id, ri] = s.items.nr_items
            self.stats.mm[s.id, mi] = s.items.merging
        for k, v in vals.items():
            if k != "full_scans":
                self.stats.counters[COUNTERS.index(k)] = v
        self.stats.counters[COUNTERS.index("full_scans")] = vals["full_scans"]
        if self.tr:
            self.tr.counter("pages_shared", vals["pages_shared"])
            self.tr.counter("pages_sharing", vals["pages_sharing"])
            self.tr.counter("free_frames", self.alloc.nr_free)


    async def scan_loop(self) -> None:
        await self.restored.wait()
        while True:
            if self.knobs["run"] != 1:
                await self.sleep(0.5)
                continue
            budget = self.knobs["pages_to_scan"]
            while budget > 0 and self.knobs["run"] == 1:
                try:
                    async with self.batch_lock:
                        n, ended = await self.ksm_do_scan(min(budget, BATCH * self.nshards))
                except (PeerGone, ChannelClosed) as e:    # a scanner died: the supervisor restarts us all
                    log.warning("%s: round cut short, another scanner is gone: %s", self.name, e)
                    self.scan_errors += 1
                    await asyncio.sleep(0.05)
                    break
                except Exception:      # a bug must not stop ksmd silently: log it, go on scanning
                    log.exception("%s: scan round failed", self.name)
                    self.scan_errors += 1
                    break
                budget -= n
                if ended or n == 0:
                    break
                await asyncio.sleep(0)
            await self.sleep(self.knobs["sleep_millisecs"] / 1000 if self.scan.order else 0.05)

    async def follow_loop(self) -> None:
        """A follower: the leader's rounds and control requests, one after the other."""
        await self.restored.wait()
        while True:
            try:
                op, mm = await self.driver.run(self.scan.follow_one())
            except PeerGone:
                log.info("%s: the leader is gone; stopping", self.name)
                return
            except Exception:
                log.exception("%s: round failed", self.name)
                self.scan_errors += 1
                continue
            if op == "mm_exit":
                self.drop_mm(mm)
            elif op == "stop":
                return

    async def sleep(self, seconds: float) -> None:
        """Sleep, or less if a knob was written (during the sleep or the batch before it)."""
        try:
            await asyncio.wait_for(self.wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        self.wake.clear()

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.fd_sock = socket.socket(fileno=self.args.fd_sock)
        await self.mesh.connect(dict(self.args.peer))
        ctl_sock = socket.socket(fileno=self.args.ctl_fd)
        _, ctl = await loop.create_connection(
            lambda: Channel(f"{self.name}<-ctl", lambda ch, f: loop.create_task(self.on_ctl(ch, f)),
                            lambda ch: done.done() or done.set_result(None)), sock=ctl_sock)
        if self.shard == 0 and not self.args.restarted:     # (a restarted one publishes at restore: until
            self.publish()                                   # then the dead one's counters stand, or a live one's)
        ctl.send(encode(Msg.REPLY, corr=0, payload=call_payload({"ready": True})))
        worker = loop.create_task(self.scan_loop() if self.shard == 0 else self.follow_loop())
        await done
        worker.cancel()
        if self.tr:
            self.tr.close()


def _peer(text: str) -> tuple[int, int]:
    k, _, fd = text.partition(":")
    return int(k), int(fd)


def main() -> None:
    def extra(p):
        p.add_argument("--shard", type=int, default=0, help="this scanner's number (0: the leader)")
        p.add_argument("--scanners", type=int, default=1, help="how many scanners share the work")
        p.add_argument("--peer", type=_peer, action="append", default=[], metavar="K:FD",
                       help="a socketpair end connected to scanner K")
        p.add_argument("--restarted", action="store_true")
    args = actor_args(extra)
    setup("ksmd" if args.shard == 0 else f"ksmd{args.shard}")
    os.nice(KSMD_NICE)
    run_actor("ksmd", Ksmd(args).main)


if __name__ == "__main__":
    main()
