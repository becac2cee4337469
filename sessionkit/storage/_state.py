"""One shared state per disk store per process.

A disk storage object (``MsgpackFileStorage``, ``ShelveStorage``) is a
handle onto a :class:`StoreState`: the store's cross-process locks, its
per-key thread locks, and what the backend keeps in memory about the files
(the logs' indexes, the open dbm).  Every handle on the same store shares
the one state, whatever path it was given: stores are told apart by the
device and inode of their directory (plus a file name for a shelf), so a
symlinked or relative spelling finds the same state.  Two handles therefore
exclude each other exactly as two threads with one handle do, and closing
one leaves the others working; the state closes with its last handle.

Lock order, for every code path: a key's thread lock, then its process lock
(both taken by :class:`ProcessKeyLocks`); then at most one state mutex (a
shard's, or the shelf's) for the microseconds of an operation, during which
the matching store slot is locked.  No path holds two state mutexes, so the
fork hooks (see ``sessionkit._fork``) can take them all.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, TypeVar

from .. import _fork
from .._locks import FRESH_IDENTS, KeyLocks, LockContext, _get_ident
from ..errors import StorageError
from ._lockfile import OfdLocks, StripedLocks, key_slot, make_locks

S = TypeVar("S", bound="StoreState")

_registry: dict[tuple[Any, ...], "StoreState"] = {}
_registry_mutex = threading.Lock()
_fork.register_mutex(_registry_mutex)
# States whose handle was garbage-collected without close().  The collector
# may run anywhere, even inside attach() with _registry_mutex held, so a
# finalizer only appends here (no lock); attach() detaches them, in plain code.
_dropped: list["StoreState"] = []


def release_dropped(state: "StoreState") -> None:
    """A handle of ``state`` was collected without ``close()``: detach it at the next safe point."""
    _dropped.append(state)


def _detach_dropped() -> None:
    while _dropped:
        try:
            state = _dropped.pop()
        except IndexError:
            return
        state.detach()


def store_identity(directory: str, name: str = "") -> tuple[Any, ...]:
    """Who a store is: its directory's device and inode, and a file name in it."""
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise StorageError(f"cannot open {directory}: {exc}", path=directory) from exc
    return (st.st_dev, st.st_ino, name)


class StoreState:
    """What every handle on one store shares in this process.

    Subclasses keep the backend's data; they set it up in :meth:`setup`
    (called once, before any handle sees the state) and release it in
    :meth:`teardown`.  ``mutexes()`` lists the locks that guard that data,
    for the fork hooks.
    """

    def __init__(self, ident: tuple[Any, ...], lock_path: str, directory: str) -> None:
        self.ident = ident
        self.users = 0
        self.locks: OfdLocks | StripedLocks = make_locks(lock_path, directory, self.has_data)
        self.keys = ProcessKeyLocks(self)

    @classmethod
    def attach(cls: type[S], ident: tuple[Any, ...], build: Callable[[], S]) -> S:
        """The state of the store ``ident``, built by ``build()`` if this process has none."""
        _detach_dropped()
        with _registry_mutex:
            state = _registry.get(ident)
            if state is None:
                state = build()
                try:
                    state.setup()
                except BaseException:
                    state.locks.close()
                    raise
                _registry[ident] = state
                _fork.register(state)
            elif not isinstance(state, cls):
                raise StorageError(f"this store is already open as a {type(state).__name__}")
            state.users += 1
            return state  # type: ignore[return-value]

    def detach(self) -> None:
        """One handle fewer; the last one closes the files."""
        with _registry_mutex:
            self.users -= 1
            if self.users:
                return
            del _registry[self.ident]
            _fork.unregister(self)
        try:
            self.teardown()
        finally:
            self.locks.close()

    def has_data(self) -> bool:
        """Whether the store's files exist (then a missing lock file was deleted)."""
        return False

    def setup(self) -> None:
        """Open the store's files (the store's slots may be locked here)."""

    def teardown(self) -> None:
        """Close the store's files (no handle is left)."""

    def mutexes(self) -> list[Any]:
        """The locks that guard this state's data, in the order to take them."""
        return []

    # -- fork hooks (see sessionkit._fork) ----------------------------------------

    def _fork_before(self) -> None:
        taken = []
        try:
            for mutex in self.mutexes():
                mutex.acquire()
                taken.append(mutex)
        except BaseException:
            for mutex in reversed(taken):
                mutex.release()
            raise

    def _fork_after_parent(self) -> None:
        for mutex in reversed(self.mutexes()):
            mutex.release()

    def _fork_after_child(self) -> None:
        for mutex in reversed(self.mutexes()):
            mutex.release()
        self.locks.after_fork_in_child()
        # Keys the forking thread holds (its KeyLocks entries, which the
        # child keeps) belong to the parent: a handle the child inherited
        # inside a with-block must not write them, nor a grandchild's.
        me = threading.get_ident()
        self.keys.orphaned = {key for key, owner in self.keys.threads._held.items() if owner == me}
        self.keys.held.clear()


class ProcessKeyLocks(LockContext):
    """Per-key locks across the threads and processes of one store.

    The key's thread lock comes first (threads of this process queue in
    memory, and re-entry is refused), then its process lock.  ``held`` maps
    each key this process holds to the lock file it was taken through and
    its slot (hashed once, at acquire): a
    write whose key lock was taken through a lock file that has since been
    deleted or replaced is refused (see :meth:`check_held`).
    """

    def __init__(self, state: StoreState) -> None:
        self.state = state
        self.threads = KeyLocks()
        self.held: dict[str, tuple[Any, int]] = {}
        self.orphaned: set[str] = set()  # in a forked child: keys its parent held

    def acquire(self, key: str, timeout: float | None = None, slot: int = -1, me: int | None = None) -> None:
        """Lock ``key`` (``slot``: its :func:`key_slot`, if the caller has it;
        ``me``: the owner object, as for ``KeyLocks.acquire``)."""
        if me is None:
            me = _get_ident()
        threads = self.threads
        thread_taken = False  # (where idents are not fresh objects: release_taken cannot tell)
        try:
            if FRESH_IDENTS and threads._held.setdefault(key, me) is me:
                left = timeout  # free in this process: KeyLocks.acquire's fast path, inline
            else:
                start = time.monotonic() if timeout is not None else 0.0
                threads.acquire(key, timeout, me)
                thread_taken = True
                left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
            if slot < 0:
                slot = key_slot(key)
            self.held[key] = (self.state.locks.lock(slot, left, key), slot)
            if self.orphaned:
                self.orphaned.discard(key)
        except BaseException:
            # Failed, or cut short by an exception raised asynchronously once
            # the key was taken: let go of what this call took (never of a
            # hold this thread already had: re-entry is refused above).
            if FRESH_IDENTS:
                locks = self.state.locks
                if slot >= 0 and key not in self.held and threads._held.get(key) is me and isinstance(locks, OfdLocks):
                    # The exception may have landed as lock() returned, its
                    # byte locked: unlocking a byte not locked is harmless.
                    locks.unlock(locks.file, slot)
                self.release_taken(key, me)
            elif thread_taken and key not in self.held:
                threads.release(key)
            raise

    def release_taken(self, key: str, me: int) -> None:
        """:meth:`release` ``key`` if it is held under ``me`` (see ``KeyLocks.release_taken``)."""
        if FRESH_IDENTS and self.threads._held.get(key) is me:
            self.release(key)

    def release(self, key: str) -> None:
        try:
            # Forgotten only once unlocked, and in the try: an exception raised
            # asynchronously as a call here returns still lets the thread lock go.
            taken = self.held.get(key)
            if taken is not None:
                self.state.locks.unlock(taken[0], taken[1])
                if key in self.held:
                    del self.held[key]
            elif self.orphaned:
                self.orphaned.discard(key)
        finally:
            threads = self.threads  # KeyLocks.release, inline
            if threads._held.pop(key, None) is not None and threads._waiting:
                threads.notify(key)

    def check_held(self, key: str, path: str) -> None:
        """Refuse a write under a key lock that no longer excludes other processes.

        Called with the store slot of the write locked (so the lock file is
        known to be current).  A key not held by this process (a direct
        ``storage.write()``) passes.
        """
        if self.orphaned and key in self.orphaned:
            raise StorageError(
                f"session {key!r} was opened before this process was forked, so the parent "
                "holds it; the child cannot write it (fork outside with-blocks)",
                key=key,
                path=path,
            )
        taken = self.held.get(key)
        if taken is not None and not self.state.locks.is_current(taken[0]):
            raise StorageError(
                f"the lock file of {path} was deleted or replaced while session {key!r} was open, "
                "so another process may have opened it too; this write was refused",
                key=key,
                path=path,
            )
