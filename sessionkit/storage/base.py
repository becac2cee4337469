"""The storage contract, documented once.

A storage adapter maps a string key to a session value.  Only ``read``,
``write`` and ``delete`` are required; every built-in storage implements the
optional members too.

Rules every adapter keeps:

* ``None`` is never stored: ``write(key, None)`` raises ``ValueError``, and
  ``read`` returns ``None`` for "absent".
* ``has``, ``keys``, ``values`` and ``items`` never list expired entries.
* ``lock(key, timeout=None)`` returns a context manager that holds the key
  exclusively at the widest scope the backend can guarantee (thread for
  memory, process for disk, cluster for a server) and raises ``LockTimeout``
  when ``timeout`` seconds pass.  A storage without ``lock`` is guarded by an
  in-process per-key lock shared by every ``Sessions`` over that object.
  Within one process, a key held open never delays a different key; across
  processes a backend may share one lock among a bounded set of keys, and
  says so in its docstring.
* A value the backend cannot store raises ``SerializationError`` and leaves
  the stored value as it was; undecodable stored bytes raise
  ``CorruptSessionError`` and are kept; a failing backend raises
  ``StorageError`` with the original exception chained.

Built-in storages also implement a private fast path used by ``Sessions``
(the lock without a context manager object, and the encoded form, so change
detection compares bytes instead of copying values); ``sessionkit._fastpath``
documents it in one place.  Third-party adapters need none of it.
"""

from __future__ import annotations

from typing import Any, ContextManager, Iterator, Protocol, runtime_checkable

__all__ = ["StorageAdapter"]


@runtime_checkable
class StorageAdapter(Protocol):
    """What ``Sessions`` needs from a storage: read, write and delete by key."""

    def read(self, key: str) -> Any | None:
        """The value stored under ``key``, or ``None`` when there is none."""

    def write(self, key: str, value: Any) -> None:
        """Store ``value`` (never ``None``) under ``key``."""

    def delete(self, key: str) -> None:
        """Remove ``key``; deleting an absent key is not an error."""


class FullStorage(StorageAdapter, Protocol):
    """A storage with every optional member (all built-in storages)."""

    def has(self, key: str) -> bool: ...

    def keys(self) -> Iterator[str]: ...

    def values(self) -> Iterator[Any]: ...

    def items(self) -> Iterator[tuple[str, Any]]: ...

    def lock(self, key: str, timeout: float | None = None) -> ContextManager[None]: ...

    def close(self) -> None: ...


class EncodedStorage:
    """``read``, ``write``, ``has`` and ``values`` of a built-in storage, on
    top of its encoded-form methods (``_raw_read``, ``_raw_write``,
    ``_raw_loads``, ``_raw_dumps``) and its ``items()``."""

    _raw_read: Any
    _raw_write: Any
    _raw_loads: Any
    _raw_dumps: Any

    def read(self, key: str) -> Any | None:
        """The value stored under ``key``, or ``None`` when there is none."""
        raw = self._raw_read(check_key(key))
        return None if raw is None else self._raw_loads(raw, key)

    def write(self, key: str, value: Any) -> None:
        """Store ``value`` (never ``None``) under ``key``; ``SerializationError`` if it cannot be stored."""
        key = check_key(key)
        if value is None:
            raise ValueError("None is never stored; use delete() to remove a session")
        self._raw_write(key, self._raw_dumps(value, key))

    def has(self, key: str) -> bool:
        """Whether a live value is stored under ``key``."""
        return self._raw_read(check_key(key)) is not None

    def items(self) -> Iterator[tuple[str, Any]]:
        raise NotImplementedError

    def values(self) -> Iterator[Any]:
        """Every live session's value."""
        return iter([value for _, value in self.items()])


def ttl_seconds(ttl: Any) -> float | None:
    """Normalise a ``ttl`` given as seconds or ``datetime.timedelta``."""
    if ttl is None:
        return None
    seconds = ttl.total_seconds() if hasattr(ttl, "total_seconds") else ttl
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"ttl must be seconds or a timedelta, not {type(ttl).__name__}")
    if not seconds > 0:
        raise ValueError(f"ttl must be positive, got {ttl!r}")
    return float(seconds)


def check_key(key: Any) -> str:
    """Storages take string keys only."""
    if type(key) is not str:
        if isinstance(key, str):
            return str(key)
        raise TypeError(f"storage keys are str, not {type(key).__name__}")
    return key
