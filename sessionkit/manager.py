"""Sessions and MultiSessions: key resolution, locking, and the with-block."""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Iterator

from ._locks import shared_key_locks
from .errors import LockTimeout, SessionError
from .session import _CLOSED, _NEW_EAGER, _NEW_LAZY, _UNLOADED, Session
from .storage.base import StorageAdapter

__all__ = ["Sessions", "MultiSessions", "MultiSession"]

_new_session = object.__new__


class Sessions:
    """Per-key sessions over one storage, each opened as a locked read-modify-write.

    ::

        sessions = Sessions(MemoryStorage(), initial=dict)
        with sessions.open(chat_id) as s:
            s["count"] = s.get("count", 0) + 1

    Entering the ``with`` block locks the key (the storage's own ``lock()``,
    or an in-process per-key lock shared by every ``Sessions`` over the same
    storage object) and reads the value; a clean exit writes it back if it
    was assigned or changed; if the block raises, nothing is written.

    ``storage``: any ``StorageAdapter`` (default: a new ``MemoryStorage``).
    ``initial``: a zero-argument factory for a session the storage does not
    hold (``dict``).  ``prefix``: prepended to every key.  ``get_key``: maps
    the argument of ``open()`` (an update object, say) to a key, or ``None``
    for "no session".  ``lazy``: lock and read only when the session is
    first touched.  ``lock_timeout``: seconds to wait for a key's lock before
    ``LockTimeout`` (``None``: for ever).  ``write_unchanged``: write back a
    session that was read and left unchanged too.
    """

    def __init__(
        self,
        storage: StorageAdapter | None = None,
        *,
        initial: Callable[[], Any] | None = None,
        prefix: str = "",
        get_key: Callable[[Any], str | int | None] | None = None,
        lazy: bool = False,
        lock_timeout: float | None = None,
        write_unchanged: bool = False,
    ) -> None:
        """Set up the manager; the parameters are described in the class docstring."""
        if storage is None:
            from .storage.memory import MemoryStorage

            storage = MemoryStorage()
        if isinstance(storage, type):
            raise TypeError(
                f"storage must be a storage object, not the class {storage.__name__}: "
                f"write {storage.__name__}(...)"
            )
        for name in ("read", "write", "delete"):
            if not callable(getattr(storage, name, None)):
                raise TypeError(f"storage {storage!r} has no {name}() method")
        if initial is not None and not callable(initial):
            raise TypeError("initial must be a zero-argument callable such as dict, not a value")
        if get_key is not None and not callable(get_key):
            raise TypeError("get_key must be a callable")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        self.storage = storage
        self.initial = initial
        self.prefix = prefix
        self.lazy = bool(lazy)
        self._new_state = _NEW_LAZY if self.lazy else _NEW_EAGER  # of a handle from open()
        self.lock_timeout = _check_timeout(lock_timeout, "lock_timeout")
        self.write_unchanged = bool(write_unchanged)
        self._get_key = get_key
        self._plain = get_key is None and not prefix  # a str key is the storage key

        # Locking: the storage's private fast pair (see _fastpath), else its
        # lock(), else ours.
        self._acquire: Callable[[str, float | None], None] | None = getattr(storage, "_acquire", None)
        self._release: Callable[[str], None] | None = getattr(storage, "_release", None)
        self._lock_cm: Callable[..., Any] | None = None
        if self._acquire is None or self._release is None:
            self._acquire = self._release = None
            lock = getattr(storage, "lock", None)
            if callable(lock):
                self._lock_cm = lock
            else:
                table = shared_key_locks(storage)
                self._acquire, self._release = table.acquire, table.release

        # The inlined memory path (see _fastpath.FastPath).
        self._fast: tuple[Any, ...] | None = getattr(storage, "_fast", None)
        if self._fast is not None and self._acquire is None:
            self._fast = None

        # Reading: the storage's encoded form when it offers one (see _fastpath).
        raw: list[Any] = [getattr(storage, n, None) for n in ("_raw_read", "_raw_write", "_raw_loads", "_raw_dumps")]
        if not all(callable(f) for f in raw):
            raw = [None] * 4  # the storage's own read/write, fingerprints for change detection
        self._raw_read: Any = raw[0]
        self._raw_write: Any = raw[1]
        self._raw_loads: Any = raw[2]
        self._raw_dumps: Any = raw[3]
        # A disk storage's lock-and-read and write-and-release (see _fastpath):
        # only with its own lock pair and its encoded form.
        self._lock_read: Any = None
        self._write_release: Any = None
        if raw[0] is not None and self._acquire == getattr(storage, "_acquire", None) and self._fast is None:
            self._lock_read = getattr(storage, "_lock_read", None)
            self._write_release = getattr(storage, "_write_release", None)
            if not (callable(self._lock_read) and callable(self._write_release)):
                self._lock_read = self._write_release = None
        # Deleting: the storage's session delete when it has one (see _fastpath).
        self._delete: Any = getattr(storage, "_raw_delete", None) if raw[0] is not None else None
        if self._delete is None:
            self._delete = storage.delete

    def __repr__(self) -> str:
        return f"Sessions({self.storage!r}, prefix={self.prefix!r}, lazy={self.lazy})"

    def resolve_key(self, key_or_obj: Any) -> str | None:
        """The full storage key for ``key_or_obj`` (``None``: no session)."""
        key: Any = self._get_key(key_or_obj) if self._get_key is not None else key_or_obj
        kind = type(key)
        if kind is str:
            return self.prefix + key
        if kind is int:
            return self.prefix + str(key)
        if key is None:
            return None
        if isinstance(key, bool):
            raise TypeError("a session key cannot be a bool; use a str or an int")
        if isinstance(key, int):
            return self.prefix + str(int(key))
        if isinstance(key, str):
            return self.prefix + str.__str__(key)
        source = "get_key returned" if self._get_key is not None else "open() got"
        raise TypeError(
            f"a session key must be a str, an int or None, but {source} "
            f"{kind.__name__}; pass get_key= to derive the key from such objects"
        )

    def open(self, key_or_obj: Any, lazy: bool | None = None, timeout: float | None = None) -> Session:
        """A handle to use as ``with sessions.open(key) as s:``.

        ``open()`` only builds the handle: an eager session is locked and
        read when the ``with`` block is entered, a lazy one (``lazy``,
        default: the manager's) when it is first touched.  A handle that is
        never entered holds nothing, and touching it raises
        ``SessionError``.  ``timeout`` (default: ``lock_timeout``) bounds the
        wait for the key's lock, then raises ``LockTimeout``.
        """
        handle = _new_session(Session)  # no __init__: this is the hot path
        if self._plain and type(key_or_obj) is str:
            key: str | None = key_or_obj
        else:
            key = self.resolve_key(key_or_obj)
        handle.key = key
        handle._m = self
        if timeout is not None:
            _check_timeout(timeout, "timeout")
        handle._timeout = timeout  # None: the manager's lock_timeout
        handle._dict = None
        if lazy is None and key is not None:
            handle._state = self._new_state
        else:  # a lazy one is locked and read at first touch, if ever
            handle._state = _NEW_LAZY if key is None or lazy else _NEW_EAGER
        return handle


def _check_timeout(value: Any, name: str) -> float | None:
    """A lock timeout: ``None`` or a number of seconds, at least 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large: use None to wait for ever") from None
    if not seconds >= 0:  # also refuses NaN
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    return seconds


class MultiSession:
    """The handle of ``MultiSessions.open()``: one ``Session`` per part.

    Reach a part as ``m.name`` or ``m["name"]``.  ``m.delete()`` deletes every
    part on a clean exit.
    """

    __slots__ = ("_parts", "_order", "_timeout", "_entered")

    def __init__(self, parts: dict[str, Session], order: list[str], timeout: float | None = None) -> None:
        self._parts = parts
        self._order = order
        self._timeout = timeout
        self._entered = False

    def __getattr__(self, name: str) -> Session:
        try:
            return self._parts[name]
        except KeyError:
            raise AttributeError(f"no session part named {name!r}") from None

    def __getitem__(self, name: str) -> Session:
        return self._parts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __repr__(self) -> str:
        return f"<MultiSession {self._parts!r}>"

    def delete(self) -> None:
        """Delete every part on a clean exit."""
        for name in self._order:
            self._parts[name].delete()

    def __enter__(self) -> MultiSession:
        """Lock every part without ever deadlocking, then read them all."""
        if self._entered:
            raise SessionError("this multi-session handle was already used; call open() again")
        self._entered = True
        handles = [self._parts[name] for name in self._order]
        keyed = []
        seen: dict[tuple[int, str], str] = {}
        for name, handle in zip(self._order, handles):
            if handle.key is None:
                handle._state = _UNLOADED  # touching it raises SessionKeyError
                continue
            storage = handle._m.storage
            store = id(getattr(storage, "_state", storage))  # disk handles share one state
            other = seen.setdefault((store, handle.key), name)
            if other != name:
                self._entered = False
                raise ValueError(
                    f"parts {other!r} and {name!r} are the same session ({handle.key!r} in one "
                    "store): give them different prefixes, or use one part"
                )
            keyed.append(handle)
        _lock_all(keyed, self._timeout)
        try:
            for handle in keyed:
                handle._load()  # LOADED from here: _finish() unlocks it
        except BaseException:
            for handle in reversed(keyed):
                if handle._state == _NEW_EAGER:  # locked, not loaded
                    handle._state = _CLOSED
                    handle._unlock()
            _finish_all(handles)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        handles = [self._parts[name] for name in self._order]
        try:
            if exc_type is None:
                plans = [handle._plan() for handle in handles]  # encode every part first
                for handle, plan in zip(handles, plans):
                    if plan is not None:
                        handle._write(plan)
        finally:
            _finish_all(handles)


def _lock_all(handles: list[Session], timeout: float | None) -> None:
    """Lock every handle's key, waiting on at most one lock at a time.

    Each round waits for one part's lock (first round: the first part) and
    then tries the others without waiting.  If one is busy, the round lets
    every lock go, pauses a few random milliseconds, and the next round
    waits for the part that was busy.  A thread never waits while holding a
    lock, so no two MultiSessions (nor a MultiSessions and a Sessions) can
    deadlock, whatever parts and storages they share and in whatever order.
    """
    if not handles:
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    first = 0
    rounds = 0
    while True:
        held: list[Session] = []
        busy = -1
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            handles[first]._lock(left)
            held.append(handles[first])
            for i, handle in enumerate(handles):
                if i != first:
                    try:
                        handle._lock(0)
                    except LockTimeout:
                        busy = i
                        break
                    held.append(handle)
        except BaseException:
            _unlock_all(held)
            raise
        if busy < 0:
            return
        _unlock_all(held)
        first = busy
        rounds += 1
        pause = random.uniform(0, min(0.0005 * rounds, 0.02))
        if deadline is not None and time.monotonic() + pause >= deadline:
            raise LockTimeout(
                f"could not lock every part of session {handles[busy].key!r} within {timeout} s",
                key=handles[busy].key,
            )
        time.sleep(pause)


def _each_in_reverse(handles: list[Session], step: Callable[[Session], None]) -> None:
    """``step`` every handle, last first, even when one fails; then raise the first error."""
    errors = []
    for handle in reversed(handles):
        try:
            step(handle)
        except BaseException as err:  # keep releasing the others
            errors.append(err)
    if errors:
        raise errors[0]


def _unlock_all(held: list[Session]) -> None:
    _each_in_reverse(held, Session._unlock)


def _finish_all(handles: list[Session]) -> None:
    _each_in_reverse(handles, Session._finish)


class MultiSessions:
    """Several named sessions per update, each with its own storage and key.

    ::

        multi = MultiSessions(prefs=Sessions(..., initial=dict),
                              cart=Sessions(..., initial=list))
        with multi.open(chat_id) as m:
            m.prefs["lang"] = "en"

    Entering the block locks every part without ever deadlocking, whatever
    the part names and however several ``MultiSessions`` map them to
    storages: it waits for one part's lock at a time and takes the others
    only if they are free, otherwise it lets all go and tries again (see
    ``_lock_all``).  Parts are therefore eager (a lazy part is a
    ``ValueError``).  On a clean exit every part is encoded before any is
    written, so a value that cannot be stored writes no part.
    """

    def __init__(self, **parts: Sessions) -> None:
        if not parts:
            raise ValueError("MultiSessions needs at least one part, e.g. prefs=Sessions(...)")
        for name, part in parts.items():
            if not name.isidentifier() or name.startswith("_") or hasattr(MultiSession, name):
                raise ValueError(
                    f"invalid part name {name!r}: use an identifier that does not start "
                    "with '_' and is not a handle method"
                )
            if not isinstance(part, Sessions):
                raise TypeError(f"part {name!r} must be a Sessions, not {type(part).__name__}")
            if part.lazy:
                raise ValueError(
                    f"part {name!r} is lazy; multi-session parts are locked together "
                    "when the block is entered, so they must be eager"
                )
        self.parts = dict(parts)
        self._order = list(parts)

    def __repr__(self) -> str:
        return f"MultiSessions({', '.join(self._order)})"

    def open(self, key_or_obj: Any, timeout: float | None = None) -> MultiSession:
        """A handle to use as ``with multi.open(key) as m:``; every part locks on entering.

        ``timeout`` bounds the whole wait for every part's lock (default: no
        limit), then raises ``LockTimeout``.
        """
        timeout = _check_timeout(timeout, "timeout")
        parts = {name: self.parts[name].open(key_or_obj, lazy=False) for name in self._order}
        return MultiSession(parts, self._order, timeout)
