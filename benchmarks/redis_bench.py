"""sessionkit's RedisStorage against redis-py's own Lock and a bare GET/SET.

    python -m benchmarks.redis_bench [--quick] [--out DIR | --save]
                                     [--scenarios a,b,c,d,handover]
                                     [--ops N] [--repeat R] [--seconds S] [--handovers N]

Starts a redis-server of its own on a free loopback port (persistence off),
times the job "increment ``session["count"]`` for key K" done three ways,
stops the server, prints a markdown table and writes ``results.md`` and
``results.json`` to the output folder: a scratch folder under the system's
temporary directory unless ``--out`` names one, or ``--save`` asks for the
committed ``benchmarks/results/redis/``.

Subjects
    ``sessionkit-redis``: ``with sessions.open(k) as s: s["count"] = ...``
    on ``Sessions(RedisStorage(...), initial=dict)``.
    ``redis-py-lock``: ``with client.lock(...)``: GET, then SET of the
    msgpack-encoded dict, under redis-py's ``Lock`` with its defaults (a
    waiter polls every 0.1 s).
    ``plain-get-set``: GET, then SET, no lock (not atomic: its lost updates
    are counted).

Scenarios
    (a) 1 thread, 1 key; (b) 8 threads, same key; (c) 8 threads, 8 keys;
    (d) 4 spawned processes, same key; and the hand-over latency of the two
    locking subjects with 8 threads on one key.

Within each repetition the subjects take turns (their order rotating), and
every ratio divides by redis-py-lock's figure from the same repetition.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import msgpack

from tests.redis_servers import RedisServer  # the tests' own server runner

THREADS = 8
PROCESSES = 4
BASELINE = "redis-py-lock"
SUBJECTS = ("sessionkit-redis", "redis-py-lock", "plain-get-set")
LOCKING = ("sessionkit-redis", "redis-py-lock")  # the subjects with a lock to hand over
SCENARIOS = {
    "a": "1 thread, 1 key",
    "b": "8 threads, same key",
    "c": "8 threads, 8 keys",
    "d": "4 processes, same key",
    "handover": "lock hand-over, 8 threads, 1 key",
}
THROUGHPUT = ("a", "b", "c", "d")
SLICED = ("a", "c")  # no thread waits for another: the subjects take turns in slices of a repetition
SLICE_OPS = 500

# ops: read-modify-writes per repetition (shared by the threads or processes);
# seconds: a repetition stops starting new operations after this;
# handovers: lock holds per repetition of the hand-over measurement (or seconds).
QUICK = {"ops": 400, "repeat": 3, "seconds": 0.5, "handovers": 120}
FULL = {"ops": 5000, "repeat": 7, "seconds": 3.0, "handovers": 500}

SAVED = Path(__file__).resolve().parent / "results" / "redis"  # the committed run (--save)

TARGET_RATIO = 1.5  # sessionkit-redis ops/s over redis-py-lock's
TARGET_ROUND_TRIPS = 2.0  # per uncontended read-modify-write
TARGET_HANDOVER_MS = 1.0  # median hand-over


# -- the server -------------------------------------------------------------------


# -- counting round trips ------------------------------------------------------------


def counting_pool(port: int) -> tuple[Any, Callable[[], int]]:
    """A redis-py connection pool whose connections count the replies they read.

    Returns the pool and a function giving the replies read so far by all of
    its connections: one reply per round trip.  Each connection counts its
    own, so threads never race on one counter; read the total while the
    pool's users are idle.
    """
    import redis

    made: list[Any] = []

    class CountingConnection(redis.Connection):
        """A real connection that counts the replies it reads."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.replies = 0
            made.append(self)

        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            self.replies += 1
            return super().read_response(*args, **kwargs)

    pool = redis.ConnectionPool(connection_class=CountingConnection, host="127.0.0.1", port=port)

    def replies() -> int:
        return sum(c.replies for c in list(made))

    return pool, replies


# -- the subjects ------------------------------------------------------------------


def _bump(raw: bytes | None) -> bytes:
    """The stored msgpack dict with its ``count`` incremented."""
    value = msgpack.unpackb(raw) if raw is not None else {}
    value["count"] = value.get("count", 0) + 1
    return msgpack.packb(value)  # type: ignore[no-any-return]


class Subject:
    """One way of incrementing a counter in Redis, with a client of its own."""

    name = ""

    def __init__(self, port: int) -> None:
        import redis

        self.pool, self.replies = counting_pool(port)
        self.client: Any = redis.Redis(connection_pool=self.pool)
        self.prefix = f"bench:{self.name}:"

    def increment(self, key: str) -> None:
        """One read-modify-write of ``key``'s counter."""
        raise NotImplementedError

    def traced(self, key: str, entered: Callable[[], None]) -> float:
        """Increment ``key`` calling ``entered()`` first thing in the locked block;
        returns ``time.perf_counter()`` taken just before the block is left."""
        raise NotImplementedError

    def read_count(self, key: str) -> int:
        """The counter of ``key`` now (0 when absent)."""
        raw = self.client.get(self.prefix + key)
        return 0 if raw is None else int(msgpack.unpackb(raw).get("count", 0))

    def close(self) -> None:
        """Let go of the client's connections."""
        self.client.close()
        self.pool.disconnect()


class SessionkitRedis(Subject):
    """``Sessions(RedisStorage(...), initial=dict)``: lock and read, then write and release."""

    name = "sessionkit-redis"

    def __init__(self, port: int) -> None:
        super().__init__(port)
        from sessionkit import RedisStorage, Sessions

        self.storage = RedisStorage(self.client, prefix=self.prefix)
        self.sessions = Sessions(self.storage, initial=dict)

    def increment(self, key: str) -> None:
        with self.sessions.open(key) as s:
            s["count"] = s.get("count", 0) + 1

    def traced(self, key: str, entered: Callable[[], None]) -> float:
        with self.sessions.open(key) as s:
            entered()
            s["count"] = s.get("count", 0) + 1
            return time.perf_counter()

    def read_count(self, key: str) -> int:
        value = self.storage.read(key)
        return 0 if value is None else int(value.get("count", 0))

    def close(self) -> None:
        self.storage.close()
        super().close()


class RedisPyLock(Subject):
    """redis-py's ``Lock`` (defaults: a waiter polls every 0.1 s) around GET and SET."""

    name = "redis-py-lock"

    def increment(self, key: str) -> None:
        name = self.prefix + key
        with self.client.lock(f"lock:{name}", timeout=10, blocking_timeout=None):
            self.client.set(name, _bump(self.client.get(name)))

    def traced(self, key: str, entered: Callable[[], None]) -> float:
        name = self.prefix + key
        with self.client.lock(f"lock:{name}", timeout=10, blocking_timeout=None):
            entered()
            self.client.set(name, _bump(self.client.get(name)))
            return time.perf_counter()


class PlainGetSet(Subject):
    """GET, then SET, no lock: two round trips, and updates lost under concurrency."""

    name = "plain-get-set"

    def increment(self, key: str) -> None:
        name = self.prefix + key
        self.client.set(name, _bump(self.client.get(name)))


CLASSES: dict[str, type[Subject]] = {cls.name: cls for cls in (SessionkitRedis, RedisPyLock, PlainGetSet)}


def rotated(names: Sequence[str], rep: int) -> list[str]:
    """``names`` rotated by ``rep``: each subject goes first in turn."""
    k = rep % len(names) if names else 0
    return [*names[k:], *names[:k]]


# -- throughput: threads -------------------------------------------------------------


class Tally:
    """Operations done, errors seen and the time each operation took, across threads."""

    def __init__(self) -> None:
        self.ops = 0
        self.errors = 0
        self.first_error = ""
        self.latencies: list[float] = []
        self.lock = threading.Lock()

    def add(self, ops: int, errors: int, first: str, latencies: Sequence[float] = ()) -> None:
        """Add one thread's figures."""
        with self.lock:
            self.ops += ops
            self.errors += errors
            self.first_error = self.first_error or first
            self.latencies.extend(latencies)


class Budget:
    """The operations of one repetition, shared by its threads like a queue of updates they drain.

    A thread that keeps getting the lock keeps working, as a worker pulling
    updates from a queue would; the repetition ends when the budget is spent.
    """

    def __init__(self, ops: int) -> None:
        self.ops = ops
        self._next = itertools.count().__next__  # atomic under the GIL

    def take(self) -> bool:
        """Whether one more operation is allowed."""
        return self._next() < self.ops


def loop(fn: Callable[[str], None], key: str, take: Callable[[], bool], deadline: float,
         tally: Tally) -> None:
    """Run ``fn(key)`` while ``take()`` allows it and ``deadline`` has not passed; add to ``tally``."""
    done = errors = 0
    first = ""
    latencies: list[float] = []
    while take():
        began = time.perf_counter()
        try:
            fn(key)
            done += 1
        except Exception as exc:  # counted and shown, never hidden
            errors += 1
            first = first or f"{type(exc).__name__}: {exc}"[:200]
        ended = time.perf_counter()
        latencies.append(ended - began)
        if ended > deadline:
            break
    tally.add(done, errors, first, latencies)


def timed_threads(fn: Callable[[str], None], keys: list[str], ops: int,
                  seconds: float) -> tuple[float, Tally]:
    """One thread per entry of ``keys``, sharing ``ops``; wall time from a common start to the last join."""
    tally = Tally()
    budget = Budget(ops)
    barrier = threading.Barrier(len(keys) + 1)
    deadline = [0.0]

    def work(key: str) -> None:
        barrier.wait()
        loop(fn, key, budget.take, deadline[0], tally)

    threads = [threading.Thread(target=work, args=(key,)) for key in keys]
    for t in threads:
        t.start()
    start = time.perf_counter()
    deadline[0] = start + seconds
    barrier.wait()
    for t in threads:
        t.join()
    return time.perf_counter() - start, tally


def keys_for(scenario: str, rep: str) -> list[str]:
    """The key each thread of ``scenario`` increments in repetition ``rep`` (fresh per repetition)."""
    if scenario == "a":
        return [f"{scenario}:{rep}:chat:1"]
    if scenario == "b":
        return [f"{scenario}:{rep}:chat:1"] * THREADS
    return [f"{scenario}:{rep}:chat:{i}" for i in range(THREADS)]


def new_record() -> dict[str, Any]:
    """An empty per-subject record of one throughput scenario."""
    return {"ops_s": [], "ops": [], "seconds": [], "round_trips": [], "p50_ms": [], "p99_ms": [],
            "latencies_ms": [], "expected": 0, "counted": 0, "lost": 0, "errors": 0, "first_error": ""}


def run_threads_scenario(scenario: str, subjects: dict[str, Subject],
                         settings: dict[str, Any]) -> dict[str, Any]:
    """Scenarios (a)-(c): every repetition runs each subject in turn, in threads of this process.

    Where no thread waits for another (a, c), a repetition is cut into slices
    of about ``SLICE_OPS`` operations and the subjects take turns slice by
    slice, so that a slow spell of the machine falls on all of them alike.
    Where threads wait for a lock (b), each subject runs its repetition in
    one go: a slice's end would add a lock's last wait to every slice.
    """
    ops, seconds = settings["ops"], settings["seconds"]
    slices = max(math.ceil(ops / SLICE_OPS), 1) if scenario in SLICED else 1
    records = {name: new_record() for name in subjects}
    for subject in subjects.values():  # warm-up: connections made, scripts loaded
        timed_threads(subject.increment, keys_for(scenario, "w"), max(ops // 10, THREADS), seconds / 4)
    for rep in range(settings["repeat"]):
        keys = keys_for(scenario, str(rep))
        tallies = {name: Tally() for name in subjects}
        elapsed = dict.fromkeys(subjects, 0.0)
        replies = dict.fromkeys(subjects, 0)
        for piece in range(slices):
            share = ops // slices + (1 if piece < ops % slices else 0)
            for name in rotated(list(subjects), rep + piece):
                subject = subjects[name]
                before = subject.replies()
                took, tally = timed_threads(subject.increment, keys, share, seconds / slices)
                replies[name] += subject.replies() - before
                elapsed[name] += took
                tallies[name].add(tally.ops, tally.errors, tally.first_error, tally.latencies)
        for name, subject in subjects.items():
            counted = sum(subject.read_count(k) for k in set(keys))
            add_rep(records[name], tallies[name], elapsed[name], replies[name], counted)
    return records


def add_rep(rec: dict[str, Any], tally: Tally, elapsed: float, replies: int, counted: int) -> None:
    """Record one repetition of one subject."""
    ops = tally.ops
    rec["ops"].append(ops)
    rec["seconds"].append(elapsed)
    rec["ops_s"].append(ops / elapsed if elapsed > 0 else 0.0)
    rec["round_trips"].append(replies / ops if ops else 0.0)
    latencies = [t * 1e3 for t in tally.latencies]
    rec["p50_ms"].append(percentile(latencies, 50))
    rec["p99_ms"].append(percentile(latencies, 99))
    rec["latencies_ms"].extend(latencies)
    rec["expected"] += ops
    rec["counted"] += counted
    rec["lost"] = rec["expected"] - rec["counted"]
    rec["errors"] += tally.errors
    rec["first_error"] = rec["first_error"] or tally.first_error


# -- throughput: processes -----------------------------------------------------------


def _take_shared(spent: Any, ops: int) -> bool:
    """One more operation from the budget the (d) workers share, if any is left."""
    with spent.get_lock():
        if spent.value >= ops:
            return False
        spent.value += 1
        return True


def _process_worker(port: int, names: list[str], ops: int, seconds: float, repeat: int,
                    spent: Any, barrier: Any, results: Any) -> None:
    """One of the (d) workers: every round, each subject in turn, one thread, the shared key."""
    subjects = {name: CLASSES[name](port) for name in names}

    def take() -> bool:
        return _take_shared(spent, ops)

    try:
        for rep in range(-1, repeat):  # -1: the warm-up round
            label = "w" if rep < 0 else str(rep)
            for name in rotated(names, max(rep, 0)):
                subject = subjects[name]
                tally = Tally()
                barrier.wait()
                before = subject.replies()
                loop(subject.increment, f"d:{label}:chat:1", take, time.perf_counter() + seconds, tally)
                replies = subject.replies() - before
                results.put((rep, name, tally.ops, tally.errors, tally.first_error, replies, tally.latencies))
                barrier.wait()
    finally:
        for subject in subjects.values():
            subject.close()


def run_processes_scenario(port: int, subjects: dict[str, Subject],
                           settings: dict[str, Any]) -> dict[str, Any]:
    """Scenario (d): four spawned processes, one thread each, all on one key; wall time between barriers."""
    names = list(subjects)
    ops, seconds, repeat = settings["ops"], settings["seconds"], settings["repeat"]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES + 1)
    results = ctx.Queue()
    spent = ctx.Value("q", 0)
    args = (port, names, ops, seconds, repeat, spent, barrier, results)
    procs = [ctx.Process(target=_process_worker, args=args) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    records = {name: new_record() for name in names}
    try:
        for rep in range(-1, repeat):
            label = "w" if rep < 0 else str(rep)
            for name in rotated(names, max(rep, 0)):
                with spent.get_lock():
                    spent.value = 0 if rep >= 0 else max(ops - max(ops // 10, PROCESSES), 0)
                barrier.wait(120)
                start = time.perf_counter()
                barrier.wait(600)
                elapsed = time.perf_counter() - start
                got = [results.get(timeout=60) for _ in procs]
                if rep < 0:
                    continue
                tally = Tally()
                for g in got:
                    tally.add(g[2], g[3], g[4], g[6])
                replies = sum(g[5] for g in got)
                counted = subjects[name].read_count(f"d:{label}:chat:1")
                add_rep(records[name], tally, elapsed, replies, counted)
    finally:
        for p in procs:
            p.join(60)
            if p.exitcode is None:
                p.kill()
                p.join()
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise RuntimeError(f"a worker of (d) exited with {bad[0]}")
    return records


# -- hand-over latency ---------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``, nearest rank; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(math.ceil(q / 100 * len(ordered)) - 1, 0)
    return ordered[min(rank, len(ordered) - 1)]


def run_handover(subject: Subject, key: str, holds: int, seconds: float) -> dict[str, Any]:
    """Eight threads take turns holding one key's lock; the gap at each hand-over.

    Each hold records ``perf_counter()`` right after its block is entered and
    just before it is left.  A thread that has just let go waits (on a
    condition in this process, not on Redis) until another thread has taken
    the lock before it asks again, so every hold is a hand-over to a thread
    that was already waiting.  The gap is from the previous holder's
    "just before leaving" (its release's round trip included) to the next
    holder's "just entered".
    """
    cond = threading.Condition()
    state = {"count": 0, "stop": False, "last": 0}
    records: list[tuple[int, float, float]] = []  # (hold number, entered, leaving)
    tally = Tally()
    barrier = threading.Barrier(THREADS + 1)
    deadline = [0.0]

    def work() -> None:
        mine = [0, 0.0]  # this thread's current hold: its number, and when it was entered

        def entered() -> None:
            mine[1] = time.perf_counter()
            with cond:
                state["count"] += 1
                mine[0] = state["count"]
                cond.notify_all()

        def taken_by_another() -> bool:
            return state["count"] > mine[0] or bool(state["stop"])

        barrier.wait()
        while True:
            mine[:] = [0, 0.0]
            try:
                leaving = subject.traced(key, entered)
            except Exception as exc:  # counted and shown
                tally.add(0, 1, f"{type(exc).__name__}: {exc}"[:200])
            else:
                tally.add(1, 0, "")
                records.append((int(mine[0]), float(mine[1]), leaving))
            with cond:
                if not state["stop"] and (state["count"] >= holds or time.perf_counter() > deadline[0]):
                    state["stop"] = True
                    state["last"] = state["count"]
                    cond.notify_all()
                cond.wait_for(taken_by_another)
                if state["stop"]:
                    return

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    barrier.wait()
    for t in threads:
        t.join()
    # holds taken after the stop (by threads already queued, with ever fewer waiters) are left out
    timed = sorted(r for r in records if r[0] <= state["last"])
    gaps: list[float] = []
    overlaps = 0
    for prev, nxt in zip(timed, timed[1:]):
        if nxt[0] != prev[0] + 1:
            continue  # a hold in between raised: no pair
        if nxt[1] < prev[2]:
            overlaps += 1  # two holders at once: the lock would be broken
        gaps.append(nxt[1] - prev[2])
    span = timed[-1][1] - timed[0][1] if len(timed) > 1 else 0.0
    return {
        "gaps_ms": [g * 1e3 for g in gaps],
        "holds": len(records),
        "handovers_per_s": len(gaps) / span if span > 0 else 0.0,
        "counted": subject.read_count(key),
        "overlaps": overlaps,
        "errors": tally.errors,
        "first_error": tally.first_error,
    }


def run_handovers(subjects: dict[str, Subject], settings: dict[str, Any]) -> dict[str, Any]:
    """The hand-over measurement, repeated, the locking subjects taking turns."""
    names = [n for n in subjects if n in LOCKING]
    out: dict[str, Any] = {n: {"gaps_ms": [], "p50_ms": [], "p99_ms": [], "handovers_per_s": [], "holds": 0,
                               "lost": 0, "overlaps": 0, "errors": 0, "first_error": ""}
                           for n in names}
    for name in names:  # warm-up
        run_handover(subjects[name], "h:w:chat:1", max(settings["handovers"] // 10, THREADS * 2),
                     settings["seconds"] / 4)
    for rep in range(settings["repeat"]):
        for name in rotated(names, rep):
            got = run_handover(subjects[name], f"h:{rep}:chat:1", settings["handovers"], settings["seconds"])
            rec = out[name]
            rec["gaps_ms"].extend(got["gaps_ms"])
            rec["p50_ms"].append(percentile(got["gaps_ms"], 50))
            rec["p99_ms"].append(percentile(got["gaps_ms"], 99))
            rec["handovers_per_s"].append(got["handovers_per_s"])
            rec["holds"] += got["holds"]
            rec["lost"] += got["holds"] - got["counted"]
            rec["overlaps"] += got["overlaps"]
            rec["errors"] += got["errors"]
            rec["first_error"] = rec["first_error"] or got["first_error"]
    return out


# -- summaries, targets, report ------------------------------------------------------


def summarise(records: dict[str, Any]) -> dict[str, Any]:
    """A scenario's medians, and each subject's ratios to redis-py-lock, paired per repetition."""
    base = records.get(BASELINE)
    out: dict[str, Any] = {}
    for name, rec in records.items():
        row = dict(rec)
        latencies = row.pop("latencies_ms")  # every operation's: pooled, then left out of the JSON
        row["pooled_p50_ms"] = percentile(latencies, 50)
        row["pooled_p99_ms"] = percentile(latencies, 99)
        row["max_ms"] = max(latencies, default=None)
        row["median_ops_s"] = statistics.median(rec["ops_s"]) if rec["ops_s"] else 0.0
        row["min_ops_s"] = min(rec["ops_s"], default=0.0)
        row["max_ops_s"] = max(rec["ops_s"], default=0.0)
        row["median_round_trips"] = statistics.median(rec["round_trips"]) if rec["round_trips"] else 0.0
        if base is not None and base["ops_s"]:
            pairs = zip(rec["ops_s"], base["ops_s"])
            row["ratios"] = [mine / theirs if theirs else 0.0 for mine, theirs in pairs]
            row["median_ratio"] = statistics.median(row["ratios"])
        out[name] = row
    return out


def summarise_handover(records: dict[str, Any]) -> dict[str, Any]:
    """Pooled p50/p99 of the gaps, and the ratio of each repetition's p50 to redis-py-lock's."""
    base = records.get(BASELINE)
    out: dict[str, Any] = {}
    for name, rec in records.items():
        row = dict(rec)
        gaps = row.pop("gaps_ms")  # every hand-over's: pooled, then left out of the JSON
        row["handovers"] = len(gaps)
        row["pooled_p50_ms"] = percentile(gaps, 50)
        row["pooled_p99_ms"] = percentile(gaps, 99)
        row["max_ms"] = max(gaps, default=None)
        rates = rec["handovers_per_s"]
        row["median_handovers_per_s"] = statistics.median(rates) if rates else 0.0
        if base is not None and base["p50_ms"]:
            ratios = [mine / theirs for mine, theirs in zip(rec["p50_ms"], base["p50_ms"])
                      if mine is not None and theirs]
            row["p50_ratios"] = ratios
            row["median_p50_ratio"] = statistics.median(ratios) if ratios else None
        out[name] = row
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The project's Redis targets, each with what this run measured."""
    out: list[dict[str, Any]] = []
    sk = "sessionkit-redis"
    for scenario in THROUGHPUT:
        row = results["scenarios"].get(scenario, {}).get(sk)
        if row and "median_ratio" in row:
            ratio = row["median_ratio"]
            out.append({"target": f"sessionkit-redis ops/s ≥ {TARGET_RATIO}× redis-py-lock, ({scenario})",
                        "measured": f"{ratio:.3f}×", "met": ratio >= TARGET_RATIO})
    locked_lost = 0
    seen = False
    for scenario in THROUGHPUT:
        for name in LOCKING:
            row = results["scenarios"].get(scenario, {}).get(name)
            if row:
                seen = True
                locked_lost += row["lost"]
    for name in LOCKING:
        row = results.get("handover", {}).get(name)
        if row:
            seen = True
            locked_lost += row["lost"]
    if seen:
        out.append({"target": "no lost update (sessionkit-redis, redis-py-lock; every scenario)",
                    "measured": f"{locked_lost:,} lost", "met": locked_lost == 0})
    for scenario in ("a", "c"):
        row = results["scenarios"].get(scenario, {}).get(sk)
        if row:
            rt = row["median_round_trips"]
            out.append({"target": f"{TARGET_ROUND_TRIPS:.0f} round trips per uncontended RMW, "
                                  f"sessionkit-redis ({scenario})",
                        "measured": f"{rt:.2f}", "met": abs(rt - TARGET_ROUND_TRIPS) < 0.005})
    row = results.get("handover", {}).get(sk)
    if row and row["pooled_p50_ms"] is not None:
        p50 = row["pooled_p50_ms"]
        out.append({"target": f"hand-over median < {TARGET_HANDOVER_MS:g} ms, sessionkit-redis",
                    "measured": f"{p50:.3f} ms", "met": p50 < TARGET_HANDOVER_MS})
    return out


def environment(port: int, binary: str) -> dict[str, Any]:
    """Python, platform, CPUs, and the versions of redis-server, redis-py, msgpack and sessionkit."""
    import redis

    import sessionkit

    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        server = client.info("server")
    finally:
        client.close()

    def version(dist: str, fallback: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(dist)
        except Exception:
            return fallback

    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "redis_server": str(server.get("redis_version", "?")),
        "redis_server_binary": binary,
        "redis_server_port": port,
        "packages": {
            "sessionkit": version("sessionkit", getattr(sessionkit, "__version__", "?")),
            "redis": version("redis", getattr(redis, "__version__", "?")),
            "msgpack": version("msgpack", "?"),
        },
    }


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


def _ms(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _errors(row: dict[str, Any]) -> str:
    return _fmt(row["errors"]) + (f" ({row['first_error'][:60]})" if row["errors"] else "")


def markdown(results: dict[str, Any]) -> str:
    """The report: one table per scenario, the hand-over table, and the targets."""
    env, settings = results["environment"], results["settings"]
    out = ["# sessionkit on Redis", ""]
    out.append(
        f"Python {env['python']} ({env['implementation']}) on {env['platform']}, {env['cpus']} CPUs; "
        f"redis-server {env['redis_server']} on loopback, started by the run, persistence off "
        "(`--save \"\" --appendonly no`)."
    )
    out.append("Packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()) + ".")
    out.append(
        f"Each scenario: a warm-up, then {settings['repeat']} repetitions of {settings['ops']:,} "
        f"read-modify-writes (fewer if {settings['seconds']} s ran out), shared by the threads or "
        "processes like a queue of updates they drain, the subjects taking turns within each "
        f"repetition (in (a) and (c), where nobody waits for a lock, slice by slice of {SLICE_OPS} "
        "operations). *ops/s* is the median repetition (slowest–fastest beside it); *× redis-py-lock* is "
        "the median over repetitions of ops/s divided by redis-py-lock's in the same repetition. "
        "*Lost updates*: increments acknowledged but missing from the counter at the end of each "
        "repetition (the subject's own key, fresh each time). *Round trips / RMW*: replies read by the "
        "subject's connections per increment (median repetition); under contention they include a "
        "waiter's retries. *RMW latency*: how long one increment took, waiting for the lock included, "
        "over every increment of every repetition (p50, p99 and the longest)."
    )
    out.append("")
    for scenario in THROUGHPUT:
        rows = results["scenarios"].get(scenario)
        if not rows:
            continue
        out.append(f"## ({scenario}) {SCENARIOS[scenario]}")
        out.append("")
        out.append("| subject | ops/s | (min–max) | × redis-py-lock | lost updates | errors "
                   "| round trips / RMW | RMW latency p50 / p99 / max ms |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name in SUBJECTS:
            row = rows.get(name)
            if row is None:
                continue
            ratio = f"{row['median_ratio']:.2f}" if "median_ratio" in row else "–"
            out.append(
                f"| {name} | {_fmt(row['median_ops_s'])} | {_fmt(row['min_ops_s'])}–{_fmt(row['max_ops_s'])} "
                f"| {ratio} | {_fmt(row['lost'])} of {_fmt(row['expected'])} | {_errors(row)} "
                f"| {row['median_round_trips']:.2f} "
                f"| {_ms(row['pooled_p50_ms'])} / {_ms(row['pooled_p99_ms'])} / {_ms(row['max_ms'], '.1f')} |"
            )
        out.append("")
    handover = results.get("handover")
    if handover:
        out.append(f"## Hand-over: {THREADS} threads, 1 key")
        out.append("")
        out.append(
            "Eight threads take turns on one key's lock; a thread that has just let go waits (in the "
            "process, not on Redis) until another thread has taken the lock before it asks again, so "
            "every hold is a hand-over to a thread that was already waiting. The gap runs from just "
            "before the holder leaves its block (the release's round trip included) to just after the "
            "next holder has entered its block; p50 and p99 are over every hand-over of every "
            f"repetition (up to {settings['handovers']:,} holds or {settings['seconds']} s each). "
            "*p50 × redis-py-lock*: the median over repetitions of the repetition's p50 over "
            "redis-py-lock's. *Overlaps*: a holder entering before the previous one left (must be 0)."
        )
        out.append("")
        out.append("| subject | hand-overs | p50 ms | p99 ms | max ms | p50 × redis-py-lock | hand-overs/s "
                   "| lost updates | overlaps | errors |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in LOCKING:
            row = handover.get(name)
            if row is None:
                continue
            ratio = _ms(row.get("median_p50_ratio"), ".3g")
            out.append(
                f"| {name} | {_fmt(row['handovers'])} | {_ms(row['pooled_p50_ms'])} "
                f"| {_ms(row['pooled_p99_ms'])} "
                f"| {_ms(row['max_ms'])} | {ratio} | {_fmt(row['median_handovers_per_s'])} "
                f"| {_fmt(row['lost'])} of {_fmt(row['holds'])} | {row['overlaps']} | {_errors(row)} |"
            )
        out.append("")
    out += targets_section(results)
    return "\n".join(out)


def targets_section(results: dict[str, Any]) -> list[str]:
    """The report's "Targets" table: each target, what was measured, and whether it was met."""
    found = results.get("targets") or []
    if not found:
        return []
    out = ["## Targets", "", "| target | measured | met |", "|---|---:|---|"]
    for t in found:
        out.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    return out + [""]


# -- the run -------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.redis_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer operations and repetitions: under a minute")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", help="output folder (default: a new scratch folder under $TMPDIR)")
    where.add_argument("--save", action="store_true",
                       help="write to benchmarks/results/redis/, the committed run")
    p.add_argument("--scenarios", help=f"comma-separated, of {','.join(SCENARIOS)}; default all")
    p.add_argument("--ops", type=int, help="read-modify-writes per repetition")
    p.add_argument("--repeat", type=int, help="repetitions")
    p.add_argument("--seconds", type=float, help="time cap per repetition")
    p.add_argument("--handovers", type=int, help="lock holds per repetition of the hand-over measurement")
    p.add_argument("--redis-server", help="the redis-server binary (default: the one on PATH)")
    args = p.parse_args(argv)
    if args.save:
        args.out = str(SAVED)
    elif args.out is None:
        args.out = tempfile.mkdtemp(prefix="sessionkit-redis-benchmarks-")
    return args


def progress(text: str) -> None:
    """A progress line on stderr."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run(settings: dict[str, Any], scenarios: list[str], binary: str | None) -> dict[str, Any]:
    """Start a server, measure ``scenarios``, stop the server; everything measured, as one dict."""
    results: dict[str, Any] = {"settings": settings, "scenarios": {}}
    started = time.monotonic()
    directory = Path(tempfile.mkdtemp(prefix="sessionkit-redis-bench-"))
    server = RedisServer(directory, binary=binary or shutil.which("redis-server") or "redis-server")
    try:
        results["environment"] = environment(server.port, server.binary)
        subjects = {name: CLASSES[name](server.port) for name in SUBJECTS}
        try:
            for scenario in scenarios:
                progress(f"({scenario}) {SCENARIOS[scenario]} · {time.monotonic() - started:.0f} s")
                if scenario == "handover":
                    results["handover"] = summarise_handover(run_handovers(subjects, settings))
                elif scenario == "d":
                    records = run_processes_scenario(server.port, subjects, settings)
                    results["scenarios"][scenario] = summarise(records)
                else:
                    records = run_threads_scenario(scenario, subjects, settings)
                    results["scenarios"][scenario] = summarise(records)
        finally:
            for subject in subjects.values():
                subject.close()
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - started, 1)
    results["targets"] = targets(results)
    progress(f"done in {results['seconds']:.0f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the report, and write results.md and results.json."""
    args = parse(argv)
    try:
        import redis  # noqa: F401
    except ImportError:
        raise SystemExit("needs redis-py: python -m pip install 'sessionkit[redis]'") from None
    binary = args.redis_server or shutil.which("redis-server")
    if not binary:
        raise SystemExit("needs redis-server: apt-get install redis-server")
    base = dict(QUICK if args.quick else FULL)
    settings = {
        "ops": args.ops or base["ops"],
        "repeat": args.repeat or base["repeat"],
        "seconds": args.seconds or base["seconds"],
        "handovers": args.handovers or base["handovers"],
        "quick": args.quick,
        "threads": THREADS,
        "processes": PROCESSES,
    }
    if args.scenarios:
        scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        unknown = [s for s in scenarios if s not in SCENARIOS]
        if unknown:
            raise SystemExit(f"unknown scenarios: {', '.join(unknown)} (known: {', '.join(SCENARIOS)})")
    else:
        scenarios = list(SCENARIOS)
    results = run(settings, scenarios, binary)
    text = markdown(results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=_jsonable)
        f.write("\n")
    print(text)
    print(f"(results.md and results.json are in {args.out})", file=sys.stderr)
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


if __name__ == "__main__":
    sys.exit(main())
