"""Session: the handle yielded by ``Sessions.open()``.

The handle owns one key's read-modify-write: it takes the key's lock (when
the ``with`` block is entered, or at first touch in lazy mode), loads the
value once, tracks whether it was assigned or changed in place, and on a
clean exit writes back only what changed.  After the ``with`` block it is
closed.  A handle that is never entered holds nothing.
"""

from __future__ import annotations

import pickle
import threading
from typing import TYPE_CHECKING, Any, Iterator

import msgpack

from . import _codec
from ._locks import FRESH_IDENTS
from .errors import SessionError, SessionKeyError

if TYPE_CHECKING:
    from .manager import Sessions

__all__ = ["Session"]

# Handle states.  The key's lock is held exactly while the state is LOADED or
# ASSIGNED, so no separate flag is needed.  NEW_*: built by open(), not yet
# entered (nothing held).
_UNLOADED, _LOADED, _ASSIGNED, _CLOSED, _NEW_EAGER, _NEW_LAZY = 0, 1, 2, 3, 4, 5

_UNKNOWN = object()  # a fingerprint that could not be taken: always write
_UNREAD = object()  # snapshot of a session assigned before any read
_dumps = _codec.dumps
_tls = _codec._local
_KEEP_BUFFER = _codec._KEEP_BUFFER
_get_ident = threading.get_ident
_unpackb = msgpack.unpackb


def _encode(value: Any, key: str) -> bytes:
    """``_codec.dumps(value, key)``, inlined for the hot paths: the thread's
    packer, made by ``dumps`` when the thread has none, and let go (by
    ``dumps`` too) when a value made its buffer large."""
    try:
        raw: bytes = _tls.packer.pack(value)
    except Exception:
        return _dumps(value, key)  # makes the packer, or raises SerializationError
    if len(raw) > _KEEP_BUFFER:
        del _tls.packer  # it keeps a buffer as large as its largest value: let that go
    return raw


def _fingerprint(value: Any) -> Any:
    """Bytes that change whenever ``value`` changes, nested parts included."""
    try:
        return _codec.dumps(value)
    except Exception:
        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            return _UNKNOWN


class Session:
    """One session, open inside a ``with sessions.open(key) as s:`` block.

    ``s.data`` is the value; ``s.data = v`` replaces it (``None`` deletes the
    session on exit).  When the value is a dict the handle also acts as that
    dict: ``s["n"]``, ``s.get("n", 0)``, ``"n" in s``, ``len(s)`` and so on.
    """

    # Sessions.open() builds handles without calling __init__ (it is on
    # every update's hot path) and, for an eager session, locks and loads it.
    __slots__ = ("key", "_m", "_timeout", "_state", "_data", "_dict", "_snap", "_cm")

    key: Any  # the full key (str), or None when the update has no session
    _snap: Any  # what was stored: bytes, a fingerprint, None, or _UNREAD

    def __init__(self, manager: Sessions, key: str | None, timeout: float | None = None, lazy: bool = False) -> None:
        """A handle for ``key`` (made by ``Sessions.open()``; not meant to be built directly)."""
        self.key = key
        self._m = manager
        self._timeout = timeout  # None: the manager's lock_timeout
        self._state = _NEW_LAZY if lazy or key is None else _NEW_EAGER
        # _cm: the storage's lock context manager, set only when one is used
        # _data while it is a plain dict: the mapping methods' fast path
        self._dict: dict[Any, Any] | None = None
        # _data and _snap (what was stored: bytes, a fingerprint, or None
        # when the storage held nothing) are set when the session is loaded

    def __repr__(self) -> str:
        state = ("unloaded", "loaded", "assigned", "closed", "not entered", "not entered")[self._state]
        return f"<Session key={self.key!r} {state}>"

    # -- the with-block -----------------------------------------------------

    def __enter__(self) -> Session:
        """Lock and read an eager session (a lazy one waits for its first touch)."""
        if self._state != _NEW_EAGER:
            if self._state == _NEW_LAZY:
                self._state = _UNLOADED
                return self
            raise SessionError("this session handle was already used; call open() again", key=self.key)
        fast = self._m._fast
        if fast is not None:
            # Inlined path for built-in msgpack-coded storages locked by a
            # KeyLocks table: two dict operations to lock, one to read.
            # fast = (held, data, locks, waiting): see _fastpath.FastPath.
            # A fresh insert of our new ident object means the key was free
            # (see _locks.FRESH_IDENTS); anything else takes the full path.
            key = self.key
            me = _get_ident()
            if not FRESH_IDENTS or fast[0].setdefault(key, me) is not me:
                t = self._timeout
                fast[2].acquire(key, self._m.lock_timeout if t is None else t)  # waits, or refuses re-entry
            try:
                raw = fast[1].get(key)
                if raw is not None:
                    try:
                        data = _unpackb(raw, strict_map_key=False)  # raw=False is the default
                    except _codec.DECODE_ERRORS:
                        data = None  # _load() below reports it as corrupt
                    if data is not None:
                        self._data = data
                        self._dict = data if type(data) is dict else None
                        self._snap = raw
                        self._state = _LOADED
                        return self
            except BaseException:  # an exception raised asynchronously
                self._m._release(key)  # type: ignore[misc]
                raise
        else:
            m = self._m
            lock_read = m._lock_read
            if lock_read is not None:
                # A built-in disk storage's lock-and-read, in one call (see
                # _fastpath); the key is locked once it returns.
                t = self._timeout
                raw = lock_read(self.key, m.lock_timeout if t is None else t)
                try:
                    if raw is None:
                        self._loaded(None)
                    else:
                        try:
                            data = _unpackb(raw, strict_map_key=False)  # raw=False is the default
                        except Exception:
                            data = m._raw_loads(raw, self.key)  # tuple keys, or CorruptSessionError
                        self._loaded(raw, data)
                except BaseException:
                    m._release(self.key)  # type: ignore[misc]
                    raise
                return self
            self._lock()
        self._load_or_unlock()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        state = self._state
        fast = self._m._fast
        if state == _LOADED and exc_type is None and fast is not None:
            # The hot path: a built-in storage's session that was read
            # (fast = (held, data, locks, waiting): see _fastpath.FastPath).
            key = self.key
            try:
                data = self._data
                if data is not None:
                    raw = _encode(data, key)
                    if raw != self._snap or self._m.write_unchanged:
                        fast[1][key] = raw
                elif self._snap is not None:
                    self._flush()
            finally:
                del fast[0][key]  # unlock first: nothing below can leave it held
                self._state = _CLOSED
                self._dict = None
                if fast[3]:
                    fast[2].notify(key)
            return
        if state != _LOADED and state != _ASSIGNED:  # nothing held
            self._state = _CLOSED
            return
        m = self._m
        if state == _LOADED and exc_type is None and m._write_release is not None and self._data is not None:
            # A built-in disk storage's write-and-release, in one call (see
            # _fastpath), for a session read and changed.
            try:
                raw = _encode(self._data, self.key)
                changed = raw != self._snap or m.write_unchanged
            except BaseException:
                self._finish()
                raise
            if not changed:
                self._finish()
                return
            self._state = _CLOSED  # the write lets the key go, however it ends
            self._dict = None
            m._write_release(self.key, raw)
            return
        try:
            if exc_type is None:
                self._flush()
        finally:
            self._finish()

    def _lock(self, timeout: Any = _UNREAD) -> None:
        """Take the key's lock (``timeout``: the handle's unless given)."""
        m = self._m
        if timeout is _UNREAD:
            timeout = self._timeout
            if timeout is None:
                timeout = m.lock_timeout
        if m._acquire is not None:
            m._acquire(self.key, timeout)
        else:
            cm = m._lock_cm(self.key, timeout)  # type: ignore[misc]
            cm.__enter__()
            self._cm = cm  # only after a successful enter: _unlock() exits it

    def _unlock(self) -> None:
        m = self._m
        if m._lock_cm is None:
            m._release(self.key)  # type: ignore[misc]
        else:
            cm = self._cm
            del self._cm
            cm.__exit__(None, None, None)

    def _finish(self) -> None:
        """Release the lock (if held) and close the handle, writing nothing."""
        state = self._state
        try:
            if state == _LOADED or state == _ASSIGNED:
                self._unlock()
        finally:
            self._state = _CLOSED
            self._dict = None

    def _load_or_unlock(self) -> None:
        """Load with the lock just taken; if loading fails, let the lock go."""
        try:
            self._load()
        except BaseException:
            self._unlock()
            raise

    def _load(self) -> None:
        """Read the value (lock held); a missing value becomes ``initial()``."""
        m = self._m
        key = self.key
        if m._raw_read is not None:
            self._loaded(m._raw_read(key))
        else:
            data = m.storage.read(key)
            self._loaded(None if data is None else _fingerprint(data), data)

    def _loaded(self, snap: Any, data: Any = _UNREAD) -> None:
        """Take what was read (lock held) as the session's value: ``snap``
        the encoded value read (or ``None``), or its fingerprint when
        ``data``, the value itself, is given."""
        m = self._m
        if data is _UNREAD:
            data = None if snap is None else m._raw_loads(snap, self.key)
        if data is None:
            snap = None
            if m.initial is not None:
                data = m.initial()
        self._snap = snap
        self._data = data
        if type(data) is dict:
            self._dict = data
        self._state = _LOADED

    def _flush(self) -> None:
        """Write back on a clean exit, following the write-back rules."""
        plan = self._plan()
        if plan is not None:
            self._write(plan)

    def _plan(self) -> tuple[str, Any] | None:
        """What a clean exit must do, encoded: ``None``, ``("delete", None)``,
        ``("raw", bytes)`` or ``("value", value)``.  Raises
        ``SerializationError`` before anything is written."""
        state = self._state
        if state != _LOADED and state != _ASSIGNED:
            return None
        m = self._m
        value = self._data
        if value is None:
            # assigned None deletes; read-and-absent stays absent
            if state == _ASSIGNED or self._snap is not None:
                return ("delete", None)
            return None
        snap = None if state == _ASSIGNED else self._snap
        if m._raw_write is not None:
            raw = m._raw_dumps(value, self.key)
            if state == _ASSIGNED or raw != snap or m.write_unchanged:
                return ("raw", raw)
            return None
        if (
            state == _ASSIGNED
            or snap is None
            or snap is _UNKNOWN
            or m.write_unchanged
            or _fingerprint(value) != snap
        ):
            return ("value", value)
        return None

    def _write(self, plan: tuple[str, Any]) -> None:
        """Carry out a plan made by :meth:`_plan`."""
        m = self._m
        op, payload = plan
        if op == "raw":
            m._raw_write(self.key, payload)
        elif op == "delete":
            m._delete(self.key)
        else:
            m.storage.write(self.key, payload)

    def _touch(self) -> Any:
        """Slow path of every data access: closed, keyless, or not yet loaded."""
        state = self._state
        if state == _CLOSED:
            raise SessionError(
                f"session {self.key!r} is closed: use it inside its with-block", key=self.key
            )
        if state == _NEW_EAGER or state == _NEW_LAZY:
            raise SessionError(
                f"session {self.key!r} was opened but not entered: use it as "
                "`with sessions.open(key) as s:` (open() alone locks nothing)",
                key=self.key,
            )
        if state != _UNLOADED:
            return self._data
        self._need_key()
        self._lock()
        self._load_or_unlock()
        return self._data

    def _need_key(self) -> None:
        if self.key is None:
            why = "get_key returned None" if self._m._get_key is not None else "the key is None"
            raise SessionKeyError(
                f"this update has no session ({why}); there is nothing to read or write"
            )

    # -- the value ------------------------------------------------------------

    @property
    def data(self) -> Any:
        """The session value, loaded on first access."""
        state = self._state
        if state == _LOADED or state == _ASSIGNED:
            return self._data
        return self._touch()

    @data.setter
    def data(self, value: Any) -> None:
        state = self._state
        if state >= _CLOSED:
            self._touch()  # raises
        if state == _UNLOADED:
            self._need_key()
            self._lock()
            self._snap = _UNREAD
        self._data = value
        self._dict = value if type(value) is dict else None
        self._state = _ASSIGNED

    def delete(self) -> None:
        """Delete the session on a clean exit (same as ``s.data = None``)."""
        self.data = None

    @property
    def is_new(self) -> bool:
        """True when the storage held nothing for this key."""
        if self._state != _LOADED:
            self._touch()
        snap = self._snap
        if snap is _UNREAD:  # assigned before any read: ask the storage
            m = self._m
            if m._raw_read is not None:
                return m._raw_read(self.key) is None
            return m.storage.read(self.key) is None
        return snap is None

    # -- the mapping view -----------------------------------------------------

    def _map(self) -> dict[Any, Any]:
        state = self._state
        data = self._data if (state == _LOADED or state == _ASSIGNED) else self._touch()
        if type(data) is dict or isinstance(data, dict):
            return data
        raise TypeError(
            f"session {self.key!r} holds {type(data).__name__}, not a dict; "
            "pass initial=dict to Sessions to start every session as an empty dict"
        )

    # _dict is the loaded value when it is a plain dict: the fast path.

    def __getitem__(self, name: Any) -> Any:
        d = self._dict
        if d is not None:
            return d[name]
        return self._map()[name]

    def __setitem__(self, name: Any, value: Any) -> None:
        d = self._dict
        if d is not None:
            d[name] = value
        else:
            self._map()[name] = value

    def __delitem__(self, name: Any) -> None:
        del self._map()[name]

    def __contains__(self, name: Any) -> bool:
        return name in self._map()

    def __len__(self) -> int:
        return len(self._map())

    def __iter__(self) -> Iterator[Any]:
        return iter(self._map())

    def get(self, name: Any, default: Any = None) -> Any:
        """``s.data.get(name, default)``: a field of a dict session."""
        d = self._dict
        if d is not None:
            return d.get(name, default)
        return self._map().get(name, default)

    def setdefault(self, name: Any, default: Any = None) -> Any:
        """``s.data.setdefault(name, default)``: set a field if missing; returns its value."""
        return self._map().setdefault(name, default)

    def pop(self, name: Any, *default: Any) -> Any:
        """``s.data.pop(name[, default])``: remove a field and return its value."""
        return self._map().pop(name, *default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        """``s.data.update(...)``: set several fields of a dict session."""
        self._map().update(*args, **kwargs)

    def keys(self) -> Any:
        """The field names of a dict session."""
        return self._map().keys()

    def values(self) -> Any:
        """The field values of a dict session."""
        return self._map().values()

    def items(self) -> Any:
        """``(name, value)`` pairs of a dict session."""
        return self._map().items()
