"""Helpers and spawned-process workers for tests/test_deployments.py.

Spawned children import this module by name, so everything they run lives
here.  A store is named by a *spec* string, as in tests/workers.py:
``<directory>`` for a MsgpackFileStorage, ``shelve:<path>:<dbm>`` for a
ShelveStorage.  Workers report through a small JSON file (written whole,
then renamed into place), so a crashed worker shows as a non-zero exit code
and never as a hang.
"""

from __future__ import annotations

import faulthandler
import json
import os
import select
import signal
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from sessionkit import LockTimeout, Sessions, SessionError

from .workers import open_store

__all__ = [
    "BACKENDS",
    "store_spec",
    "store_dir",
    "lock_path",
    "symlinked",
    "open_store",
    "read_count",
    "increment",
    "run_threads",
    "try_open",
    "count_loop",
    "increment_until",
    "write_result",
    "read_result",
    "Background",
    "fork_child",
    "wait_children",
    "run_isolated",
]

BACKENDS = ("msgpack", "shelve")


# -- naming a store ------------------------------------------------------------


def store_spec(backend: str, root: Path, dbm: str | None = None) -> str:
    """The spec of a fresh store of ``backend`` under ``root``."""
    if backend == "msgpack":
        return str(root / "store")
    if backend == "shelve":
        return f"shelve:{root / 'shelf' / 'sessions'}:{dbm or ''}"
    raise AssertionError(f"unknown backend {backend}")


def _split(spec: str) -> tuple[str, str | None]:
    """(path, dbm) of a shelve spec, or (directory, None) of a msgpack one."""
    if spec.startswith("shelve:"):
        _, path, dbm = (spec.split(":", 2) + [""])[:3]
        return path, dbm
    return spec, None


def store_dir(spec: str) -> str:
    """The directory holding every file of the store (what a backup copies)."""
    path, dbm = _split(spec)
    return path if dbm is None else os.path.dirname(path)


def lock_path(spec: str) -> str:
    """The store's lock file: ``<dir>/sessionkit.lock`` or ``<path>.lock``."""
    path, dbm = _split(spec)
    return os.path.join(path, "sessionkit.lock") if dbm is None else path + ".lock"


def symlinked(spec: str, link: Path) -> str:
    """Make ``link`` a symlink to the store's directory; the spec through it."""
    os.symlink(store_dir(spec), link)
    path, dbm = _split(spec)
    if dbm is None:
        return str(link)
    return f"shelve:{link / os.path.basename(path)}:{dbm}"


# -- in-process helpers -----------------------------------------------------------


def read_count(spec: str, key: str) -> int:
    """``key``'s counter, read through a fresh storage object (0 if absent)."""
    storage = open_store(spec)
    try:
        value = storage.read(key)
    finally:
        storage.close()
    return 0 if value is None else int(value["n"])


def increment(sessions: Sessions, key: str, times: int = 1, timeout: float | None = None) -> None:
    """Increment ``key``'s counter ``times`` times, each in its own session."""
    for _ in range(times):
        with sessions.open(key, timeout=timeout) as s:
            s["n"] = s.get("n", 0) + 1


def run_threads(targets: Sequence[Callable[[], Any]], timeout: float = 60.0) -> None:
    """Run each target in its own thread; re-raise the first error, fail on a hang."""
    errors: list[BaseException] = []

    def wrap(target: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # reported to the test below
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = sum(t.is_alive() for t in threads)
    assert not hung, f"{hung} of {len(threads)} threads still running after {timeout} s"
    if errors:
        raise errors[0]


class Background:
    """A function running in a daemon thread; ``join()`` re-raises its error."""

    def __init__(self, target: Callable[[], Any]) -> None:
        self.error: BaseException | None = None
        self._target = target
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._target()
        except BaseException as exc:  # re-raised by join()
            self.error = exc

    def join(self, timeout: float = 30.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"background thread still running after {timeout} s"
        if self.error is not None:
            raise self.error


def write_result(path: str, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def read_result(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# -- spawned workers ------------------------------------------------------------------


def try_open(spec: str, key: str, timeout: float, result: str) -> None:
    """Try to open ``key`` with ``lock_timeout=timeout`` in a fresh process.

    Writes ``"locked"`` (it got the key, and incremented it), ``"timeout"``
    (``LockTimeout``) or ``"error: ..."`` to ``result``.
    """
    storage = open_store(spec)
    try:
        sessions = Sessions(storage, initial=dict, lock_timeout=timeout)
        try:
            with sessions.open(key) as s:
                s["n"] = s.get("n", 0) + 1
            outcome = "locked"
        except LockTimeout:
            outcome = "timeout"
        except BaseException as exc:
            outcome = "error: " + _describe(exc)
    finally:
        storage.close()
    write_result(result, outcome)


def count_loop(
    spec: str,
    thread_keys: list[list[str]],
    times: int,
    lock_timeout: float | None,
    start: Any,
    result: str,
) -> None:
    """One thread per entry of ``thread_keys``; each does ``times`` increments,
    round-robin over its keys, every one in its own session.

    Reports ``{"done": n, "errors": {description: count}}``: ``done``
    counts the with-blocks that completed, ``errors`` every exception.
    """
    storage = open_store(spec)
    sessions = Sessions(storage, initial=dict, lock_timeout=lock_timeout)
    done = [0] * len(thread_keys)
    errors: dict[str, int] = {}
    mutex = threading.Lock()

    def work(index: int, keys: list[str]) -> None:
        start.wait(60)
        for i in range(times):
            key = keys[(index + i) % len(keys)]
            try:
                with sessions.open(key) as s:
                    s["n"] = s.get("n", 0) + 1
                done[index] += 1
            except Exception as exc:
                with mutex:
                    errors[_describe(exc)] = errors.get(_describe(exc), 0) + 1

    threads = [threading.Thread(target=work, args=(i, keys)) for i, keys in enumerate(thread_keys)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    storage.close()
    write_result(result, {"done": sum(done), "errors": errors})


def increment_until(spec: str, key: str, ready: Any, start: Any, after: Any, stop: Any, result: str) -> None:
    """Increment ``key`` in a loop until ``stop`` is set, counting acknowledged
    increments: with-blocks that exited without an exception.

    A ``SessionError`` (``StorageError``, ``LockTimeout``,
    ``CorruptSessionError``...) counts as not acknowledged and the loop goes
    on; any other exception is recorded as unexpected.  ``after_acked``
    counts the acknowledged increments made once ``after`` was set.
    """
    acked = after_acked = 0
    refused: dict[str, int] = {}
    unexpected: list[str] = []
    while True:
        # A process that starts while the lock file is missing and others
        # have the store open is refused by design: it tries again.
        try:
            storage = open_store(spec)
            break
        except SessionError as exc:
            refused[_describe(exc)] = refused.get(_describe(exc), 0) + 1
        ready.set()
        if stop.is_set():
            write_result(result, {"acked": 0, "after": 0, "refused": refused, "unexpected": unexpected})
            return
        time.sleep(0.01)
    sessions = Sessions(storage, initial=dict, lock_timeout=10)
    ready.set()
    start.wait(60)
    while not stop.is_set():
        late = after.is_set()
        try:
            with sessions.open(key) as s:
                s["n"] = s.get("n", 0) + 1
        except SessionError as exc:
            refused[_describe(exc)] = refused.get(_describe(exc), 0) + 1
            continue
        except Exception:
            unexpected.append(traceback.format_exc())
            if len(unexpected) > 20:
                break
            continue
        acked += 1
        if late:
            after_acked += 1
    try:
        storage.close()
    except Exception:
        unexpected.append(traceback.format_exc())
    write_result(result, {"acked": acked, "after": after_acked, "refused": refused, "unexpected": unexpected})


# -- forked children --------------------------------------------------------------------


def fork_child(body: Callable[[], int]) -> int:
    """Fork; the child runs ``body`` and ``os._exit``\\ s with its return value
    (1 and a traceback on stderr if it raises).  Returns the child's pid."""
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking a process that has threads; these
        # tests fork such processes on purpose.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = body()
        except BaseException:
            try:
                os.write(2, traceback.format_exc().encode())
            except BaseException:
                pass
        finally:
            os._exit(code)
    return pid


def wait_children(pids: Iterable[int], timeout: float) -> dict[int, int | None]:
    """Reap ``pids`` by a common deadline; pid -> exit code, ``None`` for a
    child that had not exited by then (it is killed)."""
    waiting = set(pids)
    codes: dict[int, int | None] = {}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for pid in list(waiting):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
                waiting.discard(pid)
        if waiting:
            time.sleep(0.01)
    for pid in waiting:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        codes[pid] = None
    return codes


def run_isolated(scenario: Callable[[], None], timeout: float) -> None:
    """Run ``scenario`` in a forked child, in a process group of its own, and
    re-raise its failure here.

    A fork test can deadlock the very process that calls ``os.fork()`` (in
    a fork hook, say), which no join timeout could undo; run there, it
    hangs the scenario's process instead of the suite.  After ``timeout``
    seconds the scenario dumps every thread's stack to stderr (pytest shows
    it with the failure) and its whole group (any forked children too) is
    killed.
    """
    r, w = os.pipe()
    pid = fork_child(lambda: _scenario_child(scenario, r, w, timeout))
    os.close(w)
    out = b""
    started = time.monotonic()
    deadline = started + timeout + 2
    try:
        while time.monotonic() < deadline:
            if select.select([r], [], [], 0.05)[0]:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                out += chunk
    finally:
        os.close(r)
    code = wait_children([pid], max(0.0, deadline - time.monotonic())).get(pid)
    try:
        os.killpg(pid, signal.SIGKILL)  # children it left behind
    except (ProcessLookupError, PermissionError):
        pass
    if code is None or (code != 0 and not out and time.monotonic() - started >= timeout):
        raise AssertionError(f"the scenario hung for {timeout} s and was killed (its stacks are on stderr)")
    if code != 0:
        raise AssertionError(out.decode(errors="replace") or f"the scenario exited with {code}")


def _scenario_child(scenario: Callable[[], None], r: int, w: int, timeout: float) -> int:
    os.close(r)
    os.setpgid(0, 0)
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        scenario()
    except BaseException:
        os.write(w, traceback.format_exc().encode())
        return 1
    return 0
