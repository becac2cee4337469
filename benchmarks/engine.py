"""sessionkit's disk engine, ``MsgpackFileStorage``, beside LMDB, SQLite and diskcache.

    python -m benchmarks.engine [--quick] [--out DIR | --save] [--cache-dir DIR]
                                [--scenarios 1t1k,4p1k,4p4k,random,latency,stall,open1m,handler,durable]
                                [--repeat R] [--seconds S]

Every subject does the same job, a read-modify-write of one session: read
the msgpack-encoded dict stored under key K (``{"count": n}``, plus a
payload in some scenarios), change it, and store it back, atomically, the
way a careful user of that library would.  The subjects run side by side in
one run, in worker processes the run starts once (spawned, so each opens its
own store objects after it starts); within each repetition every subject
takes its turn (the order rotating) before the next repetition starts, so a
slow spell of this shared machine falls on all of them alike.  A ratio
divides sessionkit's figure in repetition *i* by the peer's in the same
repetition; the tables give the median of those paired ratios, and the
median ops/s.

It prints a markdown report and writes ``engine.md`` and ``engine.json`` to a
new scratch folder under the temporary directory (it says which), to
``--out DIR``, or with ``--save`` to ``benchmarks/results/engine/``.

Subjects
    ``sessionkit``: ``Sessions(MsgpackFileStorage(dir, durable=False),
    initial=dict)``; ``with sessions.open(k) as s:`` changes the session
    (``s["count"] = s.get("count", 0) + 1``).  It survives a killed process
    but not a power loss.
    ``lmdb``: ``lmdb.open(dir, map_size=16 GiB, sync=False, writemap=False,
    max_dbs=0, lock=True)``; ``with env.begin(write=True) as txn:`` get,
    change, put.  ``sync=False`` (no ``fsync`` at commit) is LMDB's fast
    mode: with ``writemap`` off, a killed process loses nothing, a power loss
    may lose the last transactions.  LMDB has one writer at a time per
    environment, across threads and processes.
    ``sqlite-wal``: the standard library's ``sqlite3``, one connection per
    thread (``isolation_level=None``, busy timeout 60 s), ``PRAGMA
    journal_mode=WAL``, ``PRAGMA synchronous=NORMAL`` (in WAL mode: safe
    from a killed process, may lose the last transactions on power loss);
    ``BEGIN IMMEDIATE``, ``SELECT``, ``INSERT OR REPLACE``, ``COMMIT`` on a
    table ``sessions(key TEXT PRIMARY KEY, value BLOB)``.
    ``diskcache``: ``diskcache.Cache(dir, eviction_policy="none")`` (sessions
    must never be evicted; its SQLite runs in WAL mode with
    ``synchronous=NORMAL``); ``with cache.transact():`` get, change, set of
    the msgpack bytes.
    ``diskcache-lock`` (scenario ``handler`` only): the same cache, but the
    per-key recipe ``with diskcache.Lock(cache, "lock-" + k):`` get, change,
    set, without ``transact()``, so that different keys do not wait for each
    other while a handler runs.
    ``sessionkit-durable``, ``lmdb-sync``, ``sqlite-full`` (scenario
    ``durable``): the same with ``durable=True`` (an ``fdatasync`` per
    write), LMDB's default ``sync=True`` (and ``metasync=True``), and WAL with
    ``PRAGMA synchronous=FULL``: an acknowledged write survives power loss.

Scenarios
    ``1t1k``: 1 process, 1 thread, 1 key: ops/s.
    ``4p1k``: 4 processes on the same key, total ops/s; the counter at the
    end must equal the increments acknowledged (the table says "lost"
    otherwise).  With several processes the table also gives the slowest
    process's share: its operations over an even split's.  A store whose
    waiters sleep and retry (SQLite's busy handler) lets the process that
    holds the key take it again and again while the others sleep: it
    saves the hand-overs, and this share drops towards 0.
    ``4p4k``: 4 processes, each on a key of its own.
    ``random``: 10,000 sessions prefilled, then 1, 2, 4 and 8 processes each
    doing read-modify-writes on random keys for a fixed time: total ops/s,
    and each subject's N-process figure over its 1-process figure in the
    same repetition (the target: sessionkit at least 1.5x at 2, 4 and 8).
    ``latency``: 10,000 sessions of about 1 KB each (``"pad": b"x" * 1000``,
    kept by every change), then 200,000 read-modify-writes on random keys
    (20,000 with ``--quick``) in one thread, in slices the subjects take in
    turn; every operation is timed with ``time.perf_counter_ns``: p50, p99,
    p99.9 and the longest, in microseconds.
    ``stall``: one process writes 100 KB values over a set of keys holding
    half the target size live (the target is 100 MB, 20 MB with
    ``--quick``), rewriting every key four times over, so that sessionkit's
    files grow to about the target and its logs are compacted (a log is
    rewritten once its dead bytes outweigh its live ones) more than once;
    meanwhile another process does small read-modify-writes on other keys
    and times each.  The table gives that process's longest operation (the
    target: sessionkit never over 20 ms) and its p99.9, and the store's
    largest size on disk as sampled by the writer.  Beside them, for
    comparison, the longest that a process doing nothing but sleep 1 ms at
    a time woke late in the same repetition (``PauseMonitor``): the
    machine's scheduling delay while the writer, the store's helpers and
    the kernel's writeback use its 2 CPUs.
    ``open1m``: a store prefilled with 1,000,000 sessions (100,000 with
    ``--quick``) in a child process, as fast as each library allows
    (sessionkit ``storage.write()`` in a loop; LMDB and diskcache one
    transaction per 10,000; SQLite ``executemany`` per 10,000), kept in
    ``--cache-dir`` (default: ``sessionkit-engine-cache`` under the
    temporary directory) and rebuilt when missing or when the library (for
    sessionkit: the source of its storage) changed.  Then a fresh Python
    process, its imports done, times opening the store and its first
    read-modify-write, then 100 more on random keys, and reports its
    resident memory (``VmRSS``) afterwards; and four such processes open the
    store at the same moment (each has done its imports and waits for the
    signal): the slowest one's open and first read-modify-write.  The page
    cache is warm (nothing is dropped); the probes' increments stay in the
    cached store, which changes no size that matters.
    ``handler``: the realistic bot: 4 processes x 8 threads, each thread on a
    key of its own, and the handler spends 2 ms inside the session (between
    reading the count and setting it: an API call).  LMDB, SQLite and
    diskcache's ``transact()`` hold their store-wide write lock across those
    2 ms, since it is their only atomic read-modify-write; ``diskcache-lock``
    is the careful per-key recipe.
    ``durable``: ``1t1k``, ``4p1k``, ``4p4k`` and ``handler`` with the
    durable subjects.

Every scenario uses keys of its own (fresh ones in each repetition where it
counts), so the lost-update check at the end of a repetition is exact.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import itertools
import json
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import msgpack

from .cell import disk_bytes, rss_mb
from .redis_bench import _fmt, _jsonable, percentile, progress, rotated, targets_section
from .report import filesystem_of

REPO = Path(os.path.abspath(__file__)).parent.parent  # the checkout this module was imported from
SAVED = REPO / "benchmarks" / "results" / "engine"  # the committed run (--save)

SCENARIOS = {
    "1t1k": "1 thread, 1 key",
    "4p1k": "4 processes, same key",
    "4p4k": "4 processes, a key each",
    "random": "1, 2, 4 and 8 processes on random keys of 10,000 prefilled sessions",
    "latency": "latency of 1 KB read-modify-writes, 1 thread, random keys of 10,000",
    "stall": "small read-modify-writes while another process writes large values",
    "open1m": "a fresh process opens a store of 1,000,000 sessions (100,000 with --quick)",
    "handler": "4 processes x 8 threads, a key each, 2 ms inside the session",
    "durable": "1t1k, 4p1k, 4p4k and handler, every write durable",
}

FAST = ("sessionkit", "lmdb", "sqlite-wal", "diskcache")
HANDLER = (*FAST, "diskcache-lock")
DURABLE = ("sessionkit-durable", "lmdb-sync", "sqlite-full")

PROCESSES = 4
THREADS = 8
RANDOM_SESSIONS = 10_000
RANDOM_PROCESSES = (1, 2, 4, 8)
HANDLER_SLEEP_S = 0.002
PAD_BYTES = 1000
BLOB_BYTES = 100_000
STALL_SMALL_KEYS = 1000
STALL_PASSES = 4  # the large keys are each rewritten this many times
OPEN_MORE = 100  # read-modify-writes after the first, in the open1m probe
OPEN_AT_ONCE = 4
CHUNK = 10_000  # sessions per transaction when prefilling
MAP_SIZE = 1 << 34  # LMDB's map: 16 GiB of address space, only what is written takes disk
BUSY_TIMEOUT_S = 60.0
REPLY_TIMEOUT_S = 1800.0  # the longest a worker may take over one command (a 1,000,000 prefill)

TARGET_SCALING = 1.5  # sessionkit's N-process ops/s over its 1-process ops/s, random keys
TARGET_STALL_MS = 20.0  # sessionkit's longest small read-modify-write during the large writes

# repeat, seconds: the fixed-key throughput scenarios (1t1k, 4p1k, 4p4k, and durable's);
# random_*: the random-keys scenario; latency_ops in latency_slices; stall_mb: the size the
# writer's store grows to (half of it live) and stall_seconds the least it writes for;
# open_sessions: the store open1m opens; handler_seconds: a repetition of handler.
QUICK = {"repeat": 3, "seconds": 0.4, "random_repeat": 2, "random_seconds": 0.4, "latency_ops": 20_000,
         "latency_slices": 4, "stall_mb": 20, "stall_repeat": 1, "stall_seconds": 2.0,
         "open_sessions": 100_000, "open_repeat": 2, "handler_seconds": 0.5}
FULL = {"repeat": 5, "seconds": 2.0, "random_repeat": 5, "random_seconds": 1.5, "latency_ops": 200_000,
        "latency_slices": 10, "stall_mb": 100, "stall_repeat": 3, "stall_seconds": 6.0,
        "open_sessions": 1_000_000, "open_repeat": 3, "handler_seconds": 2.0}


# -- what a read-modify-write does ---------------------------------------------------


def bump(value: Any) -> None:
    """The plain change: ``count`` plus one (works on a dict and on a sessionkit ``Session``)."""
    value["count"] = value.get("count", 0) + 1


def handle(value: Any) -> None:
    """The handler scenario's change: read the count, spend 2 ms (an API call), set it."""
    count = value.get("count", 0)
    time.sleep(HANDLER_SLEEP_S)
    value["count"] = count + 1


CHANGES: dict[str, Callable[[Any], None]] = {"bump": bump, "handle": handle}


def _unpack(raw: bytes | None) -> dict[str, Any]:
    return {} if raw is None else msgpack.unpackb(raw)  # type: ignore[no-any-return]


def _pack(value: dict[str, Any]) -> bytes:
    return msgpack.packb(value)  # type: ignore[no-any-return]


def _chunks(items: Iterable[str], size: int) -> Iterable[list[str]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


# -- the subjects --------------------------------------------------------------------


class Subject:
    """One store of sessions in directory ``path``, opened by one process and shared by its threads."""

    name = ""
    modules: tuple[str, ...] = ("msgpack",)  # imported before a timed open

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def preload(cls) -> None:
        """Import what opening the store needs, so that a timed open leaves imports out."""
        for module in cls.modules:
            importlib.import_module(module)

    def rmw(self, key: str, change: Callable[[Any], None]) -> None:
        """Read ``key``'s dict (``{}`` when absent), apply ``change``, write it back: atomically."""
        raise NotImplementedError

    def read_count(self, key: str) -> int:
        """``key``'s count now (0 when absent)."""
        raise NotImplementedError

    def prefill(self, keys: Iterable[str], value: dict[str, Any]) -> None:
        """Store ``value`` under every key, as fast as the library allows."""
        for key in keys:
            self.rmw(key, lambda v: v.update(value))

    def close(self) -> None:
        """Let go of the store."""


class Sessionkit(Subject):
    """``Sessions(MsgpackFileStorage(path, durable=False), initial=dict)``."""

    name = "sessionkit"
    durable = False
    modules = ("sessionkit",)

    def __init__(self, path: str) -> None:
        super().__init__(path)
        from sessionkit import MsgpackFileStorage, Sessions

        self.storage = MsgpackFileStorage(path, durable=self.durable)
        self.sessions = Sessions(self.storage, initial=dict)

    def rmw(self, key: str, change: Callable[[Any], None]) -> None:
        with self.sessions.open(key) as s:
            change(s)

    def read_count(self, key: str) -> int:
        value = self.storage.read(key)
        return 0 if value is None else int(value.get("count", 0))

    def prefill(self, keys: Iterable[str], value: dict[str, Any]) -> None:
        write = self.storage.write
        for key in keys:
            write(key, value)

    def close(self) -> None:
        self.storage.close()


class SessionkitDurable(Sessionkit):
    """``MsgpackFileStorage(path, durable=True)``: an ``fdatasync`` per write."""

    name = "sessionkit-durable"
    durable = True


class Lmdb(Subject):
    """``lmdb.open(path, sync=False)``; a write transaction around get, change, put."""

    name = "lmdb"
    sync = False
    modules = ("lmdb", "msgpack")

    def __init__(self, path: str) -> None:
        super().__init__(path)
        import lmdb

        self.env = lmdb.open(path, map_size=MAP_SIZE, sync=self.sync, metasync=self.sync, writemap=False,
                             max_dbs=0, lock=True)

    def rmw(self, key: str, change: Callable[[Any], None]) -> None:
        k = key.encode()
        with self.env.begin(write=True) as txn:
            value = _unpack(txn.get(k))
            change(value)
            txn.put(k, _pack(value))

    def read_count(self, key: str) -> int:
        with self.env.begin() as txn:
            return int(_unpack(txn.get(key.encode())).get("count", 0))

    def prefill(self, keys: Iterable[str], value: dict[str, Any]) -> None:
        raw = _pack(value)
        for chunk in _chunks(keys, CHUNK):
            with self.env.begin(write=True) as txn:
                for key in chunk:
                    txn.put(key.encode(), raw)

    def close(self) -> None:
        self.env.close()


class LmdbSync(Lmdb):
    """``lmdb.open(path, sync=True, metasync=True)``, LMDB's defaults: an ``fsync`` per commit."""

    name = "lmdb-sync"
    sync = True


_SELECT = "SELECT value FROM sessions WHERE key = ?"
_REPLACE = "INSERT OR REPLACE INTO sessions (key, value) VALUES (?, ?)"


class SqliteWal(Subject):
    """SQLite in WAL mode, ``synchronous=NORMAL``, one connection per thread; ``BEGIN IMMEDIATE`` ... ``COMMIT``."""

    name = "sqlite-wal"
    synchronous = "NORMAL"
    modules = ("sqlite3", "msgpack")

    def __init__(self, path: str) -> None:
        super().__init__(path)
        os.makedirs(path, exist_ok=True)
        self.file = os.path.join(path, "sessions.sqlite3")
        self.local = threading.local()
        self.opened: list[Any] = []
        self.guard = threading.Lock()
        self.connection()  # the table exists once the store is open

    def connection(self) -> Any:
        """This thread's connection, made on first use."""
        conn = getattr(self.local, "conn", None)
        if conn is None:
            import sqlite3

            conn = sqlite3.connect(self.file, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)  # each is used by one thread; closed by close()
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("CREATE TABLE IF NOT EXISTS sessions (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
            self.local.conn = conn
            with self.guard:
                self.opened.append(conn)
        return conn

    def rmw(self, key: str, change: Callable[[Any], None]) -> None:
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(_SELECT, (key,)).fetchone()
            value = _unpack(None if row is None else row[0])
            change(value)
            conn.execute(_REPLACE, (key, _pack(value)))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def read_count(self, key: str) -> int:
        row = self.connection().execute(_SELECT, (key,)).fetchone()
        return int(_unpack(None if row is None else row[0]).get("count", 0))

    def prefill(self, keys: Iterable[str], value: dict[str, Any]) -> None:
        conn = self.connection()
        raw = _pack(value)
        for chunk in _chunks(keys, CHUNK):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_REPLACE, [(key, raw) for key in chunk])
            conn.execute("COMMIT")

    def close(self) -> None:
        with self.guard:
            for conn in self.opened:
                conn.close()
            self.opened.clear()


class SqliteFull(SqliteWal):
    """SQLite in WAL mode with ``synchronous=FULL``: an ``fsync`` of the WAL per commit."""

    name = "sqlite-full"
    synchronous = "FULL"


class Diskcache(Subject):
    """``diskcache.Cache(path, eviction_policy="none")``; ``transact()`` around get, change, set."""

    name = "diskcache"
    modules = ("diskcache", "msgpack")

    def __init__(self, path: str) -> None:
        super().__init__(path)
        import diskcache

        self.cache = diskcache.Cache(path, eviction_policy="none")

    def rmw(self, key: str, change: Callable[[Any], None]) -> None:
        cache = self.cache
        with cache.transact():
            value = _unpack(cache.get(key))
            change(value)
            cache.set(key, _pack(value))

    def read_count(self, key: str) -> int:
        return int(_unpack(self.cache.get(key)).get("count", 0))

    def prefill(self, keys: Iterable[str], value: dict[str, Any]) -> None:
        cache = self.cache
        raw = _pack(value)
        for chunk in _chunks(keys, CHUNK):
            with cache.transact():
                for key in chunk:
                    cache.set(key, raw)

    def close(self) -> None:
        self.cache.close()


class DiskcacheLock(Diskcache):
    """The same cache; ``diskcache.Lock(cache, "lock-" + key)`` around get, change, set (no ``transact()``)."""

    name = "diskcache-lock"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        from diskcache import Lock

        self.lock = Lock

    def rmw(self, key: str, change: Callable[[Any], None]) -> None:
        cache = self.cache
        with self.lock(cache, "lock-" + key):
            value = _unpack(cache.get(key))
            change(value)
            cache.set(key, _pack(value))


SUBJECTS: dict[str, type[Subject]] = {cls.name: cls for cls in (
    Sessionkit, Lmdb, SqliteWal, Diskcache, DiskcacheLock, SessionkitDurable, LmdbSync, SqliteFull)}


# -- the worker processes ------------------------------------------------------------


def _key_source(spec: dict[str, Any], thread: int) -> Callable[[int], str]:
    """The ``i``-th key a thread works on: from its own list (cycled) or random among prefilled ones."""
    if "random" in spec:
        prefix, n, seed = spec["random"]
        randrange = random.Random(seed * 1000 + thread).randrange
        return lambda i: prefix + str(randrange(n))
    keys = spec["keys"][thread]
    if len(keys) == 1:
        key = keys[0]
        return lambda i: key
    return lambda i: keys[i % len(keys)]


def _drive(subject: Subject, change: Callable[[Any], None], key_of: Callable[[int], str],
           spec: dict[str, Any], halt: Any) -> dict[str, Any]:
    """One thread's loop: from ``start_at`` until ``stop_at``, the budget, or the halt flag."""
    now, clock = time.monotonic, time.perf_counter_ns
    delay = spec["start_at"] - now()
    if delay > 0:
        time.sleep(delay)
    stop_at = spec.get("stop_at") or float("inf")
    budget = spec.get("budget") or sys.maxsize
    until_halt, record = bool(spec.get("until_halt")), bool(spec.get("record"))
    rmw = subject.rmw
    done = in_window = errors = i = 0
    first = ""
    latencies: list[int] = []
    began = ended = now()
    while i < budget and ended < stop_at and not (until_halt and halt.value):
        key = key_of(i)
        t0 = clock()
        ok = False
        try:
            rmw(key, change)
            done += 1
            ok = True
        except Exception as exc:  # counted and shown, never hidden
            errors += 1
            first = first or f"{type(exc).__name__}: {exc}"[:200]
        if record:
            latencies.append(clock() - t0)
        ended = now()
        if ok and ended <= stop_at:  # one still under way at stop_at is acknowledged, not timed
            in_window += 1
        i += 1
    return {"ops": done, "in_window": in_window, "errors": errors, "first_error": first, "began": began,
            "end": ended, "latencies_ns": latencies}


def _cmd_open(stores: dict[str, Subject], halt: Any, name: str, path: str) -> dict[str, Any]:
    if path not in stores:
        stores[path] = SUBJECTS[name](path)
    return {}


def _cmd_close(stores: dict[str, Subject], halt: Any, path: str | None = None) -> dict[str, Any]:
    for p in [path] if path is not None else list(stores):
        subject = stores.pop(p, None)
        if subject is not None:
            subject.close()
    return {}


def _cmd_prefill(stores: dict[str, Subject], halt: Any, path: str, prefix: str, count: int,
                 value: dict[str, Any]) -> dict[str, Any]:
    began = time.perf_counter()
    stores[path].prefill((f"{prefix}{i}" for i in range(count)), value)
    return {"seconds": time.perf_counter() - began}


def _cmd_count(stores: dict[str, Subject], halt: Any, path: str, keys: list[str]) -> dict[str, Any]:
    read = stores[path].read_count
    return {"count": sum(read(k) for k in keys)}


def _cmd_run(stores: dict[str, Subject], halt: Any, path: str, spec: dict[str, Any]) -> dict[str, Any]:
    """``spec["threads"]`` threads (default 1) each run :func:`_drive`; their figures added up."""
    subject = stores[path]
    change = CHANGES[spec.get("change", "bump")]
    threads = spec.get("threads", 1)
    if threads == 1:
        return _drive(subject, change, _key_source(spec, 0), spec, halt)
    outs: list[dict[str, Any]] = [{} for _ in range(threads)]

    def work(t: int) -> None:
        outs[t] = _drive(subject, change, _key_source(spec, t), spec, halt)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return {"ops": sum(o["ops"] for o in outs), "in_window": sum(o["in_window"] for o in outs),
            "errors": sum(o["errors"] for o in outs),
            "first_error": next((o["first_error"] for o in outs if o["first_error"]), ""),
            "began": min(o["began"] for o in outs), "end": max(o["end"] for o in outs),
            "latencies_ns": [x for o in outs for x in o["latencies_ns"]]}


def _cmd_write_large(stores: dict[str, Subject], halt: Any, path: str, keys: int, passes: int, seconds: float,
                     start_at: float) -> dict[str, Any]:
    """The stall scenario's writer: 100 KB values over ``keys`` keys, each rewritten ``passes`` times
    and for at least ``seconds`` altogether."""
    subject = stores[path]
    blob = os.urandom(BLOB_BYTES)

    def change(value: Any) -> None:
        value["blob"] = blob
        bump(value)

    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    latencies: list[int] = []
    peak = errors = 0
    first = ""
    began = time.perf_counter()
    least = keys * passes
    i = 0
    while i < least or time.perf_counter() - began < seconds:
        t0 = time.perf_counter_ns()
        try:
            subject.rmw(f"large:{i % keys}", change)
        except Exception as exc:
            errors += 1
            first = first or f"{type(exc).__name__}: {exc}"[:200]
        latencies.append(time.perf_counter_ns() - t0)
        if i % 10 == 9:
            peak = max(peak, disk_bytes(path))
        i += 1
    took = time.perf_counter() - began
    final = disk_bytes(path)
    return {"writes": i, "seconds": took, "peak_bytes": max(peak, final), "final_bytes": final,
            "max_ms": max(latencies, default=0) / 1e6, "p99_ms": (percentile(latencies, 99) or 0) / 1e6,
            "errors": errors, "first_error": first}


COMMANDS: dict[str, Callable[..., dict[str, Any]]] = {
    "open": _cmd_open, "close": _cmd_close, "prefill": _cmd_prefill, "count": _cmd_count, "run": _cmd_run,
    "write_large": _cmd_write_large}


def _worker(conn: Any, halt: Any, modules: tuple[str, ...] = ()) -> None:
    """A worker process: carry out commands from the parent until told to stop.

    ``modules`` are imported first: one may add subjects to :data:`SUBJECTS`
    (``benchmarks.floor`` adds its ``floor``).
    """
    for module in modules:
        importlib.import_module(module)
    stores: dict[str, Subject] = {}
    try:
        while True:
            message = conn.recv()
            if message is None:
                break
            command, args = message
            try:
                reply = COMMANDS[command](stores, halt, **args)
            except Exception:
                reply = {"failed": traceback.format_exc(limit=6)}
            conn.send(reply)
    finally:
        for subject in stores.values():
            subject.close()


class Pool:
    """Worker processes, spawned once for the whole run, each with a pipe to the parent."""

    def __init__(self, size: int, modules: tuple[str, ...] = ()) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.halt: Any = ctx.RawValue("b", 0)  # the stall scenario's "stop now", read by the reader
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        for _ in range(size):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(theirs, self.halt, modules), daemon=True)
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)

    def send(self, worker: int, command: str, **args: Any) -> None:
        """Give ``worker`` a command; :meth:`recv` gets its reply."""
        self.conns[worker].send((command, args))

    def recv(self, worker: int, timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        """``worker``'s reply to its last command; raises if it failed, died or took too long."""
        conn, proc = self.conns[worker], self.procs[worker]
        deadline = time.monotonic() + timeout
        while not conn.poll(0.5):
            if not proc.is_alive():
                raise RuntimeError(f"worker {worker} exited with {proc.exitcode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {worker} gave no reply in {timeout:.0f} s")
        reply: dict[str, Any] = conn.recv()
        if "failed" in reply:
            raise RuntimeError(f"worker {worker} failed:\n{reply['failed']}")
        return reply

    def call(self, worker: int, command: str, **args: Any) -> dict[str, Any]:
        """Send a command to one worker and wait for its reply."""
        self.send(worker, command, **args)
        return self.recv(worker)

    def open(self, name: str, path: str, workers: Iterable[int]) -> None:
        """Open the store in each of ``workers``, one after the other (the first one creates it)."""
        for w in workers:
            self.call(w, "open", name=name, path=path)

    def close_all(self) -> None:
        """Every worker lets go of every store it has open."""
        for w in range(len(self.conns)):
            self.send(w, "close")
        for w in range(len(self.conns)):
            self.recv(w)

    def run(self, path: str, specs: list[dict[str, Any]], lead: float = 0.05) -> dict[str, Any]:
        """Workers 0..len(specs)-1 each run their spec from one common start; the figures added up.

        A spec's ``seconds`` becomes a common ``stop_at``; then ``ops_s`` is
        the operations that ended within the window over its length (those
        under way at ``stop_at`` are finished and acknowledged, for the
        lost-update check, but not counted: a store-wide lock's queue of
        waiters would otherwise stretch the window).  With a ``budget``
        instead, ``ops_s`` is every operation over the time from the first
        start to the last end.
        """
        start_at = time.monotonic() + lead
        window = None
        for w, spec in enumerate(specs):
            spec = dict(spec, start_at=start_at)
            if "seconds" in spec:
                window = spec.pop("seconds")
                spec["stop_at"] = start_at + window
            self.send(w, "run", path=path, spec=spec)
        got = [self.recv(w) for w in range(len(specs))]
        ops = sum(g["ops"] for g in got)
        least_share = None
        if window is not None:
            elapsed, timed = window, sum(g["in_window"] for g in got)
            if len(got) > 1 and timed:  # the slowest process's operations over an even split's
                least_share = min(g["in_window"] for g in got) * len(got) / timed
        else:
            elapsed, timed = max(g["end"] for g in got) - min(g["began"] for g in got), ops
        return {"ops": ops, "seconds": elapsed, "ops_s": timed / elapsed if elapsed > 0 else 0.0,
                "least_share": least_share,
                "errors": sum(g["errors"] for g in got),
                "first_error": next((g["first_error"] for g in got if g["first_error"]), ""),
                "latencies_ns": [x for g in got for x in g["latencies_ns"]]}

    def shutdown(self) -> None:
        """Tell every worker to stop, and wait for it (killing one that hangs)."""
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(30)
            if proc.exitcode is None:
                proc.kill()
                proc.join()


# -- records and summaries -----------------------------------------------------------


def new_record() -> dict[str, Any]:
    """An empty per-subject record of one throughput scenario."""
    return {"ops_s": [], "ops": [], "seconds": [], "expected": 0, "counted": 0, "lost": 0, "errors": 0,
            "first_error": ""}


def add_rep(rec: dict[str, Any], got: dict[str, Any], counted: int | None = None) -> None:
    """Record one repetition (and, with ``counted``, the lost-update check of its fresh keys)."""
    rec["ops_s"].append(got["ops_s"])
    if got.get("least_share") is not None:
        rec.setdefault("least_shares", []).append(got["least_share"])
    rec["ops"].append(got["ops"])
    rec["seconds"].append(got["seconds"])
    rec["errors"] += got["errors"]
    rec["first_error"] = rec["first_error"] or got["first_error"]
    if counted is not None:
        rec["expected"] += got["ops"]
        rec["counted"] += counted
        rec["lost"] = rec["expected"] - rec["counted"]


def paired(mine: Sequence[float], theirs: Sequence[float]) -> tuple[list[float], float | None]:
    """``mine[i] / theirs[i]`` for every repetition, and their median."""
    ratios = [a / b for a, b in zip(mine, theirs) if b]
    return ratios, (statistics.median(ratios) if ratios else None)


def summarise(records: dict[str, dict[str, Any]], lead: str) -> dict[str, Any]:
    """Each subject's median ops/s and range, and ``lead``'s ops/s over its own, paired per repetition."""
    out: dict[str, Any] = {}
    for name, rec in records.items():
        row = dict(rec)
        row["median_ops_s"] = statistics.median(rec["ops_s"]) if rec["ops_s"] else 0.0
        row["min_ops_s"] = min(rec["ops_s"], default=0.0)
        row["max_ops_s"] = max(rec["ops_s"], default=0.0)
        if name != lead:
            row["lead_ratios"], row["lead_ratio"] = paired(records[lead]["ops_s"], rec["ops_s"])
        out[name] = row
    return out


def _path(workdir: str, *parts: str) -> str:
    return os.path.join(workdir, *parts)


# -- scenarios: throughput on fixed keys ------------------------------------------------


def keyed(pool: Pool, names: Sequence[str], workdir: str, settings: dict[str, Any], tag: str,
          processes: int, threads: int, same_key: bool, change: str = "bump",
          seconds: float | None = None) -> dict[str, Any]:
    """``processes`` x ``threads`` on one key or a key each, every subject in turn per repetition."""
    seconds = seconds or settings["seconds"]
    paths = {name: _path(workdir, tag, name) for name in names}
    for name in names:
        pool.open(name, paths[name], range(processes))

    def keys(label: str) -> list[list[list[str]]]:
        if same_key:
            return [[[f"{tag}:{label}:chat:1"]] * threads] * processes
        return [[[f"{tag}:{label}:chat:{w * threads + t}"] for t in range(threads)] for w in range(processes)]

    def once(name: str, label: str, span: float) -> tuple[dict[str, Any], int]:
        ks = keys(label)
        specs = [{"keys": ks[w], "threads": threads, "change": change, "seconds": span} for w in range(processes)]
        got = pool.run(paths[name], specs)
        every = sorted({k for per_worker in ks for per_thread in per_worker for k in per_thread})
        counted = pool.call(0, "count", path=paths[name], keys=every)["count"]
        return got, counted

    for name in names:  # warm-up
        once(name, "w", seconds / 4)
    records = {name: new_record() for name in names}
    for rep in range(settings["repeat"]):
        for name in rotated(list(names), rep):
            got, counted = once(name, str(rep), seconds)
            add_rep(records[name], got, counted)
    pool.close_all()
    shutil.rmtree(_path(workdir, tag), ignore_errors=True)
    return summarise(records, names[0])


# -- scenario: random keys, 1 to 8 processes ----------------------------------------------


def random_keys(pool: Pool, names: Sequence[str], workdir: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Prefill 10,000 sessions; 1, 2, 4, 8 processes on random keys; scaling over 1 process."""
    top = max(RANDOM_PROCESSES)
    paths = {name: _path(workdir, "random", name) for name in names}
    prefill_s: dict[str, float] = {}
    for name in names:
        pool.open(name, paths[name], range(top))
        prefill_s[name] = pool.call(0, "prefill", path=paths[name], prefix="chat:", count=RANDOM_SESSIONS,
                                    value={"count": 0})["seconds"]
    os.sync()  # the prefill's dirty pages written out now, not during the timed runs
    seconds = settings["random_seconds"]
    acked = dict.fromkeys(names, 0)
    records = {n: {p: new_record() for p in RANDOM_PROCESSES} for n in names}

    def once(name: str, n: int, seed: int, span: float) -> dict[str, Any]:
        got = pool.run(paths[name], [{"random": ["chat:", RANDOM_SESSIONS, seed * 100 + w], "seconds": span}
                                     for w in range(n)])
        acked[name] += got["ops"]
        return got

    for name in names:  # warm-up: every worker touches the store
        once(name, top, 999, seconds / 4)
    for rep in range(settings["random_repeat"]):
        for n in RANDOM_PROCESSES:
            for name in rotated(list(names), rep + n):
                add_rep(records[name][n], once(name, n, rep * 10 + n, seconds))
    every = [f"chat:{i}" for i in range(RANDOM_SESSIONS)]
    out: dict[str, Any] = {}
    for name in names:
        counted = pool.call(0, "count", path=paths[name], keys=every)["count"]
        row: dict[str, Any] = {"prefill_s": prefill_s[name], "acked": acked[name], "counted": counted,
                               "lost": acked[name] - counted, "by_processes": {}}
        errors = 0
        first = ""
        for n in RANDOM_PROCESSES:
            rec = records[name][n]
            entry = {"ops_s": rec["ops_s"], "median_ops_s": statistics.median(rec["ops_s"]) if rec["ops_s"] else 0.0}
            entry["scaling"], entry["median_scaling"] = paired(rec["ops_s"], records[name][1]["ops_s"])
            if name != names[0]:
                entry["lead_ratios"], entry["lead_ratio"] = paired(records[names[0]][n]["ops_s"], rec["ops_s"])
            row["by_processes"][str(n)] = entry
            errors += rec["errors"]
            first = first or rec["first_error"]
        row["errors"], row["first_error"] = errors, first
        out[name] = row
    pool.close_all()
    shutil.rmtree(_path(workdir, "random"), ignore_errors=True)
    return out


# -- scenario: latency of 1 KB read-modify-writes -----------------------------------------


def latency(pool: Pool, names: Sequence[str], workdir: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Every operation timed, one thread, 1 KB values; slices taken in turn by the subjects."""
    paths = {name: _path(workdir, "latency", name) for name in names}
    for name in names:
        pool.open(name, paths[name], [0])
        pool.call(0, "prefill", path=paths[name], prefix="chat:", count=RANDOM_SESSIONS,
                  value={"count": 0, "pad": b"x" * PAD_BYTES})
    os.sync()
    slices = settings["latency_slices"]
    per_slice = settings["latency_ops"] // slices
    for name in names:  # warm-up
        pool.run(paths[name], [{"random": ["chat:", RANDOM_SESSIONS, 999], "budget": max(per_slice // 10, 100)}])
    records = {name: new_record() for name in names}
    pooled: dict[str, list[int]] = {name: [] for name in names}
    for j in range(slices):
        for name in rotated(list(names), j):
            got = pool.run(paths[name], [{"random": ["chat:", RANDOM_SESSIONS, j], "budget": per_slice,
                                          "record": True}])
            pooled[name].extend(got.pop("latencies_ns"))
            add_rep(records[name], got)
    out = summarise(records, names[0])
    for name in names:
        lat = pooled[name]
        for label, q in (("p50_us", 50), ("p99_us", 99), ("p999_us", 99.9)):
            out[name][label] = (percentile(lat, q) or 0) / 1e3
        out[name]["max_us"] = max(lat, default=0) / 1e3
        out[name]["timed"] = len(lat)
    pool.close_all()
    shutil.rmtree(_path(workdir, "latency"), ignore_errors=True)
    return out


# -- scenario: stalls while another process writes large values ------------------------------


_PAUSE_CODE = """
import sys, time
clock = time.perf_counter
sys.stdout.write("ready\\n"); sys.stdout.flush()
import select
longest = 0.0
while not select.select([sys.stdin], [], [], 0)[0]:
    t0 = clock()
    time.sleep(0.001)
    late = clock() - t0 - 0.001
    if late > longest:
        longest = late
sys.stdout.write(repr(longest) + "\\n")
"""


class PauseMonitor:
    """A process of its own that does nothing but sleep 1 ms at a time, and reports the longest it
    overslept: how long a sleeping process that became ready waited for a CPU meanwhile, with the
    subject's processes, the kernel's writeback and anything else on the machine competing for the
    CPUs.  It is the machine's scheduling delay in that time, for comparison with the operations timed
    then; it is not tied in time to any one of them.  (A process of its own, so that the benchmark
    process's own work, such as unpickling a worker's reply, is not counted.)"""

    def __init__(self) -> None:
        self.longest = 0.0
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> "PauseMonitor":
        self._proc = subprocess.Popen([sys.executable, "-c", _PAUSE_CODE], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        self._proc.stdout.readline()  # "ready": sleeping from now on
        return self

    def __exit__(self, *exc: Any) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            out, _ = proc.communicate("stop\n", timeout=30)
            self.longest = float(out.strip() or 0.0)
        except (subprocess.TimeoutExpired, ValueError):
            proc.kill()
            proc.wait()


def stall(pool: Pool, names: Sequence[str], workdir: str, settings: dict[str, Any]) -> dict[str, Any]:
    """A writer fills the store with 100 KB values and keeps rewriting them; a reader times small RMWs."""
    live = settings["stall_mb"] * 1_000_000 // 2
    keys = max(live // BLOB_BYTES, 1)
    out: dict[str, Any] = {name: {"reader_max_ms": [], "reader_p999_ms": [], "reader_p99_ms": [],
                                  "reader_ops_s": [], "writer_mb_s": [], "writer_max_ms": [], "peak_mb": [],
                                  "final_mb": [], "writes": [], "pause_ms": [], "errors": 0, "first_error": "",
                                  "keys": keys}
                           for name in names}
    for rep in range(settings["stall_repeat"]):
        for name in rotated(list(names), rep):
            path = _path(workdir, "stall", f"{name}-{rep}")
            pool.open(name, path, [0, 1])
            pool.call(1, "prefill", path=path, prefix="small:", count=STALL_SMALL_KEYS, value={"count": 0})
            os.sync()
            pool.halt.value = 0
            with PauseMonitor() as pauses:
                start_at = time.monotonic() + 0.05
                pool.send(1, "run", path=path, spec={"random": ["small:", STALL_SMALL_KEYS, rep],
                                                     "until_halt": True, "record": True, "start_at": start_at})
                pool.send(0, "write_large", path=path, keys=keys, passes=STALL_PASSES,
                          seconds=settings["stall_seconds"], start_at=start_at)
                try:
                    writer = pool.recv(0)
                finally:
                    pool.halt.value = 1
                reader = pool.recv(1)
            lat = reader["latencies_ns"]
            row = out[name]
            row["reader_max_ms"].append(max(lat, default=0) / 1e6)
            row["reader_p999_ms"].append((percentile(lat, 99.9) or 0) / 1e6)
            row["reader_p99_ms"].append((percentile(lat, 99) or 0) / 1e6)
            span = reader["end"] - reader["began"]
            row["reader_ops_s"].append(reader["ops"] / span if span > 0 else 0.0)
            row["writes"].append(writer["writes"])
            row["writer_mb_s"].append(writer["writes"] * BLOB_BYTES / 1e6 / writer["seconds"])
            row["writer_max_ms"].append(writer["max_ms"])
            row["pause_ms"].append(pauses.longest * 1e3)
            row["peak_mb"].append(writer["peak_bytes"] / 1e6)
            row["final_mb"].append(writer["final_bytes"] / 1e6)
            row["errors"] += reader["errors"] + writer["errors"]
            row["first_error"] = row["first_error"] or reader["first_error"] or writer["first_error"]
            pool.close_all()
            shutil.rmtree(path, ignore_errors=True)
    for row in out.values():
        row["worst_max_ms"] = max(row["reader_max_ms"], default=0.0)
        row["worst_p999_ms"] = max(row["reader_p999_ms"], default=0.0)
    return out


# -- scenario: opening a store of 1,000,000 sessions ----------------------------------------


def fingerprint(name: str) -> str:
    """What a cached prefilled store depends on: the library's version (sessionkit: its storage source)."""
    if name.startswith("sessionkit"):
        import sessionkit

        root = Path(os.path.abspath(sessionkit.__file__)).parent
        digest = hashlib.sha256()
        for path in sorted([*root.joinpath("storage").rglob("*.py"), root / "_codec.py"]):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
        return "src-" + digest.hexdigest()[:12]
    if name.startswith("lmdb"):
        import lmdb

        return f"lmdb-{lmdb.__version__}"
    if name.startswith("sqlite"):
        import sqlite3

        return f"sqlite-{sqlite3.sqlite_version}"
    import diskcache

    return f"diskcache-{diskcache.__version__}"


def prefilled(pool: Pool, name: str, count: int, cache_dir: str) -> tuple[str, float | None]:
    """The cached store of ``count`` sessions for ``name`` (built first if missing): its path, and the
    prefill's seconds when it was built by this run."""
    stem = f"{name}-{count}"
    entry = f"{stem}-{fingerprint(name)}"
    path, marker = os.path.join(cache_dir, entry), os.path.join(cache_dir, entry + ".json")
    if os.path.isdir(path) and os.path.exists(marker):
        return path, None
    os.makedirs(cache_dir, exist_ok=True)
    for old in os.listdir(cache_dir):  # this subject's stores of other versions, and a half-built one
        if old.startswith(stem + "-"):
            target = os.path.join(cache_dir, old)
            if os.path.isdir(target):
                shutil.rmtree(target, ignore_errors=True)
            else:
                os.remove(target)
    progress(f"  prefilling {count:,} sessions for {name} in {path}")
    pool.open(name, path, [0])
    seconds = pool.call(0, "prefill", path=path, prefix="chat:", count=count, value={"count": 0})["seconds"]
    pool.close_all()
    os.sync()
    with open(marker, "w") as f:
        json.dump({"subject": name, "sessions": count, "prefill_s": seconds, "built": time.time()}, f)
    return path, seconds


def _vm_rss_mb() -> float:
    """This process's resident memory now (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def probe_main(raw: str) -> None:
    """The open1m probe, run in a fresh ``python -c``: imports first, then the timed open and RMWs."""
    spec = json.loads(raw)
    cls = SUBJECTS[spec["name"]]
    cls.preload()
    rng = random.Random(spec["seed"])
    keys = [f"chat:{rng.randrange(spec['sessions'])}" for _ in range(OPEN_MORE + 1)]
    if spec["wait"]:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.readline()
    began = time.perf_counter()
    subject = cls(spec["path"])
    subject.rmw(keys[0], bump)
    first = time.perf_counter()
    for key in keys[1:]:
        subject.rmw(key, bump)
    more = time.perf_counter()
    rss = _vm_rss_mb()
    subject.close()
    sys.stdout.write(json.dumps({"first_ms": (first - began) * 1e3, "more_ms": (more - first) * 1e3,
                                 "rss_mb": rss, "peak_rss_mb": rss_mb()}) + "\n")


def _probe_code() -> str:
    """The probe's ``python -c`` program: this checkout's benchmarks, and the very sessionkit this run
    imported (ahead of the working directory on ``sys.path``)."""
    import sessionkit

    paths = [os.path.dirname(os.path.dirname(os.path.abspath(sessionkit.__file__))), str(REPO)]
    return (f"import sys; sys.path[:0] = {paths!r}; "
            "from benchmarks.engine import probe_main; probe_main(sys.argv[1])")


def probes(name: str, path: str, sessions: int, seeds: list[int]) -> list[dict[str, Any]]:
    """One fresh process per seed, all opening the store at the same moment once every one has its imports."""
    code = _probe_code()
    procs = []
    for seed in seeds:
        spec = json.dumps({"name": name, "path": path, "sessions": sessions, "seed": seed, "wait": True})
        procs.append(subprocess.Popen([sys.executable, "-c", code, spec], cwd=str(REPO), text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE))
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"an open1m probe of {name} did not start: {line!r}")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        out = []
        for p in procs:
            stdout, _ = p.communicate(timeout=REPLY_TIMEOUT_S)
            if p.returncode:
                raise RuntimeError(f"an open1m probe of {name} exited with {p.returncode}")
            out.append(json.loads(stdout.strip().splitlines()[-1]))
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def open_store(pool: Pool, names: Sequence[str], settings: dict[str, Any], cache_dir: str) -> dict[str, Any]:
    """Prefill (or reuse) each subject's store, then time fresh processes opening it, one and four at once."""
    sessions = settings["open_sessions"]
    paths: dict[str, str] = {}
    out: dict[str, Any] = {}
    for name in names:
        paths[name], built = prefilled(pool, name, sessions, cache_dir)
        out[name] = {"sessions": sessions, "prefill_s": built, "store_mb": disk_bytes(paths[name]) / 1e6,
                     "first_ms": [], "more_ms": [], "rss_mb": [], "peak_rss_mb": [], "together_max_ms": [],
                     "together_ms": []}
    for rep in range(settings["open_repeat"]):
        for name in rotated(list(names), rep):
            row = out[name]
            alone = probes(name, paths[name], sessions, [rep])[0]
            row["first_ms"].append(alone["first_ms"])
            row["more_ms"].append(alone["more_ms"])
            row["rss_mb"].append(alone["rss_mb"])
            row["peak_rss_mb"].append(alone["peak_rss_mb"])
            together = probes(name, paths[name], sessions, [100 + rep * 10 + i for i in range(OPEN_AT_ONCE)])
            row["together_ms"].append([t["first_ms"] for t in together])
            row["together_max_ms"].append(max(t["first_ms"] for t in together))
    lead = names[0]
    for name, row in out.items():
        for field in ("first_ms", "more_ms", "rss_mb", "together_max_ms"):
            row["median_" + field] = statistics.median(row[field]) if row[field] else None
        if name != lead:  # this subject's time over sessionkit's: above 1, sessionkit is faster
            row["first_ratios"], row["first_ratio"] = paired(row["first_ms"], out[lead]["first_ms"])
            row["together_ratios"], row["together_ratio"] = paired(row["together_max_ms"],
                                                                   out[lead]["together_max_ms"])
    return out


# -- the targets ------------------------------------------------------------------------


def _pauses(row: dict[str, Any]) -> str:
    """The stall table's CPU-wait cell: the worst repetition's, and each one's in brackets."""
    got = row.get("pause_ms") or []
    if not got:
        return "–"
    return f"{max(got):.1f} [{', '.join(f'{m:.1f}' for m in got)}]"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The engine's targets, each with what this run measured."""
    found: list[dict[str, Any]] = []
    sc = results["scenarios"]
    rows = sc.get("random", {}).get("sessionkit")
    if rows:
        for n in RANDOM_PROCESSES[1:]:
            got = rows["by_processes"][str(n)]["median_scaling"]
            if got is not None:
                found.append({"target": f"sessionkit, random keys: {n} processes ≥ {TARGET_SCALING}× 1 process",
                              "measured": f"{got:.2f}×", "met": got >= TARGET_SCALING})
    row = sc.get("stall", {}).get("sessionkit")
    if row:
        worst = row["worst_max_ms"]
        measured = f"{worst:.1f} ms"
        if row.get("pause_ms"):  # the longest wait for a CPU the pause monitor saw in that repetition
            measured += f" (CPU wait {row['pause_ms'][row['reader_max_ms'].index(worst)]:.1f} ms)"
        found.append({"target": f"sessionkit, stall: no small read-modify-write over {TARGET_STALL_MS:g} ms",
                      "measured": measured, "met": worst <= TARGET_STALL_MS})
    lost = 0
    checked = False
    for key, scenario in sc.items():
        tables = scenario.values() if key == "durable" else [scenario]
        for table in tables:
            for r in table.values():
                if isinstance(r, dict) and "lost" in r:
                    checked = True
                    lost += r["lost"]
    if checked:
        found.append({"target": "no lost update (every subject, every scenario that checks)",
                      "measured": f"{lost:,} lost", "met": lost == 0})
    return found


# -- the report -------------------------------------------------------------------------


def environment(workdir: str) -> dict[str, Any]:
    """Python, platform, CPUs, the filesystem of the stores, and every library's version."""
    import sqlite3

    import sessionkit

    def version(dist: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(dist)
        except Exception:
            return "not installed"

    packages = {"sessionkit": getattr(sessionkit, "__version__", "?"), "msgpack": version("msgpack"),
                "lmdb": version("lmdb"), "diskcache": version("diskcache")}
    try:
        import lmdb

        packages["LMDB (C)"] = ".".join(map(str, lmdb.version()))
    except ImportError:
        pass
    packages["SQLite"] = sqlite3.sqlite_version
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "filesystem": filesystem_of(workdir),
        "sessionkit_source": os.path.dirname(os.path.abspath(sessionkit.__file__)),
        "packages": packages,
    }


def _num(value: float | None, spec: str = ",.0f") -> str:
    return "–" if value is None else format(value, spec)


def _ratio(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def _lost(row: dict[str, Any]) -> str:
    if row["lost"]:
        return f"**lost** {_fmt(row['lost'])} of {_fmt(row['expected'])}"
    return f"0 of {_fmt(row['expected'])}"


def _errors(row: dict[str, Any]) -> str:
    return _fmt(row["errors"]) + (f" ({row['first_error'][:60]})" if row["errors"] else "")


def keyed_table(rows: dict[str, Any], lead: str) -> list[str]:
    """The table of a fixed-key throughput scenario."""
    shares = any(row.get("least_shares") for row in rows.values())
    out = [f"| subject | ops/s | (min–max) | {lead} ÷ this |" + (" slowest process |" if shares else "")
           + " lost updates | errors |",
           "|---|---:|---:|---:|" + ("---:|" if shares else "") + "---:|---:|"]
    for name, row in rows.items():
        least = row.get("least_shares")
        cell = (f" {statistics.median(least):.2f} ({min(least):.2f}) |" if least else " – |") if shares else ""
        out.append(f"| {name} | {_fmt(row['median_ops_s'])} | {_fmt(row['min_ops_s'])}–{_fmt(row['max_ops_s'])} "
                   f"| {_ratio(row.get('lead_ratio'))} |{cell} {_lost(row)} | {_errors(row)} |")
    return out


def markdown(results: dict[str, Any]) -> str:
    """The report: one table per scenario, then the targets."""
    env, settings, sc = results["environment"], results["settings"], results["scenarios"]
    out = ["# sessionkit's disk engine beside LMDB, SQLite and diskcache", ""]
    out.append(f"Python {env['python']} ({env['implementation']}) on {env['platform']}, {env['cpus']} CPUs; "
               f"stores on {env['filesystem']}; sessionkit from `{env['sessionkit_source']}`.")
    out.append("Packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()) + ".")
    out.append(
        f"Throughput scenarios: a warm-up, then {settings['repeat']} repetitions of {settings['seconds']} s "
        "per subject, the subjects taking turns within each repetition (the order rotating). *ops/s* is the "
        "median repetition (slowest–fastest beside it): the operations of every process that ended "
        "between the common start and the common stop, over that time. *sessionkit ÷ this*: "
        "sessionkit's ops/s over this subject's in the same repetition, the median over repetitions "
        "(above 1: sessionkit is faster). *Lost updates*: increments acknowledged but missing from the "
        "counters at the end of each repetition (fresh keys each time). *Slowest process*: in scenarios "
        "of several processes, the operations of the process that made the fewest over an even split's "
        "(1.00: every process made as many; 0: one made none in the whole repetition), the median "
        "repetition (the worst in brackets). "
        f"Whole run: {results['seconds']:.0f} s" + (", `--quick`." if settings["quick"] else "."))
    out.append("")
    for key in ("1t1k", "4p1k", "4p4k", "handler"):
        if key in sc:
            out += [f"## {key}: {SCENARIOS[key]}", ""]
            if key == "handler":
                out += ["Store-wide locks (LMDB's write transaction, SQLite's `BEGIN IMMEDIATE`, diskcache's "
                        "`transact()`) are held across the 2 ms; `diskcache-lock` holds a per-key "
                        "`diskcache.Lock` instead.", ""]
            out += keyed_table(sc[key], "sessionkit") + [""]
    if "random" in sc:
        rows = sc["random"]
        lead = next(iter(rows))
        out += [f"## random: {SCENARIOS['random']}", ""]
        out.append(f"{RANDOM_SESSIONS:,} sessions prefilled; each process does read-modify-writes on random keys "
                   f"for {settings['random_seconds']} s; {settings['random_repeat']} repetitions. *Np/1p*: the "
                   "subject's ops/s with N processes over its own with 1, paired per repetition (median). The "
                   "machine has "
                   f"{env['cpus']} CPUs, so past {env['cpus']} processes more only queue for them.")
        out.append("")
        head = " | ".join(f"{n}p ops/s" for n in RANDOM_PROCESSES)
        scale = " | ".join(f"{n}p/1p" for n in RANDOM_PROCESSES[1:])
        out.append(f"| subject | {head} | {scale} | lost updates | errors |")
        out.append("|---|" + "---:|" * (2 * len(RANDOM_PROCESSES) - 1) + "---:|---:|")
        for name, row in rows.items():
            by = row["by_processes"]
            ops = " | ".join(_fmt(by[str(n)]["median_ops_s"]) for n in RANDOM_PROCESSES)
            sc_ = " | ".join(_ratio(by[str(n)]["median_scaling"]) for n in RANDOM_PROCESSES[1:])
            lost = f"**lost** {_fmt(row['lost'])}" if row["lost"] else "0"
            out.append(f"| {name} | {ops} | {sc_} | {lost} of {_fmt(row['acked'])} "
                       f"| {_errors(row)} |")
        out.append("")
        out.append(f"{lead} ÷ this, ops/s paired per repetition (median):")
        out.append("")
        out.append("| subject | " + " | ".join(f"{n}p" for n in RANDOM_PROCESSES) + " |")
        out.append("|---|" + "---:|" * len(RANDOM_PROCESSES))
        for name, row in rows.items():
            if name != lead:
                by = row["by_processes"]
                out.append(f"| {name} | " + " | ".join(_ratio(by[str(n)].get("lead_ratio"))
                                                       for n in RANDOM_PROCESSES) + " |")
        out.append("")
    if "latency" in sc:
        rows = sc["latency"]
        out += [f"## latency: {SCENARIOS['latency']}", ""]
        first = next(iter(rows.values()))
        out.append(f"{settings['latency_ops']:,} read-modify-writes per subject in {settings['latency_slices']} "
                   f"slices the subjects take in turn ({first['timed']:,} timed), each value "
                   f"{{\"count\": n, \"pad\": {PAD_BYTES} bytes}}. Percentiles over every operation, in µs; "
                   "*sessionkit ÷ this*: ops/s paired per slice.")
        out.append("")
        out.append("| subject | ops/s | sessionkit ÷ this | p50 µs | p99 µs | p99.9 µs | max µs | errors |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, row in rows.items():
            out.append(f"| {name} | {_fmt(row['median_ops_s'])} | {_ratio(row.get('lead_ratio'))} "
                       f"| {_num(row['p50_us'], ',.1f')} | {_num(row['p99_us'], ',.1f')} "
                       f"| {_num(row['p999_us'], ',.1f')} | {_num(row['max_us'], ',.0f')} | {_errors(row)} |")
        out.append("")
    if "stall" in sc:
        rows = sc["stall"]
        first = next(iter(rows.values()))
        out += [f"## stall: {SCENARIOS['stall']}", ""]
        out.append(f"A writer process rewrites {first['keys']:,} keys of {BLOB_BYTES // 1000} KB each "
                   f"(about {first['keys'] * BLOB_BYTES / 1e6:,.0f} MB live) at least {STALL_PASSES} times and "
                   f"for at least {settings['stall_seconds']:g} s, as fast as it can, while a reader process "
                   f"does read-modify-writes on {STALL_SMALL_KEYS:,} small keys until the writer is done; "
                   f"{settings['stall_repeat']} repetition(s). *Store MB*: the largest size of the store's "
                   "files the writer saw (sampled every 10 writes), and at the end. *Reader max*: its longest "
                   "operation, the worst repetition (each repetition's in brackets). *CPU wait*: the "
                   "longest that a process of its own, doing nothing but sleep 1 ms at a time, woke late in "
                   "the repetition (the worst, and each in brackets): the machine's scheduling delay then, "
                   "with the writer, the store's own processes and the kernel's writeback using the CPUs; "
                   "for comparison, not tied in time to the reader's longest operation.")
        out.append("")
        out.append("| subject | store MB peak / end | large writes | writer MB/s | writer max ms | reader ops/s "
                   "| reader p99 / p99.9 ms | reader max ms | CPU wait ms | errors |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, row in rows.items():
            med = statistics.median
            each = ", ".join(f"{m:.1f}" for m in row["reader_max_ms"])
            out.append(
                f"| {name} | {max(row['peak_mb']):,.0f} / {med(row['final_mb']):,.0f} "
                f"| {_fmt(med(row['writes']))} | {med(row['writer_mb_s']):,.0f} | {max(row['writer_max_ms']):,.1f} "
                f"| {_fmt(med(row['reader_ops_s']))} | {med(row['reader_p99_ms']):.2f} / "
                f"{row['worst_p999_ms']:.2f} | {row['worst_max_ms']:.1f} [{each}] | {_pauses(row)} | {_errors(row)} |")
        out.append("")
    if "open1m" in sc:
        rows = sc["open1m"]
        first = next(iter(rows.values()))
        out += [f"## open1m: a fresh process opens a store of {first['sessions']:,} sessions", ""]
        out.append(f"Each store prefilled once (*prefill s*: by this run, or cached) and kept in "
                   f"`{settings['cache_dir']}`. A fresh `python -c` process does its imports, then times opening "
                   f"the store and one read-modify-write of a random key (*open + 1st RMW*), then {OPEN_MORE} "
                   f"more (*{OPEN_MORE} RMWs*), and reports its VmRSS; then {OPEN_AT_ONCE} such processes open "
                   "it at the same moment (*slowest of 4*). Medians over "
                   f"{settings['open_repeat']} repetitions; *this ÷ sessionkit*: the subject's time over "
                   "sessionkit's, paired per repetition (above 1: sessionkit is faster). Warm page cache.")
        out.append("")
        out.append(f"| subject | prefill s | store MB | open + 1st RMW ms | this ÷ sessionkit | {OPEN_MORE} RMWs ms "
                   f"| RSS MB | slowest of {OPEN_AT_ONCE}: open + 1st RMW ms | this ÷ sessionkit |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, row in rows.items():
            built = "cached" if row["prefill_s"] is None else f"{row['prefill_s']:,.1f}"
            out.append(f"| {name} | {built} | {row['store_mb']:,.0f} | {_num(row['median_first_ms'], ',.1f')} "
                       f"| {_ratio(row.get('first_ratio'))} | {_num(row['median_more_ms'], ',.1f')} "
                       f"| {_num(row['median_rss_mb'], ',.1f')} | {_num(row['median_together_max_ms'], ',.1f')} "
                       f"| {_ratio(row.get('together_ratio'))} |")
        out.append("")
    if "durable" in sc:
        out += [f"## durable: {SCENARIOS['durable']}", ""]
        out.append("`sessionkit-durable` (`durable=True`: an `fdatasync` per write), `lmdb-sync` (`sync=True`), "
                   "`sqlite-full` (WAL, `synchronous=FULL`): an acknowledged write survives power loss.")
        out.append("")
        for key, rows in sc["durable"].items():
            lead = next(iter(rows))
            out += [f"### durable {key}: {SCENARIOS[key]}", ""]
            out += keyed_table(rows, lead) + [""]
    out += targets_section(results)
    return "\n".join(out)


# -- the run ----------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes, shorter runs: under 3 minutes")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", help="output folder (default: a new scratch folder under the temporary directory)")
    where.add_argument("--save", action="store_true", help="write to benchmarks/results/engine/, the committed run")
    p.add_argument("--scenarios", help=f"comma-separated, of {','.join(SCENARIOS)}; default all")
    p.add_argument("--cache-dir", help="where open1m keeps its prefilled stores (default: "
                                       "sessionkit-engine-cache under the temporary directory)")
    p.add_argument("--repeat", type=int, help="repetitions of the throughput scenarios")
    p.add_argument("--seconds", type=float, help="seconds per repetition of the throughput scenarios")
    args = p.parse_args(argv)
    if args.save:
        args.out = str(SAVED)
    elif args.out is None:
        args.out = tempfile.mkdtemp(prefix="sessionkit-engine-benchmarks-")
    if args.cache_dir is None:
        args.cache_dir = os.path.join(tempfile.gettempdir(), "sessionkit-engine-cache")
    return args


def run(settings: dict[str, Any], scenarios: list[str], cache_dir: str) -> dict[str, Any]:
    """Start the workers, measure ``scenarios``, stop them; everything measured, as one dict."""
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="sessionkit-engine-bench-")
    results: dict[str, Any] = {"settings": settings, "environment": environment(workdir), "scenarios": {}}
    sc = results["scenarios"]
    pool = Pool(max(RANDOM_PROCESSES))
    try:
        for scenario in scenarios:
            progress(f"{scenario}: {SCENARIOS[scenario]} · {time.monotonic() - started:.0f} s")
            if scenario == "1t1k":
                sc[scenario] = keyed(pool, FAST, workdir, settings, scenario, 1, 1, True)
            elif scenario == "4p1k":
                sc[scenario] = keyed(pool, FAST, workdir, settings, scenario, PROCESSES, 1, True)
            elif scenario == "4p4k":
                sc[scenario] = keyed(pool, FAST, workdir, settings, scenario, PROCESSES, 1, False)
            elif scenario == "handler":
                sc[scenario] = keyed(pool, HANDLER, workdir, settings, scenario, PROCESSES, THREADS, False,
                                     change="handle", seconds=settings["handler_seconds"])
            elif scenario == "random":
                sc[scenario] = random_keys(pool, FAST, workdir, settings)
            elif scenario == "latency":
                sc[scenario] = latency(pool, FAST, workdir, settings)
            elif scenario == "stall":
                sc[scenario] = stall(pool, FAST, workdir, settings)
            elif scenario == "open1m":
                sc[scenario] = open_store(pool, FAST, settings, cache_dir)
            elif scenario == "durable":
                sc[scenario] = {
                    "1t1k": keyed(pool, DURABLE, workdir, settings, "d1t1k", 1, 1, True),
                    "4p1k": keyed(pool, DURABLE, workdir, settings, "d4p1k", PROCESSES, 1, True),
                    "4p4k": keyed(pool, DURABLE, workdir, settings, "d4p4k", PROCESSES, 1, False),
                    "handler": keyed(pool, DURABLE, workdir, settings, "dhandler", PROCESSES, THREADS, False,
                                     change="handle", seconds=settings["handler_seconds"]),
                }
    finally:
        pool.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - started, 1)
    results["targets"] = targets(results)
    progress(f"done in {results['seconds']:.0f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the report, and write engine.md and engine.json."""
    args = parse(argv)
    missing = [m for m in ("lmdb", "diskcache") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"needs {', '.join(missing)}: python -m pip install -e '.[bench]'")
    settings = dict(QUICK if args.quick else FULL)
    if args.repeat:
        settings["repeat"] = args.repeat
    if args.seconds:
        settings["seconds"] = args.seconds
    settings.update(quick=args.quick, processes=PROCESSES, threads=THREADS, cache_dir=args.cache_dir)
    if args.scenarios:
        scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        unknown = [s for s in scenarios if s not in SCENARIOS]
        if unknown:
            raise SystemExit(f"unknown scenarios: {', '.join(unknown)} (known: {', '.join(SCENARIOS)})")
    else:
        scenarios = list(SCENARIOS)
    results = run(settings, scenarios, args.cache_dir)
    text = markdown(results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "engine.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "engine.json"), "w") as f:
        json.dump(results, f, indent=1, default=_jsonable)
        f.write("\n")
    print(text)
    print(f"(engine.md and engine.json are in {args.out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
