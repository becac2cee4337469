"""ShelveStorage under real faults: kill -9 at any moment, a full disk, read-only and unreadable files.

Every check reads the last acknowledged value (or the one being written when
the writer died), or gets a documented ``SessionError``: never a silent loss.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sessionkit import CorruptSessionError, StorageError, ShelveStorage
from sessionkit.storage import shelf

from .conftest import SHELVE_DBM, make_shelf, shelf_spec
from .helpers import stressed, tmpfs
from .shelf_writer import read_log

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


make = make_shelf
where = shelf_spec


def blob(n: int, size: int) -> dict[str, Any]:
    return {"n": n, "blob": bytes([n % 251]) * size}


# -- kill -9 ---------------------------------------------------------------------------


def kill_loop(path: str, cycles: int, seed: int) -> dict[str, int]:
    """Kill writers ``cycles`` times; check every acknowledged value after each kill."""
    rng = random.Random(seed)
    make(path).close()
    reader = make(path)  # stays open: it catches up with each dead writer's changes
    acked: dict[str, int | None] = {}
    counts = {"checks": 0, "in_flight_seen": 0, "refused": 0}
    for cycle in range(cycles):
        log = Path(path).parent / f"log{cycle}"
        writer = subprocess.Popen(
            [sys.executable, "-m", "tests.shelf_writer", where(path), str(cycle + 1), str(log)], cwd=ROOT
        )
        deadline = time.monotonic() + 60
        while not (log.exists() and log.read_bytes().startswith(b"ready")):
            assert time.monotonic() < deadline and writer.poll() is None, "the writer did not start"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.002, 0.06))
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(30)
        mine, pending, _in_merge = read_log(log)
        acked.update(mine)
        try:
            listed = set(reader.keys())  # always at least one operation, even with nothing acknowledged
            found = {key: reader.read(key) for key in acked}
        except CorruptSessionError as exc:
            # the documented refusal after a crash inside a fragile dbm's write
            assert reader.dbm in shelf._FRAGILE and "clear_crash_mark" in str(exc), exc
            counts["refused"] += 1
            reader.close()
            for file in Path(path).parent.iterdir():
                if file.name.startswith("sessions") and not file.name.startswith("sessions.lock"):
                    file.unlink()
            ShelveStorage.clear_crash_mark(path)
            reader = make(path)
            acked = {}
            continue
        for key, want in acked.items():
            got = found[key]
            got_n = None if got is None else got["n"]
            if got is not None:
                assert got["blob"] == bytes([got_n % 251]) * len(got["blob"])
            if got_n == want:
                counts["checks"] += 1
                continue
            # the write the writer was killed in: it may have landed
            assert pending is not None and pending == (key, got_n), (
                f"cycle {cycle}: {key} reads {got_n}, acknowledged {want}, in flight {pending}"
            )
            acked[key] = got_n
            counts["in_flight_seen"] += 1
        live = {key for key, n in acked.items() if n is not None}
        assert listed == live or (pending is not None and listed ^ live == {pending[0]}), (listed, live)
    reader.close()
    fresh = make(path)
    assert {key: (None if v is None else v["n"]) for key, v in ((k, fresh.read(k)) for k in acked)} == acked
    fresh.close()
    return counts


def test_kill_9_loop_loses_no_acknowledged_value(tmp_path: Path) -> None:
    counts = kill_loop(str(tmp_path / "shelf" / "sessions"), cycles=25, seed=1)
    assert counts["checks"] > 0 or counts["refused"] > 0


@pytest.mark.slow
def test_kill_9_stress_loses_no_acknowledged_value(tmp_path: Path) -> None:
    counts = kill_loop(str(tmp_path / "shelf" / "sessions"), cycles=int(stressed(200, 40)), seed=2)
    assert counts["checks"] > 0


_TEARING_WRITER = """
import os, sys
from sessionkit import ShelveStorage
path, key, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
storage = ShelveStorage(path, dbm="dbm.gnu")
state = storage._state
old = storage.read(key)

class Tearing:
    # gdbm's handle, killed inside a store that overwrote part of the old value in place
    def __init__(self, db):
        self.db = db
    def __getattr__(self, name):
        return getattr(self.db, name)
    def __contains__(self, kb):
        return kb in self.db
    def __len__(self):
        return len(self.db)
    def __setitem__(self, kb, value):
        with open(path, "r+b") as f:
            data = f.read()
            at = data.find(bytes([1]) * 2000) if old is not None else len(data)
            f.seek(at + 500)
            f.write(bytes([2]) * 1000)  # the first bytes of the new value, the rest never written
        os._exit(9)

with state._mutex, state.section():
    state._db = Tearing(state._db)
storage.write(key, {"n": 2, "blob": bytes([2]) * size})
"""


@pytest.mark.parametrize("existing", [True, False], ids=["replace", "insert"])
def test_dbm_gnu_a_store_torn_by_a_crash_keeps_the_acknowledged_value(tmp_path: Path, existing: bool) -> None:
    """gdbm writes a same-size value over the old one in place; a kill there must not lose the old one."""
    if "dbm.gnu" not in shelf.available_dbms():
        pytest.skip("this Python has no dbm.gnu")
    path = str(tmp_path / "sessions")
    storage = ShelveStorage(path, dbm="dbm.gnu")
    if existing:
        storage.write("k", {"n": 1, "blob": bytes([1]) * 2000})
    storage.write("other", {"n": 7})
    done = subprocess.run([sys.executable, "-c", _TEARING_WRITER, path, "k", "2000"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 9, done.stderr[-2000:]
    want = {"n": 1, "blob": bytes([1]) * 2000} if existing else None
    assert storage.read("k") == want  # recovered: the old value put back, a torn new key dropped
    assert storage.read("other") == {"n": 7}
    assert sorted(storage.keys()) == (["k", "other"] if existing else ["other"])
    assert not os.path.exists(path + ".crashed")
    storage.write("k", {"n": 3})
    storage.close()
    assert ShelveStorage(path).read("k") == {"n": 3}


# -- dbm.dumb: never in place, compaction, crash points -------------------------------

dumb_only = pytest.mark.skipif(
    SHELVE_DBM not in (None, "dumb", "dbm.dumb"),
    reason="dbm.dumb files",
)


@dumb_only
def test_dumb_never_rewrites_a_value_in_place(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    storage = ShelveStorage(path, dbm="dumb")
    storage.write("k", "a" * 100)
    dat = Path(path + ".dat")
    first = dat.read_bytes()
    storage.write("k", "b" * 100)  # same size: dbm.dumb would overwrite the old bytes
    assert dat.read_bytes().startswith(first)
    assert storage.read("k") == "b" * 100


@dumb_only
def test_dumb_reclaims_space(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    storage = ShelveStorage(path, dbm="dumb")
    storage.write("other", list(range(50)))
    for i in range(10_000):
        storage.write("k", "x" * (1000 if i % 2 else 2000))
    size = os.path.getsize(path + ".dat") + os.path.getsize(path + ".dir")
    assert size < 300_000, size  # dbm.dumb: 10.2 MB
    storage.close()
    again = ShelveStorage(path)
    assert again.read("k") == "x" * 1000 and again.read("other") == list(range(50))
    assert {p.name for p in tmp_path.iterdir()} == {"s.dat", "s.dir", "s.lock"} | (
        {"s.lock.d"} if (tmp_path / "s.lock.d").exists() else set()
    )


@dumb_only
def test_dumb_deletes_are_appended_and_read_back(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    storage = ShelveStorage(path, dbm="dumb")
    for i in range(100):
        storage.write(f"k{i}", i)
    before = Path(path + ".dir").read_bytes()
    storage.delete("k5")
    assert Path(path + ".dir").read_bytes().startswith(before)  # no rewrite of the index
    storage.close()
    again = ShelveStorage(path)
    assert again.read("k5") is None and again.read("k6") == 6 and len(list(again.keys())) == 99


COMPACTION_STEPS = ["before-commit", "after-commit", "after-dat", "after-dir"]


def compaction_crasher(path: str, stop: int, keys: int) -> str:
    """A program that fills a shelf, then rewrites one key until it dies at a compaction's ``stop``-th rename.

    It dies by ``os._exit``: no cleanup runs, as with ``kill -9``.
    """
    return f"""
import os
from sessionkit import ShelveStorage
from sessionkit.storage import _dumbdb
real_replace, calls = os.replace, []
def replace(a, b):
    if len(calls) == {stop}:
        os._exit(9)
    calls.append(b)
    real_replace(a, b)
_dumbdb.os.replace = replace
s = ShelveStorage({path!r}, dbm="dumb")
for i in range({keys}):
    s.write(f"user{{i:03}}", {{"who": i}})
i = 0
while True:
    i += 1
    s.write("hot", "x" * (3000 + i % 7))
"""


@dumb_only
@pytest.mark.parametrize("step", COMPACTION_STEPS)
def test_dumb_crash_at_each_step_of_a_compaction(tmp_path: Path, step: str) -> None:
    """A process dies (os._exit, no cleanup) at each step of a compaction; nothing is lost."""
    path = str(tmp_path / "s")
    code = compaction_crasher(path, COMPACTION_STEPS.index(step), keys=20)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120)
    assert done.returncode == 9
    leftovers = {p.name for p in tmp_path.iterdir()}
    assert {"s.dat.compact", "s.dir.committed"} & leftovers or step == "after-dir"
    storage = ShelveStorage(path)
    assert [storage.read(f"user{i:03}") for i in range(20)] == [{"who": i} for i in range(20)]
    assert storage.read("hot").startswith("xxx")
    storage.write("after", 1)
    storage.close()
    assert not {p.name for p in tmp_path.iterdir()} & {"s.dat.compact", "s.dir.compact", "s.dir.committed"}
    assert ShelveStorage(path).read("after") == 1


@dumb_only
def test_dumb_compaction_by_another_process_is_picked_up(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    mine = ShelveStorage(path, dbm="dumb")
    mine.write("a", 1)
    code = (
        "from sessionkit import ShelveStorage\n"
        f"s = ShelveStorage({path!r})\n"
        "for i in range(300): s.write('hot', 'y' * 1000 + str(i))\n"
        "s.write('b', 2)\n"
    )
    inode = os.stat(path + ".dir").st_ino
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    assert os.stat(path + ".dir").st_ino != inode  # it compacted
    assert mine.read("a") == 1 and mine.read("b") == 2 and mine.read("hot") == "y" * 1000 + "299"
    mine.write("c", 3)
    assert ShelveStorage(path).read("c") == 3


# -- a full disk -----------------------------------------------------------------------


def fill(directory: Path) -> Path:
    """Fill the file system; returns the filler file (delete it to free the space)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = b"\0" * 4096
        while True:
            try:
                os.write(fd, chunk)
            except OSError:
                break
        while True:  # the last few bytes
            try:
                if os.write(fd, b"\0") <= 0:
                    break
            except OSError:
                break
    finally:
        os.close(fd)
    return filler


@pytest.mark.skipif(not IS_ROOT, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("operation", ["new key", "same-size rewrite", "bigger rewrite", "delete"])
def test_full_disk_loses_nothing(tmp_path: Path, operation: str) -> None:
    probe = make(str(tmp_path / "probe"))
    dbm = probe.dbm
    probe.close()
    # SQLite's write-ahead log alone grows to 4 MB before it is folded back
    size = "8m" if dbm == "dbm.sqlite3" else "256k"
    with tmpfs(tmp_path / "small", size) as small:
        path = str(small / "sessions")
        storage = make(path)
        values = {f"user{i}": blob(i, 300) for i in range(150)}
        for key, value in values.items():
            storage.write(key, value)
        filler = fill(small)
        victim = "user7"
        failures = 0
        for attempt in range(40):  # until the disk refuses (some writes fit in a block's slack)
            try:
                if operation == "new key":
                    storage.write(f"new{attempt}", blob(attempt, 3000))
                    values[f"new{attempt}"] = blob(attempt, 3000)
                elif operation == "same-size rewrite":
                    storage.write(victim, blob(1000 + attempt, 300))
                    values[victim] = blob(1000 + attempt, 300)
                elif operation == "bigger rewrite":
                    storage.write(victim, blob(1000 + attempt, 3000))
                    values[victim] = blob(1000 + attempt, 3000)
                else:
                    storage.delete(f"user{attempt}")
                    values.pop(f"user{attempt}")
            except StorageError as exc:
                assert exc.path and str(small) in exc.path
                failures += 1
            except CorruptSessionError as exc:  # a fragile dbm after a failed write: refused, not lost
                assert storage.dbm in shelf._FRAGILE and "clear_crash_mark" in str(exc)
                failures += 1
                break
            if failures >= 3:
                break
        # dbm.dumb (here) appends every change, so each operation meets the
        # full disk; gdbm and Berkeley DB rewrite and delete in place or in
        # freed pages, where succeeding is fine: what succeeded is checked below
        assert failures or (operation != "new key" and storage.dbm != "dbm.dumb"), "the disk never filled"
        if storage.dbm == "dbm.ndbm" and failures:
            return  # refused until checked: covered by the refusal above
        # every other session intact, the failed one at its old value; in this
        # process (dbm.gnu: once there is room to recover) and in a fresh one
        if storage.dbm not in shelf._FRAGILE or not failures:
            for key, value in values.items():
                assert storage.read(key) == value, key
            assert sorted(storage.keys()) == sorted(values)
        else:
            with pytest.raises(StorageError):  # recovery needs room for a copy
                storage.read(victim)
        storage.close()
        filler.unlink()
        fresh = make(path)
        assert {key: fresh.read(key) for key in values} == values
        fresh.write(victim, "works again")
        assert fresh.read(victim) == "works again"
        fresh.close()


# -- read-only and unreadable files ---------------------------------------------------


@pytest.mark.skipif(not IS_ROOT, reason="bind mounts need root")
@dumb_only
def test_read_only_dir_file(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    storage = ShelveStorage(path, dbm="dumb")
    storage.write("a", 1)
    storage.close()
    dirfile = path + ".dir"
    if subprocess.run(["mount", "--bind", dirfile, dirfile], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", dirfile, dirfile], check=True)
        ro = ShelveStorage(path)
        assert ro.read("a") == 1
        with pytest.raises(StorageError) as info:
            ro.write("a", 2)
        assert info.value.path == path
        with pytest.raises(StorageError):
            ro.delete("a")
        assert ro.read("a") == 1
        ro.close()
    finally:
        subprocess.run(["umount", dirfile], check=False)
    assert ShelveStorage(path).read("a") == 1
    assert os.path.getsize(path + ".dat") == len(Path(path + ".dat").read_bytes())


SETPRIV = shutil.which("setpriv")


def without_root_powers(argv: list[str]) -> list[str]:
    """Run ``argv`` as root that obeys file permissions (no CAP_DAC_OVERRIDE)."""
    assert SETPRIV is not None
    return [SETPRIV, "--bounding-set", "-dac_override,-dac_read_search", "--", *argv]


@pytest.mark.skipif(not IS_ROOT or SETPRIV is None, reason="needs root and setpriv to drop the power to ignore permissions")
@pytest.mark.parametrize("unreadable", ["every file", "data file only"])
def test_unreadable_files_are_storage_errors(tmp_path: Path, unreadable: str) -> None:
    """Files this process may not read give StorageError naming the file, never a raw error or 'corrupt'."""
    path = str(tmp_path / "shelf" / "sessions")
    storage = make(path)
    storage.write("a", 1)
    storage.close()
    targets = [p for p in (tmp_path / "shelf").iterdir() if p.is_file() and not p.name.startswith("sessions.lock")]
    if unreadable == "data file only":
        targets = [p for p in targets if p.suffix in (".dat", ".pag", ".db") or p.name == "sessions"][:1]
    assert targets
    for p in targets:
        os.chmod(p, 0)
    code = (
        "from sessionkit import ShelveStorage, SessionError, StorageError\n"
        "try:\n"
        f"    print(ShelveStorage({path!r}, dbm={SHELVE_DBM!r}).read('a'))\n"
        "except StorageError as exc:\n"
        "    print('StorageError', exc.path)\n"
        "except SessionError as exc:\n"
        "    print('other', type(exc).__name__, exc)\n"
    )
    done = subprocess.run(without_root_powers([sys.executable, "-c", code]), cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.startswith("StorageError " + str(tmp_path)), done.stdout + done.stderr[-800:]
    for p in targets:
        os.chmod(p, 0o600)
    assert make(path).read("a") == 1


# -- what an adversarial review found ---------------------------------------------------


@dumb_only
@pytest.mark.parametrize("mark", ["lock file deleted", "mark cleared"])
def test_a_committed_compaction_is_finished_even_without_its_mark(tmp_path: Path, mark: str) -> None:
    """A crash between the renames, then the mark lost: the new .dat is never read through the old .dir."""
    path = str(tmp_path / "s")
    code = compaction_crasher(path, 2, keys=200)  # dies with the .dat in place, the .dir not yet
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120)
    assert done.returncode == 9 and os.path.exists(path + ".dir.committed")
    if mark == "lock file deleted":
        os.unlink(path + ".lock")
    else:
        ShelveStorage.clear_crash_mark(path)
    storage = ShelveStorage(path)
    assert [storage.read(f"user{i:03}") for i in range(200)] == [{"who": i} for i in range(200)]


@dumb_only
def test_an_older_index_copied_over_a_running_shelf_is_refused_until_accepted(tmp_path: Path) -> None:
    """A shorter ``.dir`` put back under running processes cannot be told from one cut short: its
    missing lines would be sessions read as absent.  It is refused, in this process and in a new
    one, until ``clear_crash_mark`` takes the files as they are; then every process reads them anew."""
    path = str(tmp_path / "s")
    storage = ShelveStorage(path, dbm="dumb")
    storage.write("a", 1)
    storage.write("b", 1)
    backup = Path(path + ".dir").read_bytes()
    storage.write("a", 2)
    storage.write("c", 3)
    Path(path + ".dir").write_bytes(backup)  # cp keeps the inode: "restore" under a running process
    code = f"from sessionkit import ShelveStorage; ShelveStorage({path!r}).write('d', 4)"
    refused = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode and "CorruptSessionError" in refused.stderr and "cut short" in refused.stderr
    with pytest.raises(CorruptSessionError, match="cut short"):
        storage.write("e", 5)
    ShelveStorage.clear_crash_mark(path)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    assert storage.read("a") == 1 and storage.read("c") is None and storage.read("d") == 4
    storage.write("e", 5)
    fresh = subprocess.run(
        [sys.executable, "-c", f"from sessionkit import ShelveStorage; print(sorted(ShelveStorage({path!r}).keys()))"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    )
    assert fresh.stdout.strip() == str(["a", "b", "d", "e"])


def test_a_write_into_files_deleted_under_a_running_process_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "shelf" / "sessions")
    storage = make(path)
    storage.write("old", 1)
    if storage.dbm not in ("dbm.dumb", "dbm.gnu"):
        pytest.skip(f"{storage.dbm} reports this itself")
    for file in Path(path).parent.iterdir():
        if file.is_file() and not file.name.startswith("sessions.lock"):
            file.unlink()
    with pytest.raises(StorageError, match="deleted"):
        storage.write("new", 2)


@dumb_only
@pytest.mark.parametrize("line", [b"'k', (0, 1000000000000)\n", b"'k', (10000000000000000000, 5)\n",
                                  b"'k', (0, 10000000000000000000)\n", b"'k', (1000000000000000, 5)\n"])
def test_index_lines_pointing_outside_the_data_are_damage(tmp_path: Path, line: bytes) -> None:
    path = str(tmp_path / "s")
    storage = ShelveStorage(path, dbm="dumb")
    storage.write("other", 1)
    storage.close()
    with open(path + ".dir", "ab") as f:
        f.write(line)
    storage = ShelveStorage(path) if b"10000000000000000000" not in line else None
    if storage is None:
        with pytest.raises(CorruptSessionError):
            ShelveStorage(path)
        return
    with pytest.raises(CorruptSessionError):
        storage.read("k")
    with pytest.raises(CorruptSessionError):
        list(storage.items())
    storage.write("k", "fresh")  # writing the key recovers it, without a sparse terabyte
    assert storage.read("k") == "fresh" and os.path.getsize(path + ".dat") < 10_000


@dumb_only
def test_a_key_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    storage = ShelveStorage(path, dbm="dumb")
    storage.write("fine", 1)
    storage.close()
    with open(path + ".dir", "ab") as f:
        f.write(b"'\xc3(', (0, 5)\n")  # another program's key: not UTF-8
    with pytest.raises(CorruptSessionError, match="not UTF-8"):
        list(ShelveStorage(path).keys())


GNU_PYTHON = "/usr/bin/python3"


def _python_has(exe: str, module: str) -> bool:
    """Whether the Python ``exe`` exists and can import ``module``."""
    return os.path.exists(exe) and subprocess.run([exe, "-c", f"import {module}"], capture_output=True).returncode == 0


@pytest.mark.skipif("dbm.gnu" in shelf.available_dbms() or not _python_has(GNU_PYTHON, "dbm.gnu"),
                    reason="needs this Python without dbm.gnu and Debian's python3 with it")
def test_a_python_without_the_shelfs_dbm_refuses_instead_of_starting_another(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    site = [p for p in sys.path if p.endswith("site-packages")]
    code = f"from sessionkit import ShelveStorage; s = ShelveStorage({path!r}, dbm='gnu'); s.write('a', 1); print(s.dbm)"
    done = subprocess.run([GNU_PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *site])})
    assert done.stdout.strip() == "dbm.gnu", done.stderr[-1000:]
    with pytest.raises(StorageError, match="has no dbm.gnu"):
        ShelveStorage(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "s.lock"]  # no dumb shelf beside it


# -- what a second review found ----------------------------------------------------------


@dumb_only
def test_files_renamed_over_a_running_shelf_are_read_anew(tmp_path: Path) -> None:
    """A backup put back by rename (rsync) while processes run: no one reads or writes the old files."""
    path = str(tmp_path / "s")
    storage = ShelveStorage(path, dbm="dumb")
    storage.write("k", "v1")
    backup = {end: Path(path + end).read_bytes() for end in (".dat", ".dir")}
    storage.write("k", "v-later")
    for end, data in backup.items():
        Path(path + end + ".restore").write_bytes(data)
        os.replace(path + end + ".restore", path + end)
    code = f"from sessionkit import ShelveStorage; ShelveStorage({path!r}).write('other', 1)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    assert storage.read("k") == "v1" and storage.read("other") == 1  # what is at the path now
    storage.write("k", "v2")
    again = subprocess.run(
        [sys.executable, "-c", f"from sessionkit import ShelveStorage; print(ShelveStorage({path!r}).read('k'))"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    )
    assert again.stdout.strip() == "v2"


@dumb_only
def test_a_compaction_that_fails_after_its_commit_still_tells_other_processes(tmp_path: Path) -> None:
    """The directory fsync after the renames fails (EIO): the files changed all the same."""
    path = str(tmp_path / "s")
    reader = ShelveStorage(path, dbm="dumb")
    reader.write("k", "v0")
    assert reader.read("k") == "v0"
    code = f"""
import errno, os
from sessionkit import ShelveStorage
from sessionkit.storage import _dumbdb
real, calls = _dumbdb.fsync_dir, []
def failing(directory):
    calls.append(directory)
    if len(calls) == 2:  # the fsync after the renames
        raise OSError(errno.EIO, "injected")
    real(directory)
_dumbdb.fsync_dir = failing
s = ShelveStorage({path!r})
while len(calls) < 2:
    s.write("pad", "x" * 5000)
s.write("k", "v2")
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    assert reader.read("k") == "v2"


def test_gdbm_temporaries_are_told_from_other_files() -> None:
    from sessionkit.storage._gnudb import _is_gdbm_temporary

    assert _is_gdbm_temporary("sessions", "sessions.aiaQCa")
    for other in ("sessions.v2.dir", "sessions.v2", "sessions.crashed", "sessions.lock", "sessions.backup1x"):
        assert not _is_gdbm_temporary("sessions", other), other


def test_a_damaged_dbm_record_in_the_lock_file_names_the_lock_file(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    make(path).close()
    with open(path + ".lock", "r+b") as f:
        f.seek(shelf._DBM_AT)
        f.write(b"xyz".ljust(shelf._DBM_NAME, b"\0"))
    with pytest.raises(CorruptSessionError, match=r"s\.lock records the dbm") as info:
        make(path)
    assert info.value.path == path + ".lock"


@pytest.mark.skipif("dbm.ndbm" in shelf.available_dbms() or not _python_has(GNU_PYTHON, "dbm.ndbm"),
                    reason="needs this Python without dbm.ndbm and Debian's python3 with it")
def test_a_berkeley_db_shelf_without_a_lock_file_is_not_taken_for_a_new_one(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    code = f"import shelve, dbm.ndbm; db = shelve.Shelf(dbm.ndbm.open({path!r}, 'c')); db['alice'] = 1; db.close()"
    subprocess.run([GNU_PYTHON, "-c", code], check=True, timeout=60)
    with pytest.raises(StorageError, match="cannot read"):
        ShelveStorage(path)
    assert not os.path.exists(path + ".dat")
