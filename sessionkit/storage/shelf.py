"""ShelveStorage: the standard library's shelve format, made safe to share."""

from __future__ import annotations

import dbm as _dbm
import importlib
import os
import pickle
import struct
import threading
import time
import weakref
import zlib
from datetime import timedelta
from typing import Any, Callable, ContextManager, Iterator

from ..errors import CorruptSessionError, SerializationError, SessionError, StorageError
from . import _gnudb
from ._dumbdb import ACCESS_ERRNOS, DumbDb, recover_compaction
from ._index import BOOT_ID, same_boot
from ._lockfile import SHARD_BASE, make_locks
from ._shard import MAX_IO
from ._state import release_dropped, StoreState, store_identity
from .base import EncodedStorage, check_key, ttl_seconds

__all__ = ["ShelveStorage"]

# A stored value: MAGIC, crc32 of what follows it, expiry (0: none), pickle.
# 0xff opens no pickle, so plain shelve values (bare pickles) are told apart.
MAGIC = b"\xffSK1"
_FRAME = struct.Struct("<4sId")
_PREFERENCE = ("dbm.sqlite3", "dbm.gnu", "dbm.ndbm", "dbm.dumb")
# A new shelf's dbm unless ``dbm=`` says otherwise: written by _dumbdb, it
# needs no recovery after a crash and costs the same with several processes.
_NEW_SHELF = "dbm.dumb"
_STORE_LOCK = SHARD_BASE  # the lock-file byte that guards the dbm itself

# What a shelf keeps in its lock file, ``<path>.lock`` (all of it read and
# written only with the shelf's slot, _STORE_LOCK, held):
#
#   0   u64  change counter: bumped before a section's first write, so other
#            processes know to catch up (_ShelfState._catch_up)
#   8   u8   mark: _WRITING, _COMPACTING or _DAMAGED (0: none); a mark found
#            on entering a section means a process died there
#   12  u32  dbm.dumb's compaction counter: other processes read its files
#            anew instead of only the new index lines
#   16  ...  the lock file's own header (_lockfile: magic and locking method)
#   40  14B  dbm.gnu's record: the key count and the write in flight (_gnudb)
#   56  16B  the shelf's dbm, as "dbm.gnu" padded with zero bytes
#   72  32B  dbm.dumb: how long its .dir had grown, the .dir's inode and the
#            boot that wrote them (after each section that wrote); a .dir
#            found shorter is reported, not read as it is (_dumbdb.DumbDb)
#   4096 ... dbm.gnu's undo: the old value of the store in flight (_gnudb)
_HEAD = struct.Struct("<QB")
_MARK = 8
_EPOCH = struct.Struct("<I")  # at 12: dbm.dumb's compactions, so other processes reload
_EPOCH_AT = 12
_HEADER = struct.Struct("<QBxxxI")  # the three, read at once
_WRITING = 1  # a write to a fragile dbm is under way, or failed
_COMPACTING = 2  # dbm.dumb's files are being compacted
_DAMAGED = 3  # recovery after a crash failed: refuse until clear_crash_mark()
# dbms whose files a crash (or a failed write) mid-write can damage with
# nothing to show for it: on Debian, dbm.ndbm is Berkeley DB, where keys
# silently vanish; Python's dbm.gnu reads a key of a database that needs
# recovery as missing
_FRAGILE = {"dbm.ndbm", "dbm.gnu"}
# dbms that stay open when another process writes: dbm.dumb reads the new
# index lines, SQLite sees other processes' commits itself
_KEPT_OPEN = {"dbm.dumb", "dbm.sqlite3"}
_SQLITE_FILES = ("-wal", "-shm", "-journal")  # beside a dbm.sqlite3 file
# Every file a shelf at PATH may have, as PATH + suffix (the lock file aside):
# gdbm and SQLite use PATH itself, dbm.dumb .dat/.dir/.bak (and its
# compaction's files), Berkeley DB .db, classic ndbm .dir/.pag, dbm.gnu's
# recovery a .crashed copy
_SHELF_SUFFIXES = frozenset(
    ("", ".dat", ".dir", ".bak", ".db", ".pag", ".crashed", ".dat.compact", ".dir.compact", ".dir.committed")
    + _SQLITE_FILES
)
_DBM_AT, _DBM_NAME = 56, 16  # the lock file records the shelf's dbm here
_DIR_RECORD = struct.Struct("<QQ16s")  # dbm.dumb's .dir: bytes written, its inode, the boot
_DIR_RECORD_AT = 72


def available_dbms() -> list[str]:
    """The dbm modules this Python has, best first."""
    found = []
    for name in _PREFERENCE:
        try:
            importlib.import_module(name)
            found.append(name)
        except ImportError:
            pass
    return found


def _intact(stored: bytes) -> bool:
    """Whether a stored value is whole: its checksum holds (a plain shelve value has none)."""
    if not stored.startswith(MAGIC):
        return True
    return len(stored) >= _FRAME.size and zlib.crc32(stored[8:]) == _FRAME.unpack_from(stored)[1]


# Some dbms (ndbm) cannot hold an empty key; 0xff never occurs in UTF-8, so
# it stands for "" without colliding with any other key.
_EMPTY_KEY = b"\xff"


def _encode_key(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass") if key else _EMPTY_KEY


def _decode_key(raw: bytes) -> str:
    return "" if raw == _EMPTY_KEY else raw.decode("utf-8", "surrogatepass")


# A value is written and read back with single pread/pwrite calls (dbm.dumb's
# values, the gdbm undo record of a value and its key), which MAX_IO bounds:
# a longer one would be acknowledged, then read back as damage.  What a frame
# and an undo record add fits in the rest.
_MAX_RECORD = MAX_IO - 4096


class ShelveStorage(EncodedStorage):
    """Sessions as pickles in a dbm file (the ``shelve`` format), shared safely.

    .. warning::
       Values are pickles, and unpickling runs code.  Never point a
       ShelveStorage at files that anyone else can write.

    Any picklable value can be stored (datetimes, sets, your own classes).
    The database stays open and catches up with what other processes wrote
    (a change counter in the lock file says when), so an operation costs
    the same with a thousand sessions or a hundred thousand.  ``dbm`` picks the module (``"dumb"``,
    ``"gnu"``, ``"ndbm"``, ``"sqlite3"`` or a full ``"dbm.gnu"``); an
    existing shelf keeps its own, and a new one is ``dbm.dumb`` unless
    ``dbm`` says otherwise: its files are written by sessionkit itself
    (below), so it needs no recovery after a crash, and processes that
    take turns pay only for reading each other's new index lines.
    (``dbm.gnu`` must reopen its file after another process wrote, and
    gdbm syncs a file it closes.)  ``storage.dbm`` says which is in use.

    No acknowledged session is lost, on any dbm, when a process is killed at
    any moment or the disk is full or read-only: a read returns the last
    acknowledged value (or the one being written when the process died), or
    raises ``CorruptSessionError``/``StorageError`` naming the file and what
    to do.  Each value carries a checksum, so torn bytes are never served.
    Per dbm:

    * ``dbm.dumb``: its files are written append-only (a new value after the
      end of ``.dat``, then its index line; a delete is an index line too),
      so a failed or interrupted write leaves the old value in place.  Other
      processes read only the index lines appended since they last looked.
      Dead space is compacted away, crash-safely, once it outweighs the live
      data.
    * ``dbm.gnu``: a mark and a note of the key count bracket every write.
      After a crash inside one, the next process recovers the file (a copy
      is kept aside as ``<path>.crashed`` meanwhile), checks every value and
      the key count, and goes on; if anything else than the key being written
      differs, it refuses to open (``CorruptSessionError``) until the file is
      restored and ``ShelveStorage.clear_crash_mark(path)`` is called.
    * ``dbm.ndbm`` (Berkeley DB on Debian): each write is read back after
      the close that flushes it (Berkeley DB does not report a failed flush).
      After a crash inside a write, or a failed write, the shelf refuses to
      open until the files are checked and ``clear_crash_mark`` is called.
    * ``dbm.sqlite3`` (Python 3.13+): every write is an SQLite transaction;
      any thread may use the shelf.

    Every failure of the dbm or the file system is a ``StorageError`` (no
    permission, a full disk, an I/O error) or a ``CorruptSessionError``
    (damaged files), with the path.  Nothing is fsynced: a power cut or an
    operating-system crash can lose recent writes or damage the files (use
    ``MsgpackFileStorage(durable=True)`` where that matters).  The lock file
    records the shelf's dbm, so a Python without it fails clearly instead
    of starting an empty shelf of another dbm beside it.  Restore a backup
    or delete the files only with every process of the shelf stopped; a
    write into a file deleted under a running process is refused.

    Lock scope: process.  ``lock(key)`` excludes other threads and other
    processes (one byte of ``<path>.lock`` per key); every read and write
    also holds the whole shelf for the microseconds of the dbm call.  Files
    are created ``0600``.  Plain shelve values (bare pickles) are read too;
    values written here carry a small header that plain ``shelve`` does not
    understand.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        dbm: str | None = None,
        ttl: float | timedelta | None = None,
        clock: Callable[[], float] = time.time,
        protocol: int = pickle.HIGHEST_PROTOCOL,
    ) -> None:
        """Open (or create) the shelf at ``path``; the parameters are described in the class docstring."""
        self.path = os.path.abspath(os.fspath(path))
        self.ttl = ttl_seconds(ttl)
        valid = isinstance(protocol, int) and not isinstance(protocol, bool)
        if not valid or not 0 <= protocol <= pickle.HIGHEST_PROTOCOL:
            raise ValueError(f"protocol must be a pickle protocol from 0 to {pickle.HIGHEST_PROTOCOL}")
        self.protocol = protocol
        self._clock = clock
        directory = os.path.dirname(self.path)
        try:
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o700, exist_ok=True)
                os.chmod(directory, 0o700)
        except OSError as exc:
            raise StorageError(f"cannot open {self.path}: {exc}", path=self.path) from exc
        real = os.path.realpath(self.path)
        ident = ("shelve", *store_identity(os.path.dirname(real), os.path.basename(real)))
        wanted = None if dbm is None else self._named(dbm)
        # Only a shelf not yet open in this process is probed by dbm.whichdb():
        # its open-and-close of the file would drop the POSIX locks that
        # SQLite (dbm.sqlite3) holds on it through the open connection.
        self._state = state = _ShelfState.attach(ident, lambda: _ShelfState(ident, self.path, wanted))
        if wanted is not None and state.dbm != wanted:
            state.detach()
            raise ValueError(f"{self.path} is already open here with {state.dbm}, not {wanted}")
        self.dbm = state.dbm
        self._keylocks = state.keys
        self._acquire = self._keylocks.acquire
        self._release = self._keylocks.release
        self._closed = False
        # A handle dropped without close() lets go of the store after it is
        # collected (at the next store opened), so files never pile up.
        self._detach = weakref.finalize(self, release_dropped, state)

    def __repr__(self) -> str:
        return f"ShelveStorage({self.path!r}, dbm={self.dbm!r}, ttl={self.ttl})"

    @staticmethod
    def _named(wanted: str) -> str:
        """The full name of the dbm module ``wanted``, which this Python must have."""
        have = available_dbms()
        name = wanted if wanted.startswith("dbm.") else "dbm." + wanted
        if name not in have:
            raise ValueError(f"dbm {wanted!r} is not available in this Python; it has {', '.join(have)}")
        return name

    def _store(self) -> _StoreSection:
        if self._closed:
            raise StorageError(f"{self!r} is closed", path=self.path)
        return self._state.section()

    @staticmethod
    def clear_crash_mark(path: str | os.PathLike[str]) -> None:
        """Declare the shelf at ``path`` checked (or restored) after a crash mid-write.

        Also what takes a dbm.dumb shelf whose ``.dir`` was found shorter than
        it had grown (cut short, or an older copy put back) as it now is.
        Call it with no process using the shelf, once the files were checked
        or restored from a backup; the shelf then opens again.
        """
        path = os.path.abspath(os.fspath(path))
        locks = make_locks(path + ".lock", os.path.dirname(path))
        try:
            held = locks.lock(_STORE_LOCK, None, "")
            try:
                os.pwrite(locks.fd, b"\0", _MARK)
                # the key count of dbm.gnu's record is recounted at the next write
                os.pwrite(locks.fd, bytes(_gnudb.RECORD.size), _gnudb.RECORD_AT)
                # dbm.dumb's .dir is taken as it is now
                os.pwrite(locks.fd, bytes(_DIR_RECORD.size), _DIR_RECORD_AT)
            finally:
                locks.unlock(held, _STORE_LOCK)
        finally:
            locks.close()

    # -- values ----------------------------------------------------------------------

    def _raw_dumps(self, value: Any, key: str | None = None) -> bytes:
        try:
            return pickle.dumps(value, protocol=self.protocol)
        except Exception as exc:  # PicklingError, TypeError, AttributeError...
            raise SerializationError(f"cannot store session {key!r}: {exc}", key=key) from exc

    def _raw_loads(self, data: bytes, key: str | None = None) -> Any:
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise CorruptSessionError(
                f"the stored pickle of session {key!r} in {self.path} cannot be loaded: {exc}; "
                "it is left in place",
                key=key,
                path=self.path,
            ) from exc

    def _unframe(self, key: str, stored: bytes, now: float) -> bytes | None:
        """The pickle inside a stored value, or None if it has expired."""
        if not stored.startswith(MAGIC):
            return stored  # a plain shelve value
        if not _intact(stored):
            raise CorruptSessionError(
                f"the stored value of session {key!r} in {self.path} ({self.dbm}) fails its checksum "
                "(a write torn by a crash?); it is left in place: write or delete the key to recover",
                key=key,
                path=self.path,
            )
        expiry = _FRAME.unpack_from(stored)[2]
        if expiry and expiry <= now:
            return None
        return stored[_FRAME.size :]

    def _frame(self, data: bytes, expiry: float) -> bytes:
        body = struct.pack("<d", expiry) + data
        return MAGIC + struct.pack("<I", zlib.crc32(body)) + body

    # -- the encoded form, used by Sessions ------------------------------------------

    def _raw_read(self, key: str) -> bytes | None:
        with self._state._mutex, self._store() as db:
            try:
                stored = db.get(_encode_key(key))
            except SessionError:
                raise
            except self._state._errors as exc:
                raise self._state._failure(exc, f"cannot read session {key!r} from", key) from exc
            return None if stored is None else self._unframe(key, stored, self._clock())

    def _raw_write(self, key: str, data: bytes) -> None:
        kb = _encode_key(key)
        if len(data) + len(kb) > _MAX_RECORD:
            raise SerializationError(
                f"cannot store session {key!r}: its value and key would be {len(data) + len(kb):,} bytes, and a "
                f"shelf holds at most {_MAX_RECORD:,}; the stored value is unchanged",
                key=key,
            )
        now = self._clock()
        framed = self._frame(data, 0.0 if self.ttl is None else now + self.ttl)
        with self._state._mutex, self._store() as db:
            self._keylocks.check_held(key, self.path)
            self._state._put(db, kb, framed)

    # -- the StorageAdapter contract ------------------------------------------------

    def delete(self, key: str) -> None:
        """Remove ``key``; deleting an absent key is not an error."""
        kb = _encode_key(check_key(key))
        with self._state._mutex, self._store() as db:
            self._keylocks.check_held(key, self.path)
            try:
                present = kb in db
            except self._state._errors as exc:
                raise self._state._failure(exc, "cannot read", key) from exc
            if present:
                self._state._remove(db, [kb])

    def _scan(self, db: Any) -> list[tuple[bytes, bytes]]:
        """Every stored key and value (the shelf is held)."""
        try:
            return [(kb, db[kb]) for kb in list(db.keys())]
        except SessionError:
            raise
        except (KeyError,) + self._state._errors as exc:  # KeyError: listed but not there, damage
            raise self._state._failure(exc, "cannot read") from exc

    def _live(self, db: Any) -> Iterator[tuple[str, bytes]]:
        now = self._clock()
        for kb, stored in self._scan(db):
            try:
                key = _decode_key(kb)
            except UnicodeDecodeError as exc:
                raise CorruptSessionError(
                    f"{self.path} holds the key {kb[:60]!r}, which is not UTF-8 (written by another program, "
                    "or damaged); delete it with that program or restore the shelf",
                    path=self.path,
                ) from exc
            data = self._unframe(key, stored, now)
            if data is not None:
                yield key, data

    def keys(self) -> Iterator[str]:
        """The keys of every live session on the shelf."""
        with self._state._mutex, self._store() as db:
            return iter([key for key, _ in self._live(db)])

    def items(self) -> Iterator[tuple[str, Any]]:
        """``(key, value)`` for every live session on the shelf."""
        with self._state._mutex, self._store() as db:
            found = list(self._live(db))
        return iter([(key, self._raw_loads(data, key)) for key, data in found])

    def purge_expired(self) -> int:
        """Delete expired sessions; returns how many."""
        now = self._clock()
        with self._state._mutex, self._store() as db:
            expired = []
            for kb, stored in self._scan(db):
                if stored.startswith(MAGIC) and len(stored) >= _FRAME.size:
                    expiry = _FRAME.unpack_from(stored)[2]
                    if expiry and expiry <= now:
                        expired.append(kb)
            if expired:
                self._state._remove(db, expired)
            return len(expired)

    def lock(self, key: str, timeout: float | None = None) -> ContextManager[None]:
        """Hold ``key`` exclusively across threads and processes (``LockTimeout`` after ``timeout`` seconds)."""
        return self._keylocks.lock(check_key(key), timeout)

    def close(self) -> None:
        """Close this handle; the dbm closes with the process's last handle on the shelf."""
        if self._closed:
            return
        self._closed = True
        if self._detach.detach() is not None:  # not yet released as dropped
            self._state.detach()


class _ShelfState(StoreState):
    """A shelf's state in this process: the open dbm and what keeps it current.

    Every operation runs in ``with state._mutex, state.section() as db``: the state's
    mutex, the shelf's slot in the lock file, and a catch-up with what other
    processes changed, as the lock file's header says (its layout is at the
    top of this module).
    """

    def __init__(self, ident: tuple[Any, ...], path: str, wanted: str | None) -> None:
        self.path = path
        super().__init__(ident, path + ".lock", os.path.dirname(path))
        self._wanted = wanted
        self.dbm = ""  # decided in setup(), under the shelf's lock
        self._module: Any = None
        self._errors: tuple[type[BaseException], ...] = (OSError,)
        self._mutex = threading.Lock()
        self._db: Any = None
        # (lock file, change counter) when this process last looked: a lock
        # file replaced since counts from zero again, so it forces a reopen
        self._gen: tuple[Any, int] = (None, -1)
        self._epoch = 0  # dbm.dumb: the compaction counter when this process last read the index
        self._ino = 0  # dbm.gnu: the inode of the file opened
        self._dirty = False  # this section bumped the counter
        self._failed = False  # a write in this section failed
        self._count = 0  # dbm.gnu: keys in the file, kept in the lock file's record
        self._written: dict[bytes, bytes | None] = {}  # dbm.ndbm: this section's writes, to verify
        self._closed = False
        self._held: Any = None  # the lock file the shelf's slot was taken through

    def has_data(self) -> bool:
        return bool(self._files())

    def setup(self) -> None:
        held = self.locks.lock(_STORE_LOCK, None, "")
        try:
            self._use(self._decide())
        finally:
            self.locks.unlock(held, _STORE_LOCK)
        with self._mutex, self.section():
            pass

    def _decide(self) -> str:
        """The shelf's dbm: the one its lock file records, else its files', else ``dbm=``'s, else dbm.dumb.

        The lock file records it, so a Python that lacks it fails clearly
        instead of starting a second, empty shelf of another dbm beside it.
        """
        have = available_dbms()
        raw = os.pread(self.locks.fd, _DBM_NAME, _DBM_AT).rstrip(b"\0")
        recorded = raw.decode("ascii", "replace")
        if recorded and recorded not in _PREFERENCE:
            raise CorruptSessionError(
                f"{self.path}.lock records the dbm {raw!r}, which is none sessionkit knows: the lock file is "
                "damaged; with no process using the shelf, delete the lock file",
                path=self.path + ".lock",
            )
        existing = recorded or _dbm.whichdb(self.path)
        if existing is None and any(os.path.exists(self.path + end) for end in ("", ".db", ".pag")):
            # whichdb() knows a Berkeley DB file only where dbm.ndbm imports
            raise StorageError(
                f"{self.path} has files of a dbm this Python cannot read (it has {', '.join(have)}): open it "
                "with the Python that made it",
                path=self.path,
            )
        if existing == "" or (existing and not existing.startswith("dbm.")):
            raise CorruptSessionError(
                f"{self.path} exists but is not a dbm file this Python knows; nothing was changed",
                path=self.path,
            )
        if existing is None and (os.path.exists(self.path + ".dat") or os.path.exists(self.path + ".bak")):
            existing = "dbm.dumb"  # dbm.dumb's data without its index: DumbDb reports it
        if existing:
            if self._wanted is not None and self._wanted != existing:
                raise ValueError(f"{self.path} is a {existing} shelf, not {self._wanted}")
            if existing not in have:
                raise StorageError(
                    f"{self.path} is a {existing} shelf, and this Python has no {existing} (it has "
                    f"{', '.join(have)}): open it with a Python that has {existing}",
                    path=self.path,
                )
            chosen = existing
        else:
            chosen = self._wanted or _NEW_SHELF
        if not recorded:
            os.pwrite(self.locks.fd, chosen.encode("ascii").ljust(_DBM_NAME, b"\0"), _DBM_AT)
        return chosen

    def _use(self, dbm: str) -> None:
        self.dbm = dbm
        self._module = importlib.import_module(dbm)
        self._errors = (OSError, self._module.error)
        if dbm == "dbm.sqlite3":
            import sqlite3

            self._errors += (sqlite3.Error,)

    def teardown(self) -> None:
        with self._mutex:
            self._closed = True
            self._close_db()

    def mutexes(self) -> list[Any]:
        return [self._mutex]

    def _fork_after_child(self) -> None:
        super()._fork_after_child()
        if self.dbm == "dbm.sqlite3":
            self._close_db()  # an SQLite connection must not cross a fork: reopen here

    def section(self) -> _StoreSection:
        return _StoreSection(self)

    # -- the lock file's header ------------------------------------------------------

    def _read_head(self) -> tuple[int, int, int]:
        raw = os.pread(self.locks.fd, _HEADER.size, 0)
        return _HEADER.unpack(raw) if len(raw) == _HEADER.size else (0, 0, 0)

    def _dir_record(self) -> tuple[int, int]:
        """dbm.dumb: ``(bytes, inode)`` its ``.dir`` had reached after the last section
        that wrote it, in this boot of the machine; ``(0, 0)`` when unknown."""
        raw = os.pread(self.locks.fd, _DIR_RECORD.size, _DIR_RECORD_AT)
        if len(raw) != _DIR_RECORD.size:
            return 0, 0
        length, ino, boot = _DIR_RECORD.unpack(raw)
        return (length, ino) if same_boot(boot) else (0, 0)

    def _bump_epoch(self) -> None:
        self._epoch = (self._read_head()[2] + 1) & 0xFFFFFFFF
        os.pwrite(self.locks.fd, _EPOCH.pack(self._epoch), _EPOCH_AT)

    def _set_mark(self, mark: int) -> None:
        os.pwrite(self.locks.fd, bytes((mark,)), _MARK)

    def _catch_up(self, gen: int, mark: int, epoch: int) -> None:
        """Make ``self._db`` current (the shelf's slot is held)."""
        if mark:
            gen = self._after_crash(mark, gen)
            epoch = self._read_head()[2]
        seen = (self.locks.file, gen)
        if self._db is None:
            self._reopen()
        elif seen != self._gen:
            if seen[0] is not self._gen[0] or self.dbm not in _KEPT_OPEN:
                self._reopen()
            elif self.dbm == "dbm.dumb":
                if epoch != self._epoch:
                    self._db.reload()  # another process compacted the files
                else:
                    self._db.refresh()  # only the index lines appended since
            # dbm.sqlite3 reads other processes' commits by itself
        self._gen = seen
        self._epoch = epoch

    def _after_crash(self, mark: int, gen: int) -> int:
        """Recover from what the mark says happened (or refuse); returns the change counter."""
        if mark == _COMPACTING and self.dbm == "dbm.dumb":
            self._close_db()
            recover_compaction(self.path)
            self._bump_epoch()
            self._set_mark(0)
        elif mark == _WRITING and self.dbm == "dbm.gnu":
            gen = self._recover_gnu(gen)
        elif mark in (_WRITING, _DAMAGED) and self.dbm in _FRAGILE:
            self._close_db()
            self._check_crash_mark()
        else:
            self._set_mark(0)  # a mark this dbm does not use
        return gen

    def _recover_gnu(self, gen: int) -> int:
        """dbm.gnu after a crash inside a write: recover with every value checked, or refuse."""
        self._close_db()
        record = _gnudb.Record(os.pread(self.locks.fd, _gnudb.RECORD.size, _gnudb.RECORD_AT))
        try:
            count = _gnudb.recover(self.path, self._module, record, _intact, _gnudb.load_undo(self.locks.fd))
        except CorruptSessionError:
            self._set_mark(_DAMAGED)
            raise
        os.pwrite(self.locks.fd, _gnudb.RECORD.pack(count, 0, _gnudb.NONE, _gnudb.VALID), _gnudb.RECORD_AT)
        gen += 1  # the file was rebuilt: every process reopens it
        os.pwrite(self.locks.fd, _HEAD.pack(gen, 0), 0)
        return gen

    def _reopen(self) -> None:
        self._close_db()
        try:
            if self.dbm == "dbm.dumb":
                self._db = DumbDb(self.path, self._dir_record)
                if self._db.created:  # a new .dir (it may reuse a deleted one's inode number)
                    os.pwrite(self.locks.fd, bytes(_DIR_RECORD.size), _DIR_RECORD_AT)
            elif self.dbm == "dbm.sqlite3":
                from ._sqlitedb import SqliteDb  # any thread may use it; dbm.sqlite3's may not

                self._db = SqliteDb(self.path)
            elif self.dbm == "dbm.gnu":
                if _gnudb.needs_recovery(self.path):  # damaged outside our marks: same treatment
                    self._set_mark(_WRITING)
                    self._gen = (self._gen[0], self._recover_gnu(self._read_head()[0]))
                flags = "c" + "".join(f for f in "fu" if f in self._module.open_flags)
                self._db = self._module.open(self.path, flags, 0o600)
                self._ino = os.stat(self.path).st_ino
            else:
                self._db = self._module.open(self.path, "c", 0o600)
        except SessionError:
            raise
        except self._errors as exc:
            if self._not_damage(exc):
                raise StorageError(f"cannot open {self.path} ({self.dbm}): {exc}", path=self.path) from exc
            raise CorruptSessionError(
                f"{self.path} ({self.dbm}) cannot be opened: {exc}; the files are left as they "
                f"are: restore them from a backup{self._recovery_hint()}",
                path=self.path,
            ) from exc

    def _failure(self, exc: BaseException, doing: str, key: str | None = None) -> SessionError:
        """The SessionError for a dbm's error while reading: damage, or a failure to get at the file."""
        if isinstance(exc, KeyError) or not self._not_damage(exc) and type(exc).__name__ == "DatabaseError":
            return CorruptSessionError(
                f"{doing} {self.path} ({self.dbm}): {exc!r}: the file is damaged; restore it from a backup",
                key=key,
                path=self.path,
            )
        return StorageError(f"{doing} {self.path}: {exc}", key=key, path=self.path)

    def _not_damage(self, exc: BaseException) -> bool:
        """Whether a dbm's error is about access (permissions, a full disk), not damaged files."""
        if isinstance(exc, OSError) and exc.errno in ACCESS_ERRNOS:
            return True
        # SQLite: cannot open, read-only, I/O error, disk full, busy are
        # OperationalError; "not a database" and "malformed" are DatabaseError
        return type(exc).__name__ == "OperationalError"

    def _files(self) -> list[str]:
        directory, name = os.path.split(self.path)
        return sorted(
            os.path.join(directory, f)
            for f in os.listdir(directory)
            if f.startswith(name) and f[len(name):] in _SHELF_SUFFIXES
        )

    def _check_crash_mark(self) -> None:
        """A process died in the middle of a write to a fragile dbm (or a write to it failed)."""
        files = self._files()
        if not files:  # the damaged files were removed: start afresh
            self._set_mark(0)
            return
        raise CorruptSessionError(
            f"a process died (or a write failed) while writing {', '.join(files)} ({self.dbm}), which can "
            "damage it without any sign, so it is not read: check or restore the files, then call "
            f"ShelveStorage.clear_crash_mark({self.path!r}) (or delete the files to start over)",
            path=self.path,
        )

    def _recovery_hint(self) -> str:
        if self.dbm == "dbm.gnu":
            return " or run `gdbmtool` on it and use its `recover` command"
        return ""

    def _close_db(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            try:
                db.close()
            except self._errors:
                pass  # nothing was written since the last successful write

    # -- writes ----------------------------------------------------------------------

    def _start_write(self, db: Any) -> Any:
        """Before the section's first write: check the files, bump the change counter, mark a fragile dbm.

        Returns the dbm to write to (a file replaced under this process is opened anew).
        """
        if not self._dirty:
            if self.dbm == "dbm.dumb":
                db.check_files()
            elif self.dbm == "dbm.gnu":
                db = self._check_gnu_file(db)
                record = _gnudb.Record(os.pread(self.locks.fd, _gnudb.RECORD.size, _gnudb.RECORD_AT))
                self._count = record.count if record.valid else len(db)
            gen = self._gen[1] + 1
            os.pwrite(self.locks.fd, _HEAD.pack(gen, _WRITING if self.dbm in _FRAGILE else 0), 0)
            self._gen = (self.locks.file, gen)
            self._dirty = True
        return db

    def _check_gnu_file(self, db: Any) -> Any:
        """dbm.gnu: a write into a file deleted or replaced under this process would be lost."""
        try:
            ino = os.stat(self.path).st_ino
        except FileNotFoundError as exc:
            raise StorageError(
                f"{self.path} was deleted while this process had the shelf open; nothing was written",
                path=self.path,
            ) from exc
        if ino != self._ino:
            self._reopen()
            db = self._db
        return db

    def _note(self, db: Any, kb: bytes, removing: bool) -> int:
        """dbm.gnu: record the key count and the write about to happen; returns the count's change."""
        old = db.get(kb)
        existed = old is not None
        if removing and not existed:
            return 0
        op = _gnudb.DELETE if removing else _gnudb.REPLACE if existed else _gnudb.INSERT
        if op == _gnudb.REPLACE:
            _gnudb.save_undo(self.locks.fd, kb, old)  # gdbm may tear it in place
        record = _gnudb.RECORD.pack(self._count, _gnudb.key_crc(kb), op, _gnudb.VALID)
        os.pwrite(self.locks.fd, record, _gnudb.RECORD_AT)
        return -1 if removing else 0 if existed else 1

    def _put(self, db: Any, kb: bytes, framed: bytes) -> None:
        try:
            db = self._start_write(db)
            if self.dbm == "dbm.gnu":
                change = self._note(db, kb, False)
                db[kb] = framed
                self._count += change
                return
            db[kb] = framed
            if self.dbm == "dbm.ndbm":
                self._written[kb] = framed
        except SessionError:
            self._failed = True
            raise
        except self._errors as exc:
            self._failed = True
            raise StorageError(f"cannot write to {self.path}: {exc}", path=self.path) from exc
        if self.dbm == "dbm.dumb":
            self._maybe_compact(db)

    def _remove(self, db: Any, keys: list[bytes]) -> None:
        try:
            db = self._start_write(db)
            for kb in keys:
                change = self._note(db, kb, True) if self.dbm == "dbm.gnu" else 0
                try:
                    del db[kb]
                except KeyError:
                    pass
                self._count += change
                if self.dbm == "dbm.ndbm":
                    self._written[kb] = None
        except SessionError:
            self._failed = True
            raise
        except self._errors as exc:
            self._failed = True
            raise StorageError(f"cannot delete from {self.path}: {exc}", path=self.path) from exc
        if self.dbm == "dbm.dumb":
            self._maybe_compact(db)

    def _close_verified(self) -> None:
        """dbm.ndbm: close to make the writes visible, then read them back.

        ndbm has no sync(), and on Debian it is Berkeley DB, which flushes on
        close and reports a failed flush (a full disk) only on stderr: the
        writes would be acknowledged and lost.  So each is read back.
        """
        self._close_db()
        try:
            self._reopen()
            lost = [kb for kb, framed in self._written.items() if self._db.get(kb) != framed]
        except (SessionError,) + self._errors as exc:
            self._failed = True
            self._close_db()
            raise StorageError(f"cannot write to {self.path}: {exc}", path=self.path) from exc
        if lost:
            self._failed = True
            self._close_db()
            raise StorageError(
                f"cannot write to {self.path}: {len(lost)} write(s) did not reach the file "
                "(is the disk full?)",
                path=self.path,
            )

    def _maybe_compact(self, db: DumbDb) -> None:
        """Compact dbm.dumb's files once dead bytes outweigh live ones.

        The write that led here is already acknowledged, so a compaction that
        fails (a full disk) is given up and retried once twice as much is dead.
        """
        if not db.wants_compaction():
            return
        self._set_mark(_COMPACTING)
        try:
            db.compact()
        except (OSError, SessionError):
            db.compact_after = 2 * max(db.dead_bytes(), 1)
            if db.committed:  # the files changed: other processes must read them anew
                self._bump_epoch()
                self._close_db()
            if os.path.exists(self.path + ".dir.committed"):
                return  # committed but not renamed: the next section finishes it
        else:
            self._bump_epoch()
        self._set_mark(0)


class _StoreSection:
    """``with state._mutex, state.section() as db``: the shelf locked, current, and changes published."""

    __slots__ = ("storage",)

    def __init__(self, storage: _ShelfState) -> None:
        self.storage = storage

    def __enter__(self) -> Any:
        # The caller holds s._mutex, taken by a ``with`` of its own (see
        # _shard.Shard.__enter__ for why).
        s = self.storage
        if s._closed:
            raise StorageError(f"{s.path} is closed", path=s.path)
        held = s.locks.lock(_STORE_LOCK, None, "")
        try:
            s._catch_up(*s._read_head())
        except OSError as exc:
            s.locks.unlock(held, _STORE_LOCK)
            raise StorageError(f"cannot read {s.path}: {exc}", path=s.path) from exc
        except BaseException:
            s.locks.unlock(held, _STORE_LOCK)
            raise
        s._held = held
        return s._db

    def __exit__(self, *exc: Any) -> None:
        s = self.storage
        try:
            if s._dirty:
                s._dirty = False
                if s.dbm == "dbm.dumb" and s._db is not None:
                    length, ino = s._db.dir_written()
                    try:
                        os.pwrite(s.locks.fd, _DIR_RECORD.pack(length, ino, BOOT_ID), _DIR_RECORD_AT)
                    except OSError:
                        pass  # only a guard against a .dir cut short later: the write itself is done
                try:
                    if s.dbm == "dbm.ndbm" and not s._failed:
                        s._close_verified()
                finally:
                    if s.dbm in _FRAGILE:
                        if s._failed:  # the files may be damaged: keep the mark, read nothing more
                            s._close_db()
                        else:
                            if s.dbm == "dbm.gnu":
                                record = _gnudb.RECORD.pack(s._count, 0, _gnudb.NONE, _gnudb.VALID)
                                os.pwrite(s.locks.fd, record, _gnudb.RECORD_AT)
                            s._set_mark(0)  # the write is complete
        finally:
            s._failed = False
            s._written.clear()
            s.locks.unlock(s._held, _STORE_LOCK)
