"""Channel framing: moving whole frames over a stream socket, apart from handling them.

`FrameSplitter` cuts a byte stream into frames and resynchronises on the magic
after garbage.  `Channel` is an asyncio Protocol (used on uvloop) that hands
each decoded frame to a handler and matches replies to pending calls by their
correlation id; `BlockingChannel` is the same for plain threads (the parent's
VM handles).  A malformed frame is logged and dropped: the channel keeps
working.  Every call has a timeout.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import struct
import threading
import time

from .messages import HEADER_SIZE, MAGIC, MAX_FRAME, Frame, Msg, ProtocolError, decode, encode

log = logging.getLogger("ksm_proto.channel")
_MAGIC_BYTES = struct.pack("<H", MAGIC)
_REPLY_TYPES = frozenset({Msg.ACK, Msg.REPLY, Msg.FAULT_REPLY})


class ChannelClosed(ConnectionError):
    pass


def abstract_listener(name: str) -> socket.socket:
    """A listening Unix socket in the abstract namespace: nothing to unlink, gone with the process."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind("\0" + name)
    s.listen(256)
    s.setblocking(False)
    return s


def abstract_connect(name: str, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect("\0" + name)
    s.setblocking(False)
    return s


class FrameSplitter:
    """Cuts a stream into frames; counts and skips garbage up to the next magic."""

    def __init__(self):
        self.buf = bytearray()
        self.garbage = 0

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= HEADER_SIZE:
            magic, total = struct.unpack_from("<HI", buf, pos)
            if magic != MAGIC or total < HEADER_SIZE or total > MAX_FRAME:
                nxt = buf.find(_MAGIC_BYTES, pos + 1)
                skip_to = nxt if nxt >= 0 else n - 1
                self.garbage += skip_to - pos
                log.error("channel: %d bytes of garbage skipped (bad magic or length)", skip_to - pos)
                pos = skip_to
                continue
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

    # transport side
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        for raw in self.splitter.feed(data):
            try:
                f = decode(raw)
            except ProtocolError as e:
                self.bad_frames += 1
                log.error("%s: malformed frame rejected: %s", self.name, e)
                continue
            if f.type in _REPLY_TYPES:
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

    def connection_lost(self, exc):
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
        with self.lock:
            corr = next(self._corr)
            self.sock.sendall(encode(type, mm=mm, corr=corr, payload=payload))
            deadline = time.monotonic() + timeout
            while True:
                while self.ready:
                    try:
                        f = decode(self.ready.pop(0))
                    except ProtocolError as e:
                        log.error("%s: malformed reply rejected: %s", self.name, e)
                        continue
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
                if not data:
                    raise ChannelClosed(f"{self.name}: peer closed the channel")
                self.ready.extend(self.splitter.feed(data))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
