"""Plumbing shared by every actor process: start-up, attaching the run's memory, logging.

An actor is started by the supervisor as `python -m workers.<actor> --run NAME
--ctl-fd FD --fd-sock FD ...`.  It dies with its parent (PR_SET_PDEATHSIG), attaches
the run's segments (never creates or unlinks them), and serves its control socket.
Channels to other actors are socketpair ends the supervisor passes over the fd
socket (`receive_fd`), each announced by a control request carrying the same
sequence number: no actor listens on a name anybody could connect to.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import logging
import os
import signal
import socket
import sys

import posix_ipc

from proto.channel import recv_fd
from proto.messages import ProtocolError

from proto.layout import FrameTable, MMView, RmapView, Segment, StatsView, seg_name

from workers.runtime.frames import FrameAllocator, ShmLock

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except OSError:
        pass


def actor_args(extra=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--ctl-fd", type=int, required=True)
    p.add_argument("--fd-sock", type=int, required=True)
    p.add_argument("--restart-timeout", type=float, default=30.0)
    p.add_argument("--mode", default="change_pte")
    p.add_argument("--trace", default=None)
    p.add_argument("--ack-timeout", type=float, default=10.0)
    if extra:
        extra(p)
    return p.parse_args()


def receive_fd(fd_sock: socket.socket, seq: int, what: str) -> int:
    """The fd the supervisor sent with sequence number seq just before its control request.

    Fds of earlier requests that failed before taking theirs are closed on the way.
    OSError(EPROTO) if the announced one is not queued.
    """
    while True:
        try:
            info, fd = recv_fd(fd_sock)
        except BlockingIOError:
            raise OSError(errno.EPROTO, f"no fd was passed for {what}") from None
        except ProtocolError as e:
            raise OSError(errno.EPROTO, f"fd for {what}: {e}") from None
        got = info.get("seq")
        if got == seq:
            return fd
        os.close(fd)
        if not isinstance(got, int) or got > seq:
            raise OSError(errno.EPROTO, f"fd for {what}: sequence {got!r}, expected {seq}")


def req_int(req: dict, key: str, default=None, lo: int | None = None, hi: int | None = None) -> int:
    """An integer field of a control request (KeyError when missing without a default;
    OSError(EINVAL) for a non-integer, a boolean or a value outside [lo, hi])."""
    v = req[key] if default is None else req.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise OSError(errno.EINVAL, f"{key} must be an integer, not {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise OSError(errno.EINVAL, f"{key}={v} out of range [{lo}, {hi}]")
    return v


def setup(actor: str) -> None:
    die_with_parent()
    logging.basicConfig(stream=sys.stderr, level=os.environ.get("KSM_PROTO_LOG", "WARNING"),
                        format=f"%(asctime)s {actor}[%(process)d] %(levelname)s %(message)s")
    # SIGINT goes to the whole foreground group on Ctrl-C: the supervisor decides the shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass


def run_actor(kind: str, main) -> None:
    """asyncio.run(main()); with KSM_PROTO_PROFILE=DIR (a developer's aid) under cProfile into DIR."""
    prof = os.environ.get("KSM_PROTO_PROFILE")
    if not prof:
        asyncio.run(main())
        return
    import cProfile
    p = cProfile.Profile()
    try:
        p.runcall(asyncio.run, main())
    finally:
        p.dump_stats(os.path.join(prof, f"{kind}.{os.getpid()}.prof"))


class RunMemory:
    """The run-wide segments an actor attaches: frames, frame table, stats; the frame lock."""

    def __init__(self, run: str):
        self.run = run
        self.frames_seg = Segment.attach(seg_name(run, "frames"))
        self.ft_seg = Segment.attach(seg_name(run, "frametab"))
        self.stats_seg = Segment.attach(seg_name(run, "stats"))
        self.ft = FrameTable(self.ft_seg)
        self.stats = StatsView(self.stats_seg)
        self.mem = self.frames_seg.buf
        self.frame_lock = ShmLock.frame_lock(run)
        self.alloc = FrameAllocator(self.ft, self.mem, self.frame_lock)
        self.pages = self.alloc.pages

    def attach_mm(self, mm_id: int) -> tuple[MMView, ShmLock]:
        try:
            mm = MMView(Segment.attach(seg_name(self.run, f"mm.{mm_id}")))
        except posix_ipc.ExistentialError:
            raise OSError(errno.ENOENT, f"mm {mm_id} does not exist") from None
        return mm, ShmLock.ptl(self.run, mm_id)

    def attach_rmap(self, mm_id: int, npages: int) -> RmapView:
        """The scanners' shared rmap items of an mm (the supervisor created them with the mm)."""
        return RmapView(Segment.attach(seg_name(self.run, f"rmap.{mm_id}")), npages)

    def close(self) -> None:
        self.frame_lock.close()
        for s in (self.frames_seg, self.ft_seg, self.stats_seg):
            s.close()

