"""MemoryStorage: the embedded default, a dict of encoded sessions."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any, Callable, ContextManager, Iterator

from .. import _codec, _fork
from .._fastpath import FastPath
from .._locks import KeyLocks
from .base import EncodedStorage, check_key, ttl_seconds

__all__ = ["MemoryStorage"]


class MemoryStorage(EncodedStorage):
    """Sessions in this process's memory, lost when it exits.

    Values are kept msgpack-encoded, so the storage accepts exactly what
    ``MsgpackFileStorage`` accepts and a caller can never change a stored
    value by mutating an object it read.  ``ttl`` (seconds or ``timedelta``)
    expires a session that many seconds after its last write; expired entries
    read as absent, are never listed, and are reclaimed as writes go on, so
    memory stays bounded under churn of short-lived keys.  ``clock`` returns
    the current time in seconds (inject a fake one in tests).

    Lock scope: thread.  ``lock(key)`` excludes other threads of this process.
    """

    def __init__(
        self,
        ttl: float | timedelta | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``ttl``: seconds (or a ``timedelta``) a session lives after its last write; ``clock``: the time source."""
        self.ttl = ttl_seconds(ttl)
        self._clock = clock
        self._data: dict[str, bytes] = {}
        # key -> expiry time; insertion order is write order, hence expiry order
        self._expires: dict[str, float] = {}
        self._mutex = threading.Lock()
        _fork.register(self)
        self._locks = KeyLocks()
        self._acquire = self._locks.acquire
        self._release = self._locks.release
        self._raw_loads = _codec.loads
        self._raw_dumps = _codec.dumps
        # What Session inlines when there is no ttl (see sessionkit._fastpath).
        locks = self._locks
        self._fast: tuple[Any, ...] | None = None
        if self.ttl is None:
            # A plain tuple: CPython indexes an exact tuple faster than a subclass.
            self._fast = tuple(FastPath(locks._held, self._data, locks, locks._waiting))

    # Fork hooks (see sessionkit._fork): the child gets a consistent copy.
    def _fork_before(self) -> None:
        self._mutex.acquire()

    def _fork_after_parent(self) -> None:
        self._mutex.release()

    def _fork_after_child(self) -> None:
        self._mutex.release()

    def __repr__(self) -> str:
        return f"MemoryStorage(ttl={self.ttl!r}, sessions={len(self._data)})"

    # -- private fast path used by Sessions ---------------------------------

    def _raw_read(self, key: str) -> bytes | None:
        raw = self._data.get(key)
        if raw is not None and self.ttl is not None:
            expires = self._expires.get(key)
            if expires is not None and expires <= self._clock():
                self._drop_expired(key)
                return None
        return raw

    def _raw_write(self, key: str, raw: bytes) -> None:
        if self.ttl is None:
            self._data[key] = raw
            return
        now = self._clock()
        with self._mutex:
            # Expiry first, value last: an exception raised asynchronously in
            # between leaves the old value readable, never a missing one.
            expires = self._expires
            expires.pop(key, None)  # re-inserted at the end: write order
            expires[key] = now + self.ttl
            self._data[key] = raw
            self._reclaim(now)

    def _drop_expired(self, key: str) -> None:
        with self._mutex:
            expires = self._expires.get(key)
            if expires is not None and expires <= self._clock():
                self._data.pop(key, None)
                self._expires.pop(key, None)

    def _reclaim(self, now: float) -> None:
        """Drop expired entries from the front of the expiry order (mutex held)."""
        expires = self._expires
        while expires:
            oldest = next(iter(expires))
            if expires[oldest] > now:
                break
            self._data.pop(oldest, None)
            del expires[oldest]

    # -- the StorageAdapter contract ----------------------------------------

    def delete(self, key: str) -> None:
        """Remove ``key``; deleting an absent key is not an error."""
        key = check_key(key)
        with self._mutex:
            self._data.pop(key, None)
            self._expires.pop(key, None)

    def keys(self) -> Iterator[str]:
        """The keys of every live session."""
        return iter([k for k, _ in self._live()])

    def items(self) -> Iterator[tuple[str, Any]]:
        """``(key, value)`` for every live session."""
        return iter([(k, _codec.loads(raw, k)) for k, raw in self._live()])

    def _live(self) -> list[tuple[str, bytes]]:
        with self._mutex:
            if self.ttl is None:
                return list(self._data.items())
            now = self._clock()
            self._reclaim(now)
            expires = self._expires
            return [(k, raw) for k, raw in self._data.items() if expires.get(k, now) > now]

    def lock(self, key: str, timeout: float | None = None) -> ContextManager[None]:
        """Hold ``key`` exclusively in this process (``LockTimeout`` after ``timeout`` seconds)."""
        return self._locks.lock(check_key(key), timeout)

    def close(self) -> None:
        """Nothing to release; the sessions stay readable."""
