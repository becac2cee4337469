"""The shared index of one shard log: a hash table in a file every process maps.

``shard-NNN.idx`` sits beside ``shard-NNN.log``.  Every process maps it
(``MAP_SHARED``), so what one process appends is indexed for all of them:
no process re-reads another's appends, and opening a store reads no log.

Layout (little-endian)::

    0    magic (8) | capacity u64 | log device u64 | log inode u64 | boot id (16)
    64   end | live | count | used | dirty | replaced | corrupt | expiring |
         dir_unsynced (u64 each) | two reserved words
    4096 capacity slots of 40 bytes:
         h1 u64 | h2 u64 | offset u64 | length u32 | state u32 | expiry f64

``end`` is where the valid log ends (the next record goes there), ``live``
the bytes of records the table points at, ``count`` the slots in state
``LIVE``, ``used`` the slots not ``EMPTY``.  A slot is found by linear
probing from ``h1``; a key is its 128-bit hash (``_records.key_info``), and a
read also checks the key stored in the record.  ``DEAD`` slots are deleted
keys (probing goes on past them); ``CORRUPT`` ones point at a record whose
checksum failed, kept for the error message, or hold offset ``CUT``: the
key's newest record or deletion was cut from the log (found when the log
was indexed anew; such a mark is carried through merges and rebuilds until
the key is written or deleted).

Rules that keep the table true, for every process:

* It changes only under the shard's cross-process lock, and ``dirty`` is
  set before the log is appended to and cleared once the slot and the
  counters are written.  A process killed in between leaves ``dirty`` set,
  and the next one to take the lock rebuilds the index from the log.
* It is never rebuilt, grown or merged in place: a new file is written
  whole, ``dirty`` is set in the old one, the new one is renamed over it,
  then ``replaced`` is set in the old one, so a process still mapping it
  moves on (or, if the renaming process died in between, rebuilds).  Until
  then the old table and the old log (still open) agree with each other.
* It belongs to one log (device and inode) and one boot of the machine: an
  index left by an earlier boot may miss writes the page cache never
  flushed, so it is rebuilt.  The boot is Linux's boot id, elsewhere the
  boot time to the minute.
* Its slots must agree with its counters (:func:`check`): zeroed or
  overwritten slots would hide sessions, so an index that fails the check is
  rebuilt, and a merge never copies the log by it.  Only ``LIVE`` slots
  carry a length, so the counters can be checked with a few C-level passes.
* It is only ever mapped, never truncated: a process reading a mapping whose
  file was cut short would be killed with ``SIGBUS``.
"""

from __future__ import annotations

import array
import mmap
import os
import struct
import sys
import time
from typing import Any, Iterator

MAGIC = b"SKIDX\x001\n"
HEADER_SIZE = 4096
SLOT = struct.Struct("<QQQIId")
SLOT_SIZE = SLOT.size  # 40
FIXED = struct.Struct("<8sQQQ16s")
COUNTERS = struct.Struct("<QQQQQQQQQdQ")
COUNTERS_AT = 64
DIRTY_AT = COUNTERS_AT + 4 * 8
REPLACED_AT = COUNTERS_AT + 5 * 8
_U64 = struct.Struct("<Q")
MIN_CAPACITY = 1 << 10

EMPTY, LIVE, DEAD, CORRUPT = 0, 1, 2, 3
CUT = (1 << 64) - 1  # the offset of a CORRUPT slot whose key's newest record (or deletion) was cut from the log

_slot_unpack = SLOT.unpack_from
_slot_pack = SLOT.pack_into


def _read_boot_id() -> bytes:
    """This boot of the machine: Linux's boot id, else the boot time to the minute (``T``-tagged)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return bytes.fromhex(f.read().strip().replace(b"-", b"").decode("ascii"))[:16].ljust(16, b"\0")
    except (OSError, ValueError):
        minute = int((time.time() - time.monotonic()) // 60)
        return b"T" + minute.to_bytes(15, "little", signed=True)


BOOT_ID = _read_boot_id()


def same_boot(boot: bytes) -> bool:
    """Whether an index written with ``boot`` was written since this machine booted."""
    if boot == BOOT_ID:
        return True
    if boot[:1] == BOOT_ID[:1] == b"T":  # two processes may round the boot time apart
        theirs = int.from_bytes(boot[1:], "little", signed=True)
        return abs(theirs - int.from_bytes(BOOT_ID[1:], "little", signed=True)) <= 1
    return False


def capacity_for(count: int) -> int:
    """A table size (a power of two) that holds ``count`` keys at most half full."""
    cap = MIN_CAPACITY
    while cap < 2 * count:
        cap <<= 1
    return cap


class Table:
    """A table over a buffer: a ``bytearray`` being built (by a rebuild or a
    merge), or a mapped index while its shard is locked.  Keeps the counters
    that go with the slots (written to the header by :meth:`store_counters`)."""

    __slots__ = ("buf", "capacity", "mask", "count", "used", "live", "corrupt", "expiring")

    def __init__(self, capacity: int, buf: Any = None) -> None:
        self.capacity = capacity
        self.mask = capacity - 1
        self.buf = bytearray(HEADER_SIZE + capacity * SLOT_SIZE) if buf is None else buf
        self.count = self.used = self.live = self.corrupt = self.expiring = 0

    def find(self, h1: int, h2: int) -> tuple[int, tuple[int, int, int, int, int, float]] | None:
        """``(slot number, slot)`` of key ``(h1, h2)``, or None.  ``ValueError``
        on a table with no end to a probe (only a damaged file has none)."""
        buf = self.buf
        mask = self.mask
        pos = h1 & mask
        for _ in range(self.capacity):
            slot = _slot_unpack(buf, HEADER_SIZE + pos * SLOT_SIZE)
            if slot[4] == EMPTY:
                return None
            if slot[0] == h1 and slot[1] == h2:
                return pos, slot
            pos = (pos + 1) & mask
        raise ValueError("an index with no free slot")

    def put(self, h1: int, h2: int, offset: int, length: int, state: int, expiry: float) -> None:
        """Set a key's slot (``DEAD``: mark it deleted), inserting it if it is new."""
        buf = self.buf
        mask = self.mask
        pos = h1 & mask
        free = -1
        for _ in range(self.capacity):
            slot = _slot_unpack(buf, HEADER_SIZE + pos * SLOT_SIZE)
            old = slot[4]
            if old == EMPTY:
                if state == DEAD:
                    return  # nothing to delete
                if free < 0:
                    self.used += 1
                else:
                    pos = free  # reuse the first deleted slot on the path
                break
            if slot[0] == h1 and slot[1] == h2:
                if old == LIVE:
                    self.count -= 1
                    self.live -= slot[3]
                    if slot[5]:
                        self.expiring -= 1
                elif old == CORRUPT:
                    self.corrupt -= 1
                break
            if old == DEAD and free < 0:
                free = pos
            pos = (pos + 1) & mask
        else:
            raise ValueError("an index with no free slot")
        if state == LIVE:
            self.count += 1
            self.live += length
            if expiry:
                self.expiring += 1
        else:
            length = 0  # only a LIVE slot has a length: see check()
            if state == CORRUPT:
                self.corrupt += 1
        _slot_pack(buf, HEADER_SIZE + pos * SLOT_SIZE, h1, h2, offset, length, state, expiry)

    def load_counters(self) -> tuple[Any, ...]:
        """Read the header's counters into this table; returns them all."""
        c = COUNTERS.unpack_from(self.buf, COUNTERS_AT)
        self.live, self.count, self.used, self.corrupt, self.expiring = c[1], c[2], c[3], c[6], c[7]
        return c  # type: ignore[no-any-return]

    def store_counters(self, end: int, dir_unsynced: int = 0) -> None:
        """Write the counters to the header, with ``dirty`` and ``replaced`` clear."""
        COUNTERS.pack_into(
            self.buf, COUNTERS_AT, end, self.live, self.count, self.used, 0, 0, self.corrupt, self.expiring,
            dir_unsynced, 0.0, 0,
        )

    def write(self, path: str, log_ident: tuple[int, int], end: int, durable: bool) -> None:
        """Write the table (a ``bytearray``) to ``path``, a new file, with its header."""
        FIXED.pack_into(self.buf, 0, MAGIC, self.capacity, log_ident[0], log_ident[1], BOOT_ID)
        self.store_counters(end)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with memoryview(self.buf) as view:
                offset = 0
                while offset < len(view):
                    offset += os.pwrite(fd, view[offset : offset + mmap.PAGESIZE], offset)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)


CHECK_AT_OPEN = 1 << 15  # slots: a larger table is checked by the merge thread, not while opening


class Damaged(ValueError):
    """An index whose slots do not match its counters."""


def check(data: bytes, capacity: int, pause: Any = None) -> str:
    """Why the counters and slots in ``data`` (an index from byte
    ``COUNTERS_AT`` on) do not agree, or ``""``.  Zeroed or overwritten
    slots would hide sessions; their counts give them away.  ``pause`` is
    called between slices of the table (a background check lets other
    threads have the GIL there, so the slices are smaller)."""
    c = COUNTERS.unpack_from(data, 0)
    if c[4] or c[5]:
        return ""  # being written, or replaced: the caller looks at those itself
    table = memoryview(data)[HEADER_SIZE - COUNTERS_AT :]
    if len(table) != capacity * SLOT_SIZE:
        return "its table is cut short"
    live = used = corrupt = count = 0
    step = (8192 if pause is None else 1024) * SLOT_SIZE
    for start in range(0, len(table), step):
        part = table[start : start + step]
        counted = _count_fast(part)
        if counted is None:
            counted = _count_slow(part)
        count += counted[0]
        used += counted[1]
        corrupt += counted[2]
        live += counted[3]
        part.release()
        if pause is not None:
            pause()
    table.release()
    if (count, used, corrupt, live) != (c[2], c[3], c[6], c[1]):
        return "its slots do not match its counters"
    return ""


def _count_slow(table: memoryview) -> tuple[int, int, int, int]:
    """What :func:`_count_fast` counts, for a table with a state not one of the four."""
    words = array.array("I")
    words.frombytes(table)
    if sys.byteorder == "big":
        words.byteswap()
    states = words[7 :: SLOT_SIZE // 4]
    count = states.count(LIVE)
    return count, len(states) - states.count(EMPTY), states.count(CORRUPT), sum(words[6 :: SLOT_SIZE // 4])


_LENGTH_AT = 24  # a slot's length (u32) in bytes from its start; its state (u32) follows


def _count_fast(table: memoryview) -> tuple[int, int, int, int] | None:
    """``(live slots, used slots, corrupt slots, live bytes)`` of ``table``
    in a few C-level passes over byte planes, or None if a state is not one
    of the four (the caller then counts slot by slot).

    ``table[k::SLOT_SIZE]`` is byte ``k`` of every slot.  Each state is a
    little-endian 32-bit word: once its three high bytes are all zero, its
    low byte is the state, counted with ``bytes.count``.  The lengths are
    summed a byte plane at a time (``sum`` over bytes meets only the
    interpreter's cached small ints), skipping planes that are all zero."""
    data = bytes(table)
    slots = len(data) // SLOT_SIZE
    at = _LENGTH_AT + 4
    for k in (at + 1, at + 2, at + 3):
        if data[k::SLOT_SIZE].count(0) != slots:
            return None
    states = data[at::SLOT_SIZE]
    live_slots, dead, corrupt = states.count(LIVE), states.count(DEAD), states.count(CORRUPT)
    if live_slots + dead + corrupt + states.count(EMPTY) != slots:
        return None
    live_bytes = 0
    for k in range(4):
        plane = data[_LENGTH_AT + k :: SLOT_SIZE]
        if plane.count(0) != slots:
            live_bytes += sum(plane) << (8 * k)
    return live_slots, live_slots + dead + corrupt, corrupt, live_bytes


class Index:
    """One mapping of a shard's index file."""

    __slots__ = ("path", "fd", "map", "capacity", "log_ident", "boot")

    def __init__(self, path: str, checked: bool = True) -> None:
        """Map the index file at ``path``; ``ValueError`` if it is not a whole
        index (``OSError`` if absent).  ``checked``: also :func:`check` its
        slots against its counters first (for tables up to ``CHECK_AT_OPEN``
        slots; larger ones are checked in the background)."""
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise ValueError("too short")
            magic, capacity, dev, ino, boot = FIXED.unpack(os.pread(fd, FIXED.size, 0))
            whole = size == HEADER_SIZE + capacity * SLOT_SIZE
            if magic != MAGIC or capacity < 1 or capacity & (capacity - 1) or not whole:
                raise ValueError("not a sessionkit index")
            # Read with pread, not through the mapping: the check reads every
            # slot, and pages read through a mapping stay in this process.
            if checked and capacity <= CHECK_AT_OPEN:
                why = check(os.pread(fd, size - COUNTERS_AT, COUNTERS_AT), capacity)
                if why:
                    raise Damaged(why)
            self.map = mmap.mmap(fd, size)
            if hasattr(self.map, "madvise") and hasattr(mmap, "MADV_RANDOM"):
                # Lookups touch a slot here and there: without this, read-ahead
                # maps megabytes around each one into every process.
                self.map.madvise(mmap.MADV_RANDOM)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd  # kept for reading the whole table without mapping its pages here
        self.capacity = capacity
        self.log_ident = (dev, ino)
        self.boot = boot

    def table(self) -> Table:
        """A :class:`Table` over this mapping, its counters read from the header."""
        table = Table(self.capacity, self.map)
        table.load_counters()
        return table

    def set_dirty(self, value: int) -> None:
        _U64.pack_into(self.map, DIRTY_AT, value)

    def set_replaced(self) -> None:
        _U64.pack_into(self.map, REPLACED_AT, 1)

    def read_table(self) -> bytes:
        """The counters and every slot (from ``COUNTERS_AT``), read with
        ``pread``: pages read through the mapping would stay in this process."""
        return os.pread(self.fd, HEADER_SIZE - COUNTERS_AT + self.capacity * SLOT_SIZE, COUNTERS_AT)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # pragma: no cover - a view still open: the collector closes it
            pass
        fd, self.fd = self.fd, -1  # forgotten before it is closed: the number may be reused at once
        if fd >= 0:
            os.close(fd)


def file_ident(idx: Index) -> tuple[int, int]:
    """Which file ``idx`` maps: its device and inode (``OSError`` once closed)."""
    st = os.fstat(idx.fd)
    return st.st_dev, st.st_ino


def slots(snapshot: bytes) -> Iterator[tuple[int, int, int, int, int, float]]:
    """``(h1, h2, offset, length, state, expiry)`` of every slot in an :meth:`Index.snapshot`."""
    return SLOT.iter_unpack(snapshot)
