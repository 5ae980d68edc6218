"""Messages between actors and their binary encoding (one frame = one message).

    0      2      6    7    8      10     14        22        30     34     38
    +------+------+----+----+------+------+---------+---------+------+------+----------+----------+
    |magic | len  |type|sub |flags |  mm  |  corr   |  addr   |  n   | plen | n x      | payload  |
    | 'KS' | u32  | u8 | i8 | i16  | i32  |  i64    |  u64    | u32  | u32  | (addr,   | plen     |
    |      |      |    |    |      |      |         |         |      |      |  pte) u64| bytes    |
    +------+------+----+----+------+------+---------+---------+------+------+----------+----------+

`len` counts the whole frame.  Notifier messages carry n page entries (a batch
of single-page notifications for one mm: START for n pages, then CHANGE_PTE for
the same n, then END); ACK answers a message by its `corr`.  Control calls
(CALL/REPLY) carry a JSON object plus raw bytes in the payload.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

MAGIC = 0x534B  # b"KS" little-endian
HEADER = struct.Struct("<HIBbhiqQII")
HEADER_SIZE = HEADER.size
_U64 = np.dtype(np.uint64)
MAX_FRAME = 64 << 20          # the largest frame either end sends or accepts (header included)
MAX_DATA = 16 << 20           # raw bytes one CALL/REPLY carries: the API splits larger reads and writes


class Msg(IntEnum):
    # mmu_notifier callbacks, delivered to one secondary MMU (`sub`) of an mm
    REGISTER = 1
    START = 2          # invalidate_range_start
    END = 3            # invalidate_range_end
    CHANGE_PTE = 4
    INVALIDATE_PAGE = 5
    CLEAR_YOUNG = 6    # clear_flush_young; the ack's flags carry "young"
    RELEASE = 7
    ACK = 8
    # faults (VM -> fault handler) and their replies
    FAULT = 10
    FAULT_REPLY = 11
    APPLIED = 12       # VM -> fault handler: a COW reply's PTEs are applied to its secondary MMUs (corr: the FAULT's)
    # set-up and control
    HELLO = 20         # a VM introduces itself on a new channel (mm in header)
    CALL = 21          # control call: payload = json {"op": ..., ...} + raw bytes
    REPLY = 22
    SHARD = 23         # scanner to scanner (workers/mm/ksm/shard.py): payload = json header + raw arrays


NOTIFIER_TYPES = frozenset({Msg.REGISTER, Msg.START, Msg.END, Msg.CHANGE_PTE,
                            Msg.INVALIDATE_PAGE, Msg.CLEAR_YOUNG, Msg.RELEASE})
_VALID_TYPES = frozenset(int(m) for m in Msg)

# FAULT flags
FAULT_WRITE = 1 << 0
FAULT_UNSHARE = 1 << 1   # break_ksm: unmerge even without a write (MADV_UNMERGEABLE)


class ProtocolError(ValueError):
    """A malformed frame: bad magic, impossible length, unknown type, short body."""


@dataclass(slots=True)
class Frame:
    type: int
    sub: int = 0
    flags: int = 0
    mm: int = 0
    corr: int = 0
    addr: int = 0
    entries: np.ndarray | list | None = None   # uint64 shaped (n, 2): (addr, pte); a record's: [(addr, pte)]
    payload: bytes = b""
    _json: dict | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return 0 if self.entries is None else len(self.entries)

    def json(self) -> dict:
        """The JSON part of a CALL/REPLY payload."""
        if self._json is None:
            if len(self.payload) < 4:
                raise ProtocolError(f"{Msg(self.type).name} payload too short for a JSON header")
            jl = int.from_bytes(self.payload[:4], "little")
            try:
                self._json = json.loads(self.payload[4:4 + jl])
            except (ValueError, RecursionError) as e:
                raise ProtocolError(f"{Msg(self.type).name} payload is not JSON: {e}") from None
            if not isinstance(self._json, dict):
                raise ProtocolError(f"{Msg(self.type).name} payload JSON is not an object")
        return self._json

    def data(self) -> bytes:
        """The raw-bytes part of a CALL/REPLY payload."""
        if len(self.payload) < 4:
            return b""
        jl = int.from_bytes(self.payload[:4], "little")
        return self.payload[4 + jl:]


def call_payload(obj: dict, data: bytes | memoryview = b"") -> bytes:
    j = json.dumps(obj, separators=(",", ":")).encode()
    return len(j).to_bytes(4, "little") + j + bytes(data)


def encode(type: int, sub: int = 0, flags: int = 0, mm: int = 0, corr: int = 0,
           addr: int = 0, entries: np.ndarray | None = None, payload: bytes = b"") -> bytes:
    if entries is None and not payload:     # (a header alone: most messages)
        return HEADER.pack(MAGIC, HEADER_SIZE, type, sub, flags, mm, corr, addr, 0, 0)
    eb = b"" if entries is None else np.ascontiguousarray(entries, dtype=np.uint64).tobytes()
    n = len(eb) // 16
    total = HEADER_SIZE + len(eb) + len(payload)
    if total > MAX_FRAME:       # the sender's side of the limit: the receiver would close the stream
        raise ProtocolError(f"a frame (type {type}) of {total} bytes exceeds the {MAX_FRAME}-byte limit")
    return HEADER.pack(MAGIC, total, type, sub, flags, mm, corr, addr, n, len(payload)) + eb + payload


def encode_frame(f: Frame) -> bytes:
    return encode(f.type, f.sub, f.flags, f.mm, f.corr, f.addr, f.entries, f.payload)


# A frame with one entry and no payload, as a fixed-size record: the one-page FAULT and a one-page COW's
# FAULT_REPLY (the fault path's two records, packed at once by their senders and read by `decode_record`).
RECORD = struct.Struct(HEADER.format + "QQ")


def decode_record(data: bytes, types: frozenset) -> Frame | None:
    """`data` as one RECORD of one of `types`, without numpy: the frame's entries are a list of its
    one (addr, pte) pair (a page of the fault path costs less as plain ints).  None for anything
    else, or for a record whose header does not add up: `decode` then takes it (and says what is
    wrong)."""
    if len(data) != RECORD.size:
        return None
    magic, total, type, sub, flags, mm, corr, addr, n, plen, a, p = RECORD.unpack(data)
    if magic != MAGIC or total != RECORD.size or n != 1 or plen or type not in types:
        return None
    return Frame(type, sub, flags, mm, corr, addr, [(a, p)])


def decode(buf: bytes | memoryview) -> Frame:
    """Decode exactly one whole frame (as cut by the channel); ProtocolError if malformed."""
    if len(buf) < HEADER_SIZE:
        raise ProtocolError(f"frame of {len(buf)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, total, type, sub, flags, mm, corr, addr, n, plen = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic:#06x}")
    if total > MAX_FRAME:
        raise ProtocolError(f"frame of {total} bytes exceeds the {MAX_FRAME}-byte limit")
    if total != len(buf) or total != HEADER_SIZE + 16 * n + plen:
        raise ProtocolError(f"length {total} does not match header (n={n}, plen={plen}, got {len(buf)})")
    if type not in _VALID_TYPES:
        raise ProtocolError(f"unknown message type {type}")
    if total == HEADER_SIZE:                # (a header alone: most messages)
        return Frame(type, sub, flags, mm, corr, addr)
    entries = None
    if n:       # read-only either way: a view of the (immutable) frame, or of a copy of the memoryview's bytes
        entries = np.ndarray((n, 2), _U64, buf if buf.__class__ is bytes else bytes(buf), HEADER_SIZE)
    payload = bytes(buf[HEADER_SIZE + 16 * n:]) if plen else b""
    return Frame(type, sub, flags, mm, corr, addr, entries, payload)
