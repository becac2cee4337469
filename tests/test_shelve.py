"""What only ShelveStorage promises: any picklable value, every dbm, processes, crashes."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import shelve
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

from sessionkit import CorruptSessionError, SerializationError, Sessions, ShelveStorage
from sessionkit.storage.shelf import available_dbms

from . import workers
from .conftest import SHELVE_DBM, make_shelf, shelf_spec
from .helpers import refuses_a_value_of

spawn = multiprocessing.get_context("spawn")


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "shelf" / "sessions")


make = make_shelf
where = shelf_spec


class Point:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and other.x == self.x


def test_any_picklable_value(path: str) -> None:
    storage = make(path)
    value = {"when": datetime.datetime(2024, 5, 1, 12, 30), "tags": {"a", "b"}, "p": Point(3), "t": (1, 2)}
    storage.write("k", value)
    assert make(path).read("k") == value


def test_nested_changes_of_rich_values_are_written_back(path: str) -> None:
    sessions = Sessions(make(path), initial=dict)
    with sessions.open("k") as s:
        s["tags"] = {"a"}
    with sessions.open("k") as s:
        s["tags"].add("b")
    with sessions.open("k") as s:
        assert s["tags"] == {"a", "b"}


def test_the_dbm_in_use_is_visible_and_can_be_chosen(path: str) -> None:
    storage = ShelveStorage(path, dbm="dumb")
    assert storage.dbm == "dbm.dumb" and "dbm.dumb" in repr(storage)
    storage.write("k", 1)
    storage.close()
    assert ShelveStorage(path).dbm == "dbm.dumb"  # an existing shelf keeps its dbm
    with pytest.raises(ValueError, match="not available"):
        ShelveStorage(path + "2", dbm="no-such-dbm")
    assert ShelveStorage(path + "3").dbm == "dbm.dumb"  # a new shelf: sessionkit's own dbm.dumb writer


@pytest.mark.parametrize("dbm", available_dbms())
def test_every_dbm_of_this_python_round_trips(tmp_path: Path, dbm: str) -> None:
    storage = ShelveStorage(tmp_path / dbm / "s", dbm=dbm)
    sessions = Sessions(storage, initial=dict)
    for _ in range(3):
        with sessions.open("k") as s:
            s["n"] = s.get("n", 0) + 1
    storage.write("", {"empty key": True})
    storage.close()
    reopened = ShelveStorage(tmp_path / dbm / "s")
    assert reopened.dbm == dbm
    assert reopened.read("k") == {"n": 3} and reopened.read("") == {"empty key": True}


def test_reads_a_plain_shelve_file(path: str) -> None:
    os.makedirs(os.path.dirname(path))
    import dbm.dumb

    with shelve.Shelf(dbm.dumb.open(path, "c")) as plain:
        plain["user:1"] = {"lang": "en", "since": datetime.date(2020, 1, 1)}
    storage = ShelveStorage(path)
    assert storage.read("user:1") == {"lang": "en", "since": datetime.date(2020, 1, 1)}
    with Sessions(storage).open("user:1") as s:
        s["lang"] = "de"
    assert ShelveStorage(path).read("user:1")["lang"] == "de"


def test_unpicklable_value_keeps_the_old_one(path: str) -> None:
    storage = make(path)
    storage.write("k", {"ok": True})
    with pytest.raises(SerializationError) as info:
        with Sessions(storage).open("k") as s:
            s["lock"] = threading.Lock()
    assert info.value.key == "k"
    assert storage.read("k") == {"ok": True}


def test_files_are_private(path: str) -> None:
    old = os.umask(0)
    try:
        make(path).write("k", 1)
    finally:
        os.umask(old)
    files = list(Path(path).parent.rglob("*"))
    assert files
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == (0o700 if file.is_dir() else 0o600), file


def test_the_docstring_warns_about_pickle() -> None:
    assert "unpickling runs code" in (ShelveStorage.__doc__ or "")


# -- threads and processes ---------------------------------------------------------


def test_other_processes_changes_are_seen_and_only_they_cause_a_reopen(path: str) -> None:
    storage = make(path)
    storage.write("mine", 1)
    reopens = []
    original = storage._state._reopen
    storage._state._reopen = lambda: (reopens.append(1), original())[1]  # type: ignore[method-assign]
    for _ in range(20):
        assert storage.read("mine") == 1
        storage.write("mine", 1)
    own = len(reopens)
    # ndbm has no sync(): its writes become visible only by closing, so it
    # reopens after its own writes too; every other dbm stays open
    assert own == (20 if storage.dbm == "dbm.ndbm" else 0)
    # another process grows a value (dbm.dumb moves it) and adds a key
    workers_code = (
        "import sys; from tests.workers import open_store\n"
        "s = open_store(sys.argv[1]); s.write('mine', 'x' * 5000); s.write('theirs', 2)\n"
    )
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    from sessionkit.storage import shelf

    db = storage._state._db
    subprocess.run([sys.executable, "-c", workers_code, where(path)], check=True, cwd=root)
    assert storage.read("mine") == "x" * 5000 and storage.read("theirs") == 2
    if storage.dbm in shelf._KEPT_OPEN:  # dbm.dumb reads the new index lines; SQLite needs nothing
        assert len(reopens) == own and storage._state._db is db
    else:
        assert len(reopens) == own + 1


# -- crashes and damage ---------------------------------------------------------------


def test_kill_9_mid_write_never_serves_a_torn_or_lost_value(path: str) -> None:
    make(path).close()
    seen = detected = 0
    rounds = 5
    for round_ in range(rounds):
        ready = spawn.Event()
        p = spawn.Process(target=workers.write_forever, args=(where(path), "k", 20_000 + 3000 * round_, ready))
        p.start()
        assert ready.wait(60)  # one write made
        time.sleep(0.05 + 0.03 * round_)  # a kill at some point of a later write
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        try:
            storage = make(path)
            with Sessions(storage).open("k", timeout=2) as s:  # no lock left behind
                value = s.data
            storage.close()
        except CorruptSessionError as exc:  # detected, never served
            detected += 1
            if exc.key == "k":  # a value torn in place (dbm.dumb): rewrite or delete it
                storage.delete("k")
                storage.close()
            else:  # a fragile dbm's files after a crash mid-write: start over
                for file in Path(path).parent.iterdir():
                    if not file.name.endswith(".lock"):
                        file.unlink()
                ShelveStorage.clear_crash_mark(path)
            continue
        # the writer made at least one write (it said so) before it was killed
        assert value is not None
        assert value["blob"] == bytes([value["n"] % 251]) * len(value["blob"])
        seen += 1
    assert seen + detected == rounds
    if SHELVE_DBM in (None, "dumb", "dbm.dumb"):
        assert seen > 0


def test_fragile_dbm_refuses_to_open_after_a_crash_mid_write(path: str) -> None:
    from sessionkit.storage import shelf

    storage = make(path)
    storage.write("k", 1)
    storage.close()
    with open(path + ".lock", "r+b") as f:  # what a crash inside a write leaves
        f.seek(shelf._MARK)
        f.write(b"\x01")
    if storage.dbm not in shelf._FRAGILE:
        assert make(path).read("k") == 1  # the mark means nothing to this dbm
        return
    if storage.dbm == "dbm.gnu":  # recovered, every value checked against the recorded count
        assert make(path).read("k") == 1
        assert not os.path.exists(path + ".crashed")
        return
    with pytest.raises(CorruptSessionError, match="clear_crash_mark"):
        make(path)
    ShelveStorage.clear_crash_mark(path)
    assert make(path).read("k") == 1


@pytest.mark.skipif(SHELVE_DBM not in (None, "dumb", "dbm.dumb") or available_dbms()[-1] != "dbm.dumb", reason="dbm.dumb files")
def test_torn_value_is_reported_with_the_key_and_recovery(path: str) -> None:
    storage = ShelveStorage(path, dbm="dumb")
    storage.write("victim", {"secret": "abcdef"})
    storage.write("other", 1)
    storage.close()
    dat = Path(path + ".dat")
    data = bytearray(dat.read_bytes())
    data[data.index(b"abcdef")] ^= 0xFF
    dat.write_bytes(bytes(data))
    storage = ShelveStorage(path)
    with pytest.raises(CorruptSessionError) as info:
        storage.read("victim")
    assert info.value.key == "victim" and "write or delete the key" in str(info.value)
    assert storage.read("other") == 1
    storage.write("victim", {"fresh": 1})
    assert storage.read("victim") == {"fresh": 1}


@pytest.mark.skipif(available_dbms()[-1] != "dbm.dumb", reason="dbm.dumb files")
def test_dumb_index_damage(path: str) -> None:
    storage = ShelveStorage(path, dbm="dumb")
    storage.write("a", 1)
    storage.write("b", 2)
    storage.close()
    dirfile = Path(path + ".dir")
    good = dirfile.read_bytes()
    # a crash while appending an index line: the partial line is dropped
    dirfile.write_bytes(good + b"'c', (51")
    reopened = ShelveStorage(path)
    assert reopened.read("b") == 2
    reopened.close()  # the next open reads the files again
    assert dirfile.read_bytes() == good
    # a damaged line that is complete: reported, left alone
    dirfile.write_bytes(good + b"'c', (51\n")
    with pytest.raises(CorruptSessionError) as info:
        ShelveStorage(path).read("a")
    assert info.value.path == str(dirfile)
    assert dirfile.read_bytes() == good + b"'c', (51\n"
    # a missing index beside data: reported with the way back, never read as empty
    dirfile.write_bytes(good)
    Path(path + ".bak").write_bytes(good)
    dirfile.unlink()
    with pytest.raises(CorruptSessionError, match=r"copy .*\.bak"):
        ShelveStorage(path)


def test_hostile_keys_list_back(path: str) -> None:
    keys = ["../../x", "/etc/passwd", "", "a\x00b", "k" * 5000, "ключ🔑", "\udcff"]
    storage = make(path)
    for i, key in enumerate(keys):
        storage.write(key, i)
    storage.close()
    reopened = make(path)
    assert sorted(reopened.keys()) == sorted(keys)
    assert [reopened.read(k) for k in keys] == list(range(len(keys)))
    assert {p.name for p in Path(path).parent.iterdir()} <= {
        "sessions", "sessions.dat", "sessions.dir", "sessions.bak", "sessions.lock", "sessions.db", "sessions.pag",
        "sessions.lock.d", "sessions-journal", "sessions-wal", "sessions-shm",
    }


def test_purge_expired(path: str) -> None:
    from .helpers import FakeClock

    clock = FakeClock()
    storage = make(path, ttl=10, clock=clock)
    for i in range(20):
        storage.write(f"k{i}", i)
    clock.tick(11)
    storage.write("young", 1)
    assert storage.purge_expired() == 20
    assert list(storage.keys()) == ["young"]
    assert make(path, clock=clock).read("young") == 1


def test_another_shelf_whose_name_starts_with_this_ones_is_not_taken_for_its_files(tmp_path: Path) -> None:
    other = ShelveStorage(tmp_path / "sessions.old", dbm=SHELVE_DBM)
    other.write("k", 1)
    other.close()
    fresh = ShelveStorage(tmp_path / "sessions", dbm=SHELVE_DBM)  # a new shelf beside it
    assert all(not Path(f).name.startswith("sessions.old") for f in fresh._state._files())
    fresh.write("k", 2)
    assert fresh.read("k") == 2 and ShelveStorage(tmp_path / "sessions.old", dbm=SHELVE_DBM).read("k") == 1


@pytest.mark.parametrize("length", [0x7FFFF000, (1 << 31) + 1000])
def test_a_value_too_long_to_read_back_in_one_call_is_refused_before_anything_is_written(
    tmp_path: Path, length: int
) -> None:
    """A value is read back with one pread (dbm.dumb), which Linux cuts short at 0x7ffff000 bytes: one that
    long was acknowledged, then read back as damage that also stopped the shelf's compaction."""
    storage = ShelveStorage(tmp_path / "sessions", dbm=SHELVE_DBM)
    try:
        storage.write("k", "old")
        sizes = {f.name: f.stat().st_size for f in tmp_path.iterdir()}
        refuses_a_value_of(storage, length)
        assert {f.name: f.stat().st_size for f in tmp_path.iterdir()} == sizes
        assert storage.read("k") == "old"
    finally:
        storage.close()
