"""The names faultd.py and its parts share (constants, the logger)."""
from __future__ import annotations

import logging
import os

import numpy as np

from proto.knobs import MITIGATIONS
from proto.messages import Msg


log = logging.getLogger("ksm_proto.faultd")


VUSION = MITIGATIONS.index("vusion")


U64 = np.uint64


# Reply once the notifications are sent, before their acks (ptl is still held until they are
# in, and the reply follows the notifications on the VM's FIFO channel): `ksm-proto check`
# runs with it and finds no violation in any mode.  KSM_PROTO_EARLY_REPLY=0 turns it off.
EARLY_REPLY = os.environ.get("KSM_PROTO_EARLY_REPLY", "1") == "1"


# A COW's set_pte_at_notify rides on the reply (core.fault.wp_page_copy_reply): the faulting VM applies
# it to its own secondary MMUs on arrival and answers APPLIED; the old frame is put after that.
# KSM_PROTO_COW_REPLY=0: notifier messages and acks as before.
COW_REPLY = os.environ.get("KSM_PROTO_COW_REPLY", "1") == "1"


class _Fault:
    """One FAULT being served: its channel and frame, when it was read, and where it is parked."""
    __slots__ = ("ch", "f", "t0", "gen", "deadline", "t_reply", "pte", "t_applied", "applied_addr")

    def __init__(self, ch, f):
        self.ch, self.f, self.t0, self.gen, self.deadline = ch, f, 0, None, 0.0
        # (traced: when its FAULT_REPLY went, with which PTE, when its APPLIED came, with which addr;
        # its records go as one at the end, FaultPath._trace_fault)
        self.t_reply = self.pte = self.t_applied = self.applied_addr = 0


_FAULT, _APPLIED, _FAULT_REPLY = int(Msg.FAULT), int(Msg.APPLIED), int(Msg.FAULT_REPLY)


_RECORDS = frozenset({_FAULT})          # a one-page FAULT is read as a record (proto.messages.decode_record)


# One-frame allocations (a COW's copy) from a reserve of this many free frames, taken off the free stack
# together under one hold of the frame lock (runtime/frames.py `keep_reserve`); given back on exit, taken
# back by the supervisor's repair when the handler dies.  KSM_PROTO_FRAME_RESERVE=0: one frame-lock hold
# per frame, as before.
def _reserve_batch() -> int:
    v = os.environ.get("KSM_PROTO_FRAME_RESERVE", "32")
    try:
        n = int(v)
    except ValueError:
        raise SystemExit(f"KSM_PROTO_FRAME_RESERVE={v!r}: not a whole number of frames") from None
    if n < 0:
        raise SystemExit(f"KSM_PROTO_FRAME_RESERVE={v!r}: must be >= 0")
    return n


FRAME_RESERVE = _reserve_batch()
# Near out of memory an idle fault handler gives its reserve back (FrameAllocator.drain_local_pages) on a
# timer of this period: the longest another handler's allocation can find those frames still aside.
RESERVE_DRAIN_S = 0.05
