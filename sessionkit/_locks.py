"""In-process per-key locks whose table does not grow with the keys ever seen.

A key is in the table only while a thread holds it (``_held``: key -> owner
thread id) or waits for it (``_waiting``: key -> [waiters, condition]).  The
uncontended path is two atomic dict operations and no lock object at all;
threads that find the key taken queue for it (first come, first served)
under one mutex and sleep until a release wakes the head of the queue.  A
thread that asks again for a key it already holds gets a
:class:`SessionError` instead of a silent deadlock.

Fairness: a release wakes the longest waiter, but does not reserve the key
for it, so a thread that releases and asks again at once (a tight loop) may
take it first: that keeps the lock cheap when the holds are short.  Once the
head of the queue has waited :data:`HANDOFF_AFTER` seconds, a release hands
the key to it directly instead, so no waiter starves: under contention a
waiter's wait is bounded by roughly its place in the queue times
``HANDOFF_AFTER`` plus the holds ahead of it.

After ``os.fork()`` (see ``_fork``) keys held or awaited by the parent's
other threads are free in the child's view; keys the forking thread held
stay held by it.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator

from . import _fork
from .errors import LockTimeout, SessionError

_get_ident = threading.get_ident
_monotonic = time.monotonic
# CPython returns a new int object from each get_ident() call (thread ids are
# far above the small-int cache), so "is" tells a fresh dict insert from an
# entry left by an earlier call.  Elsewhere, fall back to comparing values.
FRESH_IDENTS = _get_ident() is not _get_ident()
_RECHECK = 1.0  # seconds a waiter sleeps before looking at the key again
#: Seconds the longest waiter for a key waits before a release hands the key
#: to it instead of letting whoever asks first take it (see the module's text).
HANDOFF_AFTER = 0.001


class _Waiter:
    """One thread queued for a key: who it is, since when, and how to wake it alone.

    ``wake`` is a lock taken from the start: the waiter sleeps by taking it
    again, a waker (holding the table's mutex) lets it go if it is taken.  A
    ``threading.Condition`` on the mutex would do the same, but an exception
    raised asynchronously inside its ``wait`` can return without the mutex
    taken back, and the waiter's ``with`` then lets go of it for whichever
    thread holds it (see :meth:`KeyLocks._sleep`)."""

    __slots__ = ("ident", "since", "wake")

    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.since = _monotonic()
        self.wake = threading.Lock()
        self.wake.acquire()


class LockContext:
    """``lock(key, timeout)``: the context manager form of acquire/release."""

    __slots__ = ()

    def acquire(self, key: str, timeout: float | None = None) -> None:
        raise NotImplementedError

    def release(self, key: str) -> None:
        raise NotImplementedError

    @contextmanager
    def lock(self, key: str, timeout: float | None = None) -> Iterator[None]:
        self.acquire(key, timeout)
        try:
            yield
        finally:
            self.release(key)


class KeyLocks(LockContext):
    """A table of per-key thread locks, holding only the keys in use."""

    __slots__ = ("_held", "_waiting", "_mutex", "__weakref__")

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self._waiting: dict[str, deque[_Waiter]] = {}
        self._mutex = threading.RLock()  # an RLock: _sleep asks whether it holds it
        _fork.register(self)

    # Fork hooks (see _fork): only the child has work to do.  The tables are
    # cleared in place, because Sessions keeps references to them.
    def _fork_before(self) -> None:
        pass

    def _fork_after_parent(self) -> None:
        pass

    def _fork_after_child(self) -> None:
        # Only the forking thread lives on: keys it held stay its own (its
        # with-blocks still end normally), every other key is free.
        me = _get_ident()
        kept = {key: owner for key, owner in self._held.items() if owner == me}
        self._held.clear()
        self._held.update(kept)
        self._waiting.clear()
        self._mutex = threading.RLock()  # an RLock: _sleep asks whether it holds it

    def __len__(self) -> int:
        """The number of keys currently held or waited for."""
        return len(self._held.keys() | self._waiting.keys())

    def acquire(self, key: str, timeout: float | None = None, me: int | None = None) -> None:
        """Lock ``key`` for the calling thread; ``LockTimeout`` after ``timeout`` s.

        ``me``: a fresh ``threading.get_ident()`` of the caller's, kept as the
        key's owner, so that :meth:`release_taken` can tell a key this call
        took from one the thread already held."""
        if me is None:
            me = _get_ident()
        held = self._held
        owner: int | None
        try:
            if FRESH_IDENTS:
                owner = held.setdefault(key, me)
                if owner is me:
                    return  # our own insert: the key was free
            else:
                owner = held.get(key)
                if owner is None and held.setdefault(key, me) == me:
                    return  # only this thread inserts its own id, and it was absent
            if owner == me:
                raise SessionError(
                    f"session {key!r} is already open in this thread; opening it again would deadlock",
                    key=key,
                )
            self._wait(key, me, timeout)
        except BaseException:
            # An exception raised asynchronously just as the key was taken
            # (Python raises one when a call returns): let it go again.
            self.release_taken(key, me)
            raise

    def release_taken(self, key: str, me: int) -> None:
        """Let ``key`` go if it is held under ``me``, the owner object given
        to :meth:`acquire`: undoes an acquire cut short by an exception,
        never a hold taken by another call of this thread (with fresh ident
        objects only, see ``FRESH_IDENTS``; elsewhere it does nothing)."""
        if FRESH_IDENTS and self._held.get(key) is me:
            self.release(key)

    def _wait(self, key: str, me: int, timeout: float | None) -> None:
        held = self._held
        deadline = None if timeout is None else _monotonic() + max(timeout, 0.0)
        with self._mutex:
            queue: deque[_Waiter] | None = None
            mine: _Waiter | None = None
            try:  # from the start: a waiter cut short never stays queued, nor its queue
                queue = self._waiting.get(key)
                if queue is None:
                    queue = self._waiting[key] = deque()
                mine = _Waiter(me)
                queue.append(mine)
                # the key may have been handed to us (see _wake): then it is
                # already ours and setdefault leaves it so
                while held.setdefault(key, me) != me:
                    if deadline is None:
                        # Bounded, so a wake-up lost to an exception raised
                        # asynchronously in a releasing thread costs a
                        # second, not a hang.
                        self._sleep(mine, _RECHECK)
                    else:
                        left = deadline - _monotonic()
                        if left <= 0:
                            raise LockTimeout(
                                f"could not lock session {key!r} within {timeout} s", key=key
                            )
                        self._sleep(mine, min(left, _RECHECK))
            except BaseException:
                if queue is not None and mine is not None and mine in queue:
                    queue.remove(mine)
                # The key was not ours on entry (re-entry is refused before
                # waiting), so holding it now means this call took it (or
                # was handed it): let it go.
                if held.get(key) == me:
                    del held[key]
                if queue and key not in held:
                    # a wake-up (or the key) meant for us goes to the next one
                    self._wake(key, queue)
                if queue is not None and not queue and key in self._waiting and self._waiting[key] is queue:
                    del self._waiting[key]
                raise
            try:
                queue.remove(mine)
            finally:  # no call in here: Python 3.10+ raises an asynchronous exception as one returns
                if not queue and key in self._waiting and self._waiting[key] is queue:
                    del self._waiting[key]

    def _sleep(self, mine: _Waiter, seconds: float) -> None:
        """Let the mutex go, sleep until woken or ``seconds`` pass, take the
        mutex back: held on return, however it returns.  (An exception raised
        asynchronously lands as a call returns, or cuts a blocking acquire
        short: after the release below it is inside the ``try``, and the
        ``finally`` takes the mutex back.)"""
        mutex = self._mutex
        try:
            mutex.release()
            mine.wake.acquire(True, seconds)
        finally:
            # A signal handler's exception can cut a blocking acquire() short
            # with the mutex not taken, or land as it returns with it taken:
            # take it until this thread holds it, then raise what came.
            caught: BaseException | None = None
            while True:
                try:
                    if mutex._is_owned():  # type: ignore[attr-defined]  # (what Condition asks too)
                        break
                    mutex.acquire()
                except BaseException as exc:  # noqa: BLE001 - raised below, once the mutex is held
                    caught = exc
            if caught is not None:
                raise caught

    def release(self, key: str) -> None:
        """Unlock ``key``, held by the calling thread."""
        if self._held.pop(key, None) is None:
            return  # held before a fork, by the parent (see _fork)
        if self._waiting:  # a waiter registers before it tries: none is missed
            self.notify(key)

    def notify(self, key: str) -> None:
        """Wake the longest waiter of ``key`` (call after removing it from ``_held``)."""
        with self._mutex:
            queue = self._waiting.get(key)
            if queue:
                self._wake(key, queue)

    def _wake(self, key: str, queue: Any) -> None:
        """Wake the head of ``queue``, handing it ``key`` if it has waited long (mutex held)."""
        head = queue[0]
        if _monotonic() - head.since >= HANDOFF_AFTER:
            # Only if no other thread took the key since it was let go;
            # if one did, its own release comes back here.
            self._held.setdefault(key, head.ident)
        if head.wake.locked():  # (the mutex is held: no other waker between the test and the release)
            head.wake.release()

    def held_by_me(self, key: str) -> bool:
        """Whether the calling thread holds ``key``."""
        return self._held.get(key) == _get_ident()



_shared: "weakref.WeakKeyDictionary[Any, KeyLocks]" = weakref.WeakKeyDictionary()
_shared_by_id: dict[int, KeyLocks] = {}
_shared_mutex = threading.Lock()


def shared_key_locks(storage: Any) -> KeyLocks:
    """The lock table shared by every ``Sessions`` over this storage object."""
    with _shared_mutex:
        try:
            table = _shared.get(storage)
            if table is None:
                table = _shared[storage] = KeyLocks()
            return table
        except TypeError:  # neither weak-referenceable nor hashable
            table = _shared_by_id.get(id(storage))
            if table is None:
                table = _shared_by_id[id(storage)] = KeyLocks()
            return table
