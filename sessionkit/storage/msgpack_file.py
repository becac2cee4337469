"""MsgpackFileStorage: sessions in one directory, shared by threads and processes."""

from __future__ import annotations

import logging
import os
import time
import threading
import weakref
from datetime import timedelta
from typing import Any, Callable, ContextManager, Iterator

from .. import _codec
from ..errors import CorruptSessionError, StorageError
from . import _records
from ._lockfile import O_CLOEXEC
from ._lockfile import SHARD_BASE as _SHARD_BASE
from ._shard import MERGER, Shard, fsync_dir, log_name, log_number
from . import _index
from ._state import release_dropped, StoreState, store_identity
from .base import EncodedStorage, check_key, ttl_seconds

_get_ident = threading.get_ident

__all__ = ["MsgpackFileStorage"]

log = logging.getLogger("sessionkit")

FORMAT_FILE = "FORMAT"
FORMAT_LINE = "sessionkit msgpack-log 2"
# A FORMAT file's first line -> its version (1: logs only; 2: logs and shared indexes)
FORMAT_VERSIONS = {b"sessionkit msgpack-log 1": 1, FORMAT_LINE.encode("ascii"): 2}
_MAX_SHARDS = 4096  # the most shards a store may have
LOCK_FILE = "sessionkit.lock"
_key_info = _records.key_info
_time = time.time


def parse_format(path: str, raw: bytes) -> tuple[int, int]:
    """``(shard count, version)`` from the bytes of the FORMAT file at ``path``;
    ``CorruptSessionError`` (its cause a ``ValueError`` saying why) if they are not one."""
    lines = raw.split(b"\n")
    try:
        if len(lines) < 2 or lines[0] not in FORMAT_VERSIONS or not lines[1].startswith(b"shards "):
            raise ValueError("not a sessionkit store format file")
        count = int(lines[1][len(b"shards "):].decode("ascii"))
        if not 1 <= count <= _MAX_SHARDS:
            raise ValueError(f"a shard count of {count}")
    except ValueError as exc:  # UnicodeDecodeError included
        raise CorruptSessionError(
            f"{path} is damaged ({exc}); nothing was read or written: restore it from a backup "
            "(it records the store's shard count)",
            path=path,
        ) from exc
    return count, FORMAT_VERSIONS[lines[0]]


CLOSE_WAIT = 10.0  # seconds the last close() of a store waits for the merge helper's work on it


class _MsgpackStore(StoreState):
    """A msgpack store's state in this process: its shards (logs and indexes)."""

    def __init__(self, ident: tuple[Any, ...], directory: str, shards: int | None, create: bool = True) -> None:
        self.directory = directory
        self.create = create  # False: refuse a directory without a store (see _ExistingStore)
        super().__init__(ident, os.path.join(directory, LOCK_FILE), directory)
        self.wanted_shards = shards
        self.count = 0
        self.shards: list[Shard] = []

    def has_data(self) -> bool:
        return os.path.exists(os.path.join(self.directory, FORMAT_FILE))

    def setup(self) -> None:
        self.count = self._read_format(self.wanted_shards)
        self.shards = [Shard(self.directory, n, self.locks, _SHARD_BASE + n) for n in range(self.count)]
        for shard in self.shards:
            shard.dir_ident = (self.ident[1], self.ident[2])

    def _read_format(self, shards: int | None) -> int:
        """The shard count recorded in the directory, recorded on first use.

        ``FORMAT`` says ``sessionkit msgpack-log 2``: the logs have shared
        indexes.  A store of version 1 (logs only) is upgraded as it is
        opened, so that no process of an older sessionkit, which would append
        without indexing, opens it any more.
        """
        path = os.path.join(self.directory, FORMAT_FILE)
        held = self.locks.lock(_SHARD_BASE - 1, None, "")
        try:
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                if not self.create:
                    raise StorageError(f"{self.directory} holds no store", path=self.directory) from None
                count = self._count_for_new_format(shards)
                self._write_format(path, count)
                return count
            count, version = parse_format(path, raw)
            if version == 1:
                self._write_format(path, count)
            return count
        except OSError as exc:
            raise StorageError(f"cannot set up {self.directory}: {exc}", path=self.directory) from exc
        finally:
            self.locks.unlock(held, _SHARD_BASE - 1)

    def _write_format(self, path: str, count: int) -> None:
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{FORMAT_LINE}\nshards {count}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(self.directory)

    def _count_for_new_format(self, shards: int | None) -> int:
        """The shard count to record when the directory has no FORMAT file.

        A directory that already holds logs lost its FORMAT file: guessing the
        count would put keys in the wrong shards (sessions would silently
        vanish), so only an explicit ``shards`` that covers every log is taken.
        """
        numbers = (log_number(name) for name in os.listdir(self.directory))
        last = max((n for n in numbers if n is not None), default=None)
        if last is not None and (shards is None or shards <= last):
            path = os.path.join(self.directory, FORMAT_FILE)
            raise CorruptSessionError(
                f"{path} is missing, but the directory holds shard logs (up to {log_name(last)}); "
                "it records the shard count, so nothing is read or written: restore it from a backup, or "
                f"open the store once with MsgpackFileStorage(..., shards=N), N its shard count "
                f"(more than {last})",
                path=path,
            )
        return shards or 16

    def teardown(self) -> None:
        # A merge under way in this process finishes (or gives up) first, and
        # so do the merge helper's (an application may delete the directory
        # next), for up to CLOSE_WAIT seconds: a helper that does not answer
        # by then is given up (it may be stopped, or stuck).
        MERGER.wait(self.shards, helper=False)
        if not MERGER.wait(self.shards, CLOSE_WAIT):
            MERGER.give_up_helper(f"no answer in {CLOSE_WAIT:.0f} s while {self.directory} closed")
        for shard in self.shards:
            with shard.mutex:
                shard.close()

    def mutexes(self) -> list[Any]:
        return [shard.mutex for shard in self.shards]

    def _fork_after_parent(self) -> None:
        super()._fork_after_parent()
        # A parent that forks workers often never uses the store again (a
        # server's master, preloaded): files it kept open would pin the logs
        # its children's merges replace, however full the disk.  It opens
        # them again if it does use the store.
        for shard in self.shards:
            try:
                shard.let_go()
            except Exception as exc:  # noqa: BLE001 - never fails the fork; the space comes back later
                log.debug("sessionkit: closing %s after a fork: %s", shard.path, exc)

    def _fork_after_child(self) -> None:
        super()._fork_after_child()
        # A merge under way in the parent goes on there, not here.
        for shard in self.shards:
            shard.claims = {}


class MsgpackFileStorage(EncodedStorage):
    """Sessions as msgpack in one directory, shared by threads and processes.

    The directory holds ``shards`` append-only logs (a session's key picks
    its shard), beside each log a shared index, and one lock file.  A write
    appends one record with one ``pwrite`` and updates the index; a read
    looks the key up in the index and reads its record with one ``pread``.
    Every process maps the same index files, so a process never re-reads
    what another appended, and opening a store reads no log: the first
    session of a million-session store is read in about a millisecond.

    Dead records are merged away once they outweigh the live ones (beyond
    1 MiB per shard), in the background: the merge copies the live records
    to a new log without the shard's lock, then takes the lock only to add
    what was appended meanwhile and rename the new files into place.  The
    process that noticed asks its merge helper, a child process it starts
    with ``sys.executable`` the first time a merge is due and that ends with
    it, so that merging never takes the serving process's GIL; the writer
    only sends it the request, once out of the shard's lock.  Where no helper can be had (an
    embedded interpreter whose ``sys.executable`` is not a Python, a helper
    that failed), or with ``SESSIONKIT_MERGES=thread`` in the environment,
    a background thread of the process merges instead.  Disk use stays
    within about twice the live data plus a constant; a process whose writes
    outrun its merges merges in the writing thread.  ``close()`` waits for a
    merge under way.  A replaced log's space comes back when the last
    process that has it open closes it, which frees its blocks (a
    millisecond for a few megabytes): every process moves to the new files
    at its next call on the shard.  Where the file system has room to spare
    (64 MiB plus 8 times what is kept), the merging process keeps the old
    files open about a second, so that the others do not pay for that
    inside a request.

    Crash safety: every record carries checksums, and the index is a cache
    of the log that is rebuilt from it whenever it may be stale (a process
    killed while writing, a crash inside a merge, a restart of the machine,
    a damaged or missing index file).  A record cut short by a crash
    (``kill -9`` mid-write) is dropped, so a key reads as its last
    acknowledged value; damaged bytes elsewhere raise
    ``CorruptSessionError`` naming the key and file and are never dropped or
    merged away.  ``durable=True`` also ``fdatasync``\\ s each write (and
    the directory when a log is created or replaced), so an acknowledged
    write survives power loss.

    Lock scope: process.  ``lock(key)`` excludes other threads (a per-key
    thread lock) and other processes (a byte-range lock on one byte of the
    lock file, chosen by a 62-bit hash of the key; two keys share a lock only
    on a hash collision).  A key held open never delays a different key.
    Each write also holds its shard's lock for the microseconds of its I/O.
    Local filesystems only: byte-range locks and shared mappings over NFS
    are not trusted.

    ``ttl`` (seconds or ``timedelta``) expires a session that long after its
    last write; ``purge_expired()`` reclaims expired sessions without
    decoding any value.  Files are created ``0600`` and the directory
    ``0700``: sessions hold personal data.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        ttl: float | timedelta | None = None,
        durable: bool = False,
        shards: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open (or create) the store in ``directory``; the parameters are described in the class docstring."""
        self.directory = os.path.abspath(os.fspath(directory))
        self.ttl = ttl_seconds(ttl)
        self.durable = bool(durable)
        self._clock = clock
        valid = isinstance(shards, int) and not isinstance(shards, bool)
        if shards is not None and (not valid or not 1 <= shards <= _MAX_SHARDS):
            raise ValueError(f"shards must be an int from 1 to {_MAX_SHARDS}")
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise StorageError(
                f"cannot open {self.directory}: it is a file, not a directory (MsgpackFileStorage "
                "keeps its sessions in a directory of its own)",
                path=self.directory,
            )
        try:
            self._make_directory()
        except OSError as exc:
            raise StorageError(f"cannot open {self.directory}: {exc}", path=self.directory) from exc
        ident = ("msgpack", *store_identity(self.directory))
        self._state = state = _MsgpackStore.attach(
            ident, lambda: _MsgpackStore(ident, self.directory, shards, self._create)
        )
        if shards is not None and shards != state.count:
            state.detach()
            raise ValueError(f"{self.directory} was created with shards={state.count}, not {shards}")
        self.shards = state.count
        self._shards = state.shards
        if self.durable:
            for shard in self._shards:
                shard.durable = True
        self._keylocks = state.keys
        self._acquire = self._keylocks.acquire
        self._release = self._keylocks.release
        self._closed = False
        # A handle dropped without close() lets go of the store after it is
        # collected (at the next store opened), so files never pile up.
        self._detach = weakref.finalize(self, release_dropped, state)

    def __repr__(self) -> str:
        return f"MsgpackFileStorage({self.directory!r}, shards={self.shards}, ttl={self.ttl}, durable={self.durable})"

    # -- set-up ----------------------------------------------------------------

    _create = True  # a directory without a store is made one (see _ExistingStore)

    def _make_directory(self) -> None:
        if not os.path.isdir(self.directory) and self._create:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            os.chmod(self.directory, 0o700)

    def _locate(self, key: str) -> tuple[Shard, tuple[bytes, int, int, int]]:
        """``key``'s shard and its ``_records.key_info`` (encoded and hashed once)."""
        info = _key_info(key)
        if self._closed:
            raise StorageError(f"{self!r} is closed", key=key, path=self.directory)
        return self._shards[info[3] % self.shards], info

    def _shard(self, key: str) -> Shard:
        return self._locate(key)[0]

    def _every_shard(self) -> list[Shard]:
        if self._closed:
            raise StorageError(f"{self!r} is closed", path=self.directory)
        return self._shards

    def lock(self, key: str, timeout: float | None = None) -> ContextManager[None]:
        """Hold ``key`` exclusively across threads and processes (``LockTimeout`` after ``timeout`` seconds)."""
        if self._closed:
            raise StorageError(f"{self!r} is closed", key=key, path=self.directory)
        return self._keylocks.lock(check_key(key), timeout)

    # -- the encoded form, used by Sessions ------------------------------------

    def _raw_read(self, key: str) -> bytes | None:
        shard, info = self._locate(key)
        if key in self._keylocks.held:  # our key lock orders us after every write of it
            raw = shard.read_unlocked(info, self._clock())
            if raw is not False:
                return raw  # type: ignore[return-value]
        return self._read_in_section(key, shard, info)

    def _read_in_section(self, key: str, shard: Shard, info: tuple[bytes, int, int, int]) -> bytes | None:
        with shard.mutex, shard:
            raw = shard.read(key, info, self._clock())
        if shard.wanted:
            shard.after_section()
        return raw

    def _lock_read(self, key: str, timeout: float | None) -> bytes | None:
        """``_acquire(key, timeout)`` then ``_raw_read(key)``, in one call
        (see ``_fastpath``): the key's lock is held if and only if it returns."""
        shard, info = self._locate(key)
        keys = self._keylocks
        me = _get_ident()
        taken = False
        try:
            keys.acquire(key, timeout, info[1] >> 2, me)
            taken = True
            raw = shard.read_unlocked(info, self._clock())
            if raw is False:
                return self._read_in_section(key, shard, info)
            return raw  # type: ignore[return-value]
        except BaseException:
            if taken:
                keys.release(key)
            else:  # failed, or cut short as the key was taken: only what this call took
                keys.release_taken(key, me)
            raise

    def _write_release(self, key: str, raw: bytes) -> None:
        """``_raw_write(key, raw)`` then ``_release(key)``, in one call (see
        ``_fastpath``): the key's lock is let go however the write ends."""
        try:
            self._raw_write(key, raw)
        finally:
            self._keylocks.release(key)

    def _raw_write(self, key: str, raw: bytes) -> None:
        shard, info = self._locate(key)
        ttl = self.ttl
        if self._clock is not _time:
            shard.skew = self._clock() - _time()
        expiry = 0.0 if ttl is None else self._clock() + ttl
        built = shard.build(key, info, raw, expiry)
        try:
            with shard.mutex, shard:
                self._keylocks.check_held(key, self.directory)
                shard.append(key, info, raw, expiry, built)
        except StorageError as exc:
            self._append_again(shard, exc, key, info, raw, expiry)
        if shard.wanted or shard.overdue:
            shard.after_section()

    def _append_again(
        self, shard: Shard, exc: StorageError, key: str, info: tuple[bytes, int, int, int], value: bytes | None,
        expiry: float,
    ) -> None:
        """After ``shard`` refused an append (``value`` ``None``: a deletion)
        with ``exc``: if the disk was full and merging the shard freed its
        dead bytes (see ``Shard.reclaim``), append once more; else raise ``exc``."""
        if not shard.reclaim(exc):
            raise exc
        self._append_in_section(shard, key, info, value, expiry)

    def _append_in_section(
        self, shard: Shard, key: str, info: tuple[bytes, int, int, int], value: bytes | None, expiry: float
    ) -> None:
        """Append ``value`` for ``key`` in a section of ``shard`` (``None``: a
        deletion, made only if the shard holds the key); ``_raw_write`` has
        this section written out, on the hot path."""
        with shard.mutex, shard:
            self._keylocks.check_held(key, self.directory)
            if value is not None or shard.state(info) in (_index.LIVE, _index.CORRUPT):
                shard.append(key, info, value, expiry)

    def _raw_loads(self, raw: bytes, key: str) -> Any:
        try:
            return _codec.loads(raw, key)
        except CorruptSessionError as exc:
            path = self._shard(key).path
            raise CorruptSessionError(f"{exc} (in {path}; left in place)", key=key, path=path) from exc.__cause__

    _raw_dumps = staticmethod(_codec.dumps)

    # -- the StorageAdapter contract ----------------------------------------------

    def delete(self, key: str) -> None:
        """Remove ``key``; deleting an absent key is not an error."""
        key = check_key(key)
        shard, info = self._locate(key)
        try:
            self._append_in_section(shard, key, info, None, 0.0)
        except StorageError as exc:
            self._append_again(shard, exc, key, info, None, 0.0)
        if shard.wanted or shard.overdue:
            shard.after_section()

    def keys(self) -> Iterator[str]:
        """The keys of every live session in the store."""
        found: list[str] = []
        for shard in self._every_shard():
            with shard.mutex, shard:
                found.extend(key for key, _ in shard.live_records(self._clock(), False))
            if shard.wanted:
                shard.after_section()
        return iter(found)

    def items(self) -> Iterator[tuple[str, Any]]:
        """``(key, value)`` for every live session in the store."""
        found: list[tuple[str, Any]] = []
        for shard in self._every_shard():
            with shard.mutex, shard:
                raws = list(shard.live_records(self._clock(), True))
            if shard.wanted:
                shard.after_section()
            found.extend((key, self._raw_loads(raw, key)) for key, raw in raws)
        return iter(found)

    def purge_expired(self) -> int:
        """Reclaim the space of expired sessions, decoding no value; returns their count."""
        purged = 0
        for shard in self._every_shard():
            now = self._clock()
            with shard.mutex, shard:
                expired = shard.expired_count(now)
            if shard.wanted:
                shard.after_section()
            dropped: list[int] = []
            if expired and shard.merge(now, wait=True, force=True, dropped=dropped):
                purged += sum(dropped)
        return purged

    def close(self) -> None:
        """Close this handle; the store's files close with the process's last handle on it."""
        if self._closed:
            return
        self._closed = True
        if self._detach.detach() is not None:  # not yet released as dropped
            self._state.detach()

    def __enter__(self) -> MsgpackFileStorage:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _ExistingStore(MsgpackFileStorage):
    """A handle on a store that exists, which never creates one: the merge
    helper's (``_merge_helper``), whose requests may outlive the store they
    name (a directory deleted, and made again by the application)."""

    _create = False
