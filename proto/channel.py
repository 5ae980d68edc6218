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

    # transport side
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.closed:
            return
        f = decode_record(data, self.records) if self.records and not self.splitter.buf else None
        if f is not None:       # one whole record, nothing buffered before it (the fault path)
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

    async def call(self, corr: int, data: bytes, timeout: float) -> Frame:
        """Send and wait for the answer to `corr`; asyncio.TimeoutError after `timeout` seconds."""
        fut = self.request(corr, data)
        timer = expire_after([fut], timeout, f"{self.name}: no answer within {timeout:.1f}s")
        try:
            return await fut
        finally:
            timer.cancel()
            self.pending.pop(corr, None)

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
    """A thread-safe request/reply channel over a blocking socket (parent side)."""

    def __init__(self, sock: socket.socket, name: str):
        self.sock = sock
        self.name = name
        self.lock = threading.Lock()
        self.splitter = FrameSplitter()
        self.ready: list[bytes] = []
        self._corr = itertools.count(1)

    def call(self, type: int, payload: bytes = b"", timeout: float = 30.0, mm: int = 0) -> Frame:
        """Send one request and wait for its answer; ChannelClosed if the peer is gone or broke
        the framing (the socket is then closed), TimeoutError after `timeout` seconds."""
        with self.lock:
            corr = next(self._corr)
            data = encode(type, mm=mm, corr=corr, payload=payload)
            try:
                self.sock.settimeout(timeout)
                self.sock.sendall(data)
            except socket.timeout:
                raise TimeoutError(f"{self.name}: could not send within {timeout:.1f}s") from None
            except OSError as e:       # EPIPE, ECONNRESET: the peer is gone
                raise ChannelClosed(f"{self.name}: peer closed the channel ({e.strerror})") from None
            deadline = time.monotonic() + timeout
            while True:
                while self.ready:
                    try:
                        f = decode(self.ready.pop(0))
                    except ProtocolError as e:
                        self._broken(e)
                    if f.corr == corr and f.type in _REPLY_TYPES:
                        return f
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: no reply within {timeout:.1f}s")
                self.sock.settimeout(left)
                try:
                    data = self.sock.recv(1 << 20)
                except socket.timeout:
                    raise TimeoutError(f"{self.name}: no reply within {timeout:.1f}s") from None
                except OSError as e:
                    raise ChannelClosed(f"{self.name}: peer closed the channel ({e.strerror})") from None
                if not data:
                    raise ChannelClosed(f"{self.name}: peer closed the channel")
                self.feed(data)

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
        try:
            self.sock.close()
        except OSError:
            pass
