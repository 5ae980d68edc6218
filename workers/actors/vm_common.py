"""The names vm.py and its parts share (constants, the logger)."""
from __future__ import annotations

import logging

import numpy as np

from proto.messages import Msg


log = logging.getLogger("ksm_proto.vm")


U64 = np.uint64


PROT_SEM = 0x8              # accepted and ignored, as on x86


_FAULT, _FAULT_REPLY, _APPLIED = int(Msg.FAULT), int(Msg.FAULT_REPLY), int(Msg.APPLIED)


_RECORDS = frozenset({_FAULT_REPLY})


FAST_WAIT_NS = 5_000_000    # the longest a fault's reply is waited for on its socket before the loop takes over
