"""The names ksmd.py and its parts share (constants, the logger)."""
from __future__ import annotations

import logging




log = logging.getLogger("ksm_proto.ksmd")


KSMD_NICE = 5               # the kernel's ksmd: set_user_nice(current, 5)


FOLLOWER_OPS = frozenset({"ping", "attach_mm", "restore", "freeze", "thaw"})   # what a follower serves itself
