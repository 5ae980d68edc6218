"""ksm-proto's actors (supervisor, VM worker, ksmd, fault handler) and their pure logic modules.

`from workers import Machine` is the Python API.
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the checkout: actors start here


def __getattr__(name):
    if name in ("Machine", "VM", "KSMControl"):
        from workers.actors import supervisor as machine
        return getattr(machine, name)
    raise AttributeError(name)


__all__ = ["Machine", "VM", "KSMControl"]
