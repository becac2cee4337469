"""A dbm-like key/value file in ``dbm.sqlite3``'s format, usable from any thread.

Why this exists: on Python 3.13 the default dbm is ``dbm.sqlite3``, and its
database object opens ``sqlite3.connect()`` with the default
``check_same_thread=True``.  ``ShelveStorage`` opens its dbm once and then
uses it from whichever thread calls it (always one at a time, under its own
mutex), so every call from a thread other than the one that opened it fails
with "SQLite objects created in a thread can only be used in that same
thread".  :class:`SqliteDb` is the same store opened with
``check_same_thread=False``; the caller serialises all calls.

The file format is exactly ``dbm.sqlite3``'s: an SQLite 3 database with one
table, ``Dict(key BLOB UNIQUE NOT NULL, value BLOB NOT NULL)``, keys and
values stored as BLOBs.  So ``dbm.whichdb()`` reports ``"dbm.sqlite3"`` for a
file written here, ``dbm.sqlite3.open()`` reads it, and files written by
``dbm.sqlite3`` are read here.  It runs on CPython 3.9 and later (the
``autocommit=`` argument of ``sqlite3.connect`` is 3.12+, so autocommit
comes from ``isolation_level=None``).

Every write is one SQL statement in autocommit mode, hence one SQLite
transaction: atomic, so a killed process never leaves half a write and
never loses an acknowledged one.  Reads see what other processes committed
without reopening.  The journal is a rollback journal (``<path>-journal``,
left empty between writes), not dbm.sqlite3's write-ahead log, and
``synchronous = OFF``; see ``__init__`` for why.

SQLite's locks are POSIX locks, which belong to the process: any
``open()``/``close()`` of the database file in this process drops them.  The
shelf serialises every access with its own lock, so with a rollback journal
nothing depends on SQLite's locks.  A connection must not cross
``os.fork()``: in a child, :meth:`SqliteDb.close` the inherited object and
open the file again; any other use of an inherited object raises
``sqlite3.ProgrammingError``.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Iterator, cast, overload

__all__ = ["SqliteDb"]

_BUILD_TABLE = "CREATE TABLE IF NOT EXISTS Dict (key BLOB UNIQUE NOT NULL, value BLOB NOT NULL)"
# The CASTs are dbm.sqlite3's: a str key is stored as its UTF-8 bytes, never as TEXT.
_LOOKUP = "SELECT value FROM Dict WHERE key = CAST(? AS BLOB)"
_EXISTS = "SELECT 1 FROM Dict WHERE key = CAST(? AS BLOB) LIMIT 1"
_STORE = "REPLACE INTO Dict (key, value) VALUES (CAST(? AS BLOB), CAST(? AS BLOB))"
_DELETE = "DELETE FROM Dict WHERE key = CAST(? AS BLOB)"
_KEYS = "SELECT key FROM Dict"
_COUNT = "SELECT COUNT(key) FROM Dict"



def _uri(path: str) -> str:
    """An SQLite URI that opens ``path`` read-write, never creating it."""
    # as_uri() percent-encodes '?', '#' and '%', which SQLite would otherwise
    # read as URI syntax.
    return Path(path).as_uri() + "?mode=rw"


class SqliteDb:
    """An SQLite file in ``dbm.sqlite3``'s format, with a dbm-like interface.

    Keys and values are bytes.  The connection is opened with
    ``check_same_thread=False``, so any thread may call any method, but never
    two at once: the caller serialises all calls (one object, one mutex).

    ``create``: make the file (mode ``0o600``) if it is missing; otherwise a
    missing file raises ``sqlite3.OperationalError``.  ``timeout``: how many
    seconds a write waits for another process that holds SQLite's write lock
    before ``sqlite3.OperationalError`` ("database is locked").

    Errors are ``sqlite3.Error``, raised as they come; a file that is not an
    SQLite database raises ``sqlite3.DatabaseError`` here, at open.  Calls
    after :meth:`close`, or in a process forked from the one that opened it,
    raise ``sqlite3.ProgrammingError``.
    """

    def __init__(self, path: str | os.PathLike[str], create: bool = True, *, timeout: float = 5.0) -> None:
        self.path: str = os.path.abspath(os.fsdecode(path))
        self._pid = os.getpid()
        self._cx: sqlite3.Connection | None = None
        if create:
            self._create_file()
        cx = sqlite3.connect(
            _uri(self.path),
            uri=True,
            timeout=timeout,
            isolation_level=None,  # autocommit: each statement is its own transaction
            check_same_thread=False,
        )
        try:
            # A rollback journal, not dbm.sqlite3's WAL: SQLite's locks are
            # POSIX locks, which any open-and-close of the file in this
            # process (a backup, dbm.whichdb) drops; in WAL mode another
            # process may then delete the log this connection still writes
            # to.  The shelf's own lock serialises every access, so with a
            # rollback journal SQLite's locks are never relied on.  (A file
            # in WAL mode stays so while other connections have it open.)
            try:
                cx.execute("PRAGMA journal_mode = TRUNCATE").close()
            except sqlite3.OperationalError:
                pass  # a WAL file another connection has open
            # Every commit is whole before another process reads it, and a
            # killed process loses nothing it committed.  A power cut or an
            # OS crash may damage the file (SQLite then reports it as
            # malformed): like the shelf's other dbms, nothing is fsynced.
            cx.execute("PRAGMA synchronous = OFF").close()
            # Reads the schema, so a file that is not SQLite fails here and now.
            cx.execute(_BUILD_TABLE).close()
        except BaseException:
            cx.close()
            raise
        self._cx = cx

    @classmethod
    def open(cls, path: str | os.PathLike[str], create: bool = True, *, timeout: float = 5.0) -> SqliteDb:
        """Open the database at ``path``; the same as ``SqliteDb(path, create)``."""
        return cls(path, create, timeout=timeout)

    def _create_file(self) -> None:
        # O_EXCL: an existing file is never opened (and closed) here, since
        # closing a descriptor would drop the SQLite locks this process holds
        # on it through another connection.
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        except FileExistsError:
            return
        os.close(fd)  # an empty file is an empty SQLite database

    def _conn(self) -> sqlite3.Connection:
        cx = self._cx
        if cx is None:
            raise sqlite3.ProgrammingError(f"SqliteDb({self.path!r}) is closed")
        if os.getpid() != self._pid:
            raise sqlite3.ProgrammingError(
                f"SqliteDb({self.path!r}) was opened in process {self._pid}, not in this one "
                f"({os.getpid()}): an SQLite connection must not cross a fork; "
                "close() it and open the file again"
            )
        return cx

    def _one(self, sql: str, params: tuple[object, ...] = ()) -> tuple[object, ...] | None:
        cur = self._conn().execute(sql, params)
        try:
            row: tuple[object, ...] | None = cur.fetchone()
        finally:
            cur.close()
        return row

    # -- reads -------------------------------------------------------------------

    @overload
    def get(self, key: bytes) -> bytes | None: ...

    @overload
    def get(self, key: bytes, default: bytes) -> bytes: ...

    @overload
    def get(self, key: bytes, default: bytes | None) -> bytes | None: ...

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        """The value stored under ``key``, or ``default`` if there is none."""
        row = self._one(_LOOKUP, (key,))
        if row is None:
            return default
        return cast(bytes, row[0])

    def __getitem__(self, key: bytes) -> bytes:
        """The value stored under ``key``; ``KeyError`` if there is none."""
        row = self._one(_LOOKUP, (key,))
        if row is None:
            raise KeyError(key)
        return cast(bytes, row[0])

    def __contains__(self, key: object) -> bool:
        """Whether a value is stored under ``key``."""
        return self._one(_EXISTS, (key,)) is not None

    def keys(self) -> list[bytes]:
        """Every key, in no particular order."""
        cur = self._conn().execute(_KEYS)
        try:
            return [row[0] for row in cur.fetchall()]
        finally:
            cur.close()

    def __iter__(self) -> Iterator[bytes]:
        """Iterate over a snapshot of :meth:`keys`."""
        return iter(self.keys())

    def __len__(self) -> int:
        """How many keys are stored."""
        row = self._one(_COUNT)
        return cast(int, row[0]) if row is not None else 0

    # -- writes (each one SQLite transaction) ------------------------------------

    def __setitem__(self, key: bytes, value: bytes) -> None:
        """Store ``value`` under ``key``, replacing any value it had."""
        self._conn().execute(_STORE, (key, value)).close()

    def __delitem__(self, key: bytes) -> None:
        """Delete ``key``; ``KeyError`` if it is not stored."""
        cur = self._conn().execute(_DELETE, (key,))
        try:
            deleted = cur.rowcount
        finally:
            cur.close()
        if not deleted:
            raise KeyError(key)

    def sync(self) -> None:
        """Nothing to do: every write is already committed to disk."""
        self._conn()

    # -- lifetime ----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._cx is None

    def close(self) -> None:
        """Close the connection; calling it again does nothing.

        Also the right call in a forked child for an object it inherited: it
        releases the parent's connection there without touching the parent's
        locks, after which the file can be opened again.
        """
        cx, self._cx = self._cx, None
        if cx is not None:
            cx.close()

    def __enter__(self) -> SqliteDb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " (closed)" if self._cx is None else ""
        return f"SqliteDb({self.path!r}){state}"
