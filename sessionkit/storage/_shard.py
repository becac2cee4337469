"""One shard of a MsgpackFileStorage: an append-only log and its shared index.

The log (``shard-NNN.log``, see ``_records``) holds every write as one
record; the index (``shard-NNN.idx``, see ``_index``) is a hash table that
every process maps, pointing each key at its newest record.

Operations that change the shard run inside ``with shard.mutex, shard:``,
which takes the shard's thread mutex and its slot in the store's lock file
(one thread of one process at a time, for microseconds) and checks, in the
shared header, that the index is current and whole: no system call when it
is.  An append also checks that the log ends where the index says and
still has a name (one ``statx`` that leaves its timestamps alone, see
``_statx``), so a write never lands on a record that an index it cannot see
(an older release's, a deleted index's) points at, nor in a log that a
process using such an index merged away.  A
read by a thread that holds the key's own lock needs neither (see
:meth:`Shard.read_unlocked`).

A background merge is claimed by the shard's ``claims`` (threads) and
a lock on its merge slot (processes; the kernel drops it when a merging
process dies); it paces itself so that request threads get the GIL back
within microseconds.

Merging (compaction) runs in a background thread of the process that
notices a shard needs it (:class:`Merger`): it copies the live records of
the log as it was into a new log, and builds a new index for it, without
the shard's lock; then, under the lock, it adds what was appended meanwhile
and renames both files into place.  Other processes see ``replaced`` in the
old index and move to the new files; until then the old files (still open)
agree with each other.
"""

from __future__ import annotations

import atexit
import errno
import heapq
import itertools
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Iterator

from .. import _fork
from ..errors import CorruptSessionError, LockTimeout, SerializationError, StorageError
from . import _index as ix
from . import _records as rec
from ._merge_helper import Helper
from ._statx import SizeAndLinks

log = logging.getLogger("sessionkit")

CHUNK = 4 << 20  # bytes read at a time when loading or merging a log
SLACK = 1 << 20  # dead bytes a shard may carry beyond its live bytes before a merge
OVERDUE = 4  # dead bytes past OVERDUE * max(live, SLACK): the writer merges itself
# A shard with dead bytes on a file system with less room than ROOM_FACTOR * live
# bytes + SLACK is merged by the writer, due or not, while its new log still fits...
ROOM_FACTOR = 2
ROOM_DEAD = 64 << 10  # ... and one not yet due once it has this many dead bytes (and a quarter of its live ones)
RECLAIM_WAIT = 5.0  # seconds a refused write waits for a merge of its shard under way (Shard.reclaim)
ROOM_STEP = 16 << 10  # the least a log grows between two looks at the room left (see Shard._check_room)
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
SECTION_WAIT = 60.0  # seconds to wait for a shard another process holds
MERGE_SLOTS = 1 << 20  # a shard's merge slot is its slot plus this
# The most one read or write moves on Linux (MAX_RW_COUNT): a record (or a
# shelf's value) read back with one pread must be no longer, or it would be
# acknowledged, then read back short, as damage.
MAX_IO = 0x7FFFF000
_MAX_RECORD = MAX_IO  # (and a slot keeps a record's length in 32 bits)
_LIVE, _DEAD, _CORRUPT, _EMPTY = ix.LIVE, ix.DEAD, ix.CORRUPT, ix.EMPTY
_COUNTERS = ix.COUNTERS
_COUNTERS_AT = ix.COUNTERS_AT
_DIRTY_AT = ix.DIRTY_AT
_U64 = ix._U64
_pread = os.pread
_value_of = rec.value_of
_pwrite = os.pwrite
_pwritev = getattr(os, "pwritev", None)  # not on every system: write_parts joins the parts there
_slot_unpack = ix.SLOT.unpack_from
_slot_pack = ix.SLOT.pack_into
_MAGIC_SIZE = len(rec.MAGIC)


def write_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite every byte (a full disk returns short writes before failing)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]
        offset += n


def write_parts(fd: int, parts: list[bytes], offset: int) -> None:
    """Write ``parts`` one after another at ``offset`` with ``pwritev`` (no
    joined copy made while holding the GIL); the rest of a short write with
    :func:`write_all`."""
    size = sum(map(len, parts))
    done = _pwritev(fd, parts, offset) if parts and _pwritev is not None else 0
    if done < size:
        write_all(fd, b"".join(parts)[done:], offset + done)


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def log_name(number: int) -> str:
    """The file name of shard ``number``'s log."""
    return f"shard-{number:03d}.log"


def index_name(number: int) -> str:
    """The file name of shard ``number``'s shared index."""
    return f"shard-{number:03d}.idx"


def log_number(name: str) -> int | None:
    """The shard number of a log's file name, or None for any other file."""
    digits = name[6:-4]
    if name.startswith("shard-") and name.endswith(".log") and digits.isdigit():
        return int(digits)
    return None


def index_number(name: str) -> int | None:
    """The shard number of an index's file name, or None for any other file."""
    return log_number(name[:-4] + ".log") if name.endswith(".idx") else None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


CATCH_UP = 512  # bytes appended during a merge that its swap adds under the lock
PACE = 20e-6  # seconds of work between pauses of a background merge
PAUSE = 200e-6  # seconds of each pause
MERGE_RUN = 128 << 10  # bytes a merge reads or writes at a time (each one a slice of work between pauses)
MERGE_PARTS = 256  # records a merge writes with one pwritev (under IOV_MAX)
# Seconds a background merge keeps the log and index it replaced open (see Shard._retain),
# how many such pairs a process keeps at most (an older one is closed early), and the
# room the file system must have to spare: RETIRE_ROOM bytes plus RETIRE_FACTOR times
# what the process would then keep.
RETIRE_AFTER = 1.0
RETIRE_MAX = 8
RETIRE_ROOM = 64 << 20
RETIRE_FACTOR = 8


class _Pace:
    """Called in a background merge's loops: sleeps ``PAUSE`` after each
    ``PACE`` of work, so a thread waiting for the GIL waits at most about
    ``PACE``, instead of the interpreter's switch interval (5 ms).  Once
    ``behind()`` says the writes are outrunning the merge, it stops pausing."""

    __slots__ = ("_next", "_behind", "_hurry")

    def __init__(self, behind: Any) -> None:
        self._next = time.perf_counter() + PACE
        self._behind = behind
        self._hurry = False

    def __call__(self) -> None:
        if self._hurry or time.perf_counter() < self._next:
            return
        if self._behind():
            self._hurry = True
            return
        time.sleep(PAUSE)
        self._next = time.perf_counter() + PACE


def _close_shard_files(idx: ix.Index | None, stale: ix.Index | None, fd: int) -> None:
    """Close a shard's indexes (either may be None) and its log descriptor (-1: none): the files
    a section moved away from, or those a merge replaced."""
    try:
        for index in (idx, stale):
            if index is not None:
                index.close()
    finally:
        if fd >= 0:
            os.close(fd)


def _in_runs(fd: int, entries: list[Any], at: int, run: int = CHUNK) -> Iterator[tuple[Any, bytes]]:
    """``(entry, record)`` for each of ``entries`` (sorted by offset; an entry's
    offset at ``at`` and its length after it), reading runs of up to ``run``
    bytes with one ``pread`` each (which lets other threads have the GIL)."""
    i = 0
    while i < len(entries):
        first = entries[i][at]
        j = i + 1
        while j < len(entries) and entries[j][at] + entries[j][at + 1] - first <= run:
            j += 1
        last = entries[j - 1]
        data = os.pread(fd, last[at] + last[at + 1] - first, first)
        for entry in entries[i:j]:
            yield entry, data[entry[at] - first : entry[at] - first + entry[at + 1]]
        i = j


def _in_log_order(live: list[Any], order: list[int], pace: Any) -> list[Any]:
    """``live`` (slots) sorted by offset, by ``order`` (``offset << 32 |
    index``): in sorted runs merged with ``heapq``, pausing (``pace``)
    between steps, so no one step holds the GIL long."""
    runs = []
    for at in range(0, len(order), 2048):
        run = order[at : at + 2048]
        run.sort()
        runs.append(run)
        if pace is not None:
            pace()
    if len(runs) == 1:
        return [live[k & 0xFFFFFFFF] for k in runs[0]]
    ordered = []
    for k in heapq.merge(*runs):
        ordered.append(live[k & 0xFFFFFFFF])
        if pace is not None:
            pace()
    return ordered


class _Abort(Exception):
    """A merge gave up (the shard changed under it); nothing was replaced."""


class _Kept(_Abort):
    """A merge found a damaged record, which stays in the log for recovery."""


class _Stale(_Abort):
    """A merge found the index not matching the log: it is indexed anew."""


# Descriptors a merge under way holds (closed in a forked child, whose copy
# of the merge thread does not exist).
_MERGE_FDS: set[int] = set()
_MERGE_NUMBERS = itertools.count()  # names a merge's files apart from another's of the same thread


def _sync_file_range() -> Any:
    """The C library's ``sync_file_range``, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (ImportError, OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


# Looked up once, as the module is imported: an import made at the first
# merge could be cut short by a KeyboardInterrupt and leave the import
# machinery's lock on ctypes taken, and every later merge waiting on it.
_SYNC_FILE_RANGE = _sync_file_range()


def _start_write_back(fd: int) -> None:
    """Start writing ``fd``'s dirty pages to disk, without waiting for them
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; elsewhere nothing).

    A merge starts its new files' write-back before it locks the shard to
    rename them into place: ext4 starts it at a rename over an existing
    file otherwise (its ``auto_da_alloc``, so that a crash never leaves the
    new name on a file whose data was not written), and that took 130-280
    µs per rename inside the section every other process waits on.  Started
    here, the rename finds the pages on their way and the same ordering
    holds."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE; an error (a file system without it) changes nothing


def _free_bytes(fd: int) -> int:
    """The bytes free for this process on the file system of ``fd`` (``OSError`` if it cannot tell)."""
    vfs = os.fstatvfs(fd)
    return vfs.f_bavail * vfs.f_frsize


def _waited(wait: bool | float) -> float:
    """Seconds to wait for another merge: ``wait`` seconds, ``SECTION_WAIT`` for True, none for False."""
    if wait is True:
        return SECTION_WAIT
    return float(wait) if wait else 0.0


def _caller() -> tuple[int, int]:
    """Who is calling: the thread's id, and its running greenlet's (gevent,
    eventlet: greenlets share a thread), or 0 where greenlet is not loaded."""
    greenlet = sys.modules.get("greenlet")
    current = getattr(greenlet, "getcurrent", None)
    return threading.get_ident(), (id(current()) if current is not None else 0)


class Shard:
    """An append-only log of records and the shared index over it."""

    def __init__(self, directory: str, number: int, locks: Any, slot: int) -> None:
        self.directory = directory
        self.dir_ident = (0, 0)  # the directory's device and inode (set by the store; told to the merge helper)
        self.number = number
        self.path = os.path.join(directory, log_name(number))
        self.index_path = os.path.join(directory, index_name(number))
        self.locks = locks  # the store's cross-process locks (see _lockfile)
        self.slot = slot
        self.lock_file: Any = None  # what locks.lock() returned, while inside ``with shard.mutex, shard``
        # (h1, slot number) of the key the last read without the lock found:
        # its write-back updates that slot without probing (after checking it).
        self.hint: tuple[int, int] | None = None
        self.durable = False  # set for the whole store once any handle asks for it
        self.mutex = threading.Lock()
        self.closed = False
        self.fd = -1
        self.log_ident = (0, 0)
        self.log_state = SizeAndLinks()  # the log's (size, link count), for appends
        # durable: whether this process made the name of the log in use
        # durable (fsynced the directory since it opened that log): a log
        # another process made or merged into place without durable=True may
        # have a name that is not on disk yet, and a write to it must not be
        # acknowledged before.  False whenever the log changes (an inode
        # number may be a merged-away log's again).
        self.dir_synced = False
        self.idx: ix.Index | None = None
        self.table: ix.Table | None = None
        self.map: Any = None  # self.idx.map, for the hot paths
        # The header's counters, read on entering (valid inside a section):
        self.end = 0  # where the valid log ends, and the next record goes
        self.dir_unsynced = 0  # durable: a merge renamed a log, the directory not fsynced since
        self.overdue = False  # a write found the log far past its bound
        self.reopen_unchecked = False  # its files were closed by let_go(): opened again unchecked, once
        self.room_short = False  # a write found the disk short of room: the overdue merge is forced
        self.next_room_check = 0  # the log's end before which no write looks at the room left (_check_room)
        self.low_room = False  # ... and it found too little: appends keep room for a merge
        self.request_made: tuple[Any, bytes] | None = None  # see merge_request
        # A merge under way in this process: "merge" -> its claim (see _claim_merge).
        self.claims: dict[str, tuple[object, tuple[int, int]]] = {}
        # Files a section moved away from, closed once its lock is free (see _open).
        self.closing: list[tuple[ix.Index | None, ix.Index | None, int]] = []
        self.merge_slot = slot + MERGE_SLOTS  # its lock slot: a merge under way in any process
        self.next_request = 0.0  # monotonic time before which no merge is asked for
        self.private = False  # indexed in memory only: its index file could not be written
        self.stale_idx: ix.Index | None = None  # while private: the index file that others may still map
        self.next_grow = 0.0  # monotonic time before which a failed growth is not tried again
        self.verify_pending = False  # a large index mapped unchecked, to be checked in the background (see _use)
        self.merge_asked = False  # a write found a merge due (a request may be for verify_pending only)
        self.verify_ident: tuple[int, int] | None = None  # the index file verify_pending is for
        self.wanted = False  # merge_asked or verify_pending set in a section: after_section asks for them
        self.retry_private = 0.0
        # (monotonic deadline, index, log descriptor, bytes): files a background
        # merge replaced, kept open until the deadline (see _retain); oldest first.
        self.retired: list[tuple[float, ix.Index | None, int, int]] = []
        # The writers' clock (``MsgpackFileStorage(clock=...)``) minus the real
        # one, so merges in the background expire sessions by the same clock.
        self.skew = 0.0

    # -- entering: lock and check ----------------------------------------------

    def __enter__(self) -> Shard:
        # The caller holds self.mutex, taken by a ``with`` of its own (a C
        # lock's with-statement cannot be cut short by an exception raised
        # asynchronously; a Python __exit__ can, at its first instruction).
        # What such an exception can leak here is the shard's slot, and that
        # is taken again and released by this process's next section.
        if self.closed:
            raise StorageError(f"{self.path} is closed", path=self.path)
        try:
            self.lock_file = self.locks.lock(self.slot, SECTION_WAIT, "", True)
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
        if self.closing:
            self._close_deferred()

    def _close_deferred(self) -> None:
        """Close the files the section moved away from (see :meth:`_open`), now that its lock is free."""
        closing = self.closing
        while closing:
            try:
                files = closing.pop()  # one thread gets each entry: never closed twice
            except IndexError:
                break
            _close_shard_files(*files)

    def _sync(self) -> None:
        table = self.table
        if table is None:
            moved, self.reopen_unchecked = self.reopen_unchecked, False
            self._open(moved=moved)
            return
        if self.private:
            self._sync_private()
            return
        c = table.load_counters()
        if c[5]:  # replaced by a rebuild, a growth or a merge: take the new files
            self._open(moved=True)
        elif c[4]:  # a writer died between its append and its index update
            self._rebuild("a process stopped while writing to it")
        else:
            self.end, self.dir_unsynced = c[0], c[8]

    def _sync_private(self) -> None:
        """A shard indexed in memory only (see :meth:`_rebuild`): index the
        log anew if it changed, and try to write the index out now and then."""
        try:
            size = os.fstat(self.fd).st_size
            st = os.stat(self.path)
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc}", path=self.path) from exc
        moved = (st.st_dev, st.st_ino) != self.log_ident  # merged by another process
        if moved or size != self.end or time.monotonic() >= self.retry_private:
            # The private table forgotten first: an exception raised before
            # the rebuild replaces it sends the next section to _open, never
            # leaves a shard that is not private reading its private table.
            self.table = self.map = None
            self.private = False
            self._rebuild("its index could not be written before", reopen=True)

    def _close_files(self, later: bool = False) -> None:
        """Forget the files in use and close them; ``later``: when the
        section ends (see :meth:`_open`)."""
        # Forgotten first, closed after: an exception raised asynchronously
        # in between leaks a descriptor at worst, where the other order could
        # leave this shard holding a number the kernel gives the next file
        # opened (a merge's), and write there.
        idx, stale, fd = self.idx, self.stale_idx, self.fd
        self.idx = self.table = self.map = self.stale_idx = None
        self.fd = -1
        if later:
            self.closing.append((idx, stale, fd))
        else:
            _close_shard_files(idx, stale, fd)

    def _open(self, moved: bool = False) -> None:
        """(Re)open the log and its index; rebuild the index unless it is
        whole, of this log, of this boot, and ends where the log ends.

        ``moved``: the files in use were replaced (by a merge, a rebuild or a
        growth, most often of another process's): the new index was written
        a moment ago from a table that was checked or built anew, so its
        slots are not read again against its counters (:func:`_index.check`),
        a cost of a hundred microseconds or more that would fall on the
        request that moves to it.  An index found at opening is checked
        (one of a large table, by the merge thread: see :meth:`_use`), and
        so is the table every merge starts from.

        The files it moves away from are closed when the section ends, not
        inside it: the last process to close a log that a merge replaced
        frees its blocks, 10 to 30 ms of the kernel's time for a few
        megabytes here, and every other process's request on the shard
        waited for it (most often a merge helper's, whose merge began by
        moving to what another process had merged since)."""
        self._close_files(later=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open {self.path}: {exc}", path=self.path) from exc
        try:
            st = os.fstat(fd)
            size = st.st_size
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
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot open {self.path}: {exc}", path=self.path) from exc
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.log_ident = (st.st_dev, st.st_ino)
        self.dir_synced = False
        why = ""
        try:
            idx = ix.Index(self.index_path, checked=not moved)
        except FileNotFoundError:
            why = "it has no index yet"
        except ix.Damaged as exc:
            why = f"its index cannot be used ({exc})"
            try:  # mapped by other processes: the rebuild marks it replaced for them
                self.idx = ix.Index(self.index_path, checked=False)
            except (OSError, ValueError):
                pass
        except (OSError, ValueError) as exc:
            why = f"its index cannot be used ({exc})"
        else:
            c = idx.table().load_counters()
            if idx.log_ident != self.log_ident:
                why = "its index belongs to an earlier log"
            elif not ix.same_boot(idx.boot):
                why = "its index was written before the machine restarted"
            elif c[4] or c[5]:
                why = "a process stopped while writing to it"
            elif c[0] != size:
                why = f"its index ends at byte {c[0]}, the log at {size}"
            if not why:
                self._use(idx)
                return
            self.idx = idx  # replaced by the rebuild, for every process that maps it
        self._rebuild(why, reopen=False)

    def _use(self, idx: ix.Index) -> None:
        """Use ``idx``.  A table over ``CHECK_AT_OPEN`` slots, not checked as
        it was mapped, is checked in the background (:meth:`verify`, by the
        merge helper or thread), off the request's path."""
        self.idx = idx
        self.map = idx.map
        self.private = False
        self.hint = None
        self.next_room_check = 0  # (a log's end: another log now)
        self.low_room = False
        self.table = table = idx.table()
        if idx.capacity > ix.CHECK_AT_OPEN:
            try:
                self.verify_ident = ix.file_ident(idx)  # the file to check, named while it is surely the one in use
            except OSError:
                self.verify_ident = None
            self.verify_pending = True
            self.wanted = True  # asked for once out of the section (see after_section)
        c = table.load_counters()
        self.end, self.dir_unsynced = c[0], c[8]

    def _rebuild(self, why: str, reopen: bool = True) -> None:
        """Index the whole log anew (dropping a crashed tail), and put the new
        index in place of the old one for every process."""
        log.debug("sessionkit: indexing %s anew: %s", self.path, why)
        old = self.idx or self.stale_idx
        # The old one is closed once the new one is in place; until then it
        # is the stale one, closed with the files if this rebuild fails.
        self.stale_idx = old
        self.idx = self.table = self.map = None
        if reopen:  # the log at the path: a merge may have renamed a new one there
            fd, self.fd = self.fd, -1  # forgotten first: see _close_files
            if fd >= 0:
                os.close(fd)
            self._open_log_only()
        entries: dict[str, tuple[int, int, int, float]] = {}

        def apply(record: rec.Record) -> None:
            if not record.ok:
                state = _CORRUPT
            elif record.flags & rec.FLAG_DELETE:
                state = _DEAD
            else:
                state = _LIVE
            entries[record.key] = (record.offset, record.length, state, record.expiry)

        vouched = self._vouched(old) if old is not None else None
        try:
            size = os.fstat(self.fd).st_size
            stop = rec.read_log(self.fd, len(rec.MAGIC), size, CHUNK, apply, vouched[0] if vouched else 0)
        except rec.Damage as damage:
            raise CorruptSessionError(
                f"{self.path} is damaged at byte {damage.offset}; left as it is for recovery",
                path=self.path,
            ) from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc}", path=self.path) from exc
        kept = [(rec.key_hash(rec.encode_key(key)), entry) for key, entry in entries.items() if entry[2] != _DEAD]
        lost, deleted = self._lost(vouched, stop, kept) if vouched else ([], set())
        try:
            if stop < size:
                # A crashed append left a partial record: it was never
                # acknowledged, so the log ends before it.  We hold the lock.
                log.debug("truncating %s from %d to %d (crashed append)", self.path, size, stop)
                os.ftruncate(self.fd, stop)
            again: list[str] = []  # keys whose deletion was cut: reported until they are deleted again below
            if deleted:
                in_log = {key_hash for key_hash, _entry in kept} & deleted
                if in_log:
                    again = [key for key in entries if rec.key_hash(rec.encode_key(key)) in in_log]
                    kept = [k for k in kept if k[0] not in in_log]
                    lost = lost + [(h1, h2, ix.CUT, 0.0) for h1, h2 in in_log]
            table = ix.Table(ix.capacity_for(len(lost) + len(kept)))
            for (h1, h2), (offset, length, state, expiry) in kept:
                table.put(h1, h2, offset, length, state, expiry)
            for h1, h2, offset, expiry in lost:
                table.put(h1, h2, offset, 0, _CORRUPT, expiry)
        except OSError as exc:
            raise StorageError(f"cannot index {self.path}: {exc}", path=self.path) from exc
        try:
            self._install(table, stop, old)
        except OSError as exc:
            # No room for an index file (a full disk): serve reads from this
            # table, kept in this process only, and refuse writes until a
            # later section manages to write it (see _sync).
            log.warning("sessionkit: cannot write the index of %s (%s); reading it from memory", self.path, exc)
            table.store_counters(stop)
            self.private = True
            # marked replaced once a new one is in place (unless _install got
            # that far, and closed it, before what failed)
            self.stale_idx = old if old is not None and old.fd >= 0 else None
            self.table, self.map, self.end, self.hint = table, table.buf, stop, None
            self.retry_private = time.monotonic() + 1.0
            return
        self._delete_again(again)

    def _delete_again(self, keys: list[str]) -> None:
        """Append a deletion of each of ``keys``, whose deletion was cut from
        the log (see :meth:`_lost`), once the rebuilt index is in place, so
        the log says again what it said before it was cut; each is reported
        as damaged until then (and stays so if this fails: a full disk).

        Made as any deletion is, after the new index is in place: a process
        killed meanwhile leaves the index dirty, or the keys reported."""
        for key in keys:
            try:
                self.append(key, rec.key_info(key), None, 0.0)
            except StorageError as exc:
                log.warning("sessionkit: cannot delete %r again in %s: %s; it is reported instead", key, self.path, exc)
                return

    def _vouched(self, old: ix.Index) -> tuple[int, bytes] | None:
        """``(end, slots)`` of ``old``, the index being replaced, if it can be
        believed: one of this very log, of this boot, whose slots agree with
        its counters.  Its writers updated it only after a record was whole
        in the log, so the log was whole up to ``end``, and every slot before
        ``end`` is a record (or a deletion) that was acknowledged."""
        if old.log_ident != self.log_ident or not ix.same_boot(old.boot):
            return None
        try:
            data = old.read_table()
        except (OSError, ValueError):
            return None
        if ix.check(data, old.capacity):
            return None  # a damaged index tells nothing
        return ix.COUNTERS.unpack_from(data, 0)[0], data[ix.HEADER_SIZE - ix.COUNTERS_AT :]

    def _lost(
        self, vouched: tuple[int, bytes], stop: int, kept: list[tuple[tuple[int, int], tuple[int, int, int, float]]]
    ) -> tuple[list[tuple[int, int, int, float]], set[tuple[int, int]]]:
        """What a believed index (see :meth:`_vouched`) knows that the log,
        now ending at ``stop`` and read anew (``kept``: ``((h1, h2), entry)``
        per key not deleted in it), no longer says.

        Returns ``(marks, deleted)``.  ``marks``: ``(h1, h2, offset,
        expiry)`` of each key whose newest record, by that index, is cut
        from the log (offset ``ix.CUT``), and of each key that index had as
        damaged (a record damaged in place, or a mark an earlier rebuild
        left: it stays until the key is written or deleted).  Indexing the
        log alone would serve such a key's older value, or nothing, without
        a word; marked damaged, reading it raises
        :class:`CorruptSessionError` until it is written or deleted anew (or
        its expiry passes).

        ``deleted``: ``(h1, h2)`` of each key whose newest deletion was cut
        from the log, so that the log read anew brings back an older value:
        a ``DEAD`` slot past ``stop``, or, if the log was cut before the
        index's end, a key the log holds before that end that the index has
        no slot for.  An index keeps no slot for a deleted key once it is
        rebuilt or grown, or once a put reuses the slot, yet every key in the
        log before its end was put in it and is taken out only by a deletion,
        which lies after that key's records.  The caller deletes such keys
        again.
        """
        end, slots = vouched
        # A LIVE or DEAD slot at or past the index's end is a write that was
        # under way when its writer died (the index is dirty): not
        # acknowledged, not lost.  Only rebuilds mark a slot CORRUPT.
        cut_short = stop < end
        known = set()  # h1 of every key the index holds (a 64-bit hash: a clash only misses one)
        marks = []
        deleted = set()
        for s in ix.slots(slots):
            state = s[4]
            if state == _EMPTY:
                continue
            if cut_short and state != _DEAD:
                known.add(s[0])
            if state == _CORRUPT:  # a damaged record, or a mark an earlier rebuild left
                marks.append((s[0], s[1], s[2] if s[2] < stop else ix.CUT, s[5]))
            elif s[2] < end and state == _LIVE and s[2] + s[3] > stop:
                marks.append((s[0], s[1], ix.CUT, s[5]))
            elif s[2] < end and state == _DEAD and s[2] >= stop:
                deleted.add((s[0], s[1]))
        if cut_short:  # else every deletion the index took out is still in the log
            for key_hash, entry in kept:
                if entry[0] < end and key_hash[0] not in known:
                    deleted.add(key_hash)
        cut = sum(1 for mark in marks if mark[2] == ix.CUT)
        if cut or deleted:
            log.warning(
                "sessionkit: %s ends at byte %d, before what its index holds: %d session record(s) cut "
                "(reported as damaged) and %d deletion(s) cut (made again); the log was cut or replaced",
                self.path, stop, cut, len(deleted),
            )
        return marks, deleted

    def _open_log_only(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError(f"cannot open {self.path}: {exc}", path=self.path) from exc
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot open {self.path}: {exc}", path=self.path) from exc
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.log_ident = (st.st_dev, st.st_ino)
        self.dir_synced = False

    def _install(self, table: ix.Table, end: int, old: ix.Index | None) -> None:
        """Write ``table`` as the index of the current log and rename it into
        place (the shard is locked); the old mapping is marked replaced."""
        tmp = f"{self.index_path}.{os.getpid()}.{threading.get_ident()}.tmp"
        stray = self._stray_index(old)
        try:
            table.write(tmp, self.log_ident, end, False)
            for retired in (old, stray):
                if retired is not None:
                    retired.set_dirty(1)  # killed before the replaced mark below: they index anew too
            os.replace(tmp, self.index_path)
        except BaseException:
            _unlink(tmp)
            if stray is not None:
                stray.close()
            raise
        for retired in (old, stray):
            if retired is not None:
                retired.set_replaced()
                retired.close()
        self.stale_idx = None
        self._use(ix.Index(self.index_path, checked=False))

    def _stray_index(self, old: ix.Index | None) -> ix.Index | None:
        """The index file at the path, mapped, if it is not ``old`` (the shard is locked).

        A process killed between renaming a new index into place and marking
        the one it replaced leaves that one marked dirty only: its users index
        the log anew and put a third index in place, while processes that
        opened the second in between would go on using it, unaware, and a
        merge by it would leave out what the others appended.  Whoever puts
        an index in place therefore marks the one at the path too.
        """
        try:
            at_path = os.stat(self.index_path)
        except OSError:
            return None
        if old is not None and old.fd >= 0:
            try:
                mine = os.fstat(old.fd)
            except OSError:
                mine = None
            if mine is not None and (mine.st_dev, mine.st_ino) == (at_path.st_dev, at_path.st_ino):
                return None
        try:
            return ix.Index(self.index_path, checked=False)
        except (OSError, ValueError):
            return None  # nothing anyone can map

    # -- reads -----------------------------------------------------------------

    def read_unlocked(self, info: tuple[bytes, int, int, int], now: float) -> bytes | None | bool:
        """Read without the shard's cross-process lock; ``False``: take it.

        Safe for a caller that holds the key's own lock: every write of the
        key by another process was indexed before that process let the key
        go.  Only a record that passes its checksums and holds this key is
        taken; anything else (an index being replaced or rebuilt, damage)
        sends the caller to the locked path, which sorts it out.
        """
        with self.mutex:
            table = self.table
            if table is None or self.private:
                return False
            c = _COUNTERS.unpack_from(self.map, _COUNTERS_AT)
            if c[4] or c[5]:
                return False
            try:
                found = table.find(info[1], info[2])
            except ValueError:
                return False  # no end to the probe: a damaged table
            if found is None:
                return None
            pos, slot = found
            self.hint = (info[1], pos)
            state = slot[4]
            if state != _LIVE:
                return None if state == _DEAD else False
            if slot[5] and slot[5] <= now:
                return None
            if not _MAGIC_SIZE <= slot[2] <= c[0] - slot[3]:
                return False  # a damaged slot: the locked path indexes the log anew
            try:
                value = _value_of(_pread(self.fd, slot[3], slot[2]), info[0])
            except OSError:
                return False
            return False if value is None else value

    def read(self, key: str, info: tuple[bytes, int, int, int], now: float) -> bytes | None:
        """A key's value (inside a section), or None if absent or expired."""
        slot = self._slot(info)
        if slot is None or slot[4] == _DEAD:
            return None
        if slot[4] == _CORRUPT and not (slot[2] == ix.CUT and 0 < slot[5] <= now):  # a cut one may expire
            raise self._damaged(key, slot[2])
        if slot[5] and slot[5] <= now:
            return None
        if _MAGIC_SIZE <= slot[2] <= self.end - slot[3]:
            try:
                record = os.pread(self.fd, slot[3], slot[2])
            except OSError as exc:
                raise StorageError(
                    f"cannot read session {key!r} from {self.path}: {exc}", key=key, path=self.path
                ) from exc
            value = _value_of(record, info[0])
        else:
            value = None  # a damaged slot
        if value is None:
            # The log is the truth: index it anew, once, and look again.
            self._rebuild(f"the record of {key!r} at byte {slot[2]} does not check out")
            slot = self._slot(info)
            if slot is None or slot[4] == _DEAD:
                return None
            if slot[4] == _CORRUPT:
                raise self._damaged(key, slot[2])
            value = None
            if _MAGIC_SIZE <= slot[2] <= self.end - slot[3]:
                value = _value_of(os.pread(self.fd, slot[3], slot[2]), info[0])
            if value is None:
                raise self._damaged(key, slot[2])
        return value

    def _slot(self, info: tuple[bytes, int, int, int]) -> tuple[int, int, int, int, int, float] | None:
        try:
            found = self.table.find(info[1], info[2])  # type: ignore[union-attr]
        except ValueError:
            self._rebuild("its index has no free slot")
            found = self.table.find(info[1], info[2])  # type: ignore[union-attr]
        return None if found is None else found[1]

    def _damaged(self, key: str, offset: int) -> CorruptSessionError:
        if offset == ix.CUT:
            return CorruptSessionError(
                f"the newest record of session {key!r} was cut from {self.path}: the log was "
                "cut short or replaced since it was written; write or delete the session to go on without it",
                key=key,
                path=self.path,
            )
        if offset >= self.end:
            return CorruptSessionError(
                f"the stored record of session {key!r} was at byte {offset} of {self.path}, which now ends "
                f"at byte {self.end}: the log was cut short or replaced; write or delete the session to "
                "go on without it",
                key=key,
                path=self.path,
            )
        return CorruptSessionError(
            f"the stored record of session {key!r} in {self.path} at byte {offset} is damaged; "
            "it is left in place",
            key=key,
            path=self.path,
        )

    def state(self, info: tuple[bytes, int, int, int]) -> int:
        """The state of a key's slot (inside a section): ``_index.EMPTY`` when it has none."""
        slot = self._slot(info)
        return _EMPTY if slot is None else slot[4]

    def _slots(self) -> bytes:
        """Every slot of the index (inside a section), read without mapping its pages here."""
        if self.idx is None:  # indexed in memory only
            return bytes(self.map[ix.HEADER_SIZE :])
        return self.idx.read_table()[ix.HEADER_SIZE - ix.COUNTERS_AT :]

    def expired_count(self, now: float) -> int:
        """Expired sessions, and expired reports of cut ones (inside a section)."""
        table: ix.Table = self.table  # type: ignore[assignment]
        if not table.expiring and not table.corrupt:
            return 0
        snapshot = self._slots()
        return sum(
            1 for s in ix.slots(snapshot)
            if 0 < s[5] <= now and (s[4] == _LIVE or (s[4] == _CORRUPT and s[2] == ix.CUT))
        )

    def live_records(self, now: float, with_values: bool) -> Iterator[tuple[str, bytes]]:
        """``(key, value)`` of every live, unexpired record (inside a section);
        the value is ``b""`` unless ``with_values``."""
        snapshot = self._slots()
        wanted = sorted((s[2], s[3]) for s in ix.slots(snapshot) if s[4] == _LIVE and not 0 < s[5] <= now)
        for (offset, _length), record in _in_runs(self.fd, wanted, 0):
            value = _value_of(record)
            klen = rec.HEADER.unpack_from(record, 0)[1] if len(record) >= rec.HEADER_SIZE else 0
            key = rec.decode_key(record[rec.HEADER_SIZE : rec.HEADER_SIZE + klen])
            if value is None:
                raise self._damaged(key, offset)
            yield key, (value if with_values else b"")

    # -- writes ----------------------------------------------------------------

    def build(
        self, key: str, info: tuple[bytes, int, int, int], value: bytes | None, expiry: float
    ) -> tuple[bytes, bool]:
        """The record that :meth:`append` would write, built before the
        section (so that the shard's lock is held for less), and whether it
        is marked durable.  ``SerializationError`` if it is too long."""
        size = rec.HEADER_SIZE + len(info[0]) + (0 if value is None else len(value))
        if size > _MAX_RECORD:
            raise SerializationError(
                f"cannot store session {key!r}: its record would be {size:,} bytes, and a record holds "
                f"at most {_MAX_RECORD:,}; the stored value is unchanged",
                key=key,
            )
        durable = self.durable
        flags = (0 if value is not None else rec.FLAG_DELETE) | (rec.FLAG_DURABLE if durable else 0)
        return rec.build(info[0], value or b"", flags, expiry), durable

    def append(
        self, key: str, info: tuple[bytes, int, int, int], value: bytes | None, expiry: float,
        built: tuple[bytes, bool] | None = None,
    ) -> None:
        """Append a record (``None``: a deletion) and index it (inside a section).
        ``built``: the record, from :meth:`build` with the same arguments."""
        if built is None or built[1] != self.durable:  # (durable: another handle asked for it meanwhile)
            built = self.build(key, info, value, expiry)
        if self.private:
            raise StorageError(
                f"cannot write session {key!r} to {self.path}: its index could not be written (is the disk "
                "full?); it is read from memory until it can be, and the stored value is unchanged",
                key=key,
                path=self.path,
            )
        try:
            # Not os.fstat: it asks for the log's timestamps too (see _statx).
            size, linked = self.log_state(self.fd)
        except OSError as exc:
            raise StorageError(f"cannot write session {key!r} to {self.path}: {exc}", key=key, path=self.path) from exc
        if size != self.end or not linked:
            # Appended to or replaced behind this index's back (an index
            # deleted while the store was open, and another made; a process
            # of an older release; a log put in place by hand): never write
            # over a record, nor into a log that is gone; index the log anew.
            self._rebuild(f"the log is not where its index says (size {size}, index {self.end}, linked {linked})")
            if self.private:
                return self.append(key, info, value, expiry, built)  # refused, with the reason
        table: ix.Table = self.table  # type: ignore[assignment]
        data = built[0]
        if self.low_room:
            self._keep_room_to_merge(key, table, len(data))
        offset = self.end
        m = self.map
        _U64.pack_into(m, _DIRTY_AT, 1)
        try:
            if _pwrite(self.fd, data, offset) != len(data):
                write_all(self.fd, data, offset)  # a short write (a full disk): the rest, or ENOSPC
            if self.durable:
                os.fdatasync(self.fd)
                if self.dir_unsynced or not self.dir_synced:  # the log's name not durable yet
                    fsync_dir(self.directory)
                    self.dir_unsynced = 0
                    self.dir_synced = True
        except OSError as exc:
            try:
                os.ftruncate(self.fd, offset)  # leave no partial record behind
                _U64.pack_into(m, _DIRTY_AT, 0)
            except OSError:
                pass  # the index stays dirty: the next section re-indexes the log
            raise StorageError(
                f"cannot write session {key!r} to {self.path}: {exc}; the stored value is unchanged",
                key=key,
                path=self.path,
            ) from exc
        self.end = end = offset + len(data)
        hint = self.hint
        pos = hint[1] if hint is not None and hint[0] == info[1] and hint[1] < table.capacity else -1
        slot = _slot_unpack(m, ix.HEADER_SIZE + pos * ix.SLOT_SIZE) if pos >= 0 else None
        if slot is not None and slot[4] == _LIVE and value is not None and slot[0] == info[1] and slot[1] == info[2]:
            # The slot the read found for this key: an overwrite in place.
            table.live += len(data) - slot[3]
            if bool(slot[5]) != bool(expiry):
                table.expiring += 1 if expiry else -1
            _slot_pack(m, ix.HEADER_SIZE + pos * ix.SLOT_SIZE, info[1], info[2], offset, len(data), _LIVE, expiry)
        else:
            try:
                table.put(info[1], info[2], offset, len(data), _LIVE if value is not None else _DEAD, expiry)
            except ValueError:
                self._rebuild("its index has no free slot")
                return
        table.store_counters(end, self.dir_unsynced)
        live = table.live
        if end >= self.next_room_check and end - live > max(live >> 2, ROOM_DEAD):
            self._check_room(live, end)
        if table.used * 10 > table.capacity * 6 or end - live > max(live, SLACK):  # needs_merge(), inline
            self._maintain(table, end)

    def _maintain(self, table: ix.Table, end: int) -> None:
        """The index is filling up or the log holds more dead bytes than live
        ones: ask for a merge; grow the index now if it is nearly full."""
        if table.used * 20 > table.capacity * 17 and time.monotonic() >= self.next_grow:
            old = self.idx
            grown = ix.Table(ix.capacity_for(table.count + table.corrupt))
            for s in ix.slots(self._slots()):
                if s[4] == _LIVE or s[4] == _CORRUPT:
                    grown.put(s[0], s[1], s[2], s[3], s[4], s[5])
            try:
                self._install(grown, end, old)
            except OSError as exc:  # the write is made; a write a second from now tries again
                log.warning("sessionkit: cannot grow the index of %s: %s", self.path, exc)
                self.next_grow = time.monotonic() + 1.0
            return
        if time.monotonic() < self.next_request:
            return
        if end - table.live > OVERDUE * max(table.live, SLACK):
            self.overdue = True  # writes outrun the background merges: the writer merges (see merge_if_overdue)
        self.merge_asked = True
        self.wanted = True  # asked for once out of the section (see after_section)

    def _check_room(self, live: int, end: int) -> None:
        """After an append that left the log with dead bytes worth a merge:
        if the file system has less room than ``ROOM_FACTOR`` times the live
        bytes plus ``SLACK``, the writer merges the shard now, due or not
        (``overdue``, forced).  Left to the background, or to the bound, the
        merge could find no room for its new log once the writes meanwhile
        had filled the disk, and the dead bytes would stay for good.

        Looked at again once the log has grown by a 64th of the room to
        spare (at least ``ROOM_STEP``): rarely on a roomy disk, at every few
        records near the line, as the room left shrinks."""
        try:
            spare = _free_bytes(self.fd) - (ROOM_FACTOR * live + SLACK)
        except OSError:
            self.next_room_check = end + ROOM_STEP
            return
        self.next_room_check = end + max(spare >> 6, ROOM_STEP)
        self.low_room = spare < 0
        if spare < 0:
            self.overdue = self.room_short = True

    def _keep_room_to_merge(self, key: str, table: ix.Table, size: int) -> None:
        """On a disk short of room (see :meth:`_check_room`): refuse an append
        that would leave less room than a merge of the shard needs for its
        new files (:meth:`_merge_room`), with ENOSPC as the cause (so the
        write's ``reclaim`` merges, and tries again).  Filled to the last
        byte, the disk would keep the dead bytes for good: no merge could run."""
        try:
            room = _free_bytes(self.fd)
        except OSError:
            return
        needed = self._merge_room(table)
        if room - size >= needed + ROOM_STEP:  # (what the disk takes for a record: up to a block more)
            return
        cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise StorageError(
            f"cannot write session {key!r} to {self.path}: the disk has {room:,} bytes free, and a merge of "
            f"the shard needs {needed:,} of them; the stored value is unchanged",
            key=key,
            path=self.path,
        ) from cause

    @staticmethod
    def _merge_room(table: ix.Table) -> int:
        """The room a merge of a shard indexed by ``table`` needs for its new
        log and index (and a little more: records appended meanwhile)."""
        return table.live + ix.HEADER_SIZE + table.capacity * ix.SLOT_SIZE + ROOM_STEP

    def reclaim(self, exc: BaseException) -> bool:
        """After a write this shard refused for want of room (``exc``, a
        ``StorageError`` caused by ENOSPC or EDQUOT): merge it now, outside
        any section, if its log holds dead bytes and the file system has room
        for the merged log.  Returns whether it merged (then the write is
        worth one more try); any other error leaves it to the caller."""
        cause = exc.__cause__
        if not isinstance(cause, OSError) or cause.errno not in _NO_ROOM:
            return False
        table = self.table
        if table is not None and not self.private and self.end > table.live + _MAGIC_SIZE:  # dead bytes
            try:
                # The merged log would not fit either, unless the room the files
                # of a merge that died hold counts (the merge removes them first),
                # or another thread's merge under way gives it back.
                if _free_bytes(self.fd) >= self._merge_room(table) or self.claims or self._leftovers():
                    # (waiting for a merge under way, in another thread or process: its end frees room too)
                    if self.merge(time.time() + self.skew, wait=RECLAIM_WAIT, force=True):
                        return True
            except Exception as failed:  # noqa: BLE001 - the write's own error is the one to raise
                log.debug("sessionkit: merge of %s to make room failed: %s", self.path, failed)
        # Another process merges the shard, or this one's merge helper does:
        # a helper that stopped answering is given up here (its merge slot
        # freed), as a write that succeeded would (MERGER.request).
        MERGER.poll()
        return False

    def after_section(self) -> None:
        """Called after a section, outside it: ask for what the section found
        due (a merge, an index check: ``MERGER.request``, which may start the
        merge helper, never inside a section), and merge now if the log is
        far past its bound.  Maintenance only: it never fails the call."""
        if self.wanted:
            self.wanted = False
            try:
                MERGER.request(self)
            except Exception as exc:  # noqa: BLE001 - the write was made; a later one asks again
                log.warning("sessionkit: cannot ask for a merge of %s: %s", self.path, exc)
        if self.overdue:
            self.merge_if_overdue()

    def merge_if_overdue(self) -> None:
        """Merge now, in the calling thread, if a write found the log far past
        its bound, or the disk short of room for a merge of it (called outside
        any section, after a write)."""
        if self.overdue:
            self.overdue = False
            force, self.room_short = self.room_short, False
            try:
                self.merge(time.time() + self.skew, force=force)
            except Exception as exc:  # maintenance only: the write was made
                log.debug("sessionkit: merge of %s failed: %s", self.path, exc)

    # -- merging ----------------------------------------------------------------

    def needs_merge(self) -> bool:
        """Whether the log holds more dead bytes than live ones (beyond ``SLACK``),
        or the index is filling up (inside a section)."""
        table: ix.Table = self.table  # type: ignore[assignment]
        return table.used * 10 > table.capacity * 6 or self.end - table.live > max(table.live, SLACK)

    def verify(self, only: tuple[int, int] | None = None, pace: bool = True) -> str:
        """Check the index in use against its counters (see ``_index.check``),
        off the path of every request (see :meth:`_use`); one that fails is
        indexed anew.  Returns why it failed, or ``""``.

        ``only``: check only if the index in use is that file (device,
        inode), as the merge helper does for its parent.  ``pace``: pause
        between slices of a large table, giving the GIL back."""
        self.verify_pending = False
        with self.mutex, self:
            idx = self.idx
            if idx is None or (only is not None and ix.file_ident(idx) != only):
                return ""
            data = idx.read_table()
        why = ix.check(data, idx.capacity, (lambda: time.sleep(PAUSE)) if pace else None)
        if why:
            log.warning("sessionkit: %s: %s; indexing its log anew", self.index_path, why)
            with self.mutex, self:
                if self.idx is idx:
                    self._rebuild(why)
        return why

    def merge(
        self, now: float, wait: bool | float = False, force: bool = False, paced: bool = False,
        dropped: list[int] | None = None, keep: bool | None = None,
    ) -> bool:
        """Rewrite the log without dead and expired records, and index it anew;
        the shard is locked only at the start and for the swap at the end.

        Returns whether it merged (not when the shard holds a damaged record,
        needs no merge, another thread or process is merging it, or the
        shard changed under it).  ``force``: merge even if few records are
        dead.  ``wait``: wait for another merge to end (up to a minute for
        another thread's, and a minute for another process's; a number: up
        to that many seconds for each).
        ``paced`` (the background thread): pause every ``PACE`` seconds of
        work, so the threads that serve requests get the GIL back at once.
        ``dropped`` gets the number of expired sessions the merge dropped.
        ``keep``: keep the replaced files open a moment (see :meth:`_retain`;
        default: when ``paced``, as background merges do).

        A merge is claimed by the shard's ``claims`` (threads: see
        :meth:`_claim_merge`) and a lock on its merge slot (processes), held
        throughout: the kernel drops the latter when a merging process dies.
        Both are let go so that a ``KeyboardInterrupt`` raised by a signal
        handler as they are let go does not leave them taken.
        """
        token = (object(), _caller())
        slot_file: Any = None  # set once the claim is ours: the slot may be locked from then on
        try:
            # The claim is taken inside this try, and its finally lets go of
            # a claim that holds this token, wherever an exception raised
            # asynchronously lands.
            if not self._claim_merge(token, wait):
                return False
            slot_file = self.locks.file  # what lock() returns, known before it returns
            # Taken inside the try as well: the slot is let go however soon
            # after it is taken an exception lands (letting go of a byte this
            # process does not hold changes nothing, and no other thread of
            # it takes this one: it holds the claim).
            try:
                slot_file = self.locks.lock(self.merge_slot, _waited(wait), "", True)
            except LockTimeout:
                self.next_request = time.monotonic() + 0.1  # another process is merging it
                return False
            return self._merge(now, force, paced, dropped, paced if keep is None else keep)
        finally:
            # Let go of the slot, then of the claim (so that no other thread
            # takes the slot before this one lets go of it), even if an
            # exception raised asynchronously lands in between: the steps
            # are made again (they are idempotent) and that exception raised
            # after (in place of any error of the merge in flight, kept as
            # its context).  Written out here, not called: an exception can
            # land as any function is entered.  A second one that lands while
            # the first is handled (two quick Ctrl-Cs) can still get out.
            interrupted: BaseException | None = None
            failed: Exception | None = None
            while True:
                try:
                    if slot_file is not None:
                        try:
                            self.locks.unlock(slot_file, self.merge_slot)
                        except Exception as exc:  # raised once the claim is let go
                            failed = exc
                        slot_file = None
                    if self.claims.get("merge") is token:
                        self.claims.pop("merge", None)
                except Exception:
                    raise
                except BaseException as exc:
                    interrupted = exc
                    continue
                break
            if interrupted is not None:
                raise interrupted
            if failed is not None:
                raise failed

    def _claim_merge(self, token: tuple[object, tuple[int, int]], wait: bool | float) -> bool:
        """Make ``token`` (an object and the caller, see :func:`_caller`) this
        process's merge of the shard; False if another thread's merge holds
        it (``wait``: for up to ``SECTION_WAIT`` seconds, checking every
        millisecond).

        The claim is one ``dict.setdefault``, a single call that cannot be
        cut in two, not a mutex: a mutex acquired by a call, or let go by a
        ``with`` statement before Python 3.10, can be left held for ever by
        an exception raised asynchronously between two bytecodes (every later
        merge in the process then waited for it).  A claim of the caller's
        own (the same thread, and the same greenlet) found here was left by
        such an exception in the ``finally`` that lets go of it, and is taken
        over, unless a merge of this shard is under way further up the
        caller's stack (a signal handler's write that merged inside a merge).
        """
        claims = self.claims
        deadline = time.monotonic() + _waited(wait)
        while True:
            held = claims.setdefault("merge", token)
            if held is token:
                return True
            if held[1] == token[1] and not self._merging_here():
                claims["merge"] = token
                return True
            if not wait or time.monotonic() > deadline:
                return False
            time.sleep(0.001)

    def _merging_here(self) -> bool:
        """Whether a merge of this shard is under way further up the calling thread's stack."""
        frame: Any = sys._getframe(3)  # 0: here, 1: _claim_merge, 2: the merge asking
        code = Shard.merge.__code__
        while frame is not None:
            if frame.f_code is code and frame.f_locals.get("self") is self:
                return True
            frame = frame.f_back
        return False

    def _merge(self, now: float, force: bool, paced: bool, dropped: list[int] | None, keep: bool) -> bool:
        token = f"{os.getpid()}.{threading.get_ident()}.{next(_MERGE_NUMBERS)}.merge"  # greenlets share a thread
        # Files left by merges or index rebuilds that died, looked for before
        # the shard is locked (a rebuild's file found now is gone, renamed,
        # once it is) and removed under the lock: no merge is under way (this
        # one holds the claim), nor any rebuild (the shard is locked).
        leftovers = self._leftovers()
        with self.mutex, self:
            if self.private or not (force or self.needs_merge()):
                return False
            for leftover in leftovers:
                _unlink(leftover)
            start = self.end
            indexed_by = self.idx  # a rebuild meanwhile (a log cut, say) replaces it: see _swap
            data = self.idx.read_table()  # type: ignore[union-attr]
            capacity = self.idx.capacity  # type: ignore[union-attr]
            log_ident = self.log_ident
            durable = self.durable
            source = os.dup(self.fd)
            _MERGE_FDS.add(source)
        new_log = f"{self.path}.{token}"
        new_index = f"{self.index_path}.{token}"
        target = -1
        try:
            pace = _Pace(lambda: self._grown_since(start)) if paced else None
            why = ix.check(data, capacity, pace)
            if why:
                raise _Stale(why)
            target = os.open(new_log, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            _MERGE_FDS.add(target)
            live: list[Any] = []
            order = []  # offset << 32 | index in live: plain ints, sorted without a key function
            marks = []
            expired = 0
            for s in ix.slots(data[ix.HEADER_SIZE - ix.COUNTERS_AT :]):
                if s[4] == _LIVE:
                    if 0 < s[5] <= now:
                        expired += 1
                    else:
                        order.append(s[2] << 32 | len(live))
                        live.append(s)
                elif s[4] == _CORRUPT:
                    if s[2] != ix.CUT:
                        raise _Kept("a damaged record is kept in place until its session is written or removed")
                    if not 0 < s[5] <= now:
                        marks.append(s)  # reported until written or deleted (or expired): carried over
                    else:
                        expired += 1
                if pace is not None:
                    pace()
            del data
            live = _in_log_order(live, order, pace)
            merged = ix.Table(ix.capacity_for(len(live) + len(marks)))
            for h1, h2, _offset, _length, _state, expiry in marks:
                merged.put(h1, h2, ix.CUT, 0, _CORRUPT, expiry)
            pos = self._copy(source, target, live, merged, pace)
            if durable:
                os.fsync(target)
            merged.write(new_index, (0, 0), pos, False)
            fresh = ix.Index(new_index, checked=False)
            try:
                self._swap(
                    fresh, merged, start, pos, source, target, log_ident, new_log, new_index, durable, indexed_by,
                    keep,
                )
            except BaseException:
                if self.idx is not fresh:  # else handed to the shard before the exception (see _swap)
                    fresh.close()
                raise
            target = -1  # now the shard's log
            if dropped is not None:
                dropped.append(expired)
            return True
        except _Stale as why:
            # The index does not match the log: never merge by it (the
            # records it lost would be left behind); index the log anew.
            log.warning("sessionkit: %s: %s; indexing its log anew", self.index_path, why)
            with self.mutex, self:
                if self.log_ident == log_ident:
                    self._rebuild(str(why))
            return False
        except _Abort as why:
            log.debug("sessionkit: merge of %s given up: %s", self.path, why)
            self.next_request = time.monotonic() + (60.0 if isinstance(why, _Kept) else 1.0)
            return False
        except OSError as exc:
            self.next_request = time.monotonic() + 1.0
            raise StorageError(f"cannot merge {self.path}: {exc}", path=self.path) from exc
        finally:
            _MERGE_FDS.discard(source)
            os.close(source)
            if target >= 0 and target in _MERGE_FDS:  # else the shard's log now (see _swap)
                _MERGE_FDS.discard(target)
                os.close(target)
                _unlink(new_log)
                _unlink(new_index)

    def _leftovers(self) -> list[str]:
        """Paths of the files merges and index rebuilds of this shard write
        before renaming them into place (``shard-NNN.log.<token>.merge``,
        ``shard-NNN.idx.<token>``)."""
        log_prefix = os.path.basename(self.path) + "."
        index_prefix = os.path.basename(self.index_path) + "."
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return [
            os.path.join(self.directory, name)
            for name in names
            if (name.startswith(log_prefix) and name.endswith(".merge")) or name.startswith(index_prefix)
        ]

    def _copy(self, source: int, target: int, live: list[Any], merged: ix.Table, pace: Any) -> int:
        """Copy the ``live`` records (in log order) from ``source`` to ``target``, indexing them in ``merged``.

        Reads and writes go in runs of ``MERGE_RUN`` bytes, so no single
        step holds the GIL long (a ``pace`` pause can come between any two)."""
        write_all(target, rec.MAGIC, 0)
        pos = len(rec.MAGIC)
        parts: list[bytes] = []
        written = pos
        for (h1, h2, offset, length, _state, expiry), record in _in_runs(source, live, 2, MERGE_RUN):
            if len(record) != length or rec.record_size(record) != length:
                raise _Stale(f"its slot for byte {offset} does not point at a whole record")
            klen = rec.HEADER.unpack_from(record, 0)[1]
            if rec.key_hash(record[rec.HEADER_SIZE : rec.HEADER_SIZE + klen]) != (h1, h2):
                raise _Stale(f"its slot for byte {offset} does not match the key recorded there")
            parts.append(record)
            merged.put(h1, h2, pos, length, _LIVE, expiry)
            pos += length
            if pos - written >= MERGE_RUN or len(parts) >= MERGE_PARTS:
                write_parts(target, parts, written)
                parts, written = [], pos
            if pace is not None:
                pace()
        write_parts(target, parts, written)
        return pos

    def _swap(
        self, fresh: ix.Index, merged: ix.Table, start: int, pos: int, source: int, target: int,
        log_ident: tuple[int, int], new_log: str, new_index: str, durable: bool, indexed_by: ix.Index | None,
        keep: bool = False,
    ) -> None:
        """Under the lock: add what was appended since ``start``, then rename the new files into place.
        ``keep``: the replaced files are kept open a while (see :meth:`retire`)."""
        table = fresh.table()
        _start_write_back(target)
        _start_write_back(fresh.fd)
        caught = self._catch_up(source, target, table, start, pos)
        if caught[1] != pos:  # what the catch-up added, on its way too
            _start_write_back(target)
            _start_write_back(fresh.fd)
        start, pos = caught
        with self.mutex, self:
            if self.closed or self.log_ident != log_ident:
                raise _Abort("the log was replaced meanwhile")
            if self.idx is not indexed_by:  # indexed anew (or grown): what was copied may not be the log now
                raise _Abort("the log was indexed anew meanwhile")
            now_at = os.fstat(self.fd)
            if now_at.st_size != self.end or not now_at.st_nlink:
                # the index does not cover the whole log: merging by it would
                # leave records out (the next section indexes the log anew)
                raise _Abort(f"the log is {now_at.st_size} bytes, its index says {self.end}")
            start, pos = self._replay(self.fd, target, table, start, self.end, pos, None)
            if durable:
                os.fdatasync(target)
            st = os.fstat(target)
            ix.FIXED.pack_into(fresh.map, 0, ix.MAGIC, fresh.capacity, st.st_dev, st.st_ino, ix.BOOT_ID)
            table.store_counters(pos)
            old = self.idx
            stray = self._stray_index(old)
            try:
                old.set_dirty(1)  # type: ignore[union-attr]  # a crash before both renames: re-index
                if stray is not None:
                    stray.set_dirty(1)
                os.replace(new_log, self.path)
                os.replace(new_index, self.index_path)
            except BaseException:
                if stray is not None:
                    stray.close()
                raise
            old.set_replaced()  # type: ignore[union-attr]
            if stray is not None:
                stray.set_replaced()
                stray.close()
            retired = (old, self.fd)  # closed after the lock: freeing the old log's blocks takes a while
            # The hand-over: once out of _MERGE_FDS, ``target`` is the shard's,
            # and once the shard uses ``fresh``, so is it; _merge closes
            # neither after that, whatever is raised (an exception from a
            # signal handler here leaks a descriptor at worst).
            _MERGE_FDS.discard(target)  # the shard's log from now on: a forked child keeps it
            self.fd = target
            self.log_ident = (st.st_dev, st.st_ino)
            self.dir_synced = False
            fresh.log_ident = self.log_ident
            self._use(fresh)
            if durable:
                try:
                    fsync_dir(self.directory)
                    self.dir_synced = True
                except OSError as exc:
                    # The next durable write syncs it before it is acknowledged.
                    self.dir_unsynced = 1
                    table.store_counters(pos, 1)
                    log.warning("sessionkit: cannot make the merge of %s durable yet: %s", self.path, exc)
            # Decided and listed under the lock: a child forked from then on closes them.
            kept = keep and self._retain(retired[0], retired[1])
        if kept:
            MERGER.trim()
        else:
            _close_shard_files(retired[0], None, retired[1])

    def _retain(self, old: ix.Index | None, fd: int) -> bool:
        """For a background merge, inside the section that replaced them:
        keep the index and log it replaced open ``RETIRE_AFTER`` seconds,
        for the merge thread to close, if the file system has room; returns
        whether it kept them.

        The last process to close a replaced log frees its blocks, which
        takes about a millisecond for a few megabytes.  Closed at once, that
        is usually another process, in the request that finds the shard
        replaced and moves to the new files; kept open by the process that
        merged, that process's merge thread pays instead, off every request
        path (for the processes that come back to the shard within the
        second).  The space comes back that much later, so they are kept
        only while the file system has room to spare: ``RETIRE_ROOM`` plus
        ``RETIRE_FACTOR`` times all that the process would keep (space a
        quota limits is not seen).
        """
        try:
            size = os.fstat(fd).st_size + (0 if old is None else ix.HEADER_SIZE + old.capacity * ix.SLOT_SIZE)
            if _free_bytes(fd) < RETIRE_ROOM + RETIRE_FACTOR * (MERGER.kept_bytes() + size):
                return False
        except OSError:
            return False
        MERGER.hold(self)  # first: a child forked once the entry is listed finds the shard
        self.retired.append((time.monotonic() + RETIRE_AFTER, old, fd, size))
        return True

    def close_retired(self, now: float | None = None) -> None:
        """Close the replaced files kept open whose time is up by ``now``
        (monotonic; ``None``: all of them)."""
        retired = self.retired
        while retired and (now is None or retired[0][0] <= now):
            try:
                _deadline, old, fd, _size = retired.pop(0)  # one thread gets each entry: never closed twice
            except IndexError:  # taken by another thread meanwhile
                break
            _close_shard_files(old, None, fd)

    def _grown_since(self, start: int) -> bool:
        """Whether the log has grown by more than its bound allows since ``start`` (a merge is falling behind)."""
        with self.mutex:
            if self.map is None:
                return True
            c = _COUNTERS.unpack_from(self.map, _COUNTERS_AT)
        return bool(c[0] - start > max(c[1], SLACK))

    def _catch_up(self, source: int, target: int, table: ix.Table, start: int, pos: int) -> tuple[int, int]:
        """Outside the lock: add to the merged log what was appended since
        ``start``, until little is left for the swap to add under the lock."""
        pace = _Pace(lambda: self._grown_since(start))
        for _ in range(16):
            with self.mutex:  # the thread mutex only: another thread may swap the mapping
                if self.map is None:
                    break
                c = _COUNTERS.unpack_from(self.map, _COUNTERS_AT)
            if c[4] or c[5] or c[0] - start < CATCH_UP:
                break  # being written, replaced, or little left
            start, pos = self._replay(source, target, table, start, c[0], pos, pace)
        return start, pos

    def _replay(
        self, source: int, target: int, table: ix.Table, start: int, end: int, pos: int, pace: Any
    ) -> tuple[int, int]:
        """Copy the records from ``start`` to ``end`` of the log open at
        ``source`` to the merged log at ``pos``, indexing them in ``table``.

        A ``CHUNK`` at a time (a record longer than that whole, at once): a
        catch-up may be larger than memory, or than one ``pread`` returns
        (``MAX_IO``), when writes outran a slow merge."""
        while start < end:
            tail = os.pread(source, min(end - start, CHUNK), start)
            try:
                records, stop = rec.parse(tail, start, at_eof=False, pace=pace)
                if stop == start:  # a record longer than the chunk: read it whole
                    need = rec.record_size(tail)
                    if need <= len(tail) or start + need > end:
                        raise _Abort("what was appended meanwhile does not parse")
                    tail = os.pread(source, need, start)
                    records, stop = rec.parse(tail, start, at_eof=False, pace=pace)
            except rec.Damage:
                raise _Abort("what was appended meanwhile does not parse") from None
            if stop == start or stop > end or not all(r.ok for r in records):
                raise _Abort("what was appended meanwhile does not parse")
            whole = stop - start
            write_all(target, tail if whole == len(tail) else tail[:whole], pos)  # contiguous: one write
            for r in records:
                h1, h2 = rec.key_hash(rec.encode_key(r.key))
                state = _DEAD if r.flags & rec.FLAG_DELETE else _LIVE
                try:
                    table.put(h1, h2, pos + r.offset - start, r.length, state, r.expiry)
                except ValueError:
                    raise _Abort("the merged index filled up") from None
                if table.used * 20 > table.capacity * 17:
                    raise _Abort("the merged index filled up with keys added meanwhile")
                if pace is not None:
                    pace()
            start, pos = stop, pos + whole
        return start, pos

    def merge_request(self) -> bytes:
        """The merge helper's request to merge this shard, encoded (made
        again only when what it says changes: a write's merge request is
        the rare path of a request, and runs with cold caches)."""
        said = (self.dir_ident, self.durable, self.skew, SLACK)
        made = self.request_made
        if made is None or made[0] != said:
            request = self.helper_request(skew=self.skew, slack=SLACK)
            made = self.request_made = (said, json.dumps(request).encode())
        return made[1]

    def helper_request(self, **fields: Any) -> dict[str, Any]:
        """A request to the merge helper about this shard: which shard of
        which store, whether it is durable, and ``fields`` (see ``_merge_helper``)."""
        return {"dir": self.directory, "ident": list(self.dir_ident), "shard": self.number,
                "durable": self.durable, **fields}

    def let_go(self) -> bool:
        """Close the files in use until a section needs them again (the merge
        helper between requests, a process that just forked): a process that
        keeps a shard's log open while another process merges the shard keeps
        the replaced log's blocks from being freed, however full the disk.
        Returns whether it closed them: not while this process merges the
        shard (the merge would give up, its work lost, at its swap; the swap
        moves to the new files itself), nor a table kept in memory only.

        They are opened again without the index check, as a shard another
        process merged is: the index this process had open was checked when
        it was opened (and the helper's merges and checks read the whole
        table anyway, outside the section).
        """
        with self.mutex:
            if self.private or self.table is None or self.claims:
                return False
            self._close_files()
            self.reopen_unchecked = True
        self._close_deferred()
        return True

    def close(self) -> None:
        self.closed = True
        self._close_files()
        self._close_deferred()
        self.close_retired()


class Merger:
    """Where the process's background merges and index checks go: its merge
    helper process (see ``_merge_helper``), or its merge thread, started
    when a shard first needs one (no helper to be had, or
    ``SESSIONKIT_MERGES=thread``).

    :meth:`request` runs after a shard's section (``Shard.after_section``);
    ``_mutex`` is held by nothing that waits for a shard: the fork hooks
    leave it alone (a child starts with a new one, no merges and no
    helper).
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._pending: list[Shard] = []
        self._running: Shard | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._holding: list[Shard] = []  # shards that keep replaced files open (see Shard._retain)
        self.helper = Helper()  # the process that merges for this one (see _merge_helper)
        _fork.register(self)
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        """At the interpreter's exit: stop the helper and wait for it a moment,
        so that this process reaps it (not init, which in a container may
        never).  A thread of ours inside ``request`` is left alone."""
        if self._mutex.acquire(timeout=0.5):
            try:
                self.helper.stop()
            finally:
                self._mutex.release()

    def request(self, shard: Shard) -> None:
        """Have ``shard`` merged (``merge_asked``) and its index checked
        (``verify_pending``), whichever its flags ask for: by the helper
        process if one can be had (see ``_merge_helper``), else by the merge
        thread.  Called outside the shard's section; never waits."""
        with self._mutex:
            self._collect(self.helper.poll())
            self._dispatch(shard)

    def poll(self) -> None:
        """Collect the merge helper's answers, giving up a helper that
        answers nothing (see ``Helper.poll``); never waits."""
        with self._mutex:
            self._collect(self.helper.poll())

    def _dispatch(self, shard: Shard) -> None:
        """Send ``shard``'s flags to the helper, or queue it for the thread (under ``_mutex``)."""
        if not (self.helper.usable() and self._ask_helper(shard)):
            self._to_thread(shard)
            self._wake.set()

    def _ask_helper(self, shard: Shard) -> bool:
        """Send the helper what ``shard``'s flags ask for (under ``_mutex``);
        False if the thread is to do it."""
        if shard.private:
            return False  # indexed in memory only: the helper cannot see that index
        helper = self.helper
        if shard.verify_pending and not helper.is_asked((shard, "verify")):
            index = shard.verify_ident
            if index is None:
                return False  # which file is not known: the thread checks the one in use
            if not helper.send((shard, "verify"), shard.helper_request(verify=list(index))):
                return False
            shard.verify_pending = False
        if shard.merge_asked and not helper.is_asked((shard, "merge")):
            if not helper.send((shard, "merge"), shard.merge_request()):
                return False
            shard.merge_asked = False
        # Asked, or asked already: the writes that find the merge still due
        # look again a moment later, not at every write.
        shard.next_request = time.monotonic() + 0.005
        return True

    def _collect(self, polled: tuple[list[tuple[Any, dict[str, Any]]], list[Any]]) -> None:
        """The helper's answers (under ``_mutex``): what it failed at, or
        will never answer, goes to the thread."""
        answered, failed = polled
        again = []
        for (shard, kind), reply in answered:
            if shard.closed:
                continue
            if "error" in reply:
                log.debug("sessionkit: the merge helper could not %s %s: %s", kind, shard.path, reply["error"])
                failed.append((shard, kind))
            elif shard.verify_pending or shard.merge_asked:
                again.append(shard)  # asked for again while this was under way
        for shard in again:
            self._dispatch(shard)
        for shard, kind in failed:
            if shard.closed:
                continue
            if kind == "merge":
                shard.merge_asked = True
            else:
                shard.verify_pending = True
            self._to_thread(shard)
        if failed:
            self._wake.set()

    def _to_thread(self, shard: Shard) -> None:
        """Queue ``shard`` for the merge thread, started if need be (under ``_mutex``)."""
        if shard in self._pending and self._thread is not None:
            return
        if shard not in self._pending:
            self._pending.append(shard)
        if self._thread is None:
            thread = threading.Thread(target=self._run, name="sessionkit-merge", daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:  # no thread to be had: the next request tries again
                log.warning("sessionkit: cannot start the merge thread: %s", exc)
                return
            self._thread = thread

    def hold(self, shard: Shard) -> None:
        """Note that ``shard`` keeps replaced files open (see Shard._retain):
        :meth:`_run` closes them when their time is up."""
        with self._mutex:
            if shard not in self._holding:
                self._holding.append(shard)

    def trim(self) -> None:
        """Close the oldest replaced files kept if the process keeps more
        than ``RETIRE_MAX`` (called by the merge thread, outside any section)."""
        with self._mutex:
            holding = list(self._holding)
        kept = [(s.retired[0][0], s) for s in holding if s.retired]
        if sum(len(s.retired) for s in holding) > RETIRE_MAX and kept:
            oldest = min(kept, key=lambda pair: pair[0])[1]
            oldest.close_retired(oldest.retired[0][0] if oldest.retired else 0.0)

    def kept_bytes(self) -> int:
        """The bytes of the replaced logs and indexes this process keeps open (see Shard._retain)."""
        with self._mutex:
            holding = list(self._holding)
        return sum(entry[3] for shard in holding for entry in list(shard.retired))

    def close_due(self) -> float:
        """Close the replaced files whose time is up; returns the seconds
        until the next one is due (30 when none is kept).  Called by the
        merge thread, and by the merge helper, which merges without one."""
        now = time.monotonic()
        with self._mutex:
            holding = list(self._holding)
        wait = 30.0
        for shard in holding:
            try:
                shard.close_retired(now)
            except OSError as exc:  # a descriptor closed anyway; the space comes back when the process ends
                log.debug("sessionkit: closing the replaced files of %s: %s", shard.path, exc)
            try:
                wait = min(wait, max(shard.retired[0][0] - now, 0.001))
            except IndexError:  # none left (or closed with the shard meanwhile)
                with self._mutex:
                    if not shard.retired and shard in self._holding:
                        self._holding.remove(shard)
        return wait

    def _run(self) -> None:
        try:
            self._loop()
        finally:  # an exception raised in this thread asynchronously: the next request starts another
            with self._mutex:
                mine = self._thread is threading.current_thread()
                if mine:
                    self._thread = None
                    self._running = None
                holding = list(self._holding) if mine else []
            for shard in holding:  # kept for this thread to close: closed now
                try:
                    shard.close_retired()
                except Exception:  # noqa: BLE001 - the space comes back when the process ends
                    pass

    def _loop(self) -> None:
        while True:
            try:
                wait = self.close_due()
            except Exception as exc:  # maintenance only
                log.debug("sessionkit: closing replaced files: %s", exc)
                wait = 1.0
            with self._mutex:
                if self._pending:
                    shard = self._running = self._pending.pop(0)
                else:
                    shard = None
                    self._wake.clear()
            if shard is None:
                if self._wake.wait(wait):
                    continue
                with self._mutex:
                    if not self._pending and not self._holding:
                        self._thread = None
                        return
                continue
            try:
                if shard.verify_pending:
                    shard.verify()
                if shard.merge_asked:
                    shard.merge_asked = False
                    shard.merge(time.time() + shard.skew, paced=True)
            except Exception as exc:  # maintenance only: the writes go on without it
                log.debug("sessionkit: merge of %s failed: %s", shard.path, exc)
            finally:
                with self._mutex:
                    self._running = None

    def give_up_helper(self, why: str) -> None:
        """Stop using the helper (killed; another is tried ``RETRY_AFTER`` later); what it was asked is dropped."""
        with self._mutex:
            self.helper.give_up(why)

    def wait(self, shards: list[Shard] | None = None, timeout: float = 60.0, helper: bool = True) -> bool:
        """Wait until no merge or check of ``shards`` (default: of any shard)
        is asked for or running, here or (``helper``) in the helper; returns
        False if ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while True:
            with self._mutex:
                self._collect(self.helper.poll())
                busy = [s for s in (*self._pending, self._running) if s is not None]
                if helper:
                    busy += [token[0] for token in self.helper.asked()]
            if shards is not None:
                busy = [s for s in busy if s in shards]
            if not busy:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)

    def _fork_before(self) -> None:
        pass

    def _fork_after_parent(self) -> None:
        pass

    def _fork_after_child(self) -> None:
        self.helper.forget()  # the parent's: this process starts its own when it needs one
        self._mutex = threading.Lock()
        self._pending = []
        self._thread = self._running = None
        self._wake = threading.Event()
        holding, self._holding = self._holding, []
        for shard in holding:  # the parent's to close; copies kept here would hold their space
            try:
                shard.close_retired()
            except OSError:
                pass
        for fd in list(_MERGE_FDS):  # the parent's merge under way: its copies here would pin its files
            _MERGE_FDS.discard(fd)
            try:
                os.close(fd)
            except OSError:
                pass


MERGER = Merger()
