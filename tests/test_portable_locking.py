"""The portable locking method (filelock), and stores that record their method.

Where a platform has no open file description locks (macOS, Windows), the
disk backends lock through ``filelock``.  Here it is forced with
``SESSIONKIT_LOCKING=filelock`` and the whole disk-backend suite runs again
under it, processes, ``kill -9`` and ``fork`` included (its stress loops at a
quarter of their length).  A second run hides
the ``fcntl`` module altogether, as on Windows, to show that ``import
sessionkit`` and both disk backends work without it.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Any
from pathlib import Path

import pytest

from sessionkit import CorruptSessionError, MsgpackFileStorage, Sessions, ShelveStorage, StorageError
from sessionkit.storage import _lockfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
DISK_SUITE = [
    "tests/test_contract.py",
    "tests/test_processes.py",
    "tests/test_msgpack_file.py",
    "tests/test_shelve.py",
    "tests/test_deployments.py",
    "tests/test_portable_locking.py::test_the_suite_runs_with_the_method_it_expects",
    "tests/test_portable_locking.py::test_stores_made_by_the_reruns_use_the_forced_method",
]


def _pytest(args: list[str], tmp_path: Path, env: dict[str, str], prelude: str = "") -> str:
    code = f"import sys\n{prelude}\nimport pytest\nsys.exit(pytest.main(sys.argv[1:]))\n"
    done = subprocess.run(
        [sys.executable, "-c", code, "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"), *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
    )
    tail = "\n".join(done.stdout.strip().splitlines()[-15:])
    assert done.returncode == 0, f"{tail}\n{done.stderr[-2000:]}"
    assert " passed" in tail and " failed" not in tail
    return tail


@pytest.mark.skipif(
    bool(os.environ.get("SESSIONKIT_RERUN")),
    reason="the run under the main Python reruns the disk suite with the filelock method; "
    "the reruns under the other Pythons do not rerun it again",
)
def test_the_disk_suite_passes_with_the_filelock_method(tmp_path: Path) -> None:
    # its stress loops (kill -9, the soak) at a quarter of their length, as in the other Pythons' reruns
    env = dict(os.environ, SESSIONKIT_LOCKING="filelock", SESSIONKIT_EXPECT_LOCKING="filelock",
               SESSIONKIT_STRESS="0.25")
    _pytest(DISK_SUITE, tmp_path, env)


@pytest.mark.skipif(
    bool(os.environ.get("SESSIONKIT_RERUN")),
    reason="the run under the main Python hides fcntl once; the reruns under the other Pythons do not again",
)
def test_without_fcntl_import_and_both_backends_work(tmp_path: Path) -> None:
    # Child processes would find fcntl again (and filelock would lock them
    # another way), so this run stays in one process: every contract promise,
    # and several storage objects per store.
    env = dict(os.environ, SESSIONKIT_EXPECT_LOCKING="filelock")
    env.pop("SESSIONKIT_LOCKING", None)
    _pytest(
        [
            "-W", "ignore:only soft file lock:UserWarning",  # filelock without fcntl
            "tests/test_contract.py", "tests/test_sessions.py", "tests/test_multi.py",
            "tests/test_deployments.py", "tests/test_portable_locking.py",
            "-k", "two_storage_objects or unentered_handle_refuses or method_it_expects or forced_method"
            " or not (deployments or portable_locking)",
        ],
        tmp_path,
        env,
        prelude="sys.modules['fcntl'] = None  # as on Windows\n",
    )


def test_the_suite_runs_with_the_method_it_expects() -> None:
    """The reruns above set SESSIONKIT_EXPECT_LOCKING, so they cannot pass on the wrong method."""
    expected = os.environ.get("SESSIONKIT_EXPECT_LOCKING")
    if expected is None:
        pytest.skip("not a rerun")
    assert _lockfile.locking_method() == expected


def test_stores_made_by_the_reruns_use_the_forced_method(tmp_path: Path) -> None:
    expected = os.environ.get("SESSIONKIT_EXPECT_LOCKING") or _lockfile.locking_method()
    storage = MsgpackFileStorage(tmp_path / "m")
    shelf = ShelveStorage(tmp_path / "s" / "x")
    try:
        assert storage._state.locks.method == expected
        assert shelf._state.locks.method == expected
    finally:
        storage.close()
        shelf.close()


def test_a_store_keeps_the_method_it_was_created_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIONKIT_LOCKING", "filelock")
    first = MsgpackFileStorage(tmp_path / "m")
    with Sessions(first, initial=dict).open("k") as s:
        s["n"] = 1
    first.close()
    monkeypatch.setenv("SESSIONKIT_LOCKING", "auto")  # a process configured otherwise
    again = MsgpackFileStorage(tmp_path / "m")
    try:
        assert again._state.locks.method == "filelock"
        assert again.read("k") == {"n": 1}
    finally:
        again.close()


@pytest.mark.skipif(not _lockfile._HAVE_OFD, reason="needs OFD locks")
def test_a_lock_file_from_before_methods_were_recorded_means_ofd(tmp_path: Path) -> None:
    directory = tmp_path / "old"
    directory.mkdir()
    (directory / "sessionkit.lock").write_bytes(b"")  # what earlier versions left
    storage = MsgpackFileStorage(directory)
    try:
        assert storage._state.locks.method == "ofd"
    finally:
        storage.close()


@pytest.mark.parametrize("backend", ["msgpack", "shelve"])
@pytest.mark.parametrize("damage", ["cut to nothing", "cut short", "overwritten"])
def test_a_damaged_lock_file_header_is_refused_never_taken_for_another_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, damage: str
) -> None:
    """A filelock store whose lock file lost its header must not be opened with OFD locks, which would
    not exclude the processes still using filelock: CorruptSessionError naming the lock file."""
    monkeypatch.setenv("SESSIONKIT_LOCKING", "filelock")
    if backend == "msgpack":
        def opened() -> Any:
            return MsgpackFileStorage(tmp_path / "m")
        lock = tmp_path / "m" / "sessionkit.lock"
    else:
        def opened() -> Any:
            return ShelveStorage(tmp_path / "s")
        lock = Path(str(tmp_path / "s") + ".lock")
    first = opened()
    with Sessions(first, initial=dict).open("k") as s:
        s["n"] = 1
    assert first._state.locks.method == "filelock"
    first.close()
    header = lock.read_bytes()
    lock.write_bytes({"cut to nothing": b"", "cut short": header[:20],
                      "overwritten": header[:16] + b"x" * 17}[damage])
    monkeypatch.setenv("SESSIONKIT_LOCKING", "auto")  # a process that would pick OFD locks for a new store
    with pytest.raises(CorruptSessionError, match="lock file .*damaged") as caught:
        opened()
    assert caught.value.path == str(lock)


@pytest.mark.skipif(not _lockfile._HAVE_OFD, reason="needs OFD locks")
@pytest.mark.parametrize("length", [0, 16])
def test_a_shelf_lock_file_from_before_methods_were_recorded_stays_usable(tmp_path: Path, length: int) -> None:
    """A shelf writes its own records after the header's place (the dbm in use, at byte 56): a lock file
    from before methods were recorded, with zeros where the header goes, is still that, not damage."""
    path = tmp_path / "shelf"
    first = ShelveStorage(path)
    first.write("a", 1)
    first.close()
    Path(str(path) + ".lock").write_bytes(bytes(length))  # what earlier versions left
    for n in range(3):
        again = ShelveStorage(path)  # the first open records the dbm after where the header goes
        try:
            assert again._state.locks.method == "ofd"
            assert again.read("a") == 1
            again.write("b", n)
        finally:
            again.close()


def test_an_ofd_store_is_refused_where_there_are_no_ofd_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "linux"
    directory.mkdir()
    (directory / "sessionkit.lock").write_bytes(bytes(16) + _lockfile._MAGIC + b"o")
    monkeypatch.setattr(_lockfile, "_HAVE_OFD", False)  # as on macOS
    with pytest.raises(StorageError, match="open file description locks"):
        MsgpackFileStorage(directory)


def test_a_bad_locking_setting_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIONKIT_LOCKING", "flock")
    with pytest.raises(StorageError, match="SESSIONKIT_LOCKING"):
        MsgpackFileStorage(tmp_path / "new")
