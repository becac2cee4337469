"""The record format of the msgpack log files, and the parser that reads it.

A log file starts with an 8-byte magic and then holds records, appended one
``pwrite`` each::

    body_crc u32 | key_len u32 | value_len u32 | flags u8 | expiry f64 | header_crc u32
    key (UTF-8, surrogates passed through) | value (msgpack)

``header_crc`` covers the 21 bytes before it and ``body_crc`` the key and
value, so the parser can tell a record cut short by a crash (at the tail:
dropped, it was never acknowledged) from bytes damaged later (reported as
corrupt, never served and never dropped).
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from typing import Any, Callable, NamedTuple

MAGIC = b"SKLOG\x001\n"
HEADER = struct.Struct("<IIIBdI")
HEADER_SIZE = HEADER.size  # 25
_PREFIX = struct.Struct("<IIIBd")  # the header fields that header_crc covers
FLAG_DELETE = 1
# Appended by a durable store (fsynced before it was acknowledged): a whole
# record of this kind with a bad checksum is damage, never a crashed append.
FLAG_DURABLE = 2

_crc32 = zlib.crc32


def encode_key(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


_blake2b = hashlib.blake2b
_KEYS: dict[str, tuple[bytes, int, int, int]] = {}
_KEYS_MAX = 1 << 14


def key_hash(raw: bytes) -> tuple[int, int]:
    """The two halves of an encoded key's 128-bit hash (see :func:`key_info`)."""
    digest = _blake2b(raw, digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def key_info(key: str) -> tuple[bytes, int, int, int]:
    """``(encoded, h1, h2, crc)`` of a session key: its UTF-8 bytes, a 128-bit
    hash in two halves (the shared index's key, and ``h1 >> 2`` its lock
    slot), and the CRC-32 that picks its shard.  Kept for recent keys, so a
    read-modify-write encodes and hashes its key once."""
    info = _KEYS.get(key)
    if info is None:
        raw = key.encode("utf-8", "surrogatepass")
        digest = _blake2b(raw, digest_size=16).digest()
        info = (raw, int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little"), _crc32(raw))
        if len(_KEYS) >= _KEYS_MAX:
            _KEYS.clear()
        _KEYS[key] = info
    return info


def decode_key(raw: bytes) -> str:
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:  # only in damaged records
        return raw.decode("utf-8", "surrogateescape")


def build(key: bytes, value: bytes, flags: int = 0, expiry: float = 0.0) -> bytes:
    """One whole record, ready to append."""
    body = key + value
    prefix = _PREFIX.pack(_crc32(body), len(key), len(value), flags, expiry)
    return prefix + _crc32(prefix).to_bytes(4, "little") + body


class Record(NamedTuple):
    offset: int
    length: int
    key: str
    flags: int
    expiry: float
    ok: bool  # False: the body failed its checksum (corrupt, kept in place)


class Damage(Exception):
    """The log cannot be parsed past ``offset`` (a damaged header)."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


def parse(
    data: bytes, base: int, at_eof: bool = True, vouched: int = 0, pace: Callable[[], None] | None = None
) -> tuple[list[Record], int]:
    """Parse the records in ``data`` (which starts at file offset ``base``).

    Returns the records and the file offset where parsing stopped.  With
    ``at_eof`` (``data`` runs to the end of the file) a record cut short at
    the end is a crashed append and the valid log ends before it, and so is
    a whole last record whose body fails its checksum, unless a durable
    store wrote it (``FLAG_DURABLE``) or it ends by byte ``vouched`` (an
    index that can be believed says the log was whole that far): then it is
    damage, kept.  Otherwise parsing just stops there and the caller reads
    on.  A damaged header that is not at the end raises ``Damage``.
    ``pace`` is called after each record (a background merge pauses there).
    """
    records = []
    pos = 0
    size = len(data)
    unpack = HEADER.unpack_from
    while pos < size:
        if size - pos < HEADER_SIZE:
            break  # a header cut short: a crashed append
        body_crc, klen, vlen, flags, expiry, header_crc = unpack(data, pos)
        if _crc32(data[pos : pos + HEADER_SIZE - 4]) != header_crc:
            if not data[pos:].strip(b"\0"):
                break  # zeros after a crash: the append never landed (or read on)
            raise Damage(base + pos)
        end = pos + HEADER_SIZE + klen + vlen
        if end > size:
            break  # the body was cut short: a crashed append
        body = data[pos + HEADER_SIZE : end]
        ok = _crc32(body) == body_crc
        if not ok and end == size and at_eof and not flags & FLAG_DURABLE and base + end > vouched:
            break  # last record damaged: treat as a crashed append
        records.append(Record(base + pos, end - pos, decode_key(body[:klen]), flags, expiry, ok))
        pos = end
        if pace is not None:
            pace()
    return records, base + pos


def record_size(data: bytes) -> int:
    """The whole size of the record that ``data`` starts with, once its header is there and sound (else 0)."""
    if len(data) < HEADER_SIZE:
        return 0
    _body_crc, klen, vlen, _flags, _expiry, header_crc = HEADER.unpack_from(data, 0)
    if _crc32(data[: HEADER_SIZE - 4]) != header_crc:
        return 0
    return HEADER_SIZE + klen + vlen


def read_log(
    fd: int, start: int, size: int, chunk: int, apply: Callable[[Record], Any], vouched: int = 0
) -> int:
    """Parse the log open at ``fd`` from ``start`` to ``size``, a chunk at a time,
    calling ``apply`` on each record in order; returns where the valid log ends
    (before a crashed append).  Raises ``Damage`` as :func:`parse` does
    (``vouched``: as there).

    A record longer than a chunk is read whole at once, not grown chunk by
    chunk (that would be quadratic in its size).
    """
    pos = start
    pending = b""
    while True:
        want = min(chunk, size - pos - len(pending))
        data = pending + (os.pread(fd, want, pos + len(pending)) if want > 0 else b"")
        at_eof = pos + len(data) >= size
        records, stop = parse(data, pos, at_eof, vouched)
        for record in records:
            apply(record)
        if at_eof:
            return stop
        pending = data[stop - pos :]
        pos = stop
        need = record_size(pending)
        if need > len(pending) + chunk:
            pending += os.pread(fd, min(need, size - pos) - len(pending), pos + len(pending))


def value_of(record: bytes, key: bytes | None = None) -> bytes | None:
    """The value bytes of a whole record read back from disk, or None if it is
    damaged (or, given ``key``, is not a record of that key)."""
    if len(record) < HEADER_SIZE:
        return None
    body_crc, klen, vlen, _flags, _expiry, header_crc = HEADER.unpack_from(record, 0)
    if _crc32(record[: HEADER_SIZE - 4]) != header_crc or len(record) != HEADER_SIZE + klen + vlen:
        return None
    body = record[HEADER_SIZE:]
    if _crc32(body) != body_crc:
        return None
    if key is not None and body[:klen] != key:
        return None
    return body[klen:]
