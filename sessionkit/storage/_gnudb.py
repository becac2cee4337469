"""dbm.gnu after a crash: find the damage gdbm does not report, and recover or refuse.

A process killed inside a gdbm store can leave the file so that Python's
``_gdbm`` reads *every* key as missing (gdbm flags the handle "needs
recovery", but a fetch reports that as a plain miss), can tear the value it
was writing (gdbm rewrites a value of the same size in place), and can leave
the free list overlapping live data, which a later store then overwrites.
``reorganize()`` refuses a flagged handle; gdbm's own recovery, run as is,
drops whole buckets whose blocks lie past the stale end-of-data pointer in
the header.

So the shelf brackets every store with a mark in its lock file and, before
the store, records there the key count and which key is being written and
how (:data:`RECORD`).  After a crash (the mark is set) or when the header
shows gdbm's own "needs recovery" condition, :func:`recover` runs under the
shelf's lock:

1. the file is copied aside (``<path>.crashed``);
2. a header whose end-of-data pointer falls short of the file's size is
   brought up to it (only the standard 64-bit format is touched), so the
   blocks the killed store wrote count as allocated;
3. ``reorganize()`` rebuilds the file from every reachable key (a new free
   list, so no hidden overlap survives);
4. every value is checked: each framed value's checksum, and the key count
   against the record, allowing only the in-flight key to have landed or not.
   gdbm writes a value of the same size over the old one in place, and a
   smaller one can land in the blocks the old one just freed, so the
   in-flight key's value may be torn: before each replacing store the old
   value is saved in the lock file (:data:`UNDO_AT`), and a torn value is put
   back from there (a torn new key, never acknowledged, is deleted).

If all holds, the copy is removed and the shelf goes on.  Otherwise the
shelf refuses to open with ``CorruptSessionError`` naming the copy, until
``ShelveStorage.clear_crash_mark()``.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import zlib
from typing import Any, Callable

from ..errors import CorruptSessionError, StorageError

__all__ = ["RECORD", "RECORD_AT", "Record", "load_undo", "needs_recovery", "recover", "save_undo"]

# In the lock file at RECORD_AT (the whole layout is in shelf.py): key count,
# crc32 of the key being written, the operation (below), and VALID once the
# count is known.
RECORD = struct.Struct("<QIBB")
RECORD_AT = 40
VALID = 0xA5
NONE, REPLACE, INSERT, DELETE = 0, 1, 2, 3
# In the lock file from UNDO_AT: the key and the old value of the store in
# flight when it replaces one (lengths first), written before the record
UNDO_AT = 4096
_UNDO = struct.Struct("<QQ")

_NOT_DAMAGE = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.EMFILE}
_MAGIC64 = 0x13579ACF  # gdbm's standard format on 64-bit hosts
# magic, block_size, dir, dir_size, dir_bits, bucket_size, bucket_elems, next_block
_HEADER = struct.Struct("<IiqiiiiQ")


class Record:
    """The lock file's note of the key count and the write in flight."""

    __slots__ = ("count", "crc", "op", "valid")

    def __init__(self, raw: bytes) -> None:
        if len(raw) == RECORD.size:
            self.count, self.crc, self.op, valid = RECORD.unpack(raw)
            self.valid = valid == VALID
        else:
            self.count, self.crc, self.op, self.valid = 0, 0, NONE, False


def key_crc(kb: bytes) -> int:
    return zlib.crc32(kb)


def save_undo(fd: int, kb: bytes, old: bytes) -> None:
    """Keep the value a store is about to replace, for :func:`recover` (``fd``: the lock file)."""
    os.pwrite(fd, _UNDO.pack(len(kb), len(old)) + kb + old, UNDO_AT)


def load_undo(fd: int) -> tuple[bytes, bytes] | None:
    """The key and old value saved by the last :func:`save_undo`, if any is whole."""
    head = os.pread(fd, _UNDO.size, UNDO_AT)
    if len(head) != _UNDO.size:
        return None
    klen, vlen = _UNDO.unpack(head)
    body = os.pread(fd, klen + vlen, UNDO_AT + _UNDO.size) if klen + vlen < 1 << 40 else b""
    if len(body) != klen + vlen:
        return None
    return body[:klen], body[klen:]


def _header(path: str) -> tuple[tuple[Any, ...], int] | None:
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size)
        size = os.fstat(f.fileno()).st_size
    if len(raw) < _HEADER.size:
        return None
    return _HEADER.unpack(raw), size


def needs_recovery(path: str) -> bool:
    """gdbm's own test at open: the end-of-data pointer falls short of the file's size."""
    try:
        found = _header(path)
    except FileNotFoundError:
        return False
    if found is None:
        return False
    header, size = found
    return bool(header[0] == _MAGIC64 and header[7] < size)


def _refuse(path: str, why: str, copy: str | None) -> CorruptSessionError:
    kept = f"; the file as the crash left it is {copy}" if copy else ""
    return CorruptSessionError(
        f"{path} (dbm.gnu) was damaged by a process that died while writing it, and it could not be "
        f"recovered without loss: {why}{kept}.  It is not read: restore it from a backup (or run "
        f"`gdbmtool {path} recover` and check it), then call ShelveStorage.clear_crash_mark({path!r})",
        path=path,
    )


def recover(
    path: str,
    module: Any,
    record: Record,
    check: Callable[[bytes], bool],
    undo: tuple[bytes, bytes] | None = None,
) -> int:
    """Bring the gdbm file at ``path`` back after a crash; returns the key count.

    ``check(stored)`` says whether a stored value is whole; ``undo`` is what
    :func:`load_undo` found (the in-flight key's old value).  Raises
    ``CorruptSessionError`` (refuse: the copy is kept) or ``StorageError``
    (the disk would not let it work; nothing was lost, try again later).
    """
    copy = path + ".crashed"
    try:
        shutil.copyfile(path, copy)
        os.chmod(copy, 0o600)
    except FileNotFoundError:
        return 0  # no file: nothing to recover
    except OSError as exc:
        _remove(copy)
        raise StorageError(f"cannot copy {path} aside to recover it after a crash: {exc}", path=path) from exc
    try:
        found = _header(path)
        if found is None or found[0][0] != _MAGIC64:
            raise _refuse(path, "its header is not gdbm's standard 64-bit format", copy)
        header, size = found
        if header[7] < size:
            with open(path, "r+b") as f:
                f.seek(32)
                f.write(struct.pack("<Q", size))
        flags = "w" + ("u" if "u" in module.open_flags else "")
        db = module.open(path, flags, 0o600)
        directory, name = os.path.split(path)
        before = set(os.listdir(directory))
        try:
            try:
                db.reorganize()
            except BaseException:
                # gdbm's reorganize leaves its half-built copy (<name>.XXXXXX) behind
                for leftover in set(os.listdir(directory)) - before:
                    if _is_gdbm_temporary(name, leftover):
                        _remove(os.path.join(directory, leftover))
                raise
            keys = db.keys()
            if len(db) != len(keys):
                raise _refuse(path, f"it counts {len(db)} keys but lists {len(keys)}", copy)
            torn = [kb for kb in keys if not check(db[kb])]
            if record.valid:
                torn = _repair(db, torn, record, undo, check)
                keys = db.keys()
        finally:
            db.close()
    except CorruptSessionError:
        raise
    except (OSError, module.error) as exc:
        if getattr(exc, "errno", None) in _NOT_DAMAGE:  # a full disk, no permission: try again later
            _remove(copy)
            raise StorageError(f"cannot recover {path} after a crash yet: {exc}", path=path) from exc
        raise _refuse(path, str(exc), copy) from exc
    if not record.valid:
        raise _refuse(path, "the lock file holds no key count to check it against", copy)
    # only the key being written may have landed or not; no other key may differ
    n, count = len(keys), record.count
    in_flight = record.crc in {key_crc(kb) for kb in keys}
    if record.op == INSERT:
        whole = (n == count and not in_flight) or (n == count + 1 and in_flight)
    elif record.op == DELETE:
        whole = (n == count and in_flight) or (n == count - 1 and not in_flight)
    elif record.op == REPLACE:
        whole = n == count and in_flight
    else:
        whole = n == count
    if not whole:
        raise _refuse(path, f"{n} keys survived where {count} were expected", copy)
    if torn:
        raise _refuse(path, f"{len(torn)} stored value(s) fail their checksum", copy)
    _remove(copy)
    return len(keys)


def _repair(
    db: Any,
    torn: list[bytes],
    record: Record,
    undo: tuple[bytes, bytes] | None,
    check: Callable[[bytes], bool],
) -> list[bytes]:
    """Undo the in-flight store if it tore its key's value; returns the values still torn."""
    left = []
    for kb in torn:
        if key_crc(kb) == record.crc and record.op == REPLACE and undo and undo[0] == kb and check(undo[1]):
            db[kb] = undo[1]  # the acknowledged value, as it was before the store
        elif key_crc(kb) == record.crc and record.op == INSERT:
            del db[kb]  # a new key whose first value never landed whole
        else:
            left.append(kb)
    return left


def _is_gdbm_temporary(name: str, found: str) -> bool:
    """gdbm's reorganize builds its copy in ``<name>.XXXXXX`` (mkstemp's pattern)."""
    suffix = found[len(name) + 1 :]
    return found.startswith(name + ".") and len(suffix) == 6 and suffix.isalnum()


def _remove(name: str) -> None:
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass
