"""``sessionkit``: look into, check and maintain session stores from the shell.

::

    sessionkit ls msgpack:./sessions 'chat:*'       # the keys (fnmatch pattern)
    sessionkit show msgpack:./sessions chat:42      # one session, pretty-printed (--json)
    sessionkit rm shelve:./prefs.db chat:42         # delete one session
    sessionkit stats redis://127.0.0.1:6379/0?prefix=bot:
    sessionkit purge-expired msgpack:./sessions     # reclaim expired sessions
    sessionkit copy msgpack:./sessions redis://127.0.0.1:6379/0?prefix=bot:
    sessionkit check msgpack:./sessions             # verify every record's checksum
    sessionkit demo --dir ./demo-sessions           # the simulated bot of sessionkit.demo

A store is named by one argument: ``msgpack:DIR``, ``shelve:PATH`` (optionally
``shelve:PATH?dbm=dbm.gnu``), ``redis://HOST:PORT/DB?prefix=P&codec=json``
(also ``rediss://``, and ``redis+cluster://HOST:PORT?prefix=P`` for a Redis
Cluster), or the bare path of an existing msgpack store directory.  Keys are
the full storage keys (with any ``Sessions(prefix=...)``; a chat id ``42``
is the key ``42``).  No command creates a store, except ``copy`` its
destination.

Exit codes:

0
    success
1
    a problem was found: ``check`` found damage; ``show``/``rm``: no such
    session; ``copy``: some sessions could not be copied
2
    usage error: bad arguments or a bad store name
3
    store error: the store does not exist or cannot be opened, the backend
    failed (disk, connection), or a session stayed locked
4
    damaged data: a value or the store's files cannot be decoded, or (``ls``,
    ``show``) a msgpack log ends in a record cut short, which opening it would
    drop (run ``sessionkit check STORE``)

``ls``, ``show``, ``stats`` and ``check`` write nothing; ``rm``,
``purge-expired`` and ``copy`` open the stores as any process using them
does, which completes crash recovery (a msgpack log's record cut short by a
crash is dropped).

Errors are one line on stderr, starting ``sessionkit:``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import pickletools
import pprint
import sys
import textwrap
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import IO, Any, Callable, NoReturn, Sequence

from . import __version__
from ._stores import DAMAGED, STORE_ERROR, USAGE_ERROR, CliError, StoreSpec, close_store, open_store
from ._stores import parse_store, require_msgpack_store, shelf_files
from .errors import CorruptSessionError, LockLost, LockTimeout, SerializationError, SessionError, StorageError

__all__ = ["main", "EXIT_OK", "EXIT_PROBLEM", "EXIT_USAGE", "EXIT_STORE", "EXIT_DAMAGED"]

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = USAGE_ERROR
EXIT_STORE = STORE_ERROR
EXIT_DAMAGED = DAMAGED

EPILOG = """\
stores:
  msgpack:DIR                        a MsgpackFileStorage directory
  shelve:PATH[?dbm=dbm.gnu]          a ShelveStorage
  redis://HOST:PORT/DB[?prefix=P&codec=json]
                                     a RedisStorage (also rediss://)
  redis+cluster://HOST:PORT[?prefix=P]
                                     a RedisStorage on a Redis Cluster
  DIR                                an existing msgpack store directory

exit codes:
  0  success
  1  a problem was found: check found damage, show/rm found no such session,
     copy could not copy some sessions
  2  usage error: bad arguments or a bad store name
  3  store error: the store does not exist or cannot be opened, the backend
     failed, or a session stayed locked
  4  damaged data: a value or the store's files cannot be decoded, or a
     msgpack log ends in a record cut short (run: sessionkit check STORE)
"""

_LOCK_TIMEOUT = 10.0  # seconds rm and copy wait for a session another process holds open
_READ_ONLY = (
    "Nothing is written: if a msgpack log this needs ends in a record cut short (as a crash mid-write "
    "leaves), opening it would drop that record, so the command stops (exit 4) and points to check."
)


# -- output ------------------------------------------------------------------------------


def _write(stream: IO[str], text: str) -> None:
    """Write a line; characters the stream cannot encode (lone surrogates in keys) are escaped."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        text = text.encode(encoding, "backslashreplace").decode(encoding)
    stream.write(text + "\n")


def _out(text: str) -> None:
    """Write a line to stdout."""
    _write(sys.stdout, text)


def _err(text: str) -> None:
    """Write a line to stderr."""
    _write(sys.stderr, text)


def _one_line(message: object) -> str:
    """A message with its line breaks (and runs of spaces) folded into single spaces."""
    return " ".join(str(message).split())


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (and exit 2)."""

    def error(self, message: str) -> NoReturn:
        """Print the usage error in one line and exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: {_one_line(message)} (see: {self.prog} --help)\n")


class _Progress:
    """A progress bar on ``stream``; the caller enables it when the stream is a terminal."""

    WIDTH = 30

    def __init__(self, total: int, stream: IO[str], enabled: bool, label: str) -> None:
        """A bar for ``total`` steps, drawn on ``stream`` when ``enabled``."""
        self.total = total
        self.done = 0
        self.stream = stream
        self.label = label
        self.enabled = enabled and total > 0
        self.drawn_at = 0.0

    def step(self) -> None:
        """One more step done; redrawn at most ten times a second."""
        self.done += 1
        now = time.monotonic()
        if self.enabled and (now - self.drawn_at >= 0.1 or self.done == self.total):
            self.drawn_at = now
            self._draw()

    def _draw(self) -> None:
        """Draw the bar over the previous one."""
        filled = self.WIDTH * self.done // self.total
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        percent = 100 * self.done // self.total
        self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {percent:3d}%")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line (if one was drawn)."""
        if self.enabled and self.drawn_at:
            self.stream.write("\n")
            self.stream.flush()


def _jsonable(value: Any, odd: set[str]) -> Any:
    """``value`` as JSON can hold it: bytes as ``{"$base64": ...}``, NaN and infinities as the strings
    ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (named in ``odd``), other non-JSON values as their repr."""
    if isinstance(value, float) and not math.isfinite(value):
        shown = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
        odd.add(shown)
        return shown
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (bytes, bytearray)):
        import base64

        return {"$base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {
            (_jsonable(k, odd) if isinstance(k, float) else k if isinstance(k, (str, int, bool)) or k is None
             else repr(k)): _jsonable(v, odd)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, odd) for v in value]
    return repr(value)


def _dump_json(value: Any) -> tuple[str, set[str]]:
    """A session value as indented JSON (see ``_jsonable``), and the non-finite floats shown as strings."""
    odd: set[str] = set()
    return json.dumps(_jsonable(value, odd), indent=2, ensure_ascii=False, allow_nan=False), odd


def _shown_key(key: str) -> str:
    """A key as ``ls`` prints it: as is, or as a Python string literal when it holds a control character
    (a line break would split it) or starts with a quote (so it is not taken for such a literal)."""
    if key[:1] in ("'", '"') or any(c.isspace() and c != " " or not c.isprintable() for c in key):
        return repr(key)
    return key


def _reason(exc: BaseException) -> str:
    """What an exception says, in one line; never empty (some decoders raise with no message)."""
    text = _one_line(exc)
    cause = exc.__cause__
    if text.endswith(":") and cause is not None:
        text += " " + (_one_line(cause) or type(cause).__name__)
    elif not text:
        text = type(exc).__name__
    return text


class _Seconds(float):
    """A ``--timeout``: a float that remembers how it was written, to show it as given."""

    text = ""


def _seconds(text: str) -> float:
    """Parse ``--timeout``: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"the timeout must be a number of seconds, 0 or more, not {text!r}")
    seconds = _Seconds(value)
    seconds.text = text.strip()
    return seconds


def _shown_seconds(timeout: float) -> str:
    """A timeout as the user gave it."""
    return getattr(timeout, "text", "") or f"{timeout:g}"


# -- opening stores ----------------------------------------------------------------------


def _open(stack: ExitStack, name: str, *, create: bool = False) -> tuple[StoreSpec, Any]:
    """Parse ``name`` and open the store (closed when ``stack`` closes)."""
    spec = parse_store(name)
    storage = open_store(spec, create=create)
    stack.callback(close_store, storage)
    return spec, storage


def _spec(name: str) -> StoreSpec:
    """Parse ``name``; for a msgpack store, also check that it exists (it is read without opening it)."""
    spec = parse_store(name)
    if spec.kind == "msgpack":
        require_msgpack_store(spec.path)
    return spec


# -- the msgpack logs, read directly ---------------------------------------------------


@dataclass
class _LogScan:
    """What one shard log holds, read without the store's locks (nothing is written)."""

    path: str
    size: int = 0
    live: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # key -> offset, length, expiry
    damaged: dict[str, int] = field(default_factory=dict)  # key -> offset of its newest record, damaged
    superseded: list[tuple[str, int]] = field(default_factory=list)  # damaged records a later one replaced
    broken_at: int | None = None  # a damaged record header: nothing after it can be read
    crashed_tail: int = 0  # bytes after the last whole record: an append cut short (dropped at the next open)
    tail_at: int = 0  # where those bytes start
    tail_key: str | None = None  # the session the cut-short record is for, when its header can be read
    tail_why: str = ""  # what is wrong with the last record
    tail_delete: bool = False  # the cut-short record is a delete
    error: str = ""  # the file cannot be read at all
    undecodable: dict[str, str] = field(default_factory=dict)  # key -> why its value does not decode
    reported: dict[str, int] = field(default_factory=dict)  # key -> offset its index reports damaged at
    reported_unnamed: int = 0  # sessions the index reports damaged whose keys the log no longer holds
    index_end: int = 0  # where the shard's index says the log ends (0: no index that can be believed)

    @property
    def cut_short(self) -> bool:
        """The log ends before its index says, and not in a crashed append:
        cut from outside (a truncation, a restored copy); the store would
        index what is left and report the sessions the cut took."""
        return self.index_end > self.size and not self.crashed_tail


def _format_count(directory: str) -> tuple[int, str]:
    """The shard count in a msgpack store's FORMAT file, or 0 and why it cannot be read."""
    from .storage.msgpack_file import parse_format

    path = os.path.join(directory, "FORMAT")
    try:
        with open(path, "rb") as f:
            count, _version = parse_format(path, f.read())
    except OSError as exc:
        return 0, f"{path} cannot be read: {exc}"
    except CorruptSessionError as exc:
        return 0, f"{path} cannot be read: {exc.__cause__}"
    return count, ""


def _scan_log(path: str, decode: bool, now: float) -> _LogScan:
    """Parse a shard log as the store does when it opens it, and optionally decode every live value."""
    from . import _codec
    from .storage import _records as rec

    scan = _LogScan(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return scan  # a shard never written
    except OSError as exc:
        scan.error = f"cannot read {path}: {exc}"
        return scan
    try:
        size = scan.size = os.fstat(fd).st_size
        if size == 0:
            return scan
        if os.pread(fd, len(rec.MAGIC), 0) != rec.MAGIC:
            scan.error = f"{path} is not a sessionkit log (bad magic)"
            return scan
        stop = len(rec.MAGIC)
        try:
            stop = rec.read_log(fd, stop, size, 4 << 20, lambda record: _apply(scan, record, rec.FLAG_DELETE))
        except rec.Damage as damage:
            scan.broken_at = damage.offset
        if scan.broken_at is None and stop < size:
            scan.crashed_tail = size - stop
            _describe_tail(scan, fd, stop)
        _index_reports(scan, fd)
        if decode:
            for key, (offset, length, expiry) in scan.live.items():
                if expiry and expiry <= now:
                    continue
                value = rec.value_of(os.pread(fd, length, offset))
                if value is None:  # changed on disk since it was parsed
                    scan.undecodable[key] = f"its record at byte {offset} fails its checksum"
                    continue
                try:
                    _codec.loads(value, key)
                except CorruptSessionError as exc:
                    cause = exc.__cause__ or exc
                    why = _one_line(cause) or type(cause).__name__
                    scan.undecodable[key] = f"its value at byte {offset} is not msgpack: {why}"
    except OSError as exc:
        scan.error = f"cannot read {path}: {exc}"
    finally:
        os.close(fd)
    return scan


def _index_reports(scan: _LogScan, fd: int) -> None:
    """What the shard's index says beyond the log itself: sessions it reports
    damaged (their newest record or deletion was cut from the log, found by
    an earlier open), and a log that ends before the index's end (cut since,
    found by the next open).  Read only from an index of this log, of this
    boot, not being written; the index file is read, never mapped or changed."""
    from .storage import _index as ix
    from .storage import _records as rec
    from .storage._shard import index_name, log_number

    number = log_number(os.path.basename(scan.path))
    if number is None:
        return
    try:
        with open(os.path.join(os.path.dirname(scan.path), index_name(number)), "rb") as f:
            data = f.read()
        st = os.fstat(fd)
    except OSError:
        return
    if len(data) < ix.HEADER_SIZE:
        return
    magic, capacity, dev, ino, boot = ix.FIXED.unpack_from(data, 0)
    if magic != ix.MAGIC or len(data) != ix.HEADER_SIZE + capacity * ix.SLOT_SIZE:
        return
    counters = ix.COUNTERS.unpack_from(data, ix.COUNTERS_AT)
    if (dev, ino) != (st.st_dev, st.st_ino) or not ix.same_boot(boot) or counters[4] or counters[5]:
        return  # another log's, an earlier boot's, or a write under way: the next open indexes the log anew
    if ix.check(data[ix.COUNTERS_AT :], capacity):
        return  # a damaged index: the next open indexes the log anew, and tells nothing from it
    scan.index_end = counters[0]
    now = time.time()
    marked = {  # a record damaged in place is found by reading the log: only the cut ones here
        (s[0], s[1]): s[2] for s in ix.slots(data[ix.HEADER_SIZE :])
        if s[4] == ix.CORRUPT and s[2] == ix.CUT and not 0 < s[5] <= now
    }
    if not marked:
        return
    for key in (*scan.live, *scan.damaged):
        offset = marked.pop(rec.key_hash(rec.encode_key(key)), None)
        if offset is not None:
            scan.reported[key] = offset
    scan.reported_unnamed = len(marked)


def _describe_tail(scan: _LogScan, fd: int, stop: int) -> None:
    """What the bytes after a log's last whole record are: a header, a record cut short, or a record
    whose checksum fails; and the session it is for, when its header is whole."""
    from .storage import _records as rec

    scan.tail_at = stop
    size = scan.size
    head = os.pread(fd, rec.HEADER_SIZE, stop)
    if not head.strip(b"\0") and not os.pread(fd, min(size - stop, 1 << 20), stop).strip(b"\0"):
        scan.tail_why = f"is {size - stop} zero bytes (an append that never landed)"
        return
    if len(head) < rec.HEADER_SIZE:
        scan.tail_why = f"is cut short inside its header ({size - stop} of {rec.HEADER_SIZE} bytes)"
        return
    _body_crc, klen, vlen, flags, _expiry, _header_crc = rec.HEADER.unpack(head)
    scan.tail_delete = bool(flags & rec.FLAG_DELETE)
    whole = rec.HEADER_SIZE + klen + vlen
    if size - stop >= rec.HEADER_SIZE + klen:
        scan.tail_key = rec.decode_key(os.pread(fd, klen, stop + rec.HEADER_SIZE))
    if size - stop < whole:
        scan.tail_why = f"is cut short ({size - stop} of its {whole} bytes)"
    else:
        scan.tail_why = "fails its checksum"


def _apply(scan: _LogScan, record: Any, delete_flag: int) -> None:
    """Index one record the way the store does: the newest record of a key wins."""
    key = record.key
    old_damage = scan.damaged.pop(key, None)
    if old_damage is not None:
        scan.superseded.append((key, old_damage))
    if not record.ok:
        scan.damaged[key] = record.offset
        scan.live.pop(key, None)
    elif record.flags & delete_flag:
        scan.live.pop(key, None)
    else:
        scan.live[key] = (record.offset, record.length, record.expiry)


def _scan_msgpack(directory: str, decode: bool, storage: Any = None) -> tuple[list[_LogScan], str]:
    """Every shard log of a msgpack store, and a problem with its FORMAT file (or "").

    With ``storage`` (a MsgpackFileStorage on ``directory``), each log is read
    holding its shard's lock, so an append still under way is not taken for
    one cut short by a crash.  The logs are read directly: nothing is written
    (opening a shard through the store would truncate a cut-short tail).
    """
    from .storage._shard import log_name

    count, problem = _format_count(directory)
    if problem:
        return [], problem
    now = time.time()
    shards = getattr(storage, "_shards", None)
    if shards is None or len(shards) != count:
        return [_scan_log(os.path.join(directory, log_name(n)), decode, now) for n in range(count)], ""
    return [_scan_shard(shard, decode, now) for shard in shards], ""


def _scan_shard(shard: Any, decode: bool, now: float) -> _LogScan:
    """``_scan_log`` of one shard's log, holding the shard's lock (without opening it in the store)."""
    from .storage._shard import SECTION_WAIT

    with shard.mutex:
        try:
            held = shard.locks.lock(shard.slot, SECTION_WAIT, "")
        except LockTimeout:
            raise CliError(f"{shard.path} stayed locked by another process for {SECTION_WAIT:.0f} s",
                           EXIT_STORE) from None
        try:
            return _scan_log(shard.path, decode, now)
        finally:
            shard.locks.unlock(held, shard.slot)


def _tail_problem(scan: _LogScan) -> str:
    """The DAMAGED line for a log whose last record is cut short or fails its checksum."""
    if scan.tail_key is None:
        what = "its last record"
        effect = "the session it was for keeps its previous value (or stays absent)"
    elif scan.tail_delete:
        what = f"its last record (a delete of session {scan.tail_key!r})"
        effect = f"session {scan.tail_key!r} keeps its previous value"
    else:
        what = f"its last record (a write of session {scan.tail_key!r})"
        effect = f"session {scan.tail_key!r} reads as before that write (absent, if it was its first)"
    if scan.tail_at < scan.index_end:
        return (
            f"{scan.path}: {what} at byte {scan.tail_at} {scan.tail_why}, but the shard's index says the log "
            f"was whole up to byte {scan.index_end}: it was cut short or damaged since, not by a crash; the "
            "next process that opens this shard reports every session whose newest record is no longer "
            "whole as damaged (rm or write each to go on) and makes every deletion past the cut again, or "
            "restore the file from a backup"
        )
    return (
        f"{scan.path}: {what} at byte {scan.tail_at} {scan.tail_why}: it may be a write cut short by a "
        f"crash, or later damage; the next process that opens this shard drops it, so {effect}; any "
        "command that writes (e.g. purge-expired) does that, or restore the file from a backup to keep it"
    )


def _refuse_cut_short(spec: StoreSpec, storage: Any, shards: list[Any], command: str) -> None:
    """``CliError`` when a log that ``command`` would open ends in a record cut
    short, or is shorter than its index says.

    The store would truncate the one, and make the cut deletions of the
    other again, on opening the log; a read-only command must not change the
    store, so it stops and points to ``check``.
    """
    now = time.time()
    for shard in shards:
        scan = _scan_shard(shard, False, now)
        if scan.cut_short:
            raise CliError(
                f"{scan.path} ends at byte {scan.size}, before the byte {scan.index_end} its index says: it was "
                f"cut short; {command} changes nothing, and opening the log would record what was cut: run "
                f"sessionkit check {spec.name}",
                EXIT_DAMAGED,
            )
        if scan.crashed_tail:
            who = f" (session {scan.tail_key!r})" if scan.tail_key is not None else ""
            raise CliError(
                f"{scan.path}: its last record{who} {scan.tail_why}, as a crash mid-write leaves; {command} "
                f"changes nothing, and opening the log would drop it: run sessionkit check {spec.name}",
                EXIT_DAMAGED,
            )


# -- shelves, read under the shelf's lock ------------------------------------------------


def _shelf_raw(storage: Any) -> list[tuple[bytes, bytes]]:
    """Every stored key and value of a ShelveStorage, as the dbm holds them (framed)."""
    with storage._state._mutex, storage._store() as db:
        return list(storage._scan(db))


def _shelf_entry(raw_key: bytes, stored: bytes, now: float) -> tuple[str, str, str, bool]:
    """A shelf entry's key, the key as shown, what is wrong ("" if nothing), and whether it has expired."""
    from .storage import shelf

    try:
        key = shelf._decode_key(raw_key)
    except UnicodeDecodeError:
        return "", repr(raw_key), "its key is not UTF-8", False
    data = stored
    if stored.startswith(shelf.MAGIC):
        if not shelf._intact(stored):
            return key, repr(key), "its value fails its checksum (a torn write?)", False
        expiry = shelf._FRAME.unpack_from(stored)[2]
        if expiry and expiry <= now:
            return key, repr(key), "", True
        data = stored[shelf._FRAME.size:]
    try:
        for _ in pickletools.genops(data):
            pass
    except Exception as exc:  # pickletools raises ValueError for most damage, others for some
        return key, repr(key), f"its pickle is damaged: {_one_line(exc)}", False
    return key, repr(key), "", False


# -- commands ----------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    """List the keys of a store, sorted, optionally only those matching a pattern."""
    with ExitStack() as stack:
        spec, storage = _open(stack, args.store)
        if spec.kind == "msgpack":
            _refuse_cut_short(spec, storage, storage._shards, "ls")
        keys = sorted(storage.keys())
        if args.pattern is not None:
            keys = [k for k in keys if fnmatch.fnmatchcase(k, args.pattern)]
        if args.json:
            _out(json.dumps(keys, ensure_ascii=False))
        else:
            for key in keys:
                _out(_shown_key(key))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    """Print one session's value."""
    with ExitStack() as stack:
        spec, storage = _open(stack, args.store)
        if spec.kind == "msgpack":
            _refuse_cut_short(spec, storage, [storage._shard(args.key)], "show")
        if spec.kind == "redis":
            kind = _redis_types(storage, [args.key]).get(args.key)
            if kind:
                raise CliError(_wrong_type_message(storage, args.key, kind), EXIT_DAMAGED)
        value = storage.read(args.key)
        if value is None:
            raise CliError(f"no session {args.key!r} in {spec.name}", EXIT_PROBLEM)
        if not args.json:
            _out(pprint.pformat(value, width=100, sort_dicts=False))
            return EXIT_OK
        text, odd = _dump_json(value)
        _out(text)
        if odd:
            _err(f"sessionkit: note: the value holds {', '.join(sorted(odd))}, which JSON cannot: shown as "
                 "the string(s) of that name")
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    """Delete one session, under its lock (a handler that has it open finishes first)."""
    with ExitStack() as stack:
        spec, storage = _open(stack, args.store)
        if spec.kind == "redis":
            kind = _redis_types(storage, [args.key]).get(args.key)
            if kind:  # not a session: no handler locks it, and sessionkit's lock script cannot read it
                name = storage._name(args.key)
                try:
                    storage.client.delete(name)
                except storage._errors as exc:
                    raise StorageError(f"cannot delete {name!r}: {exc}") from exc
                _out(f"removed {args.key!r}, a Redis {kind} (not a session value)")
                return EXIT_OK
        try:
            with storage.lock(args.key, timeout=args.timeout):
                try:
                    present = storage.has(args.key)
                    damaged = False
                except CorruptSessionError:  # deleting a damaged session is how it is recovered
                    present = damaged = True
                if not present:
                    if args.force:
                        return EXIT_OK
                    raise CliError(f"no session {args.key!r} in {spec.name}", EXIT_PROBLEM)
                storage.delete(args.key)
        except LockTimeout:
            raise CliError(
                f"could not lock session {args.key!r} within {_shown_seconds(args.timeout)} s: another "
                "process has it open",
                EXIT_STORE,
            ) from None
        _out(f"removed {'damaged ' if damaged else ''}session {args.key!r}")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    """Print a store's session count, size and expired sessions (where the backend keeps them)."""
    spec = _spec(args.store)
    with ExitStack() as stack:
        storage = open_store(spec)
        stack.callback(close_store, storage)
        if spec.kind == "msgpack":
            stats = _msgpack_stats(spec.path, storage)
        elif spec.kind == "shelve":
            stats = _shelve_stats(storage)
        else:
            stats = _redis_stats(storage)
    stats = {"store": spec.name, "backend": spec.kind, **stats}
    if args.json:
        _out(json.dumps(stats, ensure_ascii=False, indent=2))
    else:
        for name, value in stats.items():
            shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
            _out(f"{name + ':':<16}{shown}")
    return EXIT_OK


def _msgpack_stats(directory: str, storage: Any) -> dict[str, Any]:
    """A msgpack store's figures, read from its logs (each under its shard's lock; nothing is written)."""
    scans, problem = _scan_msgpack(directory, decode=False, storage=storage)
    if problem:
        raise CliError(problem, EXIT_DAMAGED)
    now = time.time()
    live = expired = live_bytes = 0
    damaged = sum(
        len(s.damaged) + (s.broken_at is not None) + bool(s.error) + bool(s.crashed_tail) + len(s.reported)
        + s.reported_unnamed + s.cut_short
        for s in scans
    )
    for scan in scans:
        for key, (_offset, length, expiry) in scan.live.items():
            if key in scan.reported:
                continue  # an older record of a session whose newest was cut: counted as damaged
            if expiry and expiry <= now:
                expired += 1
            else:
                live += 1
                live_bytes += length
    disk = 0
    for name in os.listdir(directory):
        try:
            disk += os.path.getsize(os.path.join(directory, name))
        except OSError:
            pass
    return {
        "sessions": live,
        "expired": expired,
        "bytes": disk,
        "live_bytes": live_bytes,
        "shards": len(scans),
        "damaged": damaged,
    }


def _shelve_stats(storage: Any) -> dict[str, Any]:
    """A shelf's figures, read under the shelf's lock."""
    now = time.time()
    live = expired = damaged = 0
    for raw_key, stored in _shelf_raw(storage):
        _key, _shown, problem, is_expired = _shelf_entry(raw_key, stored, now)
        if problem:
            damaged += 1
        elif is_expired:
            expired += 1
        else:
            live += 1
    disk = 0
    for path in shelf_files(storage.path):
        try:
            disk += os.path.getsize(path)
        except OSError:
            pass
    return {"sessions": live, "expired": expired, "bytes": disk, "dbm": storage.dbm, "damaged": damaged}


def _redis_batches(storage: Any, keys: list[str], command: str) -> list[Any]:
    """``command`` (TYPE, STRLEN) on each session's Redis key, pipelined; errors are returned, not raised."""
    client = storage.client
    results: list[Any] = []
    try:
        for start in range(0, len(keys), 500):
            pipe = client.pipeline(transaction=False)
            for key in keys[start:start + 500]:
                pipe.execute_command(command, storage._name(key))
            results.extend(pipe.execute(raise_on_error=False))
    except storage._errors as exc:
        raise StorageError(f"cannot read the sessions' {command} from Redis: {exc}") from exc
    return results


def _redis_types(storage: Any, keys: list[str]) -> dict[str, str]:
    """The sessions whose Redis key holds another type than a string (a list, a hash...): key -> type."""
    found = {}
    for key, kind in zip(keys, _redis_batches(storage, keys, "TYPE")):
        if isinstance(kind, Exception):
            raise StorageError(f"cannot read the type of session {key!r} in Redis: {kind}")
        kind = kind.decode("ascii", "replace") if isinstance(kind, bytes) else str(kind)
        if kind not in ("string", "none"):
            found[key] = kind
    return found


def _wrong_type_message(storage: Any, key: str, kind: str) -> str:
    """Why a Redis key of another type than a string is no session."""
    name = storage.prefix + key
    return (
        f"session {key!r}: the Redis key {name!r} holds a {kind}, not a session's string value (WRONGTYPE); "
        "another program's key under this prefix? `sessionkit rm` deletes it"
    )


def _redis_stats(storage: Any) -> dict[str, Any]:
    """The figures of the sessions under a RedisStorage's prefix."""
    keys = sorted(storage.keys())
    wrong = _redis_types(storage, keys)
    strings = [k for k in keys if k not in wrong]
    total = sum(n for n in _redis_batches(storage, strings, "STRLEN") if isinstance(n, int))
    return {
        "sessions": len(strings),
        "expired": "n/a (Redis deletes expired keys itself)",
        "bytes": total,
        "codec": storage.codec,
        "damaged": len(wrong),
    }


def cmd_purge_expired(args: argparse.Namespace) -> int:
    """Reclaim the space of expired sessions."""
    with ExitStack() as stack:
        spec, storage = _open(stack, args.store)
        purge: Callable[[], int] | None = getattr(storage, "purge_expired", None)
        if purge is None:
            _out(f"nothing to purge in {spec.name}: Redis deletes expired keys itself")
            return EXIT_OK
        count = purge()
    _out(f"purged {count} expired session{'' if count == 1 else 's'} from {spec.name}")
    return EXIT_OK


@dataclass
class _CopyResult:
    """What a copy did, session by session."""
    copied: int = 0
    unchanged: int = 0
    vanished: int = 0
    kept: int = 0  # --no-clobber: the destination's own value kept
    failed: list[tuple[str, str]] = field(default_factory=list)


def _same_value(storage: Any, a: Any, b: Any) -> bool:
    """Whether ``storage`` would store ``a`` and ``b`` as the same bytes (so ``True`` is not ``1``)."""
    dumps = getattr(storage, "_raw_dumps", None)
    if dumps is None:
        return type(a) is type(b) and bool(a == b)
    try:
        return bool(dumps(a, None) == dumps(b, None))
    except SerializationError:
        return False


def _redis_identity(spec: StoreSpec, storage: Any) -> tuple[frozenset[str], int, str]:
    """Who a Redis store is: its server's run_id(s) (every node's, for a cluster), database and prefix.

    Two URLs of one server (``127.0.0.1`` and ``localhost``, or a second
    address) name the same store when the server answers with the same run_id.
    """
    from urllib.parse import urlsplit

    try:
        info = storage.client.info("server")
    except storage._errors as exc:
        raise CliError(f"cannot ask {spec.name} which server it is (INFO server): {exc}",
                       EXIT_STORE) from None
    ids: set[str] = set()
    stack = [info]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "run_id" in item:
                ids.add(str(item["run_id"]))
            stack.extend(v for v in item.values() if isinstance(v, dict))
    if not ids:  # a server that does not say: fall back on the URL
        ids.add(spec.identity)
    return frozenset(ids), int(urlsplit(spec.url).path.strip("/") or 0), spec.prefix


class _NewStore:
    """A destination ``copy`` may create: what to remove if nothing ends up in it.

    Only files the copy created (absent before it, and named as the store's
    own files) and directories it created are removed.
    """

    def __init__(self, spec: StoreSpec) -> None:
        """Note which of ``spec``'s files and directories exist before the copy."""
        self.spec = spec
        self.opened = False  # set once the copy opened (so created) the store
        self.new = False
        self.directory = ""
        if spec.kind == "msgpack":
            self.new = not os.path.exists(os.path.join(spec.path, "FORMAT"))
            self.directory = spec.path
        elif spec.kind == "shelve":
            self.new = not shelf_files(spec.path) and not os.path.exists(spec.path + ".lock")
            self.directory = os.path.dirname(spec.path)
        self.before = set(os.listdir(self.directory)) if self.new and os.path.isdir(self.directory) else set()
        self.top = self._first_missing(self.directory) if self.new else None  # the outermost new directory

    @staticmethod
    def _first_missing(path: str) -> str | None:
        """The outermost directory of ``path`` that does not exist (None: it exists)."""
        missing = None
        while not os.path.exists(path):
            missing = path
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        return missing

    def _ours(self, name: str) -> bool:
        """Whether ``name`` (in the store's directory) is one of the files the store creates."""
        from .storage._shard import index_number, log_number

        if self.spec.kind == "msgpack":
            return (
                name in ("FORMAT", "FORMAT.tmp", "sessionkit.lock")
                or log_number(name) is not None
                or index_number(name) is not None
            )
        path = os.path.join(self.directory, name)
        return path in shelf_files(self.spec.path) or path == self.spec.path + ".lock"

    def remove(self) -> bool:
        """Remove what the copy created; whether it did."""
        if not (self.new and self.opened):
            return False
        try:
            names = os.listdir(self.directory)
        except OSError:
            return False
        for name in names:
            if name not in self.before and self._ours(name):
                try:
                    os.unlink(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass
        if self.top is not None:
            path = self.directory
            while True:
                try:
                    os.rmdir(path)  # only an empty directory: anything another process put there stays
                except OSError:
                    break
                if path == self.top:
                    break
                path = os.path.dirname(path)
        return True


def cmd_copy(args: argparse.Namespace) -> int:
    """Copy every session (matching a pattern) from one store to another; safe to run again."""
    src_spec = parse_store(args.src)
    dst_spec = parse_store(args.dst)
    if src_spec.identity == dst_spec.identity:
        raise CliError(f"{src_spec.name} and {dst_spec.name} are the same store", EXIT_USAGE)
    made = _NewStore(dst_spec)
    result = _CopyResult()
    try:
        with ExitStack() as stack:
            src = open_store(src_spec)
            stack.callback(close_store, src)
            dst = open_store(dst_spec, create=True)
            made.opened = True
            stack.callback(close_store, dst)
            order = (src_spec.identity, dst_spec.identity)
            if src_spec.kind == "redis" and dst_spec.kind == "redis":
                src_id, dst_id = _redis_identity(src_spec, src), _redis_identity(dst_spec, dst)
                if src_id[0] & dst_id[0] and src_id[1:] == dst_id[1:]:
                    raise CliError(
                        f"{src_spec.name} and {dst_spec.name} are the same store (one Redis server, run_id "
                        f"{min(src_id[0] & dst_id[0])}, database {src_id[1]}, prefix {src_id[2]!r})",
                        EXIT_USAGE,
                    )
                order = (f"{min(src_id[0])}/{src_id[1]}:{src_id[2]}",
                         f"{min(dst_id[0])}/{dst_id[1]}:{dst_id[2]}")
            keys = sorted(src.keys())
            if args.pattern is not None:
                keys = [k for k in keys if fnmatch.fnmatchcase(k, args.pattern)]
            skip: dict[str, str] = {}
            if src_spec.kind == "redis":
                for key, kind in _redis_types(src, keys).items():
                    skip[key] = f"its Redis key in {src_spec.name} holds a {kind}, not a session (WRONGTYPE)"
            if dst_spec.kind == "redis":
                for key, kind in _redis_types(dst, [k for k in keys if k not in skip]).items():
                    skip[key] = f"its Redis key in {dst_spec.name} holds a {kind}, not a session (WRONGTYPE)"
            # lock in one order (by store identity): two copies in opposite directions never deadlock
            first, second = (src, dst) if order[0] < order[1] else (dst, src)
            show = sys.stderr.isatty() if args.progress is None else args.progress
            progress = _Progress(len(keys), sys.stderr, show, "copying")
            try:
                for key in keys:
                    if key in skip:
                        result.failed.append((key, skip[key]))
                    else:
                        _copy_one(key, src, dst, first, second, args, result)
                    progress.step()
            finally:
                progress.close()
            damaged_in_src = []
            if src_spec.kind == "msgpack":
                scans, _ = _scan_msgpack(src_spec.path, decode=False)
                damaged_in_src = sorted(k for s in scans for k in s.damaged)
                if args.pattern is not None:
                    damaged_in_src = [k for k in damaged_in_src if fnmatch.fnmatchcase(k, args.pattern)]
            empty = made.new and result.copied == 0 and not list(dst.keys())
    except BaseException:
        if made.new and result.copied == 0:  # e.g. the source failed: leave no empty new store behind
            made.remove()
        raise
    removed = made.remove() if empty else False
    for key, why in result.failed:
        _err(f"sessionkit: session {key!r} was not copied: {_one_line(why)}")
    for key in damaged_in_src:
        _err(f"sessionkit: session {key!r} was not copied: its record in {src_spec.name} is damaged")
    summary = f"copied {result.copied}, already equal {result.unchanged}"
    if result.kept:
        summary += f", kept DST's own {result.kept} (--no-clobber)"
    if result.vanished:
        summary += f", gone meanwhile {result.vanished}"
    failed = len(result.failed) + len(damaged_in_src)
    if failed:
        summary += f", not copied {failed}"
    summary += f" ({len(keys)} sessions in {src_spec.name}) -> {dst_spec.name}"
    if removed:
        summary += " (nothing was copied, so it was not created)"
    _out(summary)
    return EXIT_PROBLEM if failed else EXIT_OK


def _copy_one(key: str, src: Any, dst: Any, first: Any, second: Any, args: argparse.Namespace,
              result: _CopyResult) -> None:
    """Copy one session under both stores' locks for it, unless the destination already holds it."""
    timeout = args.timeout
    try:
        with first.lock(key, timeout=timeout), second.lock(key, timeout=timeout):
            value = src.read(key)
            if value is None:
                result.vanished += 1  # deleted or expired since the listing
                return
            try:
                current = dst.read(key)
            except CorruptSessionError:
                if args.no_clobber:  # damaged, but held: left for the user to look at
                    result.failed.append((key, "its value in DST is damaged (--no-clobber keeps it)"))
                    return
                current = None  # damaged at the destination: overwriting it repairs it
            if current is not None and _same_value(dst, current, value):
                result.unchanged += 1
                return
            if current is not None and args.no_clobber:
                result.kept += 1
                return
            dst.write(key, value)
            result.copied += 1
    except LockTimeout:
        result.failed.append(
            (key, f"could not lock it within {_shown_seconds(timeout)} s: another process has it open")
        )
    except (CorruptSessionError, SerializationError, LockLost) as exc:
        result.failed.append((key, _reason(exc)))
    except StorageError as exc:
        if "WRONGTYPE" not in str(exc.__cause__):  # a Redis key that changed type since it was listed
            raise
        result.failed.append((key, f"its Redis key holds another type than a string (WRONGTYPE): {exc}"))


def cmd_check(args: argparse.Namespace) -> int:
    """Verify every stored record of a store; report damaged sessions and files."""
    spec = _spec(args.store)
    notes: list[str] = []
    if spec.kind == "msgpack":
        problems, checked, notes = _check_msgpack(spec.path)
    else:
        with ExitStack() as stack:
            try:
                storage = open_store(spec)
            except CorruptSessionError as exc:
                _out(f"DAMAGED  {_reason(exc)}")
                _out(f"{spec.name}: the store cannot be opened")
                return EXIT_PROBLEM
            stack.callback(close_store, storage)
            if spec.kind == "shelve":
                problems, checked = _check_shelve(storage, args.load)
            else:
                problems, checked = _check_redis(storage)
    for problem in problems:
        _out(f"DAMAGED  {problem}")
    for note in notes:
        _out(f"NOTE     {note}")
    remark = " (Redis values carry no checksum: each was decoded)" if spec.kind == "redis" else ""
    verdict = f"{len(problems)} problem{'' if len(problems) == 1 else 's'}" if problems else "no damage"
    _out(f"{spec.name}: checked {checked} session{'' if checked == 1 else 's'}{remark}: {verdict}")
    return EXIT_PROBLEM if problems else EXIT_OK


def _check_msgpack(directory: str) -> tuple[list[str], int, list[str]]:
    """Damaged sessions and files, the sessions checked, and notes on harmless damage.

    The logs are read directly (the store is not opened: that would drop a
    record cut short at the end of a log), each under its shard's lock when
    the store has a lock file (else no process uses it).
    """
    from .storage.msgpack_file import LOCK_FILE, MsgpackFileStorage

    storage = None
    if os.path.exists(os.path.join(directory, LOCK_FILE)):
        try:
            storage = MsgpackFileStorage(directory)  # only for its locks: no log is opened
        except (SessionError, ValueError, OSError):
            storage = None  # a damaged FORMAT file: reported below
    try:
        scans, problem = _scan_msgpack(directory, decode=True, storage=storage)
    finally:
        if storage is not None:
            storage.close()
    if problem:
        return [problem + "; it records the shard count: restore it from a backup"], 0, []
    problems: list[str] = []
    notes: list[str] = []
    checked = 0
    for scan in scans:
        checked += len(scan.live) + len(scan.damaged) + bool(scan.crashed_tail)
        if scan.error:
            problems.append(f"{scan.error}; no session of this shard can be read")
            continue
        if scan.broken_at is not None:
            problems.append(
                f"{scan.path} is damaged at byte {scan.broken_at} (a record header): the store refuses every "
                f"session of this shard ({len(scan.live) + len(scan.damaged)} recorded before that byte, and "
                "any after it); restore the file from a backup"
            )
        for key, offset in sorted(scan.damaged.items()):
            problems.append(
                f"session {key!r}: its record at byte {offset} of {scan.path} fails its checksum, so it "
                "cannot be read (rm or write the session to recover)"
            )
        for key, why in sorted(scan.undecodable.items()):
            problems.append(f"session {key!r} in {scan.path}: {why}")
        for key in sorted(scan.reported):
            problems.append(
                f"session {key!r}: the index of {scan.path} reports it damaged (its newest record was cut from "
                "the log): reading it fails until it is written or removed (rm)"
            )
        if scan.reported_unnamed:
            problems.append(
                f"{scan.path}: its index reports {scan.reported_unnamed} session(s) damaged whose newest records "
                "were cut from the log, so their keys are no longer there: reading one fails until it is "
                "written or removed"
            )
        if scan.cut_short:  # else the tail's problem says it
            problems.append(
                f"{scan.path} ends at byte {scan.size}, but its index says it reached byte {scan.index_end}: "
                "the log was cut short or replaced; the next process that opens it reports every session "
                "whose newest record was past the cut as damaged, and makes every deletion past it again"
            )
        if scan.crashed_tail:
            problems.append(_tail_problem(scan))
        for key, offset in scan.superseded:
            notes.append(
                f"{scan.path}: an older record of session {key!r} at byte {offset} fails its checksum; it is "
                "never read (a newer record replaced it) and goes at the log's next compaction"
            )
    return problems, checked, notes


def _check_shelve(storage: Any, load: bool) -> tuple[list[str], int]:
    """Damaged sessions of a shelf (or the shelf itself), and the sessions checked."""
    problems = []
    now = time.time()
    try:
        entries = _shelf_raw(storage)
    except CorruptSessionError as exc:
        return [_reason(exc)], 0
    for raw_key, stored in entries:
        key, shown, problem, expired = _shelf_entry(raw_key, stored, now)
        if problem:
            problems.append(
                f"session {shown}: {problem} (in {storage.path}; rm or write the session to recover)"
            )
        elif load and not expired:
            try:
                storage.read(key)
            except CorruptSessionError as exc:
                problems.append(f"session {key!r}: {_reason(exc)}")
    return problems, len(entries)


def _check_redis(storage: Any) -> tuple[list[str], int]:
    """Sessions in Redis whose values do not decode (or are no string), and the sessions checked."""
    problems = []
    keys = sorted(storage.keys())
    wrong = _redis_types(storage, keys)
    for key in keys:
        if key in wrong:
            problems.append(_wrong_type_message(storage, key, wrong[key]))
            continue
        try:
            storage.read(key)
        except CorruptSessionError as exc:
            problems.append(f"session {key!r}: {_reason(exc)}")
        except StorageError as exc:
            if "WRONGTYPE" not in str(exc.__cause__):
                raise
            problems.append(_wrong_type_message(storage, key, "value of another type"))
    return problems, len(keys)


def cmd_demo(rest: Sequence[str]) -> int:
    """Run the simulated bot of ``sessionkit.demo`` with its own arguments."""
    from .demo import main as demo_main

    return demo_main(list(rest))


# -- the parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``sessionkit`` argument parser, with one subparser per command."""
    parser = _Parser(
        prog="sessionkit",
        description="Look into, check and maintain sessionkit session stores.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sessionkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    store_help = "the store, e.g. msgpack:./sessions (the forms are listed below)"

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        """A subcommand with its summary, wrapped description and the common epilog."""
        return commands.add_parser(
            name,
            help=summary,
            description=textwrap.fill(description, 79),
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = command("ls", "list the session keys of a store",
                "List the session keys of STORE, sorted, one per line (only those matching PATTERN if "
                "given). "
                "Expired sessions are not listed. A key holding a control character (a line break, a tab...) "
                "or starting with a quote is printed as a Python string literal, so each line is one key; "
                "--json prints the keys exactly. " + _READ_ONLY)
    p.add_argument("store", metavar="STORE", help=store_help)
    p.add_argument("pattern", metavar="PATTERN", nargs="?",
                   help="a shell-style pattern the whole key must match (fnmatch, case-sensitive), "
                        "e.g. 'chat:*'")
    p.add_argument("--json", action="store_true", help="print the keys as one JSON list")
    p.set_defaults(func=cmd_ls)

    p = command("show", "print one session",
                "Print the value of session KEY in STORE, pretty-printed (or as JSON). "
                "Exit 1 if there is no such session, 4 if its stored bytes are damaged. " + _READ_ONLY)
    p.add_argument("store", metavar="STORE", help=store_help)
    p.add_argument("key", metavar="KEY", help="the full session key (e.g. 42 or chat:42)")
    p.add_argument("--json", action="store_true",
                   help="print JSON (bytes as {\"$base64\": ...}; NaN and infinities as the strings \"NaN\", "
                        "\"Infinity\", \"-Infinity\", with a note on stderr; other values JSON cannot hold "
                        "as their repr)")
    p.set_defaults(func=cmd_show)

    p = command("rm", "delete one session",
                "Delete session KEY from STORE, taking its lock first, so a handler that has it open "
                "finishes before. A damaged session is deleted too (that is how it is recovered). "
                "Exit 1 if there is no such session (0 with --force).")
    p.add_argument("store", metavar="STORE", help=store_help)
    p.add_argument("key", metavar="KEY", help="the full session key")
    p.add_argument("-f", "--force", action="store_true", help="a missing session is not an error")
    p.add_argument("--timeout", type=_seconds, default=_LOCK_TIMEOUT, metavar="SECONDS",
                   help="how long to wait for a session another process has open, in seconds "
                        f"(default {_LOCK_TIMEOUT:g})")
    p.set_defaults(func=cmd_rm)

    p = command("stats", "count a store's sessions and bytes",
                "Print how many sessions STORE holds, its size in bytes, how many expired sessions it still "
                "keeps (msgpack, shelve; Redis deletes them itself) and how many records are damaged "
                "(for msgpack, a log ending in a record cut short counts; for Redis, a key of another type "
                "than a string). Read without taking any session's lock; nothing is written.")
    p.add_argument("store", metavar="STORE", help=store_help)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_stats)

    p = command("purge-expired", "reclaim the space of expired sessions",
                "Delete the expired sessions STORE still keeps and reclaim their space: msgpack stores "
                "rewrite the logs that hold any (without decoding a value), shelves delete them. Redis "
                "deletes expired keys itself, so there it does nothing. Expired sessions never read back, "
                "purged or not.")
    p.add_argument("store", metavar="STORE", help=store_help)
    p.set_defaults(func=cmd_purge_expired)

    p = command("copy", "copy sessions from one store to another",
                "Copy every session of SRC (matching PATTERN if given) to DST, which may be any other "
                "backend; DST is created if it does not exist (a msgpack directory must be new or empty). "
                "Each session is copied under its lock in both stores, and a session DST already holds "
                "with the same value is skipped, so an interrupted copy resumes where it stopped and a "
                "second run changes nothing. A session both hold with different values gets SRC's value "
                "(SRC wins), unless --no-clobber: then DST's is kept. Sessions DST holds that SRC does not "
                "are left alone; expiry times are not copied (DST's sessions do not expire). A session "
                "that cannot be copied (damaged, a value DST cannot hold, a Redis key of another type, "
                "locked too long) is reported and skipped: exit 1. A DST the copy created is removed "
                "again if nothing was copied into it. Opening SRC and DST completes any crash recovery "
                "they need, as any process using them would (a msgpack log's record cut short by a crash "
                "is dropped: run check first to see it).")
    p.add_argument("src", metavar="SRC", help="the store to copy from (the forms are listed below)")
    p.add_argument("dst", metavar="DST", help="the store to copy to, created if it does not exist")
    p.add_argument("pattern", metavar="PATTERN", nargs="?",
                   help="copy only keys matching this fnmatch pattern")
    p.add_argument("-n", "--no-clobber", action="store_true",
                   help="skip sessions DST already holds (by default SRC's value replaces DST's)")
    p.add_argument("--timeout", type=_seconds, default=_LOCK_TIMEOUT, metavar="SECONDS",
                   help="how long to wait for a session another process has open, in seconds "
                        f"(default {_LOCK_TIMEOUT:g})")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="draw a progress bar on stderr (default: when stderr is a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false",
                     help="never draw the progress bar")
    p.set_defaults(func=cmd_copy)

    p = command("check", "verify every stored record",
                "Read every record of STORE and verify it: msgpack logs record by record (checksums, "
                "then decoding), shelves value by value (checksum, then the pickle's structure, without "
                "running it; --load also unpickles), Redis values by decoding them (a key of another type "
                "than a string is damage). A msgpack log whose last record is cut short or fails its "
                "checksum is damage too: it may be a write cut short by a crash, and the store drops it "
                "(the session reads as before that write) when a process next opens the log. Prints one "
                "DAMAGED line per damaged session or file and a summary; exit 1 if anything is damaged. "
                "Nothing is written: msgpack logs are read directly, without opening the store.")
    p.add_argument("store", metavar="STORE", help=store_help)
    p.add_argument("--load", action="store_true",
                   help="shelve: also unpickle every value (runs the pickles' code: only for trusted "
                        "shelves)")
    p.set_defaults(func=cmd_check)

    commands.add_parser(
        "demo",
        help="run the simulated bot (python -m sessionkit.demo; demo --help for its options)",
        add_help=False,
    ).set_defaults(func=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":  # everything after it is the demo's own
        return cmd_demo(argv[1:])
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.func(args))
    except CliError as exc:
        return _fail(exc, exc.code)
    except CorruptSessionError as exc:
        return _fail(f"{_reason(exc)} (run: sessionkit check STORE)", EXIT_DAMAGED)
    except LockTimeout as exc:
        return _fail(f"{exc}: another process has it open", EXIT_STORE)
    except (StorageError, LockLost, SessionError) as exc:
        return _fail(exc, EXIT_STORE)
    except BrokenPipeError:  # e.g. `sessionkit ls STORE | head`: the reader has all it wants
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit does not fail again
        return EXIT_OK
    except OSError as exc:  # e.g. a store's file that vanished while it was read
        return _fail(exc, EXIT_STORE)
    except KeyboardInterrupt:
        _err("sessionkit: interrupted")
        return 130


def _fail(message: object, code: int) -> int:
    """Report an error in one line on stderr; returns ``code``."""
    sys.stdout.flush()
    _err(f"sessionkit: {_one_line(message)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
