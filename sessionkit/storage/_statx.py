"""An open file's size and link count, read without asking for its timestamps.

A msgpack append checks, before it writes, that its log ends where its index
says and still has a name (see ``_shard.Shard.append``).  ``os.fstat``
answers both, but it also asks for the file's timestamps, and on Linux 6.13
and later a file whose timestamps were asked for stamps a fine-grained time
at its next write: a journal update on every append (about 2 µs each on an
ext4 machine, and a durable write's sync grows as slow as an append's).
``statx`` with only ``STATX_SIZE | STATX_NLINK`` asked for leaves the
timestamps alone.  Python has no ``os.statx`` before 3.15, so it is called
through ``ctypes``; where it is missing or refused (another libc, a seccomp
filter, an old kernel), ``os.fstat`` answers instead.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys
from typing import Any

__all__ = ["SizeAndLinks"]

_AT_EMPTY_PATH = 0x1000
_STATX_NLINK = 0x0004
_STATX_SIZE = 0x0200
_WANTED = _STATX_NLINK | _STATX_SIZE
# struct statx: stx_mask (u32) at 0, stx_nlink (u32) at 16, stx_size (u64) at 40.
_FIELDS = struct.Struct("=I12xI20xQ")
_BUFFER = 256  # sizeof(struct statx)
_UNUSABLE = (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP)

_statx: Any = None  # libc's statx, once looked up; False where there is none
_fstat = os.fstat


def _lookup() -> Any:
    global _statx
    if _statx is None:
        _statx = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).statx
            except (OSError, AttributeError):
                return _statx
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
            fn.restype = ctypes.c_int
            _statx = fn
    return _statx


class SizeAndLinks:
    """Reads an open file's ``(size, link count)``.  Keeps its own buffer:
    one instance per user that calls it from one thread at a time (a shard,
    inside its section)."""

    __slots__ = ("_buf", "_addr", "_call")

    def __init__(self) -> None:
        self._buf = ctypes.create_string_buffer(_BUFFER)
        self._addr = ctypes.addressof(self._buf)
        self._call = _lookup()

    def __call__(self, fd: int) -> tuple[int, int]:
        """``(size, link count)`` of the file open at ``fd``; ``OSError`` as ``os.fstat`` raises it."""
        call = self._call
        if call:
            if call(fd, b"", _AT_EMPTY_PATH, _WANTED, self._addr) == 0:
                mask, links, size = _FIELDS.unpack_from(self._buf)
                if mask & _WANTED == _WANTED:
                    return size, links
            else:
                err = ctypes.get_errno()
                if err not in _UNUSABLE:
                    raise OSError(err, os.strerror(err))
                self._call = False  # refused here: fstat from now on
        st = _fstat(fd)
        return st.st_size, st.st_nlink
