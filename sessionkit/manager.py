"""Sessions and MultiSessions: key resolution, locking, and the with-block."""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

import msgpack

from ._locks import FRESH_IDENTS, shared_key_locks
from .session import _LOADED, _UNLOADED, Session
from .storage.base import StorageAdapter

__all__ = ["Sessions", "MultiSessions", "MultiSession"]

_new_session = object.__new__
_get_ident = threading.get_ident
_unpackb = msgpack.unpackb


class Sessions:
    """Per-key sessions over one storage, each opened as a locked read-modify-write.

    ::

        sessions = Sessions(MemoryStorage(), initial=dict)
        with sessions.open(chat_id) as s:
            s["count"] = s.get("count", 0) + 1

    ``open()`` locks the key (the storage's own ``lock()``, or an in-process
    per-key lock shared by every ``Sessions`` over the same storage object),
    reads the value, and on a clean exit writes it back if it was assigned or
    changed; if the block raises, nothing is written.
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
        if storage is None:
            from .storage.memory import MemoryStorage

            storage = MemoryStorage()
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
        self.lock_timeout = lock_timeout
        self.write_unchanged = bool(write_unchanged)
        self._get_key = get_key
        self._plain = get_key is None and not prefix  # a str key is the storage key

        # Locking: the storage's private fast pair, else its lock(), else ours.
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

        # The inlined path: (held-keys dict, dict of msgpack bytes, KeyLocks,
        # its waiters) of a storage that keeps encoded sessions in a dict.
        self._fast: tuple[Any, ...] | None = getattr(storage, "_fast", None)
        if self._fast is not None and self._acquire is None:
            self._fast = None

        # Reading: the storage's encoded form when it offers one.
        raw: list[Any] = [getattr(storage, n, None) for n in ("_raw_read", "_raw_write", "_raw_loads", "_raw_dumps")]
        if not all(callable(f) for f in raw):
            raw = [None] * 4  # the storage's own read/write, fingerprints for change detection
        self._raw_read: Any = raw[0]
        self._raw_write: Any = raw[1]
        self._raw_loads: Any = raw[2]
        self._raw_dumps: Any = raw[3]

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

        An eager session is locked and read here, so use ``open()`` only as
        the expression of a ``with`` statement.  ``lazy`` (default: the
        manager's) defers locking and reading until the session is first
        touched.  ``timeout`` (default: ``lock_timeout``)
        bounds the wait for the key's lock, then raises ``LockTimeout``.
        """
        handle = _new_session(Session)  # no __init__: this is the hot path
        if self._plain and type(key_or_obj) is str:
            key: str | None = key_or_obj
        else:
            key = self.resolve_key(key_or_obj)
        handle.key = key
        handle._m = self
        if timeout is None:
            timeout = self.lock_timeout
        if key is None or (self.lazy if lazy is None else lazy):
            handle._timeout = timeout
            handle._state = _UNLOADED
            handle._dict = None
            return handle  # locked and read at first touch, if ever
        fast = self._fast
        if fast is not None:
            # Inlined path for built-in msgpack-coded storages locked by a
            # KeyLocks table: two dict operations to lock, one to read.
            # A fresh insert of our new ident object means the key was free
            # (see _locks.FRESH_IDENTS); anything else takes the full path.
            me = _get_ident()
            if not FRESH_IDENTS or fast[0].setdefault(key, me) is not me:
                fast[2].acquire(key, timeout)  # waits, or refuses re-entry
            raw = fast[1].get(key)
            if raw is not None:
                try:
                    data = _unpackb(raw, strict_map_key=False)  # raw=False is the default
                except Exception:
                    data = None  # _load() below reports it as corrupt
                if data is not None:
                    handle._data = data
                    handle._dict = data if type(data) is dict else None
                    handle._snap = raw
                    handle._state = _LOADED
                    return handle
        handle._state = _UNLOADED
        handle._dict = None
        handle._timeout = timeout
        if fast is None:  # the fast path above already holds the lock
            handle._lock()
        handle._load_or_unlock()
        return handle


class MultiSession:
    """The handle of ``MultiSessions.open()``: one ``Session`` per part.

    Reach a part as ``m.name`` or ``m["name"]``.  ``m.delete()`` deletes every
    part on a clean exit.
    """

    __slots__ = ("_parts", "_order")

    def __init__(self, parts: dict[str, Session], order: list[str]) -> None:
        self._parts = parts
        self._order = order

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
        for name in self._order:
            self._parts[name].__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        handles = [self._parts[name] for name in self._order]
        try:
            if exc_type is None:
                for handle in handles:
                    handle._flush()
        finally:
            errors = []
            for handle in reversed(handles):
                try:
                    handle._finish()
                except BaseException as err:  # keep releasing the others
                    errors.append(err)
            if errors:
                raise errors[0]


class MultiSessions:
    """Several named sessions per update, each with its own storage and key.

    ::

        multi = MultiSessions(prefs=Sessions(..., initial=dict),
                              cart=Sessions(..., initial=list))
        with multi.open(chat_id) as m:
            m.prefs["lang"] = "en"

    Parts are locked in sorted order of their names, so two threads never
    deadlock; parts are therefore eager (a lazy part is a ``ValueError``).
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
                    "in a fixed order, so they must be eager"
                )
        self.parts = dict(parts)
        self._order = sorted(parts)

    def __repr__(self) -> str:
        return f"MultiSessions({', '.join(self._order)})"

    def open(self, key_or_obj: Any, timeout: float | None = None) -> MultiSession:
        """A handle to use as ``with multi.open(key) as m:``; parts lock in name order."""
        parts: dict[str, Session] = {}
        try:
            for name in self._order:  # each eager open() locks its part
                parts[name] = self.parts[name].open(key_or_obj, lazy=False, timeout=timeout)
        except BaseException:
            for handle in reversed(list(parts.values())):
                handle._finish()
            raise
        return MultiSession(parts, self._order)
