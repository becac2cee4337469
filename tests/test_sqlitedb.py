"""SqliteDb (sessionkit/storage/_sqlitedb.py): dbm.sqlite3's format, any thread.

Real files in tmp_path, real threads and real processes.  The child
processes import ``_sqlitedb`` straight from its directory rather than
through the ``sessionkit`` package, which keeps their start-up short.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from sessionkit.storage import _sqlitedb
from sessionkit.storage._sqlitedb import SqliteDb

MODULE_DIR = os.path.dirname(os.path.abspath(_sqlitedb.__file__))

try:
    import dbm.sqlite3 as dbm_sqlite3
except ImportError:  # Python < 3.13
    dbm_sqlite3 = None  # type: ignore[assignment]

needs_dbm_sqlite3 = pytest.mark.skipif(
    dbm_sqlite3 is None, reason="dbm.sqlite3 is new in Python 3.13; this Python has no dbm.sqlite3"
)


def child(script: str, *args: str, **popen: Any) -> subprocess.Popen[bytes]:
    """A Python process running ``script`` with ``_sqlitedb`` importable.

    ``-S`` (no ``site``): the children need nothing outside the standard
    library and this module, and start faster without it.
    """
    code = f"import sys\nsys.path.insert(0, {MODULE_DIR!r})\n" + script
    return subprocess.Popen([sys.executable, "-S", "-c", code, *args], **popen)


def side_files(path: Path) -> list[str]:
    """The names in path's directory that start with path's name."""
    return sorted(f for f in os.listdir(path.parent) if f.startswith(path.name))


# -- the dbm interface -------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "odd name?#%.db"  # '?', '#' and '%' mean something in an SQLite URI
    values = {
        b"plain": b"value",
        b"": b"the empty key",
        b"empty value": b"",
        bytes(range(256)): bytes(range(256))[::-1],
        b"big": os.urandom(1 << 20),
    }
    with SqliteDb(path) as db:
        for key, value in values.items():
            db[key] = value
        db[b"plain"] = b"replaced"
        values[b"plain"] = b"replaced"
        for key, value in values.items():
            assert db[key] == value
            assert db.get(key) == value
            assert type(db[key]) is bytes
        db.sync()
    with SqliteDb.open(path, create=False) as db:
        assert {key: db[key] for key in db} == values


def test_keys_len_contains_delete(tmp_path: Path) -> None:
    db = SqliteDb(tmp_path / "db")
    assert len(db) == 0 and db.keys() == [] and list(db) == []
    assert db.get(b"a") is None and db.get(b"a", b"dflt") == b"dflt"
    with pytest.raises(KeyError):
        db[b"a"]
    with pytest.raises(KeyError):
        del db[b"a"]
    for i in range(10):
        db[b"k%d" % i] = b"v%d" % i
    db[b"k3"] = b"again"
    assert len(db) == 10
    assert sorted(db.keys()) == sorted(b"k%d" % i for i in range(10))
    assert b"k3" in db and b"k10" not in db
    del db[b"k3"]
    assert b"k3" not in db and len(db) == 9 and db.get(b"k3") is None
    with pytest.raises(KeyError):
        del db[b"k3"]
    assert sorted(db) == sorted(db.keys())
    db.close()


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    db = SqliteDb(tmp_path / "db")
    db[b"a"] = b"1"
    db.close()
    db.close()
    assert db.closed
    for use in (lambda: db[b"a"], lambda: db.get(b"a"), lambda: db.keys(), lambda: len(db),
                lambda: db.__setitem__(b"a", b"2"), lambda: db.sync()):
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            use()


# -- files --------------------------------------------------------------------------


def test_new_file_and_its_journal_are_0600(tmp_path: Path) -> None:
    path = tmp_path / "sessions"
    old = os.umask(0o022)
    try:
        db = SqliteDb(path)
    finally:
        os.umask(old)
    db[b"k"] = b"v"
    # The rollback journal (created with the file's own mode) stays, empty,
    # between writes; never dbm.sqlite3's WAL and its index.
    assert side_files(path) == ["sessions", "sessions-journal"]
    assert os.path.getsize(tmp_path / "sessions-journal") == 0
    for name in side_files(path):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
    db.close()
    assert side_files(path) == ["sessions", "sessions-journal"]


def test_create_false_on_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError):
        SqliteDb(tmp_path / "missing", create=False)
    assert os.listdir(tmp_path) == []


def test_an_empty_file_is_an_empty_database(tmp_path: Path) -> None:
    path = tmp_path / "db"
    path.touch()  # what dbm.sqlite3 does before it connects
    with SqliteDb(path, create=False) as db:
        assert len(db) == 0
        db[b"a"] = b"b"
    with SqliteDb(path) as db:
        assert db[b"a"] == b"b"


@pytest.mark.parametrize("content", [b"not a database\n" * 100, b"hi", b"\0" * 4096])
def test_a_file_that_is_not_sqlite_fails_at_open(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "db"
    path.write_bytes(content)
    with pytest.raises(sqlite3.DatabaseError):
        SqliteDb(path)
    assert path.read_bytes() == content  # left as it was
    assert side_files(path) == ["db"]


def test_the_format_is_dbm_sqlite3s(tmp_path: Path) -> None:
    """On every Python: the header dbm.whichdb() looks for, the table, a rollback journal, BLOBs."""
    path = tmp_path / "db"
    with SqliteDb(path) as db:
        db[b"key"] = b"value"
    assert path.read_bytes()[:16] == b"SQLite format 3\0"
    cx = sqlite3.connect(str(path))
    try:
        tables = cx.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        assert tables == [("Dict",)]
        columns = [row[1:4] for row in cx.execute("PRAGMA table_info(Dict)")]
        assert columns == [("key", "BLOB", 1), ("value", "BLOB", 1)]
        assert cx.execute("PRAGMA index_list(Dict)").fetchall()[0][2] == 1  # key is UNIQUE
        assert cx.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # not WAL (TRUNCATE is per connection)
        assert cx.execute("SELECT typeof(key), typeof(value) FROM Dict").fetchall() == [("blob", "blob")]
    finally:
        cx.close()


@needs_dbm_sqlite3
def test_reads_what_dbm_sqlite3_wrote(tmp_path: Path) -> None:
    import dbm

    path = tmp_path / "db"
    with dbm_sqlite3.open(path, "c") as theirs:
        theirs[b"bytes"] = b"1"
        theirs["text"] = "2"  # dbm.sqlite3 stores str as its UTF-8 bytes
        theirs[b"gone"] = b"3"
        del theirs[b"gone"]
    with SqliteDb(path, create=False) as db:
        assert sorted(db.keys()) == [b"bytes", b"text"]
        assert db[b"bytes"] == b"1" and db[b"text"] == b"2"
        db[b"mine"] = b"4"
    assert dbm.whichdb(str(path)) == "dbm.sqlite3"


@needs_dbm_sqlite3
def test_dbm_sqlite3_reads_what_we_wrote(tmp_path: Path) -> None:
    import dbm

    path = tmp_path / "db"
    with SqliteDb(path) as db:
        db[b"a"] = b"1"
        db[b"b"] = bytes(range(256))
        # both open at once: each sees the other's writes
        with dbm_sqlite3.open(path, "w") as theirs:
            assert theirs[b"a"] == b"1"
            theirs[b"c"] = b"3"
            db[b"d"] = b"4"
            assert theirs[b"d"] == b"4"
        assert db[b"c"] == b"3"
    assert dbm.whichdb(str(path)) == "dbm.sqlite3"
    with dbm.open(str(path), "r") as theirs:
        assert sorted(theirs.keys()) == [b"a", b"b", b"c", b"d"]
        assert theirs[b"b"] == bytes(range(256))


# -- threads and processes ----------------------------------------------------------


def test_any_thread_may_use_it(tmp_path: Path) -> None:
    db = SqliteDb(tmp_path / "db")  # opened here, used only from the workers
    lock = threading.Lock()
    errors: list[BaseException] = []
    rounds = 50

    def work() -> None:
        try:
            for _ in range(rounds):
                with lock:
                    db[b"counter"] = b"%d" % (int(db.get(b"counter", b"0")) + 1)
                    assert b"counter" in db
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert db[b"counter"] == b"%d" % (8 * rounds)
    db.close()


def test_another_process_sees_writes_without_reopening(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = SqliteDb(path)
    db[b"a"] = b"before the child opened"
    script = (
        "from _sqlitedb import SqliteDb\n"
        "db = SqliteDb(sys.argv[1], create=False)\n"
        "assert db[b'a'] == b'before the child opened'\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "print(db[b'a'].decode(), flush=True)\n"
        "db[b'b'] = b'from the child'\n"
        "print('wrote', flush=True)\n"
        "sys.stdin.readline()\n"  # stay open while the parent reads
    )
    with child(script, str(path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert proc.stdout.readline() == "ready\n"
            db[b"a"] = b"after the child opened"
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "after the child opened\n"
            assert proc.stdout.readline() == "wrote\n"
            assert db[b"b"] == b"from the child"  # same connection, never reopened
            assert len(db) == 2 and sorted(db.keys()) == [b"a", b"b"]
            proc.stdin.write("done\n")
            proc.stdin.flush()
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    db.close()


def test_a_write_waits_for_another_process_holding_the_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = SqliteDb(path)
    script = (
        "import sqlite3, time\n"
        "cx = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "cx.execute('BEGIN IMMEDIATE')\n"
        "cx.execute(\"INSERT INTO Dict VALUES (x'01', x'01')\")\n"
        "print('locked', flush=True)\n"
        "time.sleep(1.0)\n"
        "print(time.monotonic(), flush=True)\n"
        "cx.execute('COMMIT')\n"
    )
    with child(script, str(path), stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"locked\n"
        start = time.monotonic()
        db[b"mine"] = b"waited"  # would raise "database is locked" with no busy timeout
        end = time.monotonic()
        about_to_commit = float(proc.stdout.readline())
        # the write ended after the other process, holding the lock all along, came to commit
        # (CLOCK_MONOTONIC is system-wide)
        assert end > about_to_commit, (start, about_to_commit, end)
        assert proc.wait(10) == 0
    assert db[b"\x01"] == b"\x01" and db[b"mine"] == b"waited"

    # A lock held for longer than the timeout: the error comes through.
    short = SqliteDb(path, timeout=0.1)
    blocker = sqlite3.connect(str(path), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            short[b"x"] = b"y"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    short[b"x"] = b"y"
    short.close()
    db.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # 3.12+: fork with threads
def test_a_forked_child_must_reopen(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = SqliteDb(path)
    db[b"parent"] = b"1"
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            try:
                db.get(b"parent")
                code = 2  # the inherited connection must be refused
            except sqlite3.ProgrammingError:
                db.close()  # right in the child: releases the inherited connection
                with SqliteDb(path) as mine:
                    code = 0 if mine[b"parent"] == b"1" else 3
                    mine[b"child"] = b"2"
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert db[b"child"] == b"2"  # the parent's connection carries on
    db[b"parent"] = b"again"
    db.close()
    with SqliteDb(path) as db:
        assert db[b"parent"] == b"again" and db[b"child"] == b"2"


# -- crashes ------------------------------------------------------------------------

WRITER = r"""
import os, random, zlib
from _sqlitedb import SqliteDb
path, cycle = sys.argv[1], int(sys.argv[2])
rng = random.Random(cycle)
db = SqliteDb(path)
i = 0
while True:
    i += 1
    body = b"%d:%d:" % (cycle, i) + rng.randbytes(rng.choice((8, 300, 9000)))
    value = zlib.crc32(body).to_bytes(4, "little") + body
    db[b"c%d-%d" % (cycle, i)] = value
    db[b"slot%d-%d" % (cycle, i % 4)] = value
    if i % 5 == 0:
        del db[b"c%d-%d" % (cycle, i - 1)]
    os.write(1, b"%d\n" % i)  # acknowledged: every write of round i returned
"""


def _counter(value: bytes, cycle: int) -> int:
    """The round that wrote ``value``, after checking its crc and cycle."""
    crc, body = int.from_bytes(value[:4], "little"), value[4:]
    assert zlib.crc32(body) == crc, "a torn value"
    c, i, _ = body.split(b":", 2)
    assert int(c) == cycle
    return int(i)


def _check_cycle(db: SqliteDb, cycle: int, acked: int) -> None:
    """Everything that round ``acked`` of ``cycle`` acknowledged is there."""
    flight = acked + 1  # the round the kill may have cut short
    for i in range(1, acked + 1):
        key = b"c%d-%d" % (cycle, i)
        deleted_by = i + 1 if (i + 1) % 5 == 0 else None
        if deleted_by is not None and deleted_by <= acked:
            assert key not in db, key
        elif deleted_by == flight:
            pass  # deleted, or not yet
        else:
            assert _counter(db[key], cycle) == i, key
    for slot in range(4):
        last = max((i for i in range(1, acked + 1) if i % 4 == slot), default=None)
        value = db.get(b"slot%d-%d" % (cycle, slot))
        if last is not None:
            assert value is not None
            allowed = (last, flight) if flight % 4 == slot else (last,)
            assert _counter(value, cycle) in allowed
        elif value is not None:
            assert _counter(value, cycle) == flight and flight % 4 == slot
    for key in db:  # nothing from a round that never began
        if key.startswith(b"c%d-" % cycle):
            assert int(key.split(b"-")[1]) <= flight, key


def test_kill_9_loses_nothing_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "db"
    rng = random.Random(1234)
    acked: dict[int, int] = {}
    watcher: SqliteDb | None = None
    for cycle in range(30):
        if cycle == 15:
            # From here on this process keeps a connection open across the
            # kills (as the shelf does); before, nothing holds the file and
            # each open after a kill recovers the WAL the writer left.
            watcher = SqliteDb(path)
        with child(WRITER, str(path), str(cycle), stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            if cycle % 6 == 5:
                time.sleep(rng.uniform(0, 0.06))  # anywhere from start-up to the first writes
                out = b""
            else:
                out = proc.stdout.readline()
                assert out, proc.stderr.read().decode()
                time.sleep(rng.uniform(0, 0.025))
            proc.send_signal(signal.SIGKILL)
            out += proc.stdout.read()
            err = proc.stderr.read().decode()
            assert proc.wait() == -signal.SIGKILL, err
        lines = out.split(b"\n")[:-1]  # a line cut short acknowledges nothing
        acked[cycle] = int(lines[-1]) if lines else 0
        assert [int(line) for line in lines] == list(range(1, acked[cycle] + 1))
        with SqliteDb(path) as fresh:
            for done, n in acked.items():
                _check_cycle(fresh, done, n)
        if watcher is not None:
            for done, n in acked.items():
                _check_cycle(watcher, done, n)
    assert watcher is not None
    watcher.close()
    assert sum(1 for n in acked.values() if n) >= 20  # most kills landed mid-writing
    cx = sqlite3.connect(str(path))
    try:
        assert cx.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        cx.close()
