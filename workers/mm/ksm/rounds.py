"""The scan's rounds (ksm_do_scan), with one scanner or several (mm.ksm.shard): the leader cuts
a batch, every scanner visits its part and routes pages to the owners of their contents, each
owner plans and merges its shard; followers serve the leader's rounds and control requests.

A mixin of KsmScan (mm.ksm.scan), which holds the state these methods share.
"""
from __future__ import annotations

import numpy as np

from workers.mm.effects import ShardSend
from workers.mm.ksm.shard import DONE, LEAD, ROUTED, Ctl, Done, Round, Routed
from workers.mm.ksm.mm_slot import SUMMED, load_candidates


class Rounds:
    """ksm_do_scan's rounds (a KsmScan mixin)."""

    # ------------------------------------------------------------------ one batch (a round)
    def ksm_do_scan(self, budget: int):
        """The leader: visit up to `budget` candidate pages, merge what matched; returns
        (pages scanned, merges planned, full scan ended), every scanner's work summed."""
        self.refresh_slots()
        if not self.order:
            return 0, 0, False
        out = [Routed() for _ in range(self.nshards)]
        new_scan = self.pos == 0 and self.cur is None
        parts, ended = yield from self.take_batch(budget, out)
        prune = ended and (self.clock() - self.last_prune) * 1000 >= self.knobs["stable_node_chains_prune_millisecs"]
        across = "ahead-across-scans" in self.brk      # (the break: a guess past the full scan's end)
        ahead = (yield from self.peek_batch(budget, ended)) if self.ahead and (across or not ended) else None
        self.seq += 1
        rnd = Round(self.seq, self.knobs, parts, new_scan, ended, prune, ahead)
        for k in self.others:
            yield ShardSend(k, LEAD, rnd)
        scanned, nops = yield from self.run_round(rnd, out)
        if "no-round-barrier" in self.brk and self.others:    # (the break: DONEs collected a round late)
            late, self.late = self.late, self.seq
            s, n = (yield from self._collect_now(late)) if late else (0, 0)
        else:
            s, n = yield from self._collect(self.seq)
        scanned, nops = scanned + s, nops + n
        if ended:
            self.end_full_scan(prune)
        return scanned, nops, ended

    def _collect(self, seq: int):
        """Every other scanner's DONE of round (or control request) seq: the barrier."""
        if self.late:           # (the no-round-barrier break's last round first)
            late, self.late = self.late, 0
            yield from self._collect_now(late)
        return (yield from self._collect_now(seq))

    def _collect_now(self, seq: int):
        if not self.others:
            return 0, 0
        scanned = nops = 0
        for k, d in zip(self.others, (yield from self.wait_shard(DONE, self.others, seq))):
            self.reports[k] = d.report
            scanned, nops = scanned + d.scanned, nops + d.nops
        return scanned, nops

    def take_batch(self, budget: int, out: list):
        """The leader cuts the next batch off the cursor, `budget` candidate pages, and splits it into
        one contiguous part per scanner with about as many candidates each: ([[(mm, a, b)...]...], ended)."""
        chunks, counted, ended = [], 0, False
        while counted < budget:
            chunk = yield from self.scan_get_next_rmap_item(max(256, budget - counted), out)
            if chunk is None:
                ended = True
                break
            slot, a, b = chunk
            if self.nshards == 1:
                chunks.append((slot.id, a, b, None))
                counted += b - a      # (an upper bound: visit counts exactly, the caller loops on it)
                continue
            cum = yield from self.count_candidates(slot.id, a, b)
            chunks.append((slot.id, a, b, cum))
            counted += int(cum[-1])
        return self.split_parts(chunks, counted), ended

    def count_candidates(self, sid: int, a: int, b: int):
        """The running count of candidate pages over pages a..b of mm sid (their PTEs and frame flags)."""
        _, _, cand = yield from load_candidates(sid, np.arange(a, b, dtype=np.int64))
        return np.cumsum(cand)

    def split_parts(self, chunks: list, counted: int) -> list:
        """One contiguous part per scanner, about as many candidates each: [[(mm, a, b)...]...]."""
        parts = [[] for _ in range(self.nshards)]
        if self.nshards == 1:
            parts[0] = [(s, a, b) for s, a, b, _ in chunks]
            return parts
        per = max(1, -(-counted // self.nshards))
        done = 0
        for sid, a, b, cum in chunks:        # page i goes where its candidate's rank falls
            pk = np.minimum(np.maximum(done + cum - 1, 0) // per, self.nshards - 1)
            cut = np.flatnonzero(np.diff(pk)) + 1
            for x, y in zip([0] + cut.tolist(), cut.tolist() + [b - a]):
                parts[int(pk[x])].append((sid, a + x, a + y))
            done += int(cum[-1])
        return parts

    def run_round(self, rnd: Round, out: list):
        """Every scanner's part of a round: visit its pages, route, own: plan, merge, commit."""
        if not self.leader:
            self.knobs.update(rnd.knobs)
        if self.ahead:
            self.start_round_ahead(rnd)
        if rnd.new_scan:
            self.unstable.clear()         # a new full scan starts with an empty unstable tree
        scanned = 0
        for sid, a, b in rnd.parts[self.shard]:
            slot = self.slots.get(sid)
            if slot is not None and slot.alive:
                scanned += yield from self.visit(slot, np.arange(a, b, dtype=np.int64), out)
        if self.ahead_now:
            self.drop_visited_ahead(rnd.parts[self.shard])
        for r in out:
            r.seq = rnd.seq
            r.seal()
        for k in self.others:
            yield ShardSend(k, ROUTED, out[k])
        got = dict(zip(self.others, (yield from self.wait_shard(ROUTED, self.others, rnd.seq)))) if self.others else {}
        ins = [out[j] if j == self.shard else got[j] for j in range(self.nshards)]
        nops = yield from self.own(ins)
        if rnd.ended:
            self.unstable.clear()
            if rnd.prune:
                self.prune()
        return scanned, nops

    # ------------------------------------------------------------------ followers and control
    def follow_one(self):
        """A follower: serve the leader's next message; returns (op, mm) ('round', -1), ('mm_exit', mm),
        ('stop', -1)..."""
        [m] = yield from self.wait_shard(LEAD, [0], None)
        if isinstance(m, Round):
            out = [Routed() for _ in range(self.nshards)]
            scanned, nops = yield from self.run_round(m, out)
            yield ShardSend(0, DONE, Done(m.seq, scanned, nops, self.report()))
            return "round", -1
        if m.op != "stop":
            self.apply_control(m)
            yield ShardSend(0, DONE, Done(m.seq, 0, 0, self.report()))
        return m.op, m.mm

    def report(self) -> dict:
        """What a follower's DONE carries: its counters and sizes (the leader sums them)."""
        r = {k: self.c[k] for k in SUMMED}
        r.update(chains=self.tree.chains, dups=self.tree.dups, bytes=self.tree.nbytes + self.unstable.nbytes,
                 merges=self.merges, merge_failures=self.merge_failures, **self.ahead_stats)
        return r

    def apply_control(self, m: Ctl) -> None:
        """One control request, on this scanner's own state."""
        if m.op == "mm_exit":
            self.drop_from_nodes(m.unlinks)
            slot = self.slots.pop(m.mm, None)
            if slot is not None:
                slot.alive = False
        elif m.op == "unmerge_and_remove_all_rmap_items":
            self._forget_own()
        elif m.op == "prune":
            self.prune()
        elif m.op == "reset_tree":
            self.tree.reset()

    def control(self, op: str, mm: int = -1, unlinks: list | None = None):
        """The leader: run control request `op` on every scanner (itself included), wait for all."""
        self.seq += 1
        for k in self.others:
            yield ShardSend(k, LEAD, Ctl(self.seq, op, mm, None if unlinks is None else unlinks[k]))
        self.apply_control(Ctl(self.seq, op, mm, None if unlinks is None else unlinks[self.shard]))
        yield from self._collect(self.seq)

    def stop_followers(self):
        if self.late:
            late, self.late = self.late, 0
            yield from self._collect_now(late)
        self.seq += 1
        for k in self.others:
            yield ShardSend(k, LEAD, Ctl(self.seq, "stop"))
