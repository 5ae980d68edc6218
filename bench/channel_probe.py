"""Where a channel round trip's time goes: our Channel against raw uvloop, end by end.

`bench --only cow` compares our channel's ping-pong (proto.channel.Channel on both ends, one
`call` per round trip) with a sleeping pipe's.  This probe splits the difference: the same
round trip with a raw uvloop Protocol on one end or both (a write back, a future per call: the
event loop's own floor), in interleaved repetitions, so that what each of our ends adds over the
loop is measured in the same minutes as the pipe (docs/performance-notes.md, "The channel").

    .venv/bin/python bench/channel_probe.py [--reps 5] [--n 5000] [--json FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import uvloop  # noqa: E402

from proto.channel import Channel  # noqa: E402
from proto.messages import Msg, encode  # noqa: E402

ENDS = (("raw", "raw"), ("raw", "channel"), ("channel", "raw"), ("channel", "channel"))   # (echo, caller)


class _Raw(asyncio.Protocol):
    """The loop's floor: the echo writes a fixed ACK back; the caller's read resolves its one future."""

    def __init__(self, done: asyncio.Future | None):
        self.done, self.fut, self.transport = done, None, None
        self.ack = encode(Msg.ACK, corr=1)

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.done is not None:
            self.transport.write(self.ack)
        elif self.fut is not None:
            self.fut.set_result(data)

    def connection_lost(self, exc):
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


def round_trips(n: int, echo: str, caller: str) -> list[float]:
    """n round trips (us) between a forked echo and this process, each end raw uvloop or our Channel
    (both ours: `bench --only cow`'s bare channel ping-pong).  One correlation id for every call: the
    raw echo answers each request with the same ACK."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            a.close()

            async def serve():
                loop = asyncio.get_running_loop()
                done = loop.create_future()
                if echo == "raw":
                    await loop.create_connection(lambda: _Raw(done), sock=b)
                else:
                    await loop.create_connection(lambda: Channel(
                        "echo", lambda ch, f: ch.send(encode(Msg.ACK, corr=f.corr)),
                        lambda ch: done.done() or done.set_result(None)), sock=b)
                await asyncio.wait_for(done, 30 + n / 1000)
            uvloop.run(serve())
        finally:
            os._exit(0)
    b.close()
    ts: list[float] = []

    async def ping():
        loop = asyncio.get_running_loop()
        if caller == "raw":
            _, p = await loop.create_connection(lambda: _Raw(None), sock=a)
            for _ in range(n):
                t = time.perf_counter_ns()
                p.fut = loop.create_future()
                p.transport.write(encode(Msg.START, corr=1))
                await p.fut
                ts.append((time.perf_counter_ns() - t) / 1000)
            p.transport.close()
        else:
            _, ch = await loop.create_connection(lambda: Channel("ping", lambda c, f: None), sock=a)
            for _ in range(n):
                t = time.perf_counter_ns()
                await ch.call(1, encode(Msg.START, corr=1), 5)
                ts.append((time.perf_counter_ns() - t) / 1000)
            ch.close()
    try:        # (one timeout over the whole run: a timer per call would cost the raw floor ~3 us)
        uvloop.run(asyncio.wait_for(ping(), 30 + n / 1000))
    finally:
        a.close()
        os.waitpid(pid, 0)
    return ts


def probe(reps: int, n: int, prog=print) -> dict:
    """Interleaved repetitions of the sleeping pipe and the four end pairs: p50s per repetition, and
    what each of our ends adds over raw uvloop (median of the per-repetition differences)."""
    from bench.run import pct, pipe_pingpong, spread      # (bench.run's channel_pingpong is round_trips)
    rows: dict[str, list[float]] = {"pipe": [], **{f"{e}/{c}": [] for e, c in ENDS}}
    for r in range(reps):
        prog(f"channel probe: repetition {r + 1}/{reps}")
        rows["pipe"].append(pct(pipe_pingpong(n, (0, 1) if (os.cpu_count() or 1) > 1 else None), 50))
        for e, c in ENDS:
            rows[f"{e}/{c}"].append(pct(round_trips(n, e, c), 50))

    def added(a: str, b: str) -> dict:
        return spread([y - x for x, y in zip(rows[a], rows[b])])
    return {"n": n, "reps": reps, "p50_us": {k: [round(x, 1) for x in v] for k, v in rows.items()},
            "ratio_vs_pipe": {k: spread([x / p for x, p in zip(v, rows["pipe"])]) for k, v in rows.items()
                              if k != "pipe"},
            "added_us": {"our echo end": added("raw/raw", "channel/raw"),
                         "our calling end": added("raw/raw", "raw/channel"),
                         "both": added("raw/raw", "channel/channel")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n", type=int, default=5000, help="round trips per measurement")
    ap.add_argument("--json", help="also write the result to this file")
    a = ap.parse_args(argv)
    if a.reps < 1 or a.n < 1:
        ap.error("--reps and --n must be at least 1")
    res = probe(a.reps, a.n, lambda s: print(s, file=sys.stderr))
    print(f"{'echo/caller':20s} p50 per repetition (us)")
    for k, v in res["p50_us"].items():
        print(f"{k:20s} {v}" + (f"  {res['ratio_vs_pipe'][k]['median']}x the pipe" if k != "pipe" else ""))
    for k, v in res["added_us"].items():
        print(f"added over raw uvloop, {k}: {v['median']:.1f} us ({v['min']:.1f}-{v['max']:.1f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
