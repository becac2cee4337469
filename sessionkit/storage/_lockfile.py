"""A store's lock file: per-key byte-range locks shared by processes.

Used by the disk backends.  One byte per session key (chosen by a 62-bit
hash of the key, the same in every process) holds the key across processes
for the length of a session; bytes above ``SHARD_BASE`` guard short
operations on parts of the store.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
import time

from .._locks import KeyLocks, LockContext
from ..errors import LockTimeout, StorageError
from . import _records

SHARD_BASE = 1 << 62
_blake2b = hashlib.blake2b


class LockFile:
    """The store's lock file, opened once per process and directory.

    POSIX record locks belong to the process and are all dropped when *any*
    descriptor of the file is closed, so every storage object in a process
    over the same directory shares one descriptor, closed with the last.
    """

    _open: dict[str, LockFile] = {}
    _registry_mutex = threading.Lock()

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.users = 0

    @classmethod
    def get(cls, path: str) -> LockFile:
        with cls._registry_mutex:
            lockfile = cls._open.get(path)
            if lockfile is None:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                lockfile = cls._open[path] = cls(path, fd)
            lockfile.users += 1
            return lockfile

    def release(self) -> None:
        with self._registry_mutex:
            self.users -= 1
            if self.users == 0:
                del self._open[self.path]
                os.close(self.fd)

    def _try(self, offset: int, key: str) -> bool:
        """Take the byte without waiting; False if another process has it."""
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
            return True
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise StorageError(f"cannot lock {self.path}: {exc}", key=key, path=self.path) from exc

    def lock(self, offset: int, timeout: float | None, key: str) -> None:
        """Exclusive lock of one byte; ``LockTimeout`` after ``timeout`` s."""
        if self._try(offset, key):
            return
        if timeout is None:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, offset)  # sleeps in the kernel
                return
            except OSError as exc:
                if exc.errno == errno.EDEADLK:
                    raise LockTimeout(
                        f"session {key!r}: waiting would deadlock with another process "
                        "that holds it while waiting for a session this process holds",
                        key=key,
                    ) from exc
                raise StorageError(f"cannot lock {self.path}: {exc}", key=key, path=self.path) from exc
        deadline = time.monotonic() + timeout
        delay = 0.0001
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(f"could not lock session {key!r} within {timeout} s", key=key)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.01)
            if self._try(offset, key):
                return

    def unlock(self, offset: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, offset)


def key_offset(key: str) -> int:
    """The lock-file byte of ``key``: a 62-bit hash, the same in every process."""
    digest = _blake2b(_records.encode_key(key), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class ProcessKeyLocks(LockContext):
    """Per-key locks across threads and processes.

    The key's thread lock comes first (so threads of this process queue in
    memory, and re-entry is refused), then its byte in the lock file.
    """

    def __init__(self, lockfile: LockFile) -> None:
        self.lockfile = lockfile
        self.threads = KeyLocks()
        self.held: dict[str, int] = {}  # key -> its lock-file byte, while held

    def acquire(self, key: str, timeout: float | None = None) -> None:
        start = time.monotonic() if timeout is not None else 0.0
        self.threads.acquire(key, timeout)
        try:
            offset = key_offset(key)
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
            self.lockfile.lock(offset, left, key)
        except BaseException:
            self.threads.release(key)
            raise
        self.held[key] = offset

    def release(self, key: str) -> None:
        offset = self.held.pop(key)
        try:
            self.lockfile.unlock(offset)
        finally:
            self.threads.release(key)
