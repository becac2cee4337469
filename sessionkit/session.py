"""Session: the handle yielded by ``Sessions.open()``.

The handle owns one key's read-modify-write: it takes the key's lock (at
``open()``, or at first touch in lazy mode), loads the value once, tracks
whether it was assigned or changed in place, and on a clean exit writes back
only what changed.  After the ``with`` block it is closed.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any, Iterator

from . import _codec
from .errors import SessionError, SessionKeyError

if TYPE_CHECKING:
    from .manager import Sessions

__all__ = ["Session"]

# Handle states.  The key's lock is held exactly while the state is LOADED or
# ASSIGNED, so no separate flag is needed.
_UNLOADED, _LOADED, _ASSIGNED, _CLOSED = 0, 1, 2, 3

_UNKNOWN = object()  # a fingerprint that could not be taken: always write
_UNREAD = object()  # snapshot of a session assigned before any read
_dumps = _codec.dumps
_tls = _codec._local


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

    def __init__(self, manager: Sessions, key: str | None, timeout: float | None = None) -> None:
        self.key = key
        self._m = manager
        self._timeout = timeout
        self._state = _UNLOADED
        # _cm: the storage's lock context manager, set only when one is used
        # _data while it is a plain dict: the mapping methods' fast path
        self._dict: dict[Any, Any] | None = None
        # _data and _snap (what was stored: bytes, a fingerprint, or None
        # when the storage held nothing) are set when the session is loaded

    def __repr__(self) -> str:
        state = ("unloaded", "loaded", "assigned", "closed")[self._state]
        return f"<Session key={self.key!r} {state}>"

    # -- the with-block -----------------------------------------------------

    def __enter__(self) -> Session:
        # Sessions.open() already locked and read an eager session.
        if self._state == _CLOSED:
            raise SessionError("this session handle was already used; call open() again", key=self.key)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        state = self._state
        fast = self._m._fast
        if state == _LOADED and exc_type is None and fast is not None:
            # The hot path: a built-in storage's session that was read.
            key = self.key
            try:
                data = self._data
                if data is not None:
                    try:
                        raw = _tls.packer.pack(data)
                    except Exception:
                        raw = _dumps(data, key)  # makes the packer, or raises SerializationError
                    if raw != self._snap or self._m.write_unchanged:
                        fast[1][key] = raw
                elif self._snap is not None:
                    self._flush()
            finally:
                self._state = _CLOSED
                self._dict = None
                del fast[0][key]
                if fast[3]:
                    fast[2].notify(key)
            return
        if state != _LOADED and state != _ASSIGNED:  # nothing held
            self._state = _CLOSED
            return
        try:
            if exc_type is None:
                self._flush()
        finally:
            self._finish()

    def _lock(self) -> None:
        m = self._m
        if m._acquire is not None:
            m._acquire(self.key, self._timeout)
        else:
            cm = m._lock_cm(self.key, self._timeout)  # type: ignore[misc]
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
        self._state = _CLOSED
        self._dict = None
        if state == _LOADED or state == _ASSIGNED:
            self._unlock()

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
        raw_read = m._raw_read
        if raw_read is not None:
            raw = raw_read(key)
            data = None if raw is None else m._raw_loads(raw, key)
            snap = raw
        else:
            data = m.storage.read(key)
            snap = None if data is None else _fingerprint(data)
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
        state = self._state
        if state != _LOADED and state != _ASSIGNED:
            return
        m = self._m
        key = self.key
        value = self._data
        if value is None:
            # assigned None deletes; read-and-absent stays absent
            if state == _ASSIGNED or self._snap is not None:
                m.storage.delete(key)
            return
        snap = None if state == _ASSIGNED else self._snap
        if m._raw_write is not None:
            raw = m._raw_dumps(value, key)
            if state == _ASSIGNED or raw != snap or m.write_unchanged:
                m._raw_write(key, raw)
        elif (
            state == _ASSIGNED
            or snap is None
            or snap is _UNKNOWN
            or m.write_unchanged
            or _fingerprint(value) != snap
        ):
            m.storage.write(key, value)

    def _touch(self) -> Any:
        """Slow path of every data access: closed, keyless, or not yet loaded."""
        state = self._state
        if state == _CLOSED:
            raise SessionError(
                f"session {self.key!r} is closed: use it inside its with-block", key=self.key
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
        if state == _CLOSED:
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
        d = self._dict
        if d is not None:
            return d.get(name, default)
        return self._map().get(name, default)

    def setdefault(self, name: Any, default: Any = None) -> Any:
        return self._map().setdefault(name, default)

    def pop(self, name: Any, *default: Any) -> Any:
        return self._map().pop(name, *default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._map().update(*args, **kwargs)

    def keys(self) -> Any:
        return self._map().keys()

    def values(self) -> Any:
        return self._map().values()

    def items(self) -> Any:
        return self._map().items()
