"""The trace recorder (`Tracer`, one per actor process) and the trace record format.

Tracing is off unless the actor was given a trace directory; `Tracer.open(None, ...)`
returns None, so the hot path costs one truth test: `if tr: tr.send(...)`.

Each actor appends to its own file `<dir>/<actor, ':' -> '_'>.<pid>.jsonl`, one JSON
array per line, the first element naming the kind:

    ["h", actor, pid, monotonic_ns, wall_time_ns]                     header, first line
    ["m", ts_ns, dir, peer, type, mm, sub, addr, n, old_pte, new_pte, corr]   a message
    ["s", ts_start_ns, dur_ns, name, mm, args]                        a span
    ["c", ts_ns, name, value]                                         a counter sample
    ["e", ts_ns]                                                      clean end (close())

dir is "send" or "recv"; peer the other actor; sub -1 for non-notifier messages; n the
number of page entries a (possibly batched) message carries; old/new the PTEs of its
first entry (0 if none); corr the sender's correlation id (a reply carries its request's).
Timestamps are time.monotonic_ns(), one clock for every process of the machine.

Records are buffered as tuples and serialized only at flush: when 2048 are buffered,
when 0.25 s passed since the last flush (checked on each record), on flush() and on
close().  A flush is one os.write() of whole lines, so a SIGKILL can at most truncate
the last line; a file without its "e" line belongs to an actor that died.
`workers/tools/tracetool.py` merges the files into one Chrome/Perfetto trace.
"""
from __future__ import annotations

import atexit
import json
import os
import time
import weakref
from json.encoder import encode_basestring_ascii as _esc

__all__ = ["Tracer", "FLUSH_RECORDS", "FLUSH_INTERVAL_NS", "KINDS", "NOTIFIER_TYPES", "REPLY_TYPES", "file_name",
           "open_private"]

FLUSH_RECORDS = 2048
FLUSH_INTERVAL_NS = 250_000_000
KINDS = {"h": 5, "m": 12, "s": 6, "c": 4, "e": 2}          # kind -> length of its line
NOTIFIER_TYPES = ("REGISTER", "START", "END", "CHANGE_PTE", "INVALIDATE_PAGE", "CLEAR_YOUNG", "RELEASE")
REPLY_TYPES = ("ACK", "FAULT_REPLY")

_now = time.monotonic_ns


def _default(o):
    """JSON for what the stdlib encoder does not know (numpy scalars and arrays, anything else)."""
    item = getattr(o, "item", None)
    if item is not None:
        try:
            return item() if getattr(o, "ndim", 0) == 0 else o.tolist()
        except Exception:
            pass
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=repr)
    return str(o)


_enc = json.JSONEncoder(separators=(",", ":"), check_circular=False, default=_default).encode


def open_private(path: str, mode: str = "w"):
    """Open a trace (or any file holding a run's addresses and frame numbers) for writing, mode 0600:
    created so, and an existing file made so before anything is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except OSError:
        pass
    return os.fdopen(fd, mode)


def file_name(actor: str, pid: int) -> str:
    return f"{actor.replace(':', '_')}.{pid}.jsonl"


_quoted: dict = {}          # a name (actor, message type, span, counter) -> its JSON string


def _q(name) -> str:
    """A name as a JSON string, each distinct one escaped once (there are a few dozen in a run)."""
    q = _quoted.get(name)
    if q is None:
        q = _esc(name) if name.__class__ is str else _enc(name)
        if len(_quoted) < 4096:
            _quoted[name] = q
    return q


def _line(r: tuple) -> str:
    """One record as its JSON line: the common shapes by string formatting (several times faster than
    the json encoder; "%d" also takes numpy ints and bools), anything else by the encoder."""
    try:
        k = r[0]
        if k == "m":
            return '["m",%d,"%s",%s,%s,%d,%d,%d,%d,%d,%d,%d]' % (
                r[1], r[2], _q(r[3]), _q(r[4]), r[5], r[6], r[7], r[8], r[9], r[10], r[11])
        if k == "s" and all(v.__class__ is int for v in r[5].values()):
            return '["s",%d,%d,%s,%d,{%s}]' % (r[1], r[2], _q(r[3]), r[4],
                                                ",".join(["%s:%d" % (_q(a), v) for a, v in r[5].items()]))
        if k == "c" and r[3].__class__ is int:
            return '["c",%d,%s,%d]' % (r[1], _q(r[2]), r[3])
    except (TypeError, ValueError):
        pass
    return _enc(r)


_live: "weakref.WeakSet[Tracer]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child must not flush its parent's records into its parent's file.
    for tr in list(_live):
        tr._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Spanning:
    __slots__ = ("tr", "name", "mm", "args", "t0")

    def __init__(self, tr: "Tracer", name: str, mm: int, args: dict):
        self.tr, self.name, self.mm, self.args = tr, name, mm, args

    def __enter__(self):
        self.t0 = _now()
        return self

    def __exit__(self, *exc):
        t1 = _now()
        self.tr._add(("s", self.t0, t1 - self.t0, self.name, self.mm, self.args), t1)
        return False


class Tracer:
    """Records one actor's messages, spans and counters; see the module docstring."""

    __slots__ = ("actor", "pid", "path", "_fd", "_buf", "_deadline", "_limit", "_interval", "closed",
                 "__weakref__")

    @classmethod
    def open(cls, trace_dir: str | None, actor: str, *, flush_records: int = FLUSH_RECORDS,
             flush_interval_s: float = FLUSH_INTERVAL_NS / 1e9) -> "Tracer | None":
        """A Tracer writing into trace_dir (created if missing), or None when trace_dir is None."""
        if not trace_dir:
            return None
        return cls(trace_dir, actor, flush_records, flush_interval_s)

    def __init__(self, trace_dir: str, actor: str, flush_records: int = FLUSH_RECORDS,
                 flush_interval_s: float = FLUSH_INTERVAL_NS / 1e9):
        os.makedirs(trace_dir, mode=0o700, exist_ok=True)
        self.actor = actor
        self.pid = os.getpid()
        self.path = os.path.join(trace_dir, file_name(actor, self.pid))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._limit = max(1, int(flush_records))
        self._interval = int(flush_interval_s * 1e9)
        self.closed = False
        t = _now()
        self._buf: list = [("h", actor, self.pid, t, time.time_ns())]
        self.flush()              # the header is on disk at once: an actor killed early still shows
        _live.add(self)
        atexit.register(self.close)

    # ------------------------------------------------------------------ hot path
    def send(self, peer: str, type: str, mm: int, sub: int, addr: int, n: int, old: int, new: int,
             corr: int) -> None:
        t = _now()
        buf = self._buf
        buf.append(("m", t, "send", peer, type, mm, sub, addr, n, old, new, corr))
        if t >= self._deadline or len(buf) >= self._limit:
            self.flush()

    def recv(self, peer: str, type: str, mm: int, sub: int, addr: int, n: int, old: int, new: int,
             corr: int) -> None:
        t = _now()
        buf = self._buf
        buf.append(("m", t, "recv", peer, type, mm, sub, addr, n, old, new, corr))
        if t >= self._deadline or len(buf) >= self._limit:
            self.flush()

    def span(self, name: str, t0_ns: int, t1_ns: int, mm: int = -1, **args) -> None:
        self._add(("s", t0_ns, t1_ns - t0_ns, name, mm, args), _now())

    def spanning(self, name: str, mm: int = -1, **args) -> _Spanning:
        """`with tr.spanning("merge", mm=3, pages=8):` records a span around the block."""
        return _Spanning(self, name, mm, args)

    def counter(self, name: str, value) -> None:
        t = _now()
        self._add(("c", t, name, value), t)

    def _add(self, rec: tuple, t: int) -> None:
        buf = self._buf
        buf.append(rec)
        if t >= self._deadline or len(buf) >= self._limit:
            self.flush()

    # ------------------------------------------------------------------ flushing
    def flush(self) -> None:
        """Write every buffered record with one write() of whole lines."""
        buf, self._buf = self._buf, []
        if self._fd is None:      # closed, or a forked copy: drop
            self._deadline = 0
            return
        self._deadline = _now() + self._interval
        if not buf:
            return
        data = ("\n".join([_line(r) for r in buf]) + "\n").encode()
        try:
            while data:
                k = os.write(self._fd, data)
                data = data[k:]
        except OSError:
            pass                  # a full disk or a closed fd must not take the actor down

    def close(self) -> None:
        """Write the end record, flush and close the file; safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        self._buf.append(("e", _now()))
        self.flush()
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            atexit.unregister(self.close)
        except Exception:
            pass
        self._deadline = 0        # a record after close() is dropped at once (flush() has no fd)
        self._buf = []

    def _forked(self) -> None:
        fd, self._fd = self._fd, None
        self._buf = []
        self._deadline = 0
        self.closed = True
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self) -> str:
        return f"<Tracer {self.actor} pid {self.pid} -> {self.path}{' closed' if self.closed else ''}>"
