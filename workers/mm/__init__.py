"""The protocol cores: merge, COW fault, notifier and VM access as IO-free generators.

Each long operation is a generator that yields *effects* (core/effects.py): take or
release a lock, load or store a shared field, allocate or put frames, compare or copy
frame bytes, send notifier messages and wait for their acks.  The actor processes
(ksmd.py, faultd.py, vm.py) drive these generators against POSIX shared memory and
asyncio channels; `ksm-proto check` (check_world.py) drives the very same generators in
one process, one effect per scheduling point, and checks the invariants
(core/invariants.py) after every step.  Nothing here imports asyncio, posix_ipc,
socket or a clock.
"""
