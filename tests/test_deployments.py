"""Real deployments of the disk backends: every ``with sessions.open(k)`` is exclusive.

What is proven, for MsgpackFileStorage and ShelveStorage alike, with real
files, real threads and real processes (spawned, or forked where the test is
about fork) and no mocks; counters must come out exact:

- several storage objects over one store in one process (same path or a
  symlinked one) exclude each other, and closing one leaves the others intact;
- threads inside several processes, with and without a lock timeout, lose no
  update and see no error (no false "deadlock" from the kernel);
- copying the store (a backup) while a key is held does not release the key;
- deleting the lock file under running workers loses no acknowledged update;
- objects created before ``fork()`` (gunicorn ``--preload``) work in the
  children, also when the parent had a key open or a storage call running;
- a handle from ``open()`` that is never entered holds no lock, and refuses
  to be used outside a ``with`` block.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import shutil
import subprocess
import sys
import threading
import time
import zlib
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from sessionkit import (
    LockTimeout,
    MemoryStorage,
    MsgpackFileStorage,
    Sessions,
    SessionError,
    ShelveStorage,
    StorageError,
)

from . import workers
from .conftest import SHELVE_DBM
from .deploy_workers import (
    BACKENDS,
    Background,
    count_loop,
    fork_child,
    increment,
    increment_until,
    lock_path,
    open_store,
    read_count,
    read_result,
    run_isolated,
    run_threads,
    store_dir,
    store_spec,
    symlinked,
    try_open,
    wait_children,
)

spawn = multiprocessing.get_context("spawn")
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="this platform has no os.fork")


class Workers:
    """Spawned processes of one test; whatever is still alive at the end is killed."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[BaseProcess] = []
        self._results = 0

    def result_file(self) -> str:
        self._results += 1
        return str(self.tmp_path / f"result-{self._results}.json")

    def start(self, target: Callable[..., Any], *args: Any) -> BaseProcess:
        p = spawn.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def join(self, procs: list[BaseProcess], timeout: float = 60.0) -> None:
        """Wait for ``procs`` by a common deadline; each must exit with 0."""
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        codes = [(p.name, p.exitcode) for p in procs]
        assert all(code == 0 for _, code in codes), f"worker exit codes (None: hung): {codes}"

    def try_open(self, spec: str, key: str, timeout: float) -> str:
        """Another process opens ``key`` with ``lock_timeout=timeout``:
        ``"locked"``, ``"timeout"`` or ``"error: ..."``."""
        result = self.result_file()
        self.join([self.start(try_open, spec, key, timeout, result)], 30)
        return str(read_result(result))

    def kill_all(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(5)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path)
    try:
        yield w
    finally:
        w.kill_all()


def spec_of(backend: str, tmp_path: Path) -> str:
    return store_spec(backend, tmp_path, SHELVE_DBM)


def merged_errors(reports: list[dict[str, Any]]) -> dict[str, int]:
    """Every worker's errors, summed: description -> count."""
    merged: dict[str, int] = {}
    for report in reports:
        for what, count in report["errors"].items():
            merged[what] = merged.get(what, 0) + count
    return merged


class Holder:
    """A thread of this process that holds ``key`` open until ``release()``,
    then increments it."""

    def __init__(self, sessions: Sessions, key: str) -> None:
        self.held = threading.Event()
        self._release = threading.Event()

        def hold() -> None:
            with sessions.open(key) as s:
                self.held.set()
                self._release.wait(30)
                s["n"] = s.get("n", 0) + 1

        self.bg = Background(hold)
        assert self.held.wait(10), f"the holder thread never got {key!r}"

    def release(self) -> None:
        self._release.set()
        self.bg.join(10)


# -- 1. several storage objects over one store, in one process --------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_storage_objects_on_one_key(backend: str, tmp_path: Path) -> None:
    spec = spec_of(backend, tmp_path)
    a, b = open_store(spec), open_store(spec)
    try:
        sa, sb = Sessions(a, initial=dict), Sessions(b, initial=dict)
        run_threads([lambda: increment(sa, "k", 2000), lambda: increment(sb, "k", 2000)])
    finally:
        a.close()
        b.close()
    assert read_count(spec, "k") == 4000


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_storage_objects_on_disjoint_keys_sharing_shards(backend: str, tmp_path: Path) -> None:
    # 64 keys over the store's shards (16 by default): every shard holds keys
    # of both threads, so the two objects write the same logs at once.  The
    # sessions change size from write to write, as real ones do, so records
    # are appended (and msgpack logs compacted) rather than rewritten in place.
    spec = spec_of(backend, tmp_path)
    keys = [f"key-{i}" for i in range(64)]
    rounds = 100
    a, b = open_store(spec), open_store(spec)

    def work(storage: Any, mine: list[str]) -> None:
        sessions = Sessions(storage, initial=dict)
        for _ in range(rounds):
            for key in mine:
                with sessions.open(key) as s:
                    n = s["n"] = s.get("n", 0) + 1
                    s["pad"] = "x" * (n % 3 * 300)

    try:
        run_threads([lambda: work(a, keys[0::2]), lambda: work(b, keys[1::2])])
    finally:
        a.close()
        b.close()
    counts = {key: read_count(spec, key) for key in keys}
    assert counts == {key: rounds for key in keys}


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_storage_objects_through_a_symlink(backend: str, tmp_path: Path) -> None:
    spec = spec_of(backend, tmp_path)
    a = open_store(spec)
    b = open_store(symlinked(spec, tmp_path / "link"))
    try:
        sa, sb = Sessions(a, initial=dict), Sessions(b, initial=dict)
        run_threads([lambda: increment(sa, "k", 2000), lambda: increment(sb, "k", 2000)])
    finally:
        a.close()
        b.close()
    assert read_count(spec, "k") == 4000


@pytest.mark.parametrize("path", ["same-path", "symlink"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_closing_one_storage_object_leaves_the_other_working(
    backend: str, path: str, tmp_path: Path, procs: Workers
) -> None:
    spec = spec_of(backend, tmp_path)
    a = open_store(spec)
    b = open_store(spec if path == "same-path" else symlinked(spec, tmp_path / "link"))
    sa, sb = Sessions(a, initial=dict), Sessions(b, initial=dict)
    increment(sa, "k")
    increment(sb, "k")
    holder = Holder(sb, "k")  # a thread holds "k" through b
    try:
        a.close()
        # b's key lock still excludes this process's threads and other processes
        with pytest.raises(LockTimeout):
            run_threads([lambda: increment(sb, "k", timeout=0.3)])
        assert procs.try_open(spec, "k", 0.3) == "timeout"
        # and b still reads and writes
        increment(sb, "other", 3)
        assert b.read("other") == {"n": 3}
    finally:
        holder.release()
    increment(sb, "k")
    assert b.read("k") == {"n": 4}
    b.close()
    assert read_count(spec, "k") == 4
    assert read_count(spec, "other") == 3


# -- 2. threads inside several processes -------------------------------------------


@pytest.mark.parametrize("lock_timeout", [None, 30], ids=["no-timeout", "timeout-30"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_in_processes_over_many_keys(
    backend: str, lock_timeout: float | None, tmp_path: Path, procs: Workers
) -> None:
    spec = spec_of(backend, tmp_path)
    open_store(spec).close()
    keys = [f"key-{i:02d}" for i in range(40)]
    n_procs, n_threads, times = 3, 6, 200
    start = spawn.Event()
    results = []
    for p in range(n_procs):
        # every thread walks all keys, each from its own starting point
        shifts = [7 * (p * n_threads + t) % len(keys) for t in range(n_threads)]
        thread_keys = [keys[shift:] + keys[:shift] for shift in shifts]
        results.append(procs.result_file())
        procs.start(count_loop, spec, thread_keys, times, lock_timeout, start, results[-1])
    start.set()
    procs.join(procs.procs, 60)
    reports = [read_result(r) for r in results]
    errors = merged_errors(reports)
    assert not errors, f"{sum(errors.values())} errors: " + "; ".join(f"{n} x {e}" for e, n in errors.items())
    total = n_procs * n_threads * times
    assert sum(r["done"] for r in reports) == total
    assert sum(read_count(spec, key) for key in keys) == total


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_in_processes_on_their_own_keys(backend: str, tmp_path: Path, procs: Workers) -> None:
    spec = spec_of(backend, tmp_path)
    open_store(spec).close()
    n_procs, n_threads, times = 2, 4, 1000
    start = spawn.Event()
    results = []
    for p in range(n_procs):
        results.append(procs.result_file())
        thread_keys = [[f"p{p}-t{t}"] for t in range(n_threads)]
        procs.start(count_loop, spec, thread_keys, times, None, start, results[-1])
    start.set()
    procs.join(procs.procs, 60)
    reports = [read_result(r) for r in results]
    errors = merged_errors(reports)
    assert not errors, f"{sum(errors.values())} errors: " + "; ".join(f"{n} x {e}" for e, n in errors.items())
    counts = {f"p{p}-t{t}": read_count(spec, f"p{p}-t{t}") for p in range(n_procs) for t in range(n_threads)}
    assert counts == {key: times for key in counts}


# -- 3. a backup copy while a key is held ---------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_backup_while_another_process_holds_a_key(backend: str, tmp_path: Path, procs: Workers) -> None:
    spec = spec_of(backend, tmp_path)
    storage = open_store(spec)  # this process uses the store too
    increment(Sessions(storage, initial=dict), "k")
    held, release = spawn.Event(), spawn.Event()
    holder = procs.start(workers.hold, spec, "k", held, release)
    try:
        assert held.wait(30), "the holder process never got 'k'"
        shutil.copytree(store_dir(spec), tmp_path / "backup")
        assert procs.try_open(spec, "k", 0.3) == "timeout"
    finally:
        release.set()
    procs.join([holder], 30)
    assert procs.try_open(spec, "k", 5) == "locked"
    storage.close()
    assert read_count(spec, "k") == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_backup_while_a_thread_of_this_process_holds_a_key(
    backend: str, tmp_path: Path, procs: Workers
) -> None:
    spec = spec_of(backend, tmp_path)
    storage = open_store(spec)
    sessions = Sessions(storage, initial=dict)
    increment(sessions, "k")
    holder = Holder(sessions, "k")
    try:
        shutil.copytree(store_dir(spec), tmp_path / "backup")
        assert procs.try_open(spec, "k", 0.3) == "timeout"
    finally:
        holder.release()
    assert procs.try_open(spec, "k", 5) == "locked"
    increment(sessions, "k")
    storage.close()
    assert read_count(spec, "k") == 4


# -- 4. the lock file deleted under running workers --------------------------------------


def _delete_lock_file(spec: str, times: int, pause: float) -> int:
    deleted = 0
    for _ in range(times):
        try:
            os.unlink(lock_path(spec))
            deleted += 1
        except FileNotFoundError:
            pass
        time.sleep(pause)
    return deleted


def _run_deletion_race(
    spec: str, tmp_path: Path, procs: Workers, late_worker: bool, times: int = 3, pause: float = 0.25
) -> None:
    open_store(spec).close()
    start, after, stop = spawn.Event(), spawn.Event(), spawn.Event()
    results: list[str] = []

    def start_worker() -> None:
        ready = spawn.Event()
        results.append(procs.result_file())
        procs.start(increment_until, spec, "k", ready, start, after, stop, results[-1])
        assert ready.wait(30), "a worker never opened the store"

    start_worker()
    start_worker()
    start.set()
    try:
        time.sleep(0.3)
        deleted = _delete_lock_file(spec, times, pause)
        if late_worker:  # a worker (re)started after the lock file was deleted
            start_worker()
        deleted += _delete_lock_file(spec, times, pause)
        after.set()
        time.sleep(0.8)
    finally:
        stop.set()
    procs.join(procs.procs, 30)
    reports = [read_result(r) for r in results]
    assert [r["unexpected"] for r in reports if r["unexpected"]] == []
    acked = sum(r["acked"] for r in reports)
    assert deleted >= 1
    assert read_count(spec, "k") == acked, f"refused: {[r['refused'] for r in reports]}"
    # Processes that had the store open while its lock file was replaced may
    # refuse it from then on (only a process that is the store's only user
    # moves to the new file), so progress after the deletions is not
    # promised; once they are gone, the store works again.
    assert procs.try_open(spec, "k", 5) == "locked"
    assert read_count(spec, "k") == acked + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_lock_file_deleted_under_two_workers(backend: str, tmp_path: Path, procs: Workers) -> None:
    _run_deletion_race(spec_of(backend, tmp_path), tmp_path, procs, late_worker=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lock_file_deleted_then_a_worker_starts(backend: str, tmp_path: Path, procs: Workers) -> None:
    _run_deletion_race(spec_of(backend, tmp_path), tmp_path, procs, late_worker=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lock_file_deleted_every_few_milliseconds(backend: str, tmp_path: Path, procs: Workers) -> None:
    """Dozens of deletions, one shard: every process section contends on one slot."""
    spec = spec_of(backend, tmp_path)
    if backend == "msgpack":
        MsgpackFileStorage(spec, shards=1).close()
    _run_deletion_race(spec, tmp_path, procs, late_worker=True, times=40, pause=0.02)


# -- 5-7. fork ----------------------------------------------------------------------------
#
# Each scenario runs in a forked child of the test process (run_isolated), so
# that a deadlock inside os.fork() itself fails the test instead of hanging
# the suite; the scenario then forks its own children as the test says.


@needs_fork
@pytest.mark.parametrize("backend", BACKENDS)
def test_preload_then_fork_workers(backend: str, tmp_path: Path) -> None:
    """gunicorn --preload: storage and Sessions made before fork, used by every child."""
    spec = spec_of(backend, tmp_path)

    def scenario() -> None:
        storage = open_store(spec)
        sessions = Sessions(storage, initial=dict)
        increment(sessions, "k")  # the parent used it before forking
        gate_r, gate_w = os.pipe()

        def child() -> int:
            os.close(gate_w)
            os.read(gate_r, 1)  # returns when the parent closes its end: all start together
            increment(sessions, "k", 200)
            return 0

        pids: list[int] = []
        try:
            pids = [fork_child(child) for _ in range(4)]
        finally:
            os.close(gate_r)
            os.close(gate_w)
        try:
            increment(sessions, "k", 100)  # the parent keeps using it meanwhile
        finally:
            codes = wait_children(pids, 15)
        assert list(codes.values()) == [0] * 4, f"exit codes (None: hung, killed): {codes}"
        fresh = read_count(spec, "k")  # through a storage object made after the fork
        inherited = storage.read("k")
        storage.close()
        assert (fresh, inherited) == (901, {"n": 901})

    run_isolated(scenario, 20)


@needs_fork
@pytest.mark.parametrize("backend", BACKENDS)
def test_fork_while_a_parent_thread_holds_a_key(backend: str, tmp_path: Path) -> None:
    spec = spec_of(backend, tmp_path)

    def scenario() -> None:
        storage = open_store(spec)
        sessions = Sessions(storage, initial=dict)
        increment(sessions, "k")
        holder = Holder(sessions, "k")
        report_r, report_w = os.pipe()

        def child() -> int:
            os.close(report_r)
            try:
                with sessions.open("k", timeout=0.3):
                    first = b"g"  # got it while the parent holds it: not exclusive
            except LockTimeout:
                first = b"t"
            os.write(report_w, first)
            try:
                increment(sessions, "k", timeout=5)  # the parent releases now
            except LockTimeout:
                return 3
            return 0

        first = b""
        pid = fork_child(child)
        try:
            os.close(report_w)
            if select.select([report_r], [], [], 10)[0]:
                first = os.read(report_r, 1)
        finally:
            try:
                holder.release()
            finally:
                os.close(report_r)
                codes = wait_children([pid], 15)
        assert first == b"t", "while the parent's thread held 'k' the child " + (
            "got it too" if first == b"g" else "reported nothing"
        )
        assert codes[pid] == 0, (
            f"child exit code {codes[pid]} (3: LockTimeout after the parent released; None: hung, killed)"
        )
        assert storage.read("k") == {"n": 3}
        storage.close()
        assert read_count(spec, "k") == 3

    run_isolated(scenario, 20)


@needs_fork
@pytest.mark.parametrize("backend", BACKENDS)
def test_fork_during_storage_calls_in_another_thread(backend: str, tmp_path: Path) -> None:
    spec = spec_of(backend, tmp_path)

    def scenario() -> None:
        storage = open_store(spec)
        sessions = Sessions(storage, initial=dict)
        stop = threading.Event()
        done = [0]

        def background() -> None:
            # 4 KiB of fresh bytes per write: a msgpack log is compacted every
            # couple of dozen writes, so some forks land in a compaction too.
            while not stop.is_set():
                with sessions.open("k") as s:
                    s["n"] = s.get("n", 0) + 1
                    s["blob"] = os.urandom(4096)
                done[0] += 1

        # The children use another key in the same shard (a msgpack store's
        # shards are chosen by crc32): a shard or shelf mutex copied while
        # held would hang them, while the background thread, which takes
        # "k" again the moment it lets it go, cannot starve them of it.
        other = next(
            c for c in (f"c{i}" for i in range(10_000))
            if zlib.crc32(c.encode()) % 16 == zlib.crc32(b"k") % 16
        )

        def child() -> int:
            try:
                increment(sessions, other)  # no timeout: a hang is killed below
            except LockTimeout:
                return 3
            return 0

        bg = Background(background)
        pids: list[int] = []
        try:
            deadline = time.monotonic() + 10
            while done[0] < 5 and bg.thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.001)
            assert done[0] >= 5, "the background thread made no progress"
            for i in range(50):
                pids.append(fork_child(child))
                time.sleep(0.0005 * (i % 7))
        finally:
            codes = wait_children(pids, 10)
            stop.set()
            bg.join(5)
        bad = {pid: code for pid, code in codes.items() if code != 0}
        others = [c for c in bad.values() if c not in (None, 3)]
        assert not bad, (
            f"{len(bad)} of 50 children failed: {sum(c is None for c in bad.values())} hung (killed), "
            f"{sum(c == 3 for c in bad.values())} LockTimeout, other exit codes {others}"
        )
        storage.close()
        assert (read_count(spec, "k"), read_count(spec, other)) == (done[0], 50)

    run_isolated(scenario, 20)


def test_fork_while_a_thread_logs_under_a_shard_mutex(tmp_path: Path) -> None:
    """``logging``'s own fork hook takes the logging lock, and ours waits for
    the shard mutex that a thread holds while it logs: registered after
    logging's (run before it), ours lets that thread finish; the other way
    round, the fork deadlocks.  Run in a fresh interpreter that imports
    sessionkit before logging, as an application may."""
    script = (
        "import os, sys, threading, time\n"
        "from sessionkit import MsgpackFileStorage\n"
        "import logging\n"
        "storage = MsgpackFileStorage(sys.argv[1], shards=1)\n"
        "storage.write('a', 1)\n"
        "shard = storage._shards[0]\n"
        "logging.getLogger('app').setLevel(logging.INFO)  # clears every logger's level cache\n"
        "def hold_and_log():\n"
        "    with shard.mutex:  # as a storage call does\n"
        "        time.sleep(0.3)\n"
        "        logging.getLogger('sessionkit').debug('under the mutex')  # as a rebuild does\n"
        "threading.Thread(target=hold_and_log, daemon=True).start()\n"
        "time.sleep(0.1)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print('forked')\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "store")],
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the fork deadlocked")
    assert done.returncode == 0 and done.stdout.strip() == "forked", done.stderr


# -- 8. a handle that is never entered ------------------------------------------------------


def _sessions_for(backend: str, tmp_path: Path) -> tuple[Sessions, Any]:
    storage = MemoryStorage() if backend == "memory" else open_store(spec_of(backend, tmp_path))
    return Sessions(storage, initial=dict), storage


@pytest.mark.parametrize("backend", ["memory", *BACKENDS])
def test_unentered_handle_locks_nothing_for_threads(backend: str, tmp_path: Path) -> None:
    sessions, storage = _sessions_for(backend, tmp_path)
    try:
        h = sessions.open("k")  # never entered
        run_threads([lambda: increment(sessions, "k", timeout=0.5)], timeout=10)
        run_threads([lambda: increment(Sessions(storage, initial=dict), "k", timeout=0.5)], timeout=10)
        assert storage.read("k") == {"n": 2}
        del h
    finally:
        storage.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unentered_handle_locks_nothing_for_processes(backend: str, tmp_path: Path, procs: Workers) -> None:
    sessions, storage = _sessions_for(backend, tmp_path)
    try:
        h = sessions.open("k")  # never entered
        assert procs.try_open(spec_of(backend, tmp_path), "k", 0.5) == "locked"
        del h
    finally:
        storage.close()
    assert read_count(spec_of(backend, tmp_path), "k") == 1


@pytest.mark.parametrize("backend", ["memory", *BACKENDS])
def test_unentered_handle_refuses_use(backend: str, tmp_path: Path) -> None:
    sessions, storage = _sessions_for(backend, tmp_path)
    try:
        increment(sessions, "k")
        h = sessions.open("k")  # never entered
        with pytest.raises(SessionError, match=r"\bwith\b"):
            h.data
        with pytest.raises(SessionError, match=r"\bwith\b"):
            h["x"]
        # touching it took no lock either
        run_threads([lambda: increment(sessions, "k", timeout=0.5)], timeout=10)
        assert storage.read("k") == {"n": 2}
    finally:
        storage.close()


# -- the lock file and the directory ------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_store_directory_is_held_against_tmp_cleaners(backend: str, tmp_path: Path) -> None:
    """systemd-tmpfiles skips a directory someone holds a BSD lock on; it tries LOCK_EX|LOCK_NB."""
    fcntl = pytest.importorskip("fcntl")
    spec = spec_of(backend, tmp_path)
    storage = open_store(spec)
    if storage._state.locks.method != "ofd":
        storage.close()
        pytest.skip("the directory is held by the OFD method")
    fd = os.open(store_dir(spec), os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        storage.close()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go with the last handle
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_write_under_a_lock_taken_through_a_deleted_lock_file_is_refused(
    backend: str, tmp_path: Path, procs: Workers
) -> None:
    spec = spec_of(backend, tmp_path)
    storage = open_store(spec)
    if storage._state.locks.method != "ofd":
        storage.close()
        pytest.skip("the lock file's identity is checked by the OFD method")
    sessions = Sessions(storage, initial=dict)
    increment(sessions, "k")
    with pytest.raises(StorageError, match="deleted or replaced"):
        with sessions.open("k") as s:
            s["n"] += 1
            os.unlink(lock_path(spec))  # a process starting now would lock a new file
    assert os.path.exists(lock_path(spec))  # the write's shard lock moved to the new file
    increment(sessions, "k")  # the next session locks through the new file
    other = open_store(spec)
    try:
        assert other.read("k") == {"n": 2}  # the refused increment left no trace
    finally:
        other.close()
        storage.close()
    # a process that opens the store now excludes this one again
    storage = open_store(spec)
    holder = Holder(Sessions(storage, initial=dict), "k")
    try:
        assert procs.try_open(spec, "k", 0.3) == "timeout"
    finally:
        holder.release()
        storage.close()


@needs_fork
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_child_forked_inside_a_with_block_cannot_write_that_session(backend: str, tmp_path: Path) -> None:
    spec = spec_of(backend, tmp_path)

    def scenario() -> None:
        storage = open_store(spec)
        sessions = Sessions(storage, initial=dict)
        increment(sessions, "k")
        with sessions.open("k") as s:
            s["n"] += 10

            def child() -> int:
                try:
                    with sessions.open("other") as t:  # the child's own sessions work
                        t["n"] = 1
                    s["n"] += 100
                    s.__exit__(None, None, None)  # what leaving the with-block does
                except StorageError:
                    return 0  # refused: the parent holds "k"
                return 5

            codes = wait_children([fork_child(child)], 10)
            assert list(codes.values()) == [0], f"the child wrote a session its parent held: {codes}"
        storage.close()
        assert (read_count(spec, "k"), read_count(spec, "other")) == (11, 1)

    run_isolated(scenario, 20)


@needs_fork
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_grandchild_forked_inside_the_inherited_block_cannot_write_it_either(backend: str, tmp_path: Path) -> None:
    spec = spec_of(backend, tmp_path)

    def scenario() -> None:
        storage = open_store(spec)
        sessions = Sessions(storage, initial=dict)
        increment(sessions, "k")
        with sessions.open("k") as s:

            def grandchild() -> int:
                s["n"] += 100
                try:
                    s.__exit__(None, None, None)
                except StorageError:
                    return 0
                return 5

            def child() -> int:
                codes = wait_children([fork_child(grandchild)], 10)
                return 0 if list(codes.values()) == [0] else 6

            codes = wait_children([fork_child(child)], 15)
            assert list(codes.values()) == [0], codes
            s["n"] += 1
        storage.close()
        assert read_count(spec, "k") == 2

    run_isolated(scenario, 30)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_lock_file_replaced_by_one_of_another_method_is_refused(backend: str, tmp_path: Path) -> None:
    spec = spec_of(backend, tmp_path)
    storage = open_store(spec)
    try:
        if storage._state.locks.method != "ofd":
            pytest.skip("the OFD method checks the lock file's identity")
        sessions = Sessions(storage, initial=dict)
        increment(sessions, "k")
        os.unlink(lock_path(spec))
        Path(lock_path(spec)).write_bytes(bytes(16) + b"sessionkit-lock1" + b"f")  # a filelock store's
        with pytest.raises(StorageError, match="another locking method"):
            increment(sessions, "k")
    finally:
        storage.close()


def test_two_shelves_in_one_directory_do_not_count_as_other_users(tmp_path: Path) -> None:
    """Only another process makes a replaced lock file a reason to refuse."""
    first = ShelveStorage(tmp_path / "shelves" / "one", dbm=SHELVE_DBM)
    second = ShelveStorage(tmp_path / "shelves" / "two", dbm=SHELVE_DBM)
    try:
        if first._state.locks.method != "ofd":
            pytest.skip("the OFD method checks the lock file's identity")
        sessions = Sessions(first, initial=dict)
        increment(sessions, "k")
        os.unlink(str(tmp_path / "shelves" / "one") + ".lock")
        increment(sessions, "k")  # this process is the store's only user: it moves on
        assert first.read("k") == {"n": 2} and second.read("k") is None
    finally:
        first.close()
        second.close()
