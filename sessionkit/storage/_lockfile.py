"""Locks shared by processes: the disk backends' cross-process half.

A store's locks are numbered *slots*: every session key has one (a 62-bit
hash of the key, the same in every process), and slots from ``SHARD_BASE - 1``
up guard short operations on parts of the store (its format file, its
shards, the whole shelf).  Two implementations, picked per process by
:func:`locking_method`:

``OfdLocks`` (Linux)
    One byte of the store's lock file per slot, locked with open file
    description locks (``F_OFD_SETLK``/``F_OFD_SETLKW``).  Unlike classic
    POSIX record locks they belong to the open file, not to the process, so
    closing another descriptor of the file (a second storage object, a
    backup tool copying the store) drops nothing, and the kernel's
    per-process deadlock detector does not see threads of one process as one
    owner.  A forked child reopens the file, so its locks are its own.  The
    store's directory is held with a shared ``flock`` for as long as the
    store is open, which tells age-based cleaners such as
    ``systemd-tmpfiles`` to leave it alone, and tells a process whether it
    is the store's only user.  The lock file is checked against its path
    after every lock: one that was deleted or replaced is a
    ``StorageError``, unless this process is the store's only user, which
    then moves to the new file.

``StripedLocks`` (everywhere else, and on request)
    ``filelock`` locks on a bounded set of files in ``<lock file>.d``: the
    session keys share 64 stripes, and each other slot has its own file.
    Within a process a stripe is shared by every thread that holds one of
    its keys, so a key held open still never delays a different key there;
    across processes, two keys of one stripe exclude each other.

Every process working on a store must use the same method, so the method
is a property of the store: the lock file records the one it was created
with, and every process follows that record (a store created with ``ofd``
cannot be opened where there are no OFD locks: a clear ``StorageError``).
``SESSIONKIT_LOCKING=filelock`` (or ``ofd``) picks the method for the stores
a process creates; the default is ``ofd`` wherever the platform has it.
A lock file from before methods were recorded counts as ``ofd``: its
classic POSIX record locks and OFD locks exclude each other on Linux.

Lock file layout: bytes 0-8 are the shelf's change counter and crash mark,
16-32 a magic string, 32 the method (``o`` or ``f``).  Locks on bytes do
not depend on what the bytes hold.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import sys
import threading
import time
from typing import Any, Callable

from .. import _fork
from ..errors import CorruptSessionError, LockTimeout, StorageError
from . import _records

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("sessionkit")

SHARD_BASE = 1 << 62
STRIPES = 64
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_monotonic = time.monotonic
# A shard's section lasts microseconds.  A process that finds one held by
# another process tries again for up to this long, yielding its CPU between
# tries, before it falls back to the sleeps of _wait_loop: those start at
# 100 µs, and two processes on random keys spent about 12% of their time
# asleep there, for sections released a few microseconds into each sleep.
SECTION_SPIN = 50e-6

# struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhqqi4x")
_fstat = os.fstat
_SEEK_SET = os.SEEK_SET
if fcntl is not None and sys.platform.startswith("linux") and struct.calcsize("P") == 8:
    _fcntl = fcntl.fcntl  # the names the hot paths use
    _F_WRLCK, _F_UNLCK = fcntl.F_WRLCK, fcntl.F_UNLCK
    _F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
    _F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)
    _HAVE_OFD = True
else:  # pragma: no cover - other platforms
    _HAVE_OFD = False
_BUSY = (errno.EACCES, errno.EAGAIN)


def locking_method() -> str:
    """``"ofd"`` or ``"filelock"``: how this process locks disk stores."""
    wanted = os.environ.get("SESSIONKIT_LOCKING", "").strip().lower()
    if wanted in ("", "auto"):
        return "ofd" if _HAVE_OFD else "filelock"
    if wanted == "filelock" or (wanted == "ofd" and _HAVE_OFD):
        return wanted
    if wanted == "ofd":
        raise StorageError("SESSIONKIT_LOCKING=ofd, but this platform has no open file description locks")
    raise StorageError(f"SESSIONKIT_LOCKING={wanted!r} is not one of auto, ofd, filelock")


def key_slot(key: str) -> int:
    """The lock slot of ``key``: a 62-bit hash, the same in every process."""
    return _records.key_info(key)[1] >> 2


_MAGIC = b"sessionkit-lock1"
_METHODS = {b"o": "ofd", b"f": "filelock"}


def open_lock_file(path: str, method: str | None = None) -> int:
    """Open a store's lock file, creating it (``0600``) with ``method``
    (default: this process's :func:`locking_method`)."""
    try:
        return os.open(path, os.O_RDWR | O_CLOEXEC)
    except FileNotFoundError:
        pass
    header = bytes(16) + _MAGIC + (method or locking_method())[0].encode("ascii")
    # Created whole under a temporary name and linked into place, so no
    # process ever reads a lock file without its method.
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_CLOEXEC, 0o600)
    try:
        os.write(fd, header)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process made it first: its method stands
    except OSError:  # a filesystem without hard links
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, header)
            finally:
                os.close(fd)
    finally:
        os.unlink(tmp)
    return os.open(path, os.O_RDWR | O_CLOEXEC)


def _method_of(fd: int, path: str = "") -> str:
    """The locking method the lock file open as ``fd`` records in its header.

    A lock file is made with its header whole (see :func:`open_lock_file`).
    One with nothing where the header goes (bytes 16 to 33 absent or zero;
    a shelf keeps a change counter before them and its dbm's records after)
    is from before the method was recorded: classic locks, so ``"ofd"``,
    unless the filelock method's folder of stripes is beside it (then it is
    a filelock store's lock file cut short).  Anything else was damaged: the
    method every process on the store must use is lost, and a guess could
    let this process lock another way than the others, which would then not
    exclude each other; ``CorruptSessionError``.
    """
    head = os.pread(fd, 33, 0) if hasattr(os, "pread") else os.read(fd, 33)
    if len(head) == 33 and head[16:32] == _MAGIC and head[32:33] in _METHODS:
        return _METHODS[head[32:33]]
    absent = not any(head[16:33])
    if absent and not (path and os.path.isdir(path + ".d")):
        return "ofd"  # made before the method was recorded
    raise CorruptSessionError(
        f"the lock file {path or 'of the store'} is damaged: its header, which records the locking method "
        f"every process on the store must use, is {'missing' if absent else 'not valid'} "
        f"({len(head)} bytes); once no process uses the store, delete the lock file and it is made anew",
        path=path or None,
    )


def _wait_loop(try_once: Callable[[], bool], timeout: float, key: str) -> None:
    """Retry ``try_once`` with a growing sleep until it succeeds or time runs out."""
    deadline = _monotonic() + timeout
    delay = 0.0001
    while True:
        left = deadline - _monotonic()
        if left <= 0:
            raise LockTimeout(f"could not lock session {key!r} within {timeout} s", key=key)
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.002)  # short: a lock freed for an instant is often retaken
        if try_once():
            return


def _spin(try_once: Callable[[], bool], seconds: float) -> bool:
    """Retry ``try_once`` for up to ``seconds``, yielding the CPU between tries; whether it succeeded."""
    end = _monotonic() + seconds
    while _monotonic() < end:
        os.sched_yield()
        if try_once():
            return True
    return False


def _still_at(path: str, ident: tuple[int, int]) -> bool:
    """Whether ``path`` still names the file of (device, inode) ``ident``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError(f"cannot check {path}: {exc}", path=path) from exc
    return (st.st_dev, st.st_ino) == ident


class _OfdFile:
    """One open lock file: its descriptor and the identity it had when opened."""

    __slots__ = ("path", "fd", "ident")

    def __init__(self, path: str, create: bool = True) -> None:
        self.path = path
        self.fd = open_lock_file(path, "ofd") if create else os.open(path, os.O_RDWR | O_CLOEXEC)
        try:
            if _method_of(self.fd, path) != "ofd":  # replaced by a file of another method
                raise StorageError(
                    f"{path} now records another locking method than the store was opened with; "
                    "every process on a store must lock it the same way",
                    path=path,
                )
            st = os.fstat(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self.ident = (st.st_dev, st.st_ino)

    def is_current(self) -> bool:
        """Whether the path still names this file (not deleted, not replaced)."""
        return _still_at(self.path, self.ident)

    def is_linked(self) -> bool:
        """Whether this file still has a name: a cheaper check than
        :meth:`is_current` (no path lookup) that a deletion or a replacement
        by rename fails, but a rename away from the path passes."""
        return os.fstat(self.fd).st_nlink > 0


class _DirectoryHolds:
    """One shared ``flock`` per store directory per process.

    Several stores in one directory share it, so a process never counts as
    another user of its own store when it asks whether it is the only one
    (see ``OfdLocks._sole_user``).  A forked child takes holds of its own.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._holds: dict[tuple[int, int], list[Any]] = {}  # identity -> [fd, users, path]
        _fork.register(self)

    def acquire(self, directory: str) -> tuple[int, int] | None:
        """Hold ``directory``; ``None`` where it cannot be held (then nothing is)."""
        try:
            fd = os.open(directory, os.O_RDONLY | O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino)
            with self._mutex:
                hold = self._holds.get(ident)
                if hold is not None:
                    hold[1] += 1
                    os.close(fd)
                    return ident
                fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a process replaces a lock file
                self._holds[ident] = [fd, 1, directory]
                return ident
        except OSError:
            os.close(fd)
            return None

    def fd(self, ident: tuple[int, int] | None) -> int:
        hold = None if ident is None else self._holds.get(ident)
        return -1 if hold is None else int(hold[0])

    def release(self, ident: tuple[int, int] | None) -> None:
        if ident is None:
            return
        with self._mutex:
            hold = self._holds.get(ident)
            if hold is None:
                return
            hold[1] -= 1
            if not hold[1]:
                del self._holds[ident]
                os.close(hold[0])

    def _fork_before(self) -> None:
        self._mutex.acquire()

    def _fork_after_parent(self) -> None:
        self._mutex.release()

    def _fork_after_child(self) -> None:
        # The parent's holds are shared with the child: take the child's own.
        # Closing a shared description's copy drops none of the parent's.
        for hold in self._holds.values():
            inherited = hold[0]
            try:
                fd = os.open(hold[2], os.O_RDONLY | O_CLOEXEC)
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                log.warning("sessionkit: cannot hold %s after fork", hold[2])
                continue
            hold[0] = fd
            os.close(inherited)
        self._mutex.release()


_DIRECTORIES = _DirectoryHolds() if _HAVE_OFD else None


class OfdLocks:
    """A store's slots as bytes of its lock file, under OFD locks (Linux)."""

    method = "ofd"

    def __init__(self, path: str, directory: str, existing: Callable[[], bool] = lambda: False) -> None:
        self.path = path
        self.directory = directory
        self._mutex = threading.Lock()  # guards replacing the file
        self._dir: tuple[int, int] | None = None
        self._retired: list[_OfdFile] = []  # replaced files, kept open until close
        self._hold_directory()  # first: a process replacing the lock file must see us
        try:
            try:
                self.file = _OfdFile(path, create=False)
            except FileNotFoundError:
                self.file = self._create(existing())
        except BaseException:
            _DIRECTORIES.release(self._dir)  # type: ignore[union-attr]
            raise

    def _create(self, store_exists: bool) -> _OfdFile:
        """Make the missing lock file.  A store with data may have processes
        that still lock a deleted one: only its only user may make a new one."""
        if not store_exists:
            return _OfdFile(self.path)
        return self._fresh_file_as_only_user(
            f"the lock file {self.path} is missing while other processes have the store open; "
            "they may still lock the deleted one, so this process does not start a new one "
            "(restart every process that uses the store)",
            "",
        )

    def _fresh_file_as_only_user(self, refusal: str, key: str) -> _OfdFile:
        """Open the lock file now at the path if no other process has the
        store open (``StorageError(refusal)`` otherwise)."""
        if self._dir_fd < 0 or not self._sole_user():
            raise StorageError(refusal, key=key or None, path=self.path)
        try:
            try:
                return _OfdFile(self.path)
            except OSError as exc:
                raise StorageError(f"cannot open {self.path}: {exc}", path=self.path) from exc
        finally:
            fcntl.flock(self._dir_fd, fcntl.LOCK_SH)

    @property
    def fd(self) -> int:
        """The lock file's descriptor (the shelf keeps a change counter in it)."""
        return self.file.fd

    @property
    def _dir_fd(self) -> int:
        """This process's shared hold on the store's directory, or -1."""
        return _DIRECTORIES.fd(self._dir)  # type: ignore[union-attr]

    def _hold_directory(self) -> None:
        self._dir = _DIRECTORIES.acquire(self.directory)  # type: ignore[union-attr]

    # -- one byte ------------------------------------------------------------

    def _set(self, fd: int, cmd: int, kind: int, slot: int, key: str) -> bool:
        try:
            fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, slot, 1, 0))
            return True
        except OSError as exc:
            if cmd == _F_OFD_SETLK and exc.errno in _BUSY:
                return False
            raise StorageError(f"cannot lock {self.path}: {exc}", key=key or None, path=self.path) from exc

    def lock(self, slot: int, timeout: float | None, key: str, quick: bool = False) -> _OfdFile:
        """Lock ``slot`` exclusively; returns the file to pass to :meth:`unlock`.

        ``quick``: for the microsecond sections of a store's parts: a slot
        found held is tried again for up to ``SECTION_SPIN`` seconds before
        the wait sleeps, and the lock file is checked with
        :meth:`_OfdFile.is_linked` only (every key lock checks the path as
        well).

        ``LockTimeout`` after ``timeout`` seconds (``None``: wait for ever).
        A lock file found deleted or replaced once its byte is locked is a
        ``StorageError``: processes still locking the old file would not
        exclude those that lock a new one, so this process stops using the
        store until it is the store's only user again (see :meth:`_replace`).
        """
        deadline = None if timeout is None else _monotonic() + timeout
        while True:
            f = self.file
            fd = f.fd
            if fd < 0:
                raise StorageError(f"{self.path} is closed", key=key or None, path=self.path)
            try:
                try:  # the first try inline (it is the hot path): _set's, without the call
                    _fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(_F_WRLCK, _SEEK_SET, slot, 1, 0))
                    free = True
                except OSError as exc:
                    if exc.errno not in _BUSY:
                        raise StorageError(f"cannot lock {self.path}: {exc}", key=key or None, path=self.path) from exc
                    free = False
                if not free:
                    again = lambda: self._set(fd, _F_OFD_SETLK, fcntl.F_WRLCK, slot, key)  # noqa: E731
                    if deadline is None:
                        self._set(fd, _F_OFD_SETLKW, fcntl.F_WRLCK, slot, key)  # sleeps in the kernel
                    elif not (quick and timeout and _spin(again, min(SECTION_SPIN, timeout))):
                        _wait_loop(again, max(0.0, deadline - _monotonic()), key)
                # f.is_linked() if quick else f.is_current(), inline:
                if _fstat(fd).st_nlink > 0 if quick else _still_at(f.path, f.ident):
                    return f
            except BaseException:
                # Also after an exception raised asynchronously just as the
                # lock was granted: unlocking a byte not held is harmless.
                self.unlock(f, slot)
                raise
            self.unlock(f, slot)
            self._replace(f, key)

    def unlock(self, f: Any, slot: int) -> None:
        fd = f.fd
        if fd >= 0:
            try:
                _fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(_F_UNLCK, _SEEK_SET, slot, 1, 0))
            except OSError:
                if f.fd >= 0:
                    raise
                # Closed by another thread meanwhile (close()): its locks went with it.

    def is_current(self, f: Any) -> bool:
        """Whether locks taken through ``f`` still exclude the other processes."""
        return f is self.file

    def _replace(self, stale: _OfdFile, key: str) -> None:
        """The lock file at the path is not ours any more: take the new one
        only if no other process has the store open, else refuse."""
        with self._mutex:
            if self.file is not stale:
                return  # another thread did it
            fresh = self._fresh_file_as_only_user(
                f"the lock file {self.path} was deleted or replaced while this process used the "
                "store, and other processes have it open: they may still lock the old file, so "
                "this process refuses to read or write the store until it is the only one "
                "(restart every process that uses it)",
                key,
            )
            log.debug("sessionkit: lock file %s was deleted or replaced; no other process "
                      "uses the store, so this one moves to the file at that path", self.path)
            self._retired.append(stale)  # keys held through it are released through it
            self.file = fresh

    def _sole_user(self) -> bool:
        """Whether this process alone holds the store's directory (then it holds it exclusively)."""
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            # A failed conversion may have dropped the shared hold: take it again.
            fcntl.flock(self._dir_fd, fcntl.LOCK_SH)
            return False

    # -- fork and close --------------------------------------------------------

    def after_fork_in_child(self) -> None:
        """Give the child its own open file: the parent's locks stay the parent's."""
        self._mutex = threading.Lock()
        if self.file.fd < 0:
            return  # closed
        inherited = [self.file, *self._retired]
        self._retired = []
        try:
            self.file = _OfdFile(self.path)
        except OSError:
            # Keep the inherited file so the error surfaces on use, not in fork().
            log.warning("sessionkit: cannot reopen %s after fork", self.path)
            return
        # Closing a shared description's copy drops none of the parent's locks.
        for f in inherited:
            os.close(f.fd)

    def close(self) -> None:
        for f in [self.file, *self._retired]:
            if f.fd >= 0:
                fd, f.fd = f.fd, -1  # marked closed first: a thread that finds it closed takes it so
                os.close(fd)
        self._retired = []
        _DIRECTORIES.release(self._dir)  # type: ignore[union-attr]
        self._dir = None


_filelock_imported = False


def _import_filelock() -> None:
    """Import filelock, then put our fork hooks after its (see _fork.install)."""
    global _filelock_imported
    if not _filelock_imported:
        import filelock  # noqa: F401

        _filelock_imported = True
        _fork.install()


class _Stripe:
    __slots__ = ("lock", "count", "taking")

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.count = 0  # threads of this process that hold a slot of this stripe
        self.taking = False  # a thread is acquiring the file lock


class StripedLocks:
    """A store's slots as ``filelock`` locks on a bounded set of files."""

    method = "filelock"

    def __init__(self, path: str, directory: str) -> None:
        _import_filelock()
        import filelock

        self._filelock = filelock
        self.path = path
        self.directory = path + ".d"
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            self._fd = open_lock_file(path)
            st = os.fstat(self._fd)
            self._ident = (st.st_dev, st.st_ino)
        except OSError as exc:
            raise StorageError(f"cannot open {path}: {exc}", path=path) from exc
        self._cond = threading.Condition(threading.Lock())
        self._stripes: dict[int, _Stripe] = {}
        self._inherited: list[Any] = []  # a parent's lock objects, never released here
        self.file = self  # what lock() returns; never replaced

    @property
    def fd(self) -> int:
        return self._fd

    def _name(self, slot: int) -> int:
        return slot % STRIPES if slot < SHARD_BASE - 1 else STRIPES + slot - (SHARD_BASE - 1)

    def _stripe(self, n: int) -> _Stripe:
        stripe = self._stripes.get(n)
        if stripe is None:
            name = f"key-{n:02d}.lock" if n < STRIPES else f"slot-{n - STRIPES}.lock"
            lock = self._filelock.FileLock(os.path.join(self.directory, name), mode=0o600, thread_local=False)
            stripe = self._stripes[n] = _Stripe(lock)
        return stripe

    def lock(
        self, slot: int, timeout: float | None, key: str, quick: bool = False
    ) -> StripedLocks:
        self._check_identity(key)
        n = self._name(slot)
        deadline = None if timeout is None else _monotonic() + timeout
        with self._cond:
            stripe = self._stripe(n)
            while True:
                if stripe.count:
                    stripe.count += 1  # this process holds the stripe already
                    return self
                if not stripe.taking:
                    stripe.taking = True
                    break
                left = None if deadline is None else deadline - _monotonic()
                if left is not None and left <= 0:
                    raise LockTimeout(f"could not lock session {key!r} within {timeout} s", key=key)
                self._cond.wait(left)
        ok = False
        try:
            left = -1.0 if deadline is None else max(0.0, deadline - _monotonic())
            try:
                stripe.lock.acquire(timeout=left, poll_interval=0.002)
            except self._filelock.Timeout:
                raise LockTimeout(f"could not lock session {key!r} within {timeout} s", key=key) from None
            except OSError as exc:
                raise StorageError(f"cannot lock {self.directory}: {exc}", key=key or None, path=self.directory) from exc
            ok = True
        finally:
            with self._cond:
                stripe.taking = False
                if ok:
                    stripe.count = 1
                self._cond.notify_all()
        return self

    def _check_identity(self, key: str) -> None:
        """The main file holds the shelf's change counter: refuse if it was replaced."""
        if not _still_at(self.path, self._ident):
            raise StorageError(
                f"the lock file {self.path} was deleted or replaced while this process used the "
                "store; this process refuses to read or write it (restart every process that uses it)",
                key=key or None,
                path=self.path,
            )

    def unlock(self, f: Any, slot: int) -> None:
        with self._cond:
            stripe = self._stripes.get(self._name(slot))
            if stripe is None or not stripe.count:
                return  # taken before a fork, by the parent
            stripe.count -= 1
            if not stripe.count:
                stripe.lock.release()

    def is_current(self, f: Any) -> bool:
        return True

    def after_fork_in_child(self) -> None:
        """The parent's lock objects share its open files: never release them here."""
        self._inherited.extend(s.lock for s in self._stripes.values())
        self._stripes = {}
        self._cond = threading.Condition(threading.Lock())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def make_locks(
    path: str, directory: str, existing: Callable[[], bool] = lambda: False
) -> OfdLocks | StripedLocks:
    """The store's cross-process locks, by the method its lock file records
    (a new lock file: this process's :func:`locking_method`).  ``existing()``
    says whether the store holds data (then a missing lock file was deleted)."""
    try:
        fd = os.open(path, os.O_RDWR | O_CLOEXEC)
    except FileNotFoundError:
        method = locking_method()
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc}", path=path) from exc
    else:
        try:
            method = _method_of(fd, path)
        finally:
            os.close(fd)
    if method == "ofd":
        if not _HAVE_OFD:
            raise StorageError(
                f"{path} was created with open file description locks (Linux), which this "
                "platform lacks; every process on a store must lock it the same way",
                path=path,
            )
        try:
            return OfdLocks(path, directory, existing)
        except OSError as exc:
            raise StorageError(f"cannot open {path}: {exc}", path=path) from exc
    return StripedLocks(path, directory)
