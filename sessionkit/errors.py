"""The exception tree of sessionkit.

Every error the library raises on purpose derives from :class:`SessionError`,
and each one also derives from the built-in exception it refines, so code
that already catches ``TimeoutError`` or ``TypeError`` keeps working::

    Exception
     └── SessionError
          ├── SessionKeyError      (KeyError)     the update has no session key
          ├── LockTimeout          (TimeoutError) the per-key lock was not acquired in time
          ├── SerializationError   (TypeError)    the backend cannot store this value
          ├── CorruptSessionError  (ValueError)   stored bytes cannot be decoded
          ├── StorageError         (OSError)      the backend itself failed
          └── LockLost                            a server lock was lost mid-block: nothing written

Every error carries the session key it is about in ``.key`` (``None`` when it
is not about one key) and, where a file is involved, its ``.path``.  Errors
pickle with their context, so they cross process boundaries intact.
Dependency errors are chained (``raise ... from exc``), never swallowed.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "SessionError",
    "SessionKeyError",
    "LockTimeout",
    "SerializationError",
    "CorruptSessionError",
    "StorageError",
    "LockLost",
]


class SessionError(Exception):
    """Base class of every error raised by sessionkit."""

    def __init__(self, message: str = "", *, key: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, self.args, self.__dict__)


class SessionKeyError(SessionError, KeyError):
    """The session was used although the update has no session key."""


class LockTimeout(SessionError, TimeoutError):
    """The lock of a session key could not be acquired within the timeout."""


class SerializationError(SessionError, TypeError):
    """The backend cannot store this value; the stored value stays as it was."""


class CorruptSessionError(SessionError, ValueError):
    """Stored bytes cannot be decoded; they are kept, never silently dropped.

    ``path`` names the file that holds them (or the quarantine file they were
    moved to), where the backend has files.
    """


class StorageError(SessionError, OSError):
    """The backend failed (disk full, permission denied, connection lost).

    The original exception is chained as ``__cause__``; nothing was
    half-written.
    """


class LockLost(SessionError):
    """A session's server-side lock was lost while its block ran; nothing was written.

    ``RedisStorage`` fences every write with the lock's token: when the lock
    expired (its keep-alive could not reach the server for ``lock_expiry``
    seconds), was deleted, or was taken by another client (a failover), the
    write is refused and the value another holder may have written since is
    kept.
    """
