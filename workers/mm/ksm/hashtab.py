"""Compact, vectorized open-addressing hash index (int64 key -> int value).

This module owns the lookup structure behind KSM's stable and unstable
"trees".  The kernel keeps those as red-black trees ordered by page content
(memcmp); this prototype replaces them with hash buckets keyed by the page's
content hash, so one numpy batch call can search or insert the hashes of a
whole scan batch at once.  A hit only means "same 64-bit hash": the caller
must still confirm every hit by comparing page contents (memcmp) before
merging.

It is kept compact because the project promises at most 64 bytes of scanner
metadata per scanned page: each slot costs an int64 key, an int32 (or int64)
value and one uint8 state byte (empty / full / deleted), i.e. 13 bytes per
slot with int32 values, 26 bytes per entry at the maximum load of 1/2.
Capacity is a power of two; the table is rebuilt (doubled, or purged of
tombstones at the same size when few entries are live) when full + deleted
slots would exceed half the capacity, and it only shrinks through clear().

Slots come from a 64-bit multiplicative hash of the key (fold the high half
into the low half, multiply by an odd constant with uint64 wraparound, take
the high bits), then linear probing.  Batch operations loop over probe
rounds, never over keys.
"""

from __future__ import annotations

import numpy as np

__all__ = ["HashIndex", "EMPTY", "FULL", "DELETED"]

EMPTY = np.uint8(0)
FULL = np.uint8(1)
DELETED = np.uint8(2)

_MIN_CAPACITY = 8
_MULT = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd
_MULT_INT = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1
_U32 = np.uint64(32)


def _pow2_at_least(n: int) -> int:
    n = max(int(n), _MIN_CAPACITY)
    return 1 << (n - 1).bit_length()


class HashIndex:
    """Open-addressing hash map from int64 keys to int values (-1 = absent).

    Any int64 is a valid key (0 and negatives included).  Values are stored
    as ``value_dtype``; -1 is what :meth:`lookup` returns for absent keys,
    so callers should not store -1 if they need to tell it apart.
    """

    __slots__ = ("_keys", "_vals", "_state", "_mask", "_shift", "_shift_int",
                 "_n_full", "_n_deleted", "_vdtype")

    def __init__(self, capacity: int = 1024, value_dtype=np.int32):
        self._vdtype = np.dtype(value_dtype)
        if self._vdtype.kind != "i":
            raise TypeError("value_dtype must be a signed integer type")
        self._alloc(_pow2_at_least(capacity))

    # ------------------------------------------------------------------ #
    # storage

    def _alloc(self, cap: int) -> None:
        self._keys = np.zeros(cap, dtype=np.int64)
        self._vals = np.zeros(cap, dtype=self._vdtype)
        self._state = np.zeros(cap, dtype=np.uint8)  # all EMPTY
        self._mask = cap - 1
        self._shift_int = 64 - (cap.bit_length() - 1)
        self._shift = np.uint64(self._shift_int)
        self._n_full = 0
        self._n_deleted = 0

    @property
    def capacity(self) -> int:
        return self._mask + 1

    @property
    def nbytes(self) -> int:
        """Total bytes held by the table's numpy arrays."""
        return self._keys.nbytes + self._vals.nbytes + self._state.nbytes

    @property
    def n_deleted(self) -> int:
        """Number of tombstone slots currently in the table."""
        return self._n_deleted

    def __len__(self) -> int:
        return self._n_full

    def __repr__(self) -> str:
        return (f"HashIndex(len={self._n_full}, capacity={self.capacity}, "
                f"deleted={self._n_deleted}, value_dtype={self._vdtype})")

    def clear(self) -> None:
        """Remove everything and return to the minimum capacity."""
        self._alloc(_MIN_CAPACITY)

    def items(self):
        """(keys, values) arrays (copies) of the live entries, slot order."""
        live = self._state == FULL
        return self._keys[live], self._vals[live]

    # ------------------------------------------------------------------ #
    # hashing / argument handling

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        """Home slot of each int64 key, as an int64 (intp) array."""
        x = keys.view(np.uint64)
        h = x >> _U32
        h ^= x
        h *= _MULT          # uint64 arithmetic wraps silently
        h >>= self._shift
        return h.view(np.int64)

    def _hash_scalar(self, key: int) -> int:
        x = key & _M64
        return (((x ^ (x >> 32)) * _MULT_INT) & _M64) >> self._shift_int

    @staticmethod
    def _as_keys(keys) -> np.ndarray:
        a = np.asarray(keys)
        if a.ndim != 1:
            raise ValueError("keys must be a 1-D array")
        if a.dtype == np.int64:
            return a
        if a.dtype == np.uint64:
            return a.view(np.int64)
        if a.dtype.kind in "iub" or a.size == 0:
            return a.astype(np.int64)
        raise TypeError(f"keys must be integers, got dtype {a.dtype}")

    @staticmethod
    def _as_key_scalar(key) -> int:
        k = int(key)
        if k >= 1 << 63:
            k -= 1 << 64
        if not -(1 << 63) <= k < (1 << 63):
            raise OverflowError(f"key {key} does not fit in 64 bits")
        return k

    # ------------------------------------------------------------------ #
    # probing

    def _probe(self, keys: np.ndarray):
        """Find each key's slot.

        Returns ``(slot, end)``: ``slot`` is the slot holding the key or -1;
        for absent keys ``end`` is the EMPTY slot that ended the probe (for
        present keys it is meaningless).
        """
        n = keys.shape[0]
        slot = np.full(n, -1, dtype=np.int64)
        pos = self._hash(keys)
        end = pos  # updated in place below for keys that end on EMPTY
        state, skeys, mask = self._state, self._keys, self._mask
        idx = None  # None = every key is still active (first round)
        k = keys
        while True:
            st = state[pos]
            hit = skeys[pos] == k
            hit &= st == FULL
            empty = st == EMPTY
            if idx is None:
                slot[hit] = pos[hit]
                go = ~(hit | empty)
                go_idx = np.flatnonzero(go)
                if go_idx.size == 0:
                    break
                idx = go_idx
                pos = pos[go_idx]
                k = keys[go_idx]
            else:
                if hit.any():
                    slot[idx[hit]] = pos[hit]
                if empty.any():
                    end[idx[empty]] = pos[empty]
                go = ~(hit | empty)
                if not go.any():
                    break
                idx = idx[go]
                pos = pos[go]
                k = k[go]
            pos += 1
            pos &= mask
        return slot, end

    def _place(self, keys: np.ndarray, vals: np.ndarray, pos: np.ndarray):
        """Put keys known to be absent (and distinct) at the first non-FULL
        slot at or after ``pos``.  Several keys may aim at the same free
        slot in a round: all write their key there, the one whose key stuck
        wins, and the others probe on."""
        state, skeys, svals, mask = self._state, self._keys, self._vals, self._mask
        pos = np.array(pos, dtype=np.int64, copy=True)
        k, v = keys, vals
        while k.shape[0]:
            st = state[pos]
            free = st != FULL
            if free.all():
                fp, fk, fv, fst = pos, k, v, st
            else:
                fp, fk, fv, fst = pos[free], k[free], v[free], st[free]
            skeys[fp] = fk
            won = skeys[fp] == fk
            wp = fp[won]
            state[wp] = FULL
            svals[wp] = fv[won]
            nwon = wp.shape[0]
            self._n_full += nwon
            self._n_deleted -= int(np.count_nonzero(fst[won] == DELETED))
            if nwon == k.shape[0]:
                break
            # everyone who did not win moves on: their slot is now FULL
            rest = ~free
            rest[free] = ~won
            pos = pos[rest]
            k = k[rest]
            v = v[rest]
            pos += 1
            pos &= mask

    def _reserve(self, m: int) -> bool:
        """Make room for ``m`` new keys; True if the table was rebuilt."""
        cap = self.capacity
        if self._n_full + self._n_deleted + m <= cap // 2:
            return False
        need = self._n_full + m
        if need <= cap // 4:
            new_cap = cap  # mostly tombstones: purge at the same size
        else:
            new_cap = cap * 2
            while need > new_cap // 2:
                new_cap *= 2
        self._rebuild(new_cap)
        return True

    def _rebuild(self, new_cap: int) -> None:
        k, v = self.items()
        self._alloc(new_cap)
        if k.shape[0]:
            self._place(k, v, self._hash(k))

    def _delete_slots(self, p: np.ndarray) -> None:
        """Delete the (distinct) FULL slots ``p``; turn tombstones that end a
        probe run back into EMPTY."""
        state, mask = self._state, self._mask
        state[p] = DELETED
        self._n_full -= p.shape[0]
        self._n_deleted += p.shape[0]
        # A tombstone followed by EMPTY is on no live key's probe path.
        cand = p[state[(p + 1) & mask] == EMPTY]
        while cand.shape[0]:
            state[cand] = EMPTY
            self._n_deleted -= cand.shape[0]
            cand = (cand - 1) & mask
            cand = cand[state[cand] == DELETED]

    # ------------------------------------------------------------------ #
    # batch API

    def lookup(self, keys) -> np.ndarray:
        """Values for ``keys`` (same length), -1 where absent."""
        keys = self._as_keys(keys)
        out = np.full(keys.shape[0], -1, dtype=self._vdtype)
        if self._n_full == 0 or keys.shape[0] == 0:
            return out
        slot, _ = self._probe(keys)
        found = slot >= 0
        out[found] = self._vals[slot[found]]
        return out

    def insert(self, keys, values) -> None:
        """Insert or overwrite.  ``keys`` must be distinct within the call
        (ValueError otherwise, table untouched)."""
        keys = self._as_keys(keys)
        n = keys.shape[0]
        values = np.asarray(values)
        if values.ndim == 0:
            values = np.full(n, values, dtype=self._vdtype)
        elif values.shape != (n,):
            raise ValueError("keys and values must have the same length")
        else:
            values = values.astype(self._vdtype, copy=False)
        if n == 0:
            return
        if n > 1:
            s = np.sort(keys)
            if np.any(s[1:] == s[:-1]):
                raise ValueError("keys in one insert call must be distinct")
        if self._n_full == 0:
            self._reserve(n)
            self._place(keys, values, self._hash(keys))
            return
        slot, end = self._probe(keys)
        old = slot >= 0
        n_old = int(np.count_nonzero(old))
        if n_old:
            self._vals[slot[old]] = values[old]
            if n_old == n:
                return
            new = ~old
            keys, values, end = keys[new], values[new], end[new]
        if self._reserve(keys.shape[0]) or self._n_deleted:
            # rebuilt, or a tombstone may precede the probe's end: restart
            # from the home slot to reuse the first free slot.
            start = self._hash(keys)
        else:
            start = end
        self._place(keys, values, start)

    def delete(self, keys) -> np.ndarray:
        """Remove present keys (absent ones ignored).  Returns a bool mask of
        which keys were present."""
        keys = self._as_keys(keys)
        if self._n_full == 0 or keys.shape[0] == 0:
            return np.zeros(keys.shape[0], dtype=bool)
        slot, _ = self._probe(keys)
        present = slot >= 0
        p = slot[present]
        if p.shape[0] > 1:
            # a key may be listed twice (np.sort is much faster than np.unique)
            p = np.sort(p)
            dup = p[1:] == p[:-1]
            if dup.any():
                p = p[np.concatenate(([True], ~dup))]
        if p.shape[0]:
            self._delete_slots(p)
        return present

    # ------------------------------------------------------------------ #
    # scalar conveniences

    def _find_scalar(self, key: int) -> int:
        state, skeys, mask = self._state, self._keys, self._mask
        h = self._hash_scalar(key)
        while True:
            s = state.item(h)
            if s == 0:  # EMPTY
                return -1
            if s == 1 and skeys.item(h) == key:
                return h
            h = (h + 1) & mask

    def get(self, key, default=-1):
        if self._n_full == 0:
            return default
        h = self._find_scalar(self._as_key_scalar(key))
        return default if h < 0 else self._vals.item(h)

    def __contains__(self, key) -> bool:
        return self._n_full > 0 and self._find_scalar(self._as_key_scalar(key)) >= 0

    def put(self, key, value) -> None:
        k = self._as_key_scalar(key)
        h = self._find_scalar(k) if self._n_full else -1
        if h < 0:
            self._reserve(1)
            state, mask = self._state, self._mask
            h = self._hash_scalar(k)
            while True:
                s = state.item(h)
                if s != 1:  # not FULL: first free slot on the probe path
                    break
                h = (h + 1) & mask
            if s == 2:
                self._n_deleted -= 1
            state[h] = FULL
            self._keys[h] = k
            self._n_full += 1
        self._vals[h] = value

    def pop(self, key, default=-1):
        """Remove ``key`` and return its value, or ``default`` if absent."""
        if self._n_full == 0:
            return default
        h = self._find_scalar(self._as_key_scalar(key))
        if h < 0:
            return default
        v = self._vals.item(h)
        self._delete_slots(np.array([h], dtype=np.int64))
        return v
