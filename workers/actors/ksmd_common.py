"""The names ksmd.py and its parts share (constants, the logger)."""
from __future__ import annotations

import logging
import os




log = logging.getLogger("ksm_proto.ksmd")


KSMD_NICE = 5               # the kernel's ksmd: set_user_nice(current, 5)


def hash_ahead_enabled() -> bool:
    """The pipelined rounds (several scanners hash the next round's pages while they wait at a barrier,
    mm.ksm.ahead): on unless KSM_PROTO_HASH_AHEAD=0 (the bench's comparison)."""
    v = os.environ.get("KSM_PROTO_HASH_AHEAD", "1")
    if v not in ("0", "1"):
        raise SystemExit(f"KSM_PROTO_HASH_AHEAD={v!r}: must be 0 (off) or 1 (on)")
    return v == "1"


FOLLOWER_OPS = frozenset({"ping", "attach_mm", "restore", "freeze", "thaw"})   # what a follower serves itself
