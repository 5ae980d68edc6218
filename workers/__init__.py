"""ksm-proto's actors (supervisor, VM worker, ksmd, fault handler) and their pure logic modules.

`from workers import Machine` is the Python API.
"""


def __getattr__(name):
    if name in ("Machine", "VM", "KSMControl"):
        from . import machine
        return getattr(machine, name)
    raise AttributeError(name)


__all__ = ["Machine", "VM", "KSMControl"]
