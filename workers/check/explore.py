"""The interleaving explorer behind `ksm-proto check`: it schedules the steps of a World and checks it.

It owns the choice of the next step and nothing about any protocol.  A World (duck-typed; the
KSM one is workers/check/world.py, a toy one workers/check/toyworld.py) says which Steps may run next
and runs the one chosen:

    world.enabled() -> list[Step]       deterministic order; [] when nothing can run
    world.take(i) -> dict               run enabled()[i] (always called right after enabled()); a JSON-able
                                        record {"actor", "label", "args", optional "flow_out" / "flow_in":
                                        a message id, or a list of them}
    world.violations() -> list[str]     invariants after a step ([] = fine)
    world.finished() -> bool            all work done; enabled() == [] and not finished(): deadlock
    world.final_violations() -> list[str]
    world.state_key() -> bytes | None   the whole state, for state hashing (None: not supported)

A factory builds a fresh, identical World on each call, so a schedule (the list of indices chosen
into enabled()) replays by rebuilding and re-taking: no state is ever copied.  Two steps are
independent iff their actors differ and their footprints ({(key, "r"|"w")}) share no key that one
of them writes; across states a step is known by (actor, label).

    random_runs(factory, seed, runs, max_steps, strategy="mix", shrink=True) -> Result
        run r follows random.Random(f"{seed}/{r}"): uniform choice or PCT (random actor priorities
        with d-1 change points), half and half under "mix"; a violation is shrunk (chunks of
        choices dropped while it still fails) to the shortest failing schedule found.
    exhaustive(factory, depth, max_steps, por=True, hashing=True) -> Result
        DFS over every schedule of `depth` choices, with sleep sets (partial-order reduction) and
        state hashing (a state seen with at least as much depth left, and no more asleep, is not
        searched again); after a violation, only shorter schedules (branch and bound).
    replay(factory, schedule) -> Trace  the steps, records and violations of one schedule
    format_steps(trace), summary(name, result), describe(found_by), trace_json(trace, meta),
    schedule_json(trace, meta, found_by), load_schedule(text)
                                        what `ksm-proto check` prints and writes

Every run ends the same way: the chooser runs until the world finishes, an invariant breaks or
its step budget is spent; then a round-robin over the actors (fair, so spinning on a lock
cannot starve the holder) finishes the run within max_steps more steps, or it is reported as a
livelock.  All output is a function of the world and the seed: same seed, same bytes.
"""
from __future__ import annotations

import json
import collections
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["SCHEDULE_FORMAT", "TRACE_FORMAT", "Found", "ReplayError", "Result", "Step", "Trace", "describe",
           "exhaustive", "format_steps", "independent", "load_schedule", "random_runs", "replay", "schedule_json",
           "summary", "trace_json"]

TRACE_FORMAT = "ksm-proto check trace 1"
SCHEDULE_FORMAT = "ksm-proto check schedule 1"
SHRINK_TRIES = 2000          # replays a random violation's shrinking may spend
PCT_SPAN = 4                 # a PCT run chooses for at most PCT_SPAN x the round-robin run's length


class Step(NamedTuple):
    """What a World says may run next."""
    actor: str               # track name: "ksmd", "faultd", "vm0", "vm0/writer1"
    label: str               # human readable; with actor, names the step across states
    footprint: frozenset     # {(resource_key, "r" | "w"), ...}


@dataclass
class Found:
    violations: list[str]
    schedule: list[int]      # indices into enabled(), from a fresh world
    found_by: dict           # how: {"search": "random", "seed", "run", "strategy", "shrunk_from"} or exhaustive's


@dataclass
class Result:
    search: str              # "random, seed 0" | "exhaustive to depth 20"
    schedules: int = 0       # random: runs; exhaustive: paths of the search tree (ended, violated, cut at the
                             # depth bound, or left because equivalent to one searched or no shorter than the best)
    steps: int = 0           # steps taken, replays included
    seconds: float = 0.0
    states: int = 0          # exhaustive: states searched from
    complete: bool = False   # exhaustive: no schedule was cut by the depth bound
    found: Found | None = None

    @property
    def rate(self) -> float:
        return self.schedules / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Trace:
    schedule: list[int]
    steps: list[Step]
    records: list[dict]
    violations: list[str] = field(default_factory=list)


class ReplayError(ValueError):
    """A schedule that does not fit the world it is replayed on."""


# ============================================================================ running one schedule
def independent(a: Step, b: Step) -> bool:
    if a.actor == b.actor:
        return False
    fb = b.footprint
    for key, how in a.footprint:
        if (key, "w") in fb or (how == "w" and (key, "r") in fb):
            return False
    return True


def _at_end(w) -> list[str]:
    return w.final_violations() if w.finished() else ["deadlock: no step can run, yet the work is not finished"]


def _play(w, sched: list[int], choose, limit: int):
    """Take up to `limit` steps picked by choose(enabled); the violations ([] = finished cleanly), None = limit hit."""
    enabled, take, violations, add = w.enabled, w.take, w.violations, sched.append
    for _ in range(limit):
        en = enabled()
        if not en:
            return _at_end(w)
        i = choose(en)
        take(i)
        add(i)
        v = violations()
        if v:
            return v
    return None if enabled() else _at_end(w)


class _RoundRobin:
    """The fair, deterministic chooser: the first step of the next actor (in name order) after the last one."""

    def __init__(self):
        self.last = ""

    def __call__(self, en: list[Step]) -> int:
        last, pick, low = self.last, -1, 0
        for i, s in enumerate(en):
            a = s.actor
            if a > last and (pick < 0 or a < en[pick].actor):
                pick = i
            if a < en[low].actor:
                low = i
        if pick < 0:
            pick = low
        self.last = en[pick].actor
        return pick


def _run(w, sched: list[int], max_steps: int, choose=None, limit: int = 0) -> list[str]:
    """choose for up to `limit` steps, then round-robin for up to max_steps more: the violations ([] = none)."""
    v = _play(w, sched, choose, limit) if choose else None
    if v is None:
        v = _play(w, sched, _RoundRobin(), max_steps)
    return [_livelock(len(sched), max_steps)] if v is None else v


def _livelock(steps: int, max_steps: int) -> str:
    return f"livelock: not finished after {steps} steps, the last {max_steps} round-robin"


class _Pct:
    """Probabilistic concurrency testing: the enabled actor of highest priority runs; at d-1 random steps
    the running actor drops below every initial priority."""

    def __init__(self, rng: random.Random, d: int, k: int):
        self.rng, self.d, self.n, self.prio = rng, d, 0, {}
        points = rng.sample(range(max(k, d)), d - 1)
        self.changes = {p: j + 1 for j, p in enumerate(points)}

    def __call__(self, en: list[Step]) -> int:
        prio, best, top = self.prio, -1.0, None
        for i, s in enumerate(en):
            p = prio.get(s.actor)
            if p is None:
                p = prio[s.actor] = self.d + self.rng.random()
            if p > best:
                best, top = p, [i]
            elif p == best:
                top.append(i)
        pick = top[0] if len(top) == 1 else self.rng.choice(top)
        c = self.changes.get(self.n)
        if c is not None:
            prio[en[pick].actor] = c
        self.n += 1
        return pick


def _uniform(rng: random.Random):
    below = rng.randrange
    return lambda en: below(len(en)) if len(en) > 1 else 0


class _Follow:
    """Follow wanted (actor, label) choices, skipping one that matches no enabled step, then round-robin;
    remembers what was chosen."""

    def __init__(self, want: list[tuple[str, str]]):
        self.want, self.pos, self.rr, self.chosen = want, 0, _RoundRobin(), []

    def __call__(self, en: list[Step]) -> int:
        want, pick = self.want, None
        while pick is None and self.pos < len(want):
            actor, label = want[self.pos]
            self.pos += 1
            for i, s in enumerate(en):
                if s.label == label and s.actor == actor:
                    pick = i
                    break
        if pick is None:
            pick = self.rr(en)
        s = en[pick]
        self.rr.last = s.actor
        self.chosen.append((s.actor, s.label))
        return pick


def replay(factory: Callable, schedule: list) -> Trace:
    """Rebuild the world and take `schedule` (indices, or dicts with "i" and optionally "label", which must
    match); stop at the first violation; at the end check finished/final_violations if nothing can run."""
    w = factory()
    tr = Trace([], [], [])
    for n, c in enumerate(schedule, 1):
        i, label = (c, None) if isinstance(c, int) else (c["i"], c.get("label"))
        en = w.enabled()
        if not 0 <= i < len(en) or (label is not None and en[i].label != label):
            offered = "; ".join(s.label for s in en) or "nothing"
            raise ReplayError(f"step {n}: the schedule wants {label or i!r}, the world offers: {offered}")
        tr.records.append(w.take(i))
        tr.schedule.append(i)
        tr.steps.append(en[i])
        tr.violations = w.violations()
        if tr.violations:
            return tr
    if not w.enabled():
        tr.violations = _at_end(w)
    return tr


# ============================================================================ random search
def _labels(factory: Callable, schedule: list[int]) -> list[tuple[str, str]]:
    return [(s.actor, s.label) for s in replay(factory, schedule).steps]


def _shrink(factory: Callable, schedule: list[int], max_steps: int) -> tuple[list[int], list[str], int]:
    """Drop chunks of choices (halving the chunk when nothing more drops) while the run still fails and gets
    shorter.  Returns the schedule, its violations, and the steps spent."""
    cur = _labels(factory, schedule)
    best, best_v, spent, tries = schedule, None, len(schedule), 0
    chunk = max(1, len(cur) // 2)
    while chunk >= 1 and tries < SHRINK_TRIES:
        dropped, i = False, 0
        while i < len(cur) and tries < SHRINK_TRIES:
            tries += 1
            follow, sched = _Follow(cur[:i] + cur[i + chunk:]), []
            v = _run(factory(), sched, max_steps, follow, max_steps)
            spent += len(sched)
            if v and len(sched) < len(best):
                cur, best, best_v, dropped = follow.chosen, sched, v, True
            else:
                i += chunk
        if not dropped:
            chunk //= 2
        chunk = min(chunk, len(cur) // 2) if len(cur) > 1 else 0
    return best, best_v, spent


def random_runs(factory: Callable, seed: int = 0, runs: int = 1000, max_steps: int = 10_000,
                strategy: str = "mix", shrink: bool = True, first: int = 0) -> Result:
    """`runs` random schedules, numbered from `first` (plus one round-robin run before them, whose length k
    spaces PCT's change points); stops at the first violation."""
    if strategy not in ("mix", "uniform", "pct"):
        raise ValueError(f"strategy must be mix, uniform or pct, not {strategy!r}")
    t0 = time.perf_counter()
    res = Result(f"random, seed {seed}")
    sched: list[int] = []
    v = _run(factory(), sched, max_steps)
    res.schedules, res.steps, k = 1, len(sched), len(sched)
    how = {"search": "round-robin"}
    r = first
    while not v and r < first + runs:
        rng = random.Random(f"{seed}/{r}")
        if strategy == "uniform" or (strategy == "mix" and rng.random() < 0.5):
            choose, limit, name = _uniform(rng), max_steps, "uniform"
        else:
            d = rng.randint(1, 3)
            choose, limit, name = _Pct(rng, d, k), min(max_steps, PCT_SPAN * k + 1), f"pct d={d}"
        sched = []
        v = _run(factory(), sched, max_steps, choose, limit)
        res.schedules += 1
        res.steps += len(sched)
        how = {"search": "random", "seed": seed, "run": r, "strategy": name}
        r += 1
    if v:
        if shrink:
            how["shrunk_from"] = len(sched)
            small, small_v, spent = _shrink(factory, sched, max_steps)
            res.steps += spent
            if small_v:
                sched, v = small, small_v
        res.found = Found(v, sched, how)
    res.seconds = time.perf_counter() - t0
    return res


_JOB_FACTORY: Callable | None = None     # the factory a forked job process runs (closures do not pickle)


def _job(args) -> Result:
    seed, first, runs, max_steps, strategy = args
    return random_runs(_JOB_FACTORY, seed, runs, max_steps, strategy, shrink=False, first=first)


def parallel_random_runs(factory: Callable, seed: int = 0, runs: int = 1000, max_steps: int = 10_000,
                         strategy: str = "mix", shrink: bool = True, jobs: int = 1) -> Result:
    """random_runs split over `jobs` forked processes, each a contiguous block of run numbers.

    The verdict and the schedule found are those of the sequential search: the violating run with the
    lowest number (every run before it, in every block, came back clean), shrunk here.
    """
    global _JOB_FACTORY
    if jobs <= 1 or runs < 2 * jobs:
        return random_runs(factory, seed, runs, max_steps, strategy, shrink)
    import multiprocessing
    t0 = time.perf_counter()
    block = -(-runs // jobs)
    work = [(seed, b, min(block, runs - b), max_steps, strategy) for b in range(0, runs, block)]
    _JOB_FACTORY = factory
    try:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            parts = pool.map(_job, work)
    finally:
        _JOB_FACTORY = None
    res = Result(f"random, seed {seed}, {jobs} jobs")
    res.schedules = sum(p.schedules for p in parts) - (len(parts) - 1)   # one round-robin run counted, as in one job
    res.steps = sum(p.steps for p in parts)
    hits = [p.found for p in parts if p.found is not None]
    if hits:
        f = min(hits, key=lambda h: h.found_by.get("run", -1))
        if shrink:
            f.found_by["shrunk_from"] = len(f.schedule)
            small, small_v, spent = _shrink(factory, f.schedule, max_steps)
            res.steps += spent
            if small_v:
                f = Found(small_v, small, f.found_by)
        res.found = f
    res.seconds = time.perf_counter() - t0
    return res


# ============================================================================ exhaustive search
class _Dfs:
    """Depth-first search over all schedules of `bound` choices, replaying from a fresh world to backtrack;
    branch and bound: once a violation of length L is found, only shorter schedules are searched."""

    def __init__(self, factory, bound: int, max_steps: int, por: bool, hashing: bool):
        self.factory, self.bound, self.max_steps, self.por, self.hashing = factory, bound, max_steps, por, hashing
        self.path: list[int] = []
        self.seen: dict = {}
        self.schedules = self.states = self.steps = self.cut = 0
        self.best: tuple[list[int], list[str]] | None = None
        self.best_len = 1 << 62

    def run(self) -> _Dfs:
        self.w = self.factory()
        self._node(0, {})
        return self

    def _end(self, sched: list[int], v: list[str] | None) -> None:
        self.schedules += 1
        if v and len(sched) < self.best_len:
            self.best, self.best_len = (list(sched), v), len(sched)

    def _rebuild(self) -> None:
        w = self.factory()
        for i in self.path:
            w.enabled()
            w.take(i)
        self.steps += len(self.path)
        self.w = w

    def _node(self, depth: int, sleep: dict) -> None:
        w = self.w
        en = w.enabled()
        if not en:
            self._end(self.path, _at_end(w))
            return
        self.schedules += 1                           # settled here unless a child is searched (then undone)
        if depth + 1 >= self.best_len:              # whatever violates from here is no shorter than the best
            return
        left = self.bound - depth
        if self.hashing:
            key = w.state_key()
            if key is not None:
                asleep = frozenset(sleep) if left else frozenset()
                old = self.seen.get(key)
                if old is not None and old[0] >= left and old[1] <= asleep:
                    return
                self.seen[key] = (left, asleep)
        self.states += 1
        if not left:
            self.schedules -= 1
            sched = list(self.path)
            budget = self.best_len - 1 - depth
            v = _play(w, sched, _RoundRobin(), min(self.max_steps, budget))
            if v is None and budget > self.max_steps:
                v = [_livelock(len(sched), self.max_steps)]
            self.steps += len(sched) - depth
            self.cut += 1
            self._end(sched, v)
            return
        done: list[Step] = []
        fresh = True
        for i, s in enumerate(en):
            if depth + 1 >= self.best_len:
                return
            if sleep and (s.actor, s.label) in sleep:
                continue
            if fresh:
                self.schedules -= 1
                fresh = False
            else:
                self._rebuild()
            w = self.w
            w.take(i)
            self.steps += 1
            self.path.append(i)
            v = w.violations()
            if v:
                self._end(self.path, v)
            else:
                child = {}
                if self.por:
                    for u in (*sleep.values(), *done):
                        if independent(u, s):
                            child[(u.actor, u.label)] = u
                self._node(depth + 1, child)
            self.path.pop()
            if self.por:
                done.append(s)


MAX_DEPTH = 200        # the deepest exhaustive search (one Python stack frame per choice)


def exhaustive(factory: Callable, depth: int = 20, max_steps: int = 10_000, por: bool = True,
               hashing: bool = True) -> Result:
    """Every schedule of up to `depth` choices (one cut there is finished round-robin), and the shortest
    violating one; found_by["minimal"]: no shorter schedule violates (sure when it is at most depth + 1 long).
    ValueError for a depth above MAX_DEPTH (the search recurses once per choice)."""
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"exhaustive search depth {depth} is out of range 1..{MAX_DEPTH} (each choice is a level "
                         f"of recursion; at depth 30 the search already takes hours)")
    t0 = time.perf_counter()
    dfs = _Dfs(factory, depth, max_steps, por, hashing).run()
    res = Result(f"exhaustive to depth {depth}", dfs.schedules, dfs.steps, states=dfs.states,
                 complete=dfs.cut == 0 and dfs.best is None)
    if dfs.best:
        res.found = Found(dfs.best[1], dfs.best[0],
                          {"search": "exhaustive", "depth": depth, "minimal": dfs.best_len <= depth + 1})
    res.seconds = time.perf_counter() - t0
    return res


# ============================================================================ a kill at every step
def _is_kill(s: Step) -> bool:
    return s.actor == "supervisor" and "kill -9" in s.label


@dataclass
class Sweep:
    """What kill_sweep found: the kill points tried, what the victim was doing at each, the first violation."""
    points: int = 0
    covered: collections.Counter = field(default_factory=collections.Counter)
    found: tuple | None = None          # (kill step k, the violations, the schedule)
    seconds: float = 0.0


def kill_sweep(factory: Callable, max_steps: int = 10_000, victims: tuple = ()) -> Sweep:
    """kill -9 at each step k of one fixed schedule (round-robin over everything but the kill), then
    round-robin to the end: every kill point of that schedule, each checked to its end.

    A world built by `factory` must have a kill (its supervisor's first step).  covered counts what
    each victim (actor names starting with one of `victims`) had pending when it died, by the effect's
    kind (its label after the thread name): a kill mid-merge, mid-COW, while waiting for acks..."""
    t0 = time.perf_counter()
    rr = _RoundRobin()

    def no_kill(en):
        rest = [i for i, s in enumerate(en) if not _is_kill(s)]
        if not rest:
            return next(i for i, s in enumerate(en) if _is_kill(s))
        sub = [en[i] for i in rest]
        return rest[rr(sub)]
    base = factory()
    sched: list[int] = []
    _play(base, sched, no_kill, max_steps)
    res = Sweep()
    for k in range(len(sched) + 1):
        w = factory()
        taken: list[int] = []
        v = _play(w, taken, lambda en: sched[len(taken)], k) if k else None
        if v is None or v == []:
            en = w.enabled()
            kill = next((i for i, s in enumerate(en) if _is_kill(s)), None)
            if kill is None:        # (the schedule ended, or the kill went already): nothing to kill here
                continue
            res.points += 1
            for s in en:
                if victims and s.actor.startswith(victims) and not _is_kill(s):
                    res.covered[s.label.split(": ", 1)[-1].split(" ")[0]] += 1
            w.take(kill)
            taken.append(kill)
            v = w.violations() or None
            if v is None:
                v = _run(w, taken, max_steps)
        if v:
            res.found = (k, v, taken)
            break
    res.seconds = time.perf_counter() - t0
    return res


# ============================================================================ output
def _args(rec: dict) -> str:
    a = rec.get("args") or {}
    return "  ".join(f"{k}={json.dumps(a[k], sort_keys=True)}" for k in sorted(a))


def format_steps(tr: Trace) -> str:
    """The schedule, one step a line: number, actor, label, the record's args; then the violations."""
    wide = max((len(s.actor) for s in tr.steps), default=0)
    out = [f"{n:5d}  {s.actor:<{wide}}  {rec.get('label', s.label)}  {_args(rec)}".rstrip()
           for n, (s, rec) in enumerate(zip(tr.steps, tr.records), 1)]
    out += [f"  violation: {v}" for v in tr.violations]
    return "\n".join(out)


def summary(name: str, res: Result) -> str:
    what = res.search + (" (every schedule)" if res.complete else "")
    states = f"{res.states:,} states, " if res.states else ""
    verdict = f"VIOLATION: {res.found.violations[0]}" if res.found else "no violation"
    return (f"{name}: {what}: {res.schedules:,} schedules, {states}{res.steps:,} steps, {res.seconds:.2f} s, "
            f"{res.rate:,.0f} schedules/s: {verdict}")


def describe(found_by: dict) -> str:
    """How a schedule was found, in words."""
    how = dict(found_by)
    search = how.pop("search", None)
    if search == "exhaustive" and how.keys() == {"depth", "minimal"}:
        return (f"exhaustive search to depth {how['depth']}: "
                + ("no shorter schedule violates" if how["minimal"] else "the shortest found"))
    shrunk = f", shrunk from {how.pop('shrunk_from')} steps" if "shrunk_from" in how else ""
    if search == "random" and how.keys() == {"seed", "run", "strategy"}:
        return f"random run {how['run']} of seed {how['seed']} ({how['strategy']}){shrunk}"
    if search == "round-robin" and not how:
        return f"the round-robin run{shrunk}"
    return ", ".join(f"{k} {v}" for k, v in sorted(found_by.items()))


def _dumps(o) -> str:
    return json.dumps(o, sort_keys=True, separators=(",", ":"))


def trace_json(tr: Trace, meta: dict) -> str:
    """A Chrome Trace Event / Perfetto file: a process per actor (the part of its name before "/"), a thread
    per actor, each step an "X" slice at ts = step number (us), flows for messages, the violation as an
    instant.  Deterministic bytes."""
    pids: dict[str, int] = {}
    tids: dict[str, int] = {}
    meta_ev, ev = [], []
    for s in tr.steps:
        if s.actor not in tids:
            proc = s.actor.split("/", 1)[0]
            if proc not in pids:
                pids[proc] = len(pids) + 1
                meta_ev += [{"ph": "M", "name": "process_name", "pid": pids[proc], "tid": 0, "args": {"name": proc}},
                            {"ph": "M", "name": "process_sort_index", "pid": pids[proc], "tid": 0,
                             "args": {"sort_index": pids[proc]}}]
            tids[s.actor] = len(tids) + 1
            meta_ev += [{"ph": "M", "name": "thread_name", "pid": pids[proc], "tid": tids[s.actor],
                         "args": {"name": s.actor}},
                        {"ph": "M", "name": "thread_sort_index", "pid": pids[proc], "tid": tids[s.actor],
                         "args": {"sort_index": tids[s.actor]}}]
    for n, (i, s, rec) in enumerate(zip(tr.schedule, tr.steps, tr.records), 1):
        where = {"pid": pids[s.actor.split("/", 1)[0]], "tid": tids[s.actor], "ts": n}
        ev.append({"ph": "X", "name": rec.get("label", s.label), "cat": "step", "dur": 1,
                   "args": {**(rec.get("args") or {}), "step": n, "index": i}, **where})
        for ph, k in (("s", "flow_out"), ("f", "flow_in")):
            ids = rec.get(k)
            for fid in ids if isinstance(ids, list) else () if ids is None else (ids,):
                ev.append({"ph": ph, "name": "msg", "cat": "flow", "id": fid, **where,
                           **({"bp": "e"} if ph == "f" else {})})
    if tr.violations:
        last = tr.steps[-1].actor if tr.steps else ""
        ev.append({"ph": "i", "s": "g", "name": "VIOLATION: " + tr.violations[0], "cat": "violation",
                   "pid": pids.get(last.split("/", 1)[0], 0), "tid": tids.get(last, 0), "ts": len(tr.steps) + 1,
                   "args": {"violations": tr.violations}})
    other = {"ksm_proto_check": {"format": TRACE_FORMAT, **meta, "steps": len(tr.steps), "violations": tr.violations}}
    return ('{"otherData":' + _dumps(other) + ',"traceEvents":[\n'
            + ",\n".join(_dumps(e) for e in meta_ev + ev) + "\n]}\n")


def schedule_json(tr: Trace, meta: dict, found_by: dict) -> str:
    """The schedule as `--replay` reads it: meta (world, mode, break, max_steps), how it was found, the
    violations, and one step a line {"n", "i", "actor", "label"}."""
    head = _dumps({"format": SCHEDULE_FORMAT, **meta, "found_by": found_by, "violations": tr.violations})
    steps = ",\n".join(_dumps({"n": n, "i": i, "actor": s.actor, "label": s.label})
                       for n, (i, s) in enumerate(zip(tr.schedule, tr.steps), 1))
    return head[:-1] + ',"steps":[\n' + steps + "\n]}\n"


def load_schedule(text: str) -> dict:
    """A schedule_json() document (ValueError if it is not one)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != SCHEDULE_FORMAT:
        raise ValueError(f"no format {SCHEDULE_FORMAT!r}")
    steps = doc.get("steps")
    if not isinstance(steps, list) or not all(isinstance(s, dict) and type(s.get("i")) is int for s in steps):
        raise ValueError("steps must be a list of {\"i\": int, \"label\": str}")
    return doc
