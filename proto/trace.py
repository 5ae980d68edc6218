"""The trace recorder (`Tracer`, one per actor process) and the per-actor trace file format.

Tracing is off unless the actor was given a trace directory; `Tracer.open(None, ...)`
returns None, so the hot path costs one truth test: `if tr: tr.send(...)`.

Each actor appends to its own file `<dir>/<actor, ':' -> '_'>.<pid>.ktrace`, a binary
file of chunks, one per flush (`read_records(path)` reads one back).  A record is, as
a tuple, the first element naming the kind:

    ("h", actor, pid, monotonic_ns, wall_time_ns)                     header, first record
    ("m", ts_ns, dir, peer, type, mm, sub, addr, n, old_pte, new_pte, corr)   a message
    ("s", ts_start_ns, dur_ns, name, mm, args)                        a span (args: a dict)
    ("c", ts_ns, name, value)                                         a counter sample
    ("e", ts_ns)                                                      clean end (close())

dir is "send" or "recv"; peer the other actor; sub -1 for non-notifier messages; n the
number of page entries a (possibly batched) message carries; old/new the PTEs of its
first entry (0 if none); corr the sender's correlation id (a reply carries its request's).
Timestamps are time.monotonic_ns(), one clock for every process of the machine.

On disk a record is a run of little-endian 8-byte words, packed by struct as it is made:
a key, then its numbers.  A key names what is not a number, interned once per file (its
definition goes with the first chunk that uses it):

    ["m", dir, peer, type]     8 words: ts, mm, sub, addr, n, old, new, corr (addr, old, new u64;
                               the others int64)
    ["s", name, [arg names]]   3 + len(args) words: ts, dur, mm, the args in that order (int64)
    ["c", name]                2 words: ts, value (int64)
    ["g", [[dir, peer, type], ...], [[span name, [arg names]], ...]]
                               a group: several records written as one (a COW fault's messages and
                               its spans): 8 words per message, as "m" has them, then per span
                               3 + len(args) words, as "s" has them; read back as those records,
                               in that order (`Tracer.group`, `Tracer.emit`)

Key 0 is one word: a record that is not all int64/u64 numbers (the header, the end, a float
counter, a bool or string span argument, a negative address...), the next of the chunk's
JSON records.  A chunk is

    b"KTR1", json_len, nwords, crc32 of what follows      (struct "<4sIII", 16 bytes)
    json_len bytes of JSON: [id of the first new key, [new key definitions], [records of key 0]]
    nwords words

`Tracer.group` compiles a group's key and struct once; `Tracer.emit(g, t, *words)` packs it with
one call (a span alone compiles to an "s" key).  Records are packed into a preallocated buffer (no object kept per record) and written at
flush: when the buffer holds 2048 messages' worth of bytes, when 0.25 s passed since the
last flush (checked on each record), on flush() and on close().  A flush is one write of
one chunk, so a SIGKILL can at most cut the last chunk short; a file without its "e" record
belongs to an actor that died.  `workers/tools/tracetool.py` merges the files (these, and
the .jsonl files of JSON lines that versions before 2026-12-07 wrote) into one Chrome/Perfetto
trace; `read_records` reads one back, chunk by chunk, up to the first chunk cut short or
damaged (named in its TraceFileError).
"""
from __future__ import annotations

import atexit
import json
import operator
import os
import struct
import sys
import time
import weakref
import zlib
from array import array

__all__ = ["Tracer", "Group", "FLUSH_RECORDS", "FLUSH_INTERVAL_NS", "KINDS", "NOTIFIER_TYPES", "REPLY_TYPES", "file_name",
           "open_private", "read_records", "MAGIC", "CHUNK", "SUFFIX", "TraceFileError"]

FLUSH_RECORDS = 2048
FLUSH_INTERVAL_NS = 250_000_000
KINDS = {"h": 5, "m": 12, "s": 6, "c": 4, "e": 2}          # kind -> length of its record
NOTIFIER_TYPES = ("REGISTER", "START", "END", "CHANGE_PTE", "INVALIDATE_PAGE", "CLEAR_YOUNG", "RELEASE")
REPLY_TYPES = ("ACK", "FAULT_REPLY")
SUFFIX = ".ktrace"
MAGIC = b"KTR1"
CHUNK = struct.Struct("<4sIII")          # magic, json_len, nwords, crc32 of the json and the words
_SWAP = sys.byteorder != "little"          # (the reader's int64 array is in the host's order)
_M_FMT = "<qqqqQqQQq"                    # a message: key, ts, mm, sub, addr, n, old, new, corr (addr and PTEs u64)
_PACK_M = struct.Struct(_M_FMT).pack_into
_M_SIZE = struct.calcsize(_M_FMT)
_G_MSG = "qqqQqQQq"                      # a message inside a group: ts, mm, sub, addr, n, old, new, corr
_PACK_C = struct.Struct("<qqq").pack_into  # a counter: key, ts, value
_C_SIZE = 24
_PACK_0 = struct.Struct("<q").pack_into    # key 0: the next JSON record of the chunk
_U64 = (1 << 64) - 1
_SLACK = 1024                              # room past the flush mark: the largest record packed
_NO_ROOM = struct.Struct("<0q")            # (a span with more arguments than that: never packed)
_MAX_BUF = 16 << 20

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
    return f"{actor.replace(':', '_')}.{pid}{SUFFIX}"


def _hashable(v):
    try:
        hash(v)
        return v
    except TypeError:
        return str(v)


_live: "weakref.WeakSet[Tracer]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child must not flush its parent's records into its parent's file.
    for tr in list(_live):
        tr._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Group:
    """A compiled group (`Tracer.group`): its key, its packer, its size in bytes, its definition."""
    __slots__ = ("key", "pack", "size", "d", "nwords")

    def __init__(self, key: int, pack, size: int, d: tuple):
        if size > _SLACK:
            raise ValueError(f"a group of {size} bytes: at most {_SLACK}")
        self.key, self.pack, self.size, self.d, self.nwords = key, pack, size, d, size // 8 - 1


def _expand(d, ws: list, i: int = 0, u64: int = _U64) -> list:
    """The records a group (or "s") key's words stand for, from ws[i] (the word after the key); the
    words of addr, old and new read as u64 (u64=-1: as they are)."""
    out = []
    if d[0] == "s":
        names = d[2]
        return [["s", ws[i], ws[i + 1], d[1], ws[i + 2], dict(zip(names, ws[i + 3:i + 3 + len(names)]))]]
    for dir, peer, type in d[1]:
        out.append(["m", ws[i], dir, peer, type, ws[i + 1], ws[i + 2], ws[i + 3] & u64, ws[i + 4],
                    ws[i + 5] & u64, ws[i + 6] & u64, ws[i + 7]])
        i += 8
    for name, names in d[2]:
        j = i + 3 + len(names)
        out.append(["s", ws[i], ws[i + 1], name, ws[i + 2], dict(zip(names, ws[i + 3:j]))])
        i = j
    return out


class _Spanning:
    __slots__ = ("tr", "name", "mm", "args", "t0")

    def __init__(self, tr: "Tracer", name: str, mm: int, args: dict):
        self.tr, self.name, self.mm, self.args = tr, name, mm, args

    def __enter__(self):
        self.t0 = _now()
        return self

    def __exit__(self, *exc):
        t1 = _now()
        self.tr._span(self.name, self.t0, t1, self.mm, self.args, t1)
        return False


def _message_recorder(dir: str):
    """Tracer.send and Tracer.recv, one body: a message this actor sent to / received from `peer`
    (its first entry's old and new PTEs; corr the request's).  The direction's key table is picked
    here, once, so that the hot path makes no call but the record's own."""
    i = ("send", "recv").index(dir)

    def record(self: "Tracer", peer: str, type: str, mm: int, sub: int, addr: int, n: int, old: int, new: int,
               corr: int) -> None:
        t = _now()
        try:
            k = self._kmsg[i][peer][type]
        except (KeyError, TypeError):
            k = self._key_m(self._kmsg[i], dir, peer, type)
        off = self._off
        try:
            _PACK_M(self._b, off, k, t, mm, sub, addr, n, old, new, corr)
        except Exception:                       # (a value that is no int64 / u64: as JSON)
            self._extra(self._record(k, (t, mm, sub, addr, n, old, new, corr)), t)
            return
        self._off = off = off + _M_SIZE
        if t >= self._deadline or off >= self._limit:
            self.flush()
    record.__name__ = dir
    record.__qualname__ = f"Tracer.{dir}"
    return record


class Tracer:
    """Records one actor's messages, spans and counters; see the module docstring."""

    __slots__ = ("actor", "pid", "path", "_fd", "_b", "_off", "_x", "_deadline", "_limit", "_interval", "closed",
                 "_kmsg", "_kspan", "_kctr", "_kgroup", "_defs", "_new", "_new_first", "__weakref__")

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
        # the buffer: flush_records messages' worth of bytes (at most 16 MiB), and room for one more record
        self._limit = min(max(1, int(flush_records)), _MAX_BUF // _M_SIZE) * _M_SIZE
        self._b = bytearray(self._limit + _SLACK)
        self._off = 0
        self._interval = int(flush_interval_s * 1e9)
        self.closed = False
        # interned keys: peer -> type -> id per direction (send, recv), span name -> arg names -> (id, its
        # struct), counter name -> id
        self._kmsg: tuple[dict, dict] = ({}, {})     # (send, recv)
        self._kspan: dict = {}
        self._kctr: dict = {}
        self._kgroup: dict = {}
        self._defs: list = [None]          # id -> its definition (0: a JSON record)
        self._new: list = []               # definitions not yet on disk, from id _new_first on
        self._new_first = 1
        self._x: list = []                 # the buffered records of key 0
        self._deadline = 0
        self._extra(("h", actor, self.pid, _now(), time.time_ns()), 0)
        self.flush()              # the header is on disk at once: an actor killed early still shows
        _live.add(self)
        atexit.register(self.close)

    # ------------------------------------------------------------------ interning
    def _define(self, d: tuple) -> int:
        k = len(self._defs)
        self._defs.append(d)
        self._new.append(d)
        return k

    def _key_m(self, table: dict, dir: str, peer, type) -> int:
        peer, type = _hashable(peer), _hashable(type)
        per = table.setdefault(peer, {})
        k = per.get(type)
        if k is None:
            k = per[type] = self._define(("m", dir, peer, type))
        return k

    # ------------------------------------------------------------------ hot path
    send = _message_recorder("send")
    recv = _message_recorder("recv")

    def span(self, name: str, t0_ns: int, t1_ns: int, mm: int = -1, **args) -> None:
        try:                                    # (the common case inline: a known name, int args)
            k, st, get, nargs = self._kspan[name]
            if len(args) != nargs:
                raise KeyError(name)
            vals = get(args)
            for v in vals:
                if v.__class__ is not int:
                    raise TypeError(name)
            off = self._off
            st.pack_into(self._b, off, k, t0_ns, t1_ns - t0_ns, mm, *vals)
        except Exception:
            self._span(name, t0_ns, t1_ns, mm, args, _now())
            return
        self._off = off = off + st.size
        if t1_ns >= self._deadline or off >= self._limit:       # (t1: a stamp of about now)
            self.flush()

    def spanning(self, name: str, mm: int = -1, **args) -> _Spanning:
        """`with tr.spanning("merge", mm=3, pages=8):` records a span around the block."""
        return _Spanning(self, name, mm, args)

    def _span(self, name, t0: int, t1: int, mm: int, args: dict, t: int) -> None:
        try:
            k, st, get, nargs = self._kspan[name]
            if len(args) != nargs:
                raise KeyError(name)
            vals = get(args)                    # (its args by name, in the order of its key)
        except (KeyError, TypeError):
            k, st, get, nargs = self._key_s(name, args)
            vals = get(args)
        for v in vals:
            if v.__class__ is not int:          # (a bool, a float, a string...: as JSON, types kept)
                self._extra(("s", t0, t1 - t0, name, mm, args), t)
                return
        off = self._off
        try:
            st.pack_into(self._b, off, k, t0, t1 - t0, mm, *vals)
        except Exception:
            self._extra(("s", t0, t1 - t0, name, mm, args), t)
            return
        self._off = off = off + st.size
        if t >= self._deadline or off >= self._limit:
            self.flush()

    def _key_s(self, name, args: dict) -> tuple:
        """The key of a span of this name with these arg names (a span name that comes with other arg
        names, or in another order, gets a key of its own: the latest is tried first)."""
        names = tuple(args)
        name = _hashable(name)
        per = self._kspan.setdefault(("all", name), {})
        ks = per.get(names)
        if ks is None:
            st = struct.Struct("<" + "q" * (4 + len(args)))
            if st.size > _SLACK:
                st = _NO_ROOM                   # (that many arguments: the span goes as JSON)
            get = (lambda a: ()) if not names else (
                (lambda a, _n=names[0]: (a[_n],)) if len(names) == 1 else operator.itemgetter(*names))
            ks = per[names] = (self._define(("s", name, list(names))), st, get, len(names))
        self._kspan[name] = ks
        return ks

    def group(self, msgs, *spans) -> "Group":
        """Compile a group: records written as one by `emit` (its messages, (dir, peer, type) each, then
        its spans, (name, (arg names...)) each).  Call once, keep the result: `emit(g, t, *words)` takes
        per message ts, mm, sub, addr, n, old, new, corr, then per span ts, dur, mm and its args in order
        (ints; addr, old, new u64).  A span alone is an "s" key."""
        msgs = tuple((str(d), _hashable(p), _hashable(t)) for d, p, t in msgs)
        if any(d not in ("send", "recv") for d, _, _ in msgs):
            raise ValueError(f"a group's message direction must be 'send' or 'recv': {msgs!r}")
        spans = tuple((_hashable(name), tuple(names)) for name, names in spans)
        if not msgs and not spans:
            raise ValueError("an empty group")
        spec = (msgs, spans)
        g = self._kgroup.get(spec)
        if g is None:
            st = struct.Struct("<q" + _G_MSG * len(msgs) + "".join("qqq" + "q" * len(a) for _, a in spans))
            if not msgs and len(spans) == 1:
                d = ("s", spans[0][0], list(spans[0][1]))
            else:
                d = ("g", [list(m) for m in msgs], [[name, list(names)] for name, names in spans])
            g = self._kgroup[spec] = Group(self._define(d), st.pack_into, st.size, d)
        return g

    def emit(self, g: "Group", t: int, *words) -> None:
        """One group's records (see `group`); t: a stamp of about now (the latest of its stamps)."""
        off = self._off
        try:
            g.pack(self._b, off, g.key, *words)
        except Exception:                       # (a value that is no int64 / u64: as JSON)
            if len(words) != g.nwords:
                raise TypeError(f"group {g.d!r} takes {g.nwords} words, {len(words)} given") from None
            for r in _expand(g.d, [w if w.__class__ is int else _hashable(w) for w in words], 0, -1):
                self._extra(tuple(r), t)
            return
        self._off = off = off + g.size
        if t >= self._deadline or off >= self._limit:
            self.flush()

    def counter(self, name: str, value) -> None:
        t = _now()
        if value.__class__ is not int:
            self._extra(("c", t, name, value), t)
            return
        try:
            k = self._kctr[name]
        except (KeyError, TypeError):
            name = _hashable(name)
            k = self._kctr.get(name)
            if k is None:
                k = self._kctr[name] = self._define(("c", name))
        off = self._off
        try:
            _PACK_C(self._b, off, k, t, value)
        except Exception:
            self._extra(("c", t, name, value), t)
            return
        self._off = off = off + _C_SIZE
        if t >= self._deadline or off >= self._limit:
            self.flush()

    def _extra(self, rec: tuple, t: int) -> None:
        """A record that is not all int64 words: key 0, the record itself as JSON in its chunk."""
        self._x.append(rec)
        off = self._off
        _PACK_0(self._b, off, 0)
        self._off = off = off + 8
        if t >= self._deadline or off >= self._limit:
            self.flush()

    def _record(self, k: int, v: tuple) -> tuple:
        d = self._defs[k]
        return ("m", v[0], d[1], d[2], d[3], *v[1:])

    # ------------------------------------------------------------------ flushing
    def flush(self) -> None:
        """Write every buffered record as one chunk, with one write."""
        off, self._off = self._off, 0
        x, self._x = self._x, []
        if self._fd is None:      # closed, or a forked copy: drop
            self._deadline = 0
            return
        self._deadline = _now() + self._interval
        if not off:
            return
        new = self._new
        js = _enc([self._new_first, new, x]).encode() if (new or x) else b""
        words = memoryview(self._b)[:off]          # (packed little-endian: "<")
        head = CHUNK.pack(MAGIC, len(js), off // 8, zlib.crc32(words, zlib.crc32(js)))
        try:
            k = os.writev(self._fd, (head, js, words))
            if k < len(head) + len(js) + off:       # (a regular file takes it whole; else the rest)
                data = (head + js + bytes(words))[k:]
                while data:
                    data = data[os.write(self._fd, data):]
        except OSError:
            return                # a full disk or a closed fd must not take the actor down (the keys
                                  # not written go with the next chunk)
        finally:
            words.release()
        self._new_first += len(new)
        self._new = []

    def close(self) -> None:
        """Write the end record, flush and close the file; safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        self._x.append(("e", _now()))
        _PACK_0(self._b, self._off, 0)
        self._off += 8
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
        self._off, self._x = 0, []

    def _forked(self) -> None:
        fd, self._fd = self._fd, None
        self._off, self._x = 0, []
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


# ============================================================================ reading
class TraceFileError(ValueError):
    """A .ktrace file that is cut short or damaged: what is wrong, where (the records before it are read)."""


def _def_ok(d) -> bool:
    if type(d) is not list or not d:
        return False
    if d[0] == "m":
        return len(d) == 4 and d[1] in ("send", "recv")
    if d[0] == "s":
        return len(d) == 3 and type(d[2]) is list
    if d[0] == "g":
        return (len(d) == 3 and type(d[1]) is list and type(d[2]) is list and bool(d[1] or d[2])
                and all(type(m) is list and len(m) == 3 and m[0] in ("send", "recv") for m in d[1])
                and all(type(x) is list and len(x) == 2 and type(x[1]) is list for x in d[2]))
    return d[0] == "c" and len(d) == 2


def read_records(path: str) -> tuple[list, int, "TraceFileError | None"]:
    """Every record of a .ktrace file, in file order, each a list (as a JSON line of the format would
    read): (records, chunks skipped, the error that stopped the reading or None).  A chunk cut short
    (a SIGKILL during its write), a damaged one (checksum) or anything that is not a chunk ends the
    reading there: the records of the chunks before it are returned, with the error naming the file
    and the byte offset."""
    with open(path, "rb") as f:
        data = f.read()
    name = os.path.basename(path)
    recs: list = []
    defs: list = [None]
    glen: dict = {}                # group key -> its words
    off, size, hs = 0, len(data), CHUNK.size
    while off < size:
        if size - off < hs:
            return recs, 1, TraceFileError(f"{name}: cut short at byte {off}: {size - off} bytes of a "
                                           f"{hs}-byte chunk header")
        magic, jl, nw, crc = CHUNK.unpack_from(data, off)
        if magic != MAGIC:
            return recs, 1, TraceFileError(f"{name}: no chunk at byte {off} (starts {bytes(data[off:off + 4])!r}, "
                                           f"expected {MAGIC!r}): not a ksm-proto trace file, or damaged")
        end = off + hs + jl + 8 * nw
        if end > size:
            return recs, 1, TraceFileError(f"{name}: cut short at byte {off}: a chunk of {end - off} bytes, "
                                           f"{size - off} there")
        js, wb = data[off + hs:off + hs + jl], data[off + hs + jl:end]
        if zlib.crc32(wb, zlib.crc32(js)) != crc:
            return recs, 1, TraceFileError(f"{name}: damaged chunk at byte {off} (checksum mismatch)")
        try:
            first, new, extras = json.loads(js) if jl else (len(defs), (), ())
            if not all(_def_ok(d) for d in new) or not 1 <= first <= len(defs):
                raise ValueError("a bad key definition")
            if first < len(defs):
                glen.clear()
            defs[first:first + len(new)] = new
            words = array("q")
            words.frombytes(wb)
            if _SWAP:
                words.byteswap()
            ws = words.tolist()
            out: list = []
            i, xi, n = 0, 0, len(ws)
            while i < n:
                k = ws[i]
                if k == 0:
                    out.append(extras[xi])
                    xi += 1
                    i += 1
                    continue
                d = defs[k] if k > 0 else None      # (None: an unknown key, a TypeError below)
                kind = d[0]
                if kind == "m":
                    out.append(["m", ws[i + 1], d[1], d[2], d[3], ws[i + 2], ws[i + 3], ws[i + 4] & _U64, ws[i + 5],
                                ws[i + 6] & _U64, ws[i + 7] & _U64, ws[i + 8]])
                    i += 9
                elif kind == "g":
                    w = glen.get(k)
                    if w is None:
                        w = glen[k] = 1 + 8 * len(d[1]) + sum(3 + len(x[1]) for x in d[2])
                    j = i + w
                    if j > n:
                        raise ValueError("a group cut short")
                    out += _expand(d, ws, i + 1)
                    i = j
                elif kind == "s":
                    names = d[2]
                    j = i + 4 + len(names)
                    out.append(["s", ws[i + 1], ws[i + 2], d[1], ws[i + 3], dict(zip(names, ws[i + 4:j]))])
                    i = j
                else:
                    out.append(["c", ws[i + 1], d[1], ws[i + 2]])
                    i += 3
            if i != n or xi != len(extras):
                raise ValueError("the words do not end with a record")
        except (ValueError, TypeError, IndexError, KeyError) as e:
            return recs, 1, TraceFileError(f"{name}: bad chunk at byte {off}: {e}")
        recs += out
        off = end
    return recs, 0, None
