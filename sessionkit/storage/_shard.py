"""One shard of a MsgpackFileStorage: an append-only log and its index.

Every operation runs inside ``with shard.mutex, shard:``, which takes the
shard's thread mutex and its slot in the store's lock file (so one thread of
one process touches the log at a time, for microseconds), then catches up with
what other processes appended since this process last looked: one ``fstat``
when nothing changed.  A log that another process compacted has been
replaced (its link count is 0) and is reopened.

The index maps a key to ``offset << 32 | length`` of its newest record;
expiry times live in a second dict only for keys that have one.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Any

from ..errors import CorruptSessionError, LockTimeout, SerializationError, StorageError
from . import _records as rec

log = logging.getLogger("sessionkit")

CHUNK = 4 << 20  # bytes read at a time when loading a log
SLACK = 64 << 10  # dead bytes a shard may carry beyond its live bytes
SECTION_WAIT = 60.0  # seconds to wait for a shard another process holds (compaction included)
_LOW = 0xFFFFFFFF


def write_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite every byte (a full disk returns short writes before failing)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]
        offset += n


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def log_name(number: int) -> str:
    """The file name of shard ``number``'s log."""
    return f"shard-{number:03d}.log"


def log_number(name: str) -> int | None:
    """The shard number of a log's file name, or None for any other file."""
    digits = name[6:-4]
    if name.startswith("shard-") and name.endswith(".log") and digits.isdigit():
        return int(digits)
    return None


class Shard:
    """An append-only log of records and the in-memory index over it."""

    def __init__(self, directory: str, number: int, locks: Any, slot: int) -> None:
        self.directory = directory
        self.path = os.path.join(directory, log_name(number))
        self.locks = locks  # the store's cross-process locks (see _lockfile)
        self.slot = slot
        self.lock_file: Any = None  # what locks.lock() returned, while inside ``with shard.mutex, shard``
        self.durable = False  # set for the whole store once any handle asks for it
        self.dir_unsynced = False  # durable: a compaction renamed a log, the directory not fsynced since
        self.mutex = threading.Lock()
        self.fd = -1
        self.end = 0  # where the valid log ends, and the next record goes
        self.live = 0  # bytes of records the index points at
        self.index: dict[str, int] = {}
        self.expiry: dict[str, float] = {}
        self.corrupt: dict[str, int] = {}  # key -> offset of its damaged record
        self.retry_compact_at = 0
        self.stale = False  # a load was cut short (an asynchronous exception): reload all

    # -- entering: lock and catch up ----------------------------------------

    def __enter__(self) -> Shard:
        # The caller holds self.mutex, taken by a ``with`` of its own (a C
        # lock's with-statement cannot be cut short by an exception raised
        # asynchronously; a Python __exit__ can, at its first instruction).
        # What such an exception can leak here is the shard's slot, and that
        # is taken again and released by this process's next section.
        try:
            self.lock_file = self.locks.lock(self.slot, SECTION_WAIT, "")
        except LockTimeout:
            raise StorageError(
                f"{self.path} stayed locked by another process for {SECTION_WAIT:.0f} s; an operation "
                "takes microseconds, so that process is stuck or was interrupted inside one",
                path=self.path,
            ) from None
        try:
            self._sync()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.locks.unlock(self.lock_file, self.slot)

    def _sync(self) -> None:
        try:
            if self.fd < 0:
                self._open()
                return
            st = os.fstat(self.fd)
            if self.stale:
                self._load(len(rec.MAGIC), st.st_size, reset=True)
            elif st.st_nlink == 0:  # compacted by another process: reopen
                os.close(self.fd)
                self.fd = -1
                self._open()
            elif st.st_size != self.end:
                if st.st_size < self.end:
                    self._load(len(rec.MAGIC), st.st_size, reset=True)
                else:
                    self._load(self.end, st.st_size, reset=False)
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc}", path=self.path) from exc

    def _open(self) -> None:
        self.stale = True  # until _load() below has indexed the whole log
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                write_all(fd, rec.MAGIC, 0)
                if self.durable:
                    os.fsync(fd)
                    fsync_dir(self.directory)
                size = len(rec.MAGIC)
            elif os.pread(fd, len(rec.MAGIC), 0) != rec.MAGIC:
                raise CorruptSessionError(
                    f"{self.path} is not a sessionkit log (bad magic); left as it is", path=self.path
                )
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self._load(len(rec.MAGIC), size, reset=True)

    def _load(self, start: int, size: int, reset: bool) -> None:
        """Index the records from ``start`` to ``size``; drop a crashed tail."""
        self.stale = True  # until the index is whole again
        if reset:
            self.index, self.expiry, self.corrupt, self.live = {}, {}, {}, 0
        try:
            stop = rec.read_log(self.fd, start, size, CHUNK, self._apply)
        except rec.Damage as damage:
            raise CorruptSessionError(
                f"{self.path} is damaged at byte {damage.offset}; left as it is for recovery",
                path=self.path,
            ) from None
        if stop < size:
            # A crashed append left a partial record: it was never
            # acknowledged, so the log ends before it.  We hold the lock.
            log.debug("truncating %s from %d to %d (crashed append)", self.path, size, stop)
            os.ftruncate(self.fd, stop)
        self.end = stop
        self.stale = False

    def _apply(self, record: rec.Record) -> None:
        # A key's index entry changes by one assignment (or one deletion), so
        # an exception raised asynchronously in here never hides a session.
        key = record.key
        index = self.index
        old = index.get(key)
        if record.ok and not record.flags & rec.FLAG_DELETE:
            if record.expiry:
                self.expiry[key] = record.expiry
            elif self.expiry:
                self.expiry.pop(key, None)
            index[key] = record.offset << 32 | record.length
            self.live += record.length - (0 if old is None else old & _LOW)
            if self.corrupt:
                self.corrupt.pop(key, None)
            return
        if record.ok:  # a deletion
            self.corrupt.pop(key, None)
        else:
            self.corrupt[key] = record.offset
        if old is not None:
            del index[key]
            self.live -= old & _LOW
        self.expiry.pop(key, None)

    def read_unlocked(self, key: str, now: float) -> bytes | None | bool:
        """Read without the shard's cross-process lock; ``False``: take it.

        Safe for a caller that holds ``key``'s own lock: every write of the
        key by another process is complete before that process let the key
        go, so it lies in the file before any append still in flight.  Only
        records that parse whole and pass their checksums are taken; anything
        else (an append in flight, a crashed one, damage, a log replaced by
        compaction) sends the caller to the locked path, which sorts it out.
        """
        with self.mutex:
            if self.fd < 0:
                return False
            try:
                st = os.fstat(self.fd)
                if st.st_nlink == 0 or st.st_size < self.end:
                    return False
                if st.st_size > self.end:
                    data = os.pread(self.fd, st.st_size - self.end, self.end)
                    try:
                        records, stop = rec.parse(data, self.end, at_eof=False)
                    except rec.Damage:
                        return False
                    for record in records:
                        if not record.ok:
                            return False
                    for record in records:
                        self._apply(record)
                    self.end = stop
                    if stop != st.st_size:
                        return False
            except OSError as exc:
                raise StorageError(f"cannot read {self.path}: {exc}", path=self.path) from exc
            return self.read(key, now)

    # -- operations (inside ``with shard.mutex, shard``) ----------------------------------

    def expired(self, key: str, now: float) -> bool:
        when = self.expiry.get(key)
        return when is not None and when <= now

    def read(self, key: str, now: float) -> bytes | None:
        if key in self.corrupt:
            raise CorruptSessionError(
                f"the stored record of session {key!r} in {self.path} at byte "
                f"{self.corrupt[key]} is damaged; it is left in place",
                key=key,
                path=self.path,
            )
        packed = self.index.get(key)
        if packed is None or (self.expiry and self.expired(key, now)):
            return None
        try:
            record = os.pread(self.fd, packed & _LOW, packed >> 32)
        except OSError as exc:
            raise StorageError(f"cannot read session {key!r} from {self.path}: {exc}", key=key, path=self.path) from exc
        value = rec.value_of(record)
        if value is None:
            raise CorruptSessionError(
                f"the stored record of session {key!r} in {self.path} at byte "
                f"{packed >> 32} is damaged; it is left in place",
                key=key,
                path=self.path,
            )
        return value

    def append(self, key: str, value: bytes | None, expiry: float, now: float) -> None:
        """Append a record (``None``: a deletion) and index it."""
        kb = rec.encode_key(key)
        size = rec.HEADER_SIZE + len(kb) + (0 if value is None else len(value))
        if size > _LOW:  # the index keeps a record's length in 32 bits
            raise SerializationError(
                f"cannot store session {key!r}: its record would be {size:,} bytes, and a record holds "
                f"at most {_LOW:,}; the stored value is unchanged",
                key=key,
            )
        if self.end > max(2 * self.live + SLACK, self.retry_compact_at) and not self.corrupt:
            try:
                self.compact(now)
            except StorageError as exc:
                # Maintenance only: the append below still succeeds or fails
                # on its own.  Do not retry before the log has grown again.
                log.debug("compaction skipped: %s", exc)
                self.retry_compact_at = self.end + max(SLACK, self.live)
        flags = (0 if value is not None else rec.FLAG_DELETE) | (rec.FLAG_DURABLE if self.durable else 0)
        data = rec.build(kb, value or b"", flags, expiry)
        offset = self.end
        try:
            write_all(self.fd, data, offset)
            if self.durable:
                os.fdatasync(self.fd)
                if self.dir_unsynced:  # a compaction's rename is not durable yet
                    fsync_dir(self.directory)
                    self.dir_unsynced = False
        except OSError as exc:
            try:
                os.ftruncate(self.fd, offset)  # leave no partial record behind
            except OSError:
                pass  # the next reader drops it as a crashed append
            raise StorageError(
                f"cannot write session {key!r} to {self.path}: {exc}; the stored value is unchanged",
                key=key,
                path=self.path,
            ) from exc
        self.end = offset + len(data)
        self._apply(rec.Record(offset, len(data), key, flags, expiry, True))

    def purge(self, now: float) -> int:
        """Forget expired sessions and rewrite the log without them."""
        expired = [key for key, when in self.expiry.items() if when <= now]
        if expired and not self.corrupt:
            self.compact(now)
        return len(expired)

    def compact(self, now: float) -> None:
        """Rewrite the log with only live, unexpired records, then swap it in."""
        tmp = self.path + ".compact"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            index: dict[str, int] = {}
            expiry: dict[str, float] = {}
            parts = [rec.MAGIC]
            buffered = pos = len(rec.MAGIC)
            written = 0
            for key, packed in self.index.items():
                when = self.expiry.get(key)
                if when is not None and when <= now:
                    continue
                length = packed & _LOW
                parts.append(os.pread(self.fd, length, packed >> 32))
                index[key] = pos << 32 | length
                if when is not None:
                    expiry[key] = when
                pos += length
                buffered += length
                if buffered >= CHUNK:
                    write_all(fd, b"".join(parts), written)
                    written, parts, buffered = pos, [], 0
            write_all(fd, b"".join(parts), written)
            if self.durable:
                os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException as exc:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise StorageError(f"cannot compact {self.path}: {exc}", path=self.path) from exc
            raise
        # Renamed: from here on the new file is the log, whatever happens next
        # (writes to the old descriptor would go to an unlinked file).
        os.close(self.fd)
        self.fd = fd
        self.index, self.expiry, self.end = index, expiry, pos
        self.live = pos - len(rec.MAGIC)
        if self.durable:
            try:
                fsync_dir(self.directory)
            except OSError as exc:
                self.dir_unsynced = True  # the next durable write syncs it before it is acknowledged
                raise StorageError(
                    f"cannot make the compaction of {self.path} durable: {exc}", path=self.path
                ) from exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
