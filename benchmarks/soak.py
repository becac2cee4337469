"""A bounded soak run: many processes and threads on one store, kill -9, fork, then the invariants.

::

    python -m benchmarks.soak --seconds 30                      # msgpack, shelve and redis
    python -m benchmarks.soak --seconds 300 --backend msgpack --processes 6 --threads 4 --seed 7

For each backend (``msgpack``: ``MsgpackFileStorage``; ``shelve``:
``ShelveStorage`` on a new shelf, so ``dbm.dumb``; ``redis``: ``RedisStorage``
on a ``redis-server`` that the run starts on a free loopback port with
persistence off, and stops), for ``--seconds``:

* ``--processes`` worker processes, each running ``--threads`` threads, share
  one store and do a mixed workload: counter increments, nested in-place
  edits, increments rolled back by an exception, read-only and lazy
  sessions, sessions deleted (by ``s.delete()`` and by ``storage.delete``
  under ``storage.lock``), sessions written with a short TTL and read back
  after it (they must be gone), listings of the keys, ``purge_expired()``
  (the disk backends), and now and then a value of 100-600 KB, which makes
  the msgpack logs merge and the shelf compact;
* every so often a random worker's process group gets ``SIGKILL`` at a random
  moment, and the worker is started again;
* worker 0 keeps forking while its threads run; each child goes on with a
  store built before the fork (gunicorn ``--preload`` style), then exits.

Every worker writes, in a log of its own, a line before each counted
increment and another once its ``with`` block exited cleanly (one
``os.write`` each; a kill can cut only the last one short, at a page
boundary, and the check drops what follows the last newline).  When every
worker has stopped, the run checks:

* **lost**: each counter holds at least its acknowledged increments and at
  most those plus the ones left in flight by killed processes (more would
  be an *extra*: e.g. a rolled-back block that was written after all);
* **corrupt**: every key reads back and decodes, its value is internally
  consistent (nested totals add up, large values match their checksums),
  and ``python -m sessionkit check`` finds no damage;
* **stuck**: every key opens within a few seconds;
* besides: no worker hung or died by itself, no fork child failed, no
  unexpected exception, and no TTL session outlived its TTL.

It prints one summary line per backend, ending ``: OK`` or ``: FAILED``
followed by what failed, and exits 1 if any backend failed.  Without
``redis-server`` on PATH the Redis run is skipped (``redis: skipped (no
redis-server)``), except with ``CI=1`` set, where that is an error.  Random
choices (operations, sizes, kill moments and targets, fork moments) follow
``--seed``; thread scheduling does not.  Each run works in a new folder under
the temporary directory, removed at the end unless the run failed or
``--keep`` is given.
"""

from __future__ import annotations

import argparse
import faulthandler
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("msgpack", "shelve", "redis")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# -- the workload -------------------------------------------------------------------

COUNTERS = 8  # c:0..7, incremented by every thread of every process
NESTED = 4  # n:0..3, a counter kept inside nested dicts, changed in place only
EPHEMERAL = 16  # e:0..15, edited and deleted
LARGE = 4  # big:0..3, values of LARGE_BYTES
LARGE_BYTES = (100_000, 600_000)
TTL = 1.0  # seconds a t:* session lives
TTL_MARGIN = 0.5  # a t:* session is read back TTL + TTL_MARGIN after its write: it must be gone
LOCK_TIMEOUT = 30.0  # the workers' lock_timeout: a wait this long is reported as an error
REDIS_LOCK_EXPIRY = 2.0  # a killed worker's Redis locks free themselves after this
STUCK_TIMEOUT = 5.0  # the final check's wait for each key (plus the lock expiry on Redis)
GRACE = 75.0  # seconds after the end for the workers to stop before they count as hung
FORK_EVERY = (0.4, 1.6)  # seconds between worker 0's forks
FORK_RUNS = (0.2, 0.8)  # seconds a fork child works
FORK_THREADS = 2
CHILD_TIMEOUT = 45.0  # a fork child still running this long after its work should end is hung
PURGE_EVERY = (1.0, 4.0)  # seconds between one process's purge_expired() calls (its thread 0)
LIST_EVERY = (0.5, 2.0)  # seconds between one process's listings (its thread 1)
ERROR_LINES = 100  # a thread that hit this many unexpected errors stops

# (operation, probability); the rest of the unit interval is "increment"
MIX = (
    ("nested", 0.14),
    ("ephemeral", 0.10),
    ("ttl", 0.04),
    ("rollback", 0.03),
    ("read", 0.07),
    ("lazy", 0.03),
    ("large", 0.003),
)
KEY_PATTERN = re.compile(r"(c|n|e|big):\d+|t:[0-9a-z.]+")

# Log lines (one os.write each): "t KEY" before a counted increment, "a KEY"
# once its block exited cleanly, "x KEY" when it certainly wrote nothing;
# "o KIND [N]" a finished operation; "! TEXT" an unexpected error; "V TEXT"
# a broken invariant seen by a worker; "f" a fork, "F CODE" its child's exit.
OPS = {
    "d": "deletes", "e": "edits", "r": "reads", "z": "lazy", "T": "ttl writes", "B": "large", "L": "listings",
    "P": "purges",
}


# -- stores ---------------------------------------------------------------------------


def open_storage(cfg: dict[str, Any], ttl: float | None = None) -> Any:
    """The storage a worker (or the final check) uses, from the run's config."""
    backend = cfg["backend"]
    if backend == "msgpack":
        from sessionkit import MsgpackFileStorage

        return MsgpackFileStorage(cfg["path"], ttl=ttl)
    if backend == "shelve":
        from sessionkit import ShelveStorage

        return ShelveStorage(cfg["path"], ttl=ttl)
    from sessionkit import RedisStorage

    return RedisStorage(url=cfg["url"], prefix=cfg["prefix"], ttl=ttl, lock_expiry=REDIS_LOCK_EXPIRY)


def store_name(cfg: dict[str, Any]) -> str:
    """The store as ``python -m sessionkit`` names it."""
    if cfg["backend"] == "msgpack":
        return f"msgpack:{cfg['path']}"
    if cfg["backend"] == "shelve":
        return f"shelve:{cfg['path']}"
    return f"{cfg['url']}?prefix={cfg['prefix']}"


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:300]


class Log:
    """A worker's log: each line is one ``os.write`` to a file opened for appending."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def __call__(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())


class _Rollback(Exception):
    """Raised inside a block on purpose: nothing of it may be written."""


# -- a worker's threads --------------------------------------------------------------------


class Workload:
    """The operations of one process's threads on a shared storage."""

    def __init__(self, storage: Any, ttl_storage: Any, log: Log, tag: str, stop_at: float) -> None:
        from sessionkit import Sessions

        self.storage = storage
        self.ttl_storage = ttl_storage
        self.sessions = Sessions(storage, initial=dict, lock_timeout=LOCK_TIMEOUT)
        self.ttl_sessions = Sessions(ttl_storage, initial=dict, lock_timeout=LOCK_TIMEOUT)
        self.log = log
        self.tag = tag
        self.worker = "w" + tag.split(".")[0]
        self.stop_at = stop_at
        self.failed = False  # an unexpected error or a broken invariant (fork children exit 1)

    def inherited(self, log: Log, tag: str, stop_at: float) -> Workload:
        """The same storages and ``Sessions`` (built before a fork), for a fork child's threads."""
        child = Workload.__new__(Workload)
        child.__dict__.update(self.__dict__)
        child.log, child.tag, child.stop_at, child.failed = log, tag, stop_at, False
        return child

    def run(self, index: int, rng: random.Random) -> None:
        """One thread's loop until the end of the run."""
        try:
            self._loop(index, rng)
        except BaseException as exc:  # a bug of the soak itself: say so, do not hide it
            self.failed = True
            self.log(f"! thread crashed: {_describe(exc)} {traceback.format_exc()!r}"[:2000])

    def _loop(self, index: int, rng: random.Random) -> None:
        from sessionkit import LockTimeout

        due: deque[tuple[float, str]] = deque()
        seq = 0
        errors = 0
        now = time.time()
        next_purge = now + rng.uniform(*PURGE_EVERY) if index == 0 else float("inf")
        next_list = now + rng.uniform(*LIST_EVERY) if index == 1 else float("inf")
        name = f"{self.tag}.{index}"
        while True:
            now = time.time()
            if now >= self.stop_at:
                return
            seq += 1
            try:
                if due and due[0][0] <= now:
                    self.check_expired(due.popleft()[1], now)
                elif now >= next_purge:
                    next_purge = now + rng.uniform(*PURGE_EVERY)
                    self.purge()
                elif now >= next_list:
                    next_list = now + rng.uniform(*LIST_EVERY)
                    self.listing()
                else:
                    self.one(rng, seq, name, due)
            except LockTimeout as exc:
                errors += 1
                self.failed = True
                self.log(f"! lock wait over {LOCK_TIMEOUT:.0f} s: {_describe(exc)}")
            except Exception as exc:
                errors += 1
                self.failed = True
                self.log(f"! {_describe(exc)}")
            if errors >= ERROR_LINES:
                self.log(f"! thread {name} gave up after {errors} errors")
                return

    def one(self, rng: random.Random, seq: int, name: str, due: deque[tuple[float, str]]) -> None:
        """One operation of the mix."""
        x = rng.random()
        for op, p in MIX:
            if x < p:
                break
            x -= p
        else:
            op = "increment"
        if op == "increment":
            self.increment(f"c:{rng.randrange(COUNTERS)}")
        elif op == "nested":
            self.nested(f"n:{rng.randrange(NESTED)}", seq)
        elif op == "ephemeral":
            self.ephemeral(f"e:{rng.randrange(EPHEMERAL)}", rng, seq)
        elif op == "ttl":
            key = f"t:{name}.{seq}"
            with self.ttl_sessions.open(key) as s:
                s["at"] = time.time()
                s["by"] = name
            due.append((time.time() + TTL + TTL_MARGIN, key))
            self.log("o T")
        elif op == "rollback":
            self.rollback(f"c:{rng.randrange(COUNTERS)}")
        elif op == "read":
            with self.sessions.open(f"c:{rng.randrange(COUNTERS)}") as s:
                int(s.get("n", 0))
            self.log("o r")
        elif op == "lazy":
            with self.sessions.open(f"c:{rng.randrange(COUNTERS)}", lazy=True):
                pass
            self.log("o z")
        else:
            size = rng.randrange(*LARGE_BYTES)
            self.large(f"big:{rng.randrange(LARGE)}", rng.randbytes(size), name)

    def increment(self, key: str) -> None:
        """The core proof: a counter incremented in a locked read-modify-write."""
        from sessionkit import LockTimeout

        self.log(f"t {key}")
        try:
            with self.sessions.open(key) as s:
                s["n"] = s.get("n", 0) + 1
        except LockTimeout:
            self.log(f"x {key}")  # raised on entering: the block never ran
            raise
        self.log(f"a {key}")

    def rollback(self, key: str) -> None:
        """An increment whose block raises: it must never reach the store."""
        self.log(f"t {key}")
        try:
            with self.sessions.open(key) as s:
                s["n"] = s.get("n", 0) + 1
                raise _Rollback
        except _Rollback:
            self.log(f"x {key}")

    def nested(self, key: str, seq: int) -> None:
        """A counter changed only in place, two dicts deep, beside nested lists."""
        from sessionkit import LockTimeout

        self.log(f"t {key}")
        try:
            with self.sessions.open(key) as s:
                stats = s.setdefault("stats", {"hits": 0, "by": {}})
                stats["hits"] += 1
                by = stats["by"]
                by[self.worker] = by.get(self.worker, 0) + 1
                history = s.setdefault("history", [])
                history.append([seq % 1000, self.tag])
                if len(history) > 16:
                    del history[:8]
                deep = s.setdefault("deep", {"a": {"b": []}})["a"]["b"]
                deep.append(len(history))
                if len(deep) > 8:
                    deep.pop(0)
        except LockTimeout:
            self.log(f"x {key}")
            raise
        self.log(f"a {key}")

    def ephemeral(self, key: str, rng: random.Random, seq: int) -> None:
        """Grow a session's list, or delete the session."""
        if rng.random() < 0.1:
            with self.storage.lock(key, timeout=LOCK_TIMEOUT):
                self.storage.delete(key)
            self.log("o d")
            return
        with self.sessions.open(key) as s:
            if not s.is_new and rng.random() < 0.3:
                s.delete()
                kind = "d"
            else:
                items = s.setdefault("xs", [])
                items.append(seq)
                if len(items) > 24:
                    s.data = {"xs": items[-4:]}
                kind = "e"
        self.log(f"o {kind}")

    def large(self, key: str, blob: bytes, name: str) -> None:
        """Replace a large value, checking the one it replaces."""
        with self.sessions.open(key) as s:
            old = None if s.is_new else s.data
            if old is not None:
                problem = large_problem(old)
                if problem:
                    self.failed = True
                    self.log(f"V {key} read {problem}")
            s.data = {"blob": blob, "crc": zlib.crc32(blob), "size": len(blob), "by": name}
        self.log("o B")

    def check_expired(self, key: str, now: float) -> None:
        """A TTL session read back after its TTL: it must be gone."""
        value = self.storage.read(key)
        if value is None:
            self.log("o E")
            return
        self.failed = True
        age = now - value.get("at", now) if isinstance(value, dict) else float("nan")
        self.log(f"V {key} still readable {age:.2f} s after its write (ttl {TTL} s)")

    def listing(self) -> None:
        """List the keys; every one must be a key the workload writes."""
        keys = list(self.storage.keys())
        odd = [k for k in keys if not KEY_PATTERN.fullmatch(k)]
        if odd:
            self.failed = True
            self.log(f"V listing has unknown keys: {odd[:5]!r}")
        self.log(f"o L {len(keys)}")

    def purge(self) -> None:
        """Reclaim expired sessions (the disk backends have ``purge_expired()``)."""
        purge = getattr(self.storage, "purge_expired", None)
        if purge is None:
            return
        self.log(f"o P {purge()}")


def large_problem(value: Any) -> str:
    """What is wrong with a big:* value, or ``""``."""
    if not isinstance(value, dict) or not isinstance(value.get("blob"), bytes):
        return f"not a large value: {type(value).__name__}"
    blob = value["blob"]
    if len(blob) != value.get("size") or zlib.crc32(blob) != value.get("crc"):
        return f"a large value of {len(blob)} bytes that fails its checksum"
    return ""


def run_threads(work: Workload, count: int, seed: str) -> list[threading.Thread]:
    """Start ``count`` threads running ``work``, each with a random generator of its own."""
    threads = [
        threading.Thread(target=work.run, args=(i, random.Random(f"{seed}/{i}")), name=f"soak-{i}", daemon=True)
        for i in range(count)
    ]
    for t in threads:
        t.start()
    return threads


def worker_main(config: str, wid: int, incarnation: int) -> int:
    """A worker process: threads on the shared store until the end of the run (worker 0 also forks)."""
    cfg = json.loads(Path(config).read_text())
    faulthandler.enable()  # SIGABRT from the orchestrator (a hang) dumps every thread's stack
    tag = f"{wid}.{incarnation}"
    log = Log(os.path.join(cfg["logs"], f"w{tag}.log"))
    storage = open_storage(cfg)
    ttl_storage = open_storage(cfg, ttl=TTL)
    log("ready")
    seed = f"{cfg['seed']}/{cfg['backend']}/{tag}"
    work = Workload(storage, ttl_storage, log, tag, cfg["stop_at"])
    threads = run_threads(work, cfg["threads"], seed)
    if wid == 0:
        fork_loop(cfg, work, random.Random(seed + "/fork"))
    for t in threads:
        t.join()
    ttl_storage.close()
    storage.close()
    log("done")
    return 0


def fork_loop(cfg: dict[str, Any], work: Workload, rng: random.Random) -> None:
    """Fork while this process's threads run; each child works on the inherited store, then exits."""
    log, tag = work.log, work.tag
    number = 0
    while True:
        pause = rng.uniform(*FORK_EVERY)
        if time.time() + pause >= cfg["stop_at"]:
            return
        time.sleep(pause)
        number += 1
        runs = rng.uniform(*FORK_RUNS)
        close = rng.random() < 0.5
        child_tag = f"{tag}.f{number}"
        log("f")
        with warnings.catch_warnings():
            # Python 3.12+ warns about forking a process with threads: that is the point here.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                code = fork_child(cfg, work, child_tag, runs, close)
            except BaseException:
                try:
                    os.write(2, traceback.format_exc().encode())
                except BaseException:
                    pass
            finally:
                os._exit(code)
        log(f"F {wait_child(pid, runs + CHILD_TIMEOUT)}")


def fork_child(cfg: dict[str, Any], parent: Workload, tag: str, runs: float, close: bool) -> int:
    """In a fork child: a few threads on the storages and ``Sessions`` built before the fork,
    for ``runs`` seconds."""
    log = Log(os.path.join(cfg["logs"], f"w{tag}.log"))
    log("ready")
    work = parent.inherited(log, tag, min(cfg["stop_at"], time.time() + runs))
    for t in run_threads(work, FORK_THREADS, f"{cfg['seed']}/{cfg['backend']}/{tag}"):
        t.join()
    if close:  # half the children close their inherited handles, half just exit
        work.ttl_storage.close()
        work.storage.close()
    log("done")
    return 1 if work.failed else 0


def wait_child(pid: int, timeout: float) -> str:
    """Reap a fork child: its exit code, or ``hung`` (its stacks dumped, then killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return str(os.waitstatus_to_exitcode(status))
        time.sleep(0.01)
    os.kill(pid, signal.SIGABRT)  # faulthandler (inherited) prints its stacks
    time.sleep(1.0)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
    return "hung"


# -- reading the logs -------------------------------------------------------------------


@dataclass
class Tally:
    """Everything the workers' logs say."""

    started: Counter[str] = field(default_factory=Counter)  # "t KEY"
    acked: Counter[str] = field(default_factory=Counter)  # "a KEY"
    undone: Counter[str] = field(default_factory=Counter)  # "x KEY"
    ops: Counter[str] = field(default_factory=Counter)  # "o KIND"
    purged: int = 0
    expired: int = 0
    forks: int = 0  # fork children that exited 0
    fork_failures: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def read(self, path: Path) -> None:
        """Add one log (a line cut short by a kill is skipped)."""
        with open(path, "rb") as f:
            data = f.read()
        for raw in data.split(b"\n")[:-1]:  # the part after the last newline was cut short
            line = raw.decode(errors="replace")
            kind, _, rest = line.partition(" ")
            if kind == "t":
                self.started[rest] += 1
            elif kind == "a":
                self.acked[rest] += 1
            elif kind == "x":
                self.undone[rest] += 1
            elif kind == "o":
                op, _, n = rest.partition(" ")
                if op == "E":
                    self.expired += 1
                    continue
                self.ops[op] += 1
                if op == "P":
                    self.purged += int(n)
            elif kind == "!":
                self.errors[rest] += 1
            elif kind == "V":
                self.violations.append(f"{path.name}: {rest}")
            elif kind == "F":
                if rest == "0":
                    self.forks += 1
                else:
                    self.fork_failures.append(f"{path.name}: a fork child exited with {rest}")

    @property
    def increments(self) -> int:
        return sum(n for key, n in self.acked.items() if key.startswith("c:"))

    @property
    def nested(self) -> int:
        return sum(n for key, n in self.acked.items() if key.startswith("n:"))

    @property
    def rolled_back(self) -> int:
        return sum(self.undone.values())

    @property
    def total(self) -> int:
        return sum(self.acked.values()) + self.rolled_back + sum(self.ops.values()) + self.expired


def check_counts(final: dict[str, int], tally: Tally) -> tuple[int, int, list[str]]:
    """``(lost, extra, problems)``: each counted key's final value against its log.

    A key must hold at least its acknowledged increments (fewer: *lost*)
    and at most those plus the ones started but neither acknowledged nor
    known unwritten, the in-flight ones of killed processes (more: *extra*).
    """
    lost = extra = 0
    problems = []
    for key in sorted(set(tally.started) | set(final)):
        acked = tally.acked[key]
        open_ = tally.started[key] - acked - tally.undone[key]
        value = final.get(key, 0)
        if open_ < 0:
            problems.append(f"{key}: the logs end more increments than they start")
        if value < acked:
            lost += acked - value
            problems.append(f"{key}: holds {value}, but {acked} increments were acknowledged: {acked - value} lost")
        elif value > acked + open_:
            extra += value - acked - open_
            problems.append(
                f"{key}: holds {value}, more than {acked} acknowledged + {open_} in flight when killed"
            )
    return lost, extra, problems


# -- the final check of a store ------------------------------------------------------------


def value_problem(key: str, value: Any) -> str:
    """What is wrong with a stored value, or ``""``."""
    try:
        return _value_problem(key, value)
    except Exception as exc:  # a value of the wrong shape somewhere inside
        return f"is malformed ({_describe(exc)})"


def _value_problem(key: str, value: Any) -> str:
    kind = key.split(":", 1)[0]
    if not isinstance(value, dict):
        return f"is a {type(value).__name__}, not a dict"
    if kind == "c":  # {} when a read-only block was the first to open it (initial() is written)
        n = value.get("n", 0)
        return "" if isinstance(n, int) and n >= 0 else f"has no count: {value!r}"[:200]
    if kind == "n":
        stats = value.get("stats")
        if not isinstance(stats, dict) or not isinstance(stats.get("by"), dict):
            return "has no stats"
        if sum(stats["by"].values()) != stats.get("hits"):
            return f"has hits {stats.get('hits')} but its per-worker counts add up to {sum(stats['by'].values())}"
        if not isinstance(value.get("history"), list) or not isinstance(value.get("deep", {}).get("a"), dict):
            return "lost its nested lists"
        return ""
    if kind == "e":
        items = value.get("xs")
        ok = isinstance(items, list) and all(isinstance(i, int) for i in items)
        return "" if ok else f"has no list of ints: {value!r}"[:200]
    if kind == "big":
        return large_problem(value)
    if kind == "t":
        return "" if isinstance(value.get("at"), float) else "has no time"
    return "is not a key of the workload"


def counted(key: str, value: Any) -> int:
    """A counted key's number (0 when absent or malformed)."""
    if not isinstance(value, dict):
        return 0
    if key.startswith("c:"):
        n = value.get("n", 0)
    else:
        stats = value.get("stats", {})
        n = stats.get("hits", 0) if isinstance(stats, dict) else 0
    return n if isinstance(n, int) else 0


@dataclass
class Verdict:
    """What the final check found."""

    final: dict[str, int] = field(default_factory=dict)
    corrupt: int = 0
    stuck: int = 0
    problems: list[str] = field(default_factory=list)
    torn_tails: int = 0
    purged: int = 0


def final_check(cfg: dict[str, Any], env: dict[str, str], gone_at: float) -> Verdict:
    """Open every key, read and validate it, run ``sessionkit check``, and see the TTL sessions gone."""
    from sessionkit import CorruptSessionError, LockTimeout, Sessions

    verdict = Verdict()
    storage = open_storage(cfg)
    try:
        sessions = Sessions(storage)
        fixed = [f"c:{i}" for i in range(COUNTERS)] + [f"n:{i}" for i in range(NESTED)]
        fixed += [f"e:{i}" for i in range(EPHEMERAL)] + [f"big:{i}" for i in range(LARGE)]
        try:
            listed = list(storage.keys())
        except CorruptSessionError as exc:
            verdict.corrupt += 1
            verdict.problems.append(f"listing the keys: {_describe(exc)}")
            listed = []
        wait = STUCK_TIMEOUT + (REDIS_LOCK_EXPIRY if cfg["backend"] == "redis" else 0.0)
        for key in dict.fromkeys(fixed + sorted(listed)):
            try:
                with sessions.open(key, timeout=wait) as s:
                    value = s.data
            except LockTimeout:
                verdict.stuck += 1
                verdict.problems.append(f"{key}: still locked after {wait:.0f} s with every worker gone")
                wait = 0.5  # one stuck key is enough to fail; do not wait as long for each
                continue
            except CorruptSessionError as exc:
                verdict.corrupt += 1
                verdict.problems.append(f"{key}: {_describe(exc)}")
                continue
            if key.startswith(("c:", "n:")):
                verdict.final[key] = counted(key, value)
            problem = "" if value is None else value_problem(key, value)
            if not KEY_PATTERN.fullmatch(key):
                problem = "is listed, but the workload never writes such a key"
            if problem:
                verdict.corrupt += 1
                verdict.problems.append(f"{key} {problem}")
        cli_check(cfg, env, verdict)
        # Every t:* session was written before the last worker was gone: once its TTL passed
        # from then, none may be listed.
        time.sleep(max(0.0, gone_at + TTL + TTL_MARGIN - time.time()))
        left = [k for k in storage.keys() if k.startswith("t:")]
        if left:
            verdict.problems.append(f"{len(left)} TTL sessions still listed after their TTL, e.g. {left[0]!r}")
        purge = getattr(storage, "purge_expired", None)
        if purge is not None:
            verdict.purged = purge()
    finally:
        storage.close()
    return verdict


def cli_check(cfg: dict[str, Any], env: dict[str, str], verdict: Verdict) -> None:
    """``python -m sessionkit check`` on the store; a msgpack log's tail cut short by a kill is
    dropped (by ``purge-expired``, which opens every shard) and the store checked again."""
    name = store_name(cfg)
    load = ["--load"] if cfg["backend"] == "shelve" else []

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sessionkit", *args], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=600)

    done = run("check", name, *load)
    damaged = [line for line in done.stdout.splitlines() if line.startswith("DAMAGED")]
    tails = [line for line in damaged if "may be a write cut short by a crash" in line]
    if done.returncode and cfg["backend"] == "msgpack" and damaged and len(tails) == len(damaged):
        verdict.torn_tails = len(tails)
        run("purge-expired", name)
        done = run("check", name)
        damaged = [line for line in done.stdout.splitlines() if line.startswith("DAMAGED")]
    if done.returncode:
        verdict.corrupt += max(1, len(damaged))
        shown = (done.stdout + done.stderr).strip().splitlines()
        verdict.problems.append(f"sessionkit check {name} exited {done.returncode}: " + " | ".join(shown[-5:]))


# -- running one backend -------------------------------------------------------------------


@dataclass
class Worker:
    """One worker slot: its current process and how many times it was started."""

    wid: int
    proc: subprocess.Popen[bytes] | None = None
    incarnation: int = 0


class Soak:
    """One backend's run: the workers, the kills, the watch on the store's files, the check."""

    def __init__(self, backend: str, args: argparse.Namespace, root: Path, server: Any = None) -> None:
        self.backend = backend
        self.args = args
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir()
        self.cfg: dict[str, Any] = {
            "backend": backend, "seed": args.seed, "threads": args.threads, "logs": str(self.logs), "stop_at": 0.0,
        }
        if backend == "msgpack":
            self.cfg["path"] = str(root / "store")
        elif backend == "shelve":
            self.cfg["path"] = str(root / "shelf" / "sessions")
        else:
            self.cfg["url"] = server.url
            self.cfg["prefix"] = "soak:"
        self.config = root / "config.json"
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.workers = [Worker(i) for i in range(args.processes)]
        self.groups: set[int] = set()
        self.kills = 0
        self.failures: list[str] = []
        self.stderr = open(root / "workers.err", "ab")

    # -- workers ------------------------------------------------------------------

    def start(self, worker: Worker) -> None:
        worker.incarnation += 1
        worker.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.soak", "--worker", str(self.config), str(worker.wid),
             str(worker.incarnation)],
            cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr,
            start_new_session=True,  # its own process group: a kill takes its fork child too
        )
        self.groups.add(worker.proc.pid)

    def kill(self, worker: Worker) -> None:
        assert worker.proc is not None
        if worker.proc.poll() is None:
            try:
                os.killpg(worker.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        worker.proc.wait()

    def check_exits(self) -> None:
        """A worker that ended by itself before the end failed: note it and start it again."""
        for worker in self.workers:
            assert worker.proc is not None
            code = worker.proc.poll()
            if code is not None:
                self.failures.append(f"worker {worker.wid}.{worker.incarnation} exited by itself with {code}")
                self.start(worker)

    def members(self) -> list[int]:
        """Live (not zombie) processes left in the workers' process groups."""
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) in self.groups and fields[0] != b"Z":
                found.append(int(name))
        return found

    def wait_all(self) -> None:
        """Let the workers finish after the end; a worker still running after GRACE is hung."""
        for worker in self.workers:
            assert worker.proc is not None
            try:
                code = worker.proc.wait(max(0.1, self.cfg["stop_at"] + GRACE - time.time()))
            except subprocess.TimeoutExpired:
                self.failures.append(f"worker {worker.wid}.{worker.incarnation} hung after the end (its stacks "
                                     f"are in {self.root / 'workers.err'})")
                try:
                    os.killpg(worker.proc.pid, signal.SIGABRT)  # faulthandler prints its stacks
                except ProcessLookupError:
                    pass
                time.sleep(1.0)
                self.kill(worker)
                continue
            if code != 0:
                self.failures.append(f"worker {worker.wid}.{worker.incarnation} ended with {code}")
        deadline = time.monotonic() + 10
        while True:
            left = self.members()
            if not left:
                break
            if time.monotonic() > deadline:
                self.failures.append(f"processes {left} outlived their workers")
                for pgid in self.groups:
                    try:
                        os.killpg(pgid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                deadline = time.monotonic() + 10
            time.sleep(0.05)

    # -- the run --------------------------------------------------------------------

    def run(self) -> tuple[str, bool]:
        """Run the soak and the check; the summary line and whether it passed."""
        began = time.time()
        rng = random.Random(f"{self.args.seed}/{self.backend}/kills")
        self.cfg["stop_at"] = began + self.args.seconds
        self.config.write_text(json.dumps(self.cfg))
        watch = FileWatch(self.backend, self.cfg.get("path", ""))
        watch.start()
        try:
            for worker in self.workers:
                self.start(worker)
            stop_at = self.cfg["stop_at"]
            mean = self.args.kill_every
            next_kill = time.time() + rng.uniform(0.3 * mean, 1.7 * mean)
            while True:
                now = time.time()
                if now >= stop_at - 0.3 or next_kill >= stop_at - 0.3:
                    break
                if now >= next_kill:
                    worker = self.workers[rng.randrange(len(self.workers))]
                    self.check_exits()
                    self.kill(worker)
                    self.kills += 1
                    self.start(worker)
                    next_kill = now + rng.uniform(0.3 * mean, 1.7 * mean)
                time.sleep(min(0.02, max(0.0, next_kill - now)))
            self.wait_all()
        finally:
            for worker in self.workers:
                if worker.proc is not None and worker.proc.poll() is None:
                    self.kill(worker)
            watch.stop()
            self.stderr.close()
        gone_at = time.time()
        elapsed = gone_at - began
        tally = Tally()
        for path in sorted(self.logs.glob("*.log")):
            tally.read(path)
        verdict = final_check(self.cfg, self.env, gone_at)
        lost, extra, count_problems = check_counts(verdict.final, tally)
        errors = sum(tally.errors.values())
        problems = list(self.failures) + count_problems + verdict.problems + tally.violations + tally.fork_failures
        problems += [f"{n} x {text}" for text, n in tally.errors.most_common(5)]
        if tally.increments == 0:
            problems.append("no increment was acknowledged")
        ok = not problems
        a = self.args
        # Redis has no purge_expired() (it expires keys itself) and no files to watch.
        disk = {"msgpack": f" purged, {watch.replaced} merges", "shelve": f" purged, {watch.replaced} compactions"}
        kinds = ("e", "d", "r", "z", "T", "B", "L") + (("P",) if self.backend in disk else ())
        ops = ", ".join(f"{tally.ops[k]} {OPS[k]}" for k in kinds)
        purged = f", {tally.purged + verdict.purged}{disk[self.backend]}" if self.backend in disk else ""
        line = (
            f"soak {self.backend}: {elapsed:.1f} s, {a.processes} proc x {a.threads} threads, seed {a.seed}, "
            f"{tally.total} ops ({tally.increments} increments, {tally.nested} nested, "
            f"{tally.rolled_back} rolled back, {ops}), {self.kills} kill -9, {tally.forks} forks, "
            f"{tally.expired} expired{purged}, lost {lost}, extra {extra}, corrupt {verdict.corrupt}, "
            f"stuck {verdict.stuck}, errors {errors}: "
            + ("OK" if ok else "FAILED")
        )
        if verdict.torn_tails:
            problems.append(f"(note: {verdict.torn_tails} log tails cut short by a kill, dropped before the check)")
        detail = [f"  {p}" for p in problems[:40]]
        if len(problems) > 40:
            detail.append(f"  ... and {len(problems) - 40} more")
        if not ok:
            detail += [f"  workers' stderr: {text}" for text in tail(self.root / "workers.err", 15)]
            detail.append(f"  logs and store kept in {self.root}; command: {reproduce(self.backend, a)}")
        return "\n".join([line, *detail]), ok


class FileWatch:
    """Counts replacements of the store's log files (a msgpack merge, a shelf's compaction)
    by watching their inode numbers."""

    def __init__(self, backend: str, path: str) -> None:
        self.backend = backend
        self.path = path
        self.replaced = 0
        self.seen: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-file-watch", daemon=True)

    def paths(self) -> list[str]:
        if self.backend == "msgpack":
            return glob.glob(os.path.join(self.path, "shard-*.log"))
        if self.backend == "shelve":
            return [self.path + ".dat"]
        return []

    def start(self) -> None:
        if self.backend != "redis":
            self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for path in self.paths():
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                ident = (st.st_dev, st.st_ino)
                if self.seen.setdefault(path, ident) != ident:
                    self.replaced += 1
                    self.seen[path] = ident


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a file (none if it is missing)."""
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def reproduce(backend: str, args: argparse.Namespace) -> str:
    return (f"python -m benchmarks.soak --seconds {args.seconds:g} --backend {backend} --processes "
            f"{args.processes} --threads {args.threads} --seed {args.seed} --kill-every {args.kill_every:g}")


def soak_backend(backend: str, args: argparse.Namespace, redis_binary: str | None) -> tuple[str, bool]:
    """One backend's run in a folder of its own; the summary (and details) and whether it passed."""
    root = Path(tempfile.mkdtemp(prefix=f"sessionkit-soak-{backend}-"))
    server = None
    ok = False
    try:
        if backend == "redis":
            from tests.redis_servers import RedisServer  # the tests' own server runner

            server = RedisServer(root / "redis", binary=redis_binary)
        progress(f"soak {backend}: {args.seconds:g} s in {root}")
        text, ok = Soak(backend, args, root, server).run()
        return text, ok
    finally:
        if server is not None:
            server.stop()
        if ok and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif args.keep:
            progress(f"soak {backend}: kept {root}")


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the command line -------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description="A bounded soak run of sessionkit's backends: worker processes with threads on one "
                    "store, kill -9 and restarts, a worker that forks, then the invariants (no lost "
                    "acknowledged increment, no corrupt entry, no stuck lock).  One summary line per "
                    "backend; exit 1 if any invariant failed.",
        epilog="Without redis-server on PATH the redis run is skipped, unless CI=1 is set (then it is an "
               "error).  Example: python -m benchmarks.soak --seconds 300 --backend msgpack --seed 7",
    )
    p.add_argument("--seconds", type=float, default=30.0, help="how long each backend runs (default 30)")
    p.add_argument("--backend", action="append", choices=BACKENDS,
                   help="a backend to soak; repeat for several (default: all three)")
    p.add_argument("--processes", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--threads", type=int, default=4, help="threads per worker process (default 4)")
    p.add_argument("--seed", type=int, default=1, help="seed of every random choice (default 1)")
    p.add_argument("--kill-every", type=float, default=0.7, metavar="SECONDS",
                   help="mean seconds between two kill -9 of a random worker (default 0.7)")
    p.add_argument("--redis-server", metavar="BINARY", help="the redis-server binary (default: the one on PATH)")
    p.add_argument("--keep", action="store_true", help="keep each run's folder (logs and store) even when it passed")
    p.add_argument("--worker", nargs=3, metavar=("CONFIG", "WID", "INCARNATION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        if args.seconds <= 0 or args.processes < 1 or args.threads < 2 or args.kill_every <= 0:
            p.error("--seconds and --kill-every must be positive, --processes at least 1, --threads at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.worker is not None:
        config, wid, incarnation = args.worker
        return worker_main(config, int(wid), int(incarnation))
    if not sys.platform.startswith("linux"):
        print("the soak runs on Linux only (it reads /proc and uses process groups)", file=sys.stderr)
        return 2
    backends = list(dict.fromkeys(args.backend or BACKENDS))
    # A plain kill (SIGTERM) unwinds like ^C, so the workers' process groups are killed too.
    signal.signal(signal.SIGTERM, _interrupted)
    failed = False
    for backend in backends:
        binary = None
        if backend == "redis":
            binary = args.redis_server or shutil.which("redis-server")
            why = "no redis-server" if binary is None else _no_redis_py()
            if why:
                if IN_CI:
                    print(f"redis: FAILED ({why}, and CI is set: the Redis soak must run)", flush=True)
                    failed = True
                else:
                    print(f"redis: skipped ({why})", flush=True)
                continue
        text, ok = soak_backend(backend, args, binary)
        print(text, flush=True)
        failed = failed or not ok
    return 1 if failed else 0


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _no_redis_py() -> str:
    try:
        import redis  # noqa: F401
    except ImportError:
        return "no redis package: pip install -e '.[redis]'"
    return ""


if __name__ == "__main__":
    sys.exit(main())
