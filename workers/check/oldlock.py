"""The pid-takeover-lock break: page-table locks as the old semaphore plus owner pid, taken over
when the owner 'looks dead', one micro-step at a time.

A mixin of KsmWorld (workers.check.world), which holds the state these methods share.
"""
from __future__ import annotations




from workers.mm.effects import (Lock, Unlock)
from workers.check.world_common import Thread, _Micro


class OldLock:
    """The old lock algorithm (a KsmWorld mixin)."""

    def _old_lock_algo(self, t: Thread, e):
        """The old ShmLock: a semaphore plus an owner pid read without the semaphore (the bug)."""
        st = self.old_lock[e.key]
        me = hash(t.name) & 0xFFFF or 1
        if isinstance(e, Unlock):
            yield _Micro("store owner 0", lambda: st.__setitem__(1, 0), e.key)
            yield _Micro("sem_post", lambda: self._old_post(e.key, t), e.key)
            return None
        blocking = isinstance(e, Lock)
        while True:
            ok = yield _Micro("sem_trywait", lambda: self._old_trywait(e.key, t), e.key,
                              enabled=(lambda: st[0] > 0) if blocking else None)
            if ok:
                yield _Micro("store owner", lambda: st.__setitem__(1, me), e.key)
                return True
            if blocking:
                continue
            o = yield _Micro("read owner", lambda: st[1], e.key)
            if o == 0 or o not in self._live_pids():      # "not alive" (pid 0 is never alive)
                o2 = yield _Micro("read owner again", lambda: st[1], e.key)
                if o2 != 0:
                    yield _Micro("take over: store owner", lambda: self._old_take_over(e.key, t, me), e.key)
                    return True
            return False

    def _live_pids(self):
        return {hash(t.name) & 0xFFFF or 1 for t in self.threads if not t.done}

    def _old_trywait(self, key, t) -> bool:
        st = self.old_lock[key]
        if st[0] > 0:
            st[0] -= 1
            self._hold(key, t)
            return True
        return False

    def _old_post(self, key, t) -> None:
        self.old_lock[key][0] += 1
        if self.locks[key] == t.name:
            self.locks[key] = None

    def _old_take_over(self, key, t, me) -> None:
        self.old_lock[key][1] = me
        self._hold(key, t)
