"""The actors, one module each: ksmd, faultd, vm, the supervisor (Machine) and the reaper.

Each is a thin process: read a message, hand it to a core (workers/mm), perform its effects
(workers/runtime). No actor imports another.
"""

# the supervisor's last word to its reaper (on the pipe, before its end): the run is torn down, every
# actor stopped and every entry unlinked, so the reaper need not give the actors their grace
REAPER_CLEAN = b"clean"
