"""Channel framing: moving whole frames over a stream socket, apart from handling them.

Every channel is one end of a socketpair the supervisor made and handed to the two
actors it joins (at spawn, or later as an fd passed with `send_fd` / `recv_fd`): there
is no listening socket, no name anyone could connect to, so only the run's own
processes hold a channel, and the supervisor decides which mm a channel speaks for.

`FrameSplitter` cuts a byte stream into length-delimited frames.  Framing that does
not add up (a bad magic, a length below the header or above MAX_FRAME) means the
stream can no longer be trusted: the splitter raises ProtocolError and stays broken,
and the channel closes the stream.  It never skips ahead looking for the next magic:
bytes of a payload (guest data) are never read as a frame.  The sender checks the
same limit (`encode`), and the API splits large reads and writes into frames.

`Channel` is an asyncio Protocol (used on uvloop) that hands each decoded frame to a
handler and matches replies to pending calls by their correlation id;
`BlockingChannel` is the same for plain threads (the parent's handles).  A frame that
does not decode closes the channel too; a well-formed request the handler rejects is
answered with an error by the handler.  Every call has a timeout, and a closed
channel fails its pending calls at once (ChannelClosed).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Any, Coroutine

from .messages import HEADER_SIZE, MAGIC, MAX_FRAME, Frame, Msg, ProtocolError, decode, decode_record, encode

log = logging.getLogger("ksm_proto.channel")
_REPLY_TYPES = frozenset({Msg.ACK, Msg.REPLY, Msg.FAULT_REPLY})
_PREFIX = struct.Struct("<HI")      # a frame's magic and length


class ChannelClosed(ConnectionError):
    pass


FD_MSG_MAX = 4096


def send_fd(sock: socket.socket, fd: int, info: dict) -> None:
    """Pass one fd (a channel end) with a small JSON note over a SOCK_SEQPACKET socket."""
    socket.send_fds(sock, [json.dumps(info).encode()], [fd])


def recv_fd(sock: socket.socket) -> tuple[dict, int]:
    """The next (note, fd) sent with send_fd, without blocking; OSError(EAGAIN) if none is queued.

    Anything else than one fd with a JSON object (extra fds included, which are closed)
    is a ProtocolError.
    """
    msg, fds, flags, _ = socket.recv_fds(sock, FD_MSG_MAX, 4, socket.MSG_DONTWAIT)
    try:
        info = json.loads(msg)
        if len(fds) != 1 or not isinstance(info, dict) or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolError(f"fd message with {len(fds)} fds, flags {flags:#x}")
    except (ValueError, ProtocolError):
        for fd in fds:
            os.close(fd)
        raise ProtocolError("malformed fd message") from None
    return info, fds[0]


class FrameSplitter:
    """Cuts a stream into length-delimited frames; broken framing raises ProtocolError, for good."""

    def __init__(self):
        self.buf = bytearray()
        self.broken: str | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if self.broken:
            raise ProtocolError(f"stream already broken: {self.broken}")
        if not self.buf and len(data) >= 6:     # most reads are exactly one whole frame: no buffering
            magic, total = _PREFIX.unpack_from(data, 0)
            if total == len(data) and magic == MAGIC and HEADER_SIZE <= total <= MAX_FRAME:
                return [bytes(data)]            # (bytes(b) is b for bytes)
        buf = self.buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= 6:
            magic, total = _PREFIX.unpack_from(buf, pos)
            if magic != MAGIC or total < HEADER_SIZE or total > MAX_FRAME:
                self.broken = (f"bad magic {magic:#06x}" if magic != MAGIC else
                               f"frame length {total} outside [{HEADER_SIZE}, {MAX_FRAME}]")
                self.buf = bytearray()
                raise ProtocolError(self.broken)
            if n - pos < total:
                break
            out.append(bytes(buf[pos:pos + total]))
            pos += total
        if pos:
            del buf[:pos]
        return out


class Channel(asyncio.Protocol):
    """One end of a stream between two actors, on asyncio."""

    _corr = itertools.count(1)

    def __init__(self, name: str, on_frame, on_close=None):
        self.name = name
        self.on_frame = on_frame
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.splitter = FrameSplitter()
        self.pending: dict[int, asyncio.Future] = {}
        self.bad_frames = 0
        self.closed = False
        self.corked: list[bytes] | None = None
        self.peer = None          # set by the handler (e.g. the mm id after HELLO)
        self.on_reply = None      # optional: sees each answer frame first, on arrival (a COW reply's PTEs)
        self.records = frozenset()  # types whose one-entry frames, read whole, are records (decode_record)
        self._due: dict[int, tuple] = {}   # corr -> (deadline, future, timeout) of the calls `answer` waits on
        self._watch_at: float | None = None
        self._watch_timer: asyncio.TimerHandle | None = None

    # transport side
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.closed:
            return
        f = None
        if not self.splitter.buf:   # most reads are one whole frame, nothing buffered before it
            if self.records:        # (the fault path's records, without numpy)
                f = decode_record(data, self.records)
            if f is None:
                try:
                    f = decode(data)
                except ProtocolError:   # not one whole frame (several, a part, a bad one): cut below
                    pass
        if f is not None:
            frames = (f,)
        else:
            try:
                frames = [decode(raw) for raw in self.splitter.feed(data)]
            except ProtocolError as e:
                self.broken(e)
                return
        for f in frames:
            if self.closed:
                return
            if f.type in _REPLY_TYPES:
                if self.on_reply is not None:
                    try:
                        self.on_reply(self, f)
                    except Exception:
                        log.exception("%s: reply handler failed on %s", self.name, _tname(f.type))
                fut = self.pending.pop(f.corr, None)
                if fut is not None:
                    if not fut.done():
                        fut.set_result(f)
                    continue
            try:
                self.on_frame(self, f)
            except ProtocolError as e:
                self.bad_frames += 1
                log.error("%s: bad %s message rejected: %s", self.name, _tname(f.type), e)
            except Exception:
                log.exception("%s: handler failed on %s", self.name, _tname(f.type))

    def broken(self, e: Exception) -> None:
        """The stream's framing cannot be trusted any more: count, log, close (never resync)."""
        self.bad_frames += 1
        log.error("%s: closing the channel, its framing is broken: %s", self.name, e)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        else:
            self.connection_lost(None)

    def connection_lost(self, exc):
        if getattr(self, "_lost", False):
            return
        self._lost = True
        self.closed = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(f"{self.name}: channel closed"))
        self.pending.clear()
        if self._watch_timer is not None:
            self._watch_timer.cancel()
            self._watch_at = self._watch_timer = None
        if self.on_close:
            self.on_close(self)

    # sending
    @staticmethod
    def next_corr() -> int:
        return next(Channel._corr)

    def send(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise ChannelClosed(f"{self.name}: channel closed")
        if self.corked is not None:
            self.corked.append(data)
        else:
            self.transport.write(data)

    def cork(self) -> None:
        """Hold sends until uncork(): frames sent back to back leave in one write (one wake-up)."""
        if self.corked is None:
            self.corked = []

    def uncork(self) -> None:
        held, self.corked = self.corked, None
        if held and not self.closed and self.transport is not None:
            self.transport.write(b"".join(held))

    def request(self, corr: int, data: bytes) -> asyncio.Future:
        """Send a frame and return a future for the frame that answers `corr`."""
        fut = asyncio.get_running_loop().create_future()
        self.pending[corr] = fut
        try:
            self.send(data)
        except ChannelClosed:
            self.pending.pop(corr, None)
            raise
        return fut

    def call(self, corr: int, data: bytes, timeout: float) -> Coroutine[Any, Any, Frame]:
        """Send and wait for the answer to `corr`; asyncio.TimeoutError after `timeout` seconds."""
        return self.answer(corr, self.request(corr, data), timeout)     # (one coroutine less to wake)

    async def answer(self, corr: int, fut: asyncio.Future, timeout: float) -> Frame:
        """Wait for the answer to the request `corr` (its future `fut`); asyncio.TimeoutError after
        `timeout` seconds.  The channel's one watchdog timer keeps every call's deadline: a loop
        timer armed and cancelled per call cost more than the rest of the call's Python."""
        loop = fut.get_loop()
        at = loop.time() + timeout
        self._due[corr] = (at, fut, timeout)
        if self._watch_at is None or at < self._watch_at:
            self._watch(loop, at)
        try:
            return await fut
        finally:
            self._due.pop(corr, None)
            self.pending.pop(corr, None)

    def _watch(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._watch_timer is not None:
            self._watch_timer.cancel()
        self._watch_at, self._watch_timer = at, loop.call_at(at, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """The watchdog: fail the calls past their deadline, and wake again at the next one."""
        self._watch_at = self._watch_timer = None
        now, nxt = loop.time(), None
        for corr, (at, fut, timeout) in list(self._due.items()):
            if at <= now:
                del self._due[corr]
                if not fut.done():
                    fut.set_exception(asyncio.TimeoutError(f"{self.name}: no answer within {timeout:.1f}s"))
            elif nxt is None or at < nxt:
                nxt = at
        if nxt is not None:
            self._watch(loop, nxt)

    def close(self):
        if self.transport is not None:
            self.transport.close()

    def read_now(self) -> bool:
        """Read what the socket (`self.fd`) holds now, outside the event loop, and handle it as the
        loop's own read would.  False at EOF or an error, which the loop's read then sees too."""
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        self.data_received(data)
        return True


class PollSet:
    """A `select.poll` for POLLIN over a set of fds, made again only when the set changes."""

    def __init__(self):
        self.fds: frozenset[int] = frozenset()
        self.poll = select.poll()

    def over(self, fds):
        fds = frozenset(fds)
        if fds != self.fds:
            self.poll = select.poll()
            for fd in fds:
                self.poll.register(fd, select.POLLIN)
            self.fds = fds
        return self.poll


def halt_poll(poll, spin_ns: int) -> list:
    """`poll.poll(0)` until an fd is ready or spin_ns have passed ([] then): KVM's halt polling, for
    a process that expects its next message within microseconds.  Waking a sleeping process costs
    more than that (a cross-CPU wake-up: tens of microseconds on a VM), so a fault's two ends poll
    for a while before they sleep (the `fault_poll_us` knob)."""
    end = time.monotonic_ns() + spin_ns
    while True:
        evs = poll.poll(0)
        if evs or time.monotonic_ns() >= end:
            return evs
        os.sched_yield()        # (a peer on this same CPU gets it: a spin that held it would starve the peer)


def expire_after(futs: list, timeout: float, why: str) -> asyncio.TimerHandle:
    """Fail every future still pending after `timeout` (cheaper than asyncio.wait_for per call)."""
    def expire():
        for f in futs:
            if not f.done():
                f.set_exception(asyncio.TimeoutError(why))
    return asyncio.get_running_loop().call_later(timeout, expire)


def _tname(t: int) -> str:
    try:
        return Msg(t).name
    except ValueError:
        return str(t)


class BlockingChannel:
    """A thread-safe request/reply channel over a blocking socket (parent side).

    Calls from several threads are in flight together, each matched to its reply by its
    correlation id: one waiting caller at a time reads the socket and hands the replies it
    reads to their callers.  (One lock held across a whole call made any call wait behind
    another thread's: a user's write that faults on a dead fault handler, waiting up to the
    VM's restart timeout for the successor, kept the supervisor's recovery calls to that VM
    (notifier_lost, reconnect) out until it failed: the successor could not be handed to the
    VM it was waiting for, issue 21.)
    """

    def __init__(self, sock: socket.socket, name: str):
        self.sock = sock
        self.name = name
        self.lock = threading.Lock()        # one sender at a time (a frame goes out whole)
        self.splitter = FrameSplitter()
        self.ready: list[bytes] = []        # frames read by wait_ready (before any call) or not yet handed out
        self._corr = itertools.count(1)
        self._cv = threading.Condition()
        self._reading = False               # a caller is reading the socket for everyone
        self._waiting: set[int] = set()     # corrs of the calls in flight
        self._replies: dict[int, Frame] = {}
        self._closed: str | None = None     # why the channel is unusable (every caller hears it)

    def call(self, type: int, payload: bytes = b"", timeout: float = 30.0, mm: int = 0) -> Frame:
        """Send one request and wait for its answer; ChannelClosed if the peer is gone or broke
        the framing (the socket is then closed), TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cv:
            if self._closed:
                raise ChannelClosed(self._closed)
            corr = next(self._corr)
            self._waiting.add(corr)
        try:
            data = encode(type, mm=mm, corr=corr, payload=payload)
            with self.lock:
                try:
                    self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                    self.sock.sendall(data)
                except socket.timeout:
                    raise TimeoutError(f"{self.name}: could not send within {timeout:.1f}s") from None
                except OSError as e:       # EPIPE, ECONNRESET, EBADF: the peer is gone
                    raise ChannelClosed(f"{self.name}: peer closed the channel ({e.strerror})") from None
            with self._cv:
                while True:
                    self._hand_out()
                    f = self._replies.pop(corr, None)
                    if f is not None:
                        return f
                    if self._closed:
                        raise ChannelClosed(self._closed)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"{self.name}: no reply within {timeout:.1f}s")
                    if self._reading:       # another caller reads; it wakes us when it hands out
                        self._cv.wait(left)
                        continue
                    self._reading = True
                    self._cv.release()
                    try:
                        data = self._recv(left)
                    finally:
                        self._cv.acquire()
                        self._reading = False
                        self._cv.notify_all()
                    if data:
                        self._feed_locked(data)
        finally:
            with self._cv:
                self._waiting.discard(corr)
                self._replies.pop(corr, None)

    def _recv(self, left: float) -> bytes | None:
        """What the socket has within `left` seconds (None: nothing yet); ChannelClosed at EOF.
        (Called without the condition held: only the reading caller calls it.)"""
        try:
            r, _, _ = select.select([self.sock], [], [], left)
        except (OSError, ValueError) as e:     # closed under us
            self._close_all(f"{self.name}: peer closed the channel ({e})")
            raise ChannelClosed(f"{self.name}: peer closed the channel") from None
        if not r:
            return None
        try:
            data = self.sock.recv(1 << 20)      # (readable: returns at once)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return None
        except OSError as e:
            self._close_all(f"{self.name}: peer closed the channel ({e.strerror})")
            raise ChannelClosed(f"{self.name}: peer closed the channel ({e.strerror})") from None
        if not data:
            self._close_all(f"{self.name}: peer closed the channel")
            raise ChannelClosed(f"{self.name}: peer closed the channel")
        return data

    def _close_all(self, why: str) -> None:
        with self._cv:
            if not self._closed:
                self._closed = why
            self._cv.notify_all()

    def _feed_locked(self, data: bytes) -> None:
        try:
            self.ready.extend(self.splitter.feed(data))
        except ProtocolError as e:
            self._framing_broken(e)
        self._hand_out()

    def _framing_broken(self, e: ProtocolError) -> None:
        """The stream is garbage from here on: closed for every caller (told with the condition let go)."""
        self._closed = f"{self.name}: framing broken: {e}"
        self._cv.notify_all()
        self._cv.release()
        try:
            self._broken(e)
        finally:
            self._cv.acquire()

    def _hand_out(self) -> None:
        """Give each frame read to the call waiting for it (the condition held); others are dropped (a
        reply to a call that timed out, as before)."""
        handed = False
        while self.ready:
            raw = self.ready.pop(0)
            try:
                f = decode(raw)
            except ProtocolError as e:
                self._framing_broken(e)
                self.ready.clear()          # (nothing after a broken frame can be trusted)
                break
            if f.type in _REPLY_TYPES and f.corr in self._waiting:
                self._replies[f.corr] = f
                handed = True
        if handed:
            self._cv.notify_all()

    def feed(self, data: bytes) -> None:
        """Queue the frames in data; broken framing closes the channel (ChannelClosed)."""
        try:
            self.ready.extend(self.splitter.feed(data))
        except ProtocolError as e:
            self._broken(e)

    def _broken(self, e: Exception):
        log.error("%s: closing the channel, its framing is broken: %s", self.name, e)
        self.ready.clear()
        self.close()
        raise ChannelClosed(f"{self.name}: framing broken: {e}")

    def close(self):
        with self._cv:
            if not self._closed:
                self._closed = f"{self.name}: channel closed"
            self._cv.notify_all()
        try:
            self.sock.close()
        except OSError:
            pass
