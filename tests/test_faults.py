"""Faults that docs/reliability.rst lists and no other test file covered.

Each test makes the fault for real: a process that runs without root's
power to ignore file modes, a read-only mount, a truncated file, a process
stopped with ``SIGSTOP`` past its lock's expiry, a Redis server out of
memory, a fork while another thread holds a key.  The check is always the
same: the caller gets a value it wrote or a ``SessionError``, never a raw
exception, and no acknowledged write goes missing without an error.
"""

from __future__ import annotations

import contextlib

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from sessionkit import (
    CorruptSessionError,
    LockLost,
    MemoryStorage,
    MsgpackFileStorage,
    RedisStorage,
    SessionError,
    Sessions,
    ShelveStorage,
    StorageError,
)

from . import redis_servers
from .conftest import redis_client
from .helpers import tmpfs

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
SETPRIV = shutil.which("setpriv")
needs_setpriv = pytest.mark.skipif(
    not IS_ROOT or SETPRIV is None, reason="needs root and setpriv to drop the power to ignore file modes"
)
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="this platform has no os.fork")


def run_without_root_powers(code: str, *args: str) -> dict[str, Any]:
    """Run ``code`` in a process that obeys file modes (no CAP_DAC_OVERRIDE); its last line is JSON."""
    assert SETPRIV is not None
    argv = [SETPRIV, "--bounding-set", "-dac_override,-dac_read_search", "--",
            sys.executable, "-c", code, *args]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]  # not even from a background thread
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# A worker that tries every operation and reports what each one did: a value,
# the name of a SessionError subclass (with the path it names), or "raw ..."
# for any other exception, which is a defect.
_TRY_EVERYTHING = r"""
import json, sys
from sessionkit import MsgpackFileStorage, ShelveStorage, SessionError
kind, path = sys.argv[1], sys.argv[2]
report = {}

def attempt(name, fn):
    try:
        report[name] = ["ok", fn()]
    except SessionError as exc:
        report[name] = [type(exc).__name__, exc.path]
    except Exception as exc:
        report[name] = ["raw " + type(exc).__name__, str(exc)]

opened = []
attempt("open", lambda: opened.append((MsgpackFileStorage if kind == "msgpack" else ShelveStorage)(path)))
if opened:
    storage = opened[0]
    attempt("read", lambda: storage.read("a"))
    attempt("write", lambda: storage.write("a", 2))
    attempt("new key", lambda: storage.write("new", 3))
    attempt("delete", lambda: storage.delete("b"))
    acked = None
    refused = 0
    for i in range(300):  # enough dead bytes for a merge (msgpack) or a compaction (dbm.dumb)
        try:
            storage.write("hot", {"i": i, "pad": "x" * 2000})
            acked = i
        except SessionError:
            refused += 1
    report["hot"] = [acked, refused]
    attempt("read again", lambda: [storage.read("a"), storage.read("hot")["i"]])
    storage.close()
print(json.dumps(report))
"""


def store_path(kind: str, tmp_path: Path) -> Path:
    return tmp_path / "store" if kind == "msgpack" else tmp_path / "shelf" / "sessions"


def make(kind: str, path: Path) -> Any:
    return MsgpackFileStorage(path, shards=1) if kind == "msgpack" else ShelveStorage(path, dbm="dumb")


def raw_errors(report: dict[str, Any]) -> list[Any]:
    return [(name, outcome) for name, outcome in report.items() if str(outcome[0]).startswith("raw")]


# -- permission denied ---------------------------------------------------------------


@needs_setpriv
@pytest.mark.parametrize("mode", [0o000, 0o400], ids=["no-access", "read-only-files"])
def test_msgpack_files_the_process_may_not_use_are_storage_errors(tmp_path: Path, mode: int) -> None:
    """Store files this process may not open give StorageError naming the path; the data stays."""
    path = store_path("msgpack", tmp_path)
    storage = make("msgpack", path)
    storage.write("a", 1)
    storage.write("b", 1)
    storage.close()
    files = [p for p in path.iterdir() if p.is_file() and p.name != "sessionkit.lock"]
    for p in files:
        os.chmod(p, mode)
    try:
        report = run_without_root_powers(_TRY_EVERYTHING, "msgpack", str(path))
    finally:
        for p in files:
            os.chmod(p, 0o600)
    assert raw_errors(report) == []
    if mode == 0:  # even the FORMAT file: the store does not open
        assert report["open"] == ["StorageError", str(path)]
    else:  # opened, but a log opens for reading and writing, so every operation on it is refused
        assert report["open"][0] == "ok"
        for name in ("read", "write", "new key", "delete"):
            assert report[name][0] == "StorageError" and str(path) in report[name][1], (name, report)
        assert report["hot"] == [None, 300]
    again = MsgpackFileStorage(path)
    assert (again.read("a"), again.read("b"), again.read("hot")) == (1, 1, None)


# -- read-only directory -----------------------------------------------------------


@needs_setpriv
@pytest.mark.parametrize("kind", ["msgpack", "shelve-dumb"])
def test_a_read_only_directory_refuses_only_what_needs_a_new_file(tmp_path: Path, kind: str) -> None:
    """A store directory the process may not write in: existing files still work; nothing is lost."""
    backend = kind.split("-")[0]
    path = store_path(backend, tmp_path)
    storage = make(backend, path)
    storage.write("a", 1)
    storage.write("b", 1)
    storage.close()
    directory = path if backend == "msgpack" else path.parent
    os.chmod(directory, 0o500)
    try:
        report = run_without_root_powers(_TRY_EVERYTHING, backend, str(path))
    finally:
        os.chmod(directory, 0o700)
    assert raw_errors(report) == []
    assert report["open"][0] == "ok" and report["read"] == ["ok", 1]
    assert report["write"] == ["ok", None]  # the log (or .dat and .dir) exists and may be written
    acked, refused = report["hot"]
    assert acked is not None
    after = make(backend, path)
    assert after.read("a") == 2 and after.read("b") is None
    assert after.read("hot")["i"] == acked  # the last acknowledged rewrite, merged or not
    # the new key lands in a file that exists (one msgpack shard, or the
    # shelf's .dat and .dir); a merge or compaction that cannot create its
    # new files is put off, and no write is refused
    assert report["new key"] == ["ok", None] and refused == 0
    assert after.read("new") == 3
    after.close()


@pytest.mark.skipif(not IS_ROOT, reason="mounting a tmpfs needs root")
def test_a_shelf_on_a_read_only_file_system_is_refused_and_kept(tmp_path: Path) -> None:
    """The lock file must open for writing: on a read-only mount the shelf does not open at all."""
    with tmpfs(tmp_path / "fs", "1m") as mount:
        path = mount / "sessions"
        storage = ShelveStorage(path, dbm="dumb")
        storage.write("a", 1)
        storage.close()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        try:
            with pytest.raises(StorageError) as info:
                ShelveStorage(path)
            assert info.value.path == str(path) + ".lock" and isinstance(info.value.__cause__, OSError)
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
        assert ShelveStorage(path).read("a") == 1


# -- truncated files ------------------------------------------------------------------


def test_a_shelf_data_file_cut_short_is_corrupt_session_error(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    storage = ShelveStorage(path, dbm="dumb")
    for i in range(20):
        storage.write(f"k{i}", {"i": i})
    storage.close()
    dat = Path(path + ".dat")
    os.truncate(dat, dat.stat().st_size // 2)
    storage = ShelveStorage(path)
    assert storage.read("k0") == {"i": 0}  # its value lies before the cut
    with pytest.raises(CorruptSessionError) as info:
        storage.read("k19")
    assert info.value.path == str(dat) and "cut short" in str(info.value)
    with pytest.raises(CorruptSessionError):
        list(storage.keys())
    storage.close()


def test_a_shelf_index_file_cut_short_is_not_a_silent_loss(tmp_path: Path) -> None:
    """A ``.dir`` shorter than the shelf recorded it had grown is refused, in a new process's open and
    in one that had the shelf open; ``clear_crash_mark`` takes the files as they are."""
    path = str(tmp_path / "s")
    storage = ShelveStorage(path, dbm="dumb")
    for i in range(20):
        storage.write(f"k{i}", {"i": i})
    index = Path(path + ".dir")
    os.truncate(index, index.stat().st_size // 2)
    with pytest.raises(CorruptSessionError, match="cut short"):
        storage.write("k0", {"i": "new"})  # never appended after a hole where lines were
    storage.close()
    with pytest.raises(CorruptSessionError, match="cut short"):
        ShelveStorage(path).read("k19")
    ShelveStorage.clear_crash_mark(path)
    again = ShelveStorage(path)
    assert again.read("k0") == {"i": 0} and again.read("k19") is None
    again.write("k19", {"i": "again"})
    again.close()
    assert ShelveStorage(path).read("k19") == {"i": "again"}


def test_a_shelf_whose_files_were_deleted_starts_empty_not_cut_short(tmp_path: Path) -> None:
    """Deleting a dbm.dumb shelf's files (the lock file kept) starts it afresh, even when the new
    ``.dir`` gets the deleted one's inode number back, as ext4 often gives it."""
    path = str(tmp_path / "s")
    for attempt in range(5):
        storage = ShelveStorage(path, dbm="dumb")
        for i in range(20):
            storage.write(f"k{i}", {"i": i})
        storage.close()
        for suffix in (".dir", ".dat", ".bak"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + suffix)
        again = ShelveStorage(path)
        assert again.read("k0") is None and list(again.keys()) == []
        again.close()


@pytest.mark.parametrize("after", ["rebuilt", "grown"])
def test_a_deletion_cut_from_a_msgpack_log_after_an_index_rebuild_is_not_undone(
    tmp_path: Path, after: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index built anew from the log (after a writer was killed mid-write) or grown keeps no slot for
    a deleted session; a log cut before that deletion does not bring the old value back: the deletion is
    made again in the log, so it holds after the index is gone too (as after a machine restart), while a
    session before the cut reads back."""
    from sessionkit.storage import _index

    path = store_path("msgpack", tmp_path)
    storage = MsgpackFileStorage(path, shards=1)
    storage.write("alice", {"card": "old"})
    storage.write("bob", {"n": 1})
    log = path / "shard-000.log"
    cut = log.stat().st_size  # the log up to here holds alice's value
    storage.delete("alice")
    shard = storage._shards[0]
    if after == "rebuilt":
        with shard.mutex:
            _index._U64.pack_into(shard.map, _index.DIRTY_AT, 1)  # what a writer killed mid-write leaves
        storage.write("carol", {"n": 1})  # this section indexes the log anew
    else:
        from sessionkit.storage import _shard

        monkeypatch.setattr(_shard.MERGER, "request", lambda shard: None)  # a merge would drop the deletion
        capacity = shard.table.capacity
        n = 0
        while shard.table.capacity == capacity:
            storage.write(f"k{n}", n)
            n += 1
    assert storage.read("alice") is None
    storage.close()
    os.truncate(log, cut)
    again = MsgpackFileStorage(path, shards=1)
    try:
        assert again.read("alice") is None
        assert again.read("bob") == {"n": 1}
        assert sorted(again.keys()) == ["bob"]
    finally:
        again.close()
    for index in path.glob("*.idx"):  # no process has the store open: an index is only a cache
        index.unlink()
    fresh = MsgpackFileStorage(path, shards=1)
    assert fresh.read("alice") is None and fresh.read("bob") == {"n": 1}
    fresh.close()


def _cut_after_deleting_alice(path: Path, clock: Any = None) -> None:
    """alice and bob written, the log's length noted, alice deleted, carol written (the index rebuilt
    first, as after a writer killed mid-write), then the log cut back to that length.  With ``clock`` (a
    one-item list), sessions live 60 s, and alice has expired when she is deleted."""
    from sessionkit.storage import _index

    if clock is None:
        storage = MsgpackFileStorage(path, shards=1)
    else:
        storage = MsgpackFileStorage(path, shards=1, ttl=60, clock=lambda: clock[0])
    storage.write("alice", {"card": "old"})
    if clock is not None:
        clock[0] += 3600
    storage.write("bob", {"n": 1})
    log = path / "shard-000.log"
    cut = log.stat().st_size
    storage.delete("alice")
    shard = storage._shards[0]
    with shard.mutex:
        _index._U64.pack_into(shard.map, _index.DIRTY_AT, 1)  # what a writer killed mid-write leaves
    storage.write("carol", {"n": 1})
    storage.close()
    os.truncate(log, cut)


def test_sessions_reported_after_a_cut_stay_reported_through_later_rebuilds_and_merges(tmp_path: Path) -> None:
    """A mark left by the open that found the cut is not dropped by the next index rebuild (a writer killed
    mid-write) or by a merge: carol (write cut) keeps raising, never reading as absent, until written or
    deleted, and alice (deletion cut) stays deleted; the shard is still merged, so its log stays bounded."""
    from sessionkit.storage import _index, _shard

    path = store_path("msgpack", tmp_path)
    _cut_after_deleting_alice(path)
    again = MsgpackFileStorage(path, shards=1)
    try:
        with pytest.raises(CorruptSessionError, match="was cut from"):
            again.read("carol")
        assert again.read("alice") is None
        shard = again._shards[0]
        with shard.mutex:
            _index._U64.pack_into(shard.map, _index.DIRTY_AT, 1)
        again.write("dave", {"n": 1})  # indexed anew
        assert _shard.MERGER.wait()
        assert shard.merge(time.time(), wait=True, force=True)
        log_size = (path / "shard-000.log").stat().st_size
        with pytest.raises(CorruptSessionError, match="was cut from"):
            again.read("carol")
        assert again.read("alice") is None
        for i in range(3000):  # 3 MB of rewrites of one key: merges keep the log bounded
            again.write("bob", {"n": i, "pad": "x" * 1000})
        assert _shard.MERGER.wait()
        assert (path / "shard-000.log").stat().st_size < log_size + 6_000_000
        with pytest.raises(CorruptSessionError, match="was cut from"):
            again.read("carol")
        assert again.read("alice") is None
        assert again.read("bob")["n"] == 2999 and again.read("dave") == {"n": 1}
        again.write("carol", 2)
        assert again.read("alice") is None and again.read("carol") == 2
    finally:
        again.close()
    fresh = MsgpackFileStorage(path, shards=1)
    assert fresh.read("alice") is None and fresh.read("carol") == 2
    fresh.close()


def test_an_expired_session_whose_deletion_was_cut_reads_as_absent(tmp_path: Path) -> None:
    path = store_path("msgpack", tmp_path)
    clock = [time.time() - 1800]  # behind the real clock: the store's own clock decides what expired
    _cut_after_deleting_alice(path, clock)
    again = MsgpackFileStorage(path, shards=1, ttl=60, clock=lambda: clock[0])
    try:
        assert again.read("alice") is None
        assert again.read("bob") == {"n": 1}
    finally:
        again.close()


def test_a_session_whose_cut_write_expired_since_reads_as_absent_and_its_report_goes(tmp_path: Path) -> None:
    """A cut write is reported only until the session would have expired; then it reads as absent (by the
    store's clock), and a purge drops the report."""
    path = store_path("msgpack", tmp_path)
    clock = [time.time() - 7200]
    storage = MsgpackFileStorage(path, shards=1, ttl=60, clock=lambda: clock[0])
    storage.write("alice", {"v": 1})
    log = path / "shard-000.log"
    cut = log.stat().st_size
    storage.write("alice", {"v": 2})
    storage.write("bob", {"v": 1})
    storage.close()
    os.truncate(log, cut)
    again = MsgpackFileStorage(path, shards=1, ttl=60, clock=lambda: clock[0])
    try:
        with pytest.raises(CorruptSessionError):
            again.read("alice")  # never its older value
        clock[0] += 3600
        assert again.read("alice") is None and again.read("bob") is None
        assert again._shards[0].table.corrupt == 2
        again.purge_expired()
        assert again._shards[0].table.corrupt == 0
        assert again.read("alice") is None
    finally:
        again.close()


def test_check_names_sessions_a_cut_log_lost(tmp_path: Path) -> None:
    """``sessionkit check`` reports a log shorter than its index before any process opened it, and the
    sessions the index reports after one did: by name when the log still holds an older record of the
    session, else by count; writing or removing them settles it."""
    path = store_path("msgpack", tmp_path)
    _cut_after_deleting_alice(path)

    def check() -> tuple[int, str]:
        done = subprocess.run([sys.executable, "-m", "sessionkit", "check", f"msgpack:{path}"],
                              capture_output=True, text=True, timeout=60)
        return done.returncode, done.stdout + done.stderr

    rc, out = check()
    assert rc == 1 and "but its index says it reached byte" in out, out
    log = path / "shard-000.log"
    before = log.read_bytes()
    for command in (["ls"], ["show", "bob"]):  # they would open the log, which records the cut: they refuse
        done = subprocess.run([sys.executable, "-m", "sessionkit", command[0], f"msgpack:{path}", *command[1:]],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 4 and "sessionkit check" in done.stderr, (command, done.stderr)
    assert log.read_bytes() == before
    again = MsgpackFileStorage(path, shards=1)
    assert again.read("alice") is None  # her deletion is made again
    with pytest.raises(CorruptSessionError):
        again.read("carol")
    again.close()
    rc, out = check()
    assert rc == 1, out
    assert "reports 1 session(s) damaged" in out and "alice" not in out, out  # carol: no key left in the log
    again = MsgpackFileStorage(path, shards=1)
    again.write("bob", {"n": 2})
    again.write("bob", {"n": 3})
    cut = log.stat().st_size
    again.write("bob", {"n": 4})
    again.close()
    os.truncate(log, cut)
    again = MsgpackFileStorage(path, shards=1)
    with pytest.raises(CorruptSessionError):
        again.read("bob")
    again.close()
    rc, out = check()
    assert rc == 1 and "session 'bob': the index of" in out and "reports 1 session(s)" in out, out
    assert subprocess.run([sys.executable, "-m", "sessionkit", "rm", f"msgpack:{path}", "bob"],
                          capture_output=True, timeout=60).returncode == 0
    again = MsgpackFileStorage(path, shards=1)
    again.write("carol", 1)
    again.close()
    assert check() == (0, check()[1])


def test_a_shard_with_a_damaged_record_kept_in_place_is_not_merged(tmp_path: Path) -> None:
    """A record failing its checksum stays in the log for recovery: no merge drops it."""
    from sessionkit.storage import _records

    path = store_path("msgpack", tmp_path)
    storage = MsgpackFileStorage(path, shards=1)
    storage.write("a", {"n": 1})
    storage.write("b", {"n": 1})
    storage.close()
    log = path / "shard-000.log"
    data = bytearray(log.read_bytes())
    data[_records.HEADER_SIZE + len(_records.MAGIC) + 2] ^= 0xFF  # in a's record, not the last one
    log.write_bytes(bytes(data))
    for idx in path.glob("*.idx"):
        idx.unlink()
    again = MsgpackFileStorage(path, shards=1)
    try:
        with pytest.raises(CorruptSessionError):
            again.read("a")
        assert not again._shards[0].merge(time.time(), wait=True, force=True)
        assert bytes(data) == log.read_bytes()[: len(data)]
    finally:
        again.close()


@pytest.mark.skipif(not IS_ROOT, reason="mounting a tmpfs needs root")
def test_a_cut_found_on_a_full_disk_reports_until_there_is_room_never_serving_an_older_value(
    tmp_path: Path,
) -> None:
    """The open that finds a cut cannot write its new index (a full disk) and reads from memory; nothing
    is appended to the log then, so once there is room the rebuild finds the same cut: the session whose
    newest write was cut is reported throughout, never read at its older value, and the sessions whose
    deletion was cut are reported until the deletions are made again, then."""
    with tmpfs(tmp_path / "fs", "1m") as mount:
        path = mount / "store"
        storage = MsgpackFileStorage(path, shards=1)
        for i in range(10):
            storage.write(f"a{i}", 1)
        storage.write("X", "v1")
        log = path / "shard-000.log"
        cut = log.stat().st_size
        storage.write("X", "v2")
        for i in range(10):
            storage.delete(f"a{i}")
        storage.close()
        os.truncate(log, cut)
        filler = mount / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        again = MsgpackFileStorage(path, shards=1)
        try:
            with pytest.raises(CorruptSessionError):
                again.read("X")
            assert log.stat().st_size == cut
            with pytest.raises(CorruptSessionError):
                again.read("a0")  # not deleted again yet (no room): reported, never its old value
            filler.unlink()
            time.sleep(1.2)  # a section a second later writes the index out
            with pytest.raises(CorruptSessionError):
                again.read("X")
            assert all(again.read(f"a{i}") is None for i in range(10))
        finally:
            again.close()
        for index in path.glob("*.idx"):
            index.unlink()
        fresh = MsgpackFileStorage(path, shards=1)
        assert all(fresh.read(f"a{i}") is None for i in range(10))  # made again in the log
        fresh.close()


def test_a_merge_under_way_when_the_log_is_cut_and_indexed_anew_gives_up(tmp_path: Path) -> None:
    """A merge copies the log outside the lock; if the log is cut and indexed anew meanwhile (same file),
    installing that copy would bring back the cut log and lose what was written since: it gives up."""
    from sessionkit.storage import _shard

    path = store_path("msgpack", tmp_path)
    storage = MsgpackFileStorage(path, shards=1)
    for i in range(50):
        storage.write(f"k{i}", {"i": i})
    for i in range(50):
        storage.write(f"k{i}", {"i": i, "again": True})
    shard = storage._shards[0]
    log = path / "shard-000.log"
    cut = log.stat().st_size // 2
    other = MsgpackFileStorage(path, shards=1)  # another handle: the same shard state in this process
    real_catch_up = _shard.Shard._catch_up

    def cut_meanwhile(self: Any, *args: Any) -> Any:
        os.truncate(log, cut)
        with self.mutex:
            _index_mark_dirty(self)
        other.write("Y", "written after the cut")
        other.delete("k0")
        return real_catch_up(self, *args)

    try:
        _shard.Shard._catch_up = cut_meanwhile  # type: ignore[method-assign]
        merged = shard.merge(time.time(), wait=True, force=True)
    finally:
        _shard.Shard._catch_up = real_catch_up  # type: ignore[method-assign]
    try:
        assert not merged
        assert storage.read("Y") == "written after the cut" and storage.read("k0") is None
    finally:
        other.close()
        storage.close()
    fresh = MsgpackFileStorage(path, shards=1)
    assert fresh.read("Y") == "written after the cut" and fresh.read("k0") is None
    fresh.close()


def _index_mark_dirty(shard: Any) -> None:
    from sessionkit.storage import _index

    _index._U64.pack_into(shard.map, _index.DIRTY_AT, 1)  # the next section indexes the log anew


def test_a_msgpack_log_whose_newest_record_was_cut_reports_that_session(tmp_path: Path) -> None:
    """A cut inside the newest record of a log whose index is whole is damage, not a crashed append:
    the index was updated after the record was written, so the write was acknowledged.  The session
    is reported, not served at its older value; every other session reads back."""
    path = store_path("msgpack", tmp_path)
    storage = make("msgpack", path)
    for i in range(20):
        storage.write(f"k{i}", {"i": i})
    storage.write("k0", {"i": "newest"})
    storage.close()
    log = path / "shard-000.log"
    os.truncate(log, log.stat().st_size - 3)
    again = MsgpackFileStorage(path)
    with pytest.raises(CorruptSessionError, match="cut short"):
        again.read("k0")
    assert [again.read(f"k{i}") for i in range(1, 20)] == [{"i": i} for i in range(1, 20)]
    again.write("k0", {"i": "anew"})  # writing it again is how the owner goes on without it
    assert again.read("k0") == {"i": "anew"}
    again.close()


def test_a_msgpack_log_cut_short_mid_history_is_not_a_silent_loss(tmp_path: Path) -> None:
    """Every session whose newest record was cut away is reported, and every one whose deletion was
    stays deleted, in this process and in one that had the store open; the sessions before the cut
    read back."""
    path = store_path("msgpack", tmp_path)
    storage = make("msgpack", path)
    for i in range(20):
        storage.write(f"k{i}", {"i": i})
    storage.write("k1", {"i": "newer"})
    storage.delete("k2")  # a deletion cut away must not bring the old value back
    log = path / "shard-000.log"
    os.truncate(log, log.stat().st_size // 2)
    fresh = MsgpackFileStorage(path)
    for reader in (fresh, storage):
        outcomes = {}
        for i in range(20):
            try:
                outcomes[i] = reader.read(f"k{i}")
            except CorruptSessionError:
                outcomes[i] = "reported"
        assert outcomes[1] == "reported" and outcomes[2] is None, outcomes
        assert all(outcomes[i] in ({"i": i}, "reported") for i in range(20) if i != 2), outcomes
        kept = [i for i in range(20) if outcomes[i] not in ("reported", None)]
        assert len(kept) >= 5 and len(kept) <= 15, outcomes
    fresh.close()
    storage.close()


# -- memory: fork and twin objects -----------------------------------------------------


@needs_fork
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_memory_built_before_fork_gives_the_child_its_own_copy(tmp_path: Path) -> None:
    """A key held by a parent's thread is free in the child; the child's writes stay in the child."""
    storage = MemoryStorage()
    sessions = Sessions(storage, initial=dict)
    with sessions.open("k") as s:
        s["n"] = 1
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with sessions.open("k") as s:
            held.set()
            release.wait(30)
            s["n"] += 1

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(10)
    result = tmp_path / "child"
    pid = os.fork()
    if pid == 0:  # the child: no pytest from here on, only os._exit
        code = 1
        try:
            with sessions.open("k", timeout=2) as s:
                s["n"] = 100
            result.write_text(json.dumps(storage.read("k")))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    release.set()
    t.join(10)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert json.loads(result.read_text()) == {"n": 100}
    assert storage.read("k") == {"n": 2}  # the parent never sees the child's write


def test_two_memory_storages_are_two_stores() -> None:
    one, two = MemoryStorage(), MemoryStorage()
    one.write("k", 1)
    assert two.read("k") is None
    with Sessions(one).open("k", timeout=1):
        with Sessions(two).open("k", timeout=1) as s:  # not the same key: no wait, no error
            s.data = 2
    assert (one.read("k"), two.read("k")) == (1, 2)


# -- Redis ----------------------------------------------------------------------------


@pytest.fixture(params=["redis", "redis-cluster"])
def where(request: Any) -> Iterator[tuple[str, Any]]:
    """(kind, server) for a standalone server and for the cluster."""
    fixture = "redis_server" if request.param == "redis" else "redis_cluster"
    yield request.param, request.getfixturevalue(fixture)


def client_for(kind: str, server: Any) -> Any:
    return server.client() if kind == "redis-cluster" else redis_client(server)


_prefixes = iter(range(10**9))


def prefix() -> str:
    return f"faults{next(_prefixes)}-{os.getpid()}:"


_PAUSED_HOLDER = r"""
import sys
import redis
from redis.cluster import RedisCluster
from sessionkit import LockLost, RedisStorage, Sessions
kind, port, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
client = (RedisCluster if kind == "redis-cluster" else redis.Redis)(host="127.0.0.1", port=port)
sessions = Sessions(RedisStorage(client, prefix=prefix, lock_expiry=1.0), initial=dict)
try:
    with sessions.open("k") as s:
        s["n"] = 1
        print("held", flush=True)
        sys.stdin.readline()  # stopped with SIGSTOP meanwhile, then continued
    print("written", flush=True)
except LockLost as exc:
    print("LockLost", exc.key, flush=True)
"""


def test_a_lock_that_expired_while_its_holder_was_stopped_writes_nothing(where: tuple[str, Any]) -> None:
    """The holder is frozen (SIGSTOP) past its lock's expiry; its write is refused."""
    kind, server = where
    port = server.nodes[0].port if kind == "redis-cluster" else server.port
    p = prefix()
    holder = subprocess.Popen([sys.executable, "-c", _PAUSED_HOLDER, kind, str(port), p], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGSTOP)  # its keep-alive thread stops too
        time.sleep(1.5)  # past the 1 s expiry
        storage = RedisStorage(client_for(kind, server), prefix=p)
        with Sessions(storage, initial=dict).open("k", timeout=5) as s:
            assert s.data == {}
            s["n"] = 100
        os.kill(holder.pid, signal.SIGCONT)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "LockLost k"
        assert holder.wait(30) == 0
        assert storage.read("k") == {"n": 100}
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_garbage_bytes_in_a_redis_value_are_corrupt_session_errors(
    where: tuple[str, Any], codec: str
) -> None:
    kind, server = where
    storage = RedisStorage(client_for(kind, server), prefix=prefix(), codec=codec)
    client = client_for(kind, server)
    client.set(storage.prefix + "k", b"\xc1\xff{not a value")
    with pytest.raises(CorruptSessionError) as info:
        storage.read("k")
    assert info.value.key == "k"
    with pytest.raises(CorruptSessionError):
        with Sessions(storage, initial=dict).open("k"):
            pass
    assert client.get(storage.prefix + "k") == b"\xc1\xff{not a value"  # kept, never reset to initial()
    with Sessions(storage, lazy=True).open("k", timeout=5) as s:  # no lock left behind
        s.data = {"fresh": 1}  # assigned before any read: the damaged value is replaced
    assert storage.read("k") == {"fresh": 1}


def test_two_redis_storage_objects_on_one_server_exclude_each_other(where: tuple[str, Any]) -> None:
    """Threads of one process, each through its own RedisStorage object and client: no lost update."""
    kind, server = where
    p = prefix()
    storages = [RedisStorage(client_for(kind, server), prefix=p) for _ in range(2)]
    errors: list[BaseException] = []

    def work(storage: RedisStorage) -> None:
        sessions = Sessions(storage, initial=dict)
        try:
            for _ in range(50):
                with sessions.open("k", timeout=10) as s:
                    s["n"] = s.get("n", 0) + 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(storages[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert storages[0].read("k") == {"n": 200}
    for storage in storages:
        storage.close()


def test_a_redis_server_out_of_memory_is_storage_error_and_keeps_the_old_value(tmp_path: Path) -> None:
    """Redis's own "disk full": a server at its maxmemory refuses the write; the old value stays."""
    server = redis_servers.RedisServer(tmp_path / "oom")
    try:
        client = redis_client(server)
        storage = RedisStorage(client, prefix="oom:")
        sessions = Sessions(storage, initial=dict)
        with sessions.open("k") as s:
            s["v"] = "old"
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", str(used + 200_000))
        with pytest.raises(StorageError) as info:
            with sessions.open("k") as s:
                s["v"] = "x" * 1_000_000
        assert "OutOfMemory" in type(info.value.__cause__).__name__
        client.config_set("maxmemory", "0")
        assert storage.read("k") == {"v": "old"}
        with sessions.open("k", timeout=5) as s:  # no lock left behind
            s["v"] = "new"
        assert storage.read("k") == {"v": "new"}
    finally:
        server.stop()


def test_a_redis_restart_inside_a_block_refuses_its_write(tmp_path: Path) -> None:
    """The server restarts (without persistence) while a block runs: its write-back fails."""
    server = redis_servers.RedisServer(tmp_path / "restart")
    try:
        storage = RedisStorage(redis_client(server, socket_timeout=2, socket_connect_timeout=1), prefix="r:")
        sessions = Sessions(storage, initial=dict)
        with pytest.raises((LockLost, StorageError)) as info:
            with sessions.open("k") as s:
                s["n"] = 1
                server.restart()
        assert isinstance(info.value, SessionError)
        assert storage.read("k") is None  # nothing written after the restart: the lock it held was gone
        with sessions.open("k", timeout=5) as s:
            s["n"] = 2
        assert storage.read("k") == {"n": 2}
    finally:
        server.stop()
