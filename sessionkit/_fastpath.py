"""The private fast path between ``Sessions``/``Session`` and the built-in storages.

Everything here is optional for a storage and invisible to users; a
third-party adapter needs none of it.  Every place that relies on it is
named below, so a change to one side can be checked against the other.

Locking without a context manager (``manager.Sessions.__init__``,
``session.Session._lock``/``_unlock``)
    ``storage._acquire(key, timeout)`` and ``storage._release(key)``: the
    storage's per-key lock, taken and released by the calling thread;
    ``LockTimeout`` after ``timeout`` seconds.  Memory: a ``KeyLocks``;
    disk: ``storage._state.ProcessKeyLocks``.

The encoded form (``session.Session._load``/``_plan``/``_write``, ``is_new``)
    ``_raw_read(key) -> bytes | None``, ``_raw_write(key, data)``,
    ``_raw_loads(data, key)``, ``_raw_dumps(value, key)``: change detection
    compares the bytes read with the bytes about to be written, instead of
    copying the value.  All four or none.  Optionally, with them,
    ``_raw_delete(key)``: the delete a session's clean exit makes (Redis
    fuses it with the release); without it ``Sessions`` calls ``delete``.

Write-back then release (``session.Session.__exit__``, ``_flush``/``_finish``)
    A session's ``_raw_write``/``_raw_delete`` is always followed by
    ``_release`` of the same key in the same thread.  A storage may release
    the lock in the write itself (``RedisStorage``: one round trip instead
    of two); its ``_release`` must then do nothing for that key.

Lock-and-read, write-and-release (``session.Session.__enter__``/``__exit__``,
``manager.Sessions.__init__``)
    ``storage._lock_read(key, timeout) -> bytes | None``: ``_acquire`` then
    ``_raw_read`` in one call; the key is locked if and only if it returns.
    ``storage._write_release(key, raw)``: ``_raw_write`` then ``_release``
    in one call; the key is let go however the write ends.  Both or none,
    and only with ``_acquire``/``_release`` and the encoded form, whose
    codec must then be ``_codec``'s (a session decodes with ``msgpack``
    itself, and encodes with the thread's packer: ``_raw_loads`` and
    ``_raw_dumps`` are called for what that cannot do).  An eager session
    of such a storage (``MsgpackFileStorage``) makes two calls into it, not
    a dozen.

The inlined memory path (``session.Session.__enter__``/``__exit__``)
    ``storage._fast``: ``tuple(FastPath(...))``, or ``None``.  ``Sessions``
    uses it only together with ``_acquire``/``_release``.  The hot code
    indexes it by position (``fast[0]`` ... ``fast[3]``, in the field order
    of :class:`FastPath`): CPython indexes an exact tuple faster than a
    named tuple or an attribute.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["FastPath"]


class FastPath(NamedTuple):
    """What ``Session`` inlines for a storage that keeps msgpack bytes in a dict."""

    #: ``KeyLocks._held`` (key -> owner thread id): locking is one ``setdefault``
    #: that inserts the caller's fresh ident object (see ``_locks.FRESH_IDENTS``),
    #: unlocking is one ``del``.
    held: dict[str, int]
    #: The storage's dict of encoded sessions: reading is one ``get``, writing
    #: one assignment.
    data: dict[str, bytes]
    #: The ``KeyLocks`` itself, for the slow paths: ``acquire`` when the key is
    #: taken, ``notify`` after a release while threads wait.
    locks: Any
    #: ``KeyLocks._waiting``: non-empty while any thread waits for a key.
    waiting: dict[str, Any]
