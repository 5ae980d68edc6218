"""Hostile peers: nobody but the run's own processes reaches a channel, and a channel speaks for one mm.

The attacker is a real process of another uid (65534, nobody) where the tests run as root
(skipped otherwise), talking raw bytes with nothing of ours imported.  After every attack
the victim VM still works and its data is intact.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from proto import MADV_MERGEABLE, PAGE_SIZE

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the attacker runs as uid 65534: needs root to drop to it")

# A peer that knows the wire format (it is in the source) and nothing else of ours.
ATTACKER_LIB = textwrap.dedent('''
    import errno, json, os, socket, struct, sys
    HDR = struct.Struct("<HIBbhiqQII")
    ACK, FAULT, FAULT_REPLY, APPLIED, HELLO, CALL, REPLY = 8, 10, 11, 12, 20, 21, 22

    def frame(type, mm, corr, entries=(), payload=b"", flags=0):
        eb = b"".join(struct.pack("<QQ", a, p) for a, p in entries)
        return HDR.pack(0x534B, HDR.size + len(eb) + len(payload), type, 0, flags, mm, corr, 0,
                        len(entries), len(payload)) + eb + payload

    def call_payload(obj):
        j = json.dumps(obj).encode()
        return len(j).to_bytes(4, "little") + j

    def read_frame(s):
        """(type, flags, corr, json or None) of the next frame; "EOF" when the peer closed; "none" on timeout."""
        buf = b""
        try:
            while len(buf) < HDR.size:
                d = s.recv(HDR.size - len(buf))
                if not d:
                    return "EOF"
                buf += d
            magic, total, type, sub, flags, mm, corr, addr, n, plen = HDR.unpack(buf)
            rest = b""
            while len(rest) < total - HDR.size:
                d = s.recv(total - HDR.size - len(rest))
                if not d:
                    return "EOF"
                rest += d
        except socket.timeout:
            return "none"
        body = rest[16 * n:]
        j = json.loads(body[4:4 + int.from_bytes(body[:4], "little")]) if len(body) >= 4 else None
        return [type, flags, corr, j]
''')


@functools.lru_cache(maxsize=None)
def nobody_python() -> str | None:
    """A python3 that uid 65534 can run (ours may live under a 0700 home)."""
    for cand in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3", shutil.which("python3")):
        if not cand:
            continue
        try:
            p = subprocess.run([cand, "-c", "import json, socket, struct"], user=NOBODY, group=NOBODY,
                               extra_groups=[], capture_output=True, timeout=30, cwd="/")
        except OSError:
            continue
        if p.returncode == 0:
            return cand
    return None


def attacker(script: str, *args, pass_fds=(), timeout=60) -> dict:
    """Run `script` (after ATTACKER_LIB) as uid/gid 65534 with no supplementary groups; its JSON output."""
    py = nobody_python()
    if py is None:
        pytest.skip("no python3 that uid 65534 may run")
    p = subprocess.run([py, "-c", ATTACKER_LIB + textwrap.dedent(script), *map(str, args)],
                       user=NOBODY, group=NOBODY, extra_groups=[], pass_fds=pass_fds, capture_output=True,
                       text=True, timeout=timeout, cwd="/")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def victim(m, name="victim"):
    vm = m.spawn_vm(name)
    a = vm.mmap(8 * PAGE_SIZE)
    data = bytes(range(256)) * (8 * PAGE_SIZE // 256)
    vm.write(a, data)
    return vm, a, data


def still_works(m, vm, a, data):
    assert vm.read(a, len(data)) == data
    vm.write(a, b"after")                       # a COW-free write, then one that needs the fault handler
    b = vm.mmap(PAGE_SIZE)
    vm.write(b, b"new page")
    assert vm.read(a, 5) == b"after" and vm.read(b, 8) == b"new page"
    vm.write(a, data[:5])
    assert m.check_frames() == []


SCAN = '''
    run, pids = sys.argv[1], json.loads(sys.argv[2])
    res = {"uid": os.getuid(), "gid": os.getgid()}
    with open("/proc/net/unix") as f:
        res["names"] = [l.split()[7] for l in f.read().splitlines()[1:] if len(l.split()) > 7 and run in l]
    res["connect"] = {}
    for actor in ("faultd", "ksmd"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect("\\0" + run + "." + actor)
            res["connect"][actor] = "connected"
        except OSError as e:
            res["connect"][actor] = errno.errorcode[e.errno]
    res["shm"] = {}
    for what in ("frames", "frametab", "stats", "mm.0", "locks"):
        try:
            open("/dev/shm/" + run + "." + what, "rb").close()
            res["shm"][what] = "opened"
        except OSError as e:
            res["shm"][what] = errno.errorcode[e.errno]
    res["signal"] = {}
    for name, pid in pids.items():
        try:
            os.kill(pid, 0)
            res["signal"][name] = "allowed"
        except OSError as e:
            res["signal"][name] = errno.errorcode[e.errno]
    print(json.dumps(res))
'''


@as_root
def test_another_uid_finds_nothing_to_connect_to(ksm_machine):
    """The run listens on no name: /proc/net/unix shows none, connecting to the names it once had is
    refused (for root too), its shared memory and lock file are 0600, its processes unsignalable."""
    m = ksm_machine
    vm, a, data = victim(m)
    pids = {"ksmd": m.ksmd.pid, "faultd": m.faultd.pid, "vm": vm.pid}
    res = attacker(SCAN, m.run, json.dumps(pids))
    assert res == {"uid": NOBODY, "gid": NOBODY, "names": [],
                   "connect": {"faultd": "ECONNREFUSED", "ksmd": "ECONNREFUSED"},
                   "shm": {w: "EACCES" for w in ("frames", "frametab", "stats", "mm.0", "locks")},
                   "signal": {n: "EPERM" for n in pids}}
    for actor in ("faultd", "ksmd"):         # nor can this uid
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with pytest.raises(ConnectionRefusedError):
            s.connect(f"\0{m.run}.{actor}")
        s.close()
    still_works(m, vm, a, data)


BOUND = '''
    fault = socket.socket(fileno=int(sys.argv[1])); ksmd = socket.socket(fileno=int(sys.argv[2]))
    mine, victim, victim_addr = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    for s in (fault, ksmd):
        s.settimeout(2)
    out = {}
    def ask(s, key, data):
        s.sendall(data)
        out[key] = read_frame(s)
    ask(fault, "fault_before_hello", frame(FAULT, mine, 1, [(victim_addr, 0)], flags=1))
    ask(fault, "hello_as_victim", frame(HELLO, victim, 2, payload=call_payload({"name": "vm:victim"})))
    ask(fault, "fault_as_victim", frame(FAULT, victim, 3, [(victim_addr + 4096 * k, 0) for k in range(8)], flags=1))
    ask(fault, "hello", frame(HELLO, mine, 4, payload=call_payload({"name": "vm:evil"})))
    ask(fault, "hello_again", frame(HELLO, mine, 5, payload=call_payload({"name": "vm:evil"})))
    ask(fault, "fault_no_entries", frame(FAULT, mine, 6, flags=1))
    ask(fault, "fault_below_user_base", frame(FAULT, mine, 7, [(0x1000, 0)], flags=1))
    ask(fault, "call", frame(CALL, mine, 8, payload=call_payload({"op": "munmap", "addr": victim_addr,
                                                                  "length": 8 * 4096})))
    ask(fault, "fault_no_vma", frame(FAULT, mine, 9, [(victim_addr, 0)], flags=1))
    # APPLIED names a COW reply by its FAULT's corr: none is waiting here, and none may be answered for the victim
    ask(fault, "applied_unknown", frame(APPLIED, mine, 9))
    ask(fault, "applied_as_victim", frame(APPLIED, victim, 3))
    # frame-shaped garbage: a good magic and an impossible length; then a well-formed HELLO it must not read
    ask(fault, "garbage", b"KS" + (0xFFFFFFF0).to_bytes(4, "little") + b"x" * 40
        + frame(HELLO, victim, 10, payload=call_payload({"name": "x"})))
    ask(ksmd, "ksmd_hello_as_victim", frame(HELLO, victim, 11, payload=call_payload({"name": "vm:victim"})))
    ask(ksmd, "ksmd_hello", frame(HELLO, mine, 12, payload=call_payload({"name": "vm:evil"})))
    ask(ksmd, "ksmd_fault", frame(FAULT, victim, 13, [(victim_addr, 0)], flags=1))
    ask(ksmd, "ksmd_garbage", b"\\x00" * 64)
    print(json.dumps(out))
'''


@as_root
def test_a_channel_speaks_for_its_mm_only(ksm_machine):
    """A channel end in the hands of another uid (as if a VM were taken over): HELLO or FAULT for the
    victim's mm, a second HELLO, a control CALL, broken framing: refused, logged, counted; nothing
    is done to the victim; every FAULT is answered; a second channel for a live mm is refused."""
    m = ksm_machine
    vm, a, data = victim(m)
    mine, _ = m._new_mm(16)
    ends = [m._bind(actor, mine, "evil") for actor in ("faultd", "ksmd")]
    try:
        res = attacker(BOUND, ends[0].fileno(), ends[1].fileno(), mine, vm.mm_id, a,
                       pass_fds=[e.fileno() for e in ends])
    finally:
        for e in ends:
            e.close()
    FAULT_REPLY, ACK, REPLY = 11, 8, 22
    assert res["fault_before_hello"][:3] == [FAULT_REPLY, errno.EPERM, 1]
    assert res["hello_as_victim"][:3] == [REPLY, 0, 2] and res["hello_as_victim"][3]["errno"] == errno.EPERM
    assert res["fault_as_victim"][:3] == [FAULT_REPLY, errno.EPERM, 3]
    assert res["hello"] == [ACK, 0, 4, None]
    assert res["hello_again"][:3] == [REPLY, 0, 5] and res["hello_again"][3]["errno"] == errno.EPERM
    assert res["fault_no_entries"][:3] == [FAULT_REPLY, errno.EINVAL, 6]
    assert res["fault_below_user_base"][:3] == [FAULT_REPLY, errno.EFAULT, 7]
    assert res["call"] == "none"                    # refused: no answer, no action
    assert res["fault_no_vma"][:3] == [FAULT_REPLY, errno.EFAULT, 9]
    assert res["applied_unknown"] == "none" and res["applied_as_victim"] == "none"   # refused: no answer
    assert res["garbage"] == "EOF"                  # broken framing: closed, the HELLO behind it unread
    assert res["ksmd_hello_as_victim"][:3] == [REPLY, 0, 11]
    assert res["ksmd_hello_as_victim"][3]["errno"] == errno.EPERM
    assert res["ksmd_hello"] == [ACK, 0, 12, None]
    assert res["ksmd_fault"] == "none"
    assert res["ksmd_garbage"] == "EOF"
    # the supervisor cannot be made to bind a second channel to a live mm either
    for actor in ("faultd", "ksmd"):
        with pytest.raises(OSError) as ei:
            m._bind(actor, vm.mm_id, "again")
        assert ei.value.errno == errno.EBUSY
    assert m.faultd.call("stats")[0]["refused"] == 8      # 7 frames + the second channel
    assert m.ksmd.call("info")[0]["refused"] == 3         # 2 frames + the second channel
    still_works(m, vm, a, data)
    # and ksmd still reaches the victim's secondary MMU: a merge with another VM
    other = m.spawn_vm("other")
    b = other.mmap(PAGE_SIZE)
    page = b"\x5a" * PAGE_SIZE
    other.write(b, page)
    vm.write(a, page)
    for v, x in ((vm, a), (other, b)):
        v.madvise(x, PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.set(pages_to_scan=1000, sleep_millisecs=0, run=1)
    s = m.ksm.wait_stable(30)
    m.ksm.set(run=0)
    assert (s["pages_shared"], s["pages_sharing"]) == (1, 1)
    assert vm.read(a, PAGE_SIZE) == page and vm.read(a + PAGE_SIZE, len(data) - PAGE_SIZE) == data[PAGE_SIZE:]
    assert m.check_frames() == []


def test_guest_data_never_becomes_a_command(ksm_machine_factory):
    """A write larger than one frame whose pages each hold a frame-shaped CALL (munmap of another
    region): split by the API, written as data, read back as data; the other region stays."""
    from proto.messages import MAX_FRAME, Msg, call_payload, encode
    m = ksm_machine_factory(frames=24 * 1024)
    vm = m.spawn_vm("a", pages=24 * 1024)
    other = vm.mmap(4 * PAGE_SIZE)
    vm.write(other, b"keep me" * 100)
    evil = encode(Msg.CALL, corr=7, payload=call_payload({"op": "munmap", "addr": other, "length": 4 * PAGE_SIZE}))
    page = evil + b"\x00" * (PAGE_SIZE - len(evil))
    n = MAX_FRAME // PAGE_SIZE + 256                 # more than one frame can carry
    a = vm.mmap(n * PAGE_SIZE)
    data = page * n
    vm.write(a, data)
    assert vm.read(other, 700) == b"keep me" * 100
    got = vm.read(a, len(data))
    assert got == data
    assert m.check_frames() == []


def test_a_gigabyte_write_simply_works(ksm_machine_factory):
    gib = 1 << 30
    m = ksm_machine_factory(frames=gib // PAGE_SIZE + 1024)
    vm = m.spawn_vm("big", pages=gib // PAGE_SIZE + 64)
    a = vm.mmap(gib)
    data = bytes(range(251)) * (gib // 251) + bytes(gib % 251)      # no two neighbouring pages alike
    vm.write(a, data)
    assert vm.read(a, gib) == data
    assert m.alloc.nr_free == 1024 - 1      # every page of the GiB holds a frame (pfn 0 is the zero page)
