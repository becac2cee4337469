"""dbm.dumb's two files, written so that no failure or crash loses a value.

The files are the ones Python's ``dbm.dumb`` reads: ``<path>.dat`` holds the
values, ``<path>.dir`` holds one line per value, ``'key', (offset, size)``,
and the last line for a key wins.  ``dbm.dumb`` itself rewrites a value in
place when it fits, and rewrites the whole index with one unchecked write on a
delete; either can lose sessions on a crash or a full disk.  This module
writes differently:

* **append only**: a new value goes after the end of ``.dat``, then its index
  line after the end of ``.dir``; a delete appends the line
  ``'key', (0, 0)`` (no value is ever empty: see ``ShelveStorage``).  Until the
  index line is whole on disk, the old value is the live one; a write that
  fails is cut off again and the caller gets the error;
* **incremental**: a process that learns another one wrote (the shelf's change
  counter) reads only the index lines appended since it last looked, and
  reads everything again only after a compaction (the shelf's compaction
  counter);
* **compaction**: when dead bytes outweigh live ones, the live values are
  copied to ``.dat.compact`` and indexed in ``.dir.compact``, both fsynced;
  renaming the index to ``.dir.committed`` commits; then both are renamed
  into place.  ``recover_compaction()`` finishes or undoes one that a crash
  interrupted (the shelf knows one was under way from a mark in its lock
  file).

The caller holds the shelf's lock around every call; nothing here locks.
"""

from __future__ import annotations

import ast
import errno
import os
from typing import Callable

from ..errors import CorruptSessionError, StorageError
from ._shard import fsync_dir, write_all

__all__ = ["DumbDb", "recover_compaction"]

_DELETED = (0, 0)
# errors that mean "not allowed here" (a file can still be opened to read)
ACCESS_ERRNOS = frozenset((errno.EACCES, errno.EPERM, errno.EROFS))
_LIMIT = 1 << 62  # no offset or size in a sound index comes near this
_MIN_DEAD_BYTES = 64 * 1024
_MIN_DEAD_LINES = 1000
_COPY_CHUNK = 1 << 20


def _truncate(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass  # best effort: what lies past the index's end is never read


def index_line(kb: bytes, where: tuple[int, int]) -> bytes:
    """One ``.dir`` line in dbm.dumb's format."""
    return ("%r, %r\n" % (kb.decode("latin-1"), where)).encode("latin-1")


def _parse_key(head: str) -> str:
    if len(head) >= 2 and head[0] == head[-1] == "'" and "\\" not in head and "'" not in head[1:-1]:
        return head[1:-1]
    key = ast.literal_eval(head)
    if not isinstance(key, str):
        raise ValueError(f"not a key: {head[:40]!r}")
    return key


def recover_compaction(path: str) -> None:
    """Finish (after its commit) or undo (before it) a compaction cut short by a crash."""
    committed = path + ".dir.committed"
    try:
        if os.path.exists(committed):
            if os.path.exists(path + ".dat.compact"):
                os.replace(path + ".dat.compact", path + ".dat")
            os.replace(committed, path + ".dir")
        else:
            for leftover in (path + ".dat.compact", path + ".dir.compact"):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass
        fsync_dir(os.path.dirname(path))
    except OSError as exc:
        raise StorageError(
            f"cannot finish the compaction of {path} that a crash interrupted: {exc}", path=path
        ) from exc


class DumbDb:
    """A dbm.dumb database kept open, read incrementally and written append-only.

    Keys and values are bytes.  The mapping methods are the ones a shelf
    uses: ``get``, ``in``, ``keys()``, ``[k] = v``, ``del [k]``.
    """

    def __init__(self, path: str, written: Callable[[], tuple[int, int]] | None = None) -> None:
        """Open the files at ``path`` (+ ``.dat``, ``.dir``).  ``written``: what
        the shelf recorded of the ``.dir`` (``(bytes, inode)``, see
        :meth:`dir_written`); a ``.dir`` shorter than that was cut short."""
        self.path = path
        self._written = written
        self.dirpath = path + ".dir"
        self.datpath = path + ".dat"
        self._dir_fd = self._dat_fd = -1
        self.compact_after = 0  # dead bytes that trigger the next compaction (0: the default rule)
        self.committed = False  # the last compaction got as far as its commit
        self._start()

    def _start(self) -> None:
        """Open both files and read the whole index (finishing a compaction a crash cut short)."""
        if os.path.exists(self.path + ".dir.committed") or os.path.exists(self.path + ".dat.compact"):
            recover_compaction(self.path)
        self._index: dict[bytes, tuple[int, int]] = {}
        self._live = 0  # bytes of live values in .dat
        self._lines = 0  # lines in .dir
        self._dir_end = 0  # bytes of .dir read (whole lines)
        self._dat_size = 0  # .dat's size as last seen: where the next value goes
        self._inos = (0, 0)  # the inodes of .dir and .dat this process has open
        self.writable = True
        self.created = False  # this open made a new .dir: nothing recorded of an earlier one applies
        self._open_files()
        try:
            self._check_length()
            self._load()
        except BaseException:
            self.close()
            raise

    def _check_length(self) -> None:
        """Refuse a ``.dir`` shorter than it had grown: its lost lines are lost sessions."""
        if self._written is None or self.created:
            return
        length, ino = self._written()
        if not length or ino != self._inos[0]:
            return  # nothing recorded, or for another file (a compaction renamed a new one in)
        size = os.fstat(self._dir_fd).st_size
        if size < length:
            raise CorruptSessionError(
                f"{self.dirpath} is {size:,} bytes, but {length:,} bytes of it were written: it was cut "
                "short (or an older copy was put in its place), and the sessions its lost lines indexed "
                "would read as absent; nothing was changed: restore the shelf from a backup, or call "
                "ShelveStorage.clear_crash_mark(path) to take the files as they are",
                path=self.dirpath,
            )

    def dir_written(self) -> tuple[int, int]:
        """``(bytes, inode)`` of the ``.dir`` as this process last wrote or read it whole."""
        return self._dir_end, self._inos[0]

    # -- files -----------------------------------------------------------------------

    def _open(self, name: str) -> int:
        flags = os.O_CLOEXEC | getattr(os, "O_BINARY", 0)
        try:
            try:
                fd = os.open(name, flags | os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                fd = os.open(name, flags | os.O_RDWR | os.O_CREAT, 0o600)
            else:
                if name == self.dirpath:
                    self.created = True
        except OSError as exc:
            if exc.errno not in ACCESS_ERRNOS or not os.path.exists(name):
                raise
            fd = os.open(name, flags | os.O_RDONLY)  # read-only files: reads still work
            self.writable = False
        return fd

    def _open_files(self) -> None:
        try:
            data_only = os.path.exists(self.datpath) and os.path.getsize(self.datpath) > 0
            if data_only and not os.path.exists(self.dirpath):
                bak = self.path + ".bak"
                hint = f": copy {bak} to {self.dirpath}" if os.path.exists(bak) else ""
                raise CorruptSessionError(
                    f"{self.dirpath} is missing but {self.datpath} holds data; nothing was changed{hint}",
                    path=self.dirpath,
                )
            self._dat_fd = self._open(self.datpath)
            self._dir_fd = self._open(self.dirpath)
            dat = os.fstat(self._dat_fd)
            self._inos = (os.fstat(self._dir_fd).st_ino, dat.st_ino)
            self._dat_size = dat.st_size
        except OSError as exc:
            self.close()
            raise StorageError(f"cannot open {self.path} (dbm.dumb): {exc}", path=self.path) from exc

    def close(self) -> None:
        """Close both files."""
        for fd in (self._dir_fd, self._dat_fd):
            if fd >= 0:
                os.close(fd)
        self._dir_fd = self._dat_fd = -1

    # -- the index -------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the index lines other processes appended since this process last looked.

        Files replaced at the path (a compaction this process was not told
        of, a backup put back) are read anew instead, and so is everything
        after a reload that failed (files refused as cut short).
        """
        if self._dir_fd < 0:
            self._start()
            return
        try:
            replaced = self._replaced(*self._at_path())
        except OSError:
            replaced = False  # gone: the next write says so (check_files)
        if replaced:
            self.reload()
            return
        if not self._load():
            try:
                shrunk = os.fstat(self._dir_fd).st_size < self._dir_end
            except OSError as exc:
                raise StorageError(f"cannot read {self.dirpath}: {exc}", path=self.dirpath) from exc
            if shrunk:  # an older copy was put in its place: read it all
                self.reload()

    def _at_path(self) -> tuple[os.stat_result, os.stat_result]:
        """What is at the paths of ``.dir`` and ``.dat`` now."""
        return os.stat(self.dirpath), os.stat(self.datpath)

    def _replaced(self, d: os.stat_result, t: os.stat_result) -> bool:
        """Whether the files at the paths are not the ones open here, or ``.dir`` shrank."""
        return (d.st_ino, t.st_ino) != self._inos or d.st_size < self._dir_end

    def check_files(self) -> None:
        """Before a write: make sure the files at the path are the ones open here.

        A write into a file that was deleted or replaced under this process
        (a backup restored, the directory cleaned) would be acknowledged and
        lost; a replaced file is read anew instead, a missing one is an error.
        """
        if self._dir_fd < 0:  # a reload failed: open and read everything again
            self._start()
        try:
            d, t = self._at_path()
        except FileNotFoundError as exc:
            raise StorageError(
                f"{exc.filename} was deleted while this process had the shelf open; nothing was written",
                path=self.path,
            ) from exc
        except OSError as exc:
            raise StorageError(f"cannot write to {self.path}: {exc}", path=self.path) from exc
        if self._replaced(d, t):
            self.reload()
        else:
            self._dat_size = t.st_size

    def reload(self) -> None:
        """Open both files again and read the whole index (after another process compacted them)."""
        self.close()
        self._start()

    def _load(self) -> bool:
        """Read the index from where this process stopped to the end of the file; False if nothing was new."""
        start = self._dir_end
        try:
            chunks = []
            at = start
            want = 1 << 16
            while True:
                chunk = os.pread(self._dir_fd, want, at)
                chunks.append(chunk)
                at += len(chunk)
                if len(chunk) < want:
                    break  # the end of the file
                want = 1 << 22
        except OSError as exc:
            raise StorageError(f"cannot read {self.dirpath}: {exc}", path=self.dirpath) from exc
        data = b"".join(chunks)
        whole = data.rfind(b"\n") + 1
        if whole < len(data):
            # A crash while appending a line (we hold the shelf's lock, so no
            # writer is at work): that write was never acknowledged.
            if self.writable:
                _truncate(self._dir_fd, start + whole)
            data = data[:whole]
        if not data:
            return False
        index = self._index
        live = self._live
        number = self._lines
        for line in data.decode("latin-1").splitlines():
            number += 1
            try:
                head, sep, tail = line.rpartition(", (")
                if not sep or not tail.endswith(")"):
                    raise ValueError("not a 'key', (offset, size) line")
                pos_text, _, siz_text = tail[:-1].partition(", ")
                where = (int(pos_text), int(siz_text))
                kb = _parse_key(head).encode("latin-1")
                if not (0 <= where[0] < _LIMIT and 0 <= where[1] < _LIMIT):
                    raise ValueError("offset or size out of range")
            except (ValueError, SyntaxError, UnicodeEncodeError) as exc:
                raise CorruptSessionError(
                    f"line {number} of {self.dirpath} is damaged ({exc}); nothing was changed: restore "
                    "the shelf from a backup",
                    path=self.dirpath,
                ) from exc
            old = index.pop(kb, None)
            if old is not None:
                live -= old[1]
            if where[1]:
                index[kb] = where
                live += where[1]
        self._live = live
        self._lines = number
        self._dir_end = start + whole
        return True

    # -- the mapping -----------------------------------------------------------------

    def __contains__(self, kb: bytes) -> bool:
        return kb in self._index

    def keys(self) -> list[bytes]:
        return list(self._index)

    def get(self, kb: bytes, default: bytes | None = None) -> bytes | None:
        where = self._index.get(kb)
        if where is None:
            return default
        pos, siz = where
        try:
            if pos + siz > self._dat_size:  # written by another process since: is it there?
                self._dat_size = os.fstat(self._dat_fd).st_size
                if pos + siz > self._dat_size:
                    raise self._cut_short(kb, pos, siz)
            data = os.pread(self._dat_fd, siz, pos)
        except OSError as exc:
            raise StorageError(f"cannot read {self.datpath}: {exc}", path=self.datpath) from exc
        if len(data) != siz:
            raise self._cut_short(kb, pos, siz)
        return data

    def _cut_short(self, kb: bytes, pos: int, siz: int) -> CorruptSessionError:
        return CorruptSessionError(
            f"{self.datpath} ends before the value of key {kb[:60]!r} (offset {pos}, {siz} bytes): the "
            "file was cut short; restore the shelf from a backup",
            path=self.datpath,
        )

    def __getitem__(self, kb: bytes) -> bytes:
        data = self.get(kb)
        if data is None:
            raise KeyError(kb)
        return data

    def _need_writable(self) -> None:
        if not self.writable:
            raise OSError(errno.EACCES, f"{self.path}.dir or .dat is read-only here")

    def __setitem__(self, kb: bytes, value: bytes) -> None:
        if not value:
            raise ValueError("dbm.dumb values here are never empty")
        self._need_writable()
        pos = self._dat_size
        try:
            write_all(self._dat_fd, value, pos)
        except BaseException:
            _truncate(self._dat_fd, pos)
            raise
        self._append(kb, (pos, len(value)))

    def __delitem__(self, kb: bytes) -> None:
        if kb not in self._index:
            raise KeyError(kb)
        self._need_writable()
        self._append(kb, _DELETED)

    def _append(self, kb: bytes, where: tuple[int, int]) -> None:
        line = index_line(kb, where)
        try:
            write_all(self._dir_fd, line, self._dir_end)
        except BaseException:
            _truncate(self._dir_fd, self._dir_end)
            if where[1]:
                _truncate(self._dat_fd, where[0])
            raise
        self._dir_end += len(line)
        self._lines += 1
        old = self._index.pop(kb, None)
        if old is not None:
            self._live -= old[1]
        if where[1]:
            self._index[kb] = where
            self._live += where[1]
            self._dat_size = where[0] + where[1]

    # -- compaction ------------------------------------------------------------------

    def dead_bytes(self) -> int:
        """Bytes of ``.dat`` that no index line points at any more."""
        return self._dat_size - self._live

    def wants_compaction(self) -> bool:
        """Dead bytes outweigh live ones (or dead index lines the live ones)."""
        dead = self._dat_size - self._live
        if self.compact_after:
            return dead > self.compact_after
        if dead > max(self._live, _MIN_DEAD_BYTES):
            return True
        return self._lines - len(self._index) > max(len(self._index), _MIN_DEAD_LINES)

    def compact(self) -> None:
        """Rewrite both files with only the live values (see the module docstring).

        Raises ``OSError`` before the commit with the old files untouched and
        the temporary ones removed; after the commit, a failure leaves the
        rest to ``recover_compaction()``.
        """
        self._need_writable()
        self.committed = False
        tmp_dat, tmp_dir = self.path + ".dat.compact", self.path + ".dir.compact"
        directory = os.path.dirname(self.path)
        created = []
        try:
            new_index: dict[bytes, tuple[int, int]] = {}
            fd = os.open(tmp_dat, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            created.append(tmp_dat)
            try:
                out = bytearray()
                at = 0
                size = os.fstat(self._dat_fd).st_size
                for kb, (pos, siz) in sorted(self._index.items(), key=lambda item: item[1][0]):
                    data = os.pread(self._dat_fd, siz, pos) if pos + siz <= size else b""
                    if len(data) != siz:
                        raise CorruptSessionError(
                            f"{self.datpath} ends before the value of key {kb[:60]!r}; not compacted",
                            path=self.datpath,
                        )
                    new_index[kb] = (at + len(out), siz)
                    out += data
                    if len(out) >= _COPY_CHUNK:
                        write_all(fd, bytes(out), at)
                        at += len(out)
                        out.clear()
                write_all(fd, bytes(out), at)
                dat_end = at + len(out)
                os.fsync(fd)
            finally:
                os.close(fd)
            lines = b"".join(index_line(kb, where) for kb, where in new_index.items())
            fd = os.open(tmp_dir, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            created.append(tmp_dir)
            try:
                write_all(fd, lines, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp_dir, self.path + ".dir.committed")
            self.committed = True
            created.clear()
        except BaseException:
            for name in created:
                try:
                    os.unlink(name)
                except OSError:
                    pass
            raise
        # committed: from here on a crash is finished by recover_compaction()
        fsync_dir(directory)
        os.replace(tmp_dat, self.datpath)
        os.replace(self.path + ".dir.committed", self.dirpath)
        fsync_dir(directory)
        try:
            os.unlink(self.path + ".bak")  # dbm.dumb's backup index no longer matches .dat
        except FileNotFoundError:
            pass
        self.close()
        self._open_files()
        self._index = new_index
        self._live = dat_end
        self._lines = len(new_index)
        self._dir_end = len(lines)
        self.compact_after = 0
