"""The actors, one module each: ksmd, faultd, vm, the supervisor (Machine) and the reaper.

Each is a thin process: read a message, hand it to a core (workers/mm), perform its effects
(workers/runtime). No actor imports another.
"""
