"""Tests for workers.mm.ksm.hashtab.HashIndex against a Python dict model."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 rule)

from workers.mm.ksm.hashtab import DELETED, FULL, HashIndex

I64_MIN, I64_MAX = -(2**63), 2**63 - 1

# Small range forces collisions (and covers 0 and negatives); the full range
# and its edges cover the hash's handling of the sign bit and high bits.
small_keys = st.integers(-20, 20)
wide_keys = st.one_of(
    st.integers(I64_MIN, I64_MAX),
    st.sampled_from([I64_MIN, I64_MIN + 1, -1, 0, 1, I64_MAX - 1, I64_MAX]),
    st.integers(0, 63).map(lambda b: (1 << b) if b < 63 else I64_MIN),
    st.integers(0, 200).map(lambda i: i << 40),  # differ only in high bits
)
any_keys = st.one_of(small_keys, wide_keys)
values = st.integers(0, 2**31 - 1)


def arr(xs):
    return np.array(xs, dtype=np.int64)


def check_structure(t: HashIndex):
    """Internal consistency: counters, load bound, every key reachable."""
    state = t._state
    assert t.capacity & (t.capacity - 1) == 0
    assert len(t) == int(np.count_nonzero(state == FULL))
    assert t.n_deleted == int(np.count_nonzero(state == DELETED))
    assert len(t) + t.n_deleted <= t.capacity // 2
    k, _ = t.items()
    if len(k):
        slot, _ = t._probe(k)
        assert (slot >= 0).all()
        assert (t._keys[slot] == k).all()


class HashIndexMachine(RuleBasedStateMachine):
    @initialize(cap=st.sampled_from([1, 8, 16, 1024]),
                vdtype=st.sampled_from([np.int32, np.int64]))
    def setup(self, cap, vdtype):
        self.t = HashIndex(cap, value_dtype=vdtype)
        self.model = {}

    @rule(kv=st.dictionaries(any_keys, values, max_size=40))
    def insert(self, kv):
        self.t.insert(arr(list(kv)), np.array(list(kv.values()), dtype=np.int64))
        self.model.update(kv)

    @rule(kv=st.dictionaries(small_keys, values, min_size=1, max_size=41))
    def insert_small(self, kv):
        self.t.insert(arr(list(kv)), np.array(list(kv.values())))
        self.model.update(kv)

    @rule(keys=st.lists(any_keys, max_size=40))
    def lookup(self, keys):
        got = self.t.lookup(arr(keys))
        assert got.shape == (len(keys),)
        assert got.tolist() == [self.model.get(k, -1) for k in keys]

    @rule(keys=st.lists(any_keys, max_size=40))  # duplicates allowed here
    def delete(self, keys):
        mask = self.t.delete(arr(keys))
        assert mask.dtype == bool
        assert mask.tolist() == [k in self.model for k in keys]
        for k in keys:
            self.model.pop(k, None)

    @rule(keys=st.lists(small_keys, min_size=1, max_size=30))
    def delete_small(self, keys):
        self.delete(keys)

    @rule(k=any_keys, v=values)
    def put(self, k, v):
        self.t.put(k, v)
        self.model[k] = v

    @rule(k=any_keys)
    def get_pop(self, k):
        assert self.t.get(k) == self.model.get(k, -1)
        assert self.t.get(k, default=None) == self.model.get(k)
        assert (k in self.t) == (k in self.model)
        assert self.t.pop(k, default=None) == self.model.pop(k, None)

    @rule()
    def clear(self):
        self.t.clear()
        self.model.clear()

    @rule(kv=st.dictionaries(any_keys, values, min_size=2, max_size=10),
          data=st.data())
    def insert_duplicate_rejected(self, kv, data):
        keys = list(kv)
        dup = data.draw(st.sampled_from(keys))
        before = self.t.items()
        with pytest.raises(ValueError):
            self.t.insert(arr(keys + [dup]), np.arange(len(keys) + 1))
        after = self.t.items()
        assert before[0].tolist() == after[0].tolist()
        assert before[1].tolist() == after[1].tolist()

    @invariant()
    def matches_model(self):
        assert len(self.t) == len(self.model)
        k, v = self.t.items()
        assert dict(zip(k.tolist(), v.tolist())) == self.model
        check_structure(self.t)
        assert self.t.nbytes == self.t.capacity * (
            8 + 1 + self.t._vals.dtype.itemsize)


TestHashIndexStateful = HashIndexMachine.TestCase
TestHashIndexStateful.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.dictionaries(any_keys, values, max_size=60),
                        max_size=8),
       dels=st.lists(any_keys, max_size=60))
def test_batches_match_dict(batches, dels):
    t = HashIndex(8)
    model = {}
    for kv in batches:
        t.insert(arr(list(kv)), np.array(list(kv.values())))
        model.update(kv)
    t.delete(arr(dels))
    for k in dels:
        model.pop(k, None)
    probe = list(model) + dels + [0, -1, I64_MIN, I64_MAX]
    assert t.lookup(arr(probe)).tolist() == [model.get(k, -1) for k in probe]
    check_structure(t)


@settings(max_examples=50, deadline=None)
@given(k=st.integers(I64_MIN, 2**64 - 1))
def test_scalar_hash_matches_vector_hash(k):
    t = HashIndex(1 << 16)
    signed = k - 2**64 if k > I64_MAX else k
    assert t._hash_scalar(signed) == int(t._hash(arr([signed]))[0])
    t.put(k, 5)  # values >= 2**63 are taken as uint64 bit patterns
    assert t.get(signed) == 5
    assert t.lookup(np.array([k & (2**64 - 1)], dtype=np.uint64)).tolist() == [5]


def test_many_keys_same_home_slot_one_call():
    t = HashIndex(1 << 12)
    cand = np.arange(-200_000, 200_000, dtype=np.int64)
    home = t._hash(cand)
    target = np.bincount(home).argmax()
    same = cand[home == target][:40]
    assert len(same) >= 20
    others = cand[home == target + 1][:5]  # also in the probe path
    keys = np.concatenate([same, others])
    t.insert(keys, np.arange(len(keys)))
    assert t.capacity == 1 << 12  # no growth: all of them raced for one slot
    assert t.lookup(keys).tolist() == list(range(len(keys)))
    check_structure(t)
    # deleting from the middle of the run keeps the rest reachable
    gone = t.delete(same[::3])
    assert gone.all()
    exp = [-1 if i % 3 == 0 else i for i in range(len(same))]
    assert t.lookup(same).tolist() == exp
    # re-inserting reuses tombstones and keeps one copy per key
    t.insert(same, np.arange(len(same)) + 100)
    assert t.lookup(same).tolist() == list(range(100, 100 + len(same)))
    assert len(t) == len(keys)
    check_structure(t)


def test_growth_across_many_doublings():
    rng = np.random.default_rng(7)
    t = HashIndex(8)
    caps, sizes = [t.capacity], [t.nbytes]
    keys = np.unique(rng.integers(I64_MIN, I64_MAX, 200_000, dtype=np.int64))
    keys = np.concatenate([keys[:100_000], np.arange(-50_000, 50_000)])
    keys = np.unique(keys)
    rng.shuffle(keys)
    vals = np.arange(len(keys), dtype=np.int32)
    lo = 0
    while lo < len(keys) // 2:
        hi = lo + max(1, lo // 3)  # small batches: one doubling at a time
        t.insert(keys[lo:hi], vals[lo:hi])
        lo = hi
        caps.append(t.capacity)
        sizes.append(t.nbytes)
    t.insert(keys[lo:], vals[lo:])
    caps.append(t.capacity)
    sizes.append(t.nbytes)
    assert len(t) == len(keys)
    assert np.array_equal(t.lookup(keys), vals)
    assert caps[-1] >= 2 * len(keys)
    grown = sorted(set(caps))
    assert grown == [8 << i for i in range(len(grown))]  # doubled each time
    assert len(grown) >= 15  # ... through many doublings
    assert all(b >= a for a, b in zip(caps, caps[1:]))  # never shrinks
    assert all(b >= a for a, b in zip(sizes, sizes[1:]))
    assert t.nbytes == 13 * t.capacity  # int64 key + int32 value + state
    assert t.nbytes / len(t) <= 2 * 13 * 2  # <= 52 B/entry even right after doubling
    check_structure(t)
    # deleting everything keeps the capacity; clear() shrinks it
    cap = t.capacity
    assert t.delete(keys).all()
    assert len(t) == 0 and t.capacity == cap
    assert (t.lookup(keys[:1000]) == -1).all()
    t.clear()
    assert t.capacity < cap and len(t) == 0


def test_tombstones_are_bounded_under_churn():
    t = HashIndex(64)
    rng = np.random.default_rng(3)
    live = {}
    for i in range(300):
        ks = np.unique(rng.integers(-500, 500, 20))
        t.insert(ks, ks * 2)
        live.update(zip(ks.tolist(), (ks * 2).tolist()))
        d = rng.integers(-500, 500, 15)
        t.delete(d)
        for k in d.tolist():
            live.pop(k, None)
        assert len(t) + t.n_deleted <= t.capacity // 2
    assert t.capacity <= 4096  # churn purges tombstones instead of growing
    k, v = t.items()
    assert dict(zip(k.tolist(), v.tolist())) == live


def test_nbytes_and_value_dtype():
    a = HashIndex(1000)
    assert a.capacity == 1024
    assert a.nbytes == 1024 * 13
    b = HashIndex(1000, value_dtype=np.int64)
    assert b.nbytes == 1024 * 17
    big = np.array([2**40, -(2**50)], dtype=np.int64)
    b.insert(np.array([1, 2]), big)
    assert b.lookup(np.array([2, 1, 3])).tolist() == [-(2**50), 2**40, -1]
    assert b.lookup(np.array([1])).dtype == np.int64
    with pytest.raises(TypeError):
        HashIndex(value_dtype=np.float64)


def test_argument_checks():
    t = HashIndex()
    with pytest.raises(ValueError):
        t.insert(np.array([1, 2, 1]), np.array([1, 2, 3]))
    assert len(t) == 0
    with pytest.raises(ValueError):
        t.insert(np.array([1, 2]), np.array([1]))
    with pytest.raises(ValueError):
        t.lookup(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(TypeError):
        t.lookup(np.array([1.5]))
    # empty batches and scalar-broadcast values
    assert t.lookup(np.array([], dtype=np.int64)).shape == (0,)
    assert t.delete([]).shape == (0,)
    t.insert([], [])
    t.insert(np.array([5, 6, 7]), 9)
    assert t.lookup([5, 6, 7, 8]).tolist() == [9, 9, 9, -1]
    # overwrite keeps size
    t.insert(np.array([6]), np.array([1]))
    assert len(t) == 3 and t.get(6) == 1
    assert t.pop(6) == 1 and t.pop(6) == -1 and len(t) == 2
