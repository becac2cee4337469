"""What only MsgpackFileStorage promises: processes, crashes, files, bounds."""

from __future__ import annotations

import collections
import fcntl
import gc
import json
import multiprocessing
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sessionkit.storage._lockfile import STRIPES

import pytest

from sessionkit import (
    CorruptSessionError,
    LockTimeout,
    MsgpackFileStorage,
    SessionError,
    Sessions,
    StorageError,
)
from sessionkit.storage import _index as ix
from sessionkit.storage import _lockfile, _records, _shard

from . import workers
from .shelf_writer import read_log
from .helpers import deleted_files_open, refuses_a_value_of, stressed, tmpfs
from .helpers import FakeClock

spawn = multiprocessing.get_context("spawn")


@pytest.fixture
def directory(tmp_path: Path) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def thread_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's background merges made by its merge thread, not a
    helper process (``SESSIONKIT_MERGES=thread``): for what happens in the
    merging process itself."""
    monkeypatch.setenv("SESSIONKIT_MERGES", "thread")


def shard_files(directory: str) -> list[Path]:
    return sorted(Path(directory).glob("shard-*.log"))


# -- concurrency ---------------------------------------------------------------


def test_processes_and_threads_on_distinct_keys_of_one_shard(directory: str) -> None:
    """No two sessions share a key, so no key lock orders them: only the
    shard's section keeps two processes' appends and index updates apart."""
    MsgpackFileStorage(directory, shards=1).close()
    start = spawn.Event()
    procs = [spawn.Process(target=workers.increment_own_keys, args=(directory, f"p{i}", 2000, 2, start))
             for i in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    storage = MsgpackFileStorage(directory)
    counts = {key: storage.read(key)["n"] for key in storage.keys()}
    assert counts == {f"p{i}.{t}.{k}": 500 for i in range(2) for t in range(2) for k in range(4)}
    storage.close()


def test_processes_and_threads_on_many_keys(directory: str) -> None:
    """Two processes and this process's threads, keys spread over all shards."""
    MsgpackFileStorage(directory, shards=2).close()
    keys = [f"k{i}" for i in range(6)]
    procs = [spawn.Process(target=workers.increment, args=(directory, key, 100)) for key in keys[:2]]
    for p in procs:
        p.start()
    storage = MsgpackFileStorage(directory)
    sessions = Sessions(storage, initial=dict)

    def work(key: str) -> None:
        for _ in range(100):
            with sessions.open(key) as s:
                s["n"] = s.get("n", 0) + 1

    threads = [threading.Thread(target=work, args=(key,)) for key in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert {k: storage.read(k)["n"] for k in keys} == {"k0": 200, "k1": 200, "k2": 100, "k3": 100, "k4": 100, "k5": 100}


def test_a_key_held_open_never_delays_another_key_in_the_same_shard(directory: str) -> None:
    storage = MsgpackFileStorage(directory, shards=1)  # every key in one shard
    sessions = Sessions(storage, initial=dict)
    with sessions.open("a") as held:
        held["x"] = 1
        done: list[float] = []

        def other() -> None:
            start = time.monotonic()
            with sessions.open("b", timeout=10) as s:
                s["y"] = 2
            done.append(time.monotonic() - start)

        t = threading.Thread(target=other)
        t.start()
        t.join(20)
        assert done and done[0] < 5  # while "a" is held: no lock of a whole shard or store
    assert storage.read("b") == {"y": 2} and storage.read("a") == {"x": 1}


def test_a_key_held_by_another_process_times_out(directory: str) -> None:
    MsgpackFileStorage(directory).close()
    held, release = spawn.Event(), spawn.Event()
    p = spawn.Process(target=workers.hold, args=(directory, "k", held, release))
    p.start()
    try:
        assert held.wait(60)
        storage = MsgpackFileStorage(directory)
        with pytest.raises(LockTimeout) as info:
            with Sessions(storage).open("k", timeout=0.2):
                pass
        assert info.value.key == "k"
        with Sessions(storage).open("other", timeout=0.2):  # another key is free
            pass
    finally:
        release.set()
        p.join(60)
    with Sessions(storage).open("k", timeout=5):
        pass


def test_reopening_in_the_same_thread_is_an_error(directory: str) -> None:
    sessions = Sessions(MsgpackFileStorage(directory))
    with sessions.open("k"):
        with pytest.raises(SessionError, match="already open"):
            with sessions.open("k"):
                pass


def test_processes_see_each_others_writes_and_compactions(directory: str) -> None:
    mine = MsgpackFileStorage(directory, shards=1)
    mine.write("mine", {"v": 1})
    # another process overwrites a key far more than enough to compact the log
    code = (
        "import sys; from sessionkit import MsgpackFileStorage as M\n"
        "s = M(sys.argv[1])\n"
        "for i in range(3000): s.write('theirs', {'i': i, 'pad': 'x' * 1000})\n"
        "s.close()\n"  # waits for a merge under way
    )
    subprocess.run([os.sys.executable, "-c", code, directory], check=True)
    size = shard_files(directory)[0].stat().st_size
    assert size < 3000 * 1000 // 2  # it was merged
    assert mine.read("theirs") == {"i": 2999, "pad": "x" * 1000}
    assert mine.read("mine") == {"v": 1}
    mine.write("mine", {"v": 2})
    assert MsgpackFileStorage(directory).read("mine") == {"v": 2}


# -- crashes -----------------------------------------------------------------------


def test_kill_9_mid_write_never_tears_a_value_or_leaves_a_lock(directory: str) -> None:
    size = 200_000
    MsgpackFileStorage(directory).close()
    last = 0
    # One event for every round: a new one per round made the semaphores of
    # the old ones be collected while multiprocessing's resource tracker
    # registered the next, which Python 3.13 reports as an unraisable warning.
    ready = spawn.Event()
    for round_ in range(6):
        ready.clear()  # set by the worker once its store is open, ahead of the kill
        p = spawn.Process(target=workers.write_forever, args=(directory, "k", size, ready))
        p.start()
        assert ready.wait(60)
        time.sleep(0.05 + 0.03 * round_)
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        storage = MsgpackFileStorage(directory)
        with Sessions(storage).open("k", timeout=2) as s:  # no lock left behind
            value = s.data
            if value is not None:
                assert value["blob"] == bytes([value["n"] % 251]) * size
                last = value["n"]
        storage.close()
    assert last > 0


def test_a_crashed_partial_record_is_dropped(directory: str) -> None:
    storage = MsgpackFileStorage(directory, shards=1)
    storage.write("k", {"v": 1})
    storage.close()
    path = shard_files(directory)[0]
    good = path.stat().st_size
    record = _records.build(b"k", b"\x81\xa1v\x02")
    with open(path, "ab") as f:
        f.write(record[:-3])  # the append was cut short
    storage = MsgpackFileStorage(directory)
    assert storage.read("k") == {"v": 1}
    storage.write("k", {"v": 3})
    assert path.stat().st_size == good + len(record) + 0  # truncated, then appended
    assert MsgpackFileStorage(directory).read("k") == {"v": 3}


def test_durable_writes_round_trip(directory: str) -> None:
    storage = MsgpackFileStorage(directory, durable=True)
    sessions = Sessions(storage, initial=dict)
    for _ in range(5):
        with sessions.open("k") as s:
            s["n"] = s.get("n", 0) + 1
    storage.close()
    assert MsgpackFileStorage(directory).read("k") == {"n": 5}


def test_a_durable_write_makes_its_logs_name_durable_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log made, or merged into place, by a process without durable=True may have a name that is not
    on disk yet: a durable write to it fsyncs the directory before it is acknowledged, once per log."""
    directory = tmp_path / "store"
    plain = MsgpackFileStorage(directory, shards=1)
    plain.write("k", 1)  # makes the shard's log, without syncing its name
    plain.close()
    synced: list[str] = []
    real = _shard.fsync_dir

    def counted(path: str) -> None:
        real(path)
        synced.append(path)

    monkeypatch.setattr(_shard, "fsync_dir", counted)
    storage = MsgpackFileStorage(directory, shards=1, durable=True)
    storage.write("k", 2)
    assert synced == [str(directory)]
    storage.write("k", 3)
    assert synced == [str(directory)]  # once per log

    def merge_elsewhere() -> None:  # by a process without durable=True
        merged = subprocess.run(
            [sys.executable, "-c", "import sys, time; from sessionkit import MsgpackFileStorage; "
             "s = MsgpackFileStorage(sys.argv[1]); shard = s._shards[0]; "
             "assert shard.merge(time.time(), wait=True, force=True); s.close()", str(directory)],
            capture_output=True, text=True, timeout=60,
        )
        assert merged.returncode == 0, merged.stderr

    merge_elsewhere()
    storage.write("k", 4)  # to the log the other process merged into place
    assert synced == [str(directory)] * 2
    merge_elsewhere()
    assert storage.read("k") == 4  # this process moves to the merged log, writing nothing
    merge_elsewhere()  # ext4 gives this log the inode number of the one synced above
    storage.write("k", 5)
    assert synced == [str(directory)] * 3
    storage.close()
    assert MsgpackFileStorage(directory).read("k") == 5


@pytest.mark.parametrize("durable", [True, False])
@pytest.mark.parametrize("restarted", [False, True], ids=["same-boot", "after-a-restart"])
def test_damage_to_the_newest_record_is_kept_unless_a_machine_crash_explains_it(
    directory: str, durable: bool, restarted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole last record with a bad checksum.  Since this boot, its index vouches that the record
    was written whole and acknowledged: damage, reported and kept.  After a restart without
    ``durable``, an operating-system crash can leave such a record: the append never happened.
    With ``durable`` the record was fsynced before it was acknowledged: damage either way."""
    from sessionkit.storage import _index

    storage = MsgpackFileStorage(directory, shards=1, durable=durable)
    storage.write("k", {"v": 1})
    storage.write("k", {"v": "newest"})
    storage.close()
    path = shard_files(directory)[0]
    _flip_last_byte_of(path, b"newest")
    size = path.stat().st_size
    if restarted:
        monkeypatch.setattr(_index, "BOOT_ID", bytes(16))
    storage = MsgpackFileStorage(directory, durable=durable)
    if durable or not restarted:
        with pytest.raises(CorruptSessionError) as info:
            storage.read("k")
        assert info.value.key == "k" and path.stat().st_size == size
    else:
        assert storage.read("k") == {"v": 1}
    storage.close()


def test_a_huge_record_loads_in_time_proportional_to_its_size(directory: str) -> None:
    size = 192 << 20  # 48 chunks: growing it chunk by chunk took 29 times a plain read
    storage = MsgpackFileStorage(directory, shards=1)
    storage._raw_write("big", b"\xc6" + size.to_bytes(4, "big") + bytes(size))  # msgpack bin 32
    storage.close()
    path = shard_files(directory)[0]
    started = time.perf_counter()
    path.read_bytes()
    read = time.perf_counter() - started
    started = time.perf_counter()
    reopened = MsgpackFileStorage(directory)
    assert reopened.has("big")  # indexes the log: one pass, not chunk upon chunk
    loaded = time.perf_counter() - started
    reopened.close()
    assert loaded < 12 * read + 0.3, (loaded, read)


def test_a_failed_directory_fsync_after_compaction_loses_no_later_write(
    directory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log was renamed: later writes go to it, and the next durable write syncs the directory first."""
    from sessionkit.storage import _shard

    storage = MsgpackFileStorage(directory, shards=1, durable=True)
    for i in range(40):
        storage.write("k", {"pad": "x" * 4000, "i": i})
    calls: list[str] = []

    def failing(path: str) -> None:
        calls.append(path)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_shard, "fsync_dir", failing)  # a directory fsync cannot be made to fail for real here
    shard = storage._shards[0]
    assert shard.merge(time.time(), force=True)  # renamed into place; the directory is not synced yet
    with pytest.raises(StorageError):  # the next durable write cannot be acknowledged yet
        storage.write("k", {"after": 1})
    monkeypatch.undo()
    storage.write("k", {"after": 2})  # the directory is synced first, then it is acknowledged
    storage.close()
    assert MsgpackFileStorage(directory).read("k") == {"after": 2}


def test_handles_dropped_without_close_release_their_files(tmp_path: Path) -> None:
    import gc

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    gc.collect()
    before = open_fds()
    for i in range(100):
        storage = MsgpackFileStorage(tmp_path / f"s{i}", shards=2)
        storage.write("k", 1)
        del storage  # no close()
    gc.collect()
    assert open_fds() <= before + 5


# -- bad bytes -----------------------------------------------------------------------


def _flip_last_byte_of(path: Path, needle: bytes) -> None:
    data = bytearray(path.read_bytes())
    at = data.rindex(needle)
    data[at + len(needle) - 1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_record_is_reported_and_kept(directory: str) -> None:
    storage = MsgpackFileStorage(directory, shards=1)
    storage.write("victim", {"secret": "abcdef"})
    storage.write("other", {"fine": True})
    storage.close()
    path = shard_files(directory)[0]
    _flip_last_byte_of(path, b"abcdef")
    before = path.read_bytes()
    storage = MsgpackFileStorage(directory)
    with pytest.raises(CorruptSessionError) as info:
        storage.read("victim")
    assert info.value.key == "victim" and info.value.path == str(path)
    assert "victim" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(CorruptSessionError):
        with Sessions(storage, initial=dict).open("victim"):
            pass
    assert storage.read("other") == {"fine": True}
    for _ in range(200):  # churn that would compact: the damaged bytes stay
        storage.write("other", {"fine": True, "pad": "x" * 500})
    assert path.read_bytes().startswith(before[: before.index(b"victim")])
    storage.write("victim", {"fresh": 1})  # an explicit overwrite replaces it
    assert storage.read("victim") == {"fresh": 1}


def test_undecodable_value_is_corrupt_session_error_naming_the_file(directory: str) -> None:
    storage = MsgpackFileStorage(directory, shards=1)
    storage._raw_write("k", b"\xc1")  # a byte msgpack never uses
    with pytest.raises(CorruptSessionError) as info:
        storage.read("k")
    assert info.value.key == "k" and info.value.path == str(shard_files(directory)[0])
    with pytest.raises(CorruptSessionError):
        with Sessions(storage, initial=dict).open("k"):
            pass
    assert storage.has("k")  # left in place, never reset to initial()


def test_damaged_header_in_the_middle_is_reported_not_truncated(directory: str) -> None:
    storage = MsgpackFileStorage(directory, shards=1)
    storage.write("a", 1)
    storage.write("b", 2)
    storage.close()
    path = shard_files(directory)[0]
    data = bytearray(path.read_bytes())
    data[len(_records.MAGIC) + 5] ^= 0xFF  # inside the first record's header
    path.write_bytes(bytes(data))
    storage = MsgpackFileStorage(directory)
    assert storage.read("b") == 2  # its own record is whole
    with pytest.raises(CorruptSessionError) as info:
        storage.read("a")
    assert info.value.path == str(path)
    for i in range(300):  # churn that would merge the log: the damaged bytes stay
        storage.write("b", {"pad": "x" * 5000, "i": i})
    storage.close()
    assert path.read_bytes().startswith(bytes(data)[:100])
    for index in Path(directory).glob("shard-*.idx"):
        index.unlink()  # indexed anew from the log: the damage is the whole shard's now
    with pytest.raises(CorruptSessionError) as info:
        MsgpackFileStorage(directory).read("b")
    assert info.value.path == str(path)


def test_not_a_store_is_reported(directory: str) -> None:
    os.makedirs(directory)
    Path(directory, "FORMAT").write_text("something else\n")
    with pytest.raises(CorruptSessionError):
        MsgpackFileStorage(directory)


# -- keys and files -----------------------------------------------------------------


HOSTILE = ["../../x", "/etc/passwd", "", "a\x00b", "k" * 5000, "ключ🔑", "\udcff lone surrogate"]


def test_hostile_keys_stay_inside_and_list_back(tmp_path: Path) -> None:
    directory = tmp_path / "inner" / "store"
    storage = MsgpackFileStorage(directory)
    for i, key in enumerate(HOSTILE):
        storage.write(key, {"i": i})
    assert sorted(storage.keys()) == sorted(HOSTILE)
    storage.close()
    reopened = MsgpackFileStorage(directory)
    assert sorted(reopened.keys()) == sorted(HOSTILE)
    assert [reopened.read(k) for k in HOSTILE] == [{"i": i} for i in range(len(HOSTILE))]
    everything = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    assert all(p.startswith("inner") for p in everything)
    names = {p.name for p in Path(directory).iterdir()}
    files = {f"shard-{n:03d}.{e}" for n in range(16) for e in ("log", "idx")}
    assert names <= {"FORMAT", "sessionkit.lock", "sessionkit.lock.d"} | files


def test_files_are_private(directory: str) -> None:
    old = os.umask(0)
    try:
        storage = MsgpackFileStorage(directory)
        storage.write("k", 1)
        with Sessions(storage).open("k"):  # its lock (whatever the locking method) exists now
            paths = list(Path(directory).rglob("*"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    for path in paths:
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path


def test_shard_count_is_recorded(directory: str) -> None:
    MsgpackFileStorage(directory, shards=4).close()
    assert MsgpackFileStorage(directory).shards == 4
    with pytest.raises(ValueError, match="shards=4"):
        MsgpackFileStorage(directory, shards=8)
    with pytest.raises(ValueError):
        MsgpackFileStorage(directory + "2", shards=0)


def test_closed_storage_refuses_work(directory: str) -> None:
    storage = MsgpackFileStorage(directory)
    storage.close()
    storage.close()
    with pytest.raises(StorageError, match="closed"):
        storage.read("k")


def test_closing_while_other_threads_are_in_sessions_raises_only_storage_errors(tmp_path: Path) -> None:
    """A store closed under running sessions: each thread stops with StorageError ("closed"), never a raw
    OSError from a lock descriptor closed under it (which came after the write was made, so a caller
    that retried made it twice); every acknowledged increment is stored, and no key stays locked."""
    directory = tmp_path / "store"
    acked: collections.Counter[str] = collections.Counter()
    raw: list[str] = []
    for round_ in range(60):
        storage = MsgpackFileStorage(directory, shards=2)
        sessions = Sessions(storage, initial=dict)
        go = threading.Event()

        def run(key: str) -> None:
            go.wait()
            try:
                while True:
                    with sessions.open(key) as s:
                        s["n"] = s.get("n", 0) + 1
                        s["pad"] = "z" * 3000
                    acked[key] += 1
            except StorageError:
                pass
            except BaseException as exc:  # noqa: BLE001 - what the test is about
                raw.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=run, args=(f"k{t}",)) for t in range(3)]
        for t in threads:
            t.start()
        go.set()
        time.sleep(random.Random(round_).uniform(0, 0.02))
        storage.close()
        for t in threads:
            t.join(10)
            assert not t.is_alive()
    assert raw == []
    check = MsgpackFileStorage(directory, shards=2)
    for key in ("k0", "k1", "k2"):
        assert (check.read(key) or {}).get("n", 0) == acked[key]
        with check.lock(key, timeout=2):
            pass
    check.close()


# -- expiry -------------------------------------------------------------------------


def test_purge_expired_reclaims_without_decoding(directory: str, monkeypatch: Any) -> None:
    clock = FakeClock()
    storage = MsgpackFileStorage(directory, ttl=10, clock=clock, shards=2)
    for i in range(300):
        storage.write(f"old{i}", {"pad": "x" * 200})
    clock.tick(6)
    storage.write("young", 1)
    clock.tick(5)
    before = sum(p.stat().st_size for p in shard_files(directory))

    import msgpack

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("purge_expired decoded a value")

    monkeypatch.setattr(msgpack, "unpackb", refuse)
    monkeypatch.setattr("sessionkit._codec._unpackb", refuse)
    assert list(storage.keys()) == ["young"]
    assert storage.purge_expired() == 300
    monkeypatch.undo()
    after = sum(p.stat().st_size for p in shard_files(directory))
    assert after < before / 10
    assert storage.read("young") == 1
    assert MsgpackFileStorage(directory, clock=clock).read("old1") is None


def test_expiry_is_stored_so_other_processes_honour_it(directory: str) -> None:
    clock = FakeClock()
    MsgpackFileStorage(directory, ttl=10, clock=clock).write("k", 1)
    later = FakeClock(clock.now + 11)
    assert MsgpackFileStorage(directory, clock=later).read("k") is None
    assert MsgpackFileStorage(directory, clock=clock).read("k") == 1


# -- bounded resources ----------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_descriptors_locks_and_lock_files_do_not_grow_with_keys(directory: str) -> None:
    storage = MsgpackFileStorage(directory)
    sessions = Sessions(storage, initial=dict)
    with sessions.open("warm") as s:
        s["x"] = 1
    storage.keys()  # opens every shard
    from sessionkit.storage._shard import MERGER

    # a merge under way (of this store, or of an earlier test's) holds descriptors while it runs
    assert MERGER.wait()
    gc.collect()  # an earlier test's garbage (a socket of its pipes) closed now, not in the middle of the count
    fds = _open_fds()
    for i in range(3000):
        with sessions.open(f"user-{i}") as s:
            s["x"] = i
    assert MERGER.wait()
    # a background merge keeps the files it replaced open for RETIRE_AFTER seconds
    deadline = time.monotonic() + _shard.RETIRE_AFTER + 5
    while _open_fds() != fds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _open_fds() == fds
    assert len(storage._keylocks.threads) == 0 and storage._keylocks.held == {}
    files = [p for p in Path(directory).rglob("*") if not p.is_dir()]
    # FORMAT, the lock file, the logs and their indexes; with the filelock
    # method also one file per key stripe and per other lock slot
    extra = STRIPES + storage.shards + 1 if storage._state.locks.method == "filelock" else 0
    assert len(files) <= 2 + 2 * storage.shards + extra


def _merge_in_the_background(storage: MsgpackFileStorage, key: str = "k") -> None:
    """Overwrite ``key`` (10 KB) until its shard's dead bytes pass the merge
    bound, but not the bound at which the writer merges itself; wait for the merge."""
    from sessionkit.storage._shard import MERGER, SLACK

    shard = storage._locate(key)[0]
    with shard.mutex, shard:
        ident = shard.log_ident
    for i in range(SLACK // 10_000 + 20):
        storage.write(key, {"pad": "x" * 10_000, "i": i})
    assert MERGER.wait()
    with shard.mutex, shard:
        assert shard.log_ident != ident, "no merge replaced the log"


def test_a_background_merge_closes_the_files_it_replaced_a_moment_later(
    directory: str, monkeypatch: pytest.MonkeyPatch, thread_merges: None
) -> None:
    """Whoever closes a replaced log last frees its blocks: the merging
    process keeps it open a while, so another process moving to the new
    files does not pay for that in a request; then the space comes back."""
    monkeypatch.setattr(_shard, "RETIRE_AFTER", 3.0)
    storage = MsgpackFileStorage(directory, shards=1)
    _merge_in_the_background(storage)
    kept = deleted_files_open(directory)
    assert any("shard-000.log" in name for name in kept), kept
    assert any("shard-000.idx" in name for name in kept), kept
    deadline = time.monotonic() + 3.0 + 10
    while deleted_files_open(directory) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert deleted_files_open(directory) == []
    assert storage.read("k")["i"] == _shard.SLACK // 10_000 + 19
    storage.close()


def test_closing_the_store_or_forking_lets_go_of_replaced_files_at_once(
    directory: str, monkeypatch: pytest.MonkeyPatch, thread_merges: None
) -> None:
    monkeypatch.setattr(_shard, "RETIRE_AFTER", 60.0)
    storage = MsgpackFileStorage(directory, shards=1)
    _merge_in_the_background(storage)
    assert deleted_files_open(directory)
    pid = os.fork()
    if pid == 0:  # the child does not keep the parent's replaced files
        os._exit(0 if deleted_files_open(directory) == [] else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert deleted_files_open(directory)  # the parent still does
    storage.close()
    assert deleted_files_open(directory) == []


def test_replaced_files_are_kept_only_while_the_disk_has_room_to_spare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread_merges: None
) -> None:
    """Kept while free space covers RETIRE_ROOM plus RETIRE_FACTOR times all
    that would be kept; closed at once when it does not."""
    monkeypatch.setattr(_shard, "RETIRE_AFTER", 60.0)
    with tmpfs(tmp_path / "roomy", "160m") as mount:
        storage = MsgpackFileStorage(mount / "store", shards=1)
        _merge_in_the_background(storage)
        first = deleted_files_open(str(mount / "store"))
        assert len([name for name in first if ".log" in name]) == 1, first  # room: kept
        kept = _shard.MERGER.kept_bytes()
        assert kept > _shard.SLACK
        # Leave room for RETIRE_ROOM and a few times what is kept, but not RETIRE_FACTOR times
        # what the next merge would keep (that log is as big again).
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        ballast = free - (_shard.RETIRE_ROOM + 4 * kept)
        with open(mount / "ballast", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, ballast)
        _merge_in_the_background(storage)
        assert deleted_files_open(str(mount / "store")) == first  # no room: closed at once
        os.unlink(mount / "ballast")
        _merge_in_the_background(storage)  # room again: kept
        assert len([n for n in deleted_files_open(str(mount / "store")) if ".log" in n]) == 2
        storage.close()
        assert deleted_files_open(str(mount / "store")) == []


def test_a_merge_thread_that_cannot_start_fails_no_write(directory: str, thread_merges: None) -> None:
    """A process out of threads: the write that asked for a merge is made and
    says nothing; a later write starts the thread, and the merge is made.
    (A fresh interpreter: here an earlier test's merge thread may still run.)"""
    script = (
        "import sys, threading\n"
        "from sessionkit import MsgpackFileStorage\n"
        "from sessionkit.storage._shard import MERGER, SLACK\n"
        "refused = []\n"
        "start = threading.Thread.start\n"
        "def start_once_refused(self):\n"
        "    if self.name == 'sessionkit-merge' and not refused:\n"
        "        refused.append(self)\n"
        "        raise RuntimeError(\"can't start new thread\")\n"
        "    start(self)\n"
        "threading.Thread.start = start_once_refused\n"
        "storage = MsgpackFileStorage(sys.argv[1], shards=1)\n"
        "shard = storage._shards[0]\n"
        "with shard.mutex, shard:\n"
        "    ident = shard.log_ident\n"
        "for i in range(SLACK // 10_000 + 20):\n"
        "    storage.write('k', {'pad': 'x' * 10_000, 'i': i})\n"
        "assert MERGER.wait()\n"
        "with shard.mutex, shard:\n"
        "    assert shard.log_ident != ident, 'no merge replaced the log'\n"
        "assert refused and storage.read('k')['i'] == SLACK // 10_000 + 19\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script, directory], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_process_keeps_few_replaced_files_however_often_it_merges(
    directory: str, monkeypatch: pytest.MonkeyPatch, thread_merges: None
) -> None:
    monkeypatch.setattr(_shard, "RETIRE_AFTER", 60.0)
    storage = MsgpackFileStorage(directory, shards=1)
    for _ in range(_shard.RETIRE_MAX + 4):
        _merge_in_the_background(storage)
        logs = [name for name in deleted_files_open(directory) if "shard-000.log" in name]
        assert 1 <= len(logs) <= _shard.RETIRE_MAX
    storage.close()
    assert deleted_files_open(directory) == []


def test_disk_space_is_reclaimed_on_overwrite_and_delete(directory: str) -> None:
    from sessionkit.storage._shard import MERGER, OVERDUE, SLACK

    shards = 4
    storage = MsgpackFileStorage(directory, shards=shards)
    constant = shards * (SLACK + len(_records.MAGIC))
    pad = "x" * 10_000
    for round_ in range(20):
        for i in range(50):
            storage.write(f"k{i}", {"pad": pad, "round": round_})
    live = sum(len(_records.build(f"k{i}".encode(), storage._raw_dumps({"pad": pad, "round": 19}))) for i in range(50))
    used = sum(p.stat().st_size for p in shard_files(directory))
    assert used <= (OVERDUE + 1) * (live + constant)  # while merges run in the background
    assert MERGER.wait()
    used = sum(p.stat().st_size for p in shard_files(directory))
    assert used <= 2 * live + constant  # once they are done
    for i in range(50):
        storage.delete(f"k{i}")
    for i in range(40):  # later writes compact away the dead bytes
        storage.write(f"small{i}", 1)
    assert MERGER.wait()
    used = sum(p.stat().st_size for p in shard_files(directory))
    assert used <= constant
    assert sorted(storage.keys()) == sorted(f"small{i}" for i in range(40))


# -- a real full disk -----------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Any:
    with tmpfs(tmp_path / "tiny", "256k") as mount:
        yield mount


def test_full_disk_is_storage_error_and_keeps_the_old_value(tiny_fs: Path) -> None:
    storage = MsgpackFileStorage(tiny_fs / "store", shards=1)
    sessions = Sessions(storage, initial=dict)
    with sessions.open("k") as s:
        s["v"] = "old"
    with pytest.raises(StorageError) as info:
        with sessions.open("k") as s:
            s["v"] = "x" * 400_000
    assert isinstance(info.value.__cause__, OSError)
    assert storage.read("k") == {"v": "old"}
    assert MsgpackFileStorage(tiny_fs / "store").read("k") == {"v": "old"}
    with sessions.open("k") as s:  # small writes still work
        s["v"] = "new"
    assert storage.read("k") == {"v": "new"}


@pytest.mark.parametrize("merges", ["thread", "process"])
def test_a_nearly_full_disk_gets_a_merges_space_back_at_once(
    tmp_path: Path, merges: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merge's process keeps the log it replaced open for a second only
    where the disk has room to spare: on a disk the overwrites nearly fill,
    every one of them fits, as the merges free the space they need (made by
    the merge thread, or by the helper process, which keeps nothing open
    either on such a disk)."""
    monkeypatch.setenv("SESSIONKIT_MERGES", merges)
    with tmpfs(tmp_path / "small", "4m") as mount:
        storage = MsgpackFileStorage(mount / "store", shards=1)
        pad = "x" * 10_000
        for i in range(100):  # about 1 MB live
            storage.write(f"k{i}", {"pad": pad, "i": 0})
        failed = []
        end = time.monotonic() + stressed(3, 1.5)
        i = 0
        while time.monotonic() < end:
            i += 1
            try:
                storage.write(f"k{i % 100}", {"pad": pad, "i": i})
            except StorageError as exc:
                failed.append(i)
                assert isinstance(exc.__cause__, OSError)
            time.sleep(0.002)
        assert i > 200 and failed == [], f"{len(failed)} of {i} writes failed"
        assert _shard.MERGER.wait()
        storage.read("k0")  # a process moves to the files another process's merge (the helper's) put in place
        assert deleted_files_open(str(mount / "store")) == []
        assert storage.read("k7")["i"] == max(n for n in range(1, i + 1) if n % 100 == 7)
        storage.close()


def test_a_write_the_full_disk_refuses_is_made_once_a_merge_frees_the_dead_bytes(
    tmp_path: Path, thread_merges: None
) -> None:
    """A write that finds the disk full while its shard's log holds dead
    bytes (fewer than a merge waits for) merges the shard, and is made;
    one the merge cannot make room for is refused, the stored value kept."""
    with tmpfs(tmp_path / "small", "4m") as mount:
        storage = MsgpackFileStorage(mount / "store", shards=1)
        pad = "x" * 10_000
        for rnd in range(2):  # 0.5 MB live, 0.5 MB dead: no merge is due
            for i in range(50):
                storage.write(f"k{i}", {"pad": pad, "i": rnd})
        vfs = os.statvfs(mount)
        with open(mount / "filler", "wb") as f:  # leaves 0.8 MB: room for the merged log, not for the write
            f.write(b"\0" * (vfs.f_bavail * vfs.f_frsize - 800_000))
        storage.write("big", "y" * 900_000)
        assert storage.read("big") == "y" * 900_000
        assert storage.read("k7") == {"pad": pad, "i": 1}
        with pytest.raises(StorageError) as info:  # nothing dead left: refused, as before
            storage.write("big", "z" * 1_500_000)
        assert isinstance(info.value.__cause__, OSError)
        assert storage.read("big") == "y" * 900_000
        storage.close()
        reopened = MsgpackFileStorage(mount / "store")
        assert reopened.read("big") == "y" * 900_000 and reopened.read("k49") == {"pad": pad, "i": 1}
        reopened.close()


@pytest.mark.parametrize("merges", ["thread", "process"])
def test_many_shards_on_a_small_disk_never_fill_it(
    tmp_path: Path, merges: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sixteen shards on a 4 MB disk: none ever has dead bytes enough to be
    due for a merge, yet the overwrites would fill the disk ten times over.
    Shards with dead bytes are merged once the disk runs short of room, so
    every write is made (none was once the disk had filled)."""
    monkeypatch.setenv("SESSIONKIT_MERGES", merges)
    with tmpfs(tmp_path / "small", "4m") as mount:
        storage = MsgpackFileStorage(mount / "store", shards=16)
        pad = "x" * 2_000
        failed = []
        for i in range(20_000):  # 200 keys, about 0.4 MB live; 40 MB of overwrites
            try:
                storage.write(f"k{i % 200}", {"pad": pad, "i": i})
            except StorageError as exc:
                failed.append((i, str(exc)))
        assert failed == [], f"{len(failed)} of 20,000 writes failed, the first: {failed[:1]}"
        assert storage.read("k7") == {"pad": pad, "i": 19_807}
        storage.close()


def test_a_dead_merges_files_on_a_full_disk_are_no_lasting_outage(tmp_path: Path, thread_merges: None) -> None:
    """A merge killed on a nearly full disk leaves its new files behind (here
    put there as it leaves them), and they hold the room the next merge needs:
    the write the full disk refuses removes them as its merge starts, and
    is made."""
    with tmpfs(tmp_path / "small", "4m") as mount:
        directory = mount / "store"
        storage = MsgpackFileStorage(directory, shards=1)
        pad = "x" * 10_000
        for rnd in range(2):  # 0.5 MB live, 0.5 MB dead
            for i in range(50):
                storage.write(f"k{i}", {"pad": pad, "i": rnd})
        storage.close()
        vfs = os.statvfs(mount)
        left = directory / "shard-000.log.4242.1.0.merge"  # a dead merge's new log, named as merges name it
        left.write_bytes(b"\0" * (vfs.f_bavail * vfs.f_frsize - 4_096))  # no room for one more record
        (directory / "shard-000.idx.4242.1.0.merge").write_bytes(b"")
        storage = MsgpackFileStorage(directory)
        failed = 0
        for i in range(200):
            try:
                storage.write(f"k{i % 50}", {"pad": pad, "i": 100 + i})
            except StorageError:
                failed += 1
        assert failed == 0
        assert not left.exists()
        assert storage.read("k9") == {"pad": pad, "i": 259}
        storage.close()


@pytest.mark.skipif(
    _lockfile.locking_method() == "filelock",
    reason="holds the merge slot with an open file description lock, which filelock's locks do not conflict with",
)
def test_writes_that_cannot_merge_keep_room_for_a_merge(
    tmp_path: Path, thread_merges: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the shard's merge slot and makes no progress (a
    merge helper stopped, say): the writes on a small disk are refused once
    the room left is what a merge of the shard needs, not when the disk is
    full (no merge could ever run then), and once that process is gone the
    next write merges and is made."""
    monkeypatch.setattr(_shard, "RECLAIM_WAIT", 0.2)  # each refused write waits this long for the slot
    with tmpfs(tmp_path / "small", "6m") as mount:
        directory = mount / "store"
        storage = MsgpackFileStorage(directory, shards=1)
        pad = "x" * 10_000
        for i in range(100):  # about 1 MB live
            storage.write(f"k{i}", {"pad": pad, "i": 0})
        slot = storage._locate("k0")[0].merge_slot
        holder = subprocess.Popen(
            [sys.executable, "-c", "import fcntl, os, struct, sys, time\n"
             "fd = os.open(sys.argv[1], os.O_RDWR)\n"
             "fcntl.fcntl(fd, 37, struct.pack('hhqqi4x', fcntl.F_WRLCK, 0, int(sys.argv[2]), 1, 0))\n"
             "print('held', flush=True)\n"
             "time.sleep(600)\n", str(directory / "sessionkit.lock"), str(slot)],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            refused: list[str] = []
            i = 0
            while len(refused) < 20:
                i += 1
                assert i < 2_000, "never refused: the disk is larger than the test needs"
                try:
                    storage.write(f"k{i % 100}", {"pad": pad, "i": i})
                except StorageError as exc:
                    refused.append(str(exc))
            free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
            assert free > 1_000_000, f"the disk filled ({free} bytes free): no merge could run"
            assert "a merge of the shard needs" in refused[-1]
        finally:
            holder.kill()
            holder.wait()
            holder.stdout.close()  # type: ignore[union-attr]
        for n in range(i + 1, i + 201):  # the merge slot free: the next write merges
            storage.write(f"k{n % 100}", {"pad": pad, "i": n})
        assert storage.read("k7")["i"] == max(n for n in range(i + 1, i + 201) if n % 100 == 7)
        storage.close()


def test_a_process_that_forks_often_still_merges(directory: str, thread_merges: None) -> None:
    """A process lets go of its shards' files when it forks, but never of a
    shard it is merging: merges in the merge thread go on finishing while
    the main thread forks (each fork made every one give up at its swap,
    after copying the whole log, and the log grew without bound)."""
    storage = MsgpackFileStorage(directory, shards=1)
    pad = "p" * 1_000
    for i in range(5_000):  # 5 MB live: a merge takes a while
        storage.write(f"k{i}", {"pad": pad})
    shard = storage._locate("k0")[0]
    merged: list[bool] = []
    stop = threading.Event()

    def merge_over_and_over() -> None:
        while not stop.is_set():
            merged.append(shard.merge(time.time(), wait=True, force=True))

    merger = threading.Thread(target=merge_over_and_over)
    merger.start()
    try:
        for _ in range(60):
            pid = os.fork()
            if pid == 0:  # pragma: no cover
                os._exit(0)
            os.waitpid(pid, 0)
            time.sleep(0.01)
    finally:
        stop.set()
        merger.join()
    assert merged and all(merged), merged
    assert storage.read("k4999") == {"pad": pad}
    storage.close()


def test_a_fork_never_has_an_unchecked_index_trusted(directory: str) -> None:
    """An index damaged on disk (a slot zeroed) is found by the check at
    opening; a process that forked before it first used the shard checks it
    as well (it was once opened unchecked after any fork: the session read
    as empty, and its write-back replaced the stored value)."""
    import mmap

    storage = MsgpackFileStorage(directory, shards=1)
    for i in range(50):
        storage.write(f"user{i}", {"n": i, "cart": ["x"] * 3})
    storage.close()
    h1, h2 = _records.key_info("user7")[1:3]
    with open(os.path.join(directory, "shard-000.idx"), "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        capacity = (len(m) - ix.HEADER_SIZE) // ix.SLOT_SIZE
        for pos in range(capacity):
            at = ix.HEADER_SIZE + pos * ix.SLOT_SIZE
            if ix.SLOT.unpack_from(m, at)[:2] == (h1, h2):
                m[at : at + ix.SLOT_SIZE] = bytes(ix.SLOT_SIZE)
                break
        else:
            raise AssertionError("user7 has no slot")
    storage = MsgpackFileStorage(directory)
    sessions = Sessions(storage, initial=dict)
    pid = os.fork()  # a server's master, say, forking before its first request
    if pid == 0:  # pragma: no cover
        os._exit(0)
    os.waitpid(pid, 0)
    with sessions.open("user7") as s:
        assert s.data == {"n": 7, "cart": ["x", "x", "x"]}
        s["seen"] = True
    assert storage.read("user7") == {"n": 7, "cart": ["x", "x", "x"], "seen": True}
    storage.close()


def test_threads_on_a_nearly_full_disk_wait_for_a_merge_under_way(tmp_path: Path, thread_merges: None) -> None:
    """Three threads write to one shard on a 4 MB disk: a write the full disk
    refuses while another thread merges the shard waits for that merge,
    then is made (it gave up at once, and 1,762 of the 3,000 writes failed).
    One refused in the instant between two merges can still fail."""
    with tmpfs(tmp_path / "small", "4m") as mount:
        storage = MsgpackFileStorage(mount / "store", shards=1)
        pad = "x" * 10_000
        for i in range(120):  # 1.2 MB live
            storage.write(f"k{i}", {"pad": pad, "i": 0})
        failed: list[str] = []

        def writer(first: int) -> None:
            for i in range(first, first + 1_000):
                try:
                    storage.write(f"k{i % 120}", {"pad": pad, "i": i})
                except StorageError as exc:
                    failed.append(str(exc))

        threads = [threading.Thread(target=writer, args=(n * 1_000,)) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(failed) <= 30, f"{len(failed)} of 3,000 writes failed, the first: {failed[:1]}"
        storage.close()


def test_an_idle_parent_that_forked_pins_no_merged_log(tmp_path: Path) -> None:
    """A server's master opens the store, uses it, forks a worker and stays
    idle (gunicorn --preload): it lets go of the shards' files at the fork,
    so the logs the worker's merges replace are freed, and a worker on a
    4 MB disk makes every write (it failed two thirds of them)."""
    with tmpfs(tmp_path / "small", "4m") as mount:
        storage = MsgpackFileStorage(mount / "store", shards=1)
        storage.write("warm", 1)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the worker reports by its exit status
            code = 1
            try:
                pad = "x" * 10_000
                failed = 0
                for i in range(1_200):  # 0.5 MB live, 12 MB of overwrites
                    try:
                        storage.write(f"k{i % 50}", {"pad": pad, "i": i})
                    except StorageError:
                        failed += 1
                code = min(failed, 100)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "writes of the worker failed"
        assert deleted_files_open(str(mount / "store")) == []
        assert storage.read("k49")["i"] == 1_199  # the parent uses the store again
        storage.close()


def test_read_only_filesystem_is_storage_error_and_data_survives(tiny_fs: Path) -> None:
    storage = MsgpackFileStorage(tiny_fs / "store", shards=1)
    storage.write("k", 1)
    storage.close()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    try:
        with pytest.raises(StorageError) as info:
            MsgpackFileStorage(tiny_fs / "store").write("k", 2)
        assert isinstance(info.value.__cause__, OSError)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tiny_fs)], check=True)
    assert MsgpackFileStorage(tiny_fs / "store").read("k") == 1


# -- the FORMAT file -------------------------------------------------------------------


def test_a_lost_format_file_is_never_recreated_with_another_shard_count(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    storage = MsgpackFileStorage(directory, shards=64)
    for i in range(100):
        storage.write(f"user{i}", i)
    storage.close()
    (directory / "FORMAT").unlink()
    with pytest.raises(CorruptSessionError, match="shards=N") as info:
        MsgpackFileStorage(directory)  # 16 shards would show 20 of the 100 sessions
    assert info.value.path == str(directory / "FORMAT")
    assert not (directory / "FORMAT").exists()
    with pytest.raises(CorruptSessionError):
        MsgpackFileStorage(directory, shards=16)  # fewer shards than the logs prove
    again = MsgpackFileStorage(directory, shards=64)  # the owner says how many
    assert [again.read(f"user{i}") for i in range(100)] == list(range(100))


@pytest.mark.parametrize("content", [b"sessionkit msgpack-log 1\nshards 0\n", b"sessionkit msgpack-log 1\n",
                                     b"sessionkit msgpack-log 1\nshards x\n", b"\xff\xfe\nshards 4\n",
                                     b"sessionkit msgpack-log 1\nshards \xff\n", b""])
def test_a_damaged_format_file_is_corrupt_session_error(tmp_path: Path, content: bytes) -> None:
    directory = tmp_path / "store"
    MsgpackFileStorage(directory).close()
    (directory / "FORMAT").write_bytes(content)
    with pytest.raises(CorruptSessionError) as info:
        MsgpackFileStorage(directory)
    assert info.value.path == str(directory / "FORMAT")


@pytest.mark.parametrize("length", [
    1 << 32,  # over the index's 32-bit length
    (1 << 31) + 1000,  # over what one pread returns on Linux (0x7ffff000 bytes): it read back as damage
    0x7FFFF000 - 25,  # with the 25-byte header and the 1-byte key, one byte over
])
def test_a_record_too_long_for_the_index_is_refused_before_anything_is_written(tmp_path: Path, length: int) -> None:
    storage = MsgpackFileStorage(tmp_path / "store", shards=1)
    storage.write("k", "old")
    log = tmp_path / "store" / "shard-000.log"
    size = log.stat().st_size
    refuses_a_value_of(storage, length)
    assert log.stat().st_size == size and storage.read("k") == "old"


# -- kill -9 inside background merges ----------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts descriptors in /proc")
@pytest.mark.skipif(
    _lockfile.locking_method() == "filelock",
    reason="the portable filelock method is not safe against exceptions raised asynchronously (see README)",
)
@pytest.mark.parametrize("where", [
    "write",
    "merge",
    pytest.param("claim", marks=pytest.mark.skipif(
        sys.version_info < (3, 10),
        reason="before 3.10 a with statement can itself be cut short as it exits (see README), and this storm "
        "of tens of thousands of interrupts finds that in a shard's own mutex",
    )),
])
def test_keyboard_interrupts_anywhere_in_a_write_leave_the_store_working(tmp_path: Path, where: str) -> None:
    """A ``KeyboardInterrupt`` can land between any two bytecodes of the
    engine (a signal handler raises it), here thousands of times, in writes,
    in merges made in the writing thread, or as a merge takes and lets go of
    its claim and the shard's merge slot, while another process writes
    to the same shard: every write that returned reads back, no other error
    is raised (a descriptor closed before it was forgotten, or a merge's new
    files closed after the shard took them, used to leave the shard closing
    or using a number the kernel had given another file: "Bad file
    descriptor", "mmap closed", for every later write; an interrupt just as
    a merge took its claim left it taken, and every later merge waited a
    minute for it), and the shard's section is left free."""
    directory = tmp_path / "store"
    MsgpackFileStorage(directory, shards=1).close()
    root = Path(__file__).resolve().parent.parent
    seconds = stressed(4, 2)
    # (with "claim" the writer checks the merge slot after every call: no neighbour's merges there)
    neighbour = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from sessionkit import MsgpackFileStorage\n"
         "s = MsgpackFileStorage(sys.argv[1]); end = time.monotonic() + float(sys.argv[2]); n = 0\n"
         "while time.monotonic() < end:\n"
         "    n += 1; s.write(f'nb{n % 50}', {'n': n})\n"
         "s.close()\n", str(directory), str(0 if where == "claim" else seconds)],
        cwd=root,
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.interrupted_writer", str(directory), str(seconds), where],
            cwd=root, capture_output=True, text=True, timeout=120,
        )
    finally:
        try:
            neighbour.wait(60)
        finally:
            if neighbour.poll() is None:
                neighbour.kill()
                neighbour.wait()
    assert neighbour.returncode == 0
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["interrupts"] > (50 if where == "merge" else 1000), result  # the timer did land inside
    assert result["errors"] == [] and result["wrong"] == {}, result
    # an interrupt as a merge's claim or its merge slot was taken or let go left it taken: every later
    # merge of the shard, here or in another process, waited a minute for it, or for ever
    assert result["slowest_merge_s"] < 10, result
    assert not result["claim_left"] and result["slot_free"] and result["merged_after"], result
    assert result["left_taken"] == {"claim": 0, "slot": 0}, result
    # the section is free: this process writes at once
    storage = MsgpackFileStorage(directory)
    storage.write("after", 1)
    assert storage.read("after") == 1
    storage.close()


def test_the_kill_loops_log_reader_drops_a_line_a_kill_cut_short(tmp_path: Path) -> None:
    """SIGKILL can cut an ``os.write`` to a file where it crosses a page
    boundary, so the last line of a killed writer's log may be a prefix of
    what it wrote; the kill loops' reader must not take "a k3 2400" for an
    acknowledgement of 2400: it is the acknowledgement of the write in
    flight, 24000388, whose call had returned."""
    log = tmp_path / "cut"
    log.write_text("ready\nw k3 24000388\na k3 2400")
    assert read_log(log)[:2] == ({"k3": 24000388}, None)
    log.write_text("ready\nw k3 24000387\na k3 24000387\nw k3 24000388\na")
    assert read_log(log)[:2] == ({"k3": 24000388}, None)
    log.write_text("ready\nw k3 -\na k3")
    assert read_log(log)[:2] == ({"k3": None}, None)
    log.write_text("ready\na k1 5\nw k3 2400")  # cut before the write began
    assert read_log(log)[:2] == ({"k1": 5}, None)
    log.write_text("ready\nw k3 24000388\nm+ 0")  # a merge's line cut: the write is still in flight
    assert read_log(log)[:2] == ({}, ("k3", 24000388))

    # the real thing: a writer of page-sized lines, killed while it writes
    digits = "7" * 4000
    child = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)\n"
        f"w, a = b'w k3 {digits}\\n', b'a k3 {digits}\\n'\n"
        "os.write(fd, b'ready\\n')\n"
        "while True:\n"
        "    os.write(fd, w)\n"
        "    os.write(fd, a)\n"
    )
    cut = 0
    for attempt in range(200):
        path = tmp_path / f"log{attempt}"
        writer = subprocess.Popen([sys.executable, "-c", child, str(path)])
        while not (path.exists() and path.stat().st_size > 4096):
            assert writer.poll() is None
            time.sleep(0.001)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(30)
        text = path.read_text()
        acked, pending, _ = read_log(path)
        assert acked.get("k3") in (None, int(digits))
        assert pending in (None, ("k3", int(digits)))
        last = text.rsplit("\n", 1)[1]
        if last.count(" ") == 2 and last.split()[2] != digits:  # the number itself was cut
            assert pending is None  # cut in "w": the write had not begun; in "a": it had returned
            if last[0] == "a":
                assert acked["k3"] == int(digits)
            cut += 1
            if cut >= 3:
                break
    assert cut >= 3, "no kill cut a line short: the premise of this test no longer holds here"


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started (from any of its threads)."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(child) for child in f.read().split()]
    except OSError:
        pass
    return found


def _kill_helpers_inside_merges(directory: Path, writer: subprocess.Popen[bytes], seconds: float) -> int:
    """For ``seconds``: kill -9 the writer's merge helper whenever a merge's
    new log is on disk (the helper is inside a merge); how many were killed."""
    killed = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end and writer.poll() is None:
        if any(name.endswith(".merge") for name in os.listdir(directory)):
            for child in _children(writer.pid):
                try:
                    os.kill(child, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:  # it had just ended
                    pass
        time.sleep(0.001)
    return killed


def msgpack_kill_loop(directory: Path, cycles: int, seed: int, merges: str = "thread") -> dict[str, int]:
    """Kill a writer whose shards merge every few dozen writes, ``cycles``
    times at random moments; after each kill a reader that stayed open and
    a fresh one must read every acknowledged value (or the one in flight).

    ``merges="process"``: the writer's merges are made by its merge helper,
    which is killed too, inside merges, as often as the cycle allows."""
    import random
    import sys

    rng = random.Random(seed)
    root = Path(__file__).resolve().parent.parent
    MsgpackFileStorage(directory, shards=2).close()
    reader = MsgpackFileStorage(directory)
    acked: dict[str, int | None] = {}
    counts = {"checks": 0, "in_flight_seen": 0, "killed_in_merge": 0, "helpers_killed": 0}
    for cycle in range(cycles):
        log = directory.parent / f"log{cycle}"
        writer = subprocess.Popen(
            [sys.executable, "-m", "tests.shelf_writer", str(directory), str(cycle + 1), str(log), "merge-often"],
            cwd=root, env={**os.environ, "SESSIONKIT_MERGES": merges},
        )
        deadline = time.monotonic() + 60
        while not (log.exists() and log.read_bytes().startswith(b"ready")):
            assert time.monotonic() < deadline and writer.poll() is None, "the writer did not start"
            time.sleep(0.005)
        if merges == "process":
            counts["helpers_killed"] += _kill_helpers_inside_merges(directory, writer, rng.uniform(0.2, 0.6))
        else:
            time.sleep(rng.uniform(0.01, 0.15))
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(30)
        mine, pending, in_merge = read_log(log)
        counts["killed_in_merge"] += in_merge
        acked.update(mine)
        fresh = MsgpackFileStorage(directory) if cycle % 2 else None
        for name, storage in (("the reader kept open", reader), ("a fresh storage", fresh)):
            if storage is None:
                continue
            listed = set(storage.keys())
            for key, want in acked.items():
                got = storage.read(key)
                got_n = None if got is None else got["n"]
                if got is not None:
                    assert got["blob"] == bytes([got_n % 251]) * len(got["blob"])
                if got_n != want:
                    assert pending == (key, got_n), f"cycle {cycle}: {name} reads {key}={got_n}, acknowledged {want}"
                    acked[key] = got_n
                    counts["in_flight_seen"] += 1
                else:
                    counts["checks"] += 1
            live = {key for key, n in acked.items() if n is not None}
            assert listed == live or (pending is not None and listed ^ live == {pending[0]}), (listed, live)
        if fresh is not None:
            fresh.close()
    reader.close()
    leftovers = [n for n in os.listdir(directory) if ".merge" in n]
    assert len(leftovers) <= 4, leftovers  # at most one merge's files per shard, until its next merge
    return counts


def test_kill_9_inside_background_merges_loses_nothing(tmp_path: Path) -> None:
    counts = msgpack_kill_loop(tmp_path / "store", cycles=40, seed=3)
    assert counts["checks"] > 0
    assert counts["killed_in_merge"] >= 3, counts  # the loop did land inside merges


def test_kill_9_of_merge_helpers_inside_merges_loses_nothing(tmp_path: Path) -> None:
    counts = msgpack_kill_loop(tmp_path / "store", cycles=int(stressed(20, 6)), seed=5, merges="process")
    assert counts["checks"] > 0
    assert counts["helpers_killed"] >= 10, counts


@pytest.mark.slow
def test_kill_9_inside_background_merges_stress(tmp_path: Path) -> None:
    cycles = int(os.environ.get("SESSIONKIT_KILL_CYCLES") or stressed(80, 40))  # 400 for the figures we publish
    counts = msgpack_kill_loop(tmp_path / "store", cycles=cycles, seed=4)
    assert counts["killed_in_merge"] >= cycles // 40, counts


def test_background_merges_expire_by_the_storages_clock(directory: str) -> None:
    """A merge in the background drops only what the storage's own clock says has expired."""
    from sessionkit.storage._shard import MERGER

    clock = FakeClock(start=1_000_000_000.0)  # far behind the real clock
    storage = MsgpackFileStorage(directory, shards=1, ttl=3600, clock=clock)
    for i in range(20):
        storage.write(f"keep{i}", {"i": i})
    for n in range(400):  # enough dead bytes for several merges
        storage.write("churn", {"n": n, "pad": "x" * 10_000})
    assert MERGER.wait()
    assert [storage.read(f"keep{i}") for i in range(20)] == [{"i": i} for i in range(20)]
    clock.tick(3601)
    for n in range(400):
        storage.write("churn", {"n": n, "pad": "x" * 10_000})
    assert MERGER.wait()
    assert storage.read("keep0") is None
    assert sorted(storage.keys()) == ["churn"]
    size = shard_files(directory)[0].stat().st_size
    assert size < 4 << 20  # merged, without the expired sessions


# -- the shared index: damage, faults, claims ------------------------------------------


def _index_files(directory: str) -> list[Path]:
    return sorted(Path(directory).glob("shard-*.idx"))


def _zero_slots(index: Path, fraction: float) -> None:
    """Zero the first ``fraction`` of an index's slot pages, leaving its header whole."""
    from sessionkit.storage import _index

    data = bytearray(index.read_bytes())
    table = len(data) - _index.HEADER_SIZE
    cut = _index.HEADER_SIZE + int(table * fraction)
    data[_index.HEADER_SIZE : cut] = bytes(cut - _index.HEADER_SIZE)
    index.write_bytes(bytes(data))


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_zeroed_index_slots_lose_no_session(directory: str, fraction: float) -> None:
    """The log is the truth: an index whose slots were wiped is indexed anew, not believed."""
    storage = MsgpackFileStorage(directory, shards=1)
    for i in range(100):
        storage.write(f"k{i}", {"i": i})
    storage.close()
    _zero_slots(_index_files(directory)[0], fraction)
    storage = MsgpackFileStorage(directory)
    assert sorted(storage.keys()) == sorted(f"k{i}" for i in range(100))
    assert [storage.read(f"k{i}") for i in range(100)] == [{"i": i} for i in range(100)]
    storage.close()


def _dirty_pages(path: str) -> tuple[int, int] | None:
    """(pages cached, pages dirty) of the file at ``path`` (Linux ``cachestat``), or None without that call."""
    import ctypes

    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

    class Stat(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]

    if os.uname().machine not in ("x86_64", "aarch64"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        found = Stat()
        if libc.syscall(451, fd, ctypes.byref(Range(0, 0)), ctypes.byref(found), 0) != 0:
            return None  # (451 on both machines; ENOSYS before Linux 6.5)
        return found.cache, found.dirty
    finally:
        os.close(fd)


def test_a_merge_renames_files_already_on_their_way_to_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread_merges: None
) -> None:
    """A merge starts writing its new log and index to disk before it locks
    the shard to rename them into place, so the rename (ext4 writes a file
    renamed over another out first) does not do it inside the section every
    other process waits on."""
    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(1 << 20))
    seen = _dirty_pages(str(probe))
    if seen is None or seen[1] == 0:
        pytest.skip("no cachestat here, or a file system that does not write back (tmpfs)")
    renamed: list[tuple[str, int, int]] = []
    replace = os.replace

    def watched(src: Any, dst: Any) -> None:
        if ".merge" in str(src) or ".merge" in str(dst):
            cached, dirty = _dirty_pages(str(src)) or (0, 0)
            renamed.append((os.path.basename(str(dst)), cached, dirty))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", watched)
    storage = MsgpackFileStorage(tmp_path / "store", shards=1)
    for i in range(50):
        storage.write(f"k{i}", {"pad": "x" * 20_000})
    _merge_in_the_background(storage)
    storage.close()
    assert {name for name, _, _ in renamed} == {"shard-000.log", "shard-000.idx"}, renamed
    assert all(dirty <= 4 for _, _, dirty in renamed), renamed  # at most the few pages written in the section
    assert [cached for name, cached, _ in renamed if name == "shard-000.log"][0] > 40, renamed  # of a megabyte


def test_a_merge_never_drops_what_a_damaged_index_lost(directory: str) -> None:
    """A process that mapped the index before it was damaged must not merge by it."""
    from sessionkit.storage._shard import MERGER

    storage = MsgpackFileStorage(directory, shards=1)
    for i in range(100):
        storage.write(f"k{i}", {"i": i})
    _zero_slots(_index_files(directory)[0], 0.5)  # under the running process
    for n in range(300):  # dead bytes enough for merges
        storage.write("churn", {"n": n, "pad": "x" * 10_000})
    assert MERGER.wait()
    storage.close()
    storage = MsgpackFileStorage(directory)
    assert [storage.read(f"k{i}") for i in range(100)] == [{"i": i} for i in range(100)]


def test_a_damaged_slot_offset_is_indexed_anew_not_a_raw_error(directory: str) -> None:
    from sessionkit.storage import _index

    storage = MsgpackFileStorage(directory, shards=1)
    storage.write("k", {"v": 1})
    storage.close()
    index = _index_files(directory)[0]
    data = bytearray(index.read_bytes())
    for pos in range(_index.HEADER_SIZE, len(data), _index.SLOT_SIZE):
        if _index.SLOT.unpack_from(data, pos)[4] == _index.LIVE:
            data[pos + 16 + 7] |= 0x80  # the offset's top bit
    index.write_bytes(bytes(data))
    storage = MsgpackFileStorage(directory)
    assert storage.read("k") == {"v": 1}
    with Sessions(storage, initial=dict).open("k") as s:
        s["v"] += 1
    assert MsgpackFileStorage(directory).read("k") == {"v": 2}


def test_a_store_of_the_first_format_is_upgraded_as_it_opens(directory: str) -> None:
    """Version 1 stores (logs without indexes) open with every session, and are
    marked version 2, which older releases refuse, so none appends unindexed."""
    storage = MsgpackFileStorage(directory, shards=2)
    for i in range(50):
        storage.write(f"k{i}", i)
    storage.close()
    for index in _index_files(directory):
        index.unlink()
    Path(directory, "FORMAT").write_text("sessionkit msgpack-log 1\nshards 2\n")
    storage = MsgpackFileStorage(directory)
    assert sorted(storage.keys()) == sorted(f"k{i}" for i in range(50))
    assert Path(directory, "FORMAT").read_text().splitlines()[0] == "sessionkit msgpack-log 2"


def test_a_merge_claim_dies_with_the_process_that_held_it(directory: str) -> None:
    """A process killed inside a merge blocks no later merge (its claim is a lock the kernel drops)."""
    storage = MsgpackFileStorage(directory, shards=1)
    for n in range(150):
        storage.write("churn", {"n": n, "pad": "x" * 10_000})
    code = (
        "import sys, time; from sessionkit import MsgpackFileStorage as M\n"
        "s = M(sys.argv[1]); shard = s._shards[0]\n"
        "shard.locks.lock(shard.merge_slot, None, '', True)\n"
        "print('claimed', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([os.sys.executable, "-c", code, directory], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "claimed"
        assert not storage._shards[0].merge(time.time(), force=True)  # claimed elsewhere: no wait
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdout.close()  # type: ignore[union-attr]
    started = time.monotonic()
    assert storage._shards[0].merge(time.time(), force=True)
    assert time.monotonic() - started < 5
    assert shard_files(directory)[0].stat().st_size < 100_000


@pytest.mark.skipif(
    _lockfile.locking_method() == "filelock",
    reason="probes the shard's byte with an open file description lock, which filelock's locks do not conflict with",
)
def test_moving_to_a_merged_shard_closes_the_old_files_after_its_section(
    directory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that finds its shard merged by another process moves to the
    new files inside its section, but closes the old ones once the section's
    lock is free: the last close of a replaced log frees its blocks (tens of
    milliseconds for a few megabytes), and every other process's request on
    the shard used to wait for it."""
    storage = MsgpackFileStorage(directory, shards=1)
    storage.write("k", {"n": 0})
    shard = storage._shards[0]
    old_log = shard.log_ident
    seen: list[tuple[bool, int]] = []
    real = _shard._close_shard_files

    def watched(idx: Any, stale: Any, fd: int) -> None:
        # another open file description of the lock file: it conflicts with
        # this process's hold on the shard's byte as another process's would
        probe = os.open(Path(directory) / "sessionkit.lock", os.O_RDWR)
        try:
            free = True
            try:
                fcntl.fcntl(probe, _lockfile._F_OFD_SETLK, _lockfile._FLOCK.pack(fcntl.F_WRLCK, 0, shard.slot, 1, 0))
            except OSError:
                free = False
            seen.append((free, fd))
        finally:
            os.close(probe)  # drops the probe's lock too
        real(idx, stale, fd)

    monkeypatch.setattr(_shard, "_close_shard_files", watched)
    code = (
        "import sys, time; from sessionkit import MsgpackFileStorage as M\n"
        "s = M(sys.argv[1], shards=1)\n"
        "for n in range(50): s.write('other', {'n': n, 'pad': 'x' * 10_000})\n"
        "assert s._shards[0].merge(time.time(), wait=True, force=True)\n"
        "s.close()\n"
    )
    subprocess.run([sys.executable, "-c", code, directory], check=True, timeout=60)
    storage.write("k", {"n": 1})  # finds the shard merged: moves to the new files
    assert shard.log_ident != old_log
    assert seen and all(free for free, _fd in seen), seen
    assert not shard.closing
    assert storage.read("k") == {"n": 1} and storage.read("other") == {"n": 49, "pad": "x" * 10_000}
    for _free, fd in seen:  # the old log's descriptor is closed (nothing has opened a file since)
        with pytest.raises(OSError):
            os.fstat(fd)
    storage.close()


def test_leftovers_of_dead_merges_and_rebuilds_are_removed(directory: str) -> None:
    storage = MsgpackFileStorage(directory, shards=1)
    storage.write("k", 1)
    for name in ("shard-000.log.999.1.merge", "shard-000.idx.999.1.merge", "shard-000.idx.999.1.tmp"):
        Path(directory, name).write_bytes(b"x" * 1000)
    assert storage._shards[0].merge(time.time(), force=True)
    assert sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("shard-")) == [
        "shard-000.idx",
        "shard-000.log",
    ]


def test_a_full_disk_while_the_index_grows(tiny_fs: Path) -> None:
    """Growing the index on a full disk is no error for a write that was made."""
    directory = tiny_fs / "store"
    storage = MsgpackFileStorage(directory, shards=1)
    made: dict[str, int] = {}
    for i in range(5000):
        try:
            storage.write(f"k{i}", i)
        except StorageError:
            continue
        made[f"k{i}"] = i
    assert len(made) > 100
    assert {k: storage.read(k) for k in made} == made
    storage.close()
    assert {k: MsgpackFileStorage(directory).read(k) for k in made} == made


def test_an_index_that_cannot_be_written_is_read_from_memory(tiny_fs: Path) -> None:
    """A full disk where the index must be rebuilt (after a restart): reads
    go on from an index in memory, writes are refused until there is room."""
    directory = tiny_fs / "store"
    storage = MsgpackFileStorage(directory, shards=1)
    made = {f"k{i}": i for i in range(200)}
    for key, value in made.items():
        storage.write(key, value)
    storage.close()
    for index in _index_files(str(directory)):
        index.unlink()
    filler = tiny_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # take the room the index needs
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    storage = MsgpackFileStorage(directory)
    assert {k: storage.read(k) for k in made} == made
    assert sorted(storage.keys()) == sorted(made)
    with pytest.raises(StorageError, match="index could not be written"):
        storage.write("new", 1)
    storage.close()
    filler.unlink()
    storage = MsgpackFileStorage(directory)
    storage.write("new", 1)
    assert storage.read("new") == 1 and len(list(storage.keys())) == len(made) + 1
    storage.close()


_ALTERNATE_WRITER = """
import sys
from sessionkit import MsgpackFileStorage
storage = MsgpackFileStorage(sys.argv[1])
for line in sys.stdin:
    n = int(line)
    storage.write(f"a{n}", {"by": "A", "n": n})
    print("ok", flush=True)
"""


@pytest.mark.parametrize("change", ["deleted", "slots zeroed"])
def test_two_processes_on_one_log_never_write_over_each_other(directory: str, change: str) -> None:
    """An index deleted or damaged while this process maps it: another process
    indexes the log anew; whichever index each one uses, no write lands on
    another's record (every write checks that the log ends where its index says)."""
    mine = MsgpackFileStorage(directory, shards=1)
    for i in range(20):
        mine.write(f"pre{i}", {"i": i})
    index = _index_files(directory)[0]
    if change == "deleted":
        index.unlink()
    else:
        _zero_slots(index, 1.0)
    other = subprocess.Popen(
        [os.sys.executable, "-c", _ALTERNATE_WRITER, directory],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert other.stdin is not None and other.stdout is not None
    acked: dict[str, Any] = {f"pre{i}": {"i": i} for i in range(20)}
    try:
        for n in range(10):  # acknowledged writes, taking turns
            other.stdin.write(f"{n}\n")
            other.stdin.flush()
            assert other.stdout.readline().strip() == "ok"
            acked[f"a{n}"] = {"by": "A", "n": n}
            mine.write(f"b{n}", {"by": "B", "n": n})
            acked[f"b{n}"] = {"by": "B", "n": n}
    finally:
        other.stdin.close()
        other.wait(30)
        other.stdout.close()
    mine.close()
    fresh = MsgpackFileStorage(directory)
    assert {key: fresh.read(key) for key in acked} == acked


_MERGE_AWAY = """
import sys, time
from sessionkit import MsgpackFileStorage
storage = MsgpackFileStorage(sys.argv[1])
storage.read("pre0")  # no index at the path: this process indexes the log and puts a new index there
assert storage._shards[0].merge(time.time(), wait=True, force=True)  # a new log and index renamed into place
storage.close()
"""


def test_a_write_through_a_deleted_index_never_lands_in_a_log_merged_away(directory: str) -> None:
    """This process's index is deleted; another process indexes the log anew
    and merges it away (the log this process writes to is then unlinked, and
    ends where this process's index says).  The next write must go to the
    merged log, not be acknowledged into the unlinked one and lost."""
    mine = MsgpackFileStorage(directory, shards=1)
    for i in range(20):
        mine.write(f"pre{i}", {"i": i})
    _index_files(directory)[0].unlink()
    subprocess.run([os.sys.executable, "-c", _MERGE_AWAY, directory], check=True, timeout=60)
    mine.write("after", {"n": 1})
    mine.write("pre3", {"i": -3})
    mine.close()
    fresh = MsgpackFileStorage(directory)
    try:
        assert fresh.read("after") == {"n": 1}
        assert fresh.read("pre3") == {"i": -3}
        assert [fresh.read(f"pre{i}") for i in range(20) if i != 3] == [{"i": i} for i in range(20) if i != 3]
    finally:
        fresh.close()


@pytest.mark.parametrize("how", ["statx", "fstat"])
def test_a_logs_size_and_link_count_are_read_as_fstat_reads_them(tmp_path: Path, how: str) -> None:
    """What an append checks before it writes (see ``_statx``), read with
    ``statx`` where it can be and with ``os.fstat`` where it cannot."""
    from sessionkit.storage._statx import SizeAndLinks, _lookup

    if how == "statx" and not _lookup():
        pytest.skip("no statx in this libc")
    read = SizeAndLinks()
    if how == "fstat":
        read._call = False
    path = tmp_path / "log"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 123)
        assert read(fd) == (123, 1)
        os.link(path, tmp_path / "other")
        os.pwrite(fd, b"y", 4000)
        assert read(fd) == (4001, 2)
        os.unlink(path)
        os.unlink(tmp_path / "other")
        assert read(fd) == (4001, 0)
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        read(fd)


def test_a_log_put_in_place_by_hand_gets_the_next_write(directory: str) -> None:
    """A shard's log replaced by a copy of itself while the store is open (a
    backup put back by rename): the next write must go to the log now at the
    path, not be acknowledged into the unlinked one, whose index alone still
    agrees with it, and be lost with it."""
    mine = MsgpackFileStorage(directory, shards=1)
    for i in range(10):
        mine.write(f"pre{i}", {"i": i})
    log = Path(directory) / "shard-000.log"
    copy = log.with_name("restored")
    copy.write_bytes(log.read_bytes())
    os.replace(copy, log)
    mine.write("after", {"n": 1})
    mine.close()
    fresh = MsgpackFileStorage(directory)
    try:
        assert fresh.read("after") == {"n": 1}
        assert [fresh.read(f"pre{i}") for i in range(10)] == [{"i": i} for i in range(10)]
    finally:
        fresh.close()


def test_a_merges_catch_up_is_copied_a_chunk_at_a_time(directory: str) -> None:
    """What was appended while a merge copied the log (its catch-up) is added
    a chunk at a time, never read whole: a catch-up can outgrow memory, or
    what one ``pread`` returns (2 GiB), when writes outrun a slow merge.  Here
    23 MB, records of 3 KB to 6 MB (longer than a chunk: read whole), go
    through with under 16 MB of memory, byte for byte, every key indexed."""
    import tracemalloc

    storage = MsgpackFileStorage(directory, shards=1)
    values = {f"k{i}": os.urandom(3000 if i % 5 else (6 << 20 if i == 5 else 1_500_000)) for i in range(60)}
    for key, value in values.items():
        storage._raw_write(key, value)
    shard = storage._shards[0]
    start = len(_records.MAGIC)
    target_path = os.path.join(directory, "copy")
    target = os.open(target_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        table = ix.Table(ix.capacity_for(len(values)))
        with shard.mutex, shard:
            end = shard.end
            assert end - start > 3 * _shard.CHUNK
            tracemalloc.start()
            try:
                got = shard._replay(shard.fd, target, table, start, end, 0, None)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert got == (end, end - start)
            assert os.pread(target, end - start + 1, 0) == os.pread(shard.fd, end - start, start)
        assert peak < 16 << 20, peak
        for key in values:
            info = _records.key_info(key)
            found = table.find(info[1], info[2])
            assert found is not None and found[1][4] == ix.LIVE, key
    finally:
        os.close(target)
        storage.close()


def test_purge_expired_counts_each_session_once(directory: str) -> None:
    clock = FakeClock()
    storage = MsgpackFileStorage(directory, shards=1, ttl=10, clock=clock)
    for i in range(2000):
        storage.write(f"k{i}", i)
    clock.tick(11)
    counts: list[int] = []
    threads = [threading.Thread(target=lambda: counts.append(storage.purge_expired())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(counts) == [0, 2000]
    assert storage.purge_expired() == 0


def test_a_large_damaged_index_is_found_by_the_merge_thread(directory: str) -> None:
    """Indexes too large to check while opening are checked in the background."""
    from sessionkit.storage import _index
    from sessionkit.storage._shard import MERGER

    storage = MsgpackFileStorage(directory, shards=1)
    for i in range(30_000):  # past 85% of 32,768 slots: grown to 65,536 at least
        storage._raw_write(f"k{i}", storage._raw_dumps(i, None))
    storage.close()
    index = _index_files(directory)[0]
    assert (index.stat().st_size - _index.HEADER_SIZE) // _index.SLOT_SIZE > _index.CHECK_AT_OPEN
    _zero_slots(index, 0.5)
    storage = MsgpackFileStorage(directory)
    storage.read("k0")  # maps the index; the check runs in the background
    assert MERGER.wait()
    assert [storage.read(f"k{i}") for i in range(0, 30_000, 7)] == list(range(0, 30_000, 7))


ROOT = Path(__file__).resolve().parent.parent

_SERVE = """
import sys
from sessionkit import MsgpackFileStorage
storage = MsgpackFileStorage(sys.argv[1], shards=1)
for line in sys.stdin:
    op, key, *rest = line.split()
    if op == "write":
        storage.write(key, int(rest[0]))
        print("ok", flush=True)
    else:
        print(repr(storage.read(key)), flush=True)
"""

_DIE_BEFORE_MARKING = """
import os, sys
from sessionkit import MsgpackFileStorage
from sessionkit.storage import _index
storage = MsgpackFileStorage(sys.argv[1], shards=1)
storage.write("b", 1)
shard = storage._shards[0]
_index.Index.set_replaced = lambda self: os._exit(9)  # killed between the rename and the mark
with shard.mutex, shard:
    shard._rebuild("a rebuild killed half-way")
"""


def test_an_index_put_in_place_by_a_process_killed_before_marking_the_old_one_is_not_left_in_use(
    directory: str,
) -> None:
    """Process B puts a new index in place and dies before marking the one it replaced (which it
    had marked dirty).  Process C opens the store then, and maps B's index.  This process, on the
    old one, indexes the log anew and puts a third in place: it must mark B's too, or C goes on
    reading by an index that misses this process's writes (and a merge by it would drop them)."""
    storage = MsgpackFileStorage(directory, shards=1)
    storage.write("a", 1)
    died = subprocess.run([sys.executable, "-c", _DIE_BEFORE_MARKING, directory], cwd=ROOT, timeout=60)
    assert died.returncode == 9
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVE, directory], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )

    def ask(line: str) -> str:
        assert server.stdin is not None and server.stdout is not None
        server.stdin.write(line + "\n")
        server.stdin.flush()
        return server.stdout.readline().strip()

    try:
        assert ask("write c 1") == "ok"  # C maps B's index
        storage.write("t", 1)  # this process: its index is dirty, so it indexes the log anew
        assert ask("read t") == "1", "another process reads by an index that was replaced"
        assert ask("read c") == "1" and storage.read("b") == 1 and storage.read("c") == 1
    finally:
        server.kill()
        server.communicate(timeout=10)  # and closes the pipes
        storage.close()
