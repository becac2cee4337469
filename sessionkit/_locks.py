"""In-process per-key locks whose table does not grow with the keys ever seen.

Each key gets a lock only while some thread holds or waits for it: the entry
is reference-counted and dropped when the last user leaves.  A thread that
asks again for a key it already holds gets a :class:`SessionError` instead of
a silent deadlock.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Iterator
from contextlib import contextmanager

from .errors import LockTimeout, SessionError

_get_ident = threading.get_ident
_new_lock = threading.Lock


class KeyLocks:
    """A table of per-key thread locks, one entry per key in use."""

    __slots__ = ("_mutex", "_entries", "__weakref__")

    def __init__(self) -> None:
        self._mutex = _new_lock()
        # key -> [lock, users, owner thread id]
        self._entries: dict[str, list[Any]] = {}

    def __len__(self) -> int:
        """The number of keys currently held or waited for."""
        return len(self._entries)

    def acquire(self, key: str, timeout: float | None = None) -> None:
        """Lock ``key`` for the calling thread; ``LockTimeout`` after ``timeout`` s."""
        me = _get_ident()
        with self._mutex:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = [_new_lock(), 1, 0]
            elif entry[2] == me:
                raise SessionError(
                    f"session {key!r} is already open in this thread; "
                    "opening it again would deadlock",
                    key=key,
                )
            else:
                entry[1] += 1
        lock = entry[0]
        if timeout is None:
            got = lock.acquire()
        else:
            got = lock.acquire(True, max(timeout, 0.0))
        if not got:
            with self._mutex:
                entry[1] -= 1
                if not entry[1]:
                    del self._entries[key]
            raise LockTimeout(f"could not lock session {key!r} within {timeout} s", key=key)
        entry[2] = me

    def release(self, key: str) -> None:
        """Unlock ``key``, held by the calling thread."""
        with self._mutex:
            entry = self._entries[key]
            entry[2] = 0
            entry[0].release()
            entry[1] -= 1
            if not entry[1]:
                del self._entries[key]

    def held_by_me(self, key: str) -> bool:
        """Whether the calling thread holds ``key``."""
        entry = self._entries.get(key)
        return entry is not None and entry[2] == _get_ident()

    @contextmanager
    def lock(self, key: str, timeout: float | None = None) -> Iterator[None]:
        """Context manager form of :meth:`acquire` / :meth:`release`."""
        self.acquire(key, timeout)
        try:
            yield
        finally:
            self.release(key)


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
